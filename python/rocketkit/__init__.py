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


def cmake_dir() -> str:
    """The folder holding rocketkitConfig.cmake, to pass as ``rocketkit_DIR`` to CMake.

    The wheel installs the C++ package (``librocketkit_infer``, ``<rocketkit/infer.h>`` and the
    imported target ``rocketkit::infer``) inside the rocketkit package folder. Raises
    FileNotFoundError where this rocketkit was not installed with it (e.g. a source checkout).
    """
    import os

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "cmake", "rocketkit")
    if not os.path.isfile(os.path.join(folder, "rocketkitConfig.cmake")):
        raise FileNotFoundError(f"{folder} has no rocketkitConfig.cmake: this rocketkit was not installed "
                                "with its C++ package (install it with `pip install .`)")
    return folder



def _register_transformers_quantizer() -> None:
    # The module registers itself as its last statement. Not `from ... import register`: this runs
    # while that module may itself be importing transformers' registry (partially initialized).
    import rocketkit.integrations.transformers  # noqa: F401


# from_pretrained finds rocketkit checkpoints through transformers' quantizer registry: it is filled
# as soon as transformers loads that registry (before any from_pretrained can run), or now if it
# already has, so `import rocketkit` itself does not import transformers (about 3 s of CPU).
from rocketkit.integrations import call_after_import  # noqa: E402

call_after_import("transformers.quantizers.auto", _register_transformers_quantizer)


def _refuse_format_1_checkpoints() -> None:
    from rocketkit.integrations.transformers import install_format_1_refusal

    install_format_1_refusal()


# A format_version 1 checkpoint has no quantization_config, so the quantizer never sees it: from_pretrained
# itself refuses it (with the fix) once transformers has defined it.
call_after_import("transformers.modeling_utils", _refuse_format_1_checkpoints)

# Pipeline entry points are imported on first use so `import rocketkit` stays light (transformers aside).
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
    "cmake_dir",
    "factorize",
    "has_cuda",
    "solve_mckp",
    "whitened_errors",
]
