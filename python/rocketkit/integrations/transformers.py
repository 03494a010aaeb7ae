"""transformers' quantizer API for rocketkit checkpoints: ``from_pretrained`` builds FactorizedLinear.

``import rocketkit`` registers the ``"rocketkit"`` quant_method (config.json's ``quantization_config``,
docs/format.md). ``AutoModelForCausalLM.from_pretrained(ckpt, dtype=..., device_map=...)`` then builds
the base architecture on transformers' meta device, swaps each recorded linear for an empty
FactorizedLinear and lets transformers fill U, C_values, C_indices (and bias) straight from the
safetensors: no dense weight is formed, no remote code runs, nothing is unpickled. The checks of
``rocketkit.checkpoint`` run first (headers, shapes, dtypes, missing or unexpected tensors) and the
indices are range-checked once loaded, each failure a ValueError naming the file and the tensor.
``model.save_pretrained(out)`` writes a checkpoint that loads again the same way.
"""

from __future__ import annotations

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


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RocketkitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RocketkitHfQuantizer)


register()  # importing this module is registering (rocketkit/__init__ imports it when transformers loads its registry)
