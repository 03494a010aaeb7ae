"""Applying an allocation: a second calibration pass factorizes each chosen layer and swaps in FactorizedLinear.

The pass streams the same calibration ids through the dense model (``stream_blocks`` feeds each
block the previous block's DENSE outputs), so every Gram, hence S, is the one profiling saw, and
``rocketkit.factorize`` uses the same basis and mask rule as ``rocketkit.whitened_errors``: the
errors measured here equal the profiled ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rocketkit.allocate import Allocation
from rocketkit.modules import FactorizedLinear


@dataclass
class AppliedLayer:
    name: str
    k: int
    s: int
    e_weight: float  # ‖W − U·C‖_F / ‖W‖_F, fp64
    e_output: float  # ‖S(W − U·C)‖_F / ‖SW‖_F, fp64
    ridge: float
    jitter: float


def dense_C(values: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    C = np.zeros((k, values.shape[1]), dtype=values.dtype)
    np.put_along_axis(C, indices.astype(np.int64), values, axis=0)
    return C


def measured_errors(W: np.ndarray, S: np.ndarray, U: np.ndarray, C: np.ndarray) -> tuple[float, float]:
    """(‖W − U·C‖/‖W‖, ‖S(W − U·C)‖/‖SW‖) in fp64, by explicit reconstruction; 0 for a zero W.
    Only S's upper triangle is read."""
    t = [torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (W, S, U, C)]
    return _measured_errors(t[0], torch.triu(t[1]), t[2], t[3])


def _measured_errors(W: torch.Tensor, S_upper: torch.Tensor, U: torch.Tensor, C: torch.Tensor) -> tuple[float, float]:
    """measured_errors on fp64 tensors (on S's device) with S already upper triangular."""
    dev = S_upper.device
    W, U, C = (a.to(device=dev, dtype=torch.float64) for a in (W, U, C))
    R = torch.addmm(W, U, C, alpha=-1.0)
    nw, no = float(torch.linalg.norm(W)), float(torch.linalg.norm(S_upper @ W))
    er = float(torch.linalg.norm(R))
    eo = float(torch.linalg.norm(S_upper @ R))
    return (er / nw if nw > 0 else 0.0, eo / no if no > 0 else 0.0)


def _solve_spd_or_lstsq(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """X minimising ‖A·X − B‖ for one system, given G = AᵀA and R = AᵀB: Cholesky of G, or (G
    singular) the minimum-norm least-squares solution."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return torch.cholesky_solve(R, L)
    return torch.linalg.lstsq(A, B, driver="gelsd").solution


def refine_factors(W, S, U, values, indices, iterations: int = 1, column_chunk: int = 128):
    """Closed-form refinement of a factorization with its mask fixed (opt-in, after allocation).

    Each iteration refits every column of C on its kept rows by least squares with the whitened
    dictionary D = S·U fixed, then D by least squares with C fixed. Each half-step minimises
    ‖S(W − U·C)‖_F over its own variables, so the whitened error never increases; the weight-space
    error may. ``W`` (d1, d2), ``S`` (d1, d1, upper read), ``U`` (d1, k), ``values``/``indices``
    (s, d2) as from ``rocketkit.factorize``. Returns (U, values, history): fp64 NumPy arrays and the
    relative whitened error before and after every half-step (2·iterations + 1 values).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"[refine_factors] iterations must be an integer >= 1, got {iterations!r}")
    f64 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))
    Su, W = torch.triu(f64(S)), f64(W)
    WL = Su @ W
    U, vals = f64(U), f64(values).clone()
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    s, d2 = vals.shape
    k = U.shape[1]
    if U.shape[0] != W.shape[0] or idx.shape != vals.shape or W.shape[1] != d2:
        raise ValueError(f"[refine_factors] shapes do not match: W {tuple(W.shape)}, U {tuple(U.shape)}, "
                         f"values {tuple(vals.shape)}, indices {tuple(idx.shape)}")
    D = Su @ U
    norm = float(torch.linalg.norm(WL)) or 1.0

    def dense(v):
        C = torch.zeros(k, d2, dtype=torch.float64)
        return C.scatter_(0, idx, v)

    def err(C):
        return float(torch.linalg.norm(WL - D @ C)) / norm

    history = [err(dense(vals))]
    for _ in range(iterations):
        G, B = D.T @ D, D.T @ WL
        for j0 in range(0, d2, column_chunk):
            J = torch.arange(j0, min(d2, j0 + column_chunk))
            rows = idx[:, J].T  # (n, s)
            Gs = G[rows[:, :, None], rows[:, None, :]]
            Rs = torch.gather(B[:, J].T, 1, rows).unsqueeze(-1)
            L, info = torch.linalg.cholesky_ex(Gs)
            sol = torch.cholesky_solve(Rs, L).squeeze(-1)
            for t in torch.nonzero(info).flatten().tolist():  # a singular D_S: min-norm least squares
                j = int(J[t])
                sol[t] = torch.linalg.lstsq(D[:, rows[t]], WL[:, j:j + 1], driver="gelsd").solution.squeeze(-1)
            vals[:, J] = sol.T
        C = dense(vals)
        history.append(err(C))
        D = _solve_spd_or_lstsq(C.T, WL.T, C @ C.T, C @ WL.T).T
        history.append(err(C))
    U = torch.linalg.solve_triangular(Su, D, upper=True)
    # Balance by a power of two (max|U| ≈ max|C|), as factorize does, for fp16 storage.
    mu, mc = float(U.abs().max()), float(vals.abs().max())
    if mu > 0 and mc > 0:
        scale = 2.0 ** round(np.log2(mc / mu) / 2)
        U, vals = U * scale, vals / scale
    return U.numpy(), vals.numpy(), history


