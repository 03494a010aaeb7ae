"""The whole compress job with pass 1's whitening cache against recomputing pass 2 (``--cache-budget 0``).

Part 1, SmolLM2 (the README's job): ``python -m rocketkit compress smollm2 ...`` runs twice in fresh
processes, with the cache (``auto``) and without it (``0``: pass 2 streams the calibration forward
and the Grams again). It prints each run's stage table (seconds, peak RSS), the wall-time ratio,
and checks that the two checkpoints are the same bytes (every file but runlog.json).

Part 2 (``--width 8b``): synthetic Llama-3-8B-width checkpoints (bench_scale's writer) with
``--blocks`` decoder blocks, streamed with the cache: per-block seconds of pass 1 and pass 2 and
the peak RSS per depth (flat with depth is the point).

    python benchmarks/bench_pipeline.py                                  # README job, both ways
    python benchmarks/bench_pipeline.py --calib-tokens 16384 --grid reduced --eval-tokens 0   # quicker
    python benchmarks/bench_pipeline.py --skip-smollm2 --width 8b --blocks 1,2 --grid small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_line  # noqa: E402

GIB = 1024**3
TIMING_FILES = {"runlog.json"}


def run_compress(model: str, out: Path, args, cache: str, extra=()) -> dict:
    cmd = [sys.executable, "-m", "rocketkit", "compress", model, "--ratio", str(args.ratio), "--calib-tokens",
           str(args.calib_tokens), "--eval-tokens", str(args.eval_tokens), "--grid", args.grid, "--threads",
           str(args.threads), "--cache-budget", cache, "--out", str(out), "--no-progress", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    log = json.loads((out / "runlog.json").read_text())
    rank = log["attempts"][-1]["ranks"][0]
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "peak_rss_bytes": log["peak_rss_bytes"], "table": log["stage_table"], "blocks": rank["blocks"],
            "ppl_after": summary.get("ppl_after"), "achieved_ratio": summary["achieved_ratio"],
            "max_err": summary["max_profiled_vs_applied_error"]}


def same_bytes(a: Path, b: Path) -> list[str]:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if n not in TIMING_FILES
            and (not (a / n).is_file() or not (b / n).is_file() or (a / n).read_bytes() != (b / n).read_bytes())]


def smollm2(args, tmp: Path) -> None:
    print(f"\n== SmolLM2-135M: ratio {args.ratio}, {args.calib_tokens} calibration tokens, grid {args.grid}, "
          f"{args.eval_tokens} eval tokens, {args.threads} threads")
    runs = {cache: run_compress("smollm2", tmp / f"smollm2-{cache}", args, cache) for cache in ("auto", "0")}
    stages = [r["stage"] for r in runs["auto"]["table"]]
    print(f"{'stage':<18} {'cache (s)':>10} {'recompute (s)':>14} {'ratio':>7}")
    for name in stages:
        a = next(r["seconds"] for r in runs["auto"]["table"] if r["stage"] == name)
        b = next((r["seconds"] for r in runs["0"]["table"] if r["stage"] == name), float("nan"))
        print(f"{name:<18} {a:>10.1f} {b:>14.1f} {b / a if a > 0 else float('nan'):>6.2f}x")
    for cache, r in runs.items():
        print(f"cache {cache:>4}: process wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, "
              f"PPL after {r['ppl_after']}, achieved ratio {r['achieved_ratio']:.4f}, max |profiled - applied| {r['max_err']:.1e}")
    print(f"wall ratio recompute / cache: {runs['0']['wall_s'] / runs['auto']['wall_s']:.2f}x")
    diff = same_bytes(tmp / "smollm2-auto", tmp / "smollm2-0")
    print("checkpoints identical (all files but runlog.json)" if not diff else f"CHECKPOINTS DIFFER: {diff}")


def wide(args, tmp: Path) -> None:
    import bench_scale

    width = bench_scale.WIDTHS[args.width]
    print(f"\n== {args.width} width {width}, grid {args.grid}, {args.n_seq}x{args.seq_len} random calibration tokens, "
          f"cache auto, {args.threads} threads (synthetic bf16 weights, computed in {args.dtype})")
    print(f"{'blocks':>6} {'wall (s)':>9} {'pass 1 / block (s)':>19} {'pass 2 / block (s)':>19} {'peak RSS':>10}")
    for n in args.blocks:
        folder = tmp / f"{args.width}-{n}"
        bench_scale.write_checkpoint(folder, width, n, vocab=args.vocab)
        out = tmp / f"{args.width}-{n}-out"
        cmd = [sys.executable, str(Path(bench_scale.__file__)), "--worker", "stream", "--folder", str(folder), "--out",
               str(out), "--grid", args.grid, "--threads", str(args.threads), "--dtype", args.dtype, "--n-seq",
               str(args.n_seq), "--seq-len", str(args.seq_len)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        p1 = [b["seconds"] for b in res["blocks"] if b["stage"] == "profile"]
        p2 = [b["seconds"] for b in res["blocks"] if b["stage"] == "factorize"]
        src = sorted({b.get("source") for b in res["blocks"] if b["stage"] == "factorize"})
        print(f"{n:>6} {res['wall_s']:>9.1f} {sum(p1) / len(p1):>19.1f} {sum(p2) / len(p2):>19.1f} "
              f"{res['peak_rss_bytes'] / GIB:>8.2f} GiB   (pass 2 from {', '.join(map(str, src))})")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--calib-tokens", type=int, default=131072)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--grid", choices=("full", "reduced", "small"), default="full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--width", choices=("8b", "70b", "tiny"), default=None, help="also the synthetic wide blocks")
    ap.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--n-seq", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    args = ap.parse_args()
    print(device_line())
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_pipeline.") as tmp:
        if not args.skip_smollm2:
            if args.grid == "small":
                raise SystemExit("--grid small is for the synthetic wide blocks; SmolLM2 takes full or reduced")
            smollm2(args, Path(tmp))
        if args.width:
            wide(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
