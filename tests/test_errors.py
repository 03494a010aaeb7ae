"""whitened_errors and factorize against a plain NumPy fp64 reconstruction of each candidate."""

import numpy as np
import pytest
import scipy.linalg as sla

import rocketkit
from rocketkit import _native


# ---- reference -------------------------------------------------------------------------------
def random_S(rng, d1, outliers=0, scale=1.0):
    """Upper Cholesky factor of XᵀX for correlated activations, optional outlier channels."""
    n = 3 * d1 + 5
    X = rng.standard_normal((n, d1)) @ (np.eye(d1) + 0.3 * rng.standard_normal((d1, d1)) / np.sqrt(d1))
    if outliers:
        X[:, rng.choice(d1, min(outliers, d1), replace=False)] *= scale
    return np.linalg.cholesky(X.T @ X).T


def random_W(rng, d1, d2, decay=0.05):
    r = min(d1, d2)
    Q1, _ = np.linalg.qr(rng.standard_normal((d1, r)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d2, r)))
    return (Q1 * np.exp(-decay * np.arange(r))) @ Q2.T + 1e-3 * rng.standard_normal((d1, d2))


def reference_mask(Ck, s):
    """Keep the s largest |C_ij| per column, ties to the lower row index."""
    k, d2 = Ck.shape
    keep = np.zeros_like(Ck, dtype=bool)
    for j in range(d2):
        order = sorted(range(k), key=lambda i: (-abs(Ck[i, j]), i))
        keep[order[:s], j] = True
    return np.where(keep, Ck, 0.0), keep


def reference_ridge_cholesky(G):
    eps = 0.0
    mean = np.trace(G) / G.shape[0]
    base = mean if mean > 0 else 1.0
    while True:
        try:
            return np.linalg.cholesky(G + eps * np.eye(G.shape[0])), eps
        except np.linalg.LinAlgError:
            eps = 1e-12 * base if eps == 0 else eps * 10


def reference_factorization(W, S, k, s):
    """Ŵ, masked C, mask and relative ridge of candidate (k, s), built explicitly."""
    Su = np.triu(S)
    WL = Su @ W
    Ufull, sig, Vt = np.linalg.svd(WL, full_matrices=False)
    # C_k = DᵀW_L = Σ_k V_kᵀ; the second form stays exact for zero singular values.
    Ck = sig[:k, None] * Vt[:k]
    Cm, keep = reference_mask(Ck, s)
    if s == k and sig[k - 1] ** 2 > 0:
        G, eps = np.diag(sig[:k] ** 2), 0.0
        L = np.diag(sig[:k])
    else:
        G = Cm @ Cm.T
        L, eps = reference_ridge_cholesky(G)
        mean = np.trace(G) / k
        eps = eps / (mean if mean > 0 else 1.0)  # factorize reports the ridge relative to mean(diag G)
    Dstar = sla.cho_solve((L, True), Cm @ WL.T).T
    What = sla.solve_triangular(Su, Dstar @ Cm, lower=False)
    return What, Cm, keep, eps


def reference_errors(W, S, cands):
    Su = np.triu(S)
    ew, eo = [], []
    for k, s in cands:
        What, *_ = reference_factorization(W, S, k, s)
        ew.append(np.linalg.norm(W - What) / np.linalg.norm(W))
        eo.append(np.linalg.norm(Su @ (W - What)) / np.linalg.norm(Su @ W))
    return np.array(ew), np.array(eo)


