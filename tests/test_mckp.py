"""The MCKP solver against brute force, scipy's MILP/LP solvers and a NumPy bucket DP."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_matrix

import rocketkit
from rocketkit import _C


def random_instance(rng, layers, cands, max_params=10**6, unique=False):
    """Per layer: errors in [0, 1) and integer params in [0, max_params)."""
    errors, params = [], []
    for _ in range(layers):
        k = int(rng.integers(1, cands + 1)) if not unique else cands
        errors.append(rng.random(k))
        params.append(rng.choice(max_params, k, replace=False) if unique else rng.integers(0, max_params, k))
    return errors, params


def bounds(params):
    return sum(int(p.min()) for p in params), sum(int(p.max()) for p in params)


def brute_force(errors, params, budget):
    best = math.inf
    for ch in itertools.product(*[range(len(e)) for e in errors]):
        if sum(int(params[l][c]) for l, c in enumerate(ch)) <= budget:
            best = min(best, sum(float(errors[l][c]) for l, c in enumerate(ch)))
    return best


def milp_optimum(errors, params, budget):
    """Exact integer optimum by HiGHS (one binary per candidate)."""
    n = sum(len(e) for e in errors)
    rows, cols = [], []
    j = 0
    for l, e in enumerate(errors):
        rows += [l] * len(e)
        cols += list(range(j, j + len(e)))
        j += len(e)
    one_each = coo_matrix((np.ones(n), (rows, cols)), shape=(len(errors), n))
    cons = [LinearConstraint(one_each, 1, 1),
            LinearConstraint(np.concatenate(params)[None, :].astype(float), -np.inf, budget)]
    res = milp(np.concatenate(errors), constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0})
    assert res.success, res.message
    return res.fun


def lp_optimum(errors, params, budget):
    """LP relaxation optimum by HiGHS: the bound solve_mckp reports."""
    n = sum(len(e) for e in errors)
    a_eq = np.zeros((len(errors), n))
    j = 0
    for l, e in enumerate(errors):
        a_eq[l, j:j + len(e)] = 1
        j += len(e)
    res = linprog(np.concatenate(errors), A_ub=np.concatenate(params)[None, :].astype(float), b_ub=[budget],
                  A_eq=a_eq, b_eq=np.ones(len(errors)), bounds=(0, 1), method="highs")
    assert res.success, res.message
    return res.fun


def numpy_bucket_dp(errors, params, budget, buckets):
    """Reference on the solver's grid: slack cut into `buckets`, costs rounded up (exact ints)."""
    mins = [int(p.min()) for p in params]
    slack = budget - sum(mins)
    row = np.zeros(buckets + 1)
    for e, p, m in zip(errors, params, mins):
        new = np.full(buckets + 1, np.inf)
        for ec, pc in zip(e, p):
            d = int(pc) - m
            w = (0 if d == 0 else buckets + 1) if slack == 0 else -(-d * buckets // slack)
            if w <= buckets:
                new[w:] = np.minimum(new[w:], row[:buckets + 1 - w] + float(ec))
        row = new
    return row


def check_solution(sol, errors, params, budget, buckets):
    """Invariants every answer must satisfy."""
    assert len(sol.choice) == len(errors)
    chosen_p = sum(int(params[l][c]) for l, c in enumerate(sol.choice))
    chosen_e = sum(float(errors[l][c]) for l, c in enumerate(sol.choice))
    assert sol.params == chosen_p <= budget
    assert sol.error == pytest.approx(chosen_e, rel=1e-12, abs=1e-15)
    assert sol.lower_bound <= sol.error
    assert sol.curve.shape == (buckets + 1,)
    assert np.all(np.diff(sol.curve) <= 0)
    assert sol.curve[-1] == sol.error
    assert sol.min_params == bounds(params)[0]
    assert sol.bucket_width == pytest.approx((budget - sol.min_params) / buckets)


def test_brute_force_tiny():
    rng = np.random.default_rng(1)
    for _ in range(300):
        errors, params = random_instance(rng, int(rng.integers(1, 6)), 4, max_params=23)
        lo, hi = bounds(params)
        budget = int(rng.integers(lo, hi + 3))
        buckets = max(budget - lo, 1)  # one bucket per parameter: rounding cannot matter
        sol = rocketkit.solve_mckp(errors, params, budget, buckets)
        check_solution(sol, errors, params, budget, buckets)
        assert sol.error == pytest.approx(brute_force(errors, params, budget), abs=1e-12)


def test_milp_exact_grid():
    """Params on the bucket grid: discretization is exact, so the DP is the true optimum."""
    rng = np.random.default_rng(2)
    width = 997
    for _ in range(4):
        errors, units = random_instance(rng, 30, 8, max_params=80)
        params = [u * width + int(rng.integers(0, 10**6)) * width for u in units]
        lo, hi = bounds(params)
        buckets = (hi - lo) // width // 2 + int(rng.integers(-50, 50))
        budget = lo + buckets * width
        sol = rocketkit.solve_mckp(errors, params, budget, buckets)
        check_solution(sol, errors, params, budget, buckets)
        assert sol.error == pytest.approx(milp_optimum(errors, params, budget), abs=1e-9)


def test_milp_sandwich_general_params():
    """OPT(budget) ≤ DP ≤ OPT(budget − n·Δ) when costs are rounded up."""
    rng = np.random.default_rng(3)
    for buckets in (53, 500):
        errors, params = random_instance(rng, 30, 8, max_params=10**7)
        lo, hi = bounds(params)
        budget = (lo + hi) // 2
        sol = rocketkit.solve_mckp(errors, params, budget, buckets)
        check_solution(sol, errors, params, budget, buckets)
        tight = math.floor(budget - len(errors) * sol.bucket_width)
        assert milp_optimum(errors, params, budget) <= sol.error + 1e-9
        assert sol.error <= milp_optimum(errors, params, tight) + 1e-9


def test_never_over_budget_and_matches_numpy_dp():
    rng = np.random.default_rng(4)
    for trial in range(150):
        errors, params = random_instance(rng, int(rng.integers(1, 12)), 9, max_params=int(rng.choice([50, 10**9, 2**40])))
        lo, hi = bounds(params)
        budget = int(rng.integers(lo, hi + 1))
        buckets = int(rng.choice([1, 2, 7, 37, 1000, 2500]))
        sol = rocketkit.solve_mckp(errors, params, budget, buckets)
        check_solution(sol, errors, params, budget, buckets)
        np.testing.assert_array_equal(sol.curve, numpy_bucket_dp(errors, params, budget, buckets))


def test_lower_bound_is_lp_relaxation():
    rng = np.random.default_rng(5)
    for _ in range(10):
        errors, params = random_instance(rng, 19, 7, max_params=10**8)
        lo, hi = bounds(params)
        budget = int(rng.integers(lo, hi + 1))
        sol = rocketkit.solve_mckp(errors, params, budget, 1000)
        assert sol.lower_bound <= sol.error
        assert sol.lower_bound == pytest.approx(lp_optimum(errors, params, budget), rel=1e-9, abs=1e-12)


def test_infeasible_budget_names_smallest_feasible():
    errors = [np.array([0.1, 0.2]), np.array([0.3])]
    params = [np.array([40, 30]), np.array([17])]
    with pytest.raises(ValueError, match=r"\[solve_mckp\] budget 46 is infeasible: the smallest feasible budget is 47"):
        rocketkit.solve_mckp(errors, params, 46)
    sol = rocketkit.solve_mckp(errors, params, 47, buckets=5)  # zero slack: everything in bucket 0
    assert list(sol.choice) == [1, 0] and sol.params == 47 and sol.bucket_width == 0
    assert np.all(sol.curve == sol.error)


def test_generous_budget_takes_least_error():
    rng = np.random.default_rng(6)
    errors, params = random_instance(rng, 13, 6)
    sol = rocketkit.solve_mckp(errors, params, bounds(params)[1] + 5, buckets=101)
    assert sol.error == pytest.approx(sum(e.min() for e in errors), abs=1e-12)
    assert sol.lower_bound == pytest.approx(sol.error, abs=1e-12)


@pytest.mark.parametrize("cands, buckets", [(9, 5003), (300, 30011)])  # uint8 and uint16 back-pointers
def test_thread_count_does_not_change_results(cands, buckets):
    rng = np.random.default_rng(7)
    errors, params = random_instance(rng, 23, cands, max_params=10**6, unique=True)
    # Coarse errors create many ties between candidates and between buckets.
    errors = [np.round(np.sort(e)[::-1] * 8) / 8 + l for l, e in enumerate(errors)]
    params = [np.sort(p) for p in params]
    lo, hi = bounds(params)
    budget = (lo + hi) // 2
    if cands > 256:  # some layer keeps more than 256 distinct bucket costs
        assert max(len(np.unique(-(-(p - p.min()) * buckets // (budget - lo)))) for p in params) > 256
    sols = [rocketkit.solve_mckp(errors, params, budget, buckets, num_threads=t) for t in (1, 2, 3)]
    for s in sols[1:]:
        np.testing.assert_array_equal(s.choice, sols[0].choice)
        np.testing.assert_array_equal(s.curve, sols[0].curve)
        assert s.error == sols[0].error
    check_solution(sols[0], errors, params, budget, buckets)
    np.testing.assert_array_equal(sols[0].curve, numpy_bucket_dp(errors, params, budget, buckets))


def test_ties_go_to_lower_index():
    errors = [np.array([0.5, 0.5, 0.5]), np.array([0.25, 0.25])]
    params = [np.array([10, 10, 10]), np.array([3, 3])]
    sol = rocketkit.solve_mckp(errors, params, 13, buckets=4)
    assert list(sol.choice) == [0, 0]
    assert sol.kept_candidates == 2


def test_dominance_pruning_preserves_optimum():
    rng = np.random.default_rng(8)
    errors, params = random_instance(rng, 17, 6, max_params=10**6)
    lo, hi = bounds(params)
    budget = (lo + hi) // 2
    base = rocketkit.solve_mckp(errors, params, budget, 4000)
    # Append dominated copies: more params and more error than an existing candidate.
    more_e = [np.concatenate([e, e + rng.random(len(e)) + 1e-3, e]) for e in errors]
    more_p = [np.concatenate([p, p + rng.integers(0, 100, len(p)), p + 1]) for p in params]
    sol = rocketkit.solve_mckp(more_e, more_p, budget, 4000)
    assert sol.error == base.error
    assert sol.kept_candidates == base.kept_candidates
    assert all(c < len(e) for c, e in zip(sol.choice, errors))
    np.testing.assert_array_equal(sol.curve, base.curve)
    front = sum(int(not np.any((p <= pc) & (e <= ec) & ((p < pc) | (e < ec))))
                for p, e in zip(params, errors) for pc, ec in zip(p, e))
    assert base.kept_candidates == front


def test_many_candidates_in_one_layer():
    n = 70000  # all on the Pareto front, more than uint16 back-pointers can index
    params = [np.arange(n), np.array([0, 1])]
    errors = [np.linspace(1, 0, n), np.array([1.0, 0.0])]
    with pytest.raises(ValueError, match="at most 65536"):
        rocketkit.solve_mckp(errors, params, n + 1, buckets=n + 1)
    sol = rocketkit.solve_mckp(errors, params, n + 1, buckets=1000)  # coarse grid prunes enough
    assert sol.params <= n + 1 and sol.kept_candidates == n + 2


@pytest.mark.parametrize("errors, params, budget, buckets, threads, match", [
    ([[0.1, np.nan]], [[1, 2]], 5, 10, 0, "finite"),
    ([[0.1, np.inf]], [[1, 2]], 5, 10, 0, "finite"),
    ([[0.1, -1e-3]], [[1, 2]], 5, 10, 0, "non-negative"),
    ([[0.1, 0.2]], [[1, -2]], 5, 10, 0, "params must be non-negative"),
    ([[0.1, 0.2]], [[1.0, 2.0]], 5, 10, 0, "params must be integers"),
    ([[0.1, 0.2], []], [[1, 2], []], 5, 10, 0, "no candidates"),
    ([[0.1, 0.2]], [[1, 2, 3]], 5, 10, 0, "equal-length"),
    ([[0.1]], [[1], [2]], 5, 10, 0, "layers"),
    ([], [], 5, 10, 0, "no layers"),
    ([[0.1]], [[1]], 5, 0, 0, "buckets"),
    ([[0.1]], [[1]], 5, 2**40, 0, "buckets"),
    ([[0.1]] * 10**5, [[1]] * 10**5, 10**6, 2**31 - 2, 0, "memory"),
    ([[0.1]], [[1]], -1, 10, 0, "budget"),
    ([[0.1]], [[1]], 2**63, 10, 0, "budget"),
    ([[0.1]], [[1]], math.nan, 10, 0, "budget"),
    ([[0.1]], [[1]], "5", 10, 0, "budget"),
    ([[0.1]], [[1]], 5, 10, -1, "num_threads"),
    ([[0.1], [0.2]], [[2**62], [2**62]], 2**63 - 1, 10, 0, "overflows int64"),
    ([[0.1 + 1j]], [[1]], 5, 10, 0, "real numbers"),
    ([[0.1]], [np.array([2**63], dtype=np.uint64)], 5, 10, 0, "exceed int64"),
])
def test_bad_input(errors, params, budget, buckets, threads, match):
    with pytest.raises(ValueError, match=r"\[solve_mckp\].*" + match):
        rocketkit.solve_mckp(errors, params, budget, buckets, num_threads=threads)


@pytest.mark.parametrize("offsets, n, match", [
    ([1, 2], 2, r"offsets\[0\] must be 0"),
    ([0, 2, 1], 1, "has no candidates"),
    ([0, 1, 1], 1, "has no candidates"),
    ([0, 2], 1, "entries"),
    ([0], 0, "entries"),
])
def test_core_checks_offsets(offsets, n, match):
    errors, params = np.full(n, 0.1), np.ones(n, dtype=np.int64)
    with pytest.raises(ValueError, match=r"\[solve_mckp\] .*" + match):
        _C.solve_mckp(errors, params, np.array(offsets, dtype=np.int64), 5, 10, 0)


def test_float_budget_is_floored():
    sol = rocketkit.solve_mckp([[1.0, 0.0]], [[0, 10]], 9.99, buckets=10)
    assert sol.params == 0
    assert rocketkit.solve_mckp([[1.0, 0.0]], [[0, 10]], 10.0, buckets=10).params == 10


@pytest.mark.requires_cuda
def test_cuda_matches_cpu():
    if not rocketkit.has_cuda():
        pytest.skip("no CUDA build or no GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    rng = np.random.default_rng(9)
    for layers, cands, buckets in [(1, 1, 1), (7, 3, 37), (37, 19, 5003), (53, 300, 20011)]:
        errors, params = random_instance(rng, layers, cands, max_params=10**8, unique=cands > 1)
        errors = [np.round(e * 64) / 64 for e in errors]  # ties
        lo, hi = bounds(params)
        budget = (lo + hi) // 2
        cpu = rocketkit.solve_mckp(errors, params, budget, buckets)
        sizes = [len(e) for e in errors]
        offsets = np.zeros(layers + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        e_dev = torch.tensor(np.concatenate(errors), dtype=torch.float64, device="cuda")
        p_dev = torch.tensor(np.concatenate(params), dtype=torch.int64, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        gpu = _C.solve_mckp_cuda(e_dev.data_ptr(), p_dev.data_ptr(), offsets, budget, buckets, stream)
        np.testing.assert_array_equal(gpu["choice"], cpu.choice)
        np.testing.assert_array_equal(gpu["curve"], cpu.curve)
        assert gpu["error"] == cpu.error and gpu["params"] == cpu.params
        assert gpu["lower_bound"] == cpu.lower_bound
        assert gpu["kept_candidates"] == cpu.kept_candidates


def test_cuda_solver_unavailable_fails_clearly():
    if rocketkit.has_cuda():
        pytest.skip("a GPU is visible")
    errors, params = np.array([0.5, 0.0]), np.array([0, 10], dtype=np.int64)
    with pytest.raises(RuntimeError, match=r"\[solve_mckp\] .*(no CUDA device|without CUDA)"):
        _C.solve_mckp_cuda(errors.ctypes.data, params.ctypes.data, np.array([0, 2], dtype=np.int64), 10, 10, 0)