def factorize_block(cb, decisions: dict, free_grams: bool = False,
                    refine: int = 0) -> dict[str, tuple[FactorizedLinear, AppliedLayer]]:
    """Factorize the linears of one calibrated block (``calibrate.CalibratedBlock``) named in
    ``decisions`` (name relative to the block -> a non-dense ``allocate.LayerDecision``).

    Distinct Grams are whitened one at a time, each once (``free_grams=True`` also drops each Gram
    after use); ``refine`` > 0 runs that many :func:`refine_factors` iterations on each layer, so the
    applied errors differ from the profiled ones (the allocation keeps those). Every layer's errors
    are measured by explicit reconstruction. Returns rel ->
    (FactorizedLinear in the layer's dtype and device, AppliedLayer) in the block's module order;
    the block itself is not modified."""
    from rocketkit.profile import gram_groups
    from rocketkit.whiten import whiten

    def whitening_of(gram):
        def get():
            wh = whiten(gram.H)
            if free_grams:
                gram.H = None
            return wh

        return get

    groups = [(whitening_of(gram), rels)
              for gram, rels in gram_groups(cb.grams, [rel for rel in cb.linears if rel in decisions])]
    return factorize_groups(cb.name, cb.linears, decisions, groups, refine=refine)


def factorize_groups(name: str, linears: dict, decisions: dict, groups,
                     refine: int = 0) -> dict[str, tuple[FactorizedLinear, AppliedLayer]]:
    """The factorizations of block ``name``'s ``linears`` (rel -> nn.Linear) named in ``decisions``.
    ``groups`` lists (whitening, rels): ``whitening()`` returns the ``whiten.Whitening`` that the
    linears ``rels`` share (from their Gram, or from pass 1's cache); one is alive at a time.
    ``refine`` as in :func:`factorize_block`."""
    from rocketkit._native import factorize
    from rocketkit.profile import weight_f64

    unknown = sorted(set(decisions) - set(linears))
    if unknown:
        raise ValueError(f"{name}: no linears named {unknown}")
    for rel, d in decisions.items():
        if d.dense:
            raise ValueError(f"{name}.{rel}: the allocation keeps this layer dense")
    out = {}
    for whitening, rels in groups:
        rels = [rel for rel in rels if rel in decisions]
        if not rels:
            continue
        wh = whitening()
        S = np.ascontiguousarray(wh.S.cpu().numpy())
        for rel in rels:
            d = decisions[rel]
            lin = linears[rel]
            W = weight_f64(lin)
            f = factorize(W, S, d.k, d.s)
            U, values = f.U, f.values
            if refine:
                U, values, _ = refine_factors(W, S, U, values, f.indices, iterations=refine)
            e_w, e_o = _measured_errors(torch.from_numpy(W), wh.S, torch.from_numpy(U),
                                        torch.from_numpy(dense_C(values, f.indices, d.k)))
            del W
            bias = lin.bias.detach() if lin.bias is not None else None
            new = FactorizedLinear.from_factors(
                U, values, f.indices, bias=bias, dtype=lin.weight.dtype, device=lin.weight.device
            )
            new.train(lin.training)
            out[rel] = (new, AppliedLayer(f"{name}.{rel}", d.k, d.s, e_w, e_o, float(f.ridge), float(wh.jitter)))
            del f
        del S, wh
    missing = sorted(set(decisions) - set(out))
    if missing:
        raise ValueError(f"{name}: no whitening given for {missing}")
    return {rel: out[rel] for rel in linears if rel in out}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _check_allocation(model: nn.Module, allocation: Allocation) -> dict:
    """The allocation's factorized layers (name -> decision), once ``model`` is prepared as the
    profile saw it and every layer the allocation names is checked to be an nn.Linear of its shape."""
    from rocketkit.models import prepare_model

    prepare_model(model)  # as the profile saw it: 3-D MoE experts as per-expert linears
    modules = dict(model.named_modules())
    for n, d in allocation.layers.items():
        lin = modules.get(n)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"allocation layer {n!r} is not an nn.Linear of this model (already compressed, or another model?)")
        if (lin.in_features, lin.out_features) != (d.d1, d.d2):
            raise ValueError(f"allocation layer {n!r} is ({d.d1}, {d.d2}) but the model's is ({lin.in_features}, {lin.out_features})")
    return {n: d for n, d in allocation.layers.items() if not d.dense}