def grid(d1, d2):
    r = min(d1, d2)
    cands = {(1, 1), (r, r), (r, 1), (max(1, r // 2), max(1, r // 4)), (max(1, r // 3), max(1, r // 3))}
    return np.array(sorted(cands), dtype=np.int64)


# ---- agreement -------------------------------------------------------------------------------
@pytest.mark.parametrize("d1,d2", [(37, 53), (53, 37), (1, 7), (7, 1), (19, 19)])
@pytest.mark.parametrize("threads", [1, 2])
def test_errors_match_reference(d1, d2, threads):
    rng = np.random.default_rng(1000 * d1 + d2)
    W, S = random_W(rng, d1, d2), random_S(rng, d1)
    S[np.tril_indices(d1, -1)] = rng.standard_normal(d1 * (d1 - 1) // 2)  # lower triangle ignored
    cands = grid(d1, d2)
    ew, eo = rocketkit._native.whitened_errors(W, S, cands, num_threads=threads)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)


def test_full_grid_odd_shape():
    rng = np.random.default_rng(7)
    d1, d2 = 23, 31
    W, S = random_W(rng, d1, d2, decay=0.1), random_S(rng, d1)
    cands = np.array([(k, s) for k in range(1, 24) for s in range(1, k + 1)], dtype=np.int64)
    ew, eo = _native.whitened_errors(W, S, cands)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)
    # nested truncation: errors fall with k; s = k never worse than a mask
    full = {(k, s): (w, o) for (k, s), w, o in zip(cands, ew, eo)}
    assert all(full[(k + 1, k + 1)][1] <= full[(k, k)][1] + 1e-12 for k in range(1, 23))
    assert all(full[(k, k)][1] <= full[(k, s)][1] + 1e-12 for k in range(1, 24) for s in range(1, k))


def test_ill_conditioned_S():
    rng = np.random.default_rng(11)
    d1, d2 = 37, 53
    W, S = random_W(rng, d1, d2), random_S(rng, d1, outliers=3, scale=1e3)
    S = S @ np.diag(np.where(np.arange(d1) == 5, 1e-3, 1.0))  # a nearly dead channel too
    assert np.linalg.cond(S) > 1e5
    cands = grid(d1, d2)
    ew, eo = _native.whitened_errors(W, S, cands)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)


def ridge_case():
    """A layer where, with s = 1, atom 1 (k = 2) is never the largest entry of any column."""
    rng = np.random.default_rng(3)
    d1, d2 = 5, 9
    S = random_S(rng, d1)
    # W_L with singular values 10 and 1 and right vectors that spread atom 1 thinly.
    Q1, _ = np.linalg.qr(rng.standard_normal((d1, 2)))
    v0 = np.ones(d2) / 3.0
    v1 = np.zeros(d2)
    v1[:2] = [1, -1]
    v1 /= np.linalg.norm(v1)
    WL = Q1 @ np.diag([10.0, 1.0]) @ np.vstack([v0, v1]) + 1e-2 * rng.standard_normal((d1, d2))
    W = sla.solve_triangular(S, WL, lower=False)
    return W, S


def test_ridge_is_reported_and_accounted():
    W, S = ridge_case()
    f = _native.factorize(W, S, 2, 1)
    assert f.ridge > 0
    _, _, keep, eps = reference_factorization(W, S, 2, 1)
    assert not keep.any(axis=1).all()
    assert eps == pytest.approx(f.ridge, rel=1e-12)
    cands = np.array([[2, 1], [2, 2], [1, 1]], dtype=np.int64)
    ew, eo = _native.whitened_errors(W, S, cands)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)
    mw, mo = measured_errors(W, S, f)
    assert abs(mw - ew[0]) < 1e-9 and abs(mo - eo[0]) < 1e-9


# ---- factorize -------------------------------------------------------------------------------
def reconstruct(f, d2):
    k = f.U.shape[1]
    C = np.zeros((k, d2))
    np.put_along_axis(C, f.indices.astype(np.int64), f.values, axis=0)
    return f.U @ C


def measured_errors(W, S, f):
    Su = np.triu(S)
    What = reconstruct(f, W.shape[1])
    return (np.linalg.norm(W - What) / np.linalg.norm(W), np.linalg.norm(Su @ (W - What)) / np.linalg.norm(Su @ W))


