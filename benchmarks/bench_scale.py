"""Depth scaling of the whole streaming compress (one decoder block in memory at a time).

Writes synthetic random-weight Llama checkpoints (bf16 safetensors, one shard per block, written
block by block, small vocab to save disk) at 8B width (hidden 4096, MLP 14336, 32 heads / 8 kv
heads: kv width 1024) with 2, 4 and 8 blocks, and with ``--include-70b`` at 70B width (hidden
8192, MLP 28672, 64 / 8 heads) with 1 and 2 blocks when disk and memory allow. Each checkpoint is
compressed by ``rocketkit.pipeline.compress`` in a fresh subprocess (so its peak RSS is its own):
pass 1 (calibrate, whiten, profile every layer on the grid), the MCKP, pass 2 (factorize, write each
block's shard). The run log gives time and peak memory per stage and per block; from it the script
prints a LINEAR EXTRAPOLATION (not a measurement) to 32 and 80 blocks.

The baseline is what the streaming pipeline replaces: the whole model materialized
(``from_pretrained``), then ``profile_model``, ``allocate``, ``apply_allocation`` and
``save_compressed`` in memory. Its peak grows with depth; the streamed one does not. With
``--refcheck`` the two checkpoints are compared tensor by tensor.

On this CPU the default grid is SMALL (cr {0.3, 0.5} x ks {1, 2}: 4 candidates per layer), because
the full 294-candidate grid takes minutes per 8B-width layer; ``--grid full`` / ``reduced`` select
the others, and ``--device cuda`` runs the passes on the GPU (profiles scored there when the
extension was built with CUDA), where the full grid is the intended setting.

    python benchmarks/bench_scale.py                               # 8B width, 2,4,8 blocks, small grid
    python benchmarks/bench_scale.py --blocks 2,4 --no-baseline
    python benchmarks/bench_scale.py --blocks 4 --no-stream            # the baseline alone
    python benchmarks/bench_scale.py --width tiny --blocks 2,4 --refcheck      # quick smoke run
    python benchmarks/bench_scale.py --device cuda --grid full --include-70b   # on a GPU machine
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

import torch
from _common import cpu_name

GIB = 1024**3
MIB = 1024**2

WIDTHS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2),  # smoke test
}
GRIDS = {
    "small": ((0.3, 0.5), (1.0, 2.0)),
    "reduced": None,  # profile.REDUCED_CRS x REDUCED_KS (35)
    "full": None,  # profile.DEFAULT_CRS x DEFAULT_KS (294)
}
REAL_VOCAB = 128256  # Llama 3: what the embeddings and lm_head of a real model would add




def grid(name: str):
    from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, REDUCED_CRS, REDUCED_KS

    return {"small": GRIDS["small"], "reduced": (REDUCED_CRS, REDUCED_KS), "full": (DEFAULT_CRS, DEFAULT_KS)}[name]


def block_params(width: dict) -> int:
    h, m = width["hidden_size"], width["intermediate_size"]
    kv = h // width["num_attention_heads"] * width["num_key_value_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h


def stream_ram_estimate(width: dict, itemsize: int) -> int:
    """One block in the compute dtype, its Grams and the whitening temporaries of down_proj (~6 copies
    of an MLP² fp64 matrix between the Gram, its whitening and the native core)."""
    return block_params(width) * itemsize + 6 * width["intermediate_size"] ** 2 * 8


def write_checkpoint(folder: Path, width: dict, n_blocks: int, vocab: int, seed: int = 0) -> None:
    """Random bf16 weights, one shard per block, written block by block (never the whole model)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rocketkit.fileio import atomic_save_safetensors, atomic_write_json

    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=n_blocks, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16", **width)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    folder.mkdir(parents=True)
    atomic_write_json(folder / "config.json", json.loads(config.to_json_string(use_diff=True)))
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
        atomic_save_safetensors(folder / name, {k: tensor(k, shapes[k]) for k in keys}, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


# --------------------------------------------------------------------------- workers (subprocesses)


def _calib_ids(vocab: int, args) -> torch.Tensor:
    return torch.randint(0, vocab, (args.n_seq, args.seq_len), generator=torch.Generator().manual_seed(0))


def worker_stream(args) -> None:
    from rocketkit.pipeline import compress
    from rocketkit.runlog import vm_hwm_bytes

    crs, kss = grid(args.grid)
    vocab = json.loads((Path(args.folder) / "config.json").read_text())["vocab_size"]
    t = time.perf_counter()
    summary = compress(args.folder, args.ratio, out_dir=args.out, calib_ids=_calib_ids(vocab, args), crs=crs, kss=kss,
                       batch_size=args.batch_size, device=args.device, num_threads=args.threads,
                       dtype=getattr(torch, args.dtype), progress=False)
    wall = time.perf_counter() - t
    log = json.loads((Path(args.out) / "runlog.json").read_text())
    rank0 = log["attempts"][-1]["ranks"][0]
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": max(log["peak_rss_bytes"], vm_hwm_bytes()),
                      "stages": rank0["stages"], "blocks": rank0["blocks"],
                      "max_profiled_vs_applied_error": summary["max_profiled_vs_applied_error"],
                      "factorized_layers": summary["factorized_layers"], "layers": summary["layers"],
                      "achieved_ratio": summary["achieved_ratio"]}))


