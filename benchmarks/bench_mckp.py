"""Benchmark of the native MCKP solver against a pure-Python dictionary DP.

Synthetic ROCKET profiles at three scales (Llama-3.2-1B, Qwen3-8B, Llama-3-70B), with the
full candidate grid (14 cr × 21 ks = 294 per layer, plus the dense option) and with the best
ks per cr (14 + dense); 50,000 buckets; budget 50% of the dense parameters.

    python benchmarks/bench_mckp.py            # all scales, baseline at 112 layers × 15
    python benchmarks/bench_mckp.py --refcheck # also check the baseline's objective (default on)
    python benchmarks/bench_mckp.py --quick    # skip the slow Python baseline
    python benchmarks/bench_mckp.py --device cuda  # the DP on the GPU vs the native CPU solver, 70B scale
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import rocketkit
from _common import cpu_name, peak_rss_mib

# (name, blocks, hidden, kv width, MLP width); one block has q,k,v,o,gate,up,down.
MODELS = [
    ("Llama-3.2-1B", 16, 2048, 512, 8192),
    ("Qwen3-8B", 36, 4096, 1024, 12288),
    ("Llama-3-70B", 80, 8192, 1024, 28672),
]
CRS = np.round(np.arange(0.05, 0.701, 0.05), 2)   # 14
KSS = np.round(np.arange(1.0, 3.001, 0.1), 1)     # 21


def block_shapes(hidden: int, kv: int, mlp: int):
    """(name, d1, d2) of one decoder block's linears in y = x·W form (d1 = in, d2 = out)."""
    return [("q", hidden, hidden), ("k", hidden, kv), ("v", hidden, kv), ("o", hidden, hidden),
            ("gate", hidden, mlp), ("up", hidden, mlp), ("down", mlp, hidden)]


def synthetic_profile(blocks: int, hidden: int, kv: int, mlp: int, best_ks_only: bool, seed: int = 0):
    """Per layer: errors and params of the (cr, ks) grid plus the dense option (error 0).

    Errors grow with cr (so fall with params), depend mildly on ks, differ per layer type and
    depth, and carry 5% multiplicative noise.
    """
    rng = np.random.default_rng(seed)
    cr, ks = np.meshgrid(CRS, KSS, indexing="ij")  # 14 × 21
    errors, params = [], []
    for b in range(blocks):
        for t, (_, d1, d2) in enumerate(block_shapes(hidden, kv, mlp)):
            k = np.floor((1 - cr) * d1 * d2 / (d1 + d2 / ks)).astype(np.int64)
            s = np.floor(k / ks).astype(np.int64)
            p = d1 * k + s * d2
            scale = (0.6 + 0.8 * t / 6) * (1.3 - 0.6 * b / blocks) * rng.lognormal(0, 0.3)
            e = scale * cr ** 0.8 * (1 + 0.08 * (ks - 1.6 - 0.4 * rng.random()) ** 2)
            e = e * rng.lognormal(0, 0.05, size=e.shape)
            ok = p < d1 * d2  # a candidate must save parameters
            if best_ks_only:
                e = np.where(ok, e, np.inf)
                j = np.argmin(e, axis=1)
                rows = np.arange(len(CRS))
                keep = np.isfinite(e[rows, j])
                e, p = e[rows, j][keep], p[rows, j][keep]
            else:
                e, p = e[ok], p[ok]
            errors.append(np.append(e, 0.0))
            params.append(np.append(p, d1 * d2))
    return errors, params


def stress_profile(layers: int, cands: int, seed: int = 0):
    """No pruning possible: every candidate on its layer's Pareto front, costs spread out."""
    rng = np.random.default_rng(seed)
    errors, params = [], []
    for l in range(layers):
        params.append(np.sort(rng.choice(10**9, cands, replace=False)).astype(np.int64))
        errors.append(np.sort(rng.random(cands))[::-1] * (1 + l % 7))
    return errors, params


