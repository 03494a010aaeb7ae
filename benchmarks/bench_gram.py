"""Calibration Grams H = XᵀX: rocketkit's fp64 SYRK against the two obvious alternatives.

Speed, per calibration batch of SmolLM2's block input widths (576 for q/k/v, o and gate/up; 1536
for down_proj), X fp32 activations as the forward produces them:
  - baseline: X cast to fp64, then a full GEMM ``H.addmm_(Xᵀ, X)`` (rocketkit before SYRK);
  - X cast to fp64, SYRK on one triangle (``_native.gram_accumulate``), and the same through
    rocketkit's ``calibrate.Gram`` (the NaN/Inf token filter and the cast included);
  - fp32 GEMM per batch folded into an fp64 H (what the ROCKET reference does).

Accuracy of the fp32 fold against fp64 accumulation:
  - synthetic activations with outlier channels and a decaying spectrum (cond(H) ≈ 1e12, the case
    of DESIGN.md §1): does the Cholesky of the whitening need jitter, and how far is SᵀS from H;
  - real SmolLM2 activations (the inputs of block 1's linears, --tokens calibration tokens): the
    largest change of any candidate's weight/output error on the reduced grid and the number of
    (layer, cr) whose best ks changes.

    python benchmarks/bench_gram.py [--tokens 16384] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_line, peak_rss_mib  # noqa: E402


def _timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def gram_fp64_gemm(H: torch.Tensor, x: torch.Tensor) -> None:
    x = x.double()
    H.addmm_(x.T, x)


def gram_fp64_syrk(H: torch.Tensor, x: torch.Tensor) -> None:
    from rocketkit._native import gram_accumulate

    gram_accumulate(H.numpy(), x.double().numpy())


def gram_rocketkit(H: torch.Tensor, x: torch.Tensor) -> None:
    """What calibration does (``calibrate.Gram.add``: SYRK on the CPU)."""
    from rocketkit.calibrate import Gram

    Gram(H).add(x)


def gram_fp32_fold(H: torch.Tensor, x: torch.Tensor) -> None:
    H.add_((x.T @ x).double())


def finished(H: torch.Tensor, how: str) -> torch.Tensor:
    if how == "syrk":
        from rocketkit._native import gram_symmetrize

        gram_symmetrize(H.numpy())
        return H
    return (H + H.T) * 0.5


def speed(batch: int, reps: int) -> None:
    print(f"speed: one batch of {batch} tokens (seconds; ratio = baseline / this)")
    print(f"{'d':>6} {'fp64 GEMM (baseline)':>22} {'fp64 SYRK':>10} {'ratio':>6} {'rocketkit':>10} {'ratio':>6} "
          f"{'fp32 GEMM fold':>16} {'ratio':>6}")
    g = torch.Generator().manual_seed(0)
    for d in (576, 1536):
        x = torch.randn(batch, d, generator=g)
        t = {name: _timed(lambda f=f: f(torch.zeros(d, d, dtype=torch.float64), x), reps)
             for name, f in (("gemm", gram_fp64_gemm), ("syrk", gram_fp64_syrk), ("rk", gram_rocketkit),
                             ("fold", gram_fp32_fold))}
        print(f"{d:>6} {t['gemm']:>22.4f} {t['syrk']:>10.4f} {t['gemm'] / t['syrk']:>5.2f}x {t['rk']:>10.4f} "
              f"{t['gemm'] / t['rk']:>5.2f}x {t['fold']:>16.4f} {t['gemm'] / t['fold']:>5.2f}x")


def outlier_case(n: int, d: int) -> None:
    from rocketkit.whiten import whiten

    rng = np.random.default_rng(1)
    # A spectrum over 6 decades (cond(H) ~ 1e12) and 4 outlier channels 100x larger.
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    M = (Q * np.logspace(0, -6, d)) @ Q.T
    X = rng.standard_normal((n, d)) @ M
    X[:, rng.choice(d, 4, replace=False)] *= 100.0
    x = torch.from_numpy(X.astype(np.float32))
    xd = x.double()
    exact = xd.T @ xd
    print(f"\noutlier case: {n} tokens x {d}, cond(H) = {np.linalg.cond(exact.numpy()):.2e}")
    for name, f, how in (("fp64 SYRK", gram_fp64_syrk, "syrk"), ("fp32 GEMM fold", gram_fp32_fold, "fold")):
        H = torch.zeros(d, d, dtype=torch.float64)
        for b in range(0, n, 4096):
            f(H, x[b : b + 4096])
        H = finished(H, how)
        w = whiten(H)
        rel_h = float(torch.linalg.norm(H - exact) / torch.linalg.norm(exact))
        rel_s = float(torch.linalg.norm(w.S.T @ w.S - exact) / torch.linalg.norm(exact))
        min_eig = float(torch.linalg.eigvalsh(H)[0] / torch.linalg.eigvalsh(exact)[0])
        print(f"  {name:<15} |H - H64|/|H64| {rel_h:.2e}   smallest eigenvalue / exact {min_eig:+.3e}   "
              f"whitening jitter {w.jitter:g}   |SᵀS - H64|/|H64| {rel_s:.2e}")


def smollm2_case(tokens: int) -> None:
    from rocketkit import whitened_errors
    from rocketkit.calibrate import BlockStream
    from rocketkit.data import calibration_ids
    from rocketkit.models import block_linears, load_model
    from rocketkit.profile import REDUCED_CRS, REDUCED_KS, candidate_grid, weight_f64
    from rocketkit.whiten import whiten

    lm = load_model("smollm2")
    ids = calibration_ids(lm.tokenizer, tokens, seq_len=512, seed=0)
    stream = BlockStream(lm.model, ids, batch_size=8)
    stream.run(0, grams_for=None)
    block = stream.blocks[1]
    lins = block_linears(block)
    inputs: dict[str, list] = {n: [] for n in lins}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in lins.items()]
    with torch.no_grad():
        for b, h in enumerate(stream.hidden):
            args, kwargs = stream.calls[b][1]
            block(h, *args, **kwargs)
    for hk in hooks:
        hk.remove()
    print(f"\nSmolLM2 block 1, {ids.numel()} calibration tokens, reduced grid: fp32 fold against fp64 SYRK")
    worst_e, changed, pairs = 0.0, 0, 0
    for n, lin in lins.items():
        xs = inputs[n]
        d = xs[0].shape[1]
        Hs = {}
        for how, f in (("syrk", gram_fp64_syrk), ("fold", gram_fp32_fold)):
            H = torch.zeros(d, d, dtype=torch.float64)
            for x in xs:
                f(H, x.contiguous())
            Hs[how] = finished(H, how)
        W = weight_f64(lin)
        grid = candidate_grid(W.shape[0], W.shape[1], REDUCED_CRS, REDUCED_KS)
        cand = np.stack([grid.k, grid.s], axis=1)
        errs = {}
        for how, H in Hs.items():
            S = np.ascontiguousarray(whiten(H).S.numpy())
            errs[how] = whitened_errors(W, S, cand)
        de = max(float(np.max(np.abs(errs["syrk"][i] - errs["fold"][i]))) for i in (0, 1))
        worst_e = max(worst_e, de)
        for cr in np.unique(grid.cr):
            at = np.flatnonzero(grid.cr == cr)
            for i in (0, 1):
                pairs += 1
                changed += int(np.argmin(errs["syrk"][i][at]) != np.argmin(errs["fold"][i][at]))
        print(f"  {n:<18} d={d:<5} max |Δ error| {de:.2e}")
    print(f"  largest |Δ error| {worst_e:.2e}; best ks changed in {changed} of {pairs} (layer, cr, cost) choices")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="SmolLM2 calibration tokens for the accuracy check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096, help="tokens per calibration batch (8 x 512 in compress)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from rocketkit.threads import pinned_threads

    with pinned_threads(args.threads):
        print(device_line())
        speed(args.batch, args.reps)
        outlier_case(16384, 576)
        smollm2_case(args.tokens)
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
