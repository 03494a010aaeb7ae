"""All glue between Python (NumPy / torch) and the native core ``rocketkit._C``.

Arrays are validated and made contiguous here; the core checks again and raises
``ValueError`` with a ``[function]`` prefix on anything it cannot accept.
"""

from __future__ import annotations

import json
import math
import operator
from typing import NamedTuple

import numpy as np
import scipy_openblas32  # noqa: F401  (loads the BLAS that _C links against)

from rocketkit import _C

_INT64_MAX = 2**63 - 1


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


def _asarray(fn: str, name: str, a, dtype=None) -> np.ndarray:
    """np.asarray, with NumPy's complaint about ragged or odd inputs turned into a [fn] ValueError."""
    try:
        return np.asarray(a, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"[{fn}] {name} is not a rectangular numeric array: {e}") from None


def _as_f64_matrix(name: str, fn: str, a) -> np.ndarray:
    a = _asarray(fn, name, a)
    if a.ndim != 2:
        raise ValueError(f"[{fn}] {name} must be 2-D, got shape {a.shape}")
    if a.dtype != np.float64:
        raise ValueError(f"[{fn}] {name} must be float64, got {a.dtype}")
    return np.ascontiguousarray(a)


def _check_layer(fn: str, W, S):
    W = _as_f64_matrix("W", fn, W)
    S = _as_f64_matrix("S", fn, S)
    if W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"[{fn}] W must be non-empty, got shape {W.shape}")
    if S.shape != (W.shape[0], W.shape[0]):
        raise ValueError(f"[{fn}] S must be ({W.shape[0]}, {W.shape[0]}) for W of shape {W.shape}, got {S.shape}")
    return W, S


