"""Compressed checkpoints: a plain HF folder whose config.json carries a ``rocketkit`` section.

Loading rebuilds the base architecture from the config (no remote code, no pickle), swaps in
FactorizedLinear where the section says so, and loads the safetensors with shape/dtype checks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_FORMAT_VERSION = 1
_INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def rocketkit_section(allocation, applied: dict | None = None) -> dict:
    layers = []
    for name, d in allocation.layers.items():
        if d.dense:
            continue
        rec = {
            "name": name, "k": d.k, "s": d.s, "cr": d.cr, "ks": d.ks, "cost": allocation.cost,
            "index_dtype": d.index_dtype, "d1": d.d1, "d2": d.d2,
            "errors": {"profiled": {"e_weight": d.e_weight, "e_output": d.e_output}},
        }
        if applied and name in applied:
            a = applied[name]
            rec["errors"]["applied"] = {"e_weight": a.e_weight, "e_output": a.e_output}
        layers.append(rec)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "cost": allocation.cost,
        "alpha": allocation.alpha,
        "method": allocation.method,
        "ratio": allocation.ratio,
        "achieved_ratio": allocation.achieved_ratio,
        "layers": layers,
    }


def save_compressed(
    model, tokenizer, allocation, out_dir, applied=None, overwrite: bool = False, extra=None, progress: bool = True
) -> dict:
    """Write ``out_dir`` atomically (temp sibling folder, then rename): config.json with the rocketkit
    section, model.safetensors (via save_pretrained: tied weights and sharding handled), the tokenizer,
    and ``extra(tmp_dir)`` if given (e.g. profile/allocation files). Returns :func:`checkpoint_info`."""
    from rocketkit.fileio import atomic_directory, atomic_write_json, read_json
    from rocketkit.modules import FactorizedLinear

    section = rocketkit_section(allocation, applied)
    modules = dict(model.named_modules())
    for rec in section["layers"]:
        if not isinstance(modules.get(rec["name"]), FactorizedLinear):
            raise ValueError(f"save_compressed: layer {rec['name']!r} is not a FactorizedLinear (apply the allocation first)")
    out_dir = Path(out_dir)
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        cfg = read_json(tmp / "config.json")
        cfg["rocketkit"] = section
        atomic_write_json(tmp / "config.json", cfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return checkpoint_info(out_dir)


def _safetensors_files(path: Path) -> list[Path]:
    from rocketkit.fileio import read_json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not files:
            raise ValueError(f"{index}: empty weight_map")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    return [single]


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets) without reading data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file: {e}") from None
    header.pop("__metadata__", None)
    return header


def checkpoint_info(path) -> dict:
    """Bytes on disk by kind (U, C values, C indices, dense rest, other files), parameter counts, ratio."""
    from rocketkit.fileio import read_json

    path = Path(path)
    cfg = read_json(path / "config.json")
    section = cfg.get("rocketkit")
    if not isinstance(section, dict):
        raise ValueError(f"{path / 'config.json'}: no rocketkit section (not a rocketkit checkpoint)")
    bytes_by = {"U": 0, "C_values": 0, "C_indices": 0, "dense": 0}
    params_by = {"U": 0, "C_values": 0, "dense": 0}
    files = _safetensors_files(path)
    for f in files:
        for name, t in _safetensors_header(f).items():
            numel = 1
            for dim in t["shape"]:
                numel *= int(dim)
            nbytes = int(t["data_offsets"][1]) - int(t["data_offsets"][0])
            kind = name.rsplit(".", 1)[-1]
            kind = kind if kind in ("U", "C_values", "C_indices") else "dense"
            bytes_by[kind] += nbytes
            if kind != "C_indices":
                params_by[kind] += numel
    tensor_file_bytes = sum(f.stat().st_size for f in files)
    total_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    dense_before = sum(r["d1"] * r["d2"] for r in section.get("layers", []))
    factorized = params_by["U"] + params_by["C_values"]
    return {
        "path": str(path),
        "model_type": cfg.get("model_type"),
        "format_version": section.get("format_version"),
        "cost": section.get("cost"),
        "factorized_layers": len(section.get("layers", [])),
        "bytes": {**bytes_by, "safetensors_total": tensor_file_bytes, "folder_total": total_bytes},
        "params": {**params_by, "total": sum(params_by.values()), "factorized_layers_dense": dense_before,
                   "factorized_layers_after": factorized},
        "ratio": {"target": section.get("ratio"), "achieved": section.get("achieved_ratio")},
    }


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _tied_groups(model) -> dict[str, list[str]]:
    """State-dict key -> every key sharing its parameter (save_pretrained stores one of a tied group)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def load_pretrained(path, device="cpu", dtype=None):
    """Load a rocketkit checkpoint as an ordinary transformers model (FactorizedLinear where compressed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rocketkit.fileio import load_safetensors, read_json
    from rocketkit.models import check_model_type
    from rocketkit.modules import FactorizedLinear

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    cfg_path = path / "config.json"
    section = read_json(cfg_path).get("rocketkit")
    if not isinstance(section, dict):
        raise ValueError(f"{cfg_path}: no rocketkit section (not a rocketkit checkpoint)")
    if section.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: rocketkit format_version {section.get('format_version')!r}, this rocketkit reads {CHECKPOINT_FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    check_model_type(config)
    files = _safetensors_files(path)
    tensors: dict[str, tuple[torch.Tensor, Path]] = {}
    for f in files:
        ts, _ = load_safetensors(f)
        for k, t in ts.items():
            tensors[k] = (t, f)
    if dtype is None:
        floats = [t.dtype for t, _ in tensors.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for rec in section.get("layers", []):
        try:
            name, k, s, d1, d2, idx_name = rec["name"], int(rec["k"]), int(rec["s"]), int(rec["d1"]), int(rec["d2"]), rec["index_dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: malformed rocketkit layer record {rec!r} ({e})") from None
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{cfg_path}: rocketkit layer {name!r} does not exist in a {config.model_type} model") from None
        if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (d1, d2):
            raise ValueError(f"{cfg_path}: rocketkit layer {name!r} is ({d1}, {d2}) but the architecture has {lin}")
        if idx_name not in _INDEX_DTYPES:
            raise ValueError(f"{cfg_path}: layer {name!r} has unknown index_dtype {idx_name!r}")
        new = FactorizedLinear(d1, d2, k, s, bias=lin.bias is not None, dtype=dtype)
        if new.C_indices.dtype != _INDEX_DTYPES[idx_name]:
            raise ValueError(f"{cfg_path}: layer {name!r}: index_dtype {idx_name} does not match k={k}")
        _set_submodule(model, name, new)
    expected = model.state_dict()
    tied = _tied_groups(model)
    state = {}
    for key, (t, f) in tensors.items():
        ref = expected.get(key)
        if ref is None:
            raise ValueError(f"{f}: unexpected tensor {key!r} (not in the {config.model_type} architecture)")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if ref.is_floating_point() != t.is_floating_point() or (not ref.is_floating_point() and t.dtype != ref.dtype):
            raise ValueError(f"{f}: tensor {key!r} has dtype {t.dtype}, expected {ref.dtype}")
        if key.endswith(".C_indices"):
            k = model.get_submodule(key.rsplit(".", 1)[0]).k
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
                raise ValueError(f"{f}: tensor {key!r} has indices outside [0, {k})")
        state[key] = t
    persistent = set(expected)
    missing = sorted(k for k in persistent - set(state) if not any(o in state for o in tied.get(k, ())))
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(device).eval()
