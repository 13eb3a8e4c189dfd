#!/usr/bin/env node
// Classify images with a dafar run's exported ONNX defence, from Node.js (onnxruntime-node).
//
//   npm install onnxruntime-node            (ONNXRUNTIME_NODE_INSTALL=skip: CPU only, nothing downloaded)
//   node classify.js RUN_DIR IMAGES.npy [--model export/NAME.onnx] [--json]
//
// IMAGES.npy: uint8 N x H x W x C camera pixels (run on a uint8-nhwc model) or float32
// N x C x H x W in [0, 1] (a float-nchw model); `np.save("images.npy", batch)` in Python writes one.
// The model file's sha256 is checked against the run's manifest.json before it is loaded, and a
// NaN score counts as rejected (the graph already does this; the check here is belt and braces):
// the client fails closed, like the Python runtime.
"use strict";
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");

function fail(msg) {
  process.stderr.write(`classify.js: error: ${msg}\n`);
  process.exit(2);
}

// A .npy file (format 1.0-3.0, C order, uint8 or little-endian float32) as {shape, dtype, data}.
function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.length < 10 || buf.toString("latin1", 0, 6) !== "\x93NUMPY") fail(`${file}: not a .npy file`);
  const major = buf[6];
  const hlen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = buf.toString("latin1", start, start + hlen);
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeM = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeM) fail(`${file}: unreadable .npy header`);
  if (fortran[1] === "True") fail(`${file}: Fortran-ordered arrays are not supported (np.ascontiguousarray first)`);
  const shape = shapeM[1].split(",").map((s) => s.trim()).filter((s) => s.length).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const off = start + hlen;
  let data;
  let dtype;
  if (descr[1] === "|u1") {
    dtype = "uint8";
    data = new Uint8Array(buf.buffer, buf.byteOffset + off, count);
  } else if (descr[1] === "<f4") {
    dtype = "float32";
    data = new Float32Array(buf.buffer.slice(buf.byteOffset + off, buf.byteOffset + off + 4 * count));
  } else {
    fail(`${file}: dtype ${descr[1]} (use uint8 pixels or float32 in [0, 1])`);
  }
  if (data.length !== count) fail(`${file}: holds fewer values than its header declares`);
  return { shape, dtype, data };
}

function pickModel(manifest, dtype, asked) {
  const exports = manifest.exports || {};
  if (asked) {
    if (!exports[asked]) fail(`the manifest lists no model ${asked}`);
    return asked;
  }
  const contract = dtype === "uint8" ? "uint8-nhwc" : "float-nchw";
  // The same order as the Python runtime's default_model (dafar.runtime.core), among the ONNX
  // defence graphs (not victims) that take this input: int8 before float, the L2 detector,
  // hybrid before detect mode, then the file name.
  const rank = (e) => [e.precision === "int8" ? 0 : 1, e.detector === "l2" ? 0 : 1, (e.mode || "hybrid") === "hybrid" ? 0 : 1];
  const cands = Object.keys(exports).filter((k) => {
    const e = exports[k];
    return e.format === "onnx" && e.graph === "dafar" && e.contract === contract;
  }).sort((a, b) => {
    const ra = rank(exports[a]);
    const rb = rank(exports[b]);
    for (let i = 0; i < ra.length; i++) if (ra[i] !== rb[i]) return ra[i] - rb[i];
    return a < b ? -1 : a > b ? 1 : 0;
  });
  if (!cands.length) fail(`no ONNX defence graph for ${contract} input in this run (run: dafar export RUN --format onnx)`);
  return cands[0];
}

async function main(argv) {
  const args = argv.filter((a) => !a.startsWith("--"));
  const json = argv.includes("--json");
  const mi = argv.indexOf("--model");
  const asked = mi >= 0 ? argv[mi + 1] : null;
  const pos = args.filter((a) => a !== asked);
  if (pos.length !== 2) fail("usage: node classify.js RUN_DIR IMAGES.npy [--model export/NAME.onnx] [--json]");
  const [run, npy] = pos;
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(path.join(run, "manifest.json"), "utf8"));
  } catch (e) {
    fail(`${run}: no readable manifest.json (${e.message})`);
  }
  const img = readNpy(npy);
  const rel = pickModel(manifest, img.dtype, asked);
  const entry = manifest.exports[rel];
  const file = path.join(run, rel);
  const want = (manifest.files || {})[rel];
  const bytes = fs.readFileSync(file);
  const got = crypto.createHash("sha256").update(bytes).digest("hex");
  if (!want || want.sha256 !== got) fail(`${file}: sha256 ${got} differs from the manifest's; refusing to run it`);
  const expect = entry.input.shape.slice(1);
  if (img.shape.length !== 4 || img.shape.slice(1).join(",") !== expect.join(",")) {
    fail(`${npy}: shape [${img.shape}] but ${rel} takes [N,${expect}] ${entry.input.dtype}`);
  }
  if (img.dtype !== entry.input.dtype) fail(`${npy}: ${img.dtype} but ${rel} takes ${entry.input.dtype}`);

  const ort = require("onnxruntime-node");
  const session = await ort.InferenceSession.create(bytes, { intraOpNumThreads: 1 });
  const classes = entry.classes || manifest.classes || (manifest.dataset || {}).classes || [];
  const n = img.shape[0];
  const per = expect.reduce((a, b) => a * b, 1);
  const rows = [];
  const batch = 100;
  for (let i = 0; i < n; i += batch) {
    const m = Math.min(batch, n - i);
    const slice = img.data.subarray(i * per, (i + m) * per);
    const t = new ort.Tensor(img.dtype, slice, [m, ...expect]);
    const out = await session.run({ [session.inputNames[0]]: t });
    const k = out.logits ? out.logits.dims[1] : 0;
    for (let j = 0; j < m; j++) {
      const label = Number(out.label.data[j]);
      if (out.score) {
        const score = out.score.data[j];
        const rejected = Boolean(out.rejected.data[j]) || !Number.isFinite(score);
        rows.push({ index: i + j, label, class: classes[label], score, rejected });
      } else {  // a victim-only graph: no defence, no score
        rows.push({ index: i + j, label, class: classes[label], score: null, rejected: null,
                    logits: Array.from(out.logits.data.subarray(j * k, (j + 1) * k)) });
      }
    }
  }
  if (json) {
    process.stdout.write(JSON.stringify({ model: rel, alpha: entry.alpha, predictions: rows }) + "\n");
  } else {
    process.stdout.write(`model ${rel} (alpha ${entry.alpha})\n`);
    for (const r of rows) {
      const verdict = r.score === null ? "(no defence)" : `score ${r.score.toFixed(4)}  ${r.rejected ? "REJECTED" : "ACCEPTED"}`;
      process.stdout.write(`${r.index}: label ${r.label}${r.class !== undefined ? ` (${r.class})` : ""}  ${verdict}\n`);
    }
  }
}

main(process.argv.slice(2)).catch((e) => fail(e.message || String(e)));