@pytest.mark.parametrize("d1,d2", [(37, 53), (53, 37), (1, 7), (7, 1), (19, 19)])
def test_factorize_matches_reference_and_profile(d1, d2):
    rng = np.random.default_rng(d1 * 7 + d2)
    W, S = random_W(rng, d1, d2), random_S(rng, d1, outliers=2, scale=30.0)
    cands = grid(d1, d2)
    ew, eo = _native.whitened_errors(W, S, cands)
    for c, (k, s) in enumerate(cands):
        f = _native.factorize(W, S, k, s)
        assert f.U.shape == (d1, k) and f.values.shape == (s, d2) and f.indices.shape == (s, d2)
        assert f.indices.dtype == np.int32
        assert (np.diff(f.indices, axis=0) > 0).all() and f.indices.min() >= 0 and f.indices.max() < k
        What, Cm, keep, eps = reference_factorization(W, S, k, s)
        assert f.ridge == pytest.approx(eps, rel=1e-9, abs=0)
        np.testing.assert_array_equal(np.sort(np.nonzero(keep.T)[1].reshape(d2, s), axis=1), f.indices.T)
        np.testing.assert_allclose(reconstruct(f, d2), What, rtol=0, atol=1e-9 * np.abs(W).max())
        mw, mo = measured_errors(W, S, f)
        assert abs(mw - ew[c]) < 1e-9 and abs(mo - eo[c]) < 1e-9


def test_zero_layer_and_zero_columns():
    rng = np.random.default_rng(5)
    S = random_S(rng, 7)
    cands = np.array([[1, 1], [3, 2], [5, 5]], dtype=np.int64)
    ew, eo = _native.whitened_errors(np.zeros((7, 9)), S, cands)
    assert (ew == 0).all() and (eo == 0).all()
    W = random_W(rng, 7, 9)
    W[:, [0, 4]] = 0
    ew, eo = _native.whitened_errors(W, S, cands)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)
    assert (_native.whitened_errors(W, S, np.zeros((0, 2), dtype=np.int64))[0].shape == (0,))


def test_tie_rule_lower_index():
    # W_L with equal |C| in every column: the mask must keep the lowest rows.
    d = 4
    S = np.eye(d)
    W = np.eye(d)  # σ = 1, V = I up to signs: each column has one nonzero, ties among zeros
    f = _native.factorize(W, S, 4, 2)
    for j in range(d):
        nz = int(np.flatnonzero(np.abs(f.values[:, j]) > 0.5)[0])
        others = sorted(set(range(4)) - {int(f.indices[nz, j])})
        assert [int(i) for i in f.indices[:, j] if i != f.indices[nz, j]] == others[:1]


# ---- validation ------------------------------------------------------------------------------
def _ok(rng=np.random.default_rng(0)):
    return random_W(rng, 6, 8), random_S(rng, 6)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda W, S, c: (W.astype(np.float32), S, c),
        lambda W, S, c: (W[0], S, c),
        lambda W, S, c: (W, S[:5], c),
        lambda W, S, c: (W, S[:, :5], c),
        lambda W, S, c: (np.where(np.arange(8) == 3, np.nan, W), S, c),
        lambda W, S, c: (np.where(np.arange(8) == 3, np.inf, W), S, c),
        lambda W, S, c: (W, np.where(np.eye(6) > 0, -S, S), c),
        lambda W, S, c: (W, S - np.diag(np.diag(S)), c),
        lambda W, S, c: (W, np.triu(np.full_like(S, np.nan)) + np.tril(S, -1), c),
        lambda W, S, c: (W, S, np.array([[7, 1]])),
        lambda W, S, c: (W, S, np.array([[0, 1]])),
        lambda W, S, c: (W, S, np.array([[3, 4]])),
        lambda W, S, c: (W, S, np.array([[3, 0]])),
        lambda W, S, c: (W, S, np.array([[-3, -1]])),
        lambda W, S, c: (W, S, np.array([3, 1])),
        lambda W, S, c: (W, S, np.array([[3.0, 1.0]])),
        lambda W, S, c: (np.zeros((0, 8)), S, c),
    ],
)
def test_whitened_errors_validation(mutate):
    W, S = _ok()
    W, S, c = mutate(W, S, np.array([[3, 1]], dtype=np.int64))
    with pytest.raises(ValueError, match=r"^\[whitened_errors\]"):
        _native.whitened_errors(W, S, c)


def test_whitened_errors_bad_threads():
    W, S = _ok()
    with pytest.raises(ValueError, match=r"^\[whitened_errors\]"):
        _native.whitened_errors(W, S, np.array([[3, 1]]), num_threads=-1)


