"""Allocation: costs, options, budget, uniform baseline, JSON round trip (on synthetic profiles)."""

from __future__ import annotations

import numpy as np
import pytest

from rocketkit.allocate import (Allocation, LayerOptions, allocate, layer_options, rocket_filter,
                                rocket_options)
from rocketkit.profile import LayerProfile, Profile, candidate_grid

SHAPES = [(64, 64), (64, 160), (160, 64), (37, 53), (53, 37), (96, 96), (7, 11)]


def synthetic_profile(seed=0, crs=(0.1, 0.2, 0.3, 0.5, 0.7), kss=(1.0, 1.5, 2.0, 3.0)) -> Profile:
    """Errors grow with cr; e_w and e_o correlated but with different ks preferences."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i, (d1, d2) in enumerate(SHAPES * 3):
        g = candidate_grid(d1, d2, crs, kss)
        base = g.cr * rng.uniform(0.5, 2.0)
        e_w = base * (1 + 0.2 * rng.random(len(g)))
        e_o = base * (1 + 0.2 * rng.random(len(g))) * rng.uniform(0.3, 1.5)
        name = f"model.layers.{i}.proj"
        layers[name] = LayerProfile(name, d1, d2, g, e_w, e_o, 0.0, 0, 100, 0)
    return Profile(layers, {"crs": list(crs), "kss": list(kss)})


@pytest.fixture
def prof():
    return synthetic_profile()


def _choices(a: Allocation):
    return {n: (d.dense, d.k, d.s) for n, d in a.layers.items()}


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.37, 0.6])
@pytest.mark.parametrize("cost", ["weight", "output"])
def test_never_over_budget(prof, ratio, cost):
    a = allocate(prof, ratio, cost=cost, buckets=2000)
    dense = prof.dense_params()
    assert a.dense_params == dense and a.budget == int(np.floor((1 - ratio) * dense))
    assert a.params == sum(d.params for d in a.layers.values()) <= a.budget
    assert a.achieved_ratio == pytest.approx((dense - a.params) / dense)
    assert a.achieved_ratio >= ratio - 1e-12
    assert a.lower_bound <= a.objective + 1e-9
    total = prof.dense_params()  # default objective: Σ share · cost²
    assert a.objective == pytest.approx(sum(d.cost ** 2 * d.d1 * d.d2 / total for d in a.layers.values()))
    assert (a.power, a.weighting) == (2, "params")
    for d in a.layers.values():
        lp = prof.layers[d.name]
        if d.dense:
            assert (d.params, d.e_weight, d.cost) == (lp.d1 * lp.d2, 0.0, 0.0)
        else:
            assert d.cost == (d.e_weight if cost == "weight" else d.e_output)


def test_blend_endpoints_equal_weight_and_output(prof):
    for ratio in (0.15, 0.4):
        w, o = allocate(prof, ratio, "weight", buckets=3000), allocate(prof, ratio, "output", buckets=3000)
        b1, b0 = allocate(prof, ratio, "blend", alpha=1.0, buckets=3000), allocate(prof, ratio, "blend", alpha=0.0, buckets=3000)
        assert _choices(b1) == _choices(w) and b1.objective == w.objective
        assert _choices(b0) == _choices(o) and b0.objective == o.objective
        assert _choices(w) != _choices(o)  # the synthetic costs do disagree
        mid = allocate(prof, ratio, "blend", alpha=0.5, buckets=3000)
        assert mid.params <= mid.budget and mid.alpha == 0.5


def test_layer_options_best_ks_per_cr(prof):
    lp = prof.layers["model.layers.0.proj"]
    for cost, e in (("weight", lp.e_weight), ("output", lp.e_output)):
        opt = layer_options(lp, cost)
        assert opt.index[0] == -1 and opt.params[0] == lp.d1 * lp.d2 and opt.cost[0] == 0.0
        assert len(set(opt.index.tolist())) == len(opt.index)
        for cr in np.unique(lp.grid.cr):
            at = np.flatnonzero(lp.grid.cr == cr)
            assert at[np.argmin(e[at])] in opt.index
        assert np.argmin(e) in opt.index  # best overall below dense
        np.testing.assert_array_equal(opt.cost[1:], e[opt.index[1:]])


def test_output_cost_picks_ks_by_output_error(prof):
    lp = prof.layers["model.layers.1.proj"]
    w, o = layer_options(lp, "weight"), layer_options(lp, "output")
    assert set(w.index.tolist()) != set(o.index.tolist())


def test_uniform_baseline(prof):
    a = allocate(prof, 0.28, "weight", method="uniform")
    assert a.method == "uniform" and a.lower_bound is None
    for d in a.layers.values():
        lp = prof.layers[d.name]
        if len(lp.grid) == 0:
            assert d.dense
            continue
        crs = np.unique(lp.grid.cr)
        nearest = int(np.argmin(np.abs(crs - 0.28)))
        assert d.cr == crs[nearest + (d.name in a.meta["moved_up_one_cr"])]
        at = np.flatnonzero(lp.grid.cr == d.cr)
        assert d.e_weight == lp.e_weight[at].min()
    o = allocate(prof, 0.28, "output", method="uniform")
    assert all(d.e_output == prof.layers[d.name].e_output[prof.layers[d.name].grid.cr == d.cr].min()
               for d in o.layers.values() if not d.dense)


@pytest.mark.parametrize("method", ["uniform", "svdllm"])
def test_uniform_never_below_target(method):
    """Rounded k and s can put every layer at the nearest cr just over the budget: the layers whose
    next cr costs least per parameter saved move up until it fits, and the allocation says which."""
    from rocketkit.profile import CandidateGrid

    layers = {}
    for i, slope in enumerate((1.0, 3.0, 2.0)):
        cr, ks = np.array([0.3, 0.4, 0.5]), np.ones(3)
        params = np.array([700, 601, 500])  # 0.4 removes 399 of 1000: just short of a 40% cut
        g = CandidateGrid(cr, ks, np.array([7, 6, 5]), np.array([7, 6, 5]), params, params, 3)
        e = slope * cr
        layers[f"l{i}"] = LayerProfile(f"l{i}", 25, 40, g, e, e, 0.0, 0, 10, 0)
    prof = Profile(layers, {"crs": [0.3, 0.4, 0.5], "kss": [1.0]})
    a = allocate(prof, 0.4, method=method)
    assert a.params <= a.budget and a.achieved_ratio >= 0.4  # all at 0.4 would be 0.399
    assert a.meta["moved_up_one_cr"] == ["l0"]  # the flattest error curve moves
    assert a.layers["l0"].cr == 0.5 and a.layers["l1"].cr == a.layers["l2"].cr == 0.4


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("weighting", [None, "params"])
def test_objective_power_and_weighting(prof, power, weighting):
    a = allocate(prof, 0.3, "weight", weighting=weighting, power=power, buckets=2000)
    total = prof.dense_params()
    share = (lambda d: d.d1 * d.d2 / total) if weighting else (lambda d: 1.0)
    assert (a.weighting, a.power) == (weighting, power)
    assert a.objective == pytest.approx(sum(d.cost ** power * share(d) for d in a.layers.values()))
    assert a.params <= a.budget and a.lower_bound <= a.objective + 1e-9


def test_power_validation(prof):
    for bad in (0, 3, 1.5, True, "2"):
        with pytest.raises(ValueError, match="power must be one of 1, 2"):
            allocate(prof, 0.3, power=bad)


def test_plain_sum_concentrates_and_default_spreads():
    """Concave per-layer errors (a jump at the smallest cr, then slow growth): the plain sum keeps some
    layers dense and crushes others; Σ share·e² spreads the cut."""
    crs, kss = (0.1, 0.3, 0.5, 0.7), (1.0,)
    layers = {}
    for i in range(12):
        g = candidate_grid(64, 64, crs, kss)
        e = 0.05 + 0.8 * g.cr  # like a real MLP layer: 0.13 at cr 0.1, 0.61 at cr 0.7
        layers[f"l{i}"] = LayerProfile(f"l{i}", 64, 64, g, e, e, 0.0, 0, 10, 0)
    prof = Profile(layers, {"crs": list(crs), "kss": list(kss)})
    plain = allocate(prof, 0.4, weighting=None, power=1, buckets=4000, error_cap="none")
    default = allocate(prof, 0.4, buckets=4000, error_cap="none")
    assert {d.cr for d in plain.layers.values()} == {0.0, 0.7}
    assert {d.cr for d in default.layers.values()} <= {0.3, 0.5} and default.params <= default.budget


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), "x"])
def test_ratio_validation(prof, ratio):
    with pytest.raises(ValueError, match="ratio"):
        allocate(prof, ratio)


def test_cost_validation(prof):
    with pytest.raises(ValueError, match="cost"):
        allocate(prof, 0.2, cost="nope")
    with pytest.raises(ValueError, match="alpha"):
        allocate(prof, 0.2, cost="blend")
    with pytest.raises(ValueError, match="alpha"):
        allocate(prof, 0.2, cost="blend", alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        allocate(prof, 0.2, cost="weight", alpha=0.5)
    with pytest.raises(ValueError, match="method"):
        allocate(prof, 0.2, method="greedy")


def test_json_roundtrip(prof, tmp_path):
    a = allocate(prof, 0.3, "blend", alpha=0.25, buckets=2000)
    a.save(tmp_path / "allocation.json")
    b = Allocation.load(tmp_path / "allocation.json")
    assert b == a
    (tmp_path / "bad.json").write_text('{"format": "rocketkit-allocation", "version": 7}')
    with pytest.raises(ValueError, match="version"):
        Allocation.load(tmp_path / "bad.json")


# ---- faithful ROCKET (method="rocket") -------------------------------------------------------
def _opts(cr, params, cost):
    return LayerOptions(np.arange(len(cr), dtype=np.int64), np.asarray(params, dtype=np.int64),
                        np.asarray(cost, dtype=np.float64), np.asarray(cr, dtype=np.float64))


def test_rocket_filter_alpha_search_by_hand():
    cr, p = [0.1, 0.2, 0.3], [90, 80, 70]
    opts = [_opts(cr, p, [0.1, 0.2, 0.5]), _opts(cr, p, [0.2, 0.4, 0.6]), _opts(cr, p, [0.05, 0.25, 2.5])]
    # Reference error at cr 0.2: (0.2 + 0.4 + 0.25) / 3. Until α·ref ≥ 0.4 the second layer can only
    # offer 90 params and Σ of fewest params is 250 > 240; α = 1.5 is the first that reaches 0.4.
    f = rocket_filter(opts, 0.2, 240)
    assert f.reference_error == pytest.approx(0.85 / 3)
    assert f.alpha == 1.5 and f.threshold == pytest.approx(1.5 * 0.85 / 3) and f.emptied == []
    assert [k.tolist() for k in f.keep] == [[True, True, False], [True, True, False], [True, True, False]]
    assert rocket_filter(opts, 0.2, 250).alpha == 1.0  # a looser budget is met at once
    assert rocket_filter(opts, 0.2, 230).alpha == 1.8  # the first α with α·ref ≥ 0.5
    with pytest.raises(ValueError, match=r"\[rocket_filter\] no alpha"):
        rocket_filter(opts, 0.2, 229)  # 0.6 > 2·ref and 2.5 ≥ 2 are never offered: 230 is the least


def test_rocket_filter_off_grid_target_and_emptied_layer():
    cr, p = [0.1, 0.2, 0.3], [90, 80, 70]
    opts = [_opts(cr, p, [0.1, 0.2, 0.4]), _opts(cr, p, [3.0, 2.5, 2.2])]
    # 0.25 lies midway between 0.2 and 0.3: the tie goes to the lower cr.
    assert rocket_filter(opts, 0.25, 10**6).reference_error == pytest.approx((0.2 + 2.5) / 2)
    assert rocket_filter(opts, 0.26, 10**6).reference_error == pytest.approx((0.4 + 2.2) / 2)
    # Every error of layer 1 is ≥ 2: it keeps its lowest-error option (never dense).
    f = rocket_filter(opts, 0.26, 10**6)
    assert f.emptied == [1] and f.keep[1].tolist() == [False, False, True]


def _brute_force(options, budget):
    import itertools

    best = None
    for pick in itertools.product(*[range(len(o.index)) for o in options]):
        if sum(int(o.params[c]) for o, c in zip(options, pick)) <= budget:
            e = sum(float(o.cost[c]) for o, c in zip(options, pick))
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.37, 0.5])
@pytest.mark.parametrize("cost", ["weight", "output"])
def test_rocket_allocation(ratio, cost):
    prof = synthetic_profile(seed=3)
    a = allocate(prof, ratio, cost=cost, method="rocket", buckets=20000)
    assert (a.method, a.power, a.weighting) == ("rocket", 1, None)
    assert not any(d.dense for d in a.layers.values())  # never dense, even at 5%
    assert a.params <= a.budget == int(np.floor((1 - ratio) * prof.dense_params()))
    assert a.achieved_ratio >= ratio and a.objective == pytest.approx(sum(d.cost for d in a.layers.values()))
    names = list(prof.layers)
    options = [rocket_options(prof.layers[n], cost) for n in names]
    assert all((o.index >= 0).all() and len(o.index) == len(np.unique(prof.layers[n].grid.cr))
               for o, n in zip(options, names))
    f = rocket_filter(options, ratio, a.budget)
    assert a.meta["rocket"]["alpha"] == f.alpha
    kept = [o.take(k) for o, k in zip(options, f.keep)]
    for n, o in zip(names, kept):  # each choice is one of the filtered options
        d = a.layers[n]
        assert (d.k, d.s) in {(int(prof.layers[n].grid.k[i]), int(prof.layers[n].grid.s[i])) for i in o.index}
    if len(names) <= 8:
        assert a.objective == pytest.approx(_brute_force(kept, a.budget))


def test_rocket_dp_is_exact_on_small_profile():
    prof = synthetic_profile(seed=4)
    prof = Profile({n: prof.layers[n] for n in list(prof.layers)[:6]}, prof.meta)
    for ratio in (0.15, 0.3, 0.45):
        a = allocate(prof, ratio, method="rocket", buckets=50000)
        options = [rocket_options(lp) for lp in prof.layers.values()]
        f = rocket_filter(options, ratio, a.budget)
        assert a.objective == pytest.approx(_brute_force([o.take(k) for o, k in zip(options, f.keep)], a.budget))


def _weighted_brute_force(options, weights, power, budget):
    import itertools

    best = None
    for pick in itertools.product(*[range(len(o.index)) for o in options]):
        if sum(int(o.params[c]) for o, c in zip(options, pick)) <= budget:
            e = sum(w * float(o.cost[c]) ** power for o, w, c in zip(options, weights, pick))
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.45])
@pytest.mark.parametrize("cost", ["weight", "output"])
def test_error_cap_default(ratio, cost):
    """The default knapsack offers dense and the compressed options under the reference's cap, and
    is exact over them (brute force); "none" offers every option."""
    from rocketkit.allocate import capped_options

    full = synthetic_profile(seed=4)
    prof = Profile({n: full.layers[n] for n in list(full.layers)[:6]}, full.meta)
    a = allocate(prof, ratio, cost=cost, buckets=50000)
    names = list(prof.layers)
    options, cap = capped_options(prof, names, cost, None, ratio, a.budget)
    f = rocket_filter([rocket_options(prof.layers[n], cost) for n in names], ratio, a.budget)
    assert a.meta["error_cap"] == cap and cap["alpha"] == f.alpha and cap["threshold"] == f.threshold
    assert all(o.index[0] == -1 for o in options)  # dense always offered
    for n, o in zip(names, options):
        d = a.layers[n]
        assert d.dense or d.cost <= cap["threshold"] or n in cap["emptied_layers"]
        assert d.dense or (d.k, d.s) in {(int(prof.layers[n].grid.k[i]), int(prof.layers[n].grid.s[i])) for i in o.index[1:]}
    share = [prof.layers[n].dense_params / prof.dense_params() for n in names]
    assert a.objective == pytest.approx(_weighted_brute_force(options, share, 2, a.budget))
    assert a.params <= a.budget and a.achieved_ratio >= ratio
    uncapped = allocate(prof, ratio, cost=cost, buckets=50000, error_cap="none")
    assert uncapped.meta["error_cap"] is None and uncapped.objective <= a.objective + 1e-12


def test_error_cap_infeasible_offers_everything_and_says_so():
    """Layer b's errors are all ≥ 2, so the cap leaves it only its lowest-cr option, which cannot fit
    a 60% cut whatever α: every option is offered instead, with a warning, and meta says so."""
    crs, kss = (0.1, 0.7), (1.0,)
    layers = {}
    for name, e in (("a", (0.1, 0.2)), ("b", (5.0, 6.0))):
        g = candidate_grid(64, 64, crs, kss)
        err = np.where(np.isclose(g.cr, 0.1), e[0], e[1])
        layers[name] = LayerProfile(name, 64, 64, g, err, err, 0.0, 0, 10, 0)
    prof = Profile(layers, {"crs": list(crs), "kss": list(kss)})
    with pytest.warns(RuntimeWarning, match="no error cap fits"):
        a = allocate(prof, 0.6, buckets=4000)
    assert a.meta["error_cap"] == {"alpha": None} and a.params <= a.budget
    assert a.layers == allocate(prof, 0.6, buckets=4000, error_cap="none").layers
    with pytest.raises(ValueError, match="error_cap must be one of"):
        allocate(prof, 0.3, error_cap="beta")


def test_rocket_json_roundtrip(tmp_path):
    a = allocate(synthetic_profile(), 0.3, method="rocket", buckets=2000)
    a.save(tmp_path / "allocation.json")
    assert Allocation.load(tmp_path / "allocation.json") == a


# ---- SVD-LLM baseline (method="svdllm") ------------------------------------------------------
def test_svdllm_baseline(prof):
    a = allocate(prof, 0.3, "weight", method="svdllm")
    assert a.method == "svdllm" and a.lower_bound is None
    for d in a.layers.values():
        lp = prof.layers[d.name]
        on = lp.grid.ks == 1.0
        crs = np.unique(lp.grid.cr[on])
        assert not d.dense and d.ks == 1.0 and d.s == d.k and d.cr == crs[np.argmin(np.abs(crs - 0.3))]
    with pytest.raises(ValueError, match="no ks = 1"):
        allocate(synthetic_profile(kss=(1.5, 2.0)), 0.3, method="svdllm")


SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("method", ["rocket", "svdllm", "uniform"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_achieved_ratio_on_smollm2_shapes(method, ratio):
    """Within 0.002 of the target and never below it, with rocketkit's real parameter counts, on
    SmolLM2-135M's 30 × 7 layer shapes (errors synthetic, growing with cr)."""
    from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS

    rng = np.random.default_rng(7)
    layers = {}
    for b in range(30):
        for j, (d1, d2) in enumerate(SMOLLM2_SHAPES):
            g = candidate_grid(d1, d2, DEFAULT_CRS, DEFAULT_KS)
            e = np.sqrt(g.cr) * rng.uniform(0.3, 0.9) * (1 + 0.05 * np.abs(g.ks - rng.uniform(1, 3)))
            name = f"model.layers.{b}.l{j}"
            layers[name] = LayerProfile(name, d1, d2, g, e, e * 1.1, 0.0, 0, 100, 0)
    a = allocate(Profile(layers, {"crs": list(DEFAULT_CRS), "kss": list(DEFAULT_KS)}), ratio, method=method)
    assert ratio <= a.achieved_ratio <= ratio + 0.002