def worker_full(args) -> None:
    """The in-memory path the streaming pipeline replaces (whole model materialized)."""
    from transformers import AutoModelForCausalLM

    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation
    from rocketkit.checkpoint import save_compressed
    from rocketkit.profile import profile_model
    from rocketkit.runlog import vm_hwm_bytes
    from rocketkit.threads import pinned_threads

    crs, kss = grid(args.grid)
    times = {}
    with pinned_threads(args.threads):
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=getattr(torch, args.dtype),
                                                     local_files_only=True).to(args.device).eval()
        times["load"] = time.perf_counter() - t
        ids = _calib_ids(model.config.vocab_size, args)
        t = time.perf_counter()
        prof = profile_model(model, ids, crs=crs, kss=kss, batch_size=args.batch_size, device=args.device, progress=False)
        times["calibrate_profile"] = time.perf_counter() - t
        t = time.perf_counter()
        alloc = allocate(prof, args.ratio)
        times["allocate"] = time.perf_counter() - t
        t = time.perf_counter()
        applied = apply_allocation(model, ids, alloc, batch_size=args.batch_size, device=args.device, progress=False)
        times["factorize"] = time.perf_counter() - t
        t = time.perf_counter()
        save_compressed(model, None, alloc, args.out, applied=applied, progress=False)
        times["save"] = time.perf_counter() - t
    print(json.dumps({"peak_rss_bytes": vm_hwm_bytes(), "times": times, "wall_s": sum(times.values())}))


def run_worker(script: Path, mode: str, folder: Path, out: Path, args) -> dict:
    cmd = [sys.executable, str(script), "--worker", mode, "--folder", str(folder), "--out", str(out),
           "--grid", args.grid, "--n-seq", str(args.n_seq), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--ratio", str(args.ratio),
           "--device", args.device, "--dtype", args.dtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode} on {folder} failed:\n{res.stderr[-4000:]}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = time.perf_counter() - t
    return data


