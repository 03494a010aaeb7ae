"""Quality of the allocation: SmolLM2-135M at 20% and 40% of linear-layer parameters removed.

Rows: the dense model; uniform allocation (every layer at the grid cr nearest the target, best ks by
e_w); the knapsack with the weight cost (ROCKET); the knapsack with the output cost (ROCKET-ActCost).
Columns: held-out perplexity (second half of the BoolQ passages; calibration uses the first half),
achieved ratio, and the time of each run. One profile (full 294-candidate grid) serves every row,
through ``rocketkit.study.run_study`` with zero-shot tasks switched off.

    python benchmarks/bench_quality.py                      # README settings
    python benchmarks/bench_quality.py --calib-tokens 8192 --grid reduced --out runs/quality-quick
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, REDUCED_CRS, REDUCED_KS
from rocketkit.study import run_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--grid", choices=("full", "reduced"), default="full")
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    crs, kss = (DEFAULT_CRS, DEFAULT_KS) if args.grid == "full" else (REDUCED_CRS, REDUCED_KS)
    ratios = [float(r) for r in args.ratios.split(",")]
    t0 = time.perf_counter()
    doc = run_study(args.model, ratios, costs=("uniform", "weight", "output"), out_dir=args.out, tasks=[],
                    calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, crs=crs, kss=kss,
                    overwrite=args.overwrite, plots=False)
    wall = time.perf_counter() - t0
    s = doc["settings"]
    print(f"\ndevice: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"model {s['model']}; calibration {s['calib_tokens']} tokens, held-out {s['eval_tokens']} tokens; "
          f"grid {len(crs)} cr x {len(kss)} ks; DP buckets {s['buckets']}")
    profile_s = sum(st["seconds"] for st in doc["stages"] if st["name"] == "profile")
    print(f"profile (shared by every row): {profile_s:.0f} s\n")
    print("| removed | allocation | held-out PPL | achieved ratio | time (s) |")
    print("|---|---|---|---|---|")
    names = {"dense": "dense", "uniform": "uniform (best ks)", "weight": "rocketkit, weight cost",
             "output": "rocketkit, output cost (ActCost)"}
    for r in doc["runs"]:
        secs = sum(st["seconds"] for st in r["stages"])
        removed = "0%" if r["cost"] == "dense" else f"{r['ratio']:.0%}"
        achieved = "-" if r["cost"] == "dense" else f"{r['achieved_ratio']:.4f}"
        print(f"| {removed} | {names[r['cost']]} | {r['ppl']:.3f} | {achieved} | {secs:.0f} |")
    print(f"\nwall time {wall / 60:.1f} min (runs already in {args.out} are reused)")
    by = {(r["cost"], r["ratio"]): r["ppl"] for r in doc["runs"]}
    for ratio in ratios:
        u, w, o = by.get(("uniform", ratio)), by.get(("weight", ratio)), by.get(("output", ratio))
        if None not in (u, w, o):
            print(f"{ratio:.0%}: knapsack vs uniform PPL: weight {w:.3f} vs {u:.3f} "
                  f"({'better' if w < u else 'NOT better'}), output {o:.3f} ({'better' if o < u else 'NOT better'})")


if __name__ == "__main__":
    main()
