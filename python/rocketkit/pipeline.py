"""One-call compression: load -> calibrate+profile -> allocate -> factorize -> save -> (evaluate)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rocketkit.allocate import allocate, check_cost, check_ratio
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def compress(
    model_spec,
    ratio: float,
    cost: str = "weight",
    alpha=None,
    calib_tokens: int = 131072,
    seq_len: int = 512,
    out_dir=None,
    crs=DEFAULT_CRS,
    kss=DEFAULT_KS,
    buckets: int = 50000,
    eval_tokens: int = 0,
    device: str = "cpu",
    progress: bool = True,
    batch_size: int = 8,
    method: str = "mckp",
    weighting=None,
    overwrite: bool = False,
    seed: int = 0,
    calib_ids: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    num_threads: int = 0,
) -> dict:
    """Compress ``model_spec`` (HF folder, .gguf, "smollm2", or an already loaded LoadedModel) and
    write the checkpoint, profile, allocation and summary into ``out_dir``. Returns the summary.

    ``calib_ids`` / ``eval_ids`` override the BoolQ token ids (tests, custom data)."""
    from rocketkit.checkpoint import save_compressed
    from rocketkit.apply import apply_allocation
    from rocketkit.fileio import atomic_write_json
    from rocketkit.models import LoadedModel, load_model
    from rocketkit.profile import profile_model

    ratio = check_ratio(ratio)
    check_cost(cost, alpha)
    if out_dir is None:
        raise ValueError("out_dir is required")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if eval_tokens < 0 or calib_tokens < 1:
        raise ValueError(f"need calib_tokens >= 1 and eval_tokens >= 0, got {calib_tokens}, {eval_tokens}")
    times: dict[str, float] = {}

    t = time.perf_counter()
    if isinstance(model_spec, LoadedModel):
        loaded, spec_name = model_spec, model_spec.source
    else:
        loaded, spec_name = load_model(str(model_spec), device=device), str(model_spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    if calib_ids is None:
        from rocketkit.data import calibration_ids

        calib_ids = calibration_ids(tokenizer, calib_tokens, seq_len=seq_len, seed=seed)
    if eval_ids is None and eval_tokens > 0:
        from rocketkit.data import heldout_ids

        eval_ids = heldout_ids(tokenizer, eval_tokens, seq_len=seq_len)
    times["load"] = time.perf_counter() - t

    ppl_before = ppl_after = None
    if eval_ids is not None:
        from rocketkit.evaluate import perplexity

        t = time.perf_counter()
        ppl_before = perplexity(model, eval_ids, batch_size=batch_size, device=device, progress=progress)
        times["eval_before"] = time.perf_counter() - t
    params_before = _params(model)

    t = time.perf_counter()
    profile = profile_model(model, calib_ids, crs=crs, kss=kss, batch_size=batch_size, device=device,
                            progress=progress, num_threads=num_threads)
    times["calibrate_profile"] = time.perf_counter() - t

    t = time.perf_counter()
    allocation = allocate(profile, ratio, cost=cost, alpha=alpha, buckets=buckets, weighting=weighting, method=method)
    times["allocate"] = time.perf_counter() - t

    t = time.perf_counter()
    applied = apply_allocation(model, calib_ids, allocation, batch_size=batch_size, device=device, progress=progress)
    times["factorize"] = time.perf_counter() - t
    max_diff = max(
        (max(abs(a.e_weight - allocation.layers[n].e_weight), abs(a.e_output - allocation.layers[n].e_output))
         for n, a in applied.items()),
        default=0.0,
    )

    t = time.perf_counter()

    def extra(tmp: Path) -> None:
        profile.save(tmp / "profile")
        allocation.save(tmp / "allocation.json")

    info = save_compressed(model, tokenizer, allocation, out_dir, applied=applied, overwrite=overwrite, extra=extra,
                           progress=progress)
    times["save"] = time.perf_counter() - t

    if eval_ids is not None:
        from rocketkit.evaluate import perplexity

        t = time.perf_counter()
        ppl_after = perplexity(model, eval_ids, batch_size=batch_size, device=device, progress=progress)
        times["eval_after"] = time.perf_counter() - t

    summary = {
        "model": spec_name,
        "model_type": getattr(model.config, "model_type", None),
        "out_dir": str(out_dir),
        "ratio": ratio,
        "cost": cost,
        "alpha": allocation.alpha,
        "method": method,
        "weighting": allocation.weighting,
        "achieved_ratio": allocation.achieved_ratio,
        "compressible_params_before": allocation.dense_params,
        "compressible_params_after": allocation.params,
        "params_before": params_before,
        "params_after": _params(model),
        "layers": len(allocation.layers),
        "factorized_layers": len(applied),
        "objective": allocation.objective,
        "lower_bound": allocation.lower_bound,
        "max_profiled_vs_applied_error": max_diff,
        "calib_tokens": int(calib_ids.numel()),
        "eval_tokens": int(eval_ids.numel()) if eval_ids is not None else 0,
        "grid": {"crs": list(profile.crs), "kss": list(profile.kss)},
        "bytes": info["bytes"],
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "time_s": times,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """A short human-readable table of a :func:`compress` summary."""
    b = summary["bytes"]
    mib = 1024 * 1024
    rows = [
        ("model", f"{summary['model']} ({summary['model_type']})"),
        ("cost", summary["cost"] + (f" (alpha={summary['alpha']})" if summary.get("alpha") is not None else "")),
        ("ratio target / achieved", f"{summary['ratio']:.4f} / {summary['achieved_ratio']:.4f}"),
        ("linear params before / after", f"{summary['compressible_params_before']:,} / {summary['compressible_params_after']:,}"),
        ("model params before / after", f"{summary['params_before']:,} / {summary['params_after']:,}"),
        ("layers factorized", f"{summary['factorized_layers']} / {summary['layers']}"),
        ("objective / lower bound", f"{summary['objective']:.6g} / "
         + (f"{summary['lower_bound']:.6g}" if summary["lower_bound"] is not None else "-")),
        ("max |profiled - applied| err", f"{summary['max_profiled_vs_applied_error']:.2e}"),
        ("bytes U / C values / C indices", f"{b['U'] / mib:.2f} / {b['C_values'] / mib:.2f} / {b['C_indices'] / mib:.2f} MiB"),
        ("bytes dense rest / folder", f"{b['dense'] / mib:.2f} / {b['folder_total'] / mib:.2f} MiB"),
    ]
    if summary.get("ppl_before") is not None:
        rows.append(("perplexity before / after", f"{summary['ppl_before']:.3f} / {summary['ppl_after']:.3f}"))
    rows.append(("time (s)", ", ".join(f"{k} {v:.1f}" for k, v in summary["time_s"].items())))
    rows.append(("output", summary["out_dir"]))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)