@pytest.mark.parametrize(
    "args",
    [(7, 1), (0, 1), (3, 4), (3, 0), (-1, -1), (2**40, 1), (3.5, 1), ("3", 1), (True, 1)],
)
def test_factorize_validation_ks(args):
    W, S = _ok()
    with pytest.raises(ValueError, match=r"^\[factorize\]"):
        _native.factorize(W, S, *args)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda W, S: (W.astype(np.float32), S),
        lambda W, S: (W[0], S),
        lambda W, S: (W, S[:5]),
        lambda W, S: (np.where(np.arange(8) == 3, np.nan, W), S),
        lambda W, S: (W, np.where(np.eye(6) > 0, 0.0, S)),
        lambda W, S: (W, np.where(np.eye(6, k=2) > 0, np.inf, S)),
    ],
)
def test_factorize_validation_arrays(mutate):
    W, S = mutate(*_ok())
    with pytest.raises(ValueError, match=r"^\[factorize\]"):
        _native.factorize(W, S, 3, 1)


def test_lower_triangle_of_S_is_ignored():
    rng = np.random.default_rng(9)
    W, S = random_W(rng, 6, 8), random_S(rng, 6)
    c = np.array([[3, 1], [4, 2]])
    a = _native.whitened_errors(W, S, c)
    S2 = S.copy()
    S2[np.tril_indices(6, -1)] = np.nan
    b = _native.whitened_errors(W, S2, c)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("d1,d2", [(9, 14), (14, 9)])
def test_rank_deficient_layer(d1, d2):
    # W of rank 3: zero singular values of W_L (σ_i = 0 atoms need the ridge when s = k > 3)
    rng = np.random.default_rng(d1 + 100 * d2)
    W = rng.standard_normal((d1, 3)) @ rng.standard_normal((3, d2))
    S = random_S(rng, d1, outliers=1, scale=20.0)
    cands = np.array([[1, 1], [2, 1], [3, 3], [3, 2], [5, 2], [6, 6]], dtype=np.int64)
    ew, eo = _native.whitened_errors(W, S, cands)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)
    for c, (k, s) in enumerate(cands):
        mw, mo = measured_errors(W, S, _native.factorize(W, S, k, s))
        assert abs(mw - ew[c]) < 1e-9 and abs(mo - eo[c]) < 1e-9


@pytest.mark.parametrize("d1,d2", [(37, 53), (53, 37), (19, 19), (1, 7)])
def test_unmasked_candidate_is_whitened_truncated_svd(d1, d2):
    """s = k (the SVD-LLM baseline) is Ŵ = S⁻¹·[S·W]_k, [·]_k the best rank-k approximation."""
    rng = np.random.default_rng(d1 * 3 + d2)
    W, S = random_W(rng, d1, d2), random_S(rng, d1, outliers=2, scale=30.0)
    Q, sig, Vt = np.linalg.svd(S @ W, full_matrices=False)
    ks = list(range(1, min(d1, d2) + 1))
    ew, eo = _native.whitened_errors(W, S, np.array([[k, k] for k in ks]))
    for c, k in enumerate(ks):
        ref = sla.solve_triangular(S, (Q[:, :k] * sig[:k]) @ Vt[:k], lower=False)
        f = _native.factorize(W, S, k, k)
        np.testing.assert_allclose(reconstruct(f, d2), ref, rtol=0, atol=1e-9 * np.abs(W).max())
        ref_w = np.linalg.norm(W - ref) / np.linalg.norm(W)
        ref_o = np.sqrt(max(np.sum(sig[k:] ** 2), 0.0)) / np.linalg.norm(sig)
        assert abs(ew[c] - ref_w) < 1e-9 and abs(eo[c] - ref_o) < 1e-9


# ---- chains of mask updates and the shared pool ---------------------------------------------
def test_chain_steps_in_any_order():
    """Candidates in a scrambled order with k and s moving both ways, far and near: the chain
    updates (per-column prefix moves, cuts at long jumps) still give the reference errors."""
    rng = np.random.default_rng(23)
    d1, d2 = 29, 47
    W, S = random_W(rng, d1, d2, decay=0.08), random_S(rng, d1, outliers=2, scale=30.0)
    ks = rng.integers(2, d1 + 1, size=90)
    cands = np.array([(k, rng.integers(1, k + 1)) for k in ks] + [(29, 28), (29, 27), (28, 28), (3, 1)],
                     dtype=np.int64)
    cands = cands[rng.permutation(len(cands))]
    ew, eo = _native.whitened_errors(W, S, cands, num_threads=2)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)


