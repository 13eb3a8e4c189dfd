"""Weights as safetensors plus JSON: loading never unpickles, so never executes code.

Checkpoints for resuming hold the model, the Adam moments and the scheduler state; tensors go to
safetensors, the few scalars to a JSON sidecar.  Both are written atomically (temporary name,
then rename), and the JSON last, so a checkpoint is complete exactly when its JSON exists and
matches: an interrupted or failed run never replaces a good checkpoint with a broken one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dafar.errors import TrainingError, WeightsError
from dafar.manifest import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = ["save_state", "load_state", "load_into", "save_checkpoint", "load_checkpoint"]


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (and optional string metadata) as safetensors, byte-for-byte reproducibly.

    safetensors serialises its metadata map in hash order, so several keys give different bytes
    (and sha256) run to run; packing them into one sorted JSON string keeps file hashes stable."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"dafar": json.dumps(metadata, sort_keys=True)} if metadata else None
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} is missing")
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{p} is not a readable safetensors file: {exc}") from exc


def load_into(module: torch.nn.Module, path: str | os.PathLike, prefix: str = "") -> None:
    """Load ``path`` (keys optionally under ``prefix``) into ``module``, strictly."""
    state = load_state(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    bad = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if extra:
            parts.append(f"unexpected {extra[:4]}")
        if bad:
            parts.append("shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}" for k in bad[:4]))
        raise WeightsError(f"{path} does not fit {type(module).__name__}: {'; '.join(parts)}")
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeightsError(f"{path}: tensor {k} holds non-finite values")
    module.load_state_dict(state, strict=True)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for name, v in meta.get("scalars", {}).items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(prefix: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched, info: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``prefix.safetensors`` (model + optimizer tensors, and ``extra`` tensors, e.g. a weight
    average, whose names must start with a prefix of their own) then ``prefix.json`` (the rest)."""
    prefix = Path(prefix)
    opt_t, opt_meta = _flatten_optimizer(opt)
    extra = dict(extra or {})
    if any(k.startswith(("model.", "opt.")) for k in extra):
        raise ValueError("extra checkpoint tensors must not use the model./opt. prefixes")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | opt_t | extra
    st_path = prefix.with_suffix(".safetensors")
    save_state(st_path, tensors)
    meta = {
        "info": info,
        "optimizer": opt_meta,
        "scheduler": sched.state_dict() if sched is not None else None,
        "tensors_sha256": sha256_file(st_path),
    }
    atomic_write_json(prefix.with_suffix(".json"), meta)


def read_checkpoint(prefix: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON part and the tensors of a checkpoint written by :func:`save_checkpoint`, after
    checking that the two belong together."""
    prefix = Path(prefix)
    st_path, js_path = prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")
    try:
        meta = json.loads(js_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"checkpoint {js_path} is unreadable: {exc}") from exc
    if sha256_file(st_path) != meta.get("tensors_sha256"):
        raise TrainingError(f"checkpoint {st_path} does not match {js_path} (interrupted write or edited file)")
    return meta, load_state(st_path)


def load_checkpoint(prefix: str | os.PathLike, model: torch.nn.Module, opt: torch.optim.Optimizer, sched,
                    extra: dict | None = None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``info`` (and fills
    ``extra`` with the extra tensors, when given)."""
    meta, tensors = read_checkpoint(prefix)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if sched is not None and meta.get("scheduler") is not None:
        sched.load_state_dict(meta["scheduler"])
    if extra is not None:
        extra.update({k: v for k, v in tensors.items() if not k.startswith(("model.", "opt."))})
    return meta["info"]
