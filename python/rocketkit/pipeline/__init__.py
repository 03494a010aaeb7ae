"""One-call compression, streamed one decoder block at a time, resumable and shardable over ranks.

``compress`` never materializes the whole model (a model folder is opened with
``models.open_streaming``; an in-memory ``LoadedModel`` is walked the same way):

1. **Pass 1 (profile).** For each block: load its weights, run the calibration activations through
   it while hooks accumulate its fp64 Grams, whiten, score every candidate of every linear, write
   the block's profile atomically, keep the block's dense outputs as the next block's inputs, free
   the block.
2. **Allocate.** The MCKP needs only the profiles; rank 0 solves it and broadcasts the result.
3. **Pass 2 (factorize).** Each block is factorized with the whitening pass 1 cached (no second
   forward), or, for blocks the cache budget left out, with Grams recomputed by streaming again:
   the same inputs give the same Grams, hence the same whitening. Either way each layer's applied
   error equals its profiled one (the summary reports the largest difference and a warning fires
   above 1e-6). Each finished block is written as its own safetensors shard, atomically.
4. **Assemble.** The non-block weights, config.json with the rocketkit section, the shard index,
   tokenizer, profile, allocation, summary and run log are written, and the folder is renamed to
   ``out_dir`` in one step: the output appears only when complete.

Peak memory is one block, its Grams, one whitening and the calibration activations, whatever the
depth. Everything goes through a work folder (``rocketkit.workdir``, ``OUT.partial/`` by default)
whose manifest fingerprints everything that determines the result; rerunning the same call after a
crash, ``kill -9`` or Ctrl-C continues from the last completed block and writes a bit-identical
checkpoint (torch and OpenBLAS threads are pinned to a recorded count). Under torchrun the blocks
are shared among the ranks (``rocketkit.distributed``). Per stage and per block, time and peak
memory go to ``runlog.json`` in the output.

One module per stage: ``stage_profile`` (calibrate + profile, pass 1), ``stage_allocate``,
``stage_factorize`` (pass 2), ``stage_evaluate``, ``stage_publish``; they share a ``RunContext``
(``context``: the model, ids, work folder, run log and the one block-stream helper) and the
validated ``CompressOptions`` (``options``). The CLI prints the stage table at the end of a run.

Tests may set ``ROCKETKIT_TEST_PAUSE_AT`` to ``profile:<i>`` (after block i's profile is written),
``factorize:<i>`` (block i factorized, its shard not yet written) or ``assemble`` (everything
written but the final rename): the process then sleeps there, to be killed or interrupted.
"""

from __future__ import annotations

import json
import time

import torch

from rocketkit.allocate import DEFAULT_ERROR_CAP, DEFAULT_POWER, DEFAULT_WEIGHTING
from rocketkit.pipeline.context import RunContext
from rocketkit.pipeline.options import CompressOptions
from rocketkit.pipeline.stage_allocate import run_allocate
from rocketkit.pipeline.stage_evaluate import blockwise_perplexity, run_evaluate
from rocketkit.pipeline.stage_factorize import run_factorize
from rocketkit.pipeline.stage_profile import run_profile
from rocketkit.pipeline.stage_publish import PROFILE_APPLY_TOLERANCE, run_publish, swap_in_memory_model
from rocketkit.profile import DEFAULT_CRS, DEFAULT_KS

__all__ = ["CompressOptions", "PROFILE_APPLY_TOLERANCE", "blockwise_perplexity", "compress", "format_summary",
           "format_stage_table"]


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
    weighting=DEFAULT_WEIGHTING,
    power: int = DEFAULT_POWER,
    overwrite: bool = False,
    seed: int = 0,
    calib_ids: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    num_threads: int = 0,
    restart: bool = False,
    work_dir=None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    cache_budget="auto",
    refine: int = 0,
    error_cap: str = DEFAULT_ERROR_CAP,
) -> dict:
    """Compress ``model_spec`` (HF folder, .gguf, "smollm2", or an already loaded LoadedModel) and
    write the checkpoint, profile, allocation, summary and run log into ``out_dir``. Returns the
    summary (plus this call's ``time_s`` per stage).

    The model is streamed block by block (see the module docstring) through ``work_dir`` (default
    ``<out_dir>.partial``): calling again with the same arguments after an interruption resumes;
    different arguments are refused unless ``restart=True``, which discards the work folder. An
    existing ``out_dir`` is replaced only with ``overwrite=True``, and only once the new one is
    complete. ``calib_ids`` / ``eval_ids`` override the BoolQ token ids (tests, custom data).
    ``num_threads`` (0: torch's current count) pins torch and OpenBLAS; it is part of the
    fingerprint because results depend on it in the last bits. A folder is opened in ``dtype``
    (computation and the saved tensors); an in-memory model keeps its own. An in-memory model is
    compressed in place when the call returns. ``cache_budget`` ("auto", 0, or bytes, e.g. "8G")
    bounds the disk that pass 1 may fill with whitening factors so that pass 2 runs no second
    calibration forward (``rocketkit.whitening_cache``); it never changes the result. ``refine`` > 0
    runs that many closed-form refinement iterations on each factorized layer after allocation
    (``apply.refine_factors``): the applied errors are then lower than the profiled ones, and the
    summary reports both."""
    from rocketkit.distributed import init_comm
    from rocketkit.threads import pinned_threads

    opts = CompressOptions.create(
        ratio=ratio, cost=cost, alpha=alpha, calib_tokens=calib_tokens, seq_len=seq_len, out_dir=out_dir, crs=crs,
        kss=kss, buckets=buckets, eval_tokens=eval_tokens, device=device, progress=progress, batch_size=batch_size,
        method=method, weighting=weighting, power=power, overwrite=overwrite, seed=seed, calib_ids=calib_ids,
        eval_ids=eval_ids, num_threads=num_threads, restart=restart, work_dir=work_dir,
        trust_remote_code=trust_remote_code, dtype=dtype, cache_budget=cache_budget, refine=refine,
        error_cap=error_cap,
    )
    started = time.perf_counter()
    comm, dev = init_comm(opts.device)
    try:
        with pinned_threads(opts.num_threads) as threads:
            ctx = RunContext(model_spec, opts, comm, dev, threads)
            ctx.started = started
            try:
                return _run(ctx)
            finally:
                wd = getattr(ctx, "wd", None)
                if wd is not None:
                    wd.release_lock()
    finally:
        comm.close()


