"""Benchmark: FactorizedLinear's forward against a dense nn.Linear of the same shape, side by side.

Llama-3-70B layer shapes (y = x·W, d1 = in, d2 = out): 8192×8192 (q/o), 8192×1024 (k/v),
8192×28672 (gate/up), 28672×8192 (down); or with --shapes smollm2, SmolLM2-135M's 576×576 (q/o),
576×192 (k/v), 576×1536 (gate/up), 1536×576 (down); batch 1 and 16 (--batches: any list, e.g.
1,16,256,2048 for decode through prefill and perplexity evaluation); compression ratio cr 0.3 and 0.5.
ks = 2.0 for every layer (the middle of the default grid 1.0..3.0; the allocator picks ks per
layer, and this fixes one), so by the grid formula k = round((1 − cr)·d1·d2 / (d1 + d2/ks)) and
s = floor(k/ks): parameters are (1 − cr) of dense, index bytes come on top (int16 here, k < 32768).
Factors are random; each column's indices are ascending, as rocketkit.factorize stores them.

Columns (times in ms, the median over --reps interleaved repetitions after a warm-up; the CPU
columns are process CPU time per call, which a busy machine inflates less than wall time):
  dense        torch nn.Linear (no bias), no_grad: what the factorized layer replaces
  fact         FactorizedLinear forward, no_grad (CPU: native kernel, indices validated once)
  checked      rocketkit._native.factorized_matmul, the public call (indices checked on every call)
  plan         the forward path FactorizedLinear measured and chose for this batch size (sparse: the
               native kernel; dense_c: two dense GEMMs with C densified once)
  ratio        dense / fact (> 1: factorized faster); target: > 1 whenever params% < 60, and
               >= 1.3 at n >= 2048
  csr          with --csr: the torch CSR product FactorizedLinear used before the native kernel

    python benchmarks/bench_infer.py                  # all shapes, CPU (and CUDA when available)
    python benchmarks/bench_infer.py --quick          # 8192×8192 only
    python benchmarks/bench_infer.py --shapes smollm2 --batches 1,16,256,2048
    python benchmarks/bench_infer.py --refcheck       # compare with an fp64 reference on 64 columns
    python benchmarks/bench_infer.py --threads 1      # single-threaded, both sides
    python benchmarks/bench_infer.py --device cuda    # GPU only (CUDA events)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import time

import numpy as np
import torch

from rocketkit._native import factorized_matmul
from rocketkit.modules import FactorizedLinear, _batch_bucket
from _common import cpu_name, peak_rss_mib

SHAPES = {"70b": [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)],
          "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576)]}
BATCHES = [1, 16]
LARGE_N, LARGE_N_TARGET = 2048, 1.3
CRS = [0.3, 0.5]
KS = 2.0
TARGET_PARAMS = 0.60






def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def grid_ks(d1: int, d2: int, cr: float, ks: float) -> tuple[int, int]:
    k = int(round((1 - cr) * d1 * d2 / (d1 + d2 / ks)))
    return k, max(1, int(np.floor(k / ks)))


def make_factors(rng, d1, d2, k, s):
    U = torch.from_numpy(rng.standard_normal((d1, k), dtype=np.float32)).div_(float(np.sqrt(d1)))
    values = torch.from_numpy(rng.standard_normal((s, d2), dtype=np.float32))
    idx_dtype = np.int16 if k <= 32767 else np.int32
    # Ascending per column (factorize's layout); drawn with replacement to keep set-up fast.
    indices = torch.from_numpy(np.sort(rng.integers(0, k, size=(d2, s), dtype=idx_dtype), axis=1).T.copy())
    return U, values, indices


def time_cpu(fns: dict, reps: int) -> dict:
    """Median wall and CPU ms per call of each fn, repetitions interleaved so that load spikes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (1e3 * float(np.median(wall[k])), 1e3 * float(np.median(cpu[k]))) for k in fns}


def time_cuda(fns: dict, reps: int) -> dict:
    out = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        out[name] = (float(np.median(times)), float("nan"))
    return out


