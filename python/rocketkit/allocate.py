"""Global allocation: one option per layer minimising the summed error within a parameter budget.

Costs: "weight" (ROCKET: e_w), "output" (ROCKET-ActCost: e_o, which also picks each layer's best
ks per cr by e_o), "blend" (α·e_w + (1−α)·e_o).

Methods: "mckp" is rocketkit's own knapsack (below); "rocket" is the reference's allocation, rule for
rule (see :func:`rocket_filter` and :func:`allocate`), solved exactly by the same DP; "uniform" puts
every layer at the grid cr nearest the target ratio (best ks by the chosen cost); "svdllm" is the
SVD-LLM baseline, the same but at ks = 1 (s = k: whitened truncated SVD, no sparsity).

The knapsack minimises Σ_l w_l · c_l^p over the layers' choices, c_l the layer's cost. The default,
p = 2 with w_l = the layer's share of the dense parameters, is the squared relative error averaged
over parameters. The plain sum (p = 1, w_l = 1) is concave where it matters: every layer's error
jumps from 0 (dense) to a sizeable value at the smallest cr of the grid and then grows slowly, so
the DP keeps most layers dense and crushes a few at cr 0.7. On SmolLM2-135M at 40% removed that
plain sum gave 13.5x uniform's perplexity while the default beat uniform (benchmarks/bench_quality.py).
By default the knapsack also offers a layer's compressed options only under the reference's error
cap (see :func:`capped_options`), dense always: at 40% on SmolLM2 this took the weight cost's
perplexity from 129.2 to 108.0 and the output cost's from 144.3 to 130.0 (16k calibration tokens).
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
METHODS = ("mckp", "uniform", "rocket", "svdllm")
# The reference's error filter (mts-ai/ROCKET, rocket/profiling/postprocess.py): options with error
# ≥ ROCKET_MAX_ERROR, or above α times the mean error at the target cr, are not offered; α is the
# first of ROCKET_ALPHAS that leaves a feasible problem.
ROCKET_ALPHAS = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))  # 1.0 .. 2.0
ROCKET_MAX_ERROR = 2.0
# rocketkit's knapsack caps each layer's error the reference's way (ERROR_CAPS[0], the default) but
# keeps dense as an option; "none" offers every option (benchmarks/bench_quality.py measures both).
ERROR_CAPS = ("alpha", "none")
DEFAULT_ERROR_CAP = "alpha"
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


def check_error_cap(error_cap) -> str:
    if error_cap not in ERROR_CAPS:
        raise ValueError(f"error_cap must be one of {', '.join(ERROR_CAPS)}, got {error_cap!r}")
    return error_cap


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
    cr: np.ndarray | None = None  # float64, the option's grid cr (0 for dense); set by rocket_options

    def take(self, keep: np.ndarray) -> "LayerOptions":
        return LayerOptions(self.index[keep], self.params[keep], self.cost[keep],
                            None if self.cr is None else self.cr[keep])


def best_ks_per_cr(lp: LayerProfile, c: np.ndarray) -> list[int]:
    """Grid indices of the lowest-``c`` candidate at each cr, ascending cr (fewer params on ties)."""
    g = lp.grid
    chosen = []
    for cr in np.unique(g.cr):
        at = np.flatnonzero(g.cr == cr)
        chosen.append(int(at[np.lexsort((g.params[at], c[at]))[0]]))
    return chosen


def layer_options(lp: LayerProfile, cost: str = "weight", alpha=None) -> LayerOptions:
    """Dense, the best ks at each cr by ``cost``, and the best candidate overall below dense; deduplicated."""
    c = candidate_cost(lp, cost, alpha)
    g = lp.grid
    chosen = best_ks_per_cr(lp, c)
    below = np.flatnonzero(g.params < lp.dense_params)
    if below.size:
        chosen.append(int(below[np.lexsort((g.params[below], c[below]))[0]]))
    idx = np.array(sorted(set(chosen)), dtype=np.int64)
    return LayerOptions(
        index=np.concatenate([[-1], idx]).astype(np.int64),
        params=np.concatenate([[lp.dense_params], g.params[idx]]).astype(np.int64),
        cost=np.concatenate([[0.0], c[idx]]).astype(np.float64),
    )


def rocket_options(lp: LayerProfile, cost: str = "weight", alpha=None) -> LayerOptions:
    """ROCKET's options of a layer: the best ks at each cr by ``cost`` (≤ one per cr), never dense.

    A layer with no candidate at all (``dense_reason``) can only stay dense, as under every method."""
    c = candidate_cost(lp, cost, alpha)
    g = lp.grid
    if len(g) == 0:
        return LayerOptions(np.array([-1], dtype=np.int64), np.array([lp.dense_params], dtype=np.int64),
                            np.zeros(1), np.zeros(1))
    idx = np.array(best_ks_per_cr(lp, c), dtype=np.int64)
    return LayerOptions(idx, g.params[idx].astype(np.int64), c[idx].astype(np.float64), g.cr[idx].astype(np.float64))


@dataclass
class RocketFilter:
    """What :func:`rocket_filter` kept: ``keep[l]`` masks layer l's options."""

    alpha: float
    reference_error: float  # mean over layers of the error at the option whose cr is nearest the target
    threshold: float  # alpha · reference_error
    keep: list  # list[np.ndarray[bool]]
    emptied: list  # layers (positions) the filter emptied; each keeps its lowest-error option


