"""Global allocation: one option per layer minimising the summed error within a parameter budget.

Costs: "weight" (ROCKET: e_w), "output" (ROCKET-ActCost: e_o, which also picks each layer's best
ks per cr by e_o), "blend" (α·e_w + (1−α)·e_o). "uniform" is the baseline that puts every layer at
the grid cr nearest the target ratio (best ks by the chosen cost).

The knapsack minimises Σ_l w_l · c_l^p over the layers' choices, c_l the layer's cost. The default,
p = 2 with w_l = the layer's share of the dense parameters, is the squared relative error averaged
over parameters. The plain sum (p = 1, w_l = 1) is concave where it matters: every layer's error
jumps from 0 (dense) to a sizeable value at the smallest cr of the grid and then grows slowly, so
the DP keeps most layers dense and crushes a few at cr 0.7. On SmolLM2-135M at 40% removed that
plain sum gave 13.5x uniform's perplexity while the default beat uniform (benchmarks/bench_quality.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from rocketkit.profile import INT16_MAX_RANK, LayerProfile, Profile

ALLOCATION_FORMAT_VERSION = 2  # 2: the objective's power p
POWERS = (1, 2)
DEFAULT_POWER = 2
DEFAULT_WEIGHTING = "params"
COSTS = ("weight", "output", "blend")
METHODS = ("mckp", "uniform")
_CURVE_POINTS = 1000  # the error-vs-params curve stored in JSON is subsampled to this many points


def check_cost(cost: str, alpha) -> float:
    """α such that the cost is α·e_w + (1−α)·e_o; validates the (cost, alpha) pair."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if cost == "blend":
        if alpha is None:
            raise ValueError("cost 'blend' needs alpha in [0, 1]")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        return alpha
    if alpha is not None:
        raise ValueError(f"alpha is only used with cost 'blend', got alpha={alpha} with cost {cost!r}")
    return 1.0 if cost == "weight" else 0.0


def check_ratio(ratio) -> float:
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}") from None
    if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {ratio}")
    return ratio


def candidate_cost(lp: LayerProfile, cost: str, alpha=None) -> np.ndarray:
    a = check_cost(cost, alpha)
    if cost == "weight":
        return lp.e_weight.copy()
    if cost == "output":
        return lp.e_output.copy()
    return a * lp.e_weight + (1.0 - a) * lp.e_output


@dataclass
class LayerOptions:
    """A layer's options for the knapsack; ``index`` is the grid position, −1 for keeping it dense."""

    index: np.ndarray  # int64
    params: np.ndarray  # int64
    cost: np.ndarray  # float64


def layer_options(lp: LayerProfile, cost: str = "weight", alpha=None) -> LayerOptions:
    """Dense, the best ks at each cr by ``cost``, and the best candidate overall below dense; deduplicated."""
    c = candidate_cost(lp, cost, alpha)
    g = lp.grid
    chosen = []
    for cr in np.unique(g.cr):
        at = np.flatnonzero(g.cr == cr)
        # lexsort: lowest cost first, fewer params on ties.
        chosen.append(int(at[np.lexsort((g.params[at], c[at]))[0]]))
    below = np.flatnonzero(g.params < lp.dense_params)
    if below.size:
        chosen.append(int(below[np.lexsort((g.params[below], c[below]))[0]]))
    idx = np.array(sorted(set(chosen)), dtype=np.int64)
    return LayerOptions(
        index=np.concatenate([[-1], idx]).astype(np.int64),
        params=np.concatenate([[lp.dense_params], g.params[idx]]).astype(np.int64),
        cost=np.concatenate([[0.0], c[idx]]).astype(np.float64),
    )


@dataclass
class LayerDecision:
    name: str
    d1: int
    d2: int
    dense: bool
    k: int  # 0 when dense
    s: int
    cr: float  # 0 when dense
    ks: float
    params: int  # values (d1·k + s·d2) or d1·d2 when dense
    index_dtype: str | None  # "int16" / "int32", None when dense
    e_weight: float
    e_output: float
    cost: float  # the allocation's cost of this choice (before the power and the weighting)


