"""The CUDA backend against the CPU core: whitened errors, the MCKP DP and the factorized forward.

Every test that needs a GPU is marked ``requires_cuda`` and skips without a CUDA build, a
visible GPU or torch's CUDA; the last tests check that the CUDA entry points fail with a clear
error (and touch no pointer) on a machine without one. ``scripts/gpu_check.sh`` runs this file
on a GPU machine, also under compute-sanitizer.
"""

import numpy as np
import pytest
import scipy.linalg as sla

import rocketkit
from rocketkit import _C, _native

torch = pytest.importorskip("torch")

GPU = rocketkit.has_cuda() and torch.cuda.is_available()
needs_gpu = [pytest.mark.requires_cuda,
             pytest.mark.skipif(not GPU, reason="needs a CUDA build of rocketkit and a visible GPU")]


def gpu(*marks):
    """Decorator: requires_cuda plus a clean skip without a GPU."""
    def wrap(f):
        for m in reversed(needs_gpu + list(marks)):
            f = m(f)
        return f
    return wrap


# ---- data ----------------------------------------------------------------------------------------
def random_S(rng, d1, outliers=0, scale=1.0):
    """Upper Cholesky factor of XᵀX for correlated activations, optional outlier channels."""
    X = rng.standard_normal((3 * d1 + 5, d1)) @ (np.eye(d1) + 0.3 * rng.standard_normal((d1, d1)) / np.sqrt(d1))
    if outliers:
        X[:, rng.choice(d1, min(outliers, d1), replace=False)] *= scale
    return np.linalg.cholesky(X.T @ X).T


def random_W(rng, d1, d2, decay=0.05):
    r = min(d1, d2)
    Q1, _ = np.linalg.qr(rng.standard_normal((d1, r)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d2, r)))
    return (Q1 * np.exp(-decay * np.arange(r))) @ Q2.T + 1e-3 * rng.standard_normal((d1, d2))


def cuda(a, dtype=torch.float64):
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device="cuda")


def errors_both(W, S, cands, **kw):
    cw, co = _native.whitened_errors(W, S, cands)
    gw, go = _native.whitened_errors_cuda(cuda(W), cuda(S), cands, **kw)
    return cw, co, gw.cpu().numpy(), go.cpu().numpy()


def assert_errors_close(cpu, gpu_, atol=1e-9):
    """|e_gpu − e_cpu| ≤ atol, except where both are at the trace identity's noise floor:
    e = √max(0, 1 − captured) carries √(rounding) ≈ 1e-8 when the true error is ~0."""
    cpu, gpu_ = np.asarray(cpu), np.asarray(gpu_)
    floor = (cpu ** 2 < 1e-14) & (gpu_ ** 2 < 1e-14)
    bad = (np.abs(cpu - gpu_) > atol) & ~floor
    assert not bad.any(), f"{bad.sum()} errors differ: max {np.abs(cpu - gpu_)[bad].max():.3e}"