def test_default_grid_odd_shape():
    """The default (cr, ks) grid on an odd, wide layer: the chain order it induces is the one
    profiling uses in practice."""
    from rocketkit.profile import candidate_grid

    rng = np.random.default_rng(29)
    d1, d2 = 37, 83
    W, S = random_W(rng, d1, d2, decay=0.03), random_S(rng, d1)
    g = candidate_grid(d1, d2)
    cands = np.stack([g.k, g.s], axis=1)
    assert len(cands) > 200
    ew, eo = _native.whitened_errors(W, S, cands)
    rw, ro = reference_errors(W, S, cands)
    np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)


def test_pooled_layers_match_single_layers():
    """whitened_errors_layers: the reference errors per layer, equal to per-layer calls to
    rounding, identical for every thread count; a shared S, a zero layer and a layer without
    candidates included."""
    rng = np.random.default_rng(31)
    S1, S2 = random_S(rng, 41, outliers=2, scale=20.0), random_S(rng, 17)
    Ws = [random_W(rng, 41, 41), random_W(rng, 41, 13), np.zeros((41, 7)), random_W(rng, 17, 67),
          random_W(rng, 41, 5), random_W(rng, 17, 3)]
    Ss = [S1, S1, S1, S2, S1, S2]
    # (not (3, 1) on the 17×3 layer: a mask that rebuilds W exactly has error 0, which the
    # one-solve path resolves only to ~1e-8, the square root of its rounding, as before)
    cands = [grid(41, 41), grid(41, 13), grid(41, 7), grid(17, 67), np.zeros((0, 2), dtype=np.int64),
             np.array([(1, 1), (2, 1), (2, 2), (3, 3)], dtype=np.int64)]
    runs = [_native.whitened_errors_layers(Ws, Ss, cands, num_threads=t) for t in (1, 2, 3)]
    for other in runs[1:]:
        for (a, b), (c, d) in zip(runs[0], other):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
    for W, S, c, (ew, eo) in zip(Ws, Ss, cands, runs[0]):
        assert ew.shape == eo.shape == (len(c),)
        if not len(c):
            continue
        sw, so = _native.whitened_errors(W, S, c)
        np.testing.assert_allclose(ew, sw, rtol=0, atol=1e-12)
        np.testing.assert_allclose(eo, so, rtol=0, atol=1e-12)
        if W.any():
            rw, ro = reference_errors(W, S, c)
            np.testing.assert_allclose(ew, rw, rtol=0, atol=1e-9)
            np.testing.assert_allclose(eo, ro, rtol=0, atol=1e-9)
        else:
            assert not ew.any() and not eo.any()
    assert _native.whitened_errors_layers([], [], []) == []


def test_pooled_layers_validation():
    rng = np.random.default_rng(37)
    S = random_S(rng, 9)
    W = random_W(rng, 9, 5)
    with pytest.raises(ValueError, match="one of each per layer"):
        _native.whitened_errors_layers([W, W], [S, S], [grid(9, 5)])
    with pytest.raises(ValueError, match=r"\[whitened_errors\] S must be"):
        _native.whitened_errors_layers([W, random_W(rng, 8, 5)], [S, S], [grid(9, 5), grid(8, 5)])
    with pytest.raises(ValueError, match=r"\[whitened_errors\].*rank k"):  # checked before any work
        _native.whitened_errors_layers([W, W], [S, S], [grid(9, 5), np.array([[6, 1]])])
    with pytest.raises(ValueError, match="num_threads"):
        _native.whitened_errors_layers([W], [S], [grid(9, 5)], num_threads=-1)
    bad = S.copy()
    bad[2, 2] = 0.0
    with pytest.raises(ValueError, match="positive finite diagonal"):
        _native.whitened_errors_layers([W, W], [S, bad], [grid(9, 5), grid(9, 5)])
