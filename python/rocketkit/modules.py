"""FactorizedLinear: y = (x·U)·C + b with C column-sparse (s nonzeros in each of its out_features columns)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rocketkit.profile import INT16_MAX_RANK


def index_dtype_for(k: int) -> torch.dtype:
    return torch.int16 if k <= INT16_MAX_RANK else torch.int32


class _ColumnSparseMatmul(torch.autograd.Function):
    """y = z·C with C (k×out) given by values/indices; the forward uses a cached CSR of Cᵀ."""

    @staticmethod
    def forward(ctx, z, values, indices, csr_t, k):
        ctx.save_for_backward(z, values, indices)
        ctx.k = k
        return _csr_apply(csr_t, z)

    @staticmethod
    def backward(ctx, grad_y):
        z, values, indices = ctx.saved_tensors
        idx = indices.long()
        grad_z = grad_v = None
        # Training is not the hot path: densify C (k×out, the size of one gradient) only here.
        if ctx.needs_input_grad[0]:
            C = torch.zeros(ctx.k, values.shape[1], dtype=grad_y.dtype, device=grad_y.device)
            C.scatter_(0, idx, values.to(grad_y.dtype))
            grad_z = grad_y @ C.T
        if ctx.needs_input_grad[1]:
            zz = z.reshape(-1, z.shape[-1])
            gy = grad_y.reshape(-1, grad_y.shape[-1]).to(zz.dtype)
            grad_v = (zz.T @ gy).gather(0, idx).to(values.dtype)
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
    ``C_indices[:, j]`` (int16 when k ≤ 32767, else int32). The forward never densifies C: it
    multiplies by a CSR copy of Cᵀ built once and rebuilt only when values/indices change
    (half-precision inputs are multiplied in fp32, which the CPU sparse kernels need).
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
        self._csr_key = None
        self._csr = None

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        C = torch.zeros(self.k, self.out_features, dtype=self.C_values.dtype, device=self.C_values.device)
        return C.scatter_(0, self.C_indices.long(), self.C_values)

    @torch.no_grad()
    def to_dense_weight(self) -> torch.Tensor:
        """The equivalent nn.Linear weight, (out_features, in_features) = (U·C)ᵀ."""
        return (self.U @ self.dense_C()).T.contiguous()

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_csr"], state["_csr_key"] = None, None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
                f"bias={self.bias is not None}, index_dtype={str(self.C_indices.dtype).replace('torch.', '')}")