def small_grid(d1, d2):
    r = min(d1, d2)
    c = {(1, 1), (r, r), (r, 1), (max(1, r // 2), max(1, r // 4)), (max(1, r // 3), max(1, r // 3))}
    for k in range(1, r + 1, max(1, r // 7)):
        c |= {(k, 1), (k, max(1, k // 2)), (k, k)}
    return np.array(sorted(c), dtype=np.int64)


# ---- whitened errors -------------------------------------------------------------------------------
@gpu(pytest.mark.parametrize("d1,d2", [(37, 53), (53, 37), (1, 7), (7, 1), (19, 19), (64, 17), (17, 64), (2, 2)]))
def test_errors_match_cpu_odd_shapes(d1, d2):
    rng = np.random.default_rng(1000 * d1 + d2)
    W, S = random_W(rng, d1, d2), random_S(rng, d1, outliers=2, scale=30.0)
    S[np.tril_indices(d1, -1)] = rng.standard_normal(d1 * (d1 - 1) // 2)  # lower triangle ignored
    cw, co, gw, go = errors_both(W, S, small_grid(d1, d2))
    assert_errors_close(cw, gw)
    assert_errors_close(co, go)


@gpu(pytest.mark.parametrize("d1,d2", [(23, 31), (31, 23)]))
def test_errors_every_candidate(d1, d2):
    rng = np.random.default_rng(7 + d1)
    W, S = random_W(rng, d1, d2, decay=0.1), random_S(rng, d1)
    r = min(d1, d2)
    cands = np.array([(k, s) for k in range(1, r + 1) for s in range(1, k + 1)], dtype=np.int64)
    cw, co, gw, go = errors_both(W, S, cands)
    assert_errors_close(cw, gw)
    assert_errors_close(co, go)


@gpu(pytest.mark.parametrize("d1,d2", [(96, 160), (160, 96), (128, 128)]))
def test_errors_default_grid(d1, d2):
    from rocketkit.profile import candidate_grid

    rng = np.random.default_rng(d1 * d2)
    W, S = random_W(rng, d1, d2, decay=0.02), random_S(rng, d1, outliers=4, scale=40.0)
    g = candidate_grid(d1, d2)
    cands = np.stack([g.k, g.s], axis=1).astype(np.int64)
    assert len(cands) > 200
    cw, co, gw, go = errors_both(W, S, cands)
    assert_errors_close(cw, gw)
    assert_errors_close(co, go)


@gpu()
def test_ridge_candidates_match_cpu():
    # With s = 1, atom 1 of k = 2 is never the largest entry of any column: G is singular.
    rng = np.random.default_rng(3)
    d1, d2 = 5, 9
    S = random_S(rng, d1)
    Q1, _ = np.linalg.qr(rng.standard_normal((d1, 2)))
    v0 = np.ones(d2) / 3.0
    v1 = np.zeros(d2)
    v1[:2] = [1, -1]
    v1 /= np.linalg.norm(v1)
    WL = Q1 @ np.diag([10.0, 1.0]) @ np.vstack([v0, v1]) + 1e-2 * rng.standard_normal((d1, d2))
    W = sla.solve_triangular(S, WL, lower=False)
    cands = np.array([[2, 1], [2, 2], [1, 1], [3, 1]], dtype=np.int64)
    cw, co, gw, go, = errors_both(W, S, cands)
    _, _, stats = _native.whitened_errors_cuda(cuda(W), cuda(S), cands, return_stats=True)
    assert stats["ridge_reruns"] >= 1
    assert_errors_close(cw, gw)
    assert_errors_close(co, go)


@gpu()
def test_rank_deficient_layer():
    rng = np.random.default_rng(5)
    W = random_W(rng, 30, 40)
    W[:, :5] = 0
    W[3] = 0
    S = random_S(rng, 30)
    cands = np.array([(k, s) for k in range(1, 20) for s in sorted({1, max(1, k // 2), k})], dtype=np.int64)
    cw, co, gw, go = errors_both(W, S, cands)
    assert_errors_close(cw, gw)
    assert_errors_close(co, go)


@gpu(pytest.mark.parametrize("w_exp,s_exp", [(80, 0), (-90, 0), (0, 70), (0, -75), (100, -100)]))
def test_extreme_scales_are_rescaled(w_exp, s_exp):
    rng = np.random.default_rng(11)
    W, S = random_W(rng, 20, 28), random_S(rng, 20)
    cands = small_grid(20, 28)
    base_w, base_o = _native.whitened_errors(W, S, cands)
    gw, go = _native.whitened_errors_cuda(cuda(np.ldexp(W, w_exp)), cuda(np.ldexp(S, s_exp)), cands)
    assert_errors_close(base_w, gw.cpu().numpy())
    assert_errors_close(base_o, go.cpu().numpy())


@gpu(pytest.mark.parametrize("svd", ["auto", "gesvd", "gesvdp"]))
def test_svd_drivers_agree(svd):
    rng = np.random.default_rng(21)
    W, S = random_W(rng, 48, 72), random_S(rng, 48, outliers=3, scale=100.0)
    cands = small_grid(48, 72)
    cw, co = _native.whitened_errors(W, S, cands)
    gw, go, stats = _native.whitened_errors_cuda(cuda(W), cuda(S), cands, svd=svd, return_stats=True)
    assert stats["svd"] in ("gesvd", "gesvdp")
    if svd != "auto":
        assert stats["svd"] == svd
    assert_errors_close(cw, gw.cpu().numpy())
    assert_errors_close(co, go.cpu().numpy())


@gpu()
def test_streams_and_repeats_are_reproducible():
    rng = np.random.default_rng(8)
    W, S = cuda(random_W(rng, 40, 56)), cuda(random_S(rng, 40))
    cands = small_grid(40, 56)
    a = _native.whitened_errors_cuda(W, S, cands, max_streams=1)
    b = _native.whitened_errors_cuda(W, S, cands, max_streams=4)
    c = _native.whitened_errors_cuda(W, S, cands, max_streams=4)
    for x, y in ((a, b), (b, c)):
        torch.testing.assert_close(x[0], y[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=1e-13)


@gpu()
def test_dispatch_and_side_stream():
    rng = np.random.default_rng(9)
    W, S = random_W(rng, 24, 36), random_S(rng, 24)
    cands = small_grid(24, 36)
    cw, co = rocketkit.whitened_errors(W, S, cands)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        Wd, Sd = cuda(W), cuda(S)  # produced on the side stream, consumed there
        gw, go = rocketkit.whitened_errors(Wd, Sd, torch.as_tensor(cands))
    side.synchronize()
    assert gw.is_cuda and gw.dtype == torch.float64 and gw.shape == (len(cands),)
    assert_errors_close(cw, gw.cpu().numpy())
    assert_errors_close(co, go.cpu().numpy())


@gpu()
def test_zero_layer_and_empty_candidates():
    W, S = torch.zeros(6, 9, dtype=torch.float64, device="cuda"), cuda(np.eye(6))
    gw, go = _native.whitened_errors_cuda(W, S, np.array([[2, 1], [3, 3]], dtype=np.int64))
    assert gw.cpu().tolist() == [0.0, 0.0] and go.cpu().tolist() == [0.0, 0.0]
    gw, go = _native.whitened_errors_cuda(cuda(np.ones((6, 9))), S, np.zeros((0, 2), dtype=np.int64))
    assert gw.numel() == 0 and go.numel() == 0


@gpu()
def test_bad_inputs_raise_value_errors():
    rng = np.random.default_rng(2)
    W, S = random_W(rng, 6, 8), random_S(rng, 6)
    cands = np.array([[2, 1]], dtype=np.int64)
    Wbad = W.copy()
    Wbad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"\[whitened_errors\] W has a non-finite entry at \(2, 5\)"):
        _native.whitened_errors_cuda(cuda(Wbad), cuda(S), cands)
    Sbad = S.copy()
    Sbad[3, 3] = -1.0
    with pytest.raises(ValueError, match=r"\[whitened_errors\] S must have a positive finite diagonal, S\[3, 3\]"):
        _native.whitened_errors_cuda(cuda(W), cuda(Sbad), cands)
    Sbad = S.copy()
    Sbad[1, 4] = np.inf
    with pytest.raises(ValueError, match=r"\[whitened_errors\] S has a non-finite entry at \(1, 4\)"):
        _native.whitened_errors_cuda(cuda(W), cuda(Sbad), cands)
    Sbad = S.copy()
    Sbad[4, 1] = np.nan  # lower triangle: ignored
    _native.whitened_errors_cuda(cuda(W), cuda(Sbad), cands)
    with pytest.raises(ValueError, match=r"\[whitened_errors\] candidate 0: rank k = 7"):
        _native.whitened_errors_cuda(cuda(W), cuda(S), np.array([[7, 1]], dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[whitened_errors\] .*float64"):
        _native.whitened_errors_cuda(cuda(W, torch.float32), cuda(S), cands)
    with pytest.raises(ValueError, match=r"\[whitened_errors\] S must be a CUDA tensor"):
        _native.whitened_errors_cuda(cuda(W), S, cands)
    with pytest.raises(ValueError, match=r"\[whitened_errors\] svd must be"):
        _native.whitened_errors_cuda(cuda(W), cuda(S), cands, svd="jacobi")
    with pytest.raises(ValueError, match=r"\[whitened_errors\] W must be GPU memory"):
        _C.whitened_errors_cuda(W.ctypes.data, S.ctypes.data, 6, 8, cands, W.ctypes.data, W.ctypes.data, 0)


# ---- MCKP ------------------------------------------------------------------------------------------
def random_mckp(rng, layers, cands, ties):
    errors, params = [], []
    for _ in range(layers):
        p = rng.choice(10**8, cands, replace=False).astype(np.int64)
        e = rng.random(cands)
        if ties:
            e = np.round(e * 64) / 64
        errors.append(e)
        params.append(p)
    return errors, params


@gpu(pytest.mark.parametrize("layers,cands,buckets,ties", [(1, 1, 1, False), (7, 3, 37, True), (37, 19, 5003, True),
                                                           (53, 300, 20011, False), (112, 295, 50000, True)]))
def test_mckp_matches_cpu(layers, cands, buckets, ties):
    rng = np.random.default_rng(layers * 1000 + cands)
    errors, params = random_mckp(rng, layers, cands, ties)
    lo = sum(int(p.min()) for p in params)
    hi = sum(int(p.max()) for p in params)
    budget = (lo + hi) // 2
    cpu = rocketkit.solve_mckp(errors, params, budget, buckets)
    sol, ms = _native.solve_mckp_cuda([cuda(e) for e in errors], [cuda(p, torch.int64) for p in params],
                                      budget, buckets, return_gpu_ms=True)
    assert ms >= 0
    np.testing.assert_array_equal(sol.choice, cpu.choice)
    np.testing.assert_array_equal(sol.curve, cpu.curve)
    assert sol.error == cpu.error and sol.params == cpu.params <= budget
    assert sol.lower_bound == cpu.lower_bound and sol.kept_candidates == cpu.kept_candidates
    # the public call dispatches on the tensors' device
    again = rocketkit.solve_mckp([cuda(e) for e in errors], [cuda(p, torch.int32) for p in params], budget, buckets)
    assert again.error == cpu.error and np.array_equal(again.choice, cpu.choice)


@gpu()
def test_mckp_bad_inputs():
    e, p = [cuda(np.array([0.5, 0.0]))], [cuda(np.array([0, 10]), torch.int64)]
    with pytest.raises(ValueError, match=r"\[solve_mckp\] budget -1 is infeasible|\[solve_mckp\] budget must"):
        _native.solve_mckp_cuda(e, p, -1, 10)
    with pytest.raises(ValueError, match=r"\[solve_mckp\] errors must be finite"):
        _native.solve_mckp_cuda([cuda(np.array([np.nan, 0.0]))], p, 10, 10)
    with pytest.raises(ValueError, match=r"\[solve_mckp\] layer 0: params must be a CUDA tensor"):
        _native.solve_mckp_cuda(e, [np.array([0, 10])], 10, 10)


# ---- factorized forward ------------------------------------------------------------------------------
def sparse_reference(z, values, indices, bias):
    """y[i, j] = Σ_t z[i, idx[t, j]]·val[t, j] (+ bias), fp32 sums."""
    g = z.float()[:, indices.long()]  # n × s × d2
    y = (g * values.float()[None]).sum(dim=1)
    if bias is not None:
        y = y + bias.float()
    return y


@gpu(pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16]),
     pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32]),
     pytest.mark.parametrize("n", [0, 1, 3, 17]),
     pytest.mark.parametrize("with_bias", [False, True]))
def test_column_sparse_matmul_matches_torch(dtype, index_dtype, n, with_bias):
    g = torch.Generator(device="cpu").manual_seed(n * 7 + int(with_bias))
    d1, k, s, d2 = 40, 24, 5, 300
    x = torch.randn(n, d1, generator=g).to("cuda", dtype)
    U = (torch.randn(d1, k, generator=g) / d1 ** 0.5).to("cuda", dtype)
    values = torch.randn(s, d2, generator=g).to("cuda", dtype)
    indices = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(d2)], 1)
    indices = indices.to("cuda", index_dtype)
    bias = torch.randn(d2, generator=g).to("cuda", dtype) if with_bias else None
    y = _native.factorized_matmul_cuda(x, U, values, indices, bias)
    assert y.shape == (n, d2) and y.dtype == dtype and y.is_cuda
    z = x @ U
    ref = sparse_reference(z, values, indices, bias)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    if n:  # batched leading dimensions
        y3 = _native.factorized_matmul_cuda(x.reshape(n, 1, d1), U, values, indices, bias)
        torch.testing.assert_close(y3.reshape(n, d2), y, rtol=0, atol=0)


@gpu()
def test_column_sparse_matmul_bad_index():
    z = torch.randn(2, 8, device="cuda")
    values = torch.randn(2, 5, device="cuda")
    indices = torch.zeros(2, 5, dtype=torch.int32, device="cuda")
    indices[1, 3] = 8
    with pytest.raises(ValueError, match=r"\[factorized_matmul\] an index of C is outside \[0, k = 8\)"):
        _native.column_sparse_matmul_cuda(z, values, indices)
    y = _native.column_sparse_matmul_cuda(z, values, indices, check_indices=False)  # skipped, not read
    torch.testing.assert_close(y[:, 3], z[:, 0] * values[0, 3])
    indices[1, 3] = -1
    with pytest.raises(ValueError, match=r"outside"):
        _native.column_sparse_matmul_cuda(z, values, indices.to(torch.int16))
    with pytest.raises(ValueError, match=r"\[factorized_matmul\] values must be"):
        _native.column_sparse_matmul_cuda(z, values.double(), indices)


# ---- without a GPU -------------------------------------------------------------------------------
@pytest.mark.skipif(rocketkit.has_cuda(), reason="a GPU is visible")
def test_cuda_entry_points_fail_clearly_without_gpu():
    cand = np.array([[1, 1]], dtype=np.int64)
    host = np.zeros(16)
    pattern = r"\[{}\] .*(no CUDA device is visible|built without CUDA)"
    with pytest.raises(RuntimeError, match=pattern.format("whitened_errors")):
        _C.whitened_errors_cuda(host.ctypes.data, host.ctypes.data, 2, 2, cand, host.ctypes.data, host.ctypes.data, 0)
    with pytest.raises(RuntimeError, match=pattern.format("solve_mckp")):
        _C.solve_mckp_cuda(host.ctypes.data, host.ctypes.data, np.array([0, 2], dtype=np.int64), 10, 10, 0)
    with pytest.raises(RuntimeError, match=pattern.format("factorized_matmul")):
        _C.column_sparse_matmul_cuda(host.ctypes.data, 1, 2, host.ctypes.data, host.ctypes.data, 4, 1, 2, 0,
                                     host.ctypes.data, 0, 0, 0)
    for fn in ("whitened_errors", "solve_mckp", "factorized_matmul"):
        with pytest.raises(RuntimeError, match=pattern.format(fn)):
            _native._prepare_cuda(fn, None)
    # the NumPy path is unaffected, CPU torch tensors included
    rng = np.random.default_rng(0)
    W, S = random_W(rng, 6, 8), random_S(rng, 6)
    a = _native.whitened_errors(W, S, cand)
    b = _native.whitened_errors(torch.from_numpy(W), torch.from_numpy(S), cand)
    np.testing.assert_array_equal(a[0], b[0])


def test_build_reports_cuda_consistently():
    info = rocketkit.build_info()
    assert isinstance(info["cuda_compiled"], bool)
    assert rocketkit.has_cuda() == (info["cuda_compiled"] and len(info["cuda_devices"]) > 0)
