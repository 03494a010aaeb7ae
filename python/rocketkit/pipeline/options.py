"""Every option of a compress run, its default and its unit, validated once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rocketkit.allocate import (DEFAULT_ERROR_CAP, DEFAULT_POWER, DEFAULT_WEIGHTING, METHODS, check_cost, check_error_cap,
                                check_power, check_ratio, check_weighting)
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS, check_grid


def _positive_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class CompressOptions:
    """The settings of one :func:`rocketkit.pipeline.compress` call (see its docstring)."""

    ratio: float  # fraction of the decoder linears' parameters removed, in (0, 1)
    out_dir: Path  # the checkpoint folder; appears only when complete
    cost: str = "weight"  # weight | output | blend (allocation cost)
    alpha: float | None = None  # blend weight a in a·e_w + (1−a)·e_o (cost "blend" only)
    method: str = "mckp"  # mckp (global knapsack) | uniform
    weighting: str | None = DEFAULT_WEIGHTING  # knapsack weight of a layer's cost: "params" share or None
    power: int = DEFAULT_POWER  # knapsack objective Σ weight·cost^power
    error_cap: str = DEFAULT_ERROR_CAP  # "alpha": the reference's per-layer error cap, dense kept (mckp); "none"
    buckets: int = 50000  # DP buckets over the parameter slack
    refine: int = 0  # closed-form refinement iterations per factorized layer after allocation (0: off)
    crs: tuple[float, ...] = DEFAULT_CRS  # candidate compression ratios
    kss: tuple[float, ...] = DEFAULT_KS  # candidate rank/nonzeros ratios
    calib_tokens: int = 131072  # calibration tokens (BoolQ passages), tokens
    seq_len: int = 512  # calibration and evaluation sequence length, tokens
    eval_tokens: int = 0  # held-out tokens for perplexity before/after (0: skip)
    seed: int = 0  # calibration sampling seed
    calib_ids: torch.Tensor | None = None  # (n_seq, seq_len) token ids overriding the BoolQ calibration text
    eval_ids: torch.Tensor | None = None  # (n_seq, seq_len) token ids overriding the held-out text
    batch_size: int = 8  # sequences per calibration / perplexity batch
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # a folder is opened (computed, saved) in this dtype
    num_threads: int = 0  # torch and BLAS threads, pinned (0: torch's current count)
    cache_budget: int | str = "auto"  # bytes of pass-1 whitening cache ("auto", 0 = recompute)
    work_dir: Path | None = None  # default: <out_dir>.partial
    restart: bool = False  # discard an unfinished run's work folder
    overwrite: bool = False  # replace an existing out_dir once the new one is complete
    progress: bool = True  # progress bars
    trust_remote_code: bool = False  # let transformers run a model folder's own code

    @classmethod
    def create(cls, **kwargs) -> "CompressOptions":
        """Validated options: a ``ValueError`` names the first bad one, before any work."""
        from rocketkit.whitening_cache import parse_cache_budget

        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown compress options: {', '.join(unknown)}")
        o = dict(kwargs)
        o["ratio"] = check_ratio(o["ratio"])
        cost = o.get("cost", "weight")
        check_cost(cost, o.get("alpha"))
        o["alpha"] = None if cost != "blend" else float(o["alpha"])
        method = o.get("method", "mckp")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        o["weighting"] = check_weighting(o.get("weighting", DEFAULT_WEIGHTING))
        o["power"] = check_power(o.get("power", DEFAULT_POWER))
        o["error_cap"] = check_error_cap(o.get("error_cap", DEFAULT_ERROR_CAP))
        o["crs"], o["kss"] = check_grid(o.get("crs", DEFAULT_CRS), o.get("kss", DEFAULT_KS))
        if o.get("out_dir") is None:
            raise ValueError("out_dir is required")
        o["out_dir"] = Path(o["out_dir"])
        if o["out_dir"].exists() and not o.get("overwrite", False):
            raise ValueError(f"{o['out_dir']}: already exists (pass overwrite=True / --overwrite to replace it)")
        if o.get("work_dir") is not None:
            o["work_dir"] = Path(o["work_dir"])
        eval_tokens, calib_tokens = o.get("eval_tokens", 0), o.get("calib_tokens", 131072)
        if eval_tokens < 0 or calib_tokens < 1:
            raise ValueError(f"need calib_tokens >= 1 and eval_tokens >= 0, got {calib_tokens}, {eval_tokens}")
        _positive_int("buckets", o.get("buckets", 50000))
        _positive_int("refine", o.get("refine", 0), lo=0)
        _positive_int("batch_size", o.get("batch_size", 8))
        dtype = o.get("dtype", torch.float32)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        o["cache_budget"] = parse_cache_budget(o.get("cache_budget", "auto"))
        return cls(**o)