def refcheck(layer: FactorizedLinear, x: torch.Tensor, y: torch.Tensor, rng) -> float:
    cols = np.sort(rng.choice(layer.out_features, 64, replace=False))
    idx = layer.C_indices[:, cols].long().cpu()
    C = torch.zeros(layer.k, cols.size, dtype=torch.float64).scatter_add_(0, idx, layer.C_values[:, cols].detach().double().cpu())
    ref = x.double().cpu() @ layer.U.detach().double().cpu() @ C
    return float((y[:, cols].double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the first shape (8192×8192)")
    ap.add_argument("--shapes", choices=tuple(SHAPES), default="70b")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes n")
    ap.add_argument("--refcheck", action="store_true", help="check the factorized output against an fp64 reference")
    ap.add_argument("--csr", action="store_true", help="also time the torch CSR product (the previous forward)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="threads for torch and the native kernel (0: torch's default)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the CPU, then CUDA when a GPU is visible")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches: positive integers, got {args.batches!r}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    devices = ["cpu"] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU visible")
        devices.append("cuda")

    load = os.getloadavg()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"torch {torch.__version__}, {threads} threads for both sides")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"fp32; ks = {KS} for every layer; ms = median of {args.reps} interleaved runs after a warm-up; "
          f"cpu = process CPU ms per call; ratio = dense / fact")
    hdr = (f"{'dev':>4} {'d1×d2':>12} {'n':>4} {'cr':>4} {'k':>5} {'s':>5} {'params%':>7} {'bytes%':>6} "
           f"{'dense ms':>9} {'cpu':>7} {'fact ms':>8} {'cpu':>7} {'plan':>7} {'checked':>8} {'ratio':>6} {'target':>6}")
    if args.csr:
        hdr += f" {'csr ms':>8}"
    print(hdr + f" {'peak RSS GB':>11}")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    missed = []
    shapes = SHAPES[args.shapes]
    for d1, d2 in shapes[:1] if args.quick else shapes:
        dense_cpu = torch.nn.Linear(d1, d2, bias=False).requires_grad_(False)
        for cr in CRS:
            k, s = grid_ks(d1, d2, cr, KS)
            U, values, indices = make_factors(rng, d1, d2, k, s)
            layer_cpu = FactorizedLinear.from_factors(U, values, indices, bias=None).requires_grad_(False)
            del U, values, indices
            params = layer_cpu.weight_params
            nbytes = sum(t.numel() * t.element_size() for t in (layer_cpu.U, layer_cpu.C_values, layer_cpu.C_indices))
            for device in devices:
                # Module.to moves in place: the GPU gets copies.
                dense = dense_cpu if device == "cpu" else copy.deepcopy(dense_cpu).to(device)
                layer = layer_cpu if device == "cpu" else copy.deepcopy(layer_cpu).to(device)
                for n in batches:
                    x = torch.from_numpy(rng.standard_normal((n, d1), dtype=np.float32)).to(device)
                    fns = {"dense": lambda: dense(x), "fact": lambda: layer(x)}
                    if device == "cpu":
                        fns["checked"] = lambda: factorized_matmul(x, layer.U, layer.C_values, layer.C_indices,
                                                                   num_threads=threads)
                    if args.csr:
                        fns["csr"] = lambda: layer._csr_t() @ (x @ layer.U).T
                    with torch.no_grad():
                        t = time_cpu(fns, args.reps) if device == "cpu" else time_cuda(fns, args.reps)
                    ratio = t["dense"][0] / t["fact"][0]
                    below = params / (d1 * d2) < TARGET_PARAMS
                    need = LARGE_N_TARGET if n >= LARGE_N else 1.0
                    target = ("met" if ratio > need else "MISSED") if below else "-"
                    if target == "MISSED":
                        missed.append((device, d1, d2, n, cr))
                    checked = f"{t['checked'][0]:>8.2f}" if "checked" in t else f"{'-':>8}"
                    plan = layer.forward_plan.get(_batch_bucket(n), "-") if device == "cpu" else "-"
                    row = (f"{device:>4} {d1:>5}×{d2:<6} {n:>4} {cr:>4} {k:>5} {s:>5} {100 * params / (d1 * d2):>6.1f}% "
                           f"{100 * nbytes / (4 * d1 * d2):>5.1f}% {t['dense'][0]:>9.2f} {t['dense'][1]:>7.1f} "
                           f"{t['fact'][0]:>8.2f} {t['fact'][1]:>7.1f} {plan:>7} {checked} {ratio:>6.2f} {target:>6}")
                    if args.csr:
                        row += f" {t['csr'][0]:>8.2f}"
                    print(row + f" {(peak_rss_mib() / 1024):>11.2f}", flush=True)
                    if args.refcheck:
                        with torch.no_grad():
                            err = refcheck(layer, x, layer(x), rng)
                        print(f"    refcheck: max rel error {err:.2e} on 64 columns: {'ok' if err < 1e-4 else 'MISMATCH'}")
                if device != "cpu":
                    del dense, layer
                    torch.cuda.empty_cache()
            del layer_cpu
            gc.collect()
        del dense_cpu
        gc.collect()
    print(f"current RSS {current_rss_gb():.2f} GB, peak RSS {(peak_rss_mib() / 1024):.2f} GB")
    if missed:
        print("target missed (params < 60% of dense but not faster):", missed)
    else:
        print(f"target met: factorized faster than dense wherever its parameters are below 60% of dense "
              f"(>= {LARGE_N_TARGET}x at n >= {LARGE_N})")


if __name__ == "__main__":
    main()
