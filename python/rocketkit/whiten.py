"""Whitening: the upper Cholesky factor S of a Gram matrix, H ≈ SᵀS, robust to singular H."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_JITTER_START = 1e-8
_JITTER_GROWTH = 10.0
_JITTER_MAX = 1e2  # relative to the mean of the rescaled diagonal; beyond this H is not a Gram matrix


@dataclass
class Whitening:
    S: torch.Tensor  # fp64 upper triangular (d1, d1), H + jitter·mean(diag Ĥ)·D² = SᵀS
    jitter: float  # λ added as λ·mean(diag Ĥ)·I to the rescaled Ĥ = D⁻¹HD⁻¹; 0 when none was needed
    dead_channels: int  # channels with zero (or negative) diagonal: never active in calibration


def whiten(H: torch.Tensor) -> Whitening:
    """Upper S with H ≈ SᵀS, via Cholesky of the diagonally rescaled H (upper triangle read).

    Rescaling by D = sqrt(diag H) (1 for dead channels) brings outlier channels to unit scale, which
    cuts the condition number by orders of magnitude. When the Cholesky fails (singular or
    indefinite H: dead channels, too few tokens) jitter λ·mean(diag Ĥ)·I is added, λ growing
    geometrically from 1e-8. S⁻¹ is never formed. Peak memory is two d1×d1 fp64 matrices besides
    H (a down_proj Gram of a 70B model is 6.6 GB), so everything works in place.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"[whiten] H must be square and non-empty, got shape {tuple(H.shape)}")
    Hn = H.to(torch.float64, copy=True)
    if not bool(torch.isfinite(Hn).all()):
        raise ValueError("[whiten] H contains NaN or Inf")
    diag = torch.diagonal(Hn).clone()
    live = diag > 0
    dead_channels = int((~live).sum())
    scale = torch.where(live, diag.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), torch.ones_like(diag))
    Hn.div_(scale[:, None]).div_(scale[None, :])
    base_diag = torch.diagonal(Hn).clone()
    mean_diag = float(base_diag.mean())
    if mean_diag <= 0:  # every channel dead
        mean_diag = 1.0

    jitter = 0.0
    S, info = torch.linalg.cholesky_ex(Hn, upper=True)
    while int(info) != 0 or not bool(torch.isfinite(S).all()):
        del S
        jitter = _JITTER_START if jitter == 0.0 else jitter * _JITTER_GROWTH
        if jitter > _JITTER_MAX:
            raise RuntimeError(f"[whiten] Cholesky failed even with jitter {jitter / _JITTER_GROWTH:g}·mean(diag)")
        torch.diagonal(Hn).copy_(base_diag + jitter * mean_diag)
        S, info = torch.linalg.cholesky_ex(Hn, upper=True)
    del Hn
    # Hn = ŜᵀŜ and H = D·Hn·D, so S = Ŝ·D.
    S.mul_(scale[None, :])
    return Whitening(S=S.contiguous(), jitter=jitter, dead_channels=dead_channels)
