"""refine_factors (opt-in closed-form refinement after allocation) against a plain NumPy fp64 loop."""

import numpy as np
import pytest
import scipy.linalg as sla

from rocketkit import _native
from rocketkit.apply import dense_C, measured_errors, refine_factors
from test_errors import random_S, random_W


def reference_refine(W, S, U, C, keep, iterations):
    """Per column lstsq on the kept rows, then the dictionary by lstsq; whitened errors after each step."""
    Su = np.triu(S)
    WL, D, C = Su @ W, Su @ U, C.copy()
    err = lambda: np.linalg.norm(WL - D @ C) / np.linalg.norm(WL)
    hist = [err()]
    for _ in range(iterations):
        for j in range(W.shape[1]):
            rows = np.flatnonzero(keep[:, j])
            C[:, j] = 0.0
            C[rows, j] = np.linalg.lstsq(D[:, rows], WL[:, j], rcond=None)[0]
        hist.append(err())
        D = np.linalg.lstsq(C.T, WL.T, rcond=None)[0].T
        hist.append(err())
    return sla.solve_triangular(Su, D, lower=False), C, hist


@pytest.mark.parametrize("d1,d2,k,s", [(37, 53, 11, 4), (53, 37, 19, 7), (19, 19, 6, 1), (1, 7, 1, 1), (29, 111, 9, 9)])
def test_refine_matches_reference_and_never_increases(d1, d2, k, s):
    rng = np.random.default_rng(d1 * 11 + d2 + k)
    W, S = random_W(rng, d1, d2, decay=0.2), random_S(rng, d1, outliers=2, scale=30.0)
    f = _native.factorize(W, S, k, s)
    ew, eo = _native.whitened_errors(W, S, np.array([[k, s]]))
    keep = dense_C(np.ones_like(f.values), f.indices, k) > 0
    U, values, hist = refine_factors(W, S, f.U, f.values, f.indices, iterations=3)
    Uref, Cref, href = reference_refine(W, S, f.U, dense_C(f.values, f.indices, k), keep, 3)
    assert hist[0] == pytest.approx(eo[0], abs=1e-9)  # starts from the profiled factorization
    np.testing.assert_allclose(hist, href, rtol=1e-9, atol=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(hist, hist[1:]))  # each half-step never increases it
    What = U @ dense_C(values, f.indices, k)
    np.testing.assert_allclose(What, Uref @ Cref, rtol=0, atol=1e-8 * np.abs(W).max())
    mw, mo = measured_errors(W, S, U, dense_C(values, f.indices, k))
    assert mo == pytest.approx(hist[-1], abs=1e-12) and mo <= eo[0] + 1e-12
    if s == k:  # the truncated SVD is already optimal: nothing to gain
        assert hist[-1] == pytest.approx(hist[0], abs=1e-10)


def test_refine_singular_dictionary_and_validation():
    rng = np.random.default_rng(3)
    W, S = random_W(rng, 12, 20), random_S(rng, 12)
    W[:, :] = np.outer(W[:, 0], np.ones(20))  # rank 1: D has dependent columns
    f = _native.factorize(W, S, 3, 2)
    U, values, hist = refine_factors(W, S, f.U, f.values, f.indices, iterations=2)
    assert np.isfinite(U).all() and np.isfinite(values).all()
    assert all(b <= a + 1e-12 for a, b in zip(hist, hist[1:]))
    with pytest.raises(ValueError, match=r"\[refine_factors\] iterations"):
        refine_factors(W, S, f.U, f.values, f.indices, iterations=0)
    with pytest.raises(ValueError, match=r"\[refine_factors\] shapes"):
        refine_factors(W[:, :5], S, f.U, f.values, f.indices)


def test_apply_allocation_refine_lowers_applied_error(tiny_model_factory, tiny_ids):
    """refine=2 on a tiny model: each layer's applied e_o ≤ its profiled e_o (kept in the allocation);
    refine=0 applies exactly what was profiled."""
    import torch

    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation
    from rocketkit.profile import profile_model

    model = tiny_model_factory("llama")
    prof = profile_model(model, tiny_ids, crs=(0.2, 0.5), kss=(1.0, 2.0), progress=False)
    alloc = allocate(prof, 0.3, "weight", buckets=5000)
    plain, refined = (apply_allocation(m, tiny_ids, alloc, progress=False, refine=r)
                      for m, r in ((tiny_model_factory("llama"), 0), (model, 2)))
    assert plain.keys() == refined.keys() and plain
    lower = 0
    for n, a in refined.items():
        d = alloc.layers[n]
        assert abs(plain[n].e_output - d.e_output) < 1e-9 and a.e_output <= d.e_output + 1e-9
        lower += a.e_output < d.e_output - 1e-6 * max(d.e_output, 1e-12)
    assert lower > 0  # masked layers do improve
    with torch.no_grad():
        assert torch.isfinite(model(tiny_ids[:1]).logits).all()
