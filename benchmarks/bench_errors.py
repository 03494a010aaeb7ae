"""Benchmark of the native batched whitened errors against a per-candidate torch reconstruction.

Full default grid (cr 0.05..0.70 × ks 1.0..3.0, 294 candidates; those with k > min(d1, d2) or
no parameter saving are dropped) on synthetic layers: W with a decaying spectrum, S from the
Gram of correlated activations with a few outlier channels. The baseline does what a plain
implementation does per candidate: C = DᵀW_L, mask (same rule), D* by least squares (normal
equations, Cholesky, same ridge rule), Ŵ = S⁻¹D*C by a triangular solve, then both norms.

    python benchmarks/bench_errors.py                     # 576x1536, 1536x576, 2048x8192
    python benchmarks/bench_errors.py --quick             # small shapes only, baseline subsampled
    python benchmarks/bench_errors.py --shapes 576x1536 --threads 2 --refcheck
    python benchmarks/bench_errors.py --device cuda       # 70B-shaped layers on the GPU (see bench_cuda)
    python benchmarks/bench_errors.py --smollm2-block --threads 2 --against /path/to/old/_C.so
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rocketkit import _native
from _common import cpu_name, peak_rss_mib

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


def refit_errors(W, WL, Su, Cm, G, nW, nWL) -> tuple[float, float]:
    """Both errors of one masked C: D* by normal equations (Cholesky of G = CCᵀ with the core's ridge
    rule), Ŵ = S⁻¹D*C by a triangular solve, then the norms."""
    k = G.shape[0]
    eps, base = 0.0, float(torch.diagonal(G).mean()) or 1.0
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    while True:
        L, info = torch.linalg.cholesky_ex(G + eps * eye)
        if int(info) == 0:
            break
        eps = 1e-12 * base if eps == 0 else eps * 10
    DC = torch.cholesky_solve(Cm @ WL.T, L).T @ Cm
    What = torch.linalg.solve_triangular(Su, DC, upper=True)
    return float(torch.linalg.norm(W - What) / nW), float(torch.linalg.norm(WL - DC) / nWL)


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
        G = torch.diag(sig[:k] ** 2) if s == k and sig[k - 1] ** 2 > 0 else Cm @ Cm.T
        e_w, e_o = refit_errors(W, WL, Su, Cm, G, nW, nWL)
        ew.append(e_w)
        eo.append(e_o)
    return np.array(ew), np.array(eo)






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



# ---- --smollm2-block ----------------------------------------------------------------------------
# The seven linears of one SmolLM2-135M block (d1×d2, y = x·W), grouped by the input Gram they share.
BLOCK_SMOLLM2 = [[("q", 576, 576), ("k", 576, 192), ("v", 576, 192)], [("o", 576, 576)],
                 [("gate", 576, 1536), ("up", 576, 1536)], [("down", 1536, 576)]]


def load_other_core(path: str):
    """Another build of rocketkit's native module (e.g. an older commit's _C*.so), to time side by side."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_smollm2_block(threads: int, against: str | None, repeats: int):
    """One SmolLM2 block's profile (what ``profile_block`` spends in the native core) on synthetic
    layers of its shapes, full grid, one S per shared input: this build as profile_block calls it
    (the block in one ``whitened_errors_layers`` call), and optionally another build (layer by
    layer if it predates that entry point), in the same run."""
    from rocketkit import _C

    cores = {"this build": _C}
    if against:
        cores["other build (--against)"] = load_other_core(against)
    groups = []
    for g, members in enumerate(BLOCK_SMOLLM2):
        d1 = members[0][1]
        S = synthetic_layer(d1, d1, seed=1000 + g)[1]
        layers = []
        for name, _, d2 in members:
            W = synthetic_layer(d1, d2, seed=d1 * 31 + d2 + len(layers))[0]
            layers.append((name, W, candidate_grid(d1, d2)[0]))
        groups.append((S, layers))
    n = sum(len(c) for _, layers in groups for *_, c in layers)
    names = ", ".join(f"{a} {b}x{c}" for g in BLOCK_SMOLLM2 for a, b, c in g)
    print(f"\n== one SmolLM2-135M block: {names}; {n} candidates in all, {threads} threads, best of {repeats}"
          + (f"; other build: {against}" if against else ""))

    def run(core):
        if hasattr(core, "whitened_errors_layers"):  # the whole block in one pooled call
            t0 = time.perf_counter()
            jobs = [(S, W, c) for S, layers in groups for _, W, c in layers]
            out = list(core.whitened_errors_layers([W for _, W, _ in jobs], [S for S, _, _ in jobs],
                                                   [c for *_, c in jobs], threads))
            return out, [time.perf_counter() - t0]
        out, per = [], []
        for S, layers in groups:
            for _, W, c in layers:
                t0 = time.perf_counter()
                out.append(core.whitened_errors(W, S, c, threads))
                per.append(time.perf_counter() - t0)
        return out, per

    for core in cores.values():  # warm-up
        core.whitened_errors(groups[0][1][1][1], groups[0][0], groups[0][1][1][2][:4], threads)
    best, out = {}, {}
    for _ in range(repeats):
        for label, core in cores.items():  # interleaved, so that both see the same machine load
            cpu0, t0 = time.process_time(), time.perf_counter()
            out[label], per = run(core)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            if label not in best or wall < best[label][0]:
                best[label] = (wall, cpu, per)
    for label, (wall, cpu, per) in best.items():
        detail = ("one pooled call (whitened_errors_layers)" if len(per) == 1 else
                  "  ".join(f"{name} {t:.2f}" for (name, *_), t in zip((m for g in BLOCK_SMOLLM2 for m in g), per)))
        print(f"{label:<24}: block {wall:7.3f} s wall, {cpu:7.3f} s CPU  |  {detail}")
    if against:
        (a, (wa, ca, _)), (b, (wb, cb, _)) = best.items()
        diff = max(np.abs(np.asarray(x) - np.asarray(y)).max()
                   for ra, rb in zip(out[a], out[b]) for x, y in zip(ra, rb))
        print(f"ratio other / this build: {wb / wa:7.2f}x wall, {cb / ca:.2f}x CPU; "
              f"max |e_this - e_other| {diff:.2e}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


# ---- --device cuda -----------------------------------------------------------------------------
CUDA_SHAPES = "8192x8192,8192x1024,8192x28672,28672x8192"  # q/o, k/v, gate/up, down of a 70B block
BLOCK_70B = [("q", 8192, 8192), ("k", 8192, 1024), ("v", 8192, 1024), ("o", 8192, 8192),
             ("gate", 8192, 28672), ("up", 8192, 28672), ("down", 28672, 8192)]
FP64_PEAK_TFLOPS = {"H100 PCIe": 51.0, "H100": 67.0, "H200": 67.0, "GH200": 67.0, "A100": 19.5}  # tensor-core fp64


def cuda_layer(d1: int, d2: int, seed: int):
    """Synthetic layer made on the GPU (host QRs of 28672-wide matrices would take minutes): W with
    decaying column scales, S from the Gram of correlated activations with outlier channels."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(d1, d2, generator=g, device="cuda", dtype=torch.float64) / d1 ** 0.5
    W *= (1.0 + torch.arange(d2, device="cuda", dtype=torch.float64)) ** -0.3
    n = d1 + 1024
    X = torch.randn(n, d1, generator=g, device="cuda", dtype=torch.float64)
    X[:, torch.randperm(d1, generator=g, device="cuda")[:4]] *= 40.0
    H = X.T @ X
    del X
    H += 1e-6 * H.diagonal().mean() * torch.eye(d1, device="cuda", dtype=torch.float64)
    S = torch.linalg.cholesky(H).T.contiguous()  # upper: H = SᵀS
    del H
    return W.contiguous(), S


def torch_baseline_cuda(W, S, cands):
    """The straightforward GPU implementation per candidate (fp64): basis from eigh of the smaller
    Gram of W_L, C = DᵀW_L, mask (same rule), D* by normal equations (Cholesky, same ridge rule),
    Ŵ = S⁻¹D*C by a triangular solve, then both norms. Returns (e_w, e_o, basis seconds)."""
    t0 = time.perf_counter()
    Su = torch.triu(S)
    WL = Su @ W
    d1, d2 = W.shape
    if d1 <= d2:
        lam, U = torch.linalg.eigh(WL @ WL.T)
        U = U.flip(1)
    else:
        lam, V = torch.linalg.eigh(WL.T @ WL)
        V, lam = V.flip(1), lam.flip(0)
        U = (WL @ V) / lam.clamp_min(1e-300).sqrt()
    nW, nWL = torch.linalg.norm(W), torch.linalg.norm(WL)
    torch.cuda.synchronize()
    t_basis = time.perf_counter() - t0
    ew, eo = [], []
    for k, s in cands:
        k, s = int(k), int(s)
        C = U[:, :k].T @ WL
        order = torch.sort(C.abs(), dim=0, descending=True, stable=True).indices[:s]
        Cm = torch.zeros_like(C).scatter_(0, order, C.gather(0, order))
        del C, order
        e_w, e_o = refit_errors(W, WL, Su, Cm, Cm @ Cm.T, nW, nWL)
        ew.append(e_w)
        eo.append(e_o)
        del Cm
    return np.array(ew), np.array(eo), t_basis


def gpu_peak(name: str, override: float):
    if override:
        return override
    for key in sorted(FP64_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return FP64_PEAK_TFLOPS[key]
    return 0.0


def bench_cuda_shape(d1, d2, stride, peak, svd, results):
    W, S = cuda_layer(d1, d2, seed=d1 * 31 + d2)
    cands, total = candidate_grid(d1, d2)
    print(f"\n== layer {d1}x{d2} on the GPU: {len(cands)} of {total} candidates kept")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _native.whitened_errors_cuda(W[:64, :96].contiguous(), S[:64, :64].contiguous(), cands[:1] * 0 + 1)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ew, eo, st = _native.whitened_errors_cuda(W, S, cands, svd=svd, return_stats=True)
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t0
    free, total_mem = torch.cuda.mem_get_info()
    tf = st["candidate_flops"] / max(st["candidates_seconds"], 1e-12) / 1e12
    peak_txt = f"{100 * tf / peak:.0f}% of the {peak:.0f} TFLOP/s fp64 peak" if peak else "peak unknown"
    print(f"rocketkit CUDA            : {t_gpu:9.3f} s  (basis {st['basis_seconds']:.3f} s with {st['svd']}, "
          f"candidates {st['candidates_seconds']:.3f} s on {st['streams']} streams, {st['ridge_reruns']} ridge reruns)")
    print(f"  candidate phase         : {tf:9.1f} TFLOP/s fp64 ({peak_txt}); "
          f"device memory in use now {(total_mem - free) / 2**30:.1f} GiB")
    sub = np.arange(0, len(cands), stride)
    torch_baseline_cuda(W[:256, :256].contiguous(), S[:256, :256].contiguous(), cands[:1] * 0 + 1)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bw, bo, t_basis = torch_baseline_cuda(W, S, cands[sub])
    torch.cuda.synchronize()
    t_base = time.perf_counter() - t0
    per = (t_base - t_basis) / len(sub)
    est = t_basis + per * len(cands)
    label = "" if stride == 1 else f"  [every {stride}th candidate, {len(sub)} run, extrapolated]"
    print(f"torch baseline (same GPU) : {est:9.3f} s  (basis {t_basis:.3f} s + {1e3 * per:.1f} ms/candidate){label}")
    print(f"ratio baseline / rocketkit: {est / t_gpu:9.1f}x")
    ew, eo = ew.cpu().numpy(), eo.cpu().numpy()
    diff = max(np.abs(ew[sub] - bw).max(), np.abs(eo[sub] - bo).max())
    print(f"max |e_rocketkit - e_torch| over {len(sub)} candidates: {diff:.2e}  "
          f"(e_w {ew.min():.3f}..{ew.max():.3f}, e_o {eo.min():.3f}..{eo.max():.3f})")
    print(f"peak torch GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (rocketkit's own workspace "
          f"is outside torch's allocator)")
    results[(d1, d2)] = t_gpu
    del W, S
    torch.cuda.empty_cache()


def bench_cpu_vs_cuda(shape, threads):
    d1, d2 = (int(x) for x in shape.lower().split("x"))
    W, S = synthetic_layer(d1, d2, seed=5)
    cands, total = candidate_grid(d1, d2)
    print(f"\n== rocketkit CPU path vs CUDA on {d1}x{d2} ({len(cands)} candidates, {threads} CPU threads)")
    t0 = time.perf_counter()
    cw, co = _native.whitened_errors(W, S, cands, num_threads=threads)
    t_cpu = time.perf_counter() - t0
    Wd, Sd = torch.from_numpy(W).cuda(), torch.from_numpy(S).cuda()
    _native.whitened_errors_cuda(Wd, Sd, cands[:2])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gw, go = _native.whitened_errors_cuda(Wd, Sd, cands)
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t0
    diff = max(np.abs(gw.cpu().numpy() - cw).max(), np.abs(go.cpu().numpy() - co).max())
    print(f"rocketkit CPU {t_cpu:.3f} s, CUDA {t_gpu:.3f} s: ratio {t_cpu / t_gpu:.1f}x; max |e_cuda - e_cpu| {diff:.2e}")


def main_cuda(args):
    if not (torch.cuda.is_available() and _native.has_cuda()):
        raise SystemExit("--device cuda needs a CUDA build of rocketkit and a visible GPU")
    name = torch.cuda.get_device_name()
    peak = gpu_peak(name, args.peak_tflops)
    print(f"device: {name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), host {cpu_name()} "
          f"with {os.cpu_count()} cores; torch {torch.__version__}; fp64 throughout (no TF32); SVD {args.svd}")
    results = {}
    for shape in (args.shapes or CUDA_SHAPES).split(","):
        d1, d2 = (int(x) for x in shape.lower().split("x"))
        stride = args.stride or (1 if d1 * d2 <= 2**22 else 10)
        bench_cuda_shape(d1, d2, stride, peak, args.svd, results)
    if all((d1, d2) in results for _, d1, d2 in BLOCK_70B):
        block = sum(results[(d1, d2)] for _, d1, d2 in BLOCK_70B)
        print(f"\none 70B block (q, k, v, o, gate, up, down; full grid each): {block:.1f} s; "
              f"80 blocks ≈ {80 * block / 60:.1f} min")
    if args.cpu_shape:
        bench_cpu_vs_cuda(args.cpu_shape, args.threads or os.cpu_count() or 1)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated d1xd2 (default depends on --device)")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores (both implementations)")
    ap.add_argument("--refcheck", action="store_true", help="also check factorize() against the profile")
    ap.add_argument("--quick", action="store_true", help="small shapes, baseline on every 5th candidate")
    ap.add_argument("--stride", type=int, default=0, help="baseline on every n-th candidate (0 = auto)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: rocketkit's GPU path vs a torch baseline on the same GPU (70B shapes by default)")
    ap.add_argument("--svd", default="auto", help="cuda: SVD driver (auto, gesvdp, gesvd)")
    ap.add_argument("--cpu-shape", default="1024x1024", help="cuda: also time rocketkit's CPU path on this shape")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="cuda: fp64 peak to compare with (0 = by name)")
    ap.add_argument("--smollm2-block", action="store_true",
                    help="time one SmolLM2 block's seven layers (full grid) instead of --shapes")
    ap.add_argument("--against", default=None,
                    help="--smollm2-block: also time this other build of the native module (a _C*.so path)")
    ap.add_argument("--repeats", type=int, default=1, help="--smollm2-block: best of this many runs")
    args = ap.parse_args()
    if args.device == "cuda":
        return main_cuda(args)
    args.shapes = args.shapes or "576x1536,1536x576,2048x8192"
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    shapes = "256x640,640x256" if args.quick else args.shapes
    print(f"device: {cpu_name()}, {os.cpu_count()} logical cores; threads = {threads}; "
          f"torch {torch.__version__}, numpy {np.__version__}; fp64 throughout")
    if args.smollm2_block:
        return bench_smollm2_block(threads, args.against, args.repeats)
    ok = True
    for shape in shapes.split(","):
        d1, d2 = (int(x) for x in shape.lower().split("x"))
        stride = args.stride or (5 if args.quick else (10 if d1 * d2 > 4e6 else 1))
        ok &= bench_shape(d1, d2, threads, args.refcheck, stride)
    if not ok:
        raise SystemExit("errors differ from the baseline by more than 1e-9")


if __name__ == "__main__":
    main()
