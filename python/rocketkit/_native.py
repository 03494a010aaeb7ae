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

    With W and S torch CUDA tensors (float64, on one GPU) the errors are computed there, on
    the current stream, and returned as two CUDA tensors (see :func:`whitened_errors_cuda`).
    """
    if _is_cuda_tensor(W) or _is_cuda_tensor(S):
        return whitened_errors_cuda(W, S, candidates, num_threads=num_threads)
    W, S = _check_layer("whitened_errors", W, S)
    cand = _check_candidates(candidates)
    return _C.whitened_errors(W, S, cand, _check_threads(num_threads))


def _check_candidates(candidates) -> np.ndarray:
    cand = _asarray("whitened_errors", "candidates", candidates)
    if cand.ndim != 2 or cand.shape[1] != 2 or not np.issubdtype(cand.dtype, np.integer):
        raise ValueError(f"[whitened_errors] candidates must be an (n, 2) integer array, got {cand.dtype} {cand.shape}")
    if cand.dtype.kind == "u" and cand.size and cand.max() > _INT64_MAX:
        raise ValueError("[whitened_errors] candidates exceed int64")
    return np.ascontiguousarray(cand, dtype=np.int64)


def _check_threads(num_threads) -> int:
    num_threads = _index_arg("whitened_errors", "num_threads", num_threads)
    if not 0 <= num_threads <= 1 << 16:
        raise ValueError(f"[whitened_errors] num_threads must be in [0, 65536], got {num_threads}")
    return num_threads


def whitened_errors_layers(Ws, Ss, candidates, num_threads: int = 0):
    """:func:`whitened_errors` of several layers on one pool of ``num_threads`` threads.

    ``Ws``, ``Ss`` and ``candidates`` hold one (d1, d2) weight, one (d1, d1) S and one (n, 2)
    candidate array per layer (layers of one input Gram may pass the same S). Returns a list of
    ``(e_weight, e_output)`` pairs. The layers' bases run side by side (single-threaded BLAS each)
    and the pool then takes every layer's candidates, longest first, so both cores stay busy;
    errors equal per-layer calls to rounding (~1e-13) and do not depend on ``num_threads``.
    CPU only; memory peaks near all layers' bases at once (each is freed after its candidates).
    """
    Ws, Ss, candidates = list(Ws), list(Ss), list(candidates)
    if not len(Ws) == len(Ss) == len(candidates):
        raise ValueError(f"[whitened_errors] got {len(Ws)} weights, {len(Ss)} S and {len(candidates)} "
                         "candidate arrays: need one of each per layer")
    pairs = [_check_layer("whitened_errors", W, S) for W, S in zip(Ws, Ss)]
    cands = [_check_candidates(c) for c in candidates]
    out = _C.whitened_errors_layers([W for W, _ in pairs], [S for _, S in pairs], cands,
                                    _check_threads(num_threads))
    return [tuple(p) for p in out]


def _gram_buffer(fn: str, H) -> np.ndarray:
    if not (isinstance(H, np.ndarray) and H.dtype == np.float64 and H.ndim == 2 and H.shape[0] == H.shape[1]
            and H.shape[0] >= 1 and H.flags.c_contiguous and H.flags.writeable and H.flags.aligned):
        raise ValueError(f"[{fn}] H must be a writable, aligned, C-contiguous float64 (d, d) array, got "
                         f"{getattr(H, 'dtype', type(H).__name__)} {getattr(H, 'shape', '')}")
    return H


def gram_accumulate(H, X) -> None:
    """H's upper triangle += XᵀX in place (SYRK; the lower triangle is not touched).

    H is a (d, d) float64 C-contiguous NumPy array (a torch CPU tensor's ``.numpy()`` view works),
    X an (n, d) float64 array of n tokens. Use :func:`gram_symmetrize` once all batches are in."""
    H = _gram_buffer("gram_accumulate", H)
    X = _as_f64_matrix("X", "gram_accumulate", X)
    if X.shape[1] != H.shape[0]:
        raise ValueError(f"[gram_accumulate] X must be (n, {H.shape[0]}) for H of shape {H.shape}, got {X.shape}")
    _C.gram_accumulate(H, X)


def gram_symmetrize(H) -> None:
    """Copy H's upper triangle onto its lower one, in place."""
    _C.gram_symmetrize(_gram_buffer("gram_symmetrize", H))


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

    With every layer's errors and params given as torch CUDA tensors the DP runs on that GPU
    (same answer, see :func:`solve_mckp_cuda`).
    """
    if any(_is_cuda_tensor(a) for a in (*errors, *params)):
        return solve_mckp_cuda(errors, params, budget, buckets, num_threads=num_threads)
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
    computed in x's dtype (U, values and bias are converted to it; bf16/fp16 torch U and
    values of one dtype with fp32 x are read by the kernel as stored). ``U`` is (d1, k);
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
    # bf16/fp16 torch weights with fp32 x: the kernel reads them as stored (widening is exact).
    half = (dt == np.float32 and hasattr(U, "dtype") and hasattr(values, "dtype") and U.dtype == values.dtype
            and str(U.dtype) in ("torch.bfloat16", "torch.float16")
            and U.device.type == "cpu" and values.device.type == "cpu")
    half_name = str(U.dtype).replace("torch.", "") if half else None
    half_U, half_v = (_half_bits(U), _half_bits(values)) if half else (None, None)
    U = _infer_array(fn, "U", U, dt) if not half else half_U
    values = _infer_array(fn, "values", values, dt) if not half else half_v
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
    if half:
        y = _C.factorized_matmul_half(x2, U, values, idx, b, half_name, num_threads)
    else:
        y = _C.factorized_matmul(x2, U, values, idx, b, num_threads)
    y = y.reshape(*lead, d2)
    if as_torch:
        import torch

        return torch.from_numpy(y)
    return y


def _half_bits(t):
    """A bf16/fp16 CPU torch tensor's bits as an int16 NumPy array (NumPy has no bf16), or None."""
    import torch

    if t.dtype not in (torch.bfloat16, torch.float16):
        return None
    return t.detach().contiguous().view(torch.int16).numpy()


def _factorized_matmul_prevalidated(x2, U, values, indices, bias, num_threads: int):
    """FactorizedLinear's CPU forward: ``factorized_matmul`` without the Python checks.

    For callers that validated the indices once (FactorizedLinear re-checks them whenever
    ``C_indices`` or k changes): ``x2`` is an (N, d1) CPU torch tensor of fp32 or fp64, the
    factors CPU torch tensors, ``indices`` int16/int32 in [0, k). bf16/fp16 U and values (of
    one dtype, with fp32 x2) go to the kernel as stored; other factors are converted to x2's
    dtype. The core still checks every shape, dtype and size, and keeps its fused per-index check
    on: in benchmarks/bench_infer.py the checked kernel ran up to 1.8x faster than the unchecked
    one at batch 16 (same results). Returns a torch tensor (N, d2).
    """
    import torch

    dt = x2.dtype

    def arr(t, dtype=dt):
        # Only the conversions needed: every torch call costs about a microsecond.
        t = t.detach()
        if t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.numpy()

    b = None if bias is None else arr(bias)
    if dt == torch.float32 and U.dtype == values.dtype and U.dtype in (torch.bfloat16, torch.float16):
        y = _C.factorized_matmul_half(arr(x2), _half_bits(U), _half_bits(values), arr(indices), b,
                                      str(U.dtype).replace("torch.", ""), num_threads, True)
    else:
        y = _C.factorized_matmul(arr(x2), arr(U), arr(values), arr(indices), b, num_threads, True)
    return torch.from_numpy(y)


def _is_cuda_tensor(a) -> bool:
    return bool(getattr(a, "is_cuda", False)) and hasattr(a, "data_ptr")


_cuda_dirs_set = False


def _prepare_cuda(fn: str, device):
    """Checks that a CUDA build sees a GPU, and tells the core where the nvidia-* wheels keep
    cuBLAS/cuSOLVER (it dlopens them on first use; torch has usually loaded them already)."""
    global _cuda_dirs_set
    if not _C.cuda_compiled():
        raise RuntimeError(f"[{fn}] rocketkit was built without CUDA (ROCKETKIT_ENABLE_CUDA=OFF or no nvcc found)")
    if not _C.has_cuda():
        raise RuntimeError(f"[{fn}] no CUDA device is visible to rocketkit (driver missing or no GPU)")
    if not _cuda_dirs_set:
        import os

        import torch

        dirs = []
        try:
            import nvidia  # namespace package of the nvidia-* wheels

            roots = list(getattr(nvidia, "__path__", []))
        except ImportError:
            roots = []
        for root in roots:
            for sub in ("cu13/lib", "cu12/lib", "cublas/lib", "cusolver/lib", "cusparse/lib", "nvjitlink/lib"):
                if os.path.isdir(os.path.join(root, sub)):
                    dirs.append(os.path.join(root, sub))
        dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
        _C.cuda_set_library_dirs(dirs)
        _cuda_dirs_set = True


def _cuda_matrix(fn: str, name: str, a, dtype, device=None):
    import torch

    if not _is_cuda_tensor(a):
        raise ValueError(f"[{fn}] {name} must be a CUDA tensor like the other inputs, got {type(a).__name__}"
                         + (f" on {a.device}" if hasattr(a, "device") else ""))
    if device is not None and a.device != device:
        raise ValueError(f"[{fn}] {name} is on {a.device}, the other inputs on {device}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"[{fn}] {name} must be {dtype}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"[{fn}] {name} must be 2-D, got shape {tuple(a.shape)}")
    return a.detach().contiguous() if isinstance(a, torch.Tensor) else a


def whitened_errors_cuda(W, S, candidates, num_threads: int = 0, svd: str = "auto", max_streams: int = 0,
                         return_stats: bool = False):
    """:func:`whitened_errors` on the GPU that holds W and S (torch float64 CUDA tensors).

    fp64 throughout (no TF32, no reduced precision); the same mask, ridge and error definitions
    as the CPU core, to ~1e-12. ``candidates`` is an (n, 2) integer array on the host (a CUDA
    tensor is copied over). Returns ``(e_weight, e_output)`` as float64 CUDA tensors on W's
    device, written on the current stream; nothing is copied to the host. ``num_threads`` is
    accepted for symmetry and unused. ``svd`` picks the reduced SVD ("auto": cuSOLVER's
    polar-decomposition gesvdp, redone with the QR-iteration gesvd when gesvdp reports a
    perturbation; "gesvdp"; "gesvd"); ``max_streams`` caps the candidate pipelines (0 = auto).
    ``return_stats=True`` adds a dict (SVD used, pipelines, wall times, candidate flops).
    """
    import torch

    fn = "whitened_errors"
    W = _cuda_matrix(fn, "W", W, torch.float64)
    S = _cuda_matrix(fn, "S", S, torch.float64, W.device)
    d1, d2 = W.shape
    if d1 < 1 or d2 < 1:
        raise ValueError(f"[{fn}] W must be non-empty, got shape {tuple(W.shape)}")
    if tuple(S.shape) != (d1, d1):
        raise ValueError(f"[{fn}] S must be ({d1}, {d1}) for W of shape {tuple(W.shape)}, got {tuple(S.shape)}")
    if hasattr(candidates, "detach"):
        candidates = candidates.detach().cpu().numpy()
    cand = _asarray(fn, "candidates", candidates)
    if cand.ndim != 2 or cand.shape[1] != 2 or not np.issubdtype(cand.dtype, np.integer):
        raise ValueError(f"[{fn}] candidates must be an (n, 2) integer array, got {cand.dtype} {cand.shape}")
    if cand.dtype.kind == "u" and cand.size and cand.max() > _INT64_MAX:
        raise ValueError(f"[{fn}] candidates exceed int64")
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    num_threads = _index_arg(fn, "num_threads", num_threads)
    if not 0 <= num_threads <= 1 << 16:
        raise ValueError(f"[{fn}] num_threads must be in [0, 65536], got {num_threads}")
    _prepare_cuda(fn, W.device)
    n = cand.shape[0]
    e_w = torch.empty(n, dtype=torch.float64, device=W.device)
    e_o = torch.empty(n, dtype=torch.float64, device=W.device)
    with torch.cuda.device(W.device):
        stream = torch.cuda.current_stream(W.device).cuda_stream

        def run():
            return _C.whitened_errors_cuda(W.data_ptr(), S.data_ptr(), d1, d2, cand, e_w.data_ptr(),
                                           e_o.data_ptr(), stream, svd, max_streams)

        try:
            stats = run()
        except RuntimeError as e:
            if "out of GPU memory" not in str(e):
                raise
            # The core's workspace lives outside torch's caching allocator: hand back what torch
            # holds unused, then try once more (same computation, same result).
            torch.cuda.empty_cache()
            stats = run()
    return (e_w, e_o, stats) if return_stats else (e_w, e_o)


def solve_mckp_cuda(errors, params, budget: int, buckets: int = 50000, num_threads: int = 0,
                    return_gpu_ms: bool = False):
    """:func:`solve_mckp` with the DP on the GPU; errors[l] and params[l] are 1-D CUDA tensors.

    The same plan as the CPU (validation, pruning and the LP bound run on a host copy of the
    candidates), the same tie rule and the same fp64 sums: choice, curve and objective equal
    the CPU solver's. Back-pointers stay on the GPU; only the curve and the choice come back.
    ``return_gpu_ms=True`` also returns the DP kernels' GPU time in ms (CUDA events).
    """
    import torch

    fn = "solve_mckp"
    if len(errors) != len(params):
        raise ValueError(f"[{fn}] errors has {len(errors)} layers but params has {len(params)}")
    if len(errors) == 0:
        raise ValueError(f"[{fn}] no layers")
    budget = _mckp_int("budget", budget, 0)
    buckets = _mckp_int("buckets", buckets, 1)
    _mckp_int("num_threads", num_threads, 0)
    device = None
    flat_e, flat_p, sizes = [], [], []
    for l, (e, p) in enumerate(zip(errors, params)):
        for name, a in (("errors", e), ("params", p)):
            if not _is_cuda_tensor(a):
                raise ValueError(f"[{fn}] layer {l}: {name} must be a CUDA tensor like the other layers'")
            device = a.device if device is None else device
            if a.device != device:
                raise ValueError(f"[{fn}] layer {l}: {name} is on {a.device}, other layers on {device}")
        if e.ndim != 1 or p.ndim != 1 or e.shape != p.shape:
            raise ValueError(f"[{fn}] layer {l}: errors {tuple(e.shape)} and params {tuple(p.shape)} "
                             "must be equal-length 1-D tensors")
        if e.numel() == 0:
            raise ValueError(f"[{fn}] layer {l} has no candidates")
        if e.dtype.is_complex or e.dtype == torch.bool:
            raise ValueError(f"[{fn}] layer {l}: errors must be real numbers, got {e.dtype}")
        if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
            raise ValueError(f"[{fn}] layer {l}: params must be integers, got {p.dtype}")
        if p.dtype == getattr(torch, "uint64", None):
            raise ValueError(f"[{fn}] layer {l}: params must be a signed integer tensor (int64), got uint64")
        flat_e.append(e.detach().to(torch.float64).reshape(-1))
        flat_p.append(p.detach().to(torch.int64).reshape(-1))
        sizes.append(e.numel())
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    _prepare_cuda(fn, device)
    with torch.cuda.device(device):
        flat_e = torch.cat(flat_e).contiguous()
        flat_p = torch.cat(flat_p).contiguous()
        stream = torch.cuda.current_stream(device).cuda_stream
        r = _C.solve_mckp_cuda(flat_e.data_ptr(), flat_p.data_ptr(), offsets, budget, buckets, stream)
    gpu_ms = r.pop("dp_gpu_ms")
    sol = MckpSolution(**r)
    return (sol, gpu_ms) if return_gpu_ms else sol


_CUDA_DTYPES = None


def column_sparse_matmul_cuda(z, values, indices, bias=None, check_indices: bool = True):
    """y = z·C (+ bias) on the GPU, with C stored by columns as in :func:`factorized_matmul`.

    ``z`` is (n, k) float32/bfloat16/float16 CUDA; ``values`` (s, d2) of z's dtype, ``indices``
    (s, d2) int16 or int32 in [0, k), ``bias`` (d2,) of z's dtype or None; all on z's device.
    Returns y (n, d2) of z's dtype, written on the current stream (fp32 sums). With
    ``check_indices`` an index outside [0, k) raises ValueError (this reads one flag back, a
    synchronization); without it such an index contributes nothing. No autograd.
    """
    import torch

    global _CUDA_DTYPES
    if _CUDA_DTYPES is None:
        _CUDA_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    fn = "factorized_matmul"
    z = _cuda_matrix(fn, "z", z, None)
    if z.dtype not in _CUDA_DTYPES:
        raise ValueError(f"[{fn}] z must be float32, bfloat16 or float16, got {z.dtype}")
    values = _cuda_matrix(fn, "values", values, z.dtype, z.device)
    indices = _cuda_matrix(fn, "indices", indices, None, z.device)
    if indices.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"[{fn}] indices must be int16 or int32, got {indices.dtype}")
    n, k = z.shape
    s, d2 = values.shape
    if tuple(indices.shape) != (s, d2):
        raise ValueError(f"[{fn}] indices {tuple(indices.shape)} must match values {(s, d2)}")
    if not 1 <= s <= k or d2 < 1:
        raise ValueError(f"[{fn}] need 1 <= s <= k and d2 >= 1, got s={s}, k={k}, d2={d2}")
    if bias is not None:
        if not _is_cuda_tensor(bias) or bias.device != z.device or bias.dtype != z.dtype or tuple(bias.shape) != (d2,):
            raise ValueError(f"[{fn}] bias must be a ({d2},) {z.dtype} tensor on {z.device}")
        bias = bias.detach().contiguous()
    _prepare_cuda(fn, z.device)
    y = torch.empty(n, d2, dtype=z.dtype, device=z.device)
    flag = torch.zeros(1, dtype=torch.int32, device=z.device) if check_indices else None
    with torch.cuda.device(z.device):
        _C.column_sparse_matmul_cuda(z.data_ptr(), n, k, values.data_ptr(), indices.data_ptr(),
                                     indices.element_size(), s, d2, 0 if bias is None else bias.data_ptr(),
                                     y.data_ptr(), _CUDA_DTYPES[z.dtype], 0 if flag is None else flag.data_ptr(),
                                     torch.cuda.current_stream(z.device).cuda_stream)
    if flag is not None and int(flag.item()):
        raise ValueError(f"[{fn}] an index of C is outside [0, k = {k})")
    return y


def factorized_matmul_cuda(x, U, values, indices, bias=None, check_indices: bool = True):
    """y = x·U·C + bias for a factorized layer on the GPU: z = x·U by torch (cuBLAS), then
    :func:`column_sparse_matmul_cuda`. ``x`` is (..., d1) float32/bfloat16/float16 CUDA,
    ``U`` (d1, k) of x's dtype; the rest as in :func:`column_sparse_matmul_cuda`.
    Returns (..., d2) of x's dtype. No autograd.
    """
    fn = "factorized_matmul"
    if not _is_cuda_tensor(x):
        raise ValueError(f"[{fn}] x must be a CUDA tensor")
    U = _cuda_matrix(fn, "U", U, x.dtype, x.device)
    d1, k = U.shape
    if x.ndim < 1 or x.shape[-1] != d1:
        raise ValueError(f"[{fn}] x has {x.shape[-1] if x.ndim else 0} features but U has {d1} rows")
    lead = tuple(x.shape[:-1])
    z = (x.detach().reshape(-1, d1) @ U).contiguous()
    y = column_sparse_matmul_cuda(z, values, indices, bias, check_indices)
    return y.reshape(*lead, y.shape[1])
