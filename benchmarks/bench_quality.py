"""Quality of the allocation: SmolLM2-135M at 20% and 40% of linear-layer parameters removed, every
method on one profile, with the same calibration and held-out tokens.

Rows, per ratio (all from ``rocketkit.study.run_study``, so one profile and one whitening per layer):
  uniform            every layer at the grid cr nearest the target, best ks by e_w
  SVD-LLM            every layer at that cr with ks = 1: whitened truncated SVD, no fine-tuning
  ROCKET             the reference's allocation (no dense option, α error filter, plain Σ e_w)
  ROCKET-ActCost     the same with e_o
  rocketkit weight   rocketkit's knapsack, default objective Σ share·e², weight cost
  rocketkit output   the same, output cost
  ... + refine N     the same allocation, each layer refined after allocation (--refine)
plus the dense model. Columns: held-out perplexity (second half of the BoolQ passages; calibration
uses the first half), × dense, achieved ratio, layers per cr (dense first), run time (factorize +
perplexity; the profile is shared and reported once).

The study folder (--out) keeps the profile, the whitening and every finished row, so an
interrupted run resumes.

    python benchmarks/bench_quality.py --calib-tokens 16384  --out runs/quality-16k
    python benchmarks/bench_quality.py --calib-tokens 131072 --out runs/quality-131k   # the README job's
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from _common import device_line, peak_rss_mib
from rocketkit.allocate import Allocation
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, REDUCED_CRS, REDUCED_KS
from rocketkit.study import run_study

NAMES = {"dense": "dense", "uniform": "uniform", "svdllm": "SVD-LLM", "rocket": "ROCKET",
         "rocket-actcost": "ROCKET-ActCost", "weight": "rocketkit weight", "output": "rocketkit output"}
COSTS = ["weight", "output", "uniform", "svdllm", "rocket", "rocket-actcost"]


def row_name(r: dict) -> str:
    name = NAMES[r["cost"]]
    return f"{name} + refine {r['refine']}" if r.get("refine") else name


def layers_per_cr(out: Path, r: dict) -> str:
    if not r.get("allocation"):
        return "-"
    a = Allocation.load(out / r["allocation"]["file"])
    counts = Counter("dense" if d.dense else f"{d.cr:g}" for d in a.layers.values())
    order = sorted(counts, key=lambda c: -1.0 if c == "dense" else float(c))
    return " ".join(f"{c}:{counts[c]}" for c in order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--refine", default="0,1", help="rocketkit's rows once per value (baselines are never refined)")
    ap.add_argument("--grid", choices=("full", "reduced"), default="full")
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--json", default=None, help="also write the table here")
    ap.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: torch's default)")
    args = ap.parse_args()
    crs, kss = (DEFAULT_CRS, DEFAULT_KS) if args.grid == "full" else (REDUCED_CRS, REDUCED_KS)
    ratios = [float(r) for r in args.ratios.split(",")]
    refines = [int(n) for n in args.refine.split(",")]
    out = Path(args.out)
    t0 = time.perf_counter()
    doc = run_study(args.model, ratios, COSTS, out_dir=out, tasks=[], calib_tokens=args.calib_tokens,
                    eval_tokens=args.eval_tokens, crs=crs, kss=kss, plots=False, refines=refines, progress=False,
                    num_threads=args.threads)
    profile_s = sum(s["seconds"] for s in doc["stages"] if s["name"] == "profile")
    dense = next(r["ppl"] for r in doc["runs"] if r["cost"] == "dense")

    print(device_line())
    s = doc["settings"]
    print(f"model {args.model}; calibration {s['calib_tokens']} tokens, held-out {s['eval_tokens']} tokens; "
          f"grid {len(crs)} cr x {len(kss)} ks; DP buckets {s['buckets']}; profile (shared by every row) "
          f"{profile_s:.0f} s{' (reused)' if not profile_s else ''}")
    print("\n| removed | allocation | held-out PPL | × dense | achieved ratio | layers per cr | mean e_o profiled → applied | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for r in doc["runs"]:
        secs = sum(st["seconds"] for st in r["stages"] if st["name"] != "allocate")
        errs = (f"{r['output_error_profiled_mean']:.4f} → {r['output_error_applied_mean']:.4f}"
                if "output_error_applied_mean" in r else "-")
        row = {"removed": r["ratio"], "allocation": row_name(r), "ppl": r["ppl"], "x_dense": r["ppl"] / dense,
               "achieved_ratio": r["achieved_ratio"] if r["cost"] != "dense" else None,
               "layers_per_cr": layers_per_cr(out, r), "errors": errs, "seconds": secs,
               "max_profiled_vs_applied": r.get("max_profiled_vs_applied_error")}
        rows.append(row)
        achieved = f"{row['achieved_ratio']:.4f}" if row["achieved_ratio"] is not None else "-"
        print(f"| {r['ratio']:.0%} | {row['allocation']} | {r['ppl']:.3f} | {row['x_dense']:.2f} | {achieved} | "
              f"{row['layers_per_cr']} | {errs} | {secs:.0f} |")
    unrefined = [r for r in doc["runs"] if r["cost"] != "dense" and not r.get("refine")]
    worst = max((r["max_profiled_vs_applied_error"] for r in unrefined), default=0.0)
    print(f"\nlargest |profiled − applied| layer error over the unrefined runs: {worst:.2e}")
    for ratio in ratios:
        here = {row_name(r): r["ppl"] for r in doc["runs"] if r["ratio"] == ratio and r["cost"] != "dense"}
        best_base = min(here[NAMES[c]] for c in ("uniform", "svdllm", "rocket", "rocket-actcost"))
        for name, ppl in here.items():
            if name.startswith("rocketkit"):
                verdict = "beats every baseline" if ppl < best_base else "does NOT beat the best baseline"
                print(f"{ratio:.0%} {name}: {ppl:.3f}, {ppl / best_base:.3f}x the best baseline's {best_base:.3f} ({verdict})")
    print(f"peak RSS {peak_rss_mib():.0f} MiB; wall time {(time.perf_counter() - t0) / 60:.1f} min "
          f"(rows already in {out} are reused)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": s, "dense_ppl": dense, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
