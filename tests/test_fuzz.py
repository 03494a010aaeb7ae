"""Hostile inputs for every native entry point, through the public API and raw rocketkit._C.

The only acceptable outcomes are a valid result or ValueError / TypeError / RuntimeError
(with a "[function]" prefix on ValueError and RuntimeError): never a crash, a hang, another
exception type or a silently wrong answer. scripts/sanitize.sh runs this file under ASan and
UBSan, where an out-of-bounds read or undefined behaviour aborts the run.

Inputs start valid and are then mutated (dtype, layout, values, shape, type), so that both
the validation and the computing paths are exercised. Runs are derandomized; set
ROCKETKIT_FUZZ_EXAMPLES to change the number of examples per test.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rocketkit
from rocketkit import _C, _native

EXAMPLES = int(os.environ.get("ROCKETKIT_FUZZ_EXAMPLES", "150"))
settings.register_profile(
    "rocketkit-fuzz",
    derandomize=True,  # same examples on every run and every machine
    database=None,
    deadline=None,
    max_examples=EXAMPLES,
    suppress_health_check=list(HealthCheck),
)
FUZZ = settings.get_profile("rocketkit-fuzz")

ALLOWED = (ValueError, TypeError, RuntimeError)
INT64_MAX = 2**63 - 1


# ---- counting, reported at the end of the run ---------------------------------------------
class _FuzzReport:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.results: Counter[str] = Counter()  # calls that returned rather than raised

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.counts:
            detail = ", ".join(f"{k} {v}/{self.results[k]}" for k, v in sorted(self.counts.items()))
            terminalreporter.write_line(
                f"fuzz: {sum(self.counts.values())} examples across {len(self.counts)} entry points, "
                f"{sum(self.results.values())} returned a result (calls/results: {detail})")


_REPORT = _FuzzReport()


@pytest.fixture(scope="module", autouse=True)
def _fuzz_report(request):
    if not request.config.pluginmanager.is_registered(_REPORT):
        request.config.pluginmanager.register(_REPORT, "rocketkit-fuzz-report")
    yield


def call(entry: str, fn, *args):
    """Calls fn; returns its result, or None when it raised an allowed exception."""
    _REPORT.counts[entry] += 1
    name = entry.rsplit(".", 1)[-1].removesuffix("_cuda")
    try:
        out = fn(*args)
    except ALLOWED as e:
        if not isinstance(e, TypeError):
            assert str(e).startswith(f"[{name}"), f"{type(e).__name__} without a [{name}] prefix: {e}"
        return None
    _REPORT.results[entry] += 1
    return out


# ---- mutations --------------------------------------------------------------------------
FLOAT_SPECIALS = [np.nan, np.inf, -np.inf, 1e308, -1e308, 5e-324, -5e-324, 1e-310, -1.0, 0.0, -0.0, 1e154]
INT_SPECIALS = [-1, 0, -(2**63), INT64_MAX, 2**62, 2**31, -(2**31), 65537]
DTYPES = [np.float32, np.float16, np.int64, np.int32, np.uint64, np.uint8, np.bool_, np.complex128,
          np.longdouble, object]


def _unaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
    u = buf[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
    u[...] = a
    return u


def _strided(a: np.ndarray) -> np.ndarray:
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def _reversed(a: np.ndarray) -> np.ndarray:
    return a[::-1].copy()[::-1] if a.ndim else a


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


# Same shape and values, different memory layout: results must not change.
LAYOUTS = {"fortran": np.asfortranarray, "strided": _strided, "reversed": _reversed,
           "readonly": _readonly, "unaligned": _unaligned}


def _poke(a: np.ndarray, rng: np.random.Generator, value) -> np.ndarray:
    if a.size == 0:
        return a
    b = a.copy()
    try:
        b.flat[rng.integers(b.size)] = value
    except (ValueError, OverflowError, TypeError):  # the value does not fit the dtype
        return a
    return b


def _reshape(a: np.ndarray, how: str):
    if how == "scalar":
        return a.ravel()[:1].reshape(()) if a.size else np.float64(3.0)
    if how == "ravel":
        return a.ravel()
    if how == "add_axis":
        return a[None]
    if how == "transpose":
        return a.T
    if how == "drop_row":
        return a[:-1]
    if how == "add_row":
        return np.concatenate([a, a[:1]]) if a.ndim and a.shape[0] else a
    if how == "drop_col":
        return a[..., :-1] if a.ndim >= 2 else a[:-1]
    if how == "add_col":
        return np.concatenate([a, a[..., :1]], axis=-1) if a.ndim >= 2 and a.shape[-1] else a
    if how == "empty":
        return a[:0]
    raise AssertionError(how)


RESHAPES = ["scalar", "ravel", "add_axis", "transpose", "drop_row", "add_row", "drop_col", "add_col", "empty"]
NON_ARRAYS = [None, "W", 3, 2.5, [], [[1.0, 2.0], [3.0]], {"a": 1}, b"\x00" * 16]


@st.composite
def mutated(draw, a: np.ndarray, rng: np.random.Generator, integer: bool = False):
    """a, unchanged most of the time, else with one or two hostile changes."""
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        if not isinstance(a, np.ndarray):
            break
        kind = draw(st.sampled_from(["layout", "layout", "value", "value", "dtype", "shape", "type"]))
        with np.errstate(all="ignore"), warnings.catch_warnings(), contextlib.suppress(IndexError, ValueError, TypeError):
            # A mutation that does not apply to this array (a row of a 0-d array) leaves it as it is.
            warnings.simplefilter("ignore")  # lossy casts are the point here
            if kind == "layout":
                layout = draw(st.sampled_from(sorted(LAYOUTS)))
                a = LAYOUTS[layout](a) if a.dtype != object or layout != "unaligned" else a
            elif kind == "value":
                a = _poke(a, rng, draw(st.sampled_from(INT_SPECIALS if integer else FLOAT_SPECIALS)))
            elif kind == "dtype":
                dtype = draw(st.sampled_from(DTYPES))
                try:
                    a = a.astype(dtype)
                except (ValueError, OverflowError, TypeError):  # e.g. an object NaN to int
                    pass
            elif kind == "shape":
                a = _reshape(a, draw(st.sampled_from(RESHAPES)))
            else:
                i = draw(st.integers(0, len(NON_ARRAYS)))
                a = a.tolist() if i == len(NON_ARRAYS) else NON_ARRAYS[i]
    return a


@st.composite
def hostile_int(draw, valid: st.SearchStrategy[int]):
    """Mostly a valid integer argument, sometimes an edge case or not an integer at all."""
    kind = draw(st.sampled_from(["valid"] * 15 + ["special", "float", "other"]))
    if kind == "valid":
        return draw(valid)
    if kind == "special":
        return draw(st.sampled_from([0, -1, -(2**63), INT64_MAX, 2**63, 2**64, 2**100, -(2**100), 2**31, 2**32 + 1]))
    if kind == "float":
        return draw(st.sampled_from([np.nan, np.inf, -np.inf, 2.5, 3.0, 1e300, -0.0]))
    return draw(st.sampled_from([None, "3", True, np.int32(2), np.uint64(2**64 - 1), np.float32(2), [1]]))


def _upper_cholesky(d1: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    X = rng.standard_normal((max(d1 + 3, 2 * d1), d1))
    if kind == "ill":
        X *= np.logspace(0, 9, d1)
    H = X.T @ X
    S = np.linalg.cholesky(H).T.copy()
    if kind == "garbage_lower":
        S[np.tril_indices(d1, -1)] = rng.standard_normal(d1 * (d1 - 1) // 2) * 1e3
    if kind == "identity":
        S = np.eye(d1)
    return S


# ---- whitened_errors / factorize ------------------------------------------------------------
DIMS = st.sampled_from([3, 1, 2, 5, 7, 1, 0])


@st.composite
def layer_inputs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d1, d2 = draw(DIMS), draw(DIMS)
    w_kind = draw(st.sampled_from(["normal"] * 4 + ["zero", "rank1", "huge", "tiny"]))
    W = rng.standard_normal((d1, d2))
    if w_kind == "zero":
        W[:] = 0
    elif w_kind == "rank1" and W.size:
        W = np.outer(W[:, 0], W[0])
    elif w_kind == "huge":
        W *= 1e150
    elif w_kind == "tiny":
        W *= 1e-300
    S = _upper_cholesky(d1, rng, draw(st.sampled_from(["normal", "normal", "ill", "garbage_lower", "identity"])))
    W = draw(mutated(W, rng))
    S = draw(mutated(S, rng))
    return rng, d1, d2, W, S


def _rank_pairs(draw, rng, d1, d2, n):
    m = max(1, min(d1, d2))
    k = rng.integers(1, m + 1, n)
    s = np.minimum(rng.integers(1, m + 1, n), k)
    cand = np.stack([k, s], axis=1).astype(np.int64)
    if n and draw(st.integers(0, 2)) == 2:
        bad = draw(st.sampled_from([(m + 1, 1), (1, 2), (0, 0), (-1, 1), (2, 0), (INT64_MAX, 1), (-(2**63), -(2**63)),
                                    (m, m + 1), (2**32 + 1, 1)]))
        cand[rng.integers(n)] = bad
    return cand


def _check_errors(result, W, S, cand):
    # Accepting mismatched shapes means reading outside the arrays.
    d1, d2 = np.shape(W)
    assert np.shape(S) == (d1, d1) and np.ndim(cand) == 2 and np.shape(cand)[1] == 2
    n = len(cand)
    e_w, e_o = result
    assert e_w.shape == (n,) and e_o.shape == (n,)
    assert np.all(np.isfinite(e_w)) and np.all(np.isfinite(e_o)), (e_w, e_o)
    assert np.all(e_w >= 0) and np.all(e_o >= 0)
    assert np.all(e_o <= 1 + 1e-6), e_o  # least squares in the whitened space never does worse than Ŵ = 0


@FUZZ
@given(st.data())
def test_whitened_errors(data):
    rng, d1, d2, W, S = data.draw(layer_inputs())
    n = data.draw(st.sampled_from([2, 1, 5, 0]))
    cand = data.draw(mutated(_rank_pairs(data.draw, rng, d1, d2, n), rng, integer=True))
    threads = data.draw(st.sampled_from([0, 1, 2, 0, -1, 1000, 2**31 - 1]))
    raw = data.draw(st.booleans())
    if raw:
        out = call("_C.whitened_errors", _C.whitened_errors, W, S, cand, threads)
    else:
        out = call("whitened_errors", rocketkit.whitened_errors, W, S, cand, threads)
    if out is not None:
        _check_errors(out, W, S, cand)


def _check_factors(out, W, S, k, s):
    d1, d2 = np.shape(W)
    assert np.shape(S) == (d1, d1)
    U, values, indices, ridge = out
    assert U.shape == (d1, k) and values.shape == (s, d2) and indices.shape == (s, d2)
    assert np.all(np.isfinite(U)) and np.all(np.isfinite(values))
    assert np.isfinite(ridge) and ridge >= 0
    assert np.all((indices >= 0) & (indices < k))
    assert np.all(np.diff(indices, axis=0) > 0), "row indices must ascend within each column"


@FUZZ
@given(st.data())
def test_factorize(data):
    rng, d1, d2, W, S = data.draw(layer_inputs())
    m = max(1, min(d1, d2))
    k = data.draw(hostile_int(st.integers(1, m + 1)))
    s = data.draw(hostile_int(st.integers(1, m + 1)))
    raw = data.draw(st.booleans())
    if raw:
        out = call("_C.factorize", _C.factorize, W, S, k, s)
    else:
        out = call("factorize", rocketkit.factorize, W, S, k, s)
    if out is not None:
        _check_factors(out, W, S, int(k), int(s))


# ---- solve_mckp -------------------------------------------------------------------------------
@st.composite
def mckp_layers(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_layers = draw(st.sampled_from([2, 1, 3, 6, 1, 2, 3, 0]))
    errors, params = [], []
    for _ in range(num_layers):
        n = draw(st.sampled_from([3, 1, 2, 5, 8, 1, 2, 3, 8, 0]))
        errors.append(rng.random(n))
        params.append(rng.integers(0, draw(st.sampled_from([1, 10, 1000, 2**40])), n))
    scale = draw(st.sampled_from(["plain", "plain", "zero_err", "huge_params", "tiny_err"]))
    if scale == "zero_err":
        errors = [np.zeros_like(e) for e in errors]
    elif scale == "huge_params" and params:
        params[0] = params[0] + 2**62
    elif scale == "tiny_err":
        errors = [e * 5e-324 for e in errors]
    errors = [draw(mutated(e, rng)) for e in errors]
    params = [draw(mutated(p, rng, integer=True)) for p in params]
    return rng, errors, params


def _budget(draw, params):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lo = sum(int(np.min(p)) for p in params)
            hi = sum(int(np.max(p)) for p in params)
    except (TypeError, ValueError, OverflowError):  # mutated beyond recognition
        lo, hi = 0, 100
    valid = st.sampled_from([lo, hi, (lo + hi) // 2, lo + 1, max(lo - 1, 0), 10 * hi + 7])
    return draw(hostile_int(valid))


def _check_mckp(sol, errors, params, budget, buckets):
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    params = [np.asarray(p).astype(np.int64) for p in params]
    choice = np.asarray(sol.choice)
    assert choice.shape == (len(errors),)
    assert all(0 <= c < len(e) for c, e in zip(choice, errors))
    used = sum(int(p[c]) for p, c in zip(params, choice))
    assert sol.params == used <= int(budget)
    err = sum(float(e[c]) for e, c in zip(errors, choice))
    assert np.isclose(sol.error, err, rtol=1e-12, atol=0)
    assert np.isfinite(sol.lower_bound) and sol.lower_bound <= sol.error * (1 + 1e-9) + 1e-300
    assert sol.min_params == sum(int(p.min()) for p in params)
    curve = np.asarray(sol.curve)
    assert curve.shape == (int(buckets) + 1,) and np.all(np.isfinite(curve))
    assert np.all(np.diff(curve) <= 0)


@FUZZ
@given(st.data())
def test_solve_mckp(data):
    _, errors, params = data.draw(mckp_layers())
    if data.draw(st.integers(0, 9)) == 9:  # ragged: a layer more on one side
        params = params + [np.array([1])]
    budget = _budget(data.draw, params)
    buckets = data.draw(hostile_int(st.sampled_from([100, 1, 2, 3, 7, 1000, 4097])))
    threads = data.draw(hostile_int(st.sampled_from([0, 1, 2, 3])))
    sol = call("solve_mckp", rocketkit.solve_mckp, errors, params, budget, buckets, threads)
    if sol is not None:
        _check_mckp(sol, errors, params, budget, buckets)


@FUZZ
@given(st.data())
def test_solve_mckp_raw(data):
    rng, errors, params = data.draw(mckp_layers())
    ok = all(isinstance(e, np.ndarray) and e.ndim == 1 for e in errors + params)
    sizes = [len(e) for e in errors] if ok else [1]
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat_e = np.concatenate(errors) if ok and errors else np.zeros(0)
    flat_p = np.concatenate(params) if ok and params else np.zeros(0, np.int64)
    flat_e = data.draw(mutated(flat_e, rng))
    flat_p = data.draw(mutated(flat_p, rng, integer=True))
    offsets = data.draw(mutated(offsets, rng, integer=True))
    budget = data.draw(hostile_int(st.sampled_from([10**6, 100, INT64_MAX, 1, 0])))
    buckets = data.draw(hostile_int(st.sampled_from([100, 1, 2, 7, 1000])))
    threads = data.draw(hostile_int(st.sampled_from([0, 1, 2])))
    out = call("_C.solve_mckp", _C.solve_mckp, flat_e, flat_p, offsets, budget, buckets, threads)
    if out is not None:
        assert set(out) >= {"choice", "error", "params", "curve"}
        o = np.asarray(offsets, dtype=np.int64)
        e = np.asarray(flat_e, dtype=np.float64)
        p = np.asarray(flat_p).astype(np.int64)
        errs = [e[o[i]:o[i + 1]] for i in range(len(o) - 1)]
        pars = [p[o[i]:o[i + 1]] for i in range(len(o) - 1)]
        _check_mckp(rocketkit.MckpSolution(**out), errs, pars, budget, buckets)


# ---- the CUDA entry points, on machines without a GPU ---------------------------------------
@pytest.mark.skipif(rocketkit.has_cuda(), reason="raw device pointers cannot be fuzzed on a GPU")
@FUZZ
@given(st.data())
def test_cuda_entry_points_without_gpu(data):
    # Without a GPU no pointer may be dereferenced: every call must raise, whatever it gets.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ptr = data.draw(st.sampled_from([0, 8, 2**47]))
    d = data.draw(hostile_int(st.sampled_from([0, 1, 3])))
    cand = data.draw(mutated(np.array([[1, 1], [2, 1]], np.int64), rng, integer=True))
    offsets = data.draw(mutated(np.array([0, 2, 3], np.int64), rng, integer=True))
    if data.draw(st.booleans()):
        out = call("_C.whitened_errors_cuda", _C.whitened_errors_cuda, ptr, ptr, d, d, cand, ptr, ptr, 0)
    else:
        out = call("_C.solve_mckp_cuda", _C.solve_mckp_cuda, ptr, ptr, offsets, 10, 10, 0)
    assert out is None, "a CUDA entry point returned without a GPU"


# ---- layouts: same values, any memory layout, same answer ----------------------------------
def _outcome(entry, fn, *args):
    out = call(entry, fn, *args)
    if out is None:
        return None
    items = out.values() if isinstance(out, dict) else out
    return [np.asarray(v) for v in items]


def _layout_cases():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((7, 5))
    S = _upper_cholesky(7, rng, "normal")
    cand = np.array([[1, 1], [3, 2], [5, 5]], np.int64)
    e, p, o = rng.random(9), rng.integers(1, 50, 9), np.array([0, 4, 9], np.int64)
    return [
        ("whitened_errors", rocketkit.whitened_errors, (W, S, cand), (0, 1, 2)),
        ("_C.whitened_errors", _C.whitened_errors, (W, S, cand, 1), (0, 1, 2)),
        ("factorize", rocketkit.factorize, (W, S, 3, 2), (0, 1)),
        ("_C.factorize", _C.factorize, (W, S, 3, 2), (0, 1)),
        ("solve_mckp", rocketkit.solve_mckp, ([e[:4], e[4:]], [p[:4], p[4:]], 60, 64), ()),
        ("_C.solve_mckp", _C.solve_mckp, (e, p, o, 60, 64, 1), (0, 1, 2)),
    ]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", range(6), ids=lambda i: _layout_cases()[i][0])
def test_layouts_give_the_same_result(case, layout):
    entry, fn, args, array_args = _layout_cases()[case]
    if entry == "solve_mckp":  # arrays are inside the per-layer lists
        args = ([LAYOUTS[layout](a) for a in args[0]], [LAYOUTS[layout](a) for a in args[1]]) + args[2:]
        base = _layout_cases()[case][2]
    else:
        base = args
        args = tuple(LAYOUTS[layout](a) if i in array_args else a for i, a in enumerate(args))
    want, got = _outcome(entry, fn, *base), _outcome(entry, fn, *args)
    assert (want is None) == (got is None)
    if want is not None:
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w, g)


# ---- extreme but valid layers: a finite answer or a clear error, never NaN ---------------------
SCALES = {
    "W tiny": (1e-300, 1.0), "W denormal": (1e-310, 1.0), "W huge": (1e154, 1.0), "W max": (1e300, 1.0),
    "S tiny": (1.0, 1e-300), "S huge": (1.0, 1e200), "both tiny": (1e-200, 1e-200),
}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_extreme_scales(scale):
    w_scale, s_scale = SCALES[scale]
    rng = np.random.default_rng(11)
    W = rng.standard_normal((7, 5)) * w_scale
    S = _upper_cholesky(7, rng, "normal") * s_scale
    cand = np.array([[1, 1], [2, 1], [3, 3], [5, 2]], np.int64)
    out = call("whitened_errors", rocketkit.whitened_errors, W, S, cand)
    if out is not None:
        _check_errors(out, W, S, cand)
    out = call("factorize", rocketkit.factorize, W, S, 3, 2)
    if out is not None:
        _check_factors(out, W, S, 3, 2)


@pytest.mark.parametrize("kind", ["ill", "denormal_diag"])
def test_ill_conditioned_S(kind):
    rng = np.random.default_rng(12)
    W = rng.standard_normal((5, 4))
    S = np.diag(np.logspace(0, 300, 5)) if kind == "ill" else np.diag([1.0, 1.0, 1.0, 1.0, 5e-324])
    cand = np.array([[1, 1], [2, 1], [3, 3], [4, 2]], np.int64)
    out = call("whitened_errors", rocketkit.whitened_errors, W, S, cand)
    if out is not None:
        _check_errors(out, W, S, cand)
    out = call("factorize", rocketkit.factorize, W, S, 3, 2)
    if out is not None:
        _check_factors(out, W, S, 3, 2)


# ---- hand-picked hostile calls of the public API ---------------------------------------------
def _hostile_calls():
    rng = np.random.default_rng(13)
    W = rng.standard_normal((5, 4))
    S = _upper_cholesky(5, rng, "normal")
    cand = np.array([[1, 1], [2, 1]], np.int64)
    e, p = [np.array([0.5, 0.1])], [np.array([1, 3])]
    we, fa, mk = rocketkit.whitened_errors, rocketkit.factorize, rocketkit.solve_mckp
    return {
        "W ragged list": (we, ([[1.0, 2.0], [3.0]], S, cand)),
        "W None": (we, (None, S, cand)),
        "S negative diagonal": (we, (W, S - 2 * np.diag(np.diag(S)), cand)),
        "S NaN on the diagonal": (fa, (W, S + np.diag([0, 0, np.nan, 0, 0]), 2, 1)),
        "S zero diagonal": (we, (W, np.triu(S) - np.diag(np.diag(S)), cand)),
        "candidates float": (we, (W, S, cand.astype(float))),
        "candidates k > min(d1, d2)": (we, (W, S, np.array([[5, 1]]))),
        "candidates s > k": (we, (W, S, np.array([[2, 3]]))),
        "candidates int64 min": (we, (W, S, np.array([[-(2**63), -(2**63)]]))),
        "candidates uint64 max": (we, (W, S, np.array([[2**64 - 1, 1]], np.uint64))),
        "k nan": (fa, (W, S, np.nan, 1)),
        "k inf": (fa, (W, S, np.inf, 1)),
        "k huge": (fa, (W, S, 2**70, 1)),
        "k string": (fa, (W, S, "2", 1)),
        "s zero": (fa, (W, S, 2, 0)),
        "params ragged nested list": (mk, (e, [[[1, 2], [3]]], 10)),
        "errors strings": (mk, ([np.array(["a", "b"])], p, 10)),
        "errors complex": (mk, ([np.array([0.5 + 1j, 0.1])], p, 10)),
        "params float": (mk, (e, [np.array([1.0, 3.0])], 10)),
        "params uint64 max": (mk, (e, [np.array([1, 2**64 - 1], np.uint64)], 10)),
        "params sum overflows": (mk, (e + e, [np.array([1, 2**62]), np.array([1, 2**62])], 2**63 - 1)),
        "budget inf": (mk, (e, p, np.inf)),
        "budget nan": (mk, (e, p, np.nan)),
        "budget below minimum": (mk, (e, p, 0)),
        "budget 2**63": (mk, (e, p, 2**63)),
        "buckets zero": (mk, (e, p, 10, 0)),
        "buckets 2**62": (mk, (e, p, 10, 2**62)),
        "buckets int64 max": (mk, (e, p, 10, 2**63 - 1)),
        "no layers": (mk, ([], [], 10)),
        "empty layer": (mk, (e + [np.array([])], p + [np.array([], np.int64)], 10)),
        "layer count mismatch": (mk, (e, p + p, 10)),
    }


@pytest.mark.parametrize("name", sorted(_hostile_calls()))
def test_hostile_calls_raise_clearly(name):
    fn, args = _hostile_calls()[name]
    entry = fn.__name__
    try:
        fn(*args)
    except (ValueError, RuntimeError) as e:
        assert str(e).startswith(f"[{entry}]"), f"{type(e).__name__} without a [{entry}] prefix: {e}"
    except TypeError:
        pass
    else:
        pytest.fail(f"{entry} accepted {name}")
    finally:
        _REPORT.counts[entry] += 1


# ---- factorized_matmul (inference kernel) ---------------------------------------------------------
@pytest.mark.skipif(not hasattr(_C, "factorized_matmul"), reason="this build has no factorized_matmul")
@FUZZ
@given(st.data())
def test_factorized_matmul(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n, d1, d2 = data.draw(st.sampled_from([3, 1, 0])), data.draw(DIMS), data.draw(DIMS)
    k = data.draw(st.sampled_from([2, 1, 5]))
    s = data.draw(st.integers(1, k))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    idx_dtype = data.draw(st.sampled_from([np.int32, np.int16]))
    x = rng.standard_normal((n, d1)).astype(dtype)
    U = rng.standard_normal((d1, k)).astype(dtype)
    values = rng.standard_normal((s, d2)).astype(dtype)
    indices = np.sort(np.argsort(rng.random((k, d2)), axis=0)[:s], axis=0).astype(idx_dtype)
    bias = rng.standard_normal(d2).astype(dtype) if data.draw(st.booleans()) else None
    x, U, values = (data.draw(mutated(a, rng)) for a in (x, U, values))
    indices = data.draw(mutated(indices, rng, integer=True))
    if bias is not None:
        bias = data.draw(mutated(bias, rng))
    threads = data.draw(hostile_int(st.sampled_from([0, 1, 2])))
    raw = data.draw(st.booleans())
    if raw:
        y = call("_C.factorized_matmul", _C.factorized_matmul, x, U, values, indices, bias, threads)
    else:
        y = call("factorized_matmul", _native.factorized_matmul, x, U, values, indices, bias, threads)
    if y is None:
        return
    # A result means every input was well formed: compare with a dense fp64 reference.
    x, U, values, indices = (np.asarray(a) for a in (x, U, values, indices))
    if not raw:  # the public call takes (..., d1)
        assert x.ndim >= 1 and y.shape == x.shape[:-1] + (values.shape[1],)
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, values.shape[1])
    assert x.ndim == U.ndim == values.ndim == indices.ndim == 2 and indices.shape == values.shape
    kk = U.shape[1]
    if not x.shape[0]:  # with no rows nothing is computed, and infer.h lets indices go unchecked
        assert y.shape == (0, values.shape[1])
        return
    assert np.all((indices >= 0) & (indices < kk)), "an index outside [0, k) was accepted"
    C = np.zeros((kk, values.shape[1]))
    np.add.at(C, (indices.astype(np.int64), np.arange(values.shape[1])[None, :].repeat(len(values), 0)),
              values.astype(np.float64))
    with np.errstate(all="ignore"):
        ref = x.astype(np.float64) @ U.astype(np.float64) @ C
        if bias is not None:
            ref = ref + np.asarray(bias, dtype=np.float64)
    assert y.shape == ref.shape
    if np.all(np.isfinite(ref)):
        tol = 1e-4 if y.dtype == np.float32 else 1e-10
        np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * (1 + np.abs(ref).max(initial=0)))


# ---- gram_accumulate / gram_symmetrize ---------------------------------------------------------
@FUZZ
@given(st.data())
def test_gram_accumulate(data):
    """H is updated in place, so a converted copy must never be written to: a bad H is refused."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    d, n = data.draw(DIMS), data.draw(st.sampled_from([0, 1, 4, 9]))
    X = data.draw(mutated(rng.standard_normal((n, d)), rng))
    H = data.draw(mutated(rng.standard_normal((d, d)), rng))
    before = np.array(H, copy=True) if isinstance(H, np.ndarray) else None
    raw = data.draw(st.booleans())
    entry, fn = ("_C.gram_accumulate", _C.gram_accumulate) if raw else ("gram_accumulate", _native.gram_accumulate)
    done = _REPORT.results[entry]
    call(entry, fn, H, X)
    if _REPORT.results[entry] > done:  # accepted: the upper triangle gained XᵀX, the rest is untouched
        Xf = np.asarray(X, dtype=np.float64)
        iu, il = np.triu_indices(d), np.tril_indices(d, -1)
        with np.errstate(all="ignore"):  # hostile values overflow the reference too
            ref = before + Xf.T @ Xf
        finite = np.isfinite(ref[iu]) & (np.abs(ref[iu]) < 1e300)
        np.testing.assert_allclose(H[iu][finite], ref[iu][finite], rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(H[il], before[il])
        call("gram_symmetrize", _native.gram_symmetrize, H)
        np.testing.assert_array_equal(H, H.T)
