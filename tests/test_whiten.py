"""whiten(): upper S with SᵀS = H, jitter only when H is singular or indefinite."""

from __future__ import annotations

import pytest
import torch

from rocketkit.whiten import whiten


def random_gram(d, n, seed, scales=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if scales is not None:
        x = x * scales
    return x.T @ x


def assert_upper(S):
    assert S.dtype == torch.float64
    assert torch.count_nonzero(torch.tril(S, diagonal=-1)) == 0


@pytest.mark.parametrize("d", [1, 7, 37, 53])
def test_full_rank_exact(d):
    H = random_gram(d, 3 * d + 5, seed=d)
    w = whiten(H)
    assert_upper(w.S)
    assert w.jitter == 0.0 and w.dead_channels == 0
    assert torch.all(torch.diagonal(w.S) > 0)
    torch.testing.assert_close(w.S.T @ w.S, H, rtol=1e-12, atol=1e-12 * float(H.abs().max()))


def test_outlier_channels_no_jitter():
    # Channel scales over 6 decades: the diagonal rescale keeps the factorization clean.
    d = 37
    scales = torch.logspace(-3, 3, d, dtype=torch.float64)
    H = random_gram(d, 200, seed=1, scales=scales)
    w = whiten(H)
    assert w.jitter == 0.0
    rel = torch.linalg.norm(w.S.T @ w.S - H) / torch.linalg.norm(H)
    assert rel < 1e-13


def test_singular_gets_jitter():
    d = 37
    H = random_gram(d, 11, seed=2)  # rank 11 < 37
    w = whiten(H)
    assert_upper(w.S)
    assert 1e-8 <= w.jitter <= 1e-2 and w.dead_channels == 0
    assert bool(torch.isfinite(w.S).all())
    rel = torch.linalg.norm(w.S.T @ w.S - H) / torch.linalg.norm(H)
    assert rel < 10 * w.jitter


def test_indefinite_gets_jitter():
    d = 19
    H = random_gram(d, 40, seed=3)
    evals, evecs = torch.linalg.eigh(H)
    evals[0] = -1e-3 * evals[-1]  # a small negative eigenvalue, as accumulated round-off can give
    H = (evecs * evals) @ evecs.T
    w = whiten(H)
    assert_upper(w.S)
    assert w.jitter > 0
    assert bool(torch.isfinite(w.S).all())


def test_dead_channels():
    d = 23
    H = random_gram(d, 100, seed=4)
    dead = [0, 5, 22]
    H[dead, :] = 0
    H[:, dead] = 0
    w = whiten(H)
    assert_upper(w.S)
    assert w.dead_channels == 3 and w.jitter > 0
    assert bool(torch.isfinite(w.S).all())
    live = [i for i in range(d) if i not in dead]
    SS = w.S.T @ w.S
    rel = torch.linalg.norm(SS[live][:, live] - H[live][:, live]) / torch.linalg.norm(H)
    assert rel < 1e-6


def test_all_dead_and_zero():
    w = whiten(torch.zeros(4, 4, dtype=torch.float64))
    assert w.dead_channels == 4 and w.jitter > 0 and bool(torch.isfinite(w.S).all())


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        whiten(torch.zeros(3, 4, dtype=torch.float64))
    H = torch.eye(3, dtype=torch.float64)
    H[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        whiten(H)
