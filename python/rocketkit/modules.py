"""FactorizedLinear: y = (x·U)·C + b with C column-sparse (s nonzeros in each of its out_features columns)."""

from __future__ import annotations

import os
import time
import warnings
import weakref

import torch
from torch import nn

from rocketkit.profile import INT16_MAX_RANK

# Dtypes the native CPU kernel computes in; half-precision modules compute in fp32 (weights read as
# stored) and cast back.
_NATIVE_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)


# CPU forward paths of a factorized layer (no-grad inference), chosen per layer and batch-size bucket:
#   "sparse": the native kernel (x·U, then the column-sparse product with C);
#   "dense_c": two dense torch GEMMs, (x·U)·C with C densified once and cached on the module.
# At batch 1 the native gather streams values and indices at a fraction of the GEMV bandwidth, so
# "dense_c" wins there; at large n the sparse product does fewer flops. Which is faster depends on the
# shape, the thread count and the machine, so it is measured, not guessed.
FORWARD_PATHS = ("sparse", "dense_c")
# ROCKETKIT_FORWARD_PATH: "sparse" (default) or "dense_c" pins every layer; "auto" measures per layer
# and batch size. Measured choices depend on timing, so two processes may pick different paths and
# differ by fp32 rounding: the default is the fixed path, so outputs never depend on the machine's load.
_PATH_ENV = "ROCKETKIT_FORWARD_PATH"
# Measured choices, shared by the layers of one shape: (d1, d2, k, s, dtype, bias, threads, bucket) -> path.
_MEASURED_PLANS: dict[tuple, str] = {}
_PLAN_ROWS = 512  # larger inputs are timed on this many of their rows


def _batch_bucket(n: int) -> int:
    """The batch-size class a plan is measured for: 1 (decode), ≤16, ≤256, larger (prefill, evaluation)."""
    return 1 if n <= 1 else 16 if n <= 16 else 256 if n <= 256 else 2048


def _forced_path() -> str | None:
    v = os.environ.get(_PATH_ENV, "sparse")
    if v == "auto":
        return None
    if v not in FORWARD_PATHS:
        raise ValueError(f"[FactorizedLinear] {_PATH_ENV} must be auto, sparse or dense_c, got {v!r}")
    return v


def clear_forward_plans() -> None:
    """Forget the measured plans shared by shape. Each module keeps its own ``forward_plan``; clear that
    dict too for the module to measure again."""
    _MEASURED_PLANS.clear()


def index_dtype_for(k: int) -> torch.dtype:
    return torch.int16 if k <= INT16_MAX_RANK else torch.int32


def _dense_C(values: torch.Tensor, indices: torch.Tensor, k: int, dtype=None) -> torch.Tensor:
    """C (k×out) from its nonzeros; a row repeated within a column adds up, as in the kernels."""
    dtype = dtype or values.dtype
    C = torch.zeros(k, values.shape[1], dtype=dtype, device=values.device)
    return C.scatter_add_(0, indices.long(), values.to(dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _native_product(x2, U, values, indices, bias, num_threads):
    """x2 (N, d1)·U·C + bias by the native kernel, in x2's dtype (fp32/fp64); indices pre-validated."""
    from rocketkit._native import _factorized_matmul_prevalidated

    return _factorized_matmul_prevalidated(x2, U, values, indices, bias, num_threads)


class _NativeFactorizedMatmul(torch.autograd.Function):
    """y = x·U·C + b on the CPU: the native kernel forward, a torch backward (C densified there only)."""

    @staticmethod
    def forward(ctx, x, U, values, bias, indices, num_threads):
        cdt = _compute_dtype(x.dtype)
        x2 = x.detach().reshape(-1, x.shape[-1]).to(cdt)
        y = _native_product(x2, U, values, indices, bias, num_threads)
        ctx.save_for_backward(x, U, values, indices)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], values.shape[1])

    @staticmethod
    def backward(ctx, grad_y):
        x, U, values, indices = ctx.saved_tensors
        cdt = _compute_dtype(x.dtype)
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(cdt)
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        Uc = U.to(cdt)
        need_x, need_U, need_v, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_U = grad_v = grad_b = None
        if need_x or need_U:
            # Training is not the hot path: C (k×out, the size of one gradient) is densified only here.
            gz = gy @ _dense_C(values, indices, U.shape[1], cdt).T
            if need_x:
                grad_x = (gz @ Uc.T).to(x.dtype).reshape(x.shape)
            if need_U:
                grad_U = (x2.T @ gz).to(U.dtype)
        if need_v:
            grad_v = ((x2 @ Uc).T @ gy).gather(0, indices.long()).to(values.dtype)
        if need_b and ctx.has_bias:
            grad_b = gy.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_U, grad_v, grad_b, None, None