def refcheck(a: Path, b: Path) -> float:
    """Largest |difference| between the tensors of two checkpoints with the same tensor names."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            if f.name.startswith("profile"):
                continue
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        raise RuntimeError(f"refcheck: tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0 for k in ta)


# --------------------------------------------------------------------------- driver


def block_row(b: dict) -> str:
    parts = [f"{b['stage']:>9} {b['index']:>5} {b['work']:>9}", f"{b['seconds']:8.1f}"]
    for key in ("load_s", "forward_s", "profile_s", "factorize_s", "write_s"):
        v = b.get(key)
        parts.append(f"{v:8.1f}" if v is not None else f"{'-':>8}")
    parts.append(f"{b['peak_rss_bytes'] / GIB:9.2f}")
    if "cuda_max_allocated_bytes" in b:
        parts.append(f"{b['cuda_max_allocated_bytes'] / GIB:9.2f}")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="2,4,8", help="comma-separated depths at --width")
    ap.add_argument("--width", choices=("8b", "tiny"), default="8b", help="tiny: a quick smoke run")
    ap.add_argument("--include-70b", action="store_true", help="also 1 and 2 blocks at 70B width, if disk and RAM allow")
    ap.add_argument("--grid", choices=tuple(GRIDS), default=None, help="default: small on the CPU, full on CUDA")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute/save dtype")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-seq", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the materialized-model baseline")
    ap.add_argument("--baseline-max-blocks", type=int, default=4, help="run the baseline only up to this depth")
    ap.add_argument("--no-stream", action="store_true",
                    help="run only the baseline (for depths whose streamed run was measured before)")
    ap.add_argument("--refcheck", action="store_true", help="compare streamed and baseline checkpoints tensor by tensor")
    ap.add_argument("--tmp", default=None, help="where to write the checkpoints (default: system temp)")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    # internal
    ap.add_argument("--worker", choices=("stream", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.no_stream and (args.no_baseline or args.refcheck):
        ap.error("--no-stream runs the baseline alone: it cannot go with --no-baseline or --refcheck")
    if args.grid is None:
        args.grid = "full" if args.device.startswith("cuda") else "small"
    if args.worker:
        (worker_stream if args.worker == "stream" else worker_full)(args)
        return

    import rocketkit

    script = Path(__file__).resolve()
    configs = [(args.width, int(n)) for n in args.blocks.split(",") if n]
    if args.include_70b:
        configs += [("70b", 1), ("70b", 2)]
    tmp_root = Path(tempfile.mkdtemp(prefix="rk-bench-scale-", dir=args.tmp))
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    crs, kss = grid(args.grid)
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    dev = args.device
    if dev.startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(0)}; profiles on the GPU: {rocketkit.has_cuda()})"
    print(f"device: {dev}; host {cpu_name()}, {os.cpu_count()} cores, {mem_total / GIB:.1f} GiB RAM; torch "
          f"{torch.__version__}; rocketkit {rocketkit.__version__}; threads {args.threads}")
    print(f"calibration: {args.n_seq} x {args.seq_len} random tokens, batch {args.batch_size}; ratio {args.ratio}; "
          f"checkpoints bf16, computed and saved in {args.dtype}; vocab {args.vocab}")
    print(f"grid: {args.grid.upper()} ({len(crs)} cr x {len(kss)} ks = {len(crs) * len(kss)} candidates per layer)"
          + ("  <- NOT the 294-candidate default grid (too slow on a CPU); pass --grid full for it"
             if args.grid != "full" else ""))
    results = {"device": dev, "host": cpu_name(), "cores": os.cpu_count(), "args": vars(args), "runs": []}
    try:
        for width_name, n in configs:
            width = WIDTHS[width_name]
            bp = block_params(width)
            disk_need = (bp * n + 2 * args.vocab * width["hidden_size"]) * (2 + itemsize)  # source + output
            free = shutil.disk_usage(tmp_root).free
            ram_need = stream_ram_estimate(width, itemsize)
            if disk_need > 0.8 * free:
                print(f"\nskip {width_name} x{n}: needs {disk_need / GIB:.1f} GiB disk, {free / GIB:.1f} free")
                continue
            if ram_need > 0.8 * mem_total:
                print(f"\nskip {width_name} x{n}: streaming needs ~{ram_need / GIB:.1f} GiB RAM (one block, its Grams "
                      f"and down_proj's whitening), this machine has {mem_total / GIB:.1f}")
                continue
            folder = tmp_root / f"{width_name}-{n}"
            t = time.perf_counter()
            write_checkpoint(folder, width, n, args.vocab)
            print(f"\n== {width_name} width x {n} blocks: hidden {width['hidden_size']}, MLP {width['intermediate_size']}, "
                  f"heads {width['num_attention_heads']}/{width['num_key_value_heads']}; {bp / 1e6:.1f}M params/block "
                  f"({bp * 2 / GIB:.2f} GiB bf16, {bp * 4 / GIB:.2f} GiB fp32); checkpoint written in "
                  f"{time.perf_counter() - t:.1f}s")
            run = {"width": width_name, "blocks": n, "block_params": bp}
            if not args.no_stream:
                run["stream"] = stream_report(run_worker(script, "stream", folder, tmp_root / f"out-{width_name}-{n}", args),
                                              args)
            full_ram = bp * n * itemsize + ram_need
            if not args.no_baseline and n <= args.baseline_max_blocks and full_ram < 0.6 * mem_total:
                run["full"] = f = run_worker(script, "full", folder, tmp_root / f"full-{width_name}-{n}", args)
                print(f"  baseline (whole model materialized, in-memory profile/apply/save): wall {f['wall_s']:.1f}s, "
                      f"peak RSS {f['peak_rss_bytes'] / GIB:.2f} GiB")
                if "stream" in run:
                    s = run["stream"]
                    print(f"  streaming/baseline: time {s['wall_s'] / f['wall_s']:.2f}x, "
                          f"peak RSS {s['peak_rss_bytes'] / f['peak_rss_bytes']:.2f}x")
                    if args.refcheck:
                        diff = refcheck(tmp_root / f"out-{width_name}-{n}", tmp_root / f"full-{width_name}-{n}")
                        run["refcheck_max_abs_diff"] = diff
                        print(f"  refcheck: streamed vs in-memory checkpoint tensors, max |diff| = {diff:.3g} "
                              f"({'OK' if diff == 0 else 'DIFFERENT'})")
                shutil.rmtree(tmp_root / f"full-{width_name}-{n}", ignore_errors=True)
            elif not args.no_baseline:
                print(f"  baseline skipped (depth > {args.baseline_max_blocks} or ~{full_ram / GIB:.1f} GiB needed)")
            results["runs"].append(run)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(tmp_root / f"out-{width_name}-{n}", ignore_errors=True)
        summarize(results, itemsize)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    if args.json:
        from rocketkit.fileio import atomic_write_json

        atomic_write_json(args.json, results)


def stream_report(s: dict, args) -> dict:
    print(f"  {'stage':>9} {'block':>5} {'work':>9} {'total s':>8} {'load s':>8} {'fwd s':>8} {'prof s':>8} "
          f"{'fact s':>8} {'write s':>8} {'peak GiB':>9}" + (f" {'GPU GiB':>9}" if "cuda" in args.device else ""))
    for b in s["blocks"]:
        print("  " + block_row(b))
    stages = ", ".join(f"{e['name']} {e['seconds']:.1f}s" for e in s["stages"])
    print(f"  stages: {stages}")
    print(f"  streaming: wall {s['wall_s']:.1f}s, process peak RSS {s['peak_rss_bytes'] / GIB:.2f} GiB; "
          f"{s['factorized_layers']}/{s['layers']} layers factorized, achieved ratio {s['achieved_ratio']:.3f}, "
          f"max |profiled - applied| error {s['max_profiled_vs_applied_error']:.2e}")
    return s


def summarize(results: dict, itemsize: int) -> None:
    for width in ("tiny", "8b", "70b"):
        for r in results["runs"]:
            if r["width"] == width and "stream" not in r and "full" in r:
                print(f"\n== {width} x{r['blocks']} baseline only: wall {r['full']['wall_s']:.1f}s, "
                      f"peak RSS {r['full']['peak_rss_bytes'] / GIB:.2f} GiB")
        runs = [r for r in results["runs"] if r["width"] == width and "stream" in r]
        if not runs:
            continue
        print(f"\n== {width} width summary (measured)")
        per_block, fixed = [], []
        for r in runs:
            s = r["stream"]
            work = [b for b in s["blocks"] if b["work"] == b["stage"]]
            block_s = sum(b["seconds"] for b in s["blocks"])
            per_block.append(block_s / r["blocks"])
            fixed.append(s["wall_s"] - block_s)
            peak = s["peak_rss_bytes"]
            base = r.get("full", {}).get("peak_rss_bytes")
            prof = [b["seconds"] for b in work if b["stage"] == "profile"]
            fact = [b["seconds"] for b in work if b["stage"] == "factorize"]
            print(f"  {r['blocks']:>2} blocks: wall {s['wall_s']:7.1f}s = {block_s:7.1f}s in blocks "
                  f"(pass 1 {sum(prof) / len(prof):.1f}s/block, pass 2 {sum(fact) / len(fact):.1f}s/block) + "
                  f"{s['wall_s'] - block_s:.1f}s outside; peak RSS streaming {peak / GIB:.2f} GiB"
                  + (f", materialized {base / GIB:.2f} GiB" if base else ""))
        t_block = sum(per_block) / len(per_block)
        t_fixed = sum(fixed) / len(fixed)
        peak = max(r["stream"]["peak_rss_bytes"] for r in runs)
        emb = 2 * REAL_VOCAB * WIDTHS[width]["hidden_size"] * itemsize
        print(f"  EXTRAPOLATION (not measured): linear in depth, {t_block:.1f}s per block (both passes) + "
              f"{t_fixed:.1f}s outside the blocks; peak RSS taken as depth-independent at the measured max "
              f"{peak / GIB:.2f} GiB (with vocab {results['args']['vocab']}):")
        for n in (32, 80):
            print(f"    {n} blocks: ~{(t_fixed + n * t_block) / 60:.1f} min on one process (/N over N ranks, "
                  f"forwards excepted), peak RSS ~{peak / GIB:.2f} GiB + {emb / GIB:.1f} GiB embeddings/lm_head "
                  f"at a {REAL_VOCAB} vocab")


if __name__ == "__main__":
    main()
