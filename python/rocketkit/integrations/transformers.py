"""transformers' quantizer API for rocketkit checkpoints: ``from_pretrained`` builds FactorizedLinear.

``import rocketkit`` registers the ``"rocketkit"`` quant_method (config.json's ``quantization_config``,
docs/format.md). ``AutoModelForCausalLM.from_pretrained(ckpt, dtype=..., device_map=...)`` then builds
the base architecture on transformers' meta device, swaps each recorded linear for an empty
FactorizedLinear and lets transformers fill U, C_values, C_indices (and bias) straight from the
safetensors: no dense weight is formed, no remote code runs, nothing is unpickled. The checks of
``rocketkit.checkpoint`` run first (headers, shapes, dtypes, missing or unexpected tensors) and the
indices are range-checked once loaded, each failure a ValueError naming the file and the tensor.
``model.save_pretrained(out)`` writes a checkpoint that loads again the same way. A format_version 1
checkpoint (no quantization_config) never reaches the quantizer: ``install_format_1_refusal`` makes
``from_pretrained`` refuse it with the fix instead of filling its factorized layers at random.
"""

from __future__ import annotations

import functools
import json
import os
import types
from pathlib import Path

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rocketkit.checkpoint import CHECKPOINT_FORMAT_VERSION, IMPORT_GUARD, QUANT_METHOD


class RocketkitConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a rocketkit checkpoint; the layer records stay in its
    ``rocketkit`` section (read by rocketkit.checkpoint, and by the C++ reader)."""

    def __init__(self, format_version: int = CHECKPOINT_FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        if format_version != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(f"[RocketkitConfig] rocketkit format_version {format_version!r}, this rocketkit reads "
                             f"{CHECKPOINT_FORMAT_VERSION}; a version 1 checkpoint converts in place with "
                             f"`rocketkit upgrade CKPT`")

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version}


class RocketkitHfQuantizer(HfQuantizer):
    """Loads rocketkit checkpoints (it cannot compress: that is ``rocketkit compress``)."""

    requires_calibration = True

    def update_attn_implementation(self, config):
        # Runs before transformers resolves the weight files: drop the guard that stops a process
        # without rocketkit (checkpoint.IMPORT_GUARD).
        if getattr(config, "transformers_weights", None) == IMPORT_GUARD:
            delattr(config, "transformers_weights")
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from rocketkit.checkpoint import install_factorized_layers

        if not checkpoint_files:
            raise ValueError("[RocketkitHfQuantizer] a rocketkit checkpoint loads from its safetensors files only "
                             "(no state_dict=, no gguf_file=)")
        from rocketkit.arch.moe import LinearExperts

        self._indices = install_factorized_layers(Path(checkpoint_files[0]).parent, model)
        self._experts_converted = any(isinstance(m, LinearExperts) for m in model.modules())
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # A checkpoint with per-expert linears (arch.moe) holds the model's own state-dict names, which
        # some families' conversions (e.g. "mlp.experts.*.down_proj.weight" -> 3-D "mlp.experts.down_proj")
        # would merge back into the 3-D tensors; none applies, and save_pretrained then reverts none.
        if getattr(self, "_experts_converted", False):
            return []
        return super().update_weight_conversions(weight_conversions, model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from rocketkit.checkpoint import check_loaded_indices

        check_loaded_indices(model, self._indices)
        # save_pretrained drops config.transformers_weights by design; put the guard back into what it wrote.
        model.save_pretrained = types.MethodType(_save_pretrained_guarded, model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True


def _save_pretrained_guarded(model, save_directory, *args, **kwargs):
    from rocketkit.fileio import atomic_write_json, read_json

    out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    cfg_path = Path(save_directory) / "config.json"
    if kwargs.get("is_main_process", True) and cfg_path.is_file():
        cfg = read_json(cfg_path)
        cfg["transformers_weights"] = IMPORT_GUARD
        atomic_write_json(cfg_path, cfg)
    return out


def _format_1_config(pretrained_model_name_or_path, config, subfolder) -> tuple[Path, Path] | None:
    """(config.json, folder) when this load is of a rocketkit format_version 1 checkpoint, else None.
    Looks only at what the load already names: a config object (AutoModel* passes the one it read,
    so a Hub checkpoint is caught too), else the config.json of a local folder. Anything unreadable
    is left for transformers to report."""
    from transformers import PreTrainedConfig

    folder = None
    if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
    if isinstance(config, PreTrainedConfig):
        section = getattr(config, "rocketkit", None)
        where = folder if folder is not None else Path(getattr(config, "_name_or_path", "") or "CKPT")
        cfg_path = where / "config.json"
    else:
        if isinstance(config, (str, os.PathLike)):
            cfg_path = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
        elif folder is not None and folder.is_dir():
            cfg_path = folder / "config.json"
        else:
            return None
        # A rocketkit config.json carries the section name in its text; skip parsing every other model's.
        try:
            text = cfg_path.read_bytes()
            section = json.loads(text).get("rocketkit") if b'"rocketkit"' in text else None
        except (OSError, ValueError, AttributeError):
            return None
        where = cfg_path.parent
    if isinstance(section, dict) and section.get("format_version") == 1:
        return cfg_path, where
    return None


def _refuse_format_1(from_pretrained):
    """``PreTrainedModel.from_pretrained`` that first refuses a rocketkit format_version 1 checkpoint.
    Version 1 has no quantization_config, so transformers would never call rocketkit's quantizer and
    would fill the factorized layers at random; every other load goes through untouched."""

    @functools.wraps(from_pretrained)
    def wrapped(cls, pretrained_model_name_or_path, *args, **kwargs):
        found = _format_1_config(pretrained_model_name_or_path, kwargs.get("config"), kwargs.get("subfolder"))
        if found is not None:
            from rocketkit.checkpoint import format_1_message

            raise ValueError(format_1_message(*found))
        return from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)

    wrapped._rocketkit_refuses_format_1 = True
    return wrapped


def install_format_1_refusal() -> None:
    """Wrap ``PreTrainedModel.from_pretrained`` (idempotent). Runs once transformers.modeling_utils has
    finished executing (rocketkit/__init__), not when the quantizer registers: modeling_utils imports the
    quantizer registry before it defines PreTrainedModel."""
    from transformers.modeling_utils import PreTrainedModel

    current = PreTrainedModel.__dict__["from_pretrained"]
    if not getattr(current.__func__, "_rocketkit_refuses_format_1", False):
        PreTrainedModel.from_pretrained = classmethod(_refuse_format_1(current.__func__))


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RocketkitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RocketkitHfQuantizer)


register()  # importing this module is registering (rocketkit/__init__ imports it when transformers loads its registry)
