"""PNG figures of an allocation study (matplotlib, Agg backend); every function returns PNG bytes.

The inputs are plain data (names, numbers), so a figure can be redrawn from a saved ``study.json``
and its allocation files without the model.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence

import numpy as np

_BLOCK_NAME = re.compile(r"^(?P<prefix>.+?)\.(?P<block>\d+)\.(?P<module>.+)$")


def require_matplotlib() -> None:
    """ValueError naming the package when matplotlib is missing (called before a long study starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("study plots need matplotlib (pip install 'rocketkit[plot]'), or pass plots=False / --no-plots") from None


def _pyplot():
    import matplotlib

    # Agg renders without a display; force it even when another backend was chosen by the environment.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # A fixed software/date metadata block keeps the bytes independent of when they were drawn.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": "rocketkit"})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def split_layer_name(name: str) -> tuple[int, str]:
    """(block index, module name within the block) of e.g. ``model.layers.3.self_attn.q_proj``."""
    m = _BLOCK_NAME.match(name)
    if m is None:
        raise ValueError(f"layer name {name!r} has no block index")
    return int(m.group("block")), m.group("module")


def kept_fraction_grid(kept: Mapping[str, float]) -> tuple[list[int], list[str], np.ndarray]:
    """(block indices, module names, blocks × modules array of kept fractions; NaN where absent)."""
    cells = {split_layer_name(n): v for n, v in kept.items()}
    blocks = sorted({b for b, _ in cells})
    modules = list(dict.fromkeys(m for _, m in cells))
    grid = np.full((len(blocks), len(modules)), np.nan)
    for (b, m), v in cells.items():
        grid[blocks.index(b), modules.index(m)] = v
    return blocks, modules, grid


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def allocation_heatmaps(panels: Sequence[tuple[str, Mapping[str, float]]], title: str) -> bytes:
    """One heatmap per (label, {layer name: kept fraction}) side by side: rows blocks, columns modules."""
    if not panels:
        raise ValueError("allocation_heatmaps: no panels")
    plt = _pyplot()
    grids = [kept_fraction_grid(kept) for _, kept in panels]
    n_blocks = max(len(g[0]) for g in grids)
    n_modules = max(len(g[1]) for g in grids)
    width = max(3.0, 0.32 * n_modules + 0.8) * len(panels) + 1.2
    height = max(2.5, 0.16 * n_blocks + 1.4)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, (label, _), (blocks, modules, grid) in zip(axes[0], panels, grids, strict=True):
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest", origin="upper")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(modules)), [_short(m) for m in modules], rotation=90, fontsize=7)
        step = max(1, len(blocks) // 16)
        ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)
    axes[0][0].set_ylabel("block")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="kept fraction of parameters", shrink=0.9)
    return _png(fig)


def error_scatter(e_weight: np.ndarray, e_output: np.ndarray, groups: Sequence[str], title: str) -> bytes:
    """e_w against e_o of every candidate of every layer, coloured by module, with the line e_o = e_w."""
    e_weight, e_output = np.asarray(e_weight, dtype=np.float64), np.asarray(e_output, dtype=np.float64)
    if e_weight.shape != e_output.shape or e_weight.shape[0] != len(groups):
        raise ValueError("error_scatter: e_weight, e_output and groups must have the same length")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ok = (e_weight > 0) & (e_output > 0)
    names = np.asarray(groups)
    for group in dict.fromkeys(groups):
        sel = ok & (names == group)
        ax.scatter(e_weight[sel], e_output[sel], s=4, alpha=0.5, label=group, linewidths=0)
    if ok.any():
        lo = min(e_weight[ok].min(), e_output[ok].min())
        hi = max(e_weight[ok].max(), e_output[ok].max())
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--", label="e_o = e_w")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("weight error e_w = ‖W−Ŵ‖/‖W‖")
    ax.set_ylabel("output error e_o = ‖X(W−Ŵ)‖/‖XW‖")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=3, loc="upper left")
    return _png(fig)


def budget_curves(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], dense_params: int, title: str) -> bytes:
    """Optimal Σ error against the kept fraction of parameters, one line per (label, params, error)."""
    if not curves:
        raise ValueError("budget_curves: no curves")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    # Distinct dash patterns keep identical curves (α = 1 and the weight cost) visible on top of each other.
    dashes = ("-", "--", "-.", ":")
    for i, (label, params, error) in enumerate(curves):
        ax.plot(np.asarray(params, dtype=np.float64) / dense_params, np.asarray(error, dtype=np.float64), label=label,
                linestyle=dashes[i % len(dashes)], linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of linear-layer parameters (budget)")
    ax.set_ylabel("optimal Σ cost (DP final row)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def alpha_tradeoff(
    series: Mapping[str, Sequence[tuple[float, float | None, float | None]]],
    references: Mapping[str, tuple[float | None, float | None]],
    title: str,
) -> bytes:
    """Average accuracy and PPL against α (1 = weight cost, 0 = output cost).

    ``series``: label (one per ratio) -> [(α, accuracy, ppl)]; ``references``: label -> (accuracy, ppl)
    drawn as horizontal lines (dense model, uniform baselines). None values are skipped.
    """
    plt = _pyplot()
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(10.0, 3.8), layout="constrained")
    for label, points in series.items():
        points = sorted(points)
        alphas = [p[0] for p in points]
        for ax, j in ((ax_acc, 1), (ax_ppl, 2)):
            xs = [a for a, p in zip(alphas, points) if p[j] is not None]
            ys = [p[j] for p in points if p[j] is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
    for i, (label, (acc, ppl)) in enumerate(references.items()):
        style = dict(color=f"C{(i + len(series)) % 10}", linestyle=":", linewidth=1.0, label=label)
        if acc is not None:
            ax_acc.axhline(acc, **style)
        if ppl is not None:
            ax_ppl.axhline(ppl, **style)
    for ax, name in ((ax_acc, "average zero-shot accuracy"), (ax_ppl, "held-out perplexity")):
        ax.set_xlabel("α in α·e_w + (1−α)·e_o  (1 = weight, 0 = output)")
        ax.set_ylabel(name)
        ax.set_xlim(-0.05, 1.05)
        ax.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