def apply_allocation(
    model: nn.Module,
    input_ids: torch.Tensor,
    allocation: Allocation,
    batch_size: int = 8,
    device="cpu",
    progress: bool = True,
    refine: int = 0,
) -> dict[str, AppliedLayer]:
    """Factorize every non-dense layer of ``allocation`` in place; returns the measured (applied)
    errors per layer. ``refine`` > 0 (opt-in) refines each layer after allocation (see
    :func:`refine_factors`): the applied errors returned are then lower than the profiled ones in
    ``allocation``, which stay as the allocator saw them."""
    from tqdm.auto import tqdm

    from rocketkit.calibrate import stream_blocks

    todo = _check_allocation(model, allocation)
    applied: dict[str, AppliedLayer] = {}
    bar = tqdm(total=len(todo), desc="factorize", unit="layer", disable=not progress)
    try:
        for cb in stream_blocks(model, input_ids, batch_size=batch_size, device=device, progress=progress):
            mine = {rel: todo[f"{cb.name}.{rel}"] for rel in cb.linears if f"{cb.name}.{rel}" in todo}
            if not mine:
                continue
            for rel, (new, a) in factorize_block(cb, mine, refine=refine).items():
                _set_submodule(cb.block, rel, new)
                applied[a.name] = a
                bar.update(1)
    finally:
        bar.close()
    missing = sorted(set(todo) - set(applied))
    if missing:
        raise RuntimeError(f"allocation layers not found during calibration: {missing[:5]}")
    return applied


def apply_from_cache(model: nn.Module, allocation: Allocation, cache, progress: bool = True,
                     refine: int = 0) -> dict[str, AppliedLayer]:
    """:func:`apply_allocation` without the calibration forward: every block's whitening comes from
    ``cache`` (a ``whitening_cache.WhiteningCache`` that ``profile.profile_model`` filled on the same
    dense model and tokens), so the factorizations are the same, bit for bit."""
    from tqdm.auto import tqdm

    from rocketkit.models import block_linears, walk_model

    todo = _check_allocation(model, allocation)
    walk = walk_model(model)
    applied: dict[str, AppliedLayer] = {}
    with tqdm(total=len(todo), desc="factorize (cached whitening)", unit="layer", disable=not progress) as bar:
        for i, block in enumerate(walk.blocks):
            name = f"{walk.prefix}.{i}"
            linears = block_linears(block)
            decisions = {rel: todo[f"{name}.{rel}"] for rel in linears if f"{name}.{rel}" in todo}
            if not decisions:
                continue
            for rel, (new, a) in factorize_groups(name, linears, decisions, cache.group_loaders(i),
                                                  refine=refine).items():
                _set_submodule(block, rel, new)
                applied[a.name] = a
                bar.update(1)
    missing = sorted(set(todo) - set(applied))
    if missing:
        raise RuntimeError(f"allocation layers not found in the model's decoder blocks: {missing[:5]}")
    return applied
