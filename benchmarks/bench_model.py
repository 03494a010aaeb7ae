"""Benchmark: whole compressed models against their dense original, side by side in one run.

Compresses nothing: it loads each rocketkit checkpoint given and the dense model it came from, and
measures, for each, in a child process of its own (so that each peak RSS is that model's alone):

  ppl s        held-out perplexity evaluation (rocketkit.evaluate.perplexity, batches of 4×512 tokens,
               as the compress job's "perplexity after" stage): seconds, first call included (that is
               where FactorizedLinear measures its forward plans)
  ppl          the perplexity itself (the same model must give the same number, whichever plan ran)
  prefill tok/s  one forward of a 2048-token sequence (n = 2048 rows per linear), median after a warm-up
  gen tok/s    generate() at batch 1, greedy, a fixed count of new tokens (n = 1 per linear)
  peak RSS     the child's peak resident memory (VmHWM), GiB

Ratios are dense / compressed for times, compressed / dense for rates (> 1: compressed faster).

    python benchmarks/bench_model.py /tmp/ck-40 /tmp/ck-20               # dense = the checkpoints' base
    python benchmarks/bench_model.py /tmp/ck-40 --eval-tokens 4096 --threads 1
    python benchmarks/bench_model.py /tmp/ck-40 --layers                 # + bench_infer's 70B shapes, n to 2048

Make checkpoints for it quickly (quality does not matter for speed):
    python -m rocketkit compress smollm2 --ratio 0.4 --calib-tokens 4096 --grid reduced --eval-tokens 0 --out /tmp/ck-40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(args) -> None:
    import torch

    from rocketkit.checkpoint import load_pretrained
    from rocketkit.data import heldout_ids
    from rocketkit.evaluate import perplexity
    from rocketkit.models import resolve_spec
    from rocketkit.modules import FactorizedLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from _common import peak_rss_bytes

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dense_folder = resolve_spec(args.dense)
    tok = AutoTokenizer.from_pretrained(dense_folder, local_files_only=True)
    t0 = time.perf_counter()
    if args.child == "dense":
        model = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32, local_files_only=True).eval()
    else:
        model = load_pretrained(args.child, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    model.requires_grad_(False)
    ids = heldout_ids(tok, args.eval_tokens, 512)
    out = {"load_s": load_s, "factorized": sum(isinstance(m, FactorizedLinear) for m in model.modules()),
           "params": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        t0 = time.perf_counter()
        out["ppl"] = perplexity(model, ids, batch_size=4, progress=False)
        out["ppl_s"] = time.perf_counter() - t0

        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (1, 2048), generator=g)
        model(input_ids=prompt)  # warm-up (and, for FactorizedLinear, the n = 2048 plans)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(input_ids=prompt)
            times.append(time.perf_counter() - t0)
        out["prefill_tok_s"] = 2048 / statistics.median(times)

        short = prompt[:, :32]
        kw = dict(do_sample=False, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                  pad_token_id=tok.eos_token_id)
        model.generate(short, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up, n = 1 plans
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            gen = model.generate(short, **kw)
            times.append(time.perf_counter() - t0)
        out["gen_tok_s"] = (gen.shape[1] - short.shape[1]) / statistics.median(times)
    plans = {}
    for m in model.modules():
        if isinstance(m, FactorizedLinear):
            for bucket, path in m.forward_plan.items():
                plans.setdefault(str(bucket), {}).setdefault(path, 0)
                plans[str(bucket)][path] += 1
    out["plans"] = plans
    out["peak_rss_gib"] = peak_rss_bytes() / 2**30
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(spec: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--dense", args.dense,
           "--eval-tokens", str(args.eval_tokens), "--reps", str(args.reps), "--gen-tokens", str(args.gen_tokens),
           "--threads", str(args.threads)]
    # The measured per-layer plans are what this benchmark is for (the library's default is the fixed path).
    env = {**os.environ, "ROCKETKIT_FORWARD_PATH": args.forward_path}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"[bench_model] {spec}: the child failed (rc {res.returncode}):\n{res.stderr[-4000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="rocketkit checkpoint folders")
    ap.add_argument("--dense", default="smollm2", help="the dense original (a folder, .gguf or 'smollm2')")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the perplexity timing")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generate() call")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of prefill and generate (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every child (0: torch's default)")
    ap.add_argument("--forward-path", choices=("auto", "sparse", "dense_c"), default="auto",
                    help="FactorizedLinear's forward path in the children (ROCKETKIT_FORWARD_PATH)")
    ap.add_argument("--layers", action="store_true",
                    help="then run bench_infer on the 70B shapes at n = 1, 16, 256, 2048 (long on a small CPU)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if not args.checkpoints and not args.layers:
        ap.error("give at least one checkpoint (or --layers)")

    import torch

    from _common import device_line

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(device_line())
    print(f"fp32; perplexity on {args.eval_tokens} held-out tokens in batches of 4×512; prefill: 1×2048 tokens; "
          f"generate: batch 1, 32-token prompt, {args.gen_tokens} new tokens, greedy; median of {args.reps}")
    if args.checkpoints:
        results = {"dense": _run_child("dense", args)}
        for ck in args.checkpoints:
            results[ck] = _run_child(ck, args)
        d = results["dense"]
        names = list(results)
        width = max(14, *(len(Path(n).name) + 10 for n in names))
        print(f"{'':>16}" + "".join(f"{Path(n).name:>{width}}" for n in names))
        rows = [("params", "params", "{:,.0f}", None), ("factorized layers", "factorized", "{:d}", None),
                ("load s", "load_s", "{:.1f}", None), ("ppl", "ppl", "{:.4f}", None),
                ("ppl-eval s", "ppl_s", "{:.1f}", "time"), ("prefill tok/s", "prefill_tok_s", "{:.0f}", "rate"),
                ("gen tok/s", "gen_tok_s", "{:.1f}", "rate"), ("peak RSS GiB", "peak_rss_gib", "{:.2f}", None)]
        for label, key, fmt, kind in rows:
            cells = []
            for n in names:
                v = results[n][key]
                cell = fmt.format(v)
                if kind and n != "dense":
                    ratio = d[key] / v if kind == "time" else v / d[key]
                    cell += f" ({ratio:.2f}x)"
                cells.append(f"{cell:>{width}}")
            print(f"{label:>16}" + "".join(cells))
        for n in names[1:]:
            print(f"forward plans of {Path(n).name} (batch bucket: path: layers): {json.dumps(results[n]['plans'])}")
        print("ratios: dense time / compressed time, compressed rate / dense rate (> 1: compressed faster)")
    if args.layers:
        sys.stdout.flush()
        cmd = [sys.executable, str(HERE / "bench_infer.py"), "--device", "cpu", "--batches", "1,16,256,2048",
               "--reps", "3"] + (["--threads", str(args.threads)] if args.threads > 0 else [])
        subprocess.run(cmd, check=True, cwd=HERE)


if __name__ == "__main__":
    main()