def _run(ctx: RunContext) -> dict:
    ctx.open_model()
    ctx.open_work()
    run_profile(ctx)
    run_allocate(ctx)
    run_factorize(ctx)
    run_evaluate(ctx)
    summary, table = run_publish(ctx) if ctx.comm.is_main else (None, None)
    data = ctx.comm.broadcast_bytes(json.dumps(summary).encode() if ctx.comm.is_main else None)
    summary = json.loads(data)
    if ctx.in_memory:
        swap_in_memory_model(ctx)
    summary["out_dir"] = str(ctx.o.out_dir)
    summary["time_s"] = dict(ctx.times)
    summary["stage_table"] = table
    summary["rank"], summary["world"] = ctx.comm.rank, ctx.comm.world
    return summary


def format_summary(summary: dict) -> str:
    """A short human-readable table of a :func:`compress` summary."""
    from rocketkit.models import not_compressed_rows

    b = summary["bytes"]
    mib = 1024 * 1024
    rows = [
        ("model", f"{summary['model']} ({summary['model_type']})"),
        ("cost", summary["cost"] + (f" (alpha={summary['alpha']})" if summary.get("alpha") is not None else "")
         + (f"; knapsack objective sum of {'share * ' if summary.get('weighting') else ''}cost^{summary.get('power', 1)}"
            if summary.get("method") == "mckp" else f"; {summary.get('method')} allocation")),
        ("ratio target / achieved", f"{summary['ratio']:.4f} / {summary['achieved_ratio']:.4f}"),
        ("linear params before / after", f"{summary['compressible_params_before']:,} / {summary['compressible_params_after']:,}"),
        ("model params before / after", f"{summary['params_before']:,} / {summary['params_after']:,}"),
        ("layers factorized", f"{summary['factorized_layers']} / {summary['layers']}"),
        *not_compressed_rows(summary),
        ("objective / lower bound", f"{summary['objective']:.6g} / "
         + (f"{summary['lower_bound']:.6g}" if summary["lower_bound"] is not None else "-")),
        ("max |profiled - applied| err", f"{summary['max_profiled_vs_applied_error']:.2e}"),
        ("bytes U / C values / C indices", f"{b['U'] / mib:.2f} / {b['C_values'] / mib:.2f} / {b['C_indices'] / mib:.2f} MiB"),
        ("bytes dense rest / folder", f"{b['dense'] / mib:.2f} / {b['folder_total'] / mib:.2f} MiB"),
    ]
    if summary.get("ppl_before") is not None:
        rows.append(("perplexity before / after", f"{summary['ppl_before']:.3f} / {summary['ppl_after']:.3f}"))
    if summary.get("time_s"):
        rows.append(("time (s)", ", ".join(f"{k} {v:.1f}" for k, v in summary["time_s"].items())))
    rows.append(("output", summary["out_dir"]))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def format_stage_table(rows: list[dict] | None) -> str:
    """The stage table of a run (seconds, share of the wall time, peak RSS) as aligned text."""
    if not rows:
        return ""
    gib = 1024**3
    lines = [f"  {'stage':<18} {'seconds':>9} {'share':>7} {'peak RSS':>10}"]
    for r in rows:
        rss = "-" if r.get("peak_rss_bytes") is None else f"{r['peak_rss_bytes'] / gib:.2f} GiB"
        lines.append(f"  {r['stage']:<18} {r['seconds']:>9.1f} {100 * r['share']:>6.1f}% {rss:>10}")
    return "\n".join(lines)
