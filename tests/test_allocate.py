"""Allocation: costs, options, budget, uniform baseline, JSON round trip (on synthetic profiles)."""

from __future__ import annotations

import numpy as np
import pytest

from rocketkit.allocate import Allocation, allocate, layer_options
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
        assert d.cr == crs[np.argmin(np.abs(crs - 0.28))]
        at = np.flatnonzero(lp.grid.cr == d.cr)
        assert d.e_weight == lp.e_weight[at].min()
    o = allocate(prof, 0.28, "output", method="uniform")
    assert all(d.e_output == prof.layers[d.name].e_output[prof.layers[d.name].grid.cr == d.cr].min()
               for d in o.layers.values() if not d.dense)


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
    plain = allocate(prof, 0.4, weighting=None, power=1, buckets=4000)
    default = allocate(prof, 0.4, buckets=4000)
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