class _ColumnSparseMatmul(torch.autograd.Function):
    """y = z·C with C (k×out) given by values/indices; the forward uses a cached CSR of Cᵀ (non-CPU devices)."""

    @staticmethod
    def forward(ctx, z, values, indices, csr_t, k):
        ctx.save_for_backward(z, values, indices)
        ctx.k = k
        return _csr_apply(csr_t, z)

    @staticmethod
    def backward(ctx, grad_y):
        z, values, indices = ctx.saved_tensors
        grad_z = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_y @ _dense_C(values, indices, ctx.k, grad_y.dtype).T
        if ctx.needs_input_grad[1]:
            zz = z.reshape(-1, z.shape[-1])
            gy = grad_y.reshape(-1, grad_y.shape[-1]).to(zz.dtype)
            grad_v = (zz.T @ gy).gather(0, indices.long()).to(values.dtype)
        return grad_z, grad_v, None, None, None


def _csr_apply(csr_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """z (…, k) · C where csr_t = Cᵀ (out×k, CSR); computed in csr_t's dtype, returned in z's."""
    lead = z.shape[:-1]
    z2 = z.reshape(-1, z.shape[-1]).to(csr_t.dtype)
    y = (csr_t @ z2.T).T
    return y.to(z.dtype).reshape(*lead, csr_t.shape[0])


class FactorizedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear(in_features, out_features)`` storing W ≈ U·C.

    ``U`` is (in_features, k); column j of C (k×out_features) holds ``C_values[:, j]`` at rows
    ``C_indices[:, j]`` (int16 when k ≤ 32767, else int32). The forward computes x·U, then the
    column-sparse product with C, and never densifies C:

    * CPU: the native kernel (``rocketkit._native``), fp32/fp64; bf16/fp16 modules compute in
      fp32 and cast back, the kernel reading U and C_values as stored (no fp32 copy per call).
      The indices are range-checked once per change of ``C_indices`` (or of k), not on every
      call. Autograd works (the backward is torch code).
      Without autograd, each batch-size bucket (1, ≤16, ≤256, more) has a forward plan: the
      native kernel ("sparse") or two dense GEMMs with C densified once and cached ("dense_c"),
      whichever ran faster when first timed for this layer's shape and thread count (on the
      first call in that bucket; shared by layers of equal shape, kept in ``forward_plan``).
      Both agree to fp32 rounding; a plan once chosen is kept, so outputs repeat call to call.
    * other devices: torch matmul for x·U, then a CSR copy of Cᵀ built once and rebuilt only
      when values/indices change.
    """

    def __init__(self, in_features: int, out_features: int, k: int, s: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        if not (1 <= k <= min(in_features, out_features) and 1 <= s <= k):
            raise ValueError(f"FactorizedLinear: need 1 <= s <= k <= min(in, out), got k={k}, s={s}, in={in_features}, out={out_features}")
        fk = {"dtype": dtype, "device": device}
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        self.U = nn.Parameter(torch.zeros(in_features, k, **fk))
        self.C_values = nn.Parameter(torch.zeros(s, out_features, **fk))
        # Distinct rows per column until real factors are loaded.
        init = torch.arange(s, device=device).unsqueeze(1).expand(s, out_features)
        self.register_buffer("C_indices", init.to(index_dtype_for(k)).contiguous(), persistent=True)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **fk))
        else:
            self.register_parameter("bias", None)
        self._clear_caches()

    def _clear_caches(self) -> None:
        self._csr_key = None
        self._csr = None
        self._checked_ref = None  # weak reference to the C_indices tensor last validated
        self._checked_key = None
        self._dense_key = None
        self._dense = None  # (U in the compute dtype, C densified), for the "dense_c" path
        self.forward_plan: dict[int, str] = {}  # batch-size bucket -> path, see FORWARD_PATHS

    @classmethod
    def from_factors(cls, U, values, indices, bias=None, dtype=torch.float32, device=None) -> "FactorizedLinear":
        """Build from NumPy/torch factors (``rocketkit.factorize`` output); ``bias`` is copied if given."""
        U, values, indices = (torch.as_tensor(a) for a in (U, values, indices))
        d1, k = U.shape
        s, d2 = values.shape
        if indices.shape != (s, d2):
            raise ValueError(f"FactorizedLinear: indices {tuple(indices.shape)} must match values {(s, d2)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise ValueError(f"FactorizedLinear: indices must be in [0, {k})")
        m = cls(d1, d2, k, s, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            m.U.copy_(U)
            m.C_values.copy_(values)
            m.C_indices.copy_(indices.to(m.C_indices.dtype))
            if bias is not None:
                m.bias.copy_(torch.as_tensor(bias))
        return m

    @property
    def weight_params(self) -> int:
        return self.in_features * self.k + self.s * self.out_features

    def _check_indices(self) -> None:
        """Validate C_indices against the current factors unless this exact tensor, unchanged, already passed.

        The key holds the tensor's identity (weakly), storage, version counter and k, so an in-place edit,
        a replaced tensor or a narrower U triggers a new check; the native kernel then skips its own.
        """
        idx, k = self.C_indices, self.U.shape[1]
        try:
            key = (idx.data_ptr(), idx._version, tuple(idx.shape), idx.dtype, k)
        except RuntimeError:  # inference tensors have no version counter: check every time
            key = None
        ref = self._checked_ref() if self._checked_ref is not None else None
        if key is not None and ref is idx and self._checked_key == key:
            return
        if idx.dtype not in (torch.int16, torch.int32):
            raise ValueError(f"FactorizedLinear: C_indices must be int16 or int32, got {idx.dtype}")
        if tuple(idx.shape) != tuple(self.C_values.shape):
            raise ValueError(f"FactorizedLinear: C_indices {tuple(idx.shape)} must match C_values {tuple(self.C_values.shape)}")
        if idx.numel():
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= k:
                raise ValueError(f"FactorizedLinear: C_indices must be in [0, {k}), found values in [{int(lo)}, {int(hi)}]")
        if key is not None:
            self._checked_ref, self._checked_key = weakref.ref(idx), key

    def _csr_t(self) -> torch.Tensor:
        v, idx = self.C_values, self.C_indices
        key = (v.data_ptr(), v._version, v.dtype, v.device, idx.data_ptr(), idx._version)
        if self._csr is None or self._csr_key != key:
            dt = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
                crow = torch.arange(0, self.out_features * self.s + 1, self.s, device=v.device, dtype=torch.int64)
                self._csr = torch.sparse_csr_tensor(
                    crow, idx.T.reshape(-1).to(torch.int64), v.detach().T.reshape(-1).to(dt),
                    size=(self.out_features, self.k), check_invariants=False,
                )
            self._csr_key = key
        return self._csr

    def _dense_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, C) as dense matrices in the compute dtype, rebuilt only when a factor changes."""
        U, v, idx = self.U, self.C_values, self.C_indices
        key = (U.data_ptr(), U._version, v.data_ptr(), v._version, idx.data_ptr(), idx._version, U.dtype)
        if self._dense is None or self._dense_key != key:
            cdt = _compute_dtype(U.dtype)
            with torch.no_grad():
                Ud = U.detach() if U.dtype == cdt else U.detach().to(cdt)
                self._dense = (Ud, _dense_C(v.detach(), idx, self.k, cdt))
            self._dense_key = key
        return self._dense

    def _run_path(self, path: str, x2: torch.Tensor, threads: int) -> torch.Tensor:
        if path == "sparse":
            return _native_product(x2, self.U, self.C_values, self.C_indices, self.bias, threads)
        Ud, Cd = self._dense_factors()
        y = x2 @ Ud
        if self.bias is None:
            return y @ Cd
        return torch.addmm(self.bias.detach().to(y.dtype), y, Cd)

    def _plan(self, x2: torch.Tensor, threads: int) -> tuple[str, torch.Tensor | None]:
        """This call's path, and its output when choosing it meant running it."""
        if x2.shape[0] == 0:
            return "sparse", None
        bucket = _batch_bucket(x2.shape[0])
        path = _forced_path() or self.forward_plan.get(bucket)
        if path is not None:
            return path, None
        key = (self.in_features, self.out_features, self.k, self.s, self.U.dtype, self.bias is not None,
               threads, bucket)
        path = _MEASURED_PLANS.get(key)
        y = None
        if path is None:
            # Best of a few timed runs, after one untimed run of each (which also builds the dense
            # cache), the paths interleaved so that a load spike on a shared machine hits both alike.
            # Small calls repeat more (their times are microseconds); large ones are timed on their
            # first rows only (both paths scale linearly in n), so that planning costs about one call.
            n = x2.shape[0]
            xm = x2 if n <= _PLAN_ROWS else x2[:_PLAN_ROWS]
            reps = 7 if n <= 16 else 2
            best = dict.fromkeys(FORWARD_PATHS, float("inf"))
            for p in FORWARD_PATHS:
                self._run_path(p, xm, threads)
            for _ in range(reps):
                for p in FORWARD_PATHS:
                    t0 = time.perf_counter()
                    y = self._run_path(p, xm, threads)
                    best[p] = min(best[p], time.perf_counter() - t0)
            path = min(FORWARD_PATHS, key=lambda p: best[p])
            _MEASURED_PLANS[key] = path
            y = y if path == FORWARD_PATHS[-1] and xm is x2 else None
        self.forward_plan[bucket] = path
        if path != "dense_c" and "dense_c" not in self.forward_plan.values():
            self._dense = self._dense_key = None  # not needed: free its memory
        return path, y

    def _uses_native(self, x: torch.Tensor) -> bool:
        U = self.U
        return (x.device.type == "cpu" and U.device.type == "cpu" and x.dtype == U.dtype
                and (U.dtype in _NATIVE_DTYPES or U.dtype in _HALF_DTYPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_native(x):
            self._check_indices()
            threads = torch.get_num_threads()
            grads = torch.is_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in (self.U, self.C_values, self.bias)))
            if grads:
                return _NativeFactorizedMatmul.apply(x, self.U, self.C_values, self.bias, self.C_indices, threads)
            cdt = _compute_dtype(x.dtype)
            # Each torch call costs microseconds, as much as a whole batch-1 product: skip no-ops.
            x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            if x2.dtype != cdt:
                x2 = x2.to(cdt)
            path, y = self._plan(x2, threads)
            if y is None:
                y = self._run_path(path, x2, threads)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        # Non-CPU devices (a CUDA kernel is to come), and mismatched dtypes, which raise here as nn.Linear does.
        z = x @ self.U
        csr_t = self._csr_t()
        if torch.is_grad_enabled() and (z.requires_grad or self.C_values.requires_grad):
            y = _ColumnSparseMatmul.apply(z, self.C_values, self.C_indices, csr_t, self.k)
        else:
            y = _csr_apply(csr_t, z)
        if self.bias is not None:
            y = y + self.bias
        return y

    @torch.no_grad()
    def dense_C(self) -> torch.Tensor:
        """C (k×out_features), densified; a row repeated within a column adds up."""
        return _dense_C(self.C_values, self.C_indices, self.k)

    @torch.no_grad()
    def to_dense_weight(self) -> torch.Tensor:
        """The equivalent nn.Linear weight, (out_features, in_features) = (U·C)ᵀ, in the module's dtype
        (computed in fp32 for half-precision modules, so that the merge adds no rounding of its own)."""
        cdt = _compute_dtype(self.U.dtype)
        W = self.U.to(cdt) @ _dense_C(self.C_values, self.C_indices, self.k, cdt)
        return W.T.to(self.U.dtype).contiguous()

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.update(_csr=None, _csr_key=None, _checked_ref=None, _checked_key=None, _dense=None, _dense_key=None)
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
                f"bias={self.bias is not None}, index_dtype={str(self.C_indices.dtype).replace('torch.', '')}")
