"""Calibration Grams inside the forward: the native SYRK (``Gram(syrk=True)``) against torch's fp64
GEMM (rocketkit's default), and the forward alone, per decoder block of SmolLM2 at the README job's
calibration tokens, in one process.

bench_gram.py times the products alone; here they run between the block's own torch ops, where
OpenBLAS's threads and torch's contend for the cores. That is what chose the default.

    python benchmarks/bench_gram_insitu.py [--blocks 3] [--tokens 131072] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_line, peak_rss_mib  # noqa: E402


def per_block_seconds(model, ids, blocks: int, grams_for, syrk: bool) -> list[float]:
    from rocketkit import calibrate

    defaults = calibrate.Gram.__init__.__defaults__  # (tokens, skipped, syrk): the hooks build Gram(H)
    calibrate.Gram.__init__.__defaults__ = (0, 0, syrk)
    try:
        stream = calibrate.BlockStream(model, ids, batch_size=8)
        out = []
        for i in range(blocks):
            t = time.perf_counter()
            stream.run(i, grams_for=grams_for)
            out.append(time.perf_counter() - t)
            stream.release(i)
        stream.close()
        return out
    finally:
        calibrate.Gram.__init__.__defaults__ = defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from rocketkit.data import calibration_ids
    from rocketkit.models import load_model
    from rocketkit.threads import pinned_threads

    lm = load_model("smollm2")
    ids = calibration_ids(lm.tokenizer, args.tokens, seq_len=512, seed=0)
    with pinned_threads(args.threads):
        rows = {"forward + Grams, torch fp64 GEMM (default)": per_block_seconds(lm.model, ids, args.blocks, "all", False),
                "forward + Grams, native SYRK": per_block_seconds(lm.model, ids, args.blocks, "all", True),
                "forward alone (no Grams)": per_block_seconds(lm.model, ids, args.blocks, None, False)}
    print(device_line())
    print(f"SmolLM2-135M, first {args.blocks} blocks, {ids.numel()} calibration tokens ({tuple(ids.shape)}), "
          f"batches of 8, {args.threads} threads")
    for name, secs in rows.items():
        print(f"  {name:44s} per block {' '.join(f'{s:.2f}' for s in secs)} s, mean {sum(secs) / len(secs):.2f} s")
    gemm, syrk = (sum(v) for v in list(rows.values())[:2])
    print(f"SYRK / GEMM in the forward: {syrk / gemm:.2f}x the time; peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