def _index_arg(fn: str, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"[{fn}] {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"[{fn}] {name} must be an integer, got {type(value).__name__}") from None


def whitened_errors(W, S, candidates, num_threads: int = 0):
    """Relative weight- and output-space errors of every candidate (k, s) of one layer.

    W is (d1, d2) float64 with y = x·W, S the (d1, d1) upper Cholesky factor of H = XᵀX
    (lower triangle ignored), candidates an (n, 2) integer array of (rank k, nonzeros per
    column s) with 1 ≤ s ≤ k ≤ min(d1, d2). Returns ``(e_weight, e_output)``, two float64
    arrays of length n, for exactly the factorization :func:`factorize` applies; a zero W
    gives zeros.
    """
    W, S = _check_layer("whitened_errors", W, S)
    cand = _asarray("whitened_errors", "candidates", candidates)
    if cand.ndim != 2 or cand.shape[1] != 2 or not np.issubdtype(cand.dtype, np.integer):
        raise ValueError(f"[whitened_errors] candidates must be an (n, 2) integer array, got {cand.dtype} {cand.shape}")
    if cand.dtype.kind == "u" and cand.size and cand.max() > _INT64_MAX:
        raise ValueError("[whitened_errors] candidates exceed int64")
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    num_threads = _index_arg("whitened_errors", "num_threads", num_threads)
    if not 0 <= num_threads <= 1 << 16:
        raise ValueError(f"[whitened_errors] num_threads must be in [0, 65536], got {num_threads}")
    return _C.whitened_errors(W, S, cand, num_threads)


def factorize(W, S, k: int, s: int) -> Factors:
    """The factorization rocketkit applies for candidate (k, s): same basis and mask as profiling.

    ``U`` is (d1, k); C has ``values`` (s, d2) at rows ``indices`` (s, d2, int32, ascending
    per column); ``ridge`` is the ε added to C·Cᵀ relative to mean(diag C·Cᵀ) (0 unless it was
    singular). U and C are balanced by a power of two (max|U| ≈ max|C|), which suits fp16 storage.
    """
    W, S = _check_layer("factorize", W, S)
    k = _index_arg("factorize", "k", k)
    s = _index_arg("factorize", "s", s)
    r = min(W.shape)
    if not 1 <= k <= r:
        raise ValueError(f"[factorize] rank k = {k} must be in [1, min(d1, d2) = {r}]")
    if not 1 <= s <= k:
        raise ValueError(f"[factorize] s = {s} must be in [1, k = {k}]")
    return Factors(*_C.factorize(W, S, k, s))


def _mckp_int(name: str, value, lo: int) -> int:
    """An int64 argument of solve_mckp; integral floats are accepted for the budget."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"[solve_mckp] {name} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"[solve_mckp] {name} must be finite, got {value!r}")
        if name != "budget" and value != math.floor(value):
            raise ValueError(f"[solve_mckp] {name} must be an integer, got {value!r}")
        # Σ params ≤ budget with integer params is Σ params ≤ floor(budget).
        value = math.floor(value)
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"[solve_mckp] {name} must be an integer, got {type(value).__name__}") from None
    if not lo <= value <= _INT64_MAX:
        raise ValueError(f"[solve_mckp] {name} must be in [{lo}, {_INT64_MAX}], got {value}")
    return value


def solve_mckp(errors, params, budget: int, buckets: int = 50000, num_threads: int = 0) -> MckpSolution:
    """Pick one candidate per layer minimising Σ error subject to Σ params ≤ budget.

    ``errors`` and ``params`` are sequences with one 1-D array per layer (errors finite and
    ≥ 0, params integers ≥ 0). The slack ``budget − min_params`` is cut into ``buckets``
    and costs are rounded up, so ``params`` of the answer never exceeds ``budget``.
    ``choice[l]`` indexes layer l's candidates; ``curve[b]`` is the best error within
    ``min_params + b·bucket_width`` params; ``lower_bound`` is the LP relaxation optimum.
    """
    if len(errors) != len(params):
        raise ValueError(f"[solve_mckp] errors has {len(errors)} layers but params has {len(params)}")
    if len(errors) == 0:
        raise ValueError("[solve_mckp] no layers")
    budget = _mckp_int("budget", budget, 0)
    buckets = _mckp_int("buckets", buckets, 1)
    num_threads = _mckp_int("num_threads", num_threads, 0)
    flat_e, flat_p, sizes = [], [], []
    for l, (e, p) in enumerate(zip(errors, params)):
        e, p = _asarray("solve_mckp", f"errors[{l}]", e), _asarray("solve_mckp", f"params[{l}]", p)
        if e.ndim != 1 or p.ndim != 1 or e.shape != p.shape:
            raise ValueError(f"[solve_mckp] layer {l}: errors {e.shape} and params {p.shape} must be equal-length 1-D arrays")
        if e.size == 0:
            raise ValueError(f"[solve_mckp] layer {l} has no candidates")
        if e.dtype.kind not in "biuf":
            raise ValueError(f"[solve_mckp] layer {l}: errors must be real numbers, got {e.dtype}")
        if p.dtype.kind not in "iu":
            raise ValueError(f"[solve_mckp] layer {l}: params must be integers, got {p.dtype}")
        if p.dtype.kind == "u" and p.max() > _INT64_MAX:
            raise ValueError(f"[solve_mckp] layer {l}: params exceed int64")
        flat_e.append(e.astype(np.float64, copy=False))
        flat_p.append(p.astype(np.int64, copy=False))
        sizes.append(e.size)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat_e = np.ascontiguousarray(np.concatenate(flat_e))
    flat_p = np.ascontiguousarray(np.concatenate(flat_p))
    r = _C.solve_mckp(flat_e, flat_p, offsets, budget, buckets, num_threads)
    return MckpSolution(**r)


def _infer_array(fn: str, name: str, a, dtype) -> np.ndarray:
    """A C-contiguous NumPy array of ``dtype`` from a NumPy array or a CPU torch tensor."""
    if hasattr(a, "detach") and hasattr(a, "device"):  # torch.Tensor, without importing torch here
        if a.device.type != "cpu":
            raise ValueError(f"[{fn}] {name} must be on the CPU, got {a.device}")
        a = a.detach()
        if a.is_floating_point() and a.dtype.itemsize < 4:  # bf16/f16 have no exact NumPy twin here
            a = a.float()
        a = a.numpy()
    a = _asarray(fn, name, a)
    if np.dtype(dtype).kind == "f":
        if a.dtype.kind != "f":
            raise ValueError(f"[{fn}] {name} must be floating point, got {a.dtype}")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"[{fn}] {name} must be integers, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def factorized_matmul(x, U, values, indices, bias=None, num_threads: int = 0):
    """y = x·U·C + bias for a factorized layer, on the CPU, with the GIL released.

    ``x`` is (..., d1) float32 or float64 (NumPy or a CPU torch tensor); the product is
    computed in x's dtype (U, values and bias are converted to it). ``U`` is (d1, k);
    C (k, d2) has ``values[:, j]`` (s, d2) at rows ``indices[:, j]`` (int16 or int32, in
    [0, k)). Returns (..., d2) of the same kind (NumPy or torch) and dtype as ``x``.
    """
    fn = "factorized_matmul"
    as_torch = hasattr(x, "detach") and hasattr(x, "device")
    xa = x
    if as_torch:
        if x.device.type != "cpu":
            raise ValueError(f"[{fn}] x must be on the CPU, got {x.device}")
        xa = x.detach().numpy()
    xa = _asarray(fn, "x", xa)
    if xa.dtype not in (np.float32, np.float64):
        raise ValueError(f"[{fn}] x must be float32 or float64, got {xa.dtype}")
    if xa.ndim < 1:
        raise ValueError(f"[{fn}] x must have at least one dimension, got shape {xa.shape}")
    dt = xa.dtype
    U = _infer_array(fn, "U", U, dt)
    values = _infer_array(fn, "values", values, dt)
    idx = indices
    if hasattr(idx, "detach") and hasattr(idx, "device"):
        idx = idx.detach().cpu().numpy()
    idx = _asarray(fn, "indices", idx)
    if idx.dtype not in (np.int16, np.int32):
        raise ValueError(f"[{fn}] indices must be int16 or int32, got {idx.dtype}")
    idx = np.ascontiguousarray(idx)
    if U.ndim != 2 or values.ndim != 2 or idx.ndim != 2:
        raise ValueError(f"[{fn}] U, values and indices must be 2-D, got {U.shape}, {values.shape}, {idx.shape}")
    d1, k = U.shape
    s, d2 = values.shape
    if min(d1, k, s, d2) < 1:
        raise ValueError(f"[{fn}] U {U.shape} and values {values.shape} must be non-empty")
    if xa.shape[-1] != d1:
        raise ValueError(f"[{fn}] x has {xa.shape[-1]} features but U has {d1} rows")
    if idx.shape != (s, d2):
        raise ValueError(f"[{fn}] indices {idx.shape} must match values {(s, d2)}")
    if not 1 <= s <= k:
        raise ValueError(f"[{fn}] need 1 <= s <= k, got s={s}, k={k}")
    b = None
    if bias is not None:
        b = _infer_array(fn, "bias", bias, dt)
        if b.shape != (d2,):
            raise ValueError(f"[{fn}] bias must have shape ({d2},), got {b.shape}")
    num_threads = _index_arg(fn, "num_threads", num_threads)
    if num_threads < 0:
        raise ValueError(f"[{fn}] num_threads must be >= 0, got {num_threads}")
    lead = xa.shape[:-1]
    x2 = np.ascontiguousarray(xa.reshape(math.prod(lead), d1))
    y = _C.factorized_matmul(x2, U, values, idx, b, num_threads).reshape(*lead, d2)
    if as_torch:
        import torch

        return torch.from_numpy(y)
    return y