def rocket_filter(options: list[LayerOptions], ratio: float, budget: int, alphas=ROCKET_ALPHAS) -> RocketFilter:
    """ROCKET's error filter and α search, on options from :func:`rocket_options`.

    - reference error: the mean over layers of the error of each layer's option whose cr is nearest
      ``ratio``; an off-grid target takes the nearer grid cr, a tie the lower cr (layers that can only
      stay dense take no part);
    - at α, an option is offered if its error is < 2 and ≤ α·reference error; a layer left with
      nothing keeps its lowest-error option (fewer params on ties), never dense;
    - α is the first of ``alphas`` whose offered options can meet ``budget`` (Σ of each layer's
      fewest params ≤ budget). If none can, ValueError.
    """
    refs = []
    for o in options:
        if o.index[0] >= 0:
            # Rounded so that a target midway between two crs is a tie whatever the float error.
            refs.append(float(o.cost[np.lexsort((o.cr, np.round(np.abs(o.cr - ratio), 9)))[0]]))
    reference = float(np.mean(refs)) if refs else 0.0
    for a in alphas:
        threshold = float(a) * reference
        keep, emptied, fewest = [], [], 0
        for l, o in enumerate(options):
            k = (o.cost < ROCKET_MAX_ERROR) & (o.cost <= threshold)
            if o.index[0] < 0:
                k = np.ones(1, dtype=bool)
            elif not k.any():
                k = np.zeros(len(o.index), dtype=bool)
                k[np.lexsort((o.params, o.cost))[0]] = True
                emptied.append(l)
            keep.append(k)
            fewest += int(o.params[k].min())
        if fewest <= budget:
            return RocketFilter(float(a), reference, threshold, keep, emptied)
    raise ValueError(f"[rocket_filter] no alpha in {alphas[0]:g}..{alphas[-1]:g} leaves options that fit the "
                     f"budget of {budget} params at ratio {ratio:g}")


def capped_options(profile: Profile, names: list[str], cost: str, alpha, ratio: float,
                   budget: int) -> tuple[list[LayerOptions], dict | None]:
    """Each layer's options under the reference's error cap (:func:`rocket_filter`), plus dense;
    and what the cap was (None and every option when no α of ROCKET_ALPHAS is feasible)."""
    import warnings

    ro = [rocket_options(profile.layers[n], cost, alpha) for n in names]
    try:
        filt = rocket_filter(ro, ratio, budget)
    except ValueError as e:
        warnings.warn(f"[allocate] no error cap fits the budget ({e}); every option is offered", RuntimeWarning,
                      stacklevel=3)
        return [layer_options(profile.layers[n], cost, alpha) for n in names], {"alpha": None}
    options = []
    for o, keep, n in zip(ro, filt.keep, names):
        o = o.take(keep)
        if o.index[0] >= 0:  # dense is always offered (a layer without candidates has only dense)
            o = LayerOptions(np.r_[-1, o.index], np.r_[profile.layers[n].dense_params, o.params],
                             np.r_[0.0, o.cost], np.r_[0.0, o.cr])
        options.append(o)
    return options, {"alpha": filt.alpha, "reference_error": filt.reference_error, "threshold": filt.threshold,
                     "emptied_layers": [names[l] for l in filt.emptied]}


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
    error_cap: str = DEFAULT_ERROR_CAP,
) -> Allocation:
    """Choose each layer's option so that Σ params ≤ (1 − ratio)·Σ dense params, minimising
    Σ w_l · cost_l ** power.

    ``weighting="params"`` (default) makes w_l the layer's share of the dense parameters, None makes
    it 1; ``power`` is 2 (default) or 1 (ROCKET's plain sum with ``weighting=None``). Neither changes
    which ks is best at a cr. ``method="uniform"`` is the baseline: every layer at the grid cr
    nearest ``ratio``; ``"svdllm"`` the same at ks = 1 (the grid must hold ks = 1).

    ``error_cap="alpha"`` (method mckp's default) offers a layer's compressed options only below the
    reference's error cap (:func:`rocket_filter`: best ks per cr, error < 2 and ≤ α·the mean error at
    the target cr, the smallest feasible α of 1.0..2.0), and keeping it dense always; recorded under
    ``meta.error_cap``. When no α in 1.0..2.0 is feasible (extreme ratios) every option is offered,
    with a warning, and ``meta.error_cap.alpha`` is None. ``"none"`` offers every option.

    ``method="rocket"`` is the reference's allocation (mts-ai/ROCKET, rocket/profiling/postprocess.py
    and rocket/compression/mckp.py): options from :func:`rocket_options` (no dense), filtered by
    :func:`rocket_filter`, minimising the plain Σ cost (``weighting`` and ``power`` do not apply
    and are recorded as None and 1). Where rocketkit departs from the reference: the budget and
    each option's size are rocketkit's real counts (d1·k + s·d2 over the decoder linears, the same
    budget as every method) rather than the nominal cr·numel over the decoder layers with their
    norms, so the achieved ratio is never below ``ratio``; the DP is exact (errors not rounded to
    1e-6, sizes rounded up, not to nearest); and a layer the filter empties keeps its lowest-error
    compressed option, where the reference's solver could leave it dense.
    """
    ratio = check_ratio(ratio)
    a = check_cost(cost, alpha)
    power = check_power(power)
    weighting = check_weighting(weighting)
    error_cap = check_error_cap(error_cap)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not profile.layers:
        raise ValueError("profile has no layers")
    w = _weights(profile, weighting)
    dense = profile.dense_params()
    budget = int(math.floor((1.0 - ratio) * dense))
    names = list(profile.layers)
    meta = {}
    if method == "rocket":  # the reference's plain Σ cost
        power, weighting = 1, None
        w = _weights(profile, None)
    if method in ("uniform", "svdllm"):
        choice, moved = _uniform(profile, ratio, cost, alpha, budget, ks=1.0 if method == "svdllm" else None)
        meta["moved_up_one_cr"] = moved
        lower_bound, curve_p, curve_e = None, [], []
    else:
        from rocketkit._native import solve_mckp

        if method == "rocket":
            options = [rocket_options(profile.layers[n], cost, alpha) for n in names]
            filt = rocket_filter(options, ratio, budget)
            options = [o.take(k) for o, k in zip(options, filt.keep)]
            meta["rocket"] = {"alpha": filt.alpha, "reference_error": filt.reference_error,
                              "threshold": filt.threshold, "options": int(sum(len(o.index) for o in options)),
                              "emptied_layers": [names[l] for l in filt.emptied]}
        elif error_cap == "alpha":
            options, meta["error_cap"] = capped_options(profile, names, cost, alpha, ratio, budget)
        else:
            options = [layer_options(profile.layers[n], cost, alpha) for n in names]
            meta["error_cap"] = None
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
        meta={"buckets": int(buckets), "profile": {k: v for k, v in profile.meta.items() if k in ("crs", "kss", "model_type", "tokens")},
              **meta},
    )


