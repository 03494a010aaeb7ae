"""Writing a compressed checkpoint shard by shard (the streaming counterpart of save_compressed).

The folder follows docs/format.md with ``save_pretrained``'s sharded layout: shard 1 holds the
non-block weights (embeddings, final norm, lm_head unless tied), shard i + 2 holds decoder block
i, ``model.safetensors.index.json`` maps every tensor to its shard, and config.json carries the
``rocketkit`` section (``checkpoint.rocketkit_section``). A block's shard holds its dense tensors
exactly as its state dict names them and, for each factorized layer ``P``, ``P.U``,
``P.C_values``, ``P.C_indices`` (and ``P.bias``) exactly as ``FactorizedLinear`` names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

SHARD_METADATA = {"format": "pt"}


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def block_tensors(block: nn.Module, prefix: str, factorized: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """State dict of ``block`` (keys prefixed ``prefix.``) with each linear named in ``factorized``
    (relative name -> FactorizedLinear) replaced by the factorized module's tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, t in block.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in factorized:
            continue
        if t.device.type == "meta":
            raise RuntimeError(f"{prefix}.{key} is not materialized")
        out[f"{prefix}.{key}"] = _host(t)
    for rel, module in factorized.items():
        for key, t in module.state_dict().items():
            out[f"{prefix}.{rel}.{key}"] = _host(t)
    return out


def non_block_tensors(model: nn.Module, block_prefix: str) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the decoder blocks; of tied tensors (same storage) only the
    first key is kept, as save_pretrained keeps the input embedding of tied embeddings."""
    out: dict[str, torch.Tensor] = {}
    seen: set = set()
    for key, t in model.state_dict().items():
        if key.startswith(block_prefix + "."):
            continue
        if t.device.type == "meta":
            raise RuntimeError(f"{key} is not materialized")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = _host(t)
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_shard(path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one shard atomically; returns its record (file name, tensor names, sizes)."""
    from rocketkit.fileio import atomic_save_safetensors

    path = Path(path)
    atomic_save_safetensors(path, tensors, metadata=SHARD_METADATA)
    return {"shard": path.name, "tensors": sorted(tensors), "tensor_bytes": tensor_bytes(tensors),
            "bytes": path.stat().st_size}


def shard_tensor_names(path) -> list[str]:
    """The tensor names in a safetensors file's header (validated: a bad file is a ValueError naming it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sorted(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e}") from None


def write_index(folder, weight_map: dict[str, str], total_size: int) -> None:
    from rocketkit.fileio import atomic_write_json

    atomic_write_json(Path(folder) / "model.safetensors.index.json",
                      {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))})


def write_config(folder, model: nn.Module, section: dict, dtype: torch.dtype) -> None:
    """config.json as save_pretrained writes it for ``model`` stored in ``dtype``, plus ``section`` (and
    what transformers needs to load it: ``checkpoint.stamp_config``)."""
    from rocketkit.checkpoint import stamp_config, with_experts
    from rocketkit.fileio import atomic_write_json

    cfg = json.loads(model.config.to_json_string(use_diff=True))
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg = dict(sorted(cfg.items()))  # to_json_string's order, whatever the source config held
    atomic_write_json(Path(folder) / "config.json", stamp_config(cfg, with_experts(section, model)))


def write_generation_config(folder, model: nn.Module, source_folder=None) -> None:
    """The source folder's generation_config.json (sampling defaults) when it has one, else the
    model's generation config, as save_pretrained would write it."""
    from rocketkit.fileio import atomic_write_bytes

    dest = Path(folder) / "generation_config.json"
    if source_folder is not None and (Path(source_folder) / "generation_config.json").is_file():
        atomic_write_bytes(dest, (Path(source_folder) / "generation_config.json").read_bytes())
        return
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        atomic_write_bytes(dest, gen.to_json_string(use_diff=True).encode())


def write_tokenizer(folder, tokenizer, scratch_parent) -> list[str]:
    """The tokenizer's files: its save_pretrained writes them into a temporary folder under
    ``scratch_parent`` (removed afterwards), from which each is copied into ``folder`` atomically."""
    import shutil
    import tempfile

    from rocketkit.fileio import atomic_write_bytes

    if tokenizer is None:
        return []
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=scratch_parent))
    try:
        tokenizer.save_pretrained(tmp)
        names = []
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                atomic_write_bytes(Path(folder) / p.name, p.read_bytes())
                names.append(p.name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_factorized_block(shard_path, prefix: str, records: dict[str, dict], dtype=None, device="cpu") -> dict[str, nn.Module]:
    """FactorizedLinear modules of one block read back from its shard: ``records`` maps the relative
    name to its rocketkit layer record (d1, d2, k, s). Shapes are checked by ``from_factors``."""
    from rocketkit.fileio import load_safetensors
    from rocketkit.modules import FactorizedLinear

    tensors, _ = load_safetensors(shard_path)
    out = {}
    for rel, rec in records.items():
        p = f"{prefix}.{rel}."
        try:
            U, values, indices = tensors[p + "U"], tensors[p + "C_values"], tensors[p + "C_indices"]
        except KeyError as e:
            raise ValueError(f"{shard_path}: tensor {e} of {prefix}.{rel} is missing") from None
        if (U.shape[0], values.shape[1], U.shape[1], values.shape[0]) != (rec["d1"], rec["d2"], rec["k"], rec["s"]):
            raise ValueError(f"{shard_path}: {prefix}.{rel} has U {tuple(U.shape)}, C {tuple(values.shape)}; "
                             f"the allocation says d1={rec['d1']} d2={rec['d2']} k={rec['k']} s={rec['s']}")
        out[rel] = FactorizedLinear.from_factors(U, values, indices, bias=tensors.get(p + "bias"),
                                                 dtype=dtype or U.dtype, device=device)
    return out
