"""Depth scaling of streaming calibration + whitening + profiling (one decoder block in memory).

Writes synthetic random-weight Llama checkpoints (bf16 safetensors, one shard per block, small
vocab to save disk) at 8B width (hidden 4096, MLP 14336, 32 heads / 8 kv heads) with 2, 4, 8
blocks into a temp folder, then per checkpoint, in a fresh subprocess (so peak RSS is its own):
``open_streaming`` -> ``stream_blocks`` -> whiten each distinct Gram -> ``whitened_errors`` of every
linear on the candidate grid. Prints per-block wall time (load / calibrate / whiten / profile) and
per-block peak RSS (VmHWM reset per block), then a LINEAR EXTRAPOLATION (not a measurement) to 32
and 80 blocks. The baseline is the same calibration + whitening with the whole model materialized
(``from_pretrained``), profiling skipped; its peak grows with depth, the streamed one does not.

    python benchmarks/bench_scale.py                          # 2,4,8 blocks, reduced grid (35 cand.)
    python benchmarks/bench_scale.py --blocks 2,4 --n-seq 4 --seq-len 128
    python benchmarks/bench_scale.py --grid full --refcheck   # 294-candidate grid; Grams vs dense
    python benchmarks/bench_scale.py --include-70b            # + 1 and 2 blocks at 70B width
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024**3
MIB = 1024**2

WIDTHS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2),  # smoke test
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def block_params(width: dict) -> int:
    h, m = width["hidden_size"], width["intermediate_size"]
    kv = h // width["num_attention_heads"] * width["num_key_value_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h


def write_checkpoint(folder: Path, width: dict, n_blocks: int, vocab: int, seed: int = 0) -> None:
    """Random bf16 weights, one shard per block, written block by block (never the whole model)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rocketkit.fileio import atomic_write_json

    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=n_blocks, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16", **width)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def tensor(name: str, shape) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    groups = [[k for k in shapes if not k.startswith("model.layers.")]]
    groups += [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(n_blocks)]
    weight_map = {}
    for j, keys in enumerate(groups):
        name = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensor(k, shapes[k]) for k in keys}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


# --------------------------------------------------------------------------- worker (subprocess)


def worker(args) -> None:
    import numpy as np

    from rocketkit._native import whitened_errors
    from rocketkit.calibrate import stream_blocks
    from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, REDUCED_CRS, REDUCED_KS, candidate_grid, weight_f64
    from rocketkit.runlog import RunLog
    from rocketkit.whiten import whiten

    torch.set_num_threads(args.threads)
    crs, kss = (DEFAULT_CRS, DEFAULT_KS) if args.grid == "full" else (REDUCED_CRS, REDUCED_KS)
    log = RunLog(None, mode=args.worker)
    with log.stage("open") as e:
        if args.worker == "stream":
            from rocketkit.models import open_streaming

            lm = open_streaming(args.folder, dtype=torch.float32)
            model, streaming = lm.model, lm.streaming
            load_s = []
            materialize = streaming.materialize_block

            def timed(i):
                t = time.perf_counter()
                out = materialize(i)
                load_s.append(time.perf_counter() - t)
                return out

            streaming.materialize_block = timed
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32, local_files_only=True).eval()
            load_s = []
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.n_seq, args.seq_len), generator=torch.Generator().manual_seed(0))
    grams_out = {}
    it = stream_blocks(model, ids, batch_size=args.batch_size, progress=False)
    i = 0
    while True:
        with log.block(i) as entry:
            t = time.perf_counter()
            cb = next(it, None)
            if cb is not None:
                entry["name"] = cb.name
                entry["load_calibrate_s"] = time.perf_counter() - t
                entry["load_s"] = load_s[-1] if load_s else None
                t = time.perf_counter()
                whit = {id(g): whiten(g.H) for g in {id(g): g for g in cb.grams.values()}.values()}
                entry["whiten_s"] = time.perf_counter() - t
                entry["jitter_max"] = max(w.jitter for w in whit.values())
                if args.refcheck_out and i == 0:
                    grams_out.update({f"{cb.name}.{k}": g.H.clone() for k, g in cb.grams.items()})
                from rocketkit.runlog import _read_status_kib

                hwm = _read_status_kib("VmHWM")
                entry["peak_rss_before_profile_bytes"] = hwm * 1024 if hwm is not None else None
                t = time.perf_counter()
                n_cand = 0
                if args.worker == "stream":
                    for rel, lin in cb.linears.items():
                        grid = candidate_grid(lin.in_features, lin.out_features, crs, kss)
                        if not len(grid):
                            continue
                        S = np.ascontiguousarray(whit[id(cb.grams[rel])].S.numpy())
                        whitened_errors(weight_f64(lin), S, np.stack([grid.k, grid.s], axis=1),
                                        num_threads=args.threads)
                        n_cand += len(grid)
                        del S
                entry["profile_s"] = time.perf_counter() - t
                entry["candidates"] = n_cand
                del whit, cb
        if entry.get("name") is None:
            log.data["blocks"].pop()
            break
        i += 1
    if args.refcheck_out:
        from safetensors.torch import save_file

        save_file(grams_out, args.refcheck_out)
    data = log.to_dict()
    data["process_peak_rss_bytes"] = data["peak_rss_bytes"]  # getrusage alone misses peaks the resets cleared
    print(json.dumps(data))


