"""Compressed checkpoints: a plain HF folder whose config.json carries a ``rocketkit`` section.

Loading rebuilds the base architecture from the config (no remote code, no pickle), swaps in
FactorizedLinear where the section says so, and loads the safetensors with shape/dtype checks.
``export_dense`` merges U·C back into ordinary Linear weights (a plain HF checkpoint), tensor by
tensor without building the model. The format is described in docs/format.md.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rocketkit.profile import INT16_MAX_RANK

CHECKPOINT_FORMAT_VERSION = 2
QUANT_METHOD = "rocketkit"
# config.json's "transformers_weights" in a checkpoint: transformers reads it as the weights' file name and,
# since it is not a .safetensors name, refuses to load with this text in its message. rocketkit's quantizer
# removes it before transformers resolves the files, so only a process that imported rocketkit loads the
# factorized layers; any other gets this error instead of a model whose factorized layers are random.
IMPORT_GUARD = "rocketkit checkpoint: run `import rocketkit` before from_pretrained (pip install rocketkit)"
_INDEX_DTYPES = {"int16": torch.int16, "int32": torch.int32}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_NAMES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FACTOR_SUFFIXES = ("U", "C_values", "C_indices")
# Files a dense export copies from the compressed folder besides config.json and the tensors.
_COPIED_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                           r"spiece\.model|chat_template\..*|generation_config\.json)$")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _float_dtype(dtype, what: str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.replace("torch.", "") not in _FLOAT_NAMES:
            raise ValueError(f"{what}: dtype must be one of {', '.join(_FLOAT_NAMES)}, got {dtype!r}")
        return _FLOAT_NAMES[dtype.replace("torch.", "")]
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_NAMES.values():
        raise ValueError(f"{what}: dtype must be a floating torch dtype ({', '.join(_FLOAT_NAMES)}), got {dtype!r}")
    return dtype


def rocketkit_section(allocation, applied: dict | None = None, dtype=None) -> dict:
    """The ``rocketkit`` section of config.json for ``allocation``; ``dtype`` (the weights' dtype) is
    written into every layer record when given (save_compressed fills it from the modules)."""
    layers = []
    for name, d in allocation.layers.items():
        if d.dense:
            continue
        rec = {
            "name": name, "k": d.k, "s": d.s, "cr": d.cr, "ks": d.ks, "cost": allocation.cost,
            "index_dtype": d.index_dtype, "d1": d.d1, "d2": d.d2,
            "errors": {"profiled": {"e_weight": d.e_weight, "e_output": d.e_output}},
        }
        if dtype is not None:
            rec["dtype"] = dtype_name(dtype)
        if applied and name in applied:
            a = applied[name]
            rec["errors"]["applied"] = {"e_weight": a.e_weight, "e_output": a.e_output}
        layers.append(rec)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "cost": allocation.cost,
        "alpha": allocation.alpha,
        "method": allocation.method,
        "weighting": allocation.weighting,
        "power": allocation.power,
        "ratio": allocation.ratio,
        "achieved_ratio": allocation.achieved_ratio,
        "compressible_params_before": allocation.dense_params,
        "compressible_params_after": allocation.params,
        "layers": layers,
    }


def with_experts(section: dict, model) -> dict:
    """``section`` plus, when ``model`` holds MoE experts converted to per-expert linears
    (``arch.moe``), their records under ``"experts"``: loading converts the same modules before
    reading the tensors, and the dense export stacks them back into the family's 3-D tensors.
    A model without such modules gets ``section`` unchanged."""
    from rocketkit.arch.moe import experts_records

    records = experts_records(model)
    return {**section, "experts": records} if records else section


def experts_section(section: dict, where) -> list[dict]:
    """The validated ``"experts"`` records of a rocketkit section (none for most models)."""
    raw = section.get("experts", [])
    if not isinstance(raw, list):
        raise ValueError(f"{where}: rocketkit \"experts\" must be a list, got {type(raw).__name__}")
    for rec in raw:
        ok = (isinstance(rec, dict) and isinstance(rec.get("name"), str) and rec["name"]
              and isinstance(rec.get("num_experts"), int) and not isinstance(rec["num_experts"], bool)
              and rec["num_experts"] >= 1 and rec.get("projections") in (["gate_up_proj", "down_proj"], ["up_proj", "down_proj"])
              and isinstance(rec.get("transposed"), bool) and isinstance(rec.get("bias"), bool))
        if not ok:
            raise ValueError(f"{where}: malformed rocketkit experts record {rec!r}")
    return raw


def stamp_config(cfg: dict, section: dict) -> dict:
    """config.json of a checkpoint: ``cfg`` with the rocketkit ``section``, the ``quantization_config``
    that routes ``from_pretrained`` to rocketkit's quantizer, and the import guard (IMPORT_GUARD)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("rocketkit", "quantization_config", "transformers_weights")}
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": section["format_version"]}
    cfg["rocketkit"] = section
    cfg["transformers_weights"] = IMPORT_GUARD
    return cfg


def format_1_message(cfg_path, path) -> str:
    """The refusal of a format_version 1 checkpoint, with its fix (rocketkit's readers and from_pretrained)."""
    return (f"{cfg_path}: rocketkit format_version 1 (written before the transformers integration); "
            f"convert it in place with `rocketkit upgrade {path}` (the tensors stay as they are)")


def upgrade_checkpoint(path) -> int:
    """Rewrite a format_version 1 checkpoint's config.json as version 2 in place (the tensors are the
    same in both; version 2 adds the quantization_config and the import guard). Returns the version
    found; a version 2 checkpoint is left as it is."""
    from rocketkit.fileio import atomic_write_json

    path = Path(path)
    cfg_path = path / "config.json"
    cfg = _read_json(cfg_path)
    section = cfg.get("rocketkit")
    if not isinstance(section, dict):
        raise ValueError(f"{cfg_path}: no rocketkit section (not a rocketkit checkpoint)")
    found = section.get("format_version")
    if found == CHECKPOINT_FORMAT_VERSION:
        read_config(path)
        return found
    if found != 1:
        raise ValueError(f"{cfg_path}: rocketkit format_version {found!r}, this rocketkit upgrades 1 to {CHECKPOINT_FORMAT_VERSION}")
    atomic_write_json(cfg_path, stamp_config(cfg, {**section, "format_version": CHECKPOINT_FORMAT_VERSION}))
    try:
        read_config(path)
    except ValueError:
        atomic_write_json(cfg_path, cfg)  # leave a checkpoint that does not validate as it was
        raise
    return found


def save_compressed(
    model, tokenizer, allocation, out_dir, applied=None, overwrite: bool = False, extra=None, progress: bool = True
) -> dict:
    """Write ``out_dir`` atomically (temp sibling folder, then rename): config.json with the rocketkit
    section, model.safetensors (via save_pretrained: tied weights and sharding handled), the tokenizer,
    and ``extra(tmp_dir)`` if given (e.g. profile/allocation files). Returns :func:`checkpoint_info`."""
    from rocketkit.fileio import atomic_directory, atomic_write_json, read_json
    from rocketkit.modules import FactorizedLinear

    section = with_experts(rocketkit_section(allocation, applied), model)
    modules = dict(model.named_modules())
    for rec in section["layers"]:
        module = modules.get(rec["name"])
        if not isinstance(module, FactorizedLinear):
            raise ValueError(f"save_compressed: layer {rec['name']!r} is not a FactorizedLinear (apply the allocation first)")
        rec["dtype"] = dtype_name(module.U.dtype)
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
        atomic_write_json(tmp / "config.json", stamp_config(read_json(tmp / "config.json"), section))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return checkpoint_info(out_dir)


# ---- reading: config, layer records, safetensors headers ------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint as its safetensors header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerRecord:
    name: str
    d1: int
    d2: int
    k: int
    s: int
    index_dtype: torch.dtype
    dtype: torch.dtype | None  # the factors' dtype, when the record states it


def _read_json(path: Path) -> dict:
    """fileio.read_json, with undecodable bytes also reported as a ValueError naming the file."""
    from rocketkit.fileio import read_json

    try:
        return read_json(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text; corrupted?): {e}") from None


def read_config(path) -> tuple[dict, dict, list[LayerRecord]]:
    """config.json of a rocketkit checkpoint: (whole config, rocketkit section, validated layer records)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found (no such checkpoint folder)")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    cfg_path = path / "config.json"
    cfg = _read_json(cfg_path)
    section = cfg.get("rocketkit")
    if not isinstance(section, dict):
        raise ValueError(f"{cfg_path}: no rocketkit section (not a rocketkit checkpoint)")
    if section.get("format_version") == 1:
        raise ValueError(format_1_message(cfg_path, path))
    if section.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: rocketkit format_version {section.get('format_version')!r}, "
                         f"this rocketkit reads {CHECKPOINT_FORMAT_VERSION}")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or qc.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: quantization_config must be {{\"quant_method\": \"{QUANT_METHOD}\", "
                         f"\"format_version\": {CHECKPOINT_FORMAT_VERSION}}}, got {qc!r}")
    raw = section.get("layers")
    if not isinstance(raw, list):
        raise ValueError(f"{cfg_path}: rocketkit section has no \"layers\" list")
    experts_section(section, cfg_path)
    records: list[LayerRecord] = []
    seen: set[str] = set()
    for rec in raw:
        try:
            name = rec["name"]
            if not isinstance(name, str) or not name:
                raise TypeError("name must be a non-empty string")
            d1, d2, k, s = (rec[f] for f in ("d1", "d2", "k", "s"))
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (d1, d2, k, s)):
                raise TypeError("d1, d2, k, s must be integers")
            idx_name, dt_name = rec["index_dtype"], rec.get("dtype")
        except (KeyError, TypeError) as e:
            raise ValueError(f"{cfg_path}: malformed rocketkit layer record {rec!r} ({e})") from None
        where = f"{cfg_path}: rocketkit layer {name!r}"
        if name in seen:
            raise ValueError(f"{where} is listed twice")
        seen.add(name)
        if not (1 <= s <= k <= min(d1, d2)):
            raise ValueError(f"{where}: needs 1 <= s <= k <= min(d1, d2), got d1={d1} d2={d2} k={k} s={s}")
        if idx_name not in _INDEX_DTYPES:
            raise ValueError(f"{where}: unknown index_dtype {idx_name!r} (int16 or int32)")
        if (k <= INT16_MAX_RANK) != (idx_name == "int16"):
            raise ValueError(f"{where}: index_dtype {idx_name} does not match k={k} (int16 iff k <= {INT16_MAX_RANK})")
        if dt_name is not None and dt_name not in _FLOAT_NAMES:
            raise ValueError(f"{where}: unknown dtype {dt_name!r}")
        records.append(LayerRecord(name, d1, d2, k, s, _INDEX_DTYPES[idx_name],
                                   None if dt_name is None else _FLOAT_NAMES[dt_name]))
    return cfg, section, records


def _safetensors_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, the index's tensor -> file map."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        doc = _read_json(index)
        weight_map = doc.get("weight_map")
        if not isinstance(doc.get("metadata"), dict):
            raise ValueError(f"{index}: no \"metadata\" object (transformers needs one)")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map (or an empty one)")
        mapping: dict[str, Path] = {}
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
                raise ValueError(f"{index}: weight_map entry for {tensor!r} is not a file name in the folder: {fname!r}")
            mapping[tensor] = path / fname
        files = sorted(set(mapping.values()))
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index}: lists shard {f.name!r}, which is missing from {path}")
        return files, mapping
    single = path / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    return [single], None


def _safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The validated tensor table of a safetensors file, read without its data: every entry's dtype,
    shape and byte range are checked against each other and against the file's size, so a
    truncated or corrupted file is a ValueError naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header of {n} bytes runs past the end of the file ({size} bytes; truncated?)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    out: dict[str, TensorEntry] = {}
    ranges = []
    for name, t in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[t["dtype"]]
            shape = tuple(t["shape"])
            begin, end = t["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end)):
                raise TypeError("shape and data_offsets must be non-negative integers")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {t!r} ({e})") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} {t['dtype']} needs {nbytes} bytes, "
                             f"its data_offsets give {end - begin}")
        if end > data_size:
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        ranges.append((begin, end, name))
        out[name] = TensorEntry(path, dtype, shape, nbytes)
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return out


def read_tensor_table(path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder (all shards) by name, from the validated headers. A tensor
    in two files, or an index that places a tensor in a file whose header lacks it (or lacks one the
    file has), is a ValueError."""
    path = Path(path)
    files, mapping = _safetensors_files(path)
    table: dict[str, TensorEntry] = {}
    for f in files:
        for name, entry in _safetensors_header(f).items():
            if name in table:
                raise ValueError(f"{f}: tensor {name!r} is also in {table[name].file}")
            if mapping is not None and mapping.get(name) != f:
                where = "is not in" if name not in mapping else f"is mapped to {mapping[name].name} by"
                raise ValueError(f"{f}: tensor {name!r} {where} {path / 'model.safetensors.index.json'}")
            table[name] = entry
    if mapping is not None:
        absent = sorted(set(mapping) - set(table))
        if absent:
            raise ValueError(f"{path / 'model.safetensors.index.json'}: maps tensors that are in no shard's header: "
                             f"{absent[:8]}{' ...' if len(absent) > 8 else ''}")
    return table


def _check_factor_tensors(table: dict[str, TensorEntry], rec: LayerRecord, where: Path) -> None:
    """The three factor tensors of ``rec`` exist with the shapes and dtypes the record implies."""
    expect = {"U": (rec.d1, rec.k), "C_values": (rec.s, rec.d2), "C_indices": (rec.s, rec.d2)}
    for suffix, shape in expect.items():
        key = f"{rec.name}.{suffix}"
        e = table.get(key)
        if e is None:
            raise ValueError(f"{where}: factorized layer {rec.name!r} has no tensor {key!r} in the checkpoint")
        if e.shape != shape:
            raise ValueError(f"{e.file}: tensor {key!r} has shape {e.shape}, expected {shape}")
        if suffix == "C_indices":
            if e.dtype != rec.index_dtype:
                raise ValueError(f"{e.file}: tensor {key!r} has dtype {dtype_name(e.dtype)} but the config says "
                                 f"{dtype_name(rec.index_dtype)}")
        elif not e.dtype.is_floating_point or (rec.dtype is not None and e.dtype != rec.dtype):
            want = dtype_name(rec.dtype) if rec.dtype is not None else "a floating dtype"
            raise ValueError(f"{e.file}: tensor {key!r} has dtype {dtype_name(e.dtype)}, expected {want}")
    if f"{rec.name}.weight" in table:
        raise ValueError(f"{table[rec.name + '.weight'].file}: factorized layer {rec.name!r} also has a dense weight")
    bias = table.get(f"{rec.name}.bias")
    if bias is not None and bias.shape != (rec.d2,):
        raise ValueError(f"{bias.file}: tensor {rec.name + '.bias'!r} has shape {bias.shape}, expected ({rec.d2},)")


def _read_tensors(file: Path, names) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:  # safetensors raises its own error types for bad files
        raise ValueError(f"{file}: not a valid safetensors file (truncated or corrupted?): {e}") from None


def _check_index_range(t: torch.Tensor, key: str, k: int, file: Path) -> None:
    if t.numel():
        lo, hi = torch.aminmax(t)
        if int(lo) < 0 or int(hi) >= k:
            raise ValueError(f"{file}: tensor {key!r} has indices in [{int(lo)}, {int(hi)}], outside [0, {k})")


# ---- sizes ---------------------------------------------------------------------------------

def checkpoint_info(path) -> dict:
    """True bytes on disk by kind, parameter counts, and the ratio to the dense checkpoint.

    ``bytes``: U, C values, C indices and the dense rest (everything else, embeddings and the
    factorized layers' biases included) as stored, the safetensors files' total (headers
    included) and the whole folder's. The original checkpoint is taken at the same dtype: its
    tensors are the dense rest plus one d2×d1 weight per factorized layer in that layer's dtype,
    derived exactly from the headers and the layer records (nothing extra needs recording)."""
    path = Path(path)
    cfg, section, records = read_config(path)
    table = read_tensor_table(path)
    factor_keys = set()
    for rec in records:
        _check_factor_tensors(table, rec, path / "config.json")
        factor_keys.update(f"{rec.name}.{s}" for s in _FACTOR_SUFFIXES)
    bytes_by = {"U": 0, "C_values": 0, "C_indices": 0, "dense": 0}
    params_by = {"U": 0, "C_values": 0, "dense": 0}
    for name, e in table.items():
        kind = name.rsplit(".", 1)[-1] if name in factor_keys else "dense"
        bytes_by[kind] += e.nbytes
        if kind != "C_indices":
            params_by[kind] += e.numel
    files = sorted({e.file for e in table.values()})
    files_bytes = sum(f.stat().st_size for f in files)
    folder_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    tensor_bytes = sum(bytes_by.values())
    dense_before = sum(r.d1 * r.d2 for r in records)
    dense_before_bytes = sum(r.d1 * r.d2 * table[f"{r.name}.U"].dtype.itemsize for r in records)
    factorized = params_by["U"] + params_by["C_values"]
    params_total = sum(params_by.values())
    original = {"params": params_by["dense"] + dense_before, "tensor_bytes": bytes_by["dense"] + dense_before_bytes}
    return {
        "path": str(path),
        "model_type": cfg.get("model_type"),
        "format_version": section.get("format_version"),
        "cost": section.get("cost"),
        "factorized_layers": len(records),
        "dtypes": sorted({dtype_name(e.dtype) for e in table.values() if e.dtype.is_floating_point}),
        "bytes": {**bytes_by, "tensors": tensor_bytes, "safetensors_total": files_bytes,
                  "safetensors_headers": files_bytes - tensor_bytes, "folder_total": folder_bytes},
        "params": {**params_by, "total": params_total, "factorized_layers_dense": dense_before,
                   "factorized_layers_after": factorized},
        "original": original,
        "ratio": {
            "target": section.get("ratio"),
            "achieved": section.get("achieved_ratio"),
            "params_vs_original": params_total / original["params"] if original["params"] else None,
            "tensor_bytes_vs_original": tensor_bytes / original["tensor_bytes"] if original["tensor_bytes"] else None,
        },
    }


# ---- loading ---------------------------------------------------------------------------------

def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _tied_groups(model) -> dict[str, list[str]]:
    """State-dict key -> every key sharing its parameter (save_pretrained stores one of a tied group)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _hf_config(path: Path):
    from transformers import AutoConfig

    from rocketkit.models import check_architecture

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError, TypeError... for bad configs
        raise ValueError(f"{path / 'config.json'}: not a loadable transformers config: {type(e).__name__}: {e}") from None
    try:
        check_architecture(config)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    return config


def validate_checkpoint(path) -> tuple[dict, list[LayerRecord], dict[str, TensorEntry]]:
    """Everything about a checkpoint that can be checked without the model: config.json (a loadable
    config of a supported family, the section and every record), the index and every safetensors
    header, and the factor tensors' shapes and dtypes. Returns (section, records, tensor table)."""
    path = Path(path)
    _, section, records = read_config(path)
    _hf_config(path)
    table = read_tensor_table(path)
    for rec in records:
        _check_factor_tensors(table, rec, path / "config.json")
    return section, records, table


def _tied_partners(model) -> dict[str, set[str]]:
    """State-dict key -> the keys it is (or will be, once transformers ties them) the same tensor as."""
    partners: dict[str, set[str]] = {}
    for name, names in _tied_groups(model).items():
        partners.setdefault(name, set()).update(n for n in names if n != name)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    return partners


def install_factorized_layers(path, model) -> dict[str, tuple[TensorEntry, int]]:
    """Swap every layer that ``path``'s records name for an empty FactorizedLinear (on the layer's own
    device and dtype, so on transformers' meta device nothing is allocated), then check every tensor
    of the checkpoint against the resulting state dict: shapes, dtypes, nothing missing (tied weights
    aside) and nothing unexpected, each a ValueError naming the file and the tensor. Returns, for
    each C_indices tensor, its table entry and k, for :func:`check_loaded_indices`."""
    from rocketkit.modules import FactorizedLinear

    path = Path(path)
    cfg_path = path / "config.json"
    section, records, table = validate_checkpoint(path)
    model_type = getattr(model.config, "model_type", "?")
    wanted = [r["name"] for r in experts_section(section, cfg_path)]
    if wanted:
        from rocketkit.models import prepare_model

        converted = prepare_model(model)
        if converted != wanted:
            raise ValueError(f"{cfg_path}: rocketkit experts {wanted} do not match the {model_type} architecture's "
                             f"3-D experts modules {converted}")
    for rec in records:
        try:
            lin = model.get_submodule(rec.name)
        except AttributeError:
            raise ValueError(f"{cfg_path}: rocketkit layer {rec.name!r} does not exist in a {model_type} model") from None
        if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (rec.d1, rec.d2):
            raise ValueError(f"{cfg_path}: rocketkit layer {rec.name!r} is ({rec.d1}, {rec.d2}) but the architecture has {lin}")
        _set_submodule(model, rec.name, FactorizedLinear(rec.d1, rec.d2, rec.k, rec.s, bias=lin.bias is not None,
                                                         dtype=lin.weight.dtype, device=lin.weight.device))
        # Some families' weight init reads child.weight of these parents (GPT-BigCode's c_proj), which
        # a FactorizedLinear has not; every tensor of theirs is checked present below, so skip their init.
        parent, _, _ = rec.name.rpartition(".")
        (model.get_submodule(parent) if parent else model)._is_hf_initialized = True
    expected = model.state_dict()
    for key, e in table.items():
        ref = expected.get(key)
        if ref is None:
            raise ValueError(f"{e.file}: unexpected tensor {key!r} (not in the {model_type} architecture)")
        if e.shape != tuple(ref.shape):
            raise ValueError(f"{e.file}: tensor {key!r} has shape {e.shape}, expected {tuple(ref.shape)}")
        if ref.is_floating_point() != e.dtype.is_floating_point or (not ref.is_floating_point() and e.dtype != ref.dtype):
            raise ValueError(f"{e.file}: tensor {key!r} has dtype {dtype_name(e.dtype)}, expected {dtype_name(ref.dtype)}")
    partners = _tied_partners(model)
    missing = sorted(k for k in expected if k not in table and not any(o in table for o in partners.get(k, ())))
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return {f"{r.name}.C_indices": (table[f"{r.name}.C_indices"], r.k) for r in records}


def check_loaded_indices(model, indices: dict[str, tuple[TensorEntry, int]]) -> None:
    """Every loaded C_indices tensor lies in [0, k) (a ValueError naming its file otherwise)."""
    state = model.state_dict()
    for key, (entry, k) in indices.items():
        _check_index_range(state[key], key, k, entry.file)


def load_pretrained(path, device="cpu", dtype=None):
    """Load a rocketkit checkpoint as an ordinary transformers model (FactorizedLinear where compressed).

    A thin alias of ``AutoModelForCausalLM.from_pretrained(path, dtype=...)`` through rocketkit's
    quantizer (rocketkit.integrations.transformers), after the checks that need no model, so that a
    bad config.json is reported as a ValueError naming the file rather than transformers' own error.
    ``dtype`` (torch dtype or name; default: the checkpoint's) is the dtype of every floating
    tensor; ``device`` where the model goes. Needs no remote code and reads no pickle. A missing,
    truncated or corrupted file, an inconsistent index, a mismatched shape or dtype, an index outside
    [0, k), or a missing or unexpected tensor is a ValueError naming the file. The returned model is
    in eval mode, carries the saved generation_config.json, and works with ``generate()`` and
    training alike."""
    from transformers import AutoModelForCausalLM

    import rocketkit.integrations.transformers  # noqa: F401  (registers the quantizer, if not done yet)

    path = Path(path)
    _, _, table = validate_checkpoint(path)
    _generation_config(path)
    if dtype is None:
        floats = [e.dtype for e in table.values() if e.dtype.is_floating_point]
        dtype = floats[0] if floats else torch.float32
    dtype = _float_dtype(dtype, "load_pretrained")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, trust_remote_code=False)
    return model.to(device).eval()


