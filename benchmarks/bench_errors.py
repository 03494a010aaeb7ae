"""Benchmark of the native batched whitened errors against a per-candidate torch reconstruction.

Full default grid (cr 0.05..0.70 × ks 1.0..3.0, 294 candidates; those with k > min(d1, d2) or
no parameter saving are dropped) on synthetic layers: W with a decaying spectrum, S from the
Gram of correlated activations with a few outlier channels. The baseline does what a plain
implementation does per candidate: C = DᵀW_L, mask (same rule), D* by least squares (normal
equations, Cholesky, same ridge rule), Ŵ = S⁻¹D*C by a triangular solve, then both norms.

    python benchmarks/bench_errors.py                     # 576x1536, 1536x576, 2048x8192
    python benchmarks/bench_errors.py --quick             # small shapes only, baseline subsampled
    python benchmarks/bench_errors.py --shapes 576x1536 --threads 2 --refcheck
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import torch

from rocketkit import _native

CRS = np.round(np.arange(0.05, 0.701, 0.05), 2)  # 14
KSS = np.round(np.arange(1.0, 3.001, 0.1), 1)  # 21


def candidate_grid(d1: int, d2: int):
    """(k, s) of the default grid that fit the layer and save parameters."""
    out, total = [], 0
    for cr in CRS:
        for ks in KSS:
            total += 1
            k = int(round((1 - cr) * d1 * d2 / (d1 + d2 / ks)))
            s = max(1, int(np.floor(k / ks)))
            if k < 1 or k > min(d1, d2) or d1 * k + s * d2 >= d1 * d2:
                continue
            out.append((k, s))
    return np.array(out, dtype=np.int64).reshape(-1, 2), total


def synthetic_layer(d1: int, d2: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    r = min(d1, d2)
    Q1, _ = np.linalg.qr(rng.standard_normal((d1, r)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d2, r)))
    spectrum = (1.0 + np.arange(r)) ** -0.6
    W = (Q1 * spectrum) @ Q2.T + 0.01 * rng.standard_normal((d1, d2)) / np.sqrt(d1)
    n = 2 * d1 + 256
    mix = np.eye(d1) + 0.5 * rng.standard_normal((d1, d1)) / np.sqrt(d1)
    X = rng.standard_normal((n, d1)) @ mix
    X[:, rng.choice(d1, 4, replace=False)] *= 40.0  # outlier channels
    H = X.T @ X
    dscale = 1 / np.sqrt(np.diag(H))
    S = np.linalg.cholesky(H * dscale[:, None] * dscale[None, :]).T / dscale[None, :]
    return np.ascontiguousarray(W), np.ascontiguousarray(S)


def torch_baseline(W, S, cands):
    """Per candidate: reconstruct Ŵ and measure both norms (fp64)."""
    W = torch.from_numpy(W)
    Su = torch.triu(torch.from_numpy(S))
    WL = Su @ W
    U, sig, _ = torch.linalg.svd(WL, full_matrices=False)
    nW, nWL = torch.linalg.norm(W), torch.linalg.norm(WL)
    ew, eo = [], []
    for k, s in cands:
        D = U[:, :k]
        C = D.T @ WL
        # stable descending sort keeps the lower row first among equal |C|
        order = torch.sort(C.abs(), dim=0, descending=True, stable=True).indices[:s]
        Cm = torch.zeros_like(C).scatter_(0, order, C.gather(0, order))
        if s == k and sig[k - 1] ** 2 > 0:
            G = torch.diag(sig[:k] ** 2)
        else:
            G = Cm @ Cm.T
        eps, base = 0.0, float(torch.diagonal(G).mean()) or 1.0
        while True:
            L, info = torch.linalg.cholesky_ex(G + eps * torch.eye(k, dtype=G.dtype))
            if int(info) == 0:
                break
            eps = 1e-12 * base if eps == 0 else eps * 10
        Dstar = torch.cholesky_solve(Cm @ WL.T, L).T
        DC = Dstar @ Cm
        What = torch.linalg.solve_triangular(Su, DC, upper=True)
        ew.append(float(torch.linalg.norm(W - What) / nW))
        eo.append(float(torch.linalg.norm(WL - DC) / nWL))
    return np.array(ew), np.array(eo)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_shape(d1, d2, threads, refcheck, baseline_stride):
    W, S = synthetic_layer(d1, d2, seed=d1 * 31 + d2)
    cands, total = candidate_grid(d1, d2)
    print(f"\n== layer {d1}x{d2} (y = x·W, W is d1×d2): {len(cands)} of {total} candidates kept "
          f"(k ≤ min(d1,d2) = {min(d1, d2)} and params < d1·d2)")
    # warm-up on a few candidates
    _native.whitened_errors(W, S, cands[:2], num_threads=threads)
    t0 = time.perf_counter()
    ew, eo = _native.whitened_errors(W, S, cands, num_threads=threads)
    t_native = time.perf_counter() - t0
    print(f"rocketkit whitened_errors : {t_native:9.3f} s  ({1e3 * t_native / len(cands):8.2f} ms/candidate)  "
          f"peak RSS so far {peak_rss_mib():.0f} MiB")

    sub = np.arange(0, len(cands), baseline_stride)
    torch_baseline(W, S, cands[:1])  # warm-up
    t0 = time.perf_counter()
    bw, bo = torch_baseline(W, S, cands[sub])
    t_base = time.perf_counter() - t0
    per = t_base / len(sub)
    label = "" if baseline_stride == 1 else f"  [subsample: every {baseline_stride}th, {len(sub)} candidates, extrapolated]"
    print(f"torch baseline            : {per * len(cands):9.3f} s  ({1e3 * per:8.2f} ms/candidate){label}")
    print(f"ratio baseline / rocketkit: {per * len(cands) / t_native:9.1f}x")
    diff = max(np.abs(ew[sub] - bw).max(), np.abs(eo[sub] - bo).max())
    print(f"max |e_rocketkit - e_torch| over {len(sub)} candidates: {diff:.2e}  "
          f"(e_w range {ew.min():.3f}..{ew.max():.3f}, e_o range {eo.min():.3f}..{eo.max():.3f})")
    ok = diff <= 1e-9
    if refcheck:
        # factorize() must realise the profiled errors: measure two candidates directly
        Su = np.triu(S)
        for c in (sub[0], sub[-1]):
            k, s = cands[c]
            f = _native.factorize(W, S, int(k), int(s))
            C = np.zeros((k, d2))
            np.put_along_axis(C, f.indices.astype(np.int64), f.values, axis=0)
            R = W - f.U @ C
            mw = np.linalg.norm(R) / np.linalg.norm(W)
            mo = np.linalg.norm(Su @ R) / np.linalg.norm(Su @ W)
            d = max(abs(mw - ew[c]), abs(mo - eo[c]))
            print(f"refcheck factorize(k={k}, s={s}): |profiled - applied| = {d:.2e}")
            ok &= d <= 1e-9
    print(f"peak RSS {peak_rss_mib():.0f} MiB;  errors agree to 1e-9: {'yes' if ok else 'NO'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,1536x576,2048x8192")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores (both implementations)")
    ap.add_argument("--refcheck", action="store_true", help="also check factorize() against the profile")
    ap.add_argument("--quick", action="store_true", help="small shapes, baseline on every 5th candidate")
    ap.add_argument("--stride", type=int, default=0, help="baseline on every n-th candidate (0 = auto)")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    shapes = "256x640,640x256" if args.quick else args.shapes
    print(f"device: {cpu_model()}, {os.cpu_count()} logical cores; threads = {threads}; "
          f"torch {torch.__version__}, numpy {np.__version__}; fp64 throughout")
    ok = True
    for shape in shapes.split(","):
        d1, d2 = (int(x) for x in shape.lower().split("x"))
        stride = args.stride or (5 if args.quick else (10 if d1 * d2 > 4e6 else 1))
        ok &= bench_shape(d1, d2, threads, args.refcheck, stride)
    if not ok:
        raise SystemExit("errors differ from the baseline by more than 1e-9")


if __name__ == "__main__":
    main()
