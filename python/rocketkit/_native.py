"""All glue between Python (NumPy / torch) and the native core ``rocketkit._C``.

Arrays are validated and made contiguous here; the core checks again and raises
``ValueError`` with a ``[function]`` prefix on anything it cannot accept.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import scipy_openblas32  # noqa: F401  (loads the BLAS that _C links against)

from rocketkit import _C


def build_info() -> dict:
    """What the native core was built with, and what it sees at run time."""
    info = json.loads(_C.build_info_json())
    info["cuda_devices"] = [_C.cuda_device_name(i) for i in range(_C.cuda_device_count())]
    return info


def has_cuda() -> bool:
    """True when the CUDA backend was built and a GPU is visible."""
    return bool(_C.has_cuda())


class Factors(NamedTuple):
    """Ŵ = U·C with C stored by columns: column j has ``values[:, j]`` at rows ``indices[:, j]``."""

    U: np.ndarray  # d1×k
    values: np.ndarray  # s×d2
    indices: np.ndarray  # s×d2, int32
    ridge: float


class MckpSolution(NamedTuple):
    choice: np.ndarray
    error: float
    params: int
    lower_bound: float
    curve: np.ndarray
    min_params: int
    bucket_width: float
    kept_candidates: int


def _as_f64_matrix(name: str, fn: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"[{fn}] {name} must be 2-D, got shape {a.shape}")
    if a.dtype != np.float64:
        raise ValueError(f"[{fn}] {name} must be float64, got {a.dtype}")
    return np.ascontiguousarray(a)


def whitened_errors(W, S, candidates, num_threads: int = 0):
    """Relative weight- and output-space errors of every candidate (k, s) of one layer.

    W is (d1, d2) float64 with y = x·W, S the (d1, d1) upper Cholesky factor of H = XᵀX,
    candidates an (n, 2) integer array of (rank k, nonzeros per column s).
    Returns ``(e_weight, e_output)``, two float64 arrays of length n.
    """
    W = _as_f64_matrix("W", "whitened_errors", W)
    S = _as_f64_matrix("S", "whitened_errors", S)
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[1] != 2 or not np.issubdtype(cand.dtype, np.integer):
        raise ValueError(f"[whitened_errors] candidates must be an (n, 2) integer array, got {cand.dtype} {cand.shape}")
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    return _C.whitened_errors(W, S, cand, num_threads)


def factorize(W, S, k: int, s: int) -> Factors:
    """The factorization rocketkit applies for candidate (k, s): same basis and mask as profiling."""
    W = _as_f64_matrix("W", "factorize", W)
    S = _as_f64_matrix("S", "factorize", S)
    return Factors(*_C.factorize(W, S, int(k), int(s)))


def solve_mckp(errors, params, budget: int, buckets: int = 50000, num_threads: int = 0) -> MckpSolution:
    """Pick one candidate per layer minimising Σ error subject to Σ params ≤ budget.

    ``errors`` and ``params`` are sequences with one 1-D array per layer.
    """
    if len(errors) != len(params):
        raise ValueError(f"[solve_mckp] errors has {len(errors)} layers but params has {len(params)}")
    if len(errors) == 0:
        raise ValueError("[solve_mckp] no layers")
    sizes = []
    for l, (e, p) in enumerate(zip(errors, params)):
        e, p = np.asarray(e), np.asarray(p)
        if e.ndim != 1 or p.ndim != 1 or e.shape != p.shape:
            raise ValueError(f"[solve_mckp] layer {l}: errors {e.shape} and params {p.shape} must be equal-length 1-D arrays")
        if p.size and not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"[solve_mckp] layer {l}: params must be integers, got {p.dtype}")
        sizes.append(e.size)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat_e = np.ascontiguousarray(np.concatenate([np.asarray(e, dtype=np.float64) for e in errors]))
    flat_p = np.ascontiguousarray(np.concatenate([np.asarray(p).astype(np.int64) for p in params]))
    r = _C.solve_mckp(flat_e, flat_p, offsets, int(budget), int(buckets), num_threads)
    return MckpSolution(**r)
