"""Quality of the allocation: SmolLM2-135M at 20% and 40% of linear-layer parameters removed.

Rows, per ratio, all from one profile (full 294-candidate grid):
  uniform            every layer at the grid cr nearest the target, best ks by e_w (the baseline)
  weight, Σ e        knapsack minimising the plain sum of e_w (ROCKET's objective)
  output, Σ e        the same with e_o (ROCKET-ActCost's objective)
  weight, Σ share·e² rocketkit's default objective, weight cost
  output, Σ share·e² rocketkit's default objective, output cost
plus the dense model. Columns: held-out perplexity (second half of the BoolQ passages; calibration
uses the first half), achieved ratio, layers kept dense, time of each run (factorize + evaluate).

The profile and every finished row are kept in --out (JSON/safetensors, written atomically), so an
interrupted run resumes; a profile made with other settings is recomputed.

    python benchmarks/bench_quality.py                        # README settings
    python benchmarks/bench_quality.py --ratios 0.4 --grid reduced --out runs/quality-quick
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path


from _common import device_line, peak_rss_mib
from rocketkit.allocate import allocate
from rocketkit.apply import apply_allocation
from rocketkit.data import calibration_ids, heldout_ids
from rocketkit.evaluate import perplexity
from rocketkit.fileio import atomic_write_json, read_json
from rocketkit.models import load_model
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, REDUCED_CRS, REDUCED_KS, Profile, profile_model

ROWS = [  # label, cost, method, weighting, power
    ("uniform", "weight", "uniform", None, 1),
    ("weight, Σ e (ROCKET)", "weight", "mckp", None, 1),
    ("output, Σ e (ActCost)", "output", "mckp", None, 1),
    ("weight, Σ share·e² (default)", "weight", "mckp", "params", 2),
    ("output, Σ share·e² (default)", "output", "mckp", "params", 2),
]


def cached_profile(out: Path, key: dict, model, calib) -> tuple[Profile, float]:
    stem = out / "profile"
    if (out / "profile.json").is_file():
        prof = Profile.load(stem)
        if prof.meta.get("bench_key") == key:
            return prof, float(prof.meta.get("seconds", 0.0))
    prof = profile_model(model, calib, crs=key["crs"], kss=key["kss"], progress=True)
    prof.meta["bench_key"] = key
    prof.save(stem)
    return prof, float(prof.meta["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--grid", choices=("full", "reduced"), default="full")
    ap.add_argument("--out", default="runs/bench-quality")
    args = ap.parse_args()
    crs, kss = (DEFAULT_CRS, DEFAULT_KS) if args.grid == "full" else (REDUCED_CRS, REDUCED_KS)
    ratios = [float(r) for r in args.ratios.split(",")]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    lm = load_model(args.model)
    calib = calibration_ids(lm.tokenizer, args.calib_tokens, seq_len=512, seed=0)
    heldout = heldout_ids(lm.tokenizer, args.eval_tokens, seq_len=512)
    key = {"model": args.model, "calib_tokens": int(calib.numel()), "seq_len": 512, "seed": 0,
           "crs": list(crs), "kss": list(kss)}
    prof, profile_s = cached_profile(out, key, lm.model, calib)
    run_key = {**key, "eval_tokens": int(heldout.numel())}

    def run(label: str, ratio: float | None, fn) -> dict:
        path = out / "runs" / (f"{label}-{ratio}".replace(" ", "_").replace("/", "_") + ".json")
        if path.is_file():
            rec = read_json(path)
            if rec.get("key") == run_key:
                return rec
        rec = {"key": run_key, **fn()}
        atomic_write_json(path, rec)
        return rec

    def dense() -> dict:
        t = time.perf_counter()
        return {"ppl": perplexity(lm.model, heldout, batch_size=8, progress=False), "seconds": time.perf_counter() - t}

    def compressed(ratio, cost, method, weighting, power) -> dict:
        t = time.perf_counter()
        a = allocate(prof, ratio, cost=cost, method=method, weighting=weighting, power=power)
        model = copy.deepcopy(lm.model)
        applied = apply_allocation(model, calib, a, progress=False)
        ppl = perplexity(model, heldout, batch_size=8, progress=False)
        diff = max(max(abs(x.e_weight - a.layers[n].e_weight), abs(x.e_output - a.layers[n].e_output))
                   for n, x in applied.items())
        return {"ppl": ppl, "achieved_ratio": a.achieved_ratio, "dense_layers": sum(d.dense for d in a.layers.values()),
                "layers": len(a.layers), "max_profiled_vs_applied": diff, "seconds": time.perf_counter() - t}

    records = [("0%", "dense", run("dense", None, dense))]
    for ratio in ratios:
        for label, cost, method, weighting, power in ROWS:
            rec = run(label, ratio, lambda: compressed(ratio, cost, method, weighting, power))
            records.append((f"{ratio:.0%}", label, rec))
            print(f"{ratio:.0%} {label}: ppl {rec['ppl']:.3f}", flush=True)

    print(f"\n{device_line()}")
    print(f"model {args.model}; calibration {key['calib_tokens']} tokens, held-out {run_key['eval_tokens']} tokens; "
          f"grid {len(crs)} cr x {len(kss)} ks; DP buckets 50000; profile (shared by every row) {profile_s:.0f} s")
    print("\n| removed | allocation | held-out PPL | achieved ratio | layers kept dense | time (s) |")
    print("|---|---|---|---|---|---|")
    for removed, label, r in records:
        achieved = f"{r['achieved_ratio']:.4f}" if "achieved_ratio" in r else "-"
        kept = f"{r['dense_layers']} / {r['layers']}" if "layers" in r else "-"
        print(f"| {removed} | {label} | {r['ppl']:.3f} | {achieved} | {kept} | {r['seconds']:.0f} |")
    worst = max((r.get("max_profiled_vs_applied", 0.0) for _, _, r in records), default=0.0)
    print(f"\nlargest |profiled − applied| layer error over all runs: {worst:.2e}")
    by = {(removed, label): r["ppl"] for removed, label, r in records}
    for ratio in ratios:
        u = by[(f"{ratio:.0%}", "uniform")]
        for label, *_ in ROWS[1:]:
            p = by[(f"{ratio:.0%}", label)]
            print(f"{ratio:.0%} {label}: {p / u:.3f}x uniform's PPL ({'better' if p < u else 'NOT better'})")
    print(f"peak RSS {peak_rss_mib():.0f} MiB; wall time {(time.perf_counter() - t0) / 60:.1f} min "
          f"(rows already in {out} are reused)")
    atomic_write_json(out / "table.json", {"settings": run_key, "rows": [
        {"removed": a, "allocation": b, **{k: v for k, v in r.items() if k != "key"}} for a, b, r in records]})


if __name__ == "__main__":
    main()
