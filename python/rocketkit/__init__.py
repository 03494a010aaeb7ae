"""rocketkit: training-free LLM compression with ROCKET."""

from rocketkit._native import (
    Factors,
    MckpSolution,
    build_info,
    factorize,
    has_cuda,
    solve_mckp,
    whitened_errors,
)

__version__ = build_info()["version"]

# from_pretrained finds rocketkit checkpoints only through transformers' quantizer registry, which must
# be filled before the user's first from_pretrained call: so this is the one eager transformers import.
try:
    import transformers as _transformers  # noqa: F401
except ImportError:  # the native core alone works without transformers
    pass
else:
    from rocketkit.integrations import transformers as _integration  # noqa: F401

# Pipeline entry points are imported on first use so `import rocketkit` stays light (no transformers).
_LAZY = {
    "load_pretrained": "rocketkit.checkpoint",
    "save_compressed": "rocketkit.checkpoint",
    "compress": "rocketkit.pipeline",
    "FactorizedLinear": "rocketkit.modules",
    "Profile": "rocketkit.profile",
    "profile_model": "rocketkit.profile",
    "candidate_grid": "rocketkit.profile",
    "Allocation": "rocketkit.allocate",
    "allocate": "rocketkit.allocate",
    "apply_allocation": "rocketkit.apply",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rocketkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    *_LAZY,
    "Factors",
    "MckpSolution",
    "build_info",
    "factorize",
    "has_cuda",
    "solve_mckp",
    "whitened_errors",
]