def python_dict_dp(errors, params, budget: int, buckets: int):
    """The straightforward DP of the reference solvers: a dict bucket → best error per layer.

    Same grid as the native solver: the slack budget − min_params is cut into `buckets`
    and every cost is rounded up. Returns (error, choice).
    """
    mins = [int(min(p)) for p in params]
    slack = budget - sum(mins)
    costs = [[-(-(int(p) - m) * buckets // slack) for p in ps] for ps, m in zip(params, mins)]
    errs = [[float(e) for e in es] for es in errors]
    dp = {0: 0.0}
    back = []
    for cl, el in zip(costs, errs):
        new, choice = {}, {}
        for b, e in dp.items():
            for c, (w, ec) in enumerate(zip(cl, el)):
                nb = b + w
                if nb > buckets:
                    continue
                v = e + ec
                old = new.get(nb)
                if old is None or v < old:
                    new[nb] = v
                    choice[nb] = c
        dp = new
        back.append(choice)
    b = min(dp, key=lambda k: (dp[k], k))
    best = dp[b]
    choice = [0] * len(costs)
    for l in range(len(costs) - 1, -1, -1):
        c = back[l][b]
        choice[l] = c
        b -= costs[l][c]
    return best, choice






def time_native(errors, params, budget, buckets, threads, repeats):
    rocketkit.solve_mckp(errors, params, budget, buckets, num_threads=threads)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sol = rocketkit.solve_mckp(errors, params, budget, buckets, num_threads=threads)
        times.append(time.perf_counter() - t0)
    return min(times), sol



def main_cuda(args):
    """The DP on the GPU (CUDA events around the per-layer kernels) against the native CPU solver
    in the same run, on the 70B-scale profiles: 560 layers × 294 (+ dense) candidates."""
    import torch

    from rocketkit import _native

    if not (torch.cuda.is_available() and rocketkit.has_cuda()):
        raise SystemExit("--device cuda needs a CUDA build of rocketkit and a visible GPU")
    print(f"device: {torch.cuda.get_device_name()} + host {cpu_name()} ({os.cpu_count()} logical cores); "
          f"rocketkit {rocketkit.__version__}; buckets {args.buckets}; CPU threads {args.threads or os.cpu_count()}; "
          f"best of {args.repeats} after a warm-up")
    hdr = (f"{'profile':<22} {'layers':>6} {'cand/layer':>10} {'kept':>7} {'GPU DP ms':>10} {'GPU call ms':>11} "
           f"{'CPU ms':>9} {'CPU/GPU DP':>10} {'CPU/GPU call':>12} {'same answer':>11}")
    print(hdr)
    print("-" * len(hdr))
    name, blocks, hidden, kv, mlp = MODELS[-1]
    cases = []
    for best_ks in (False, True):
        errors, params = synthetic_profile(blocks, hidden, kv, mlp, best_ks)
        cases.append((f"{name} {'14' if best_ks else '294'}+dense", errors, params,
                      sum(int(p[-1]) for p in params) // 2))
    errors, params = stress_profile(560, 295)
    cases.append(("stress all-Pareto 295", errors, params, sum(int(p[-1]) for p in params) // 2))
    ok = True
    for label, errors, params, budget in cases:
        e_dev = [torch.as_tensor(e, dtype=torch.float64, device="cuda") for e in errors]
        p_dev = [torch.as_tensor(p, dtype=torch.int64, device="cuda") for p in params]
        _native.solve_mckp_cuda(e_dev, p_dev, budget, args.buckets)  # warm-up
        dp_ms, call_ms = [], []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sol, ms = _native.solve_mckp_cuda(e_dev, p_dev, budget, args.buckets, return_gpu_ms=True)
            call_ms.append(1e3 * (time.perf_counter() - t0))
            dp_ms.append(ms)
        t_cpu, cpu = time_native(errors, params, budget, args.buckets, args.threads, args.repeats)
        same = (np.array_equal(sol.choice, cpu.choice) and sol.error == cpu.error and
                np.array_equal(sol.curve, cpu.curve) and sol.params <= budget)
        ok &= same
        n = sum(len(e) for e in errors)
        print(f"{label:<22} {len(errors):>6} {n / len(errors):>10.1f} {sol.kept_candidates:>7} {min(dp_ms):>10.3f} "
              f"{min(call_ms):>11.3f} {1e3 * t_cpu:>9.2f} {1e3 * t_cpu / min(dp_ms):>10.1f} "
              f"{1e3 * t_cpu / min(call_ms):>12.1f} {'yes' if same else 'NO':>11}")
    print("\nGPU DP ms: the per-layer min-plus kernels between two CUDA events (the targets' 'GPU time'); "
          "GPU call ms: the whole call, host planning (validation, pruning, LP bound) and copies included.")
    if not ok:
        raise SystemExit("the CUDA solver's answer differs from the CPU solver's")

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", type=int, default=50000)
    ap.add_argument("--threads", type=int, default=0, help="native threads (0 = all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the Python dict-DP baseline")
    ap.add_argument("--refcheck", action=argparse.BooleanOptionalAction, default=True,
                    help="check the baseline's objective against the native solver")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the GPU DP against the native CPU solver at 70B scale")
    args = ap.parse_args()
    if args.device == "cuda":
        return main_cuda(args)

    print(f"device: {cpu_name()}, {os.cpu_count()} logical cores; rocketkit {rocketkit.__version__}; "
          f"load average at start {os.getloadavg()[0]:.2f} (other processes skew the times)")
    print(f"buckets {args.buckets}, budget 50% of dense params (stress: 50% of the largest), native threads "
          f"{args.threads or os.cpu_count()}, best of {args.repeats} after a warm-up\n")
    hdr = (f"{'model':<13} {'grid':<9} {'layers':>6} {'cand/layer':>10} {'kept':>7} {'time s':>8} "
           f"{'1-thread s':>10} {'error':>10} {'lower bnd':>10} {'gap %':>7} {'params/budget':>13}")
    print(hdr)
    print("-" * len(hdr))
    cases = []
    for name, blocks, hidden, kv, mlp in MODELS:
        for best_ks in (False, True):
            errors, params = synthetic_profile(blocks, hidden, kv, mlp, best_ks)
            budget = sum(int(p[-1]) for p in params) // 2
            cases.append((name, "14+dense" if best_ks else "294+dense", errors, params, budget))
    errors, params = stress_profile(560, 295)
    cases.append(("stress", "all-Pareto", errors, params, sum(int(p[-1]) for p in params) // 2))
    baseline_case = None
    for name, grid, errors, params, budget in cases:
        t, sol = time_native(errors, params, budget, args.buckets, args.threads, args.repeats)
        t1, _ = time_native(errors, params, budget, args.buckets, 1, args.repeats)
        n = sum(len(e) for e in errors)
        gap = 100 * (sol.error - sol.lower_bound) / sol.lower_bound
        print(f"{name:<13} {grid:<9} {len(errors):>6} {n / len(errors):>10.1f} {sol.kept_candidates:>7} "
              f"{t:>8.4f} {t1:>10.4f} {sol.error:>10.5f} {sol.lower_bound:>10.5f} {gap:>7.4f} "
              f"{sol.params / budget:>13.6f}")
        if grid == "14+dense" and len(errors) == 112:
            baseline_case = (errors, params, budget, t, sol)
    print(f"\npeak RSS after the native runs: {peak_rss_mib():.0f} MiB")

    if args.quick or baseline_case is None:
        return
    errors, params, budget, t_native, sol = baseline_case
    shape = f"{len(errors)} layers × {len(errors[0])} candidates (14 best-ks + dense)"
    print(f"\nPython dict DP baseline, {shape}, {args.buckets} buckets (one run)...")
    t0 = time.perf_counter()
    py_error, py_choice = python_dict_dp(errors, params, budget, args.buckets)
    t_py = time.perf_counter() - t0
    print(f"python dict DP: {t_py:.2f} s   native: {t_native * 1e3:.2f} ms   "
          f"ratio: {t_py / t_native:.0f}×")
    print(f"peak RSS after the baseline: {peak_rss_mib():.0f} MiB")
    if args.refcheck:
        py_params = sum(int(p[c]) for p, c in zip(params, py_choice))
        diff = abs(py_error - sol.error)
        print(f"refcheck: python error {py_error:.12f} (params {py_params}), native {sol.error:.12f} "
              f"(params {sol.params}), |diff| {diff:.2e}")
        if diff > 1e-9 * max(1.0, abs(sol.error)) or py_params > budget:
            raise SystemExit("refcheck FAILED")
        print("refcheck: OK")


if __name__ == "__main__":
    main()
