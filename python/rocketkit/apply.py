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
    """(‖W − U·C‖/‖W‖, ‖S(W − U·C)‖/‖SW‖) in fp64, by explicit reconstruction; 0 for a zero W."""
    S = np.triu(S)
    R = W - U @ C
    nw, no = np.linalg.norm(W), np.linalg.norm(S @ W)
    return (float(np.linalg.norm(R) / nw) if nw > 0 else 0.0, float(np.linalg.norm(S @ R) / no) if no > 0 else 0.0)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def apply_allocation(
    model: nn.Module,
    input_ids: torch.Tensor,
    allocation: Allocation,
    batch_size: int = 8,
    device="cpu",
    progress: bool = True,
) -> dict[str, AppliedLayer]:
    """Factorize every non-dense layer of ``allocation`` in place; returns the measured errors per layer."""
    from tqdm.auto import tqdm

    from rocketkit._native import factorize
    from rocketkit.calibrate import stream_blocks
    from rocketkit.profile import weight_f64, whiten_grams

    todo = {n: d for n, d in allocation.layers.items() if not d.dense}
    modules = dict(model.named_modules())
    for n, d in allocation.layers.items():
        lin = modules.get(n)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"allocation layer {n!r} is not an nn.Linear of this model (already compressed, or another model?)")
        if (lin.in_features, lin.out_features) != (d.d1, d.d2):
            raise ValueError(f"allocation layer {n!r} is ({d.d1}, {d.d2}) but the model's is ({lin.in_features}, {lin.out_features})")
    applied: dict[str, AppliedLayer] = {}
    bar = tqdm(total=len(todo), desc="factorize", unit="layer", disable=not progress)
    try:
        for cb in stream_blocks(model, input_ids, batch_size=batch_size, device=device, progress=progress):
            mine = {rel: lin for rel, lin in cb.linears.items() if f"{cb.name}.{rel}" in todo}
            if not mine:
                continue
            whitenings = whiten_grams({rel: cb.grams[rel] for rel in mine})
            for rel, lin in mine.items():
                name = f"{cb.name}.{rel}"
                d = todo[name]
                wh = whitenings[id(cb.grams[rel])]
                W = weight_f64(lin)
                S = np.ascontiguousarray(wh.S.cpu().numpy())
                f = factorize(W, S, d.k, d.s)
                e_w, e_o = measured_errors(W, S, f.U, dense_C(f.values, f.indices, d.k))
                bias = lin.bias.detach() if lin.bias is not None else None
                new = FactorizedLinear.from_factors(
                    f.U, f.values, f.indices, bias=bias, dtype=lin.weight.dtype, device=lin.weight.device
                )
                new.train(lin.training)
                _set_submodule(cb.block, rel, new)
                applied[name] = AppliedLayer(name, d.k, d.s, e_w, e_o, float(f.ridge), float(wh.jitter))
                bar.update(1)
    finally:
        bar.close()
    missing = sorted(set(todo) - set(applied))
    if missing:
        raise RuntimeError(f"allocation layers not found during calibration: {missing[:5]}")
    return applied
