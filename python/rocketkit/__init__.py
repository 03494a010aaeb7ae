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

__all__ = [
    "Factors",
    "MckpSolution",
    "build_info",
    "factorize",
    "has_cuda",
    "solve_mckp",
    "whitened_errors",
]