def run_worker(script: Path, folder: Path, mode: str, args, refcheck_out: Path | None = None) -> dict:
    cmd = [sys.executable, str(script), "--worker", mode, "--folder", str(folder), "--grid", args.grid,
           "--n-seq", str(args.n_seq), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    if refcheck_out is not None:
        cmd += ["--refcheck-out", str(refcheck_out)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"worker {mode} on {folder} failed:\n{out.stderr[-4000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["wall_s"] = time.perf_counter() - t
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="2,4,8", help="comma-separated depths at --width")
    ap.add_argument("--width", choices=("8b", "tiny"), default="8b", help="tiny: a quick smoke run")
    ap.add_argument("--grid", choices=("reduced", "full"), default="reduced")
    ap.add_argument("--n-seq", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the materialized-model baseline")
    ap.add_argument("--include-70b", action="store_true", help="also 1 and 2 blocks at 70B width")
    ap.add_argument("--refcheck", action="store_true", help="block-0 Grams streamed vs materialized (smallest depth)")
    ap.add_argument("--tmp", default=None, help="where to write the checkpoints (default: system temp)")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    # internal
    ap.add_argument("--worker", choices=("stream", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--refcheck-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import rocketkit

    script = Path(__file__).resolve()
    configs = [(args.width, int(n)) for n in args.blocks.split(",") if n]
    if args.include_70b:
        configs += [("70b", 1), ("70b", 2)]
    tmp_root = Path(tempfile.mkdtemp(prefix="rk-bench-scale-", dir=args.tmp))
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"device: {cpu_name()}, {os.cpu_count()} cores, {mem_total / GIB:.1f} GiB RAM; torch {torch.__version__}; "
          f"rocketkit {getattr(rocketkit, '__version__', '?')}; threads {args.threads}")
    print(f"calibration: {args.n_seq} x {args.seq_len} tokens, batch {args.batch_size}; grid {args.grid}; "
          f"checkpoints bf16, computed in fp32; vocab {args.vocab}")
    results = {"device": cpu_name(), "cores": os.cpu_count(), "args": vars(args), "runs": []}
    try:
        for width_name, n in configs:
            width = WIDTHS[width_name]
            bp = block_params(width)
            disk_need = (bp * n + 2 * args.vocab * width["hidden_size"]) * 2
            free = shutil.disk_usage(tmp_root).free
            ram_need = bp * 4 * (n + 2)  # baseline holds the fp32 model; streaming ~ 1 block + Grams
            if disk_need > 0.8 * free:
                print(f"skip {width_name} x{n}: needs {disk_need / GIB:.1f} GiB disk, {free / GIB:.1f} free")
                continue
            folder = tmp_root / f"{width_name}-{n}"
            t = time.perf_counter()
            write_checkpoint(folder, width, n, args.vocab)
            print(f"\n== {width_name} width x {n} blocks: hidden {width['hidden_size']}, MLP {width['intermediate_size']}, "
                  f"heads {width['num_attention_heads']}/{width['num_key_value_heads']}; {bp / 1e6:.1f}M params/block "
                  f"({bp * 2 / GIB:.2f} GiB bf16, {bp * 4 / GIB:.2f} GiB fp32); checkpoint written in "
                  f"{time.perf_counter() - t:.1f}s")
            ref_path = folder / "grams-stream.safetensors" if args.refcheck and (width_name, n) == configs[0] else None
            run = {"width": width_name, "blocks": n, "block_params": bp}
            run["stream"] = stream = run_worker(script, folder, "stream", args, ref_path)
            print(f"  {'block':>5} {'load s':>7} {'load+calib s':>12} {'whiten s':>8} {'profile s':>9} "
                  f"{'cand':>5} {'peak RSS GiB':>12}")
            for b in stream["blocks"]:
                print(f"  {b['index']:>5} {b['load_s']:>7.2f} {b['load_calibrate_s']:>12.2f} {b['whiten_s']:>8.2f} "
                      f"{b['profile_s']:>9.2f} {b['candidates']:>5} {b['peak_rss_bytes'] / GIB:>12.2f}")
            print(f"  streaming: process peak RSS {stream['process_peak_rss_bytes'] / GIB:.2f} GiB, wall {stream['wall_s']:.1f}s")
            baseline_ok = not args.no_baseline and ram_need < 0.7 * mem_total
            if baseline_ok:
                run["full"] = full = run_worker(script, folder, "full", args, folder / "grams-full.safetensors" if ref_path else None)
                s_peak = max(b["peak_rss_before_profile_bytes"] or 0 for b in stream["blocks"])
                s_peak = max(s_peak, stream["stages"][0]["peak_rss_bytes"])
                f_peak = full["process_peak_rss_bytes"]
                run["stream_peak_calib_whiten_bytes"] = s_peak
                print(f"  baseline (whole model materialized) calibrate + whiten: peak RSS {f_peak / GIB:.2f} GiB, "
                      f"wall {full['wall_s']:.1f}s; streaming calibrate + whiten (before profiling) peak "
                      f"{s_peak / GIB:.2f} GiB; streaming/baseline = {s_peak / f_peak:.2f}")
            if ref_path is not None and baseline_ok:
                from safetensors.torch import load_file

                a, b = load_file(ref_path), load_file(folder / "grams-full.safetensors")
                diff = max(float((a[k] - b[k]).abs().max()) for k in a)
                run["refcheck_max_abs_diff"] = diff
                print(f"  refcheck: block-0 Grams streamed vs materialized, max |diff| = {diff:.3g} "
                      f"({'OK' if diff <= 1e-10 else 'MISMATCH'})")
            results["runs"].append(run)
            shutil.rmtree(folder)
        summarize(results)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    if args.json:
        from rocketkit.fileio import atomic_write_json

        atomic_write_json(args.json, results)


def summarize(results: dict) -> None:
    for width in ("tiny", "8b", "70b"):
        runs = [r for r in results["runs"] if r["width"] == width]
        if not runs:
            continue
        print(f"\n== {width} width summary (measured)")
        per_block = []
        for r in runs:
            blocks = r["stream"]["blocks"]
            total = sum(b["seconds"] for b in blocks)
            steady = blocks[1:] or blocks
            per_block += [b["seconds"] for b in steady]
            peak = r["stream"]["process_peak_rss_bytes"]
            base = r.get("full", {}).get("process_peak_rss_bytes")
            print(f"  {r['blocks']:>2} blocks: blocks total {total:7.1f}s, mean/block {total / len(blocks):6.1f}s, "
                  f"peak RSS streaming {peak / GIB:.2f} GiB" + (f", materialized {base / GIB:.2f} GiB" if base else ""))
        first = runs[0]["stream"]["blocks"][0]["seconds"]
        t_block = sum(per_block) / len(per_block)
        peak = max(r["stream"]["process_peak_rss_bytes"] for r in runs)
        print(f"  EXTRAPOLATION (not measured; linear in depth, block 0 {first:.1f}s + {t_block:.1f}s per further block, "
              f"peak RSS assumed depth-independent at the measured max {peak / GIB:.2f} GiB, small vocab):")
        for n in (32, 80):
            print(f"    {n} blocks: ~{(first + (n - 1) * t_block) / 60:.1f} min, peak RSS ~{peak / GIB:.2f} GiB "
                  f"(+ {2 * 128256 * WIDTHS[width]['hidden_size'] * 4 / GIB:.1f} GiB fp32 embeddings/lm_head at a 128k vocab)")


if __name__ == "__main__":
    main()
