"""How many calibration tokens the README job needs: SmolLM2 at 40% removed, PPL after against the
calibration token count and against the job's time.

Each count runs ``python -m rocketkit compress smollm2 --ratio 0.4 --calib-tokens N --eval-tokens
16384`` in a fresh process (default cost, objective and grid), and records the held-out PPL after,
the process's wall seconds and its CPU seconds (user + system, less sensitive than wall time to
other work on the machine). Writes a JSON file and a PNG plot.

    python benchmarks/bench_calib_tokens.py --tokens 16384,32768,65536,131072,262144 --out docs/bench/calib_tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_line  # noqa: E402


def run(tokens: int, args, tmp: Path) -> dict:
    out = tmp / f"ck-{tokens}"
    cmd = [sys.executable, "-m", "rocketkit", "compress", "smollm2", "--ratio", str(args.ratio), "--calib-tokens",
           str(tokens), "--eval-tokens", str(args.eval_tokens), "--threads", str(args.threads), "--out", str(out),
           "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    table = json.loads((out / "runlog.json").read_text())["stage_table"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"calib_tokens": tokens, "ppl_before": summary["ppl_before"], "ppl_after": summary["ppl_after"],
            "achieved_ratio": summary["achieved_ratio"], "wall_s": wall, "cpu_s": cpu,
            "stages": {row["stage"]: row["seconds"] for row in table}, "load_average": os.getloadavg()[0]}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    x = [r["calib_tokens"] for r in rows]
    y = [r["ppl_after"] for r in rows]
    a.plot(x, y, "o-")
    a.set_xscale("log", base=2)
    a.set_xlabel("calibration tokens")
    a.set_ylabel("held-out PPL after (40% removed)")
    a.axhline(rows[0]["ppl_before"], ls=":", c="gray", label=f"dense {rows[0]['ppl_before']:.2f}")
    a.legend()
    for r in rows:
        a.annotate(f"{r['ppl_after']:.1f}", (r["calib_tokens"], r["ppl_after"]), textcoords="offset points", xytext=(4, 4))
    b.plot([r["cpu_s"] / 60 for r in rows], y, "o-", label="CPU minutes (user + sys)")
    b.plot([r["wall_s"] / 60 for r in rows], y, "s--", label="wall minutes")
    b.set_xlabel("minutes for the whole compress job")
    b.set_ylabel("held-out PPL after")
    b.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16384,32768,65536,131072,262144")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/calib_tokens", help="writes OUT.json and OUT.png")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.with_suffix(".json").read_text())["runs"] if out.with_suffix(".json").is_file() else []
    header = device_line()
    print(header)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_calib.") as tmp:
        for n in (int(t) for t in args.tokens.split(",")):
            if any(r["calib_tokens"] == n for r in done):
                continue  # resumable: counts already measured are kept
            r = run(n, args, Path(tmp))
            done = sorted([*done, r], key=lambda r: r["calib_tokens"])
            print(f"{n:>7} tokens: PPL {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} (ratio {r['achieved_ratio']:.4f}), "
                  f"wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s, load {r['load_average']:.1f}", flush=True)
            out.with_suffix(".json").write_text(json.dumps({"device": header, "ratio": args.ratio,
                                                            "eval_tokens": args.eval_tokens, "runs": done}, indent=1))
    plot(done, out.with_suffix(".png"), f"SmolLM2-135M, {args.ratio:.0%} removed, default cost and grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
