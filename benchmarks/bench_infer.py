"""Benchmark of the factorized-layer CPU kernel against a dense nn.Linear of the same shape.

Llama-3-70B layer shapes (y = x·W, d1 = in, d2 = out): 8192×8192 (q/o), 8192×28672 (gate/up),
28672×8192 (down), batch 1 and 16, compression ratio cr 0.3 and 0.5 with ks = 2 (the grid
formula: k = round((1 − cr)·d1·d2 / (d1 + d2/ks)), s = floor(k/ks)), fp32. Factors are random;
each column's indices are sorted, as rocketkit.factorize stores them. Columns:
  dense     torch nn.Linear (no bias) forward, no_grad
  native    rocketkit._native.factorized_matmul (BLAS x·U, then the column-sparse gather)
  torchcsr  FactorizedLinear's own forward (x·U, then torch CSR matmul), with --csr

    python benchmarks/bench_infer.py                 # all shapes
    python benchmarks/bench_infer.py --quick         # 8192×8192 only
    python benchmarks/bench_infer.py --refcheck      # compare native with an fp64 reference on 64 columns
    python benchmarks/bench_infer.py --threads 1     # single-threaded, both sides
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import time

import numpy as np
import torch

from rocketkit._native import factorized_matmul

SHAPES = [(8192, 8192), (8192, 28672), (28672, 8192)]
BATCHES = [1, 16]
CRS = [0.3, 0.5]
KS = 2.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def grid_ks(d1: int, d2: int, cr: float, ks: float) -> tuple[int, int]:
    k = int(round((1 - cr) * d1 * d2 / (d1 + d2 / ks)))
    return k, max(1, int(np.floor(k / ks)))


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_factors(rng, d1, d2, k, s):
    U = rng.standard_normal((d1, k), dtype=np.float32) / np.float32(np.sqrt(d1))
    values = rng.standard_normal((s, d2), dtype=np.float32)
    idx_dtype = np.int16 if k <= 32767 else np.int32
    # Sorted per column (factorize's layout); drawn with replacement to keep set-up fast.
    indices = np.sort(rng.integers(0, k, size=(d2, s), dtype=idx_dtype), axis=1).T.copy()
    return U, values, indices


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only 8192×8192")
    ap.add_argument("--refcheck", action="store_true", help="check native against an fp64 reference")
    ap.add_argument("--csr", action="store_true", help="also time FactorizedLinear's torch CSR forward")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both torch and the native kernel (0: their defaults)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0]
    print(f"device: CPU {cpu_model()}, {os.cpu_count()} cores, load average {load:.1f}; torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads; native kernel with {args.threads or os.cpu_count()} threads")
    print("fp32; times are medians of", args.reps, "runs after one warm-up; ratio = dense / native (>1: native faster)")
    hdr = f"{'d1×d2':>12} {'n':>3} {'cr':>4} {'k':>5} {'s':>5} {'params%':>7} {'bytes%':>6} " \
          f"{'dense ms':>9} {'native ms':>9} {'ratio':>6}"
    if args.csr:
        hdr += f" {'torchcsr ms':>11}"
    print(hdr + f" {'peak RSS GB':>11}")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for d1, d2 in SHAPES[:1] if args.quick else SHAPES:
        dense = torch.nn.Linear(d1, d2, bias=False)
        for cr in CRS:
            k, s = grid_ks(d1, d2, cr, KS)
            U, values, indices = make_factors(rng, d1, d2, k, s)
            params = d1 * k + s * d2
            nbytes = U.nbytes + values.nbytes + indices.nbytes
            csr_layer = None
            if args.csr:
                from rocketkit.modules import FactorizedLinear

                csr_layer = FactorizedLinear.from_factors(U, values, indices, bias=None)
            for n in BATCHES:
                x = rng.standard_normal((n, d1), dtype=np.float32)
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    t_dense = timed(lambda: dense(xt), args.reps)
                t_native = timed(lambda: factorized_matmul(x, U, values, indices, num_threads=args.threads), args.reps)
                row = (f"{d1:>5}×{d2:<6} {n:>3} {cr:>4} {k:>5} {s:>5} {100 * params / (d1 * d2):>6.1f}% "
                       f"{100 * nbytes / (4 * d1 * d2):>5.1f}% {1e3 * t_dense:>9.2f} {1e3 * t_native:>9.2f} "
                       f"{t_dense / t_native:>6.2f}")
                if csr_layer is not None:
                    with torch.no_grad():
                        row += f" {1e3 * timed(lambda: csr_layer(xt), args.reps):>11.2f}"
                print(row + f" {peak_rss_gb():>11.2f}", flush=True)
                if args.refcheck:
                    cols = np.sort(rng.choice(d2, 64, replace=False))
                    y = factorized_matmul(x, U, values, indices)[:, cols]
                    C = np.zeros((k, cols.size))
                    np.add.at(C, (indices[:, cols].astype(np.int64), np.broadcast_to(np.arange(cols.size), (s, cols.size))),
                              values[:, cols].astype(np.float64))
                    ref = x.astype(np.float64) @ U.astype(np.float64) @ C
                    err = np.abs(y - ref).max() / max(1e-30, np.abs(ref).max())
                    status = "ok" if err < 1e-4 else "MISMATCH"
                    print(f"    refcheck: max rel error {err:.2e} on 64 columns: {status}")
            del U, values, indices, csr_layer
            gc.collect()
        del dense
        gc.collect()
    print(f"current RSS {current_rss_gb():.2f} GB, peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