def _generation_config(path: Path):
    """The checkpoint's generation_config.json (as saved with the model), validated; None when absent."""
    from transformers import GenerationConfig

    from rocketkit.fileio import read_json

    f = path / "generation_config.json"
    if not f.is_file():
        return None
    doc = read_json(f)  # a ValueError naming the file when truncated or not JSON
    try:
        return GenerationConfig.from_dict(doc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: not a valid generation config ({e})") from None


# ---- dense export --------------------------------------------------------------------------

def export_dense(src, out_dir, dtype=None, overwrite: bool = False, max_shard_bytes: int = 2 << 30,
                 progress: bool = True) -> dict:
    """Write ``out_dir``, a plain HF checkpoint of the compressed model at ``src``: every factorized
    layer ``P`` becomes an ordinary ``P.weight`` (d2×d1) = (U·C)ᵀ, merged in fp32 (fp64 for fp64
    factors) and stored in the factors' dtype (or ``dtype``); every other tensor is copied as is
    (cast to ``dtype`` if given). config.json loses its ``rocketkit`` section; tokenizer and
    generation config files are copied. Streams one tensor at a time (the model is never built);
    shards of at most ``max_shard_bytes`` with a ``model.safetensors.index.json`` when more than
    one. The folder appears atomically. Returns a summary (files, tensors, bytes)."""
    from tqdm.auto import tqdm

    from rocketkit.fileio import atomic_directory, atomic_save_safetensors, atomic_write_json

    from rocketkit.arch.moe import tensor_layout

    src, out_dir = Path(src), Path(out_dir)
    cfg, section, records = read_config(src)
    table = read_tensor_table(src)
    # Converted MoE experts (arch.moe) go back to the family's 3-D tensors: family name -> members.
    stacked = {family: layout for rec in experts_section(section, src / "config.json")
               for family, layout in tensor_layout(rec).items()}
    stacked_in = {member: family for family, (members, _, _) in stacked.items() for member in members}
    out_dtype = None if dtype is None else _float_dtype(dtype, "export_dense")
    if max_shard_bytes < 1:
        raise ValueError(f"export_dense: max_shard_bytes must be >= 1, got {max_shard_bytes}")
    by_layer = {r.name: r for r in records}
    for rec in records:
        _check_factor_tensors(table, rec, src / "config.json")
    factor_owner = {f"{r.name}.{s}": r.name for r in records for s in _FACTOR_SUFFIXES}

    # Plan: output tensors in the source's order (one entry per factorized layer, at its U).
    plan: list[tuple[str, int]] = []  # (output name, bytes)
    planned: set[str] = set()
    for name, e in table.items():
        owner = factor_owner.get(name)
        if owner is not None:
            if not name.endswith(".U"):
                continue
            rec = by_layer[owner]
            out_name, nbytes = f"{owner}.weight", rec.d1 * rec.d2 * (out_dtype or e.dtype).itemsize
        else:
            item = (out_dtype or e.dtype).itemsize if e.dtype.is_floating_point else e.dtype.itemsize
            out_name, nbytes = name, e.numel * item
        family = stacked_in.get(out_name)
        if family is not None:
            if family not in planned:
                planned.add(family)
                plan.append((family, nbytes * len(stacked[family][0])))
            continue
        plan.append((out_name, nbytes))
    unplanned = sorted(f for f in stacked if f not in planned)
    if unplanned:
        raise ValueError(f"{src}: no tensors of the experts' {unplanned[:4]}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in plan:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def dense_tensor(name: str) -> torch.Tensor:
        if name in stacked:
            members, _, transposed = stacked[name]
            missing = [m for m in members if m not in table and m[: -len(".weight")] not in by_layer]
            if missing:
                raise ValueError(f"{src}: tensors missing from the checkpoint: {missing[:8]}")
            parts = [layer_tensor(m) for m in members]
            return torch.stack([p.T if transposed else p for p in parts]).contiguous()
        return layer_tensor(name)

    def layer_tensor(name: str) -> torch.Tensor:
        owner = name[: -len(".weight")] if name.endswith(".weight") else None
        if owner in by_layer:
            rec = by_layer[owner]
            keys = [f"{owner}.{s}" for s in _FACTOR_SUFFIXES]
            t: dict[str, torch.Tensor] = {}
            for key in keys:
                t.update(_read_tensors(table[key].file, [key]))
            _check_index_range(t[keys[2]], keys[2], rec.k, table[keys[2]].file)
            U, values, idx = t[keys[0]], t[keys[1]], t[keys[2]]
            cdt = torch.float64 if U.dtype == torch.float64 else torch.float32
            C = torch.zeros(rec.k, rec.d2, dtype=cdt).scatter_add_(0, idx.long(), values.to(cdt))
            return (U.to(cdt) @ C).T.to(out_dtype or U.dtype).contiguous()
        t = _read_tensors(table[name].file, [name])[name]
        return t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t

    out_cfg = {k: v for k, v in cfg.items() if k not in ("rocketkit", "quantization_config", "transformers_weights")}
    if out_dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in out_cfg:
                out_cfg[key] = dtype_name(out_dtype)
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "config.json", out_cfg)
        for p in sorted(src.iterdir()):
            if p.is_file() and _COPIED_FILES.match(p.name):
                shutil.copyfile(p, tmp / p.name)
        bar = tqdm(total=len(plan), desc="export-dense", unit="tensor", disable=not progress)
        for fname, members in zip(names, shards):
            tensors = {}
            for name in members:
                tensors[name] = dense_tensor(name)
                total += tensors[name].numel() * tensors[name].element_size()
                weight_map[name] = fname
                bar.update(1)
            atomic_save_safetensors(tmp / fname, tensors, metadata={"format": "pt"})
            del tensors
        bar.close()
        if n > 1:
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return {"path": str(out_dir), "files": names, "tensors": len(plan), "tensor_bytes": total,
            "merged_layers": len(records),
            "bytes_on_disk": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())}