@dataclass
class Allocation:
    layers: dict[str, LayerDecision]
    ratio: float  # target fraction removed
    cost: str
    alpha: float | None
    method: str
    weighting: str | None
    budget: int
    dense_params: int
    params: int
    achieved_ratio: float  # (dense − params) / dense over compressible linears
    objective: float  # Σ (weighted) cost of the choices
    lower_bound: float | None  # LP relaxation bound on the objective (mckp only)
    curve_params: list = field(default_factory=list)
    curve_error: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    power: int = DEFAULT_POWER  # the objective is Σ w_l · cost_l ** power

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(v) for v in self.layers.values()]
        return {"format": "rocketkit-allocation", "version": ALLOCATION_FORMAT_VERSION, **d}

    @classmethod
    def from_json(cls, doc: dict, where: str = "allocation") -> "Allocation":
        if doc.get("format") != "rocketkit-allocation":
            raise ValueError(f"{where}: not a rocketkit allocation")
        if doc.get("version") != ALLOCATION_FORMAT_VERSION:
            raise ValueError(f"{where}: allocation version {doc.get('version')!r}, this rocketkit reads {ALLOCATION_FORMAT_VERSION}")
        d = {k: v for k, v in doc.items() if k not in ("format", "version")}
        try:
            layers = {rec["name"]: LayerDecision(**rec) for rec in d.pop("layers")}
            return cls(layers=layers, **d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed allocation ({e})") from None

    def save(self, path: str | os.PathLike) -> None:
        from rocketkit.fileio import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Allocation":
        from rocketkit.fileio import read_json

        return cls.from_json(read_json(path), where=str(path))


def _decision(lp: LayerProfile, grid_index: int, cost_value: float) -> LayerDecision:
    if grid_index < 0:
        return LayerDecision(lp.name, lp.d1, lp.d2, True, 0, 0, 0.0, 0.0, lp.dense_params, None, 0.0, 0.0, 0.0)
    g = lp.grid
    k = int(g.k[grid_index])
    return LayerDecision(
        lp.name, lp.d1, lp.d2, False, k, int(g.s[grid_index]), float(g.cr[grid_index]), float(g.ks[grid_index]),
        int(g.params[grid_index]), "int16" if k <= INT16_MAX_RANK else "int32",
        float(lp.e_weight[grid_index]), float(lp.e_output[grid_index]), float(cost_value),
    )


def check_power(power) -> int:
    if isinstance(power, bool) or power not in POWERS:
        raise ValueError(f"power must be one of {', '.join(map(str, POWERS))}, got {power!r}")
    return int(power)


def check_weighting(weighting) -> str | None:
    """"params" or None; also accepts True/False and "none"."""
    if weighting in (None, False, "none"):
        return None
    if weighting in (True, "params"):
        return "params"
    raise ValueError(f"weighting must be None or 'params', got {weighting!r}")


def _weights(profile: Profile, weighting: str | None) -> dict[str, float]:
    if weighting is None:
        return {name: 1.0 for name in profile.layers}
    total = profile.dense_params()
    return {name: lp.dense_params / total for name, lp in profile.layers.items()}


def allocate(
    profile: Profile,
    ratio: float,
    cost: str = "weight",
    alpha=None,
    buckets: int = 50000,
    weighting=DEFAULT_WEIGHTING,
    method: str = "mckp",
    power: int = DEFAULT_POWER,
) -> Allocation:
    """Choose each layer's option so that Σ params ≤ (1 − ratio)·Σ dense params, minimising
    Σ w_l · cost_l ** power.

    ``weighting="params"`` (default) makes w_l the layer's share of the dense parameters, None makes
    it 1; ``power`` is 2 (default) or 1 (ROCKET's plain sum with ``weighting=None``). Neither changes
    which ks is best at a cr. ``method="uniform"`` is the baseline: every layer at the grid cr
    nearest ``ratio``.
    """
    ratio = check_ratio(ratio)
    a = check_cost(cost, alpha)
    power = check_power(power)
    weighting = check_weighting(weighting)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not profile.layers:
        raise ValueError("profile has no layers")
    w = _weights(profile, weighting)
    dense = profile.dense_params()
    budget = int(math.floor((1.0 - ratio) * dense))
    names = list(profile.layers)
    if method == "uniform":
        choice, lower_bound, curve_p, curve_e = _uniform(profile, ratio, cost, alpha), None, [], []
    else:
        from rocketkit._native import solve_mckp

        options = [layer_options(profile.layers[n], cost, alpha) for n in names]
        sol = solve_mckp([o.cost ** power * w[n] for o, n in zip(options, names)], [o.params for o in options], budget, buckets)
        choice = {n: int(o.index[c]) for n, o, c in zip(names, options, sol.choice)}
        lower_bound = float(sol.lower_bound)
        step = max(1, math.ceil(sol.curve.shape[0] / _CURVE_POINTS))
        pts = np.unique(np.r_[np.arange(0, sol.curve.shape[0], step), sol.curve.shape[0] - 1])
        curve_p = [int(math.floor(sol.min_params + b * sol.bucket_width)) for b in pts]
        curve_e = [float(sol.curve[b]) for b in pts]
    layers = {}
    for n in names:
        lp = profile.layers[n]
        gi = choice[n]
        cval = float(candidate_cost(lp, cost, alpha)[gi]) if gi >= 0 else 0.0
        layers[n] = _decision(lp, gi, cval)
    params = sum(d.params for d in layers.values())
    return Allocation(
        layers=layers, ratio=ratio, cost=cost, alpha=a if cost == "blend" else None, method=method,
        weighting=weighting, budget=budget, dense_params=dense, params=params, achieved_ratio=(dense - params) / dense,
        objective=float(sum(d.cost ** power * w[n] for n, d in layers.items())), lower_bound=lower_bound,
        curve_params=curve_p, curve_error=curve_e, power=power,
        meta={"buckets": int(buckets), "profile": {k: v for k, v in profile.meta.items() if k in ("crs", "kss", "model_type", "tokens")}},
    )


def _uniform(profile: Profile, ratio: float, cost: str, alpha) -> dict[str, int]:
    """Every layer at the grid cr nearest ``ratio`` (among the layer's feasible crs), best ks by cost."""
    choice = {}
    for n, lp in profile.layers.items():
        g = lp.grid
        if len(g) == 0:
            choice[n] = -1
            continue
        crs = np.unique(g.cr)
        cr = crs[np.argmin(np.abs(crs - ratio))]
        at = np.flatnonzero(g.cr == cr)
        c = candidate_cost(lp, cost, alpha)
        choice[n] = int(at[np.lexsort((g.params[at], c[at]))[0]])
    return choice