def _uniform(profile: Profile, ratio: float, cost: str, alpha, budget: int,
             ks: float | None = None) -> tuple[dict[str, int], list[str]]:
    """Every layer at the grid cr nearest ``ratio`` (among the layer's feasible crs), best ks by cost
    (or the given ``ks``: a layer without that ks at any cr stays dense). The grid's k and s are
    rounded, so the total can miss the budget by a few parameters: then layers move one cr up, the
    least cost increase per parameter saved first, until it fits (the achieved ratio is never below
    the target). Returns the choice and the layers moved."""
    if ks is not None and not np.isclose(np.asarray(profile.kss, dtype=np.float64), ks).any():
        raise ValueError(f"[allocate] the profile's grid has no ks = {ks:g} (its kss: {list(profile.kss)})")

    def best_at(lp, on, cr, c):
        at = np.flatnonzero((lp.grid.cr == cr) & on)
        return int(at[np.lexsort((lp.grid.params[at], c[at]))[0]])

    choice, moved, state = {}, [], {}
    for n, lp in profile.layers.items():
        g = lp.grid
        on = np.ones(len(g), dtype=bool) if ks is None else np.isclose(g.ks, ks)
        if not on.any():
            choice[n] = -1
            continue
        crs = np.unique(g.cr[on])
        c = candidate_cost(lp, cost, alpha)
        j = int(np.argmin(np.abs(crs - ratio)))
        choice[n] = best_at(lp, on, crs[j], c)
        state[n] = (on, crs, j, c)
    total = sum(profile.layers[n].dense_params if i < 0 else int(profile.layers[n].grid.params[i])
                for n, i in choice.items())
    while total > budget:
        best = None
        for n, (on, crs, j, c) in state.items():
            if j + 1 < len(crs):
                lp, cur = profile.layers[n], choice[n]
                nxt = best_at(lp, on, crs[j + 1], c)
                saved = int(lp.grid.params[cur]) - int(lp.grid.params[nxt])
                if saved > 0:
                    key = (float(c[nxt] - c[cur]) / saved, n)
                    best = min(best, (key, n, nxt, saved)) if best is not None else (key, n, nxt, saved)
        if best is None:
            break  # every layer at its largest cr: the caller reports the achieved ratio as it is
        _, n, nxt, saved = best
        on, crs, j, c = state[n]
        choice[n], state[n] = nxt, (on, crs, j + 1, c)
        total -= saved
        moved.append(n)
    return choice, moved
