"""Run model files on one runtime and save what they output: the compatibility matrix's worker.

Standalone on purpose: it needs numpy and one runtime, nothing else (not even dafar), because it
runs inside a virtual environment that holds only that runtime, as a device would (for example
tflite-runtime 2.14 with numpy < 2, what Raspberry Pi OS users often have).

    python probe.py RUNTIME JOBS.json OUT_DIR

RUNTIME: tflite_runtime | litert | litert-compiled | onnxruntime | openvino.  JOBS.json: a list of
``{"key": ..., "model": path, "input": path.npy, "names": {tensor name: output name}}`` (names:
optional, for runtimes that see a .tflite file's tensor names rather than its signature's).  For each job, ``OUT_DIR/KEY.npz`` holds the
outputs by name (every image of the input, in the file's fixed batch or 100 at a time), and
``OUT_DIR/status.json`` says per key whether the file loaded and ran, with the error if not, and
the runtime's version.
"""
import json
import sys
import traceback
from pathlib import Path

import numpy as np

SIGNATURE = "serving_default"


def _version(pkg):
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


def _tflite(path, api):
    if api == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path), num_threads=1)
    runner = it.get_signature_runner(SIGNATURE)
    (name, det), = runner.get_input_details().items()
    batch = int(det["shape"][0])

    def run(x):
        return {k: np.array(v) for k, v in runner(**{name: x}).items()}

    return run, batch


def _compiled(path):
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    m = CompiledModel.from_file(str(path), options=Options(HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=1)))
    si = m.get_signature_index(SIGNATURE)
    ind, outd = m.get_input_tensor_details(SIGNATURE), m.get_output_tensor_details(SIGNATURE)
    ins, outs = m.create_input_buffers(si), m.create_output_buffers(si)
    batch = int(next(iter(ind.values()))["shape"][0])

    def run(x):
        ins[0].write(np.ascontiguousarray(x))
        m.run_by_index(si, ins, outs)
        return {k: np.array(b.read(int(np.prod(d["shape"])), np.dtype(d["dtype"]))).reshape(d["shape"])
                for (k, d), b in zip(outd.items(), outs)}

    return run, batch


def _onnxruntime(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    names = [o.name for o in s.get_outputs()]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else 100

    def run(x):
        return dict(zip(names, s.run(names, {inp.name: x})))

    return run, batch


def _openvino(path, names=None):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    # f32 throughout: on CPUs with bf16 support OpenVINO would otherwise compute in bf16
    cm = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    shape = model.inputs[0].get_partial_shape()
    batch = shape[0].get_length() if shape[0].is_static else 100
    wanted = ("label", "score", "rejected", "logits", "purified_logits")
    keys = []
    for o in cm.outputs:
        got = o.get_names()
        # .onnx outputs carry our names; a .tflite file's are tensor names ("PartitionedCall:0"),
        # mapped through its signature by the caller (``names``)
        hit = [w for w in wanted if w in got] or [names[n] for n in sorted(got) if names and n in names]
        keys.append(hit[0] if hit else sorted(got)[0])
    req = cm.create_infer_request()

    def run(x):
        res = req.infer({0: x})
        return {k: np.array(res[o]) for k, o in zip(keys, cm.outputs)}

    return run, batch


def load(runtime, path, names=None):
    if runtime in ("tflite_runtime", "litert"):
        return _tflite(path, runtime)
    if runtime == "litert-compiled":
        return _compiled(path)
    if runtime == "onnxruntime":
        return _onnxruntime(path)
    if runtime == "openvino":
        return _openvino(path, names)
    raise SystemExit(f"unknown runtime {runtime!r}")


def run_all(run, batch, x):
    outs = {}
    for i in range(0, len(x), batch):
        chunk = x[i: i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        for k, v in run(np.ascontiguousarray(chunk)).items():
            outs.setdefault(k, []).append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in outs.items()}


def main(runtime, jobs_path, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pkg = {"tflite_runtime": "tflite-runtime", "litert": "ai-edge-litert", "litert-compiled": "ai-edge-litert",
           "onnxruntime": "onnxruntime", "openvino": "openvino"}[runtime]
    status = {"runtime": runtime, "version": _version(pkg), "numpy": np.__version__, "jobs": {}}
    for job in json.loads(Path(jobs_path).read_text()):
        rec = {"model": job["model"], "loaded": False, "ran": False}
        try:
            run, batch = load(runtime, job["model"], job.get("names"))
            rec["loaded"] = True
            res = run_all(run, batch, np.load(job["input"]))
            np.savez(out / f"{job['key']}.npz", **res)
            rec["ran"] = True
            rec["dtypes"] = {k: str(v.dtype) for k, v in res.items()}
        except BaseException as exc:  # noqa: BLE001 - every failure is a result here
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rec["trace"] = traceback.format_exc()[-1500:]
        status["jobs"][job["key"]] = rec
        (out / "status.json").write_text(json.dumps(status, indent=1))
    (out / "status.json").write_text(json.dumps(status, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
