"""Publish (rank 0): the non-block weights, config.json with the rocketkit section, the shard index,
tokenizer, profile, allocation, summary and run log are written into the work folder's checkpoint,
which is then renamed to ``out_dir`` in one step: the output appears only when complete."""

from __future__ import annotations

import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np

from rocketkit.pipeline.context import RunContext, pause_point

# Largest |profiled − applied| error (relative, fp64) that the guarantee allows.
PROFILE_APPLY_TOLERANCE = 1e-6


def block_records(ctx: RunContext) -> list[dict]:
    from rocketkit.fileio import read_json
    from rocketkit.shards import shard_tensor_names

    records = []
    for i in range(ctx.n_blocks):
        path, shard = ctx.wd.block_record_path(i), ctx.wd.block_shard_path(i)
        if not ctx.wd.has_block(i):
            raise ValueError(f"{shard}: block {i}'s shard is missing or incomplete (rerun to resume)")
        rec = read_json(path)
        if shard_tensor_names(shard) != rec.get("tensors"):
            raise ValueError(f"{shard}: its tensors differ from {path.name}'s record (delete both to redo block {i})")
        records.append(rec)
    return records


def stage_table(ctx: RunContext) -> list[dict]:
    """This attempt's stages: seconds, share of the wall time so far, peak RSS; "other" is what no
    stage covers (start-up, the final rename)."""
    wall = time.perf_counter() - ctx.started
    rows = [{"stage": s["name"], "seconds": s["seconds"], "peak_rss_bytes": s.get("peak_rss_bytes", 0)}
            for s in ctx.log.data["stages"]]
    rows.append({"stage": "other", "seconds": max(0.0, wall - sum(r["seconds"] for r in rows)), "peak_rss_bytes": None})
    for r in rows:
        r["share"] = r["seconds"] / wall if wall > 0 else 0.0
    return rows + [{"stage": "total", "seconds": wall, "share": 1.0, "peak_rss_bytes": ctx.log.peak_rss_bytes}]


def write_runlog(ctx: RunContext, path: Path, table: list[dict]) -> None:
    """Every attempt's log of every rank, merged (what each stage and block cost), and this
    attempt's stage table."""
    from rocketkit.fileio import atomic_write_json, read_json

    attempts: dict[int, list] = {}
    for p in sorted(ctx.wd.attempts.glob("attempt-*-rank*.json")):
        doc = read_json(p)
        attempts.setdefault(int(doc["meta"]["attempt"]), []).append(doc)
    atomic_write_json(path, {
        "format": "rocketkit-runlog",
        "peak_rss_bytes": max((d.get("peak_rss_bytes", 0) for docs in attempts.values() for d in docs), default=0),
        "stage_table": table,
        "attempts": [{"attempt": k, "ranks": sorted(v, key=lambda d: d["meta"]["rank"])} for k, v in sorted(attempts.items())],
    })


def publish(ctx: RunContext, ck: Path, out_dir: Path) -> None:
    """Rename the finished folder to ``out_dir`` (replacing an existing one when overwriting), with
    SIGINT/SIGTERM held back so that no interrupt lands between the renames; then remove the work
    folder."""
    from rocketkit.fileio import replace_directory

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    blocked = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        if out_dir.exists() and not ctx.o.overwrite:
            raise ValueError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
        replace_directory(ck, out_dir)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    ctx.wd.release_lock()
    shutil.rmtree(ctx.wd.root, ignore_errors=True)


def run_publish(ctx: RunContext) -> tuple[dict, list[dict]]:
    """Assemble and publish the checkpoint; returns (summary, stage table)."""
    from rocketkit.apply import AppliedLayer
    from rocketkit.checkpoint import checkpoint_info, rocketkit_section
    from rocketkit.fileio import atomic_write_json
    from rocketkit.modelcard import write_model_card
    from rocketkit.models import not_compressed
    from rocketkit.shards import (non_block_tensors, write_config, write_generation_config, write_index, write_shard,
                                  write_tokenizer)

    wd, ck = ctx.wd, ctx.wd.checkpoint
    with ctx.log.stage("save") as st:
        records = block_records(ctx)
        profile = ctx.profile
        profile.save(ck / "profile")
        ctx.allocation.save(ck / "allocation.json")
        rec0 = write_shard(ck / wd.shard_name(0), non_block_tensors(ctx.model, ctx.prefix))
        weight_map, total, applied = {}, 0, {}
        for rec in [rec0, *records]:
            weight_map.update({name: rec["shard"] for name in rec["tensors"]})
            total += rec["tensor_bytes"]
            applied.update({n: AppliedLayer(**a) for n, a in rec.get("applied", {}).items()})
        missing = sorted(n for n, d in ctx.allocation.layers.items() if not d.dense and n not in applied)
        if missing:
            raise ValueError(f"{wd.blocks}: no factorization recorded for {missing[:5]} (pass --restart)")
        write_index(ck, weight_map, total)
        write_config(ck, ctx.model, rocketkit_section(ctx.allocation, applied), ctx.dtype)
        write_generation_config(ck, ctx.model, ctx.source_folder)
        write_tokenizer(ck, ctx.tokenizer, wd.root)
        info = checkpoint_info(ck)
        a = ctx.allocation
        max_diff = max((max(abs(x.e_weight - a.layers[n].e_weight), abs(x.e_output - a.layers[n].e_output))
                        for n, x in applied.items()), default=0.0)
        factorized = [d for d in a.layers.values() if not d.dense]
        params_before = sum(p.numel() for p in ctx.model.parameters())
        params_after = params_before - sum(d.d1 * d.d2 for d in factorized) + sum(d.params for d in factorized)
        summary = {
            "model": ctx.spec_name,
            "model_type": getattr(ctx.model.config, "model_type", None),
            "ratio": a.ratio, "cost": a.cost, "alpha": a.alpha, "method": a.method, "weighting": a.weighting,
            "power": a.power, "error_cap": a.meta.get("error_cap"), "achieved_ratio": a.achieved_ratio,
            "compressible_params_before": a.dense_params, "compressible_params_after": a.params,
            "params_before": params_before, "params_after": params_after,
            "layers": len(a.layers), "factorized_layers": len(applied),
            **not_compressed(ctx.walk, profile),
            "objective": a.objective, "lower_bound": a.lower_bound,
            "max_profiled_vs_applied_error": max_diff,
            "refine": ctx.o.refine,
            "calib_tokens": int(ctx.calib_ids.numel()),
            "eval_tokens": int(ctx.eval_ids.numel()) if ctx.eval_ids is not None else 0,
            "grid": {"crs": list(profile.crs), "kss": list(profile.kss)},
            "bytes": info["bytes"],
            "ppl_before": ctx.ppl[0], "ppl_after": ctx.ppl[1],
            "blocks": ctx.n_blocks,
        }
        if ctx.o.refine:  # applied errors are then the refined ones, below the profiled (both reported)
            summary["mean_output_error_profiled"] = float(np.mean([a.layers[n].e_output for n in applied])) if applied else 0.0
            summary["mean_output_error_applied"] = float(np.mean([x.e_output for x in applied.values()])) if applied else 0.0
        # No timings or paths in summary.json: reruns and resumed runs write identical files.
        atomic_write_json(ck / "summary.json", summary)
        write_model_card(ck, summary)
    ctx.times["save"] = st["seconds"]
    table = stage_table(ctx)
    write_runlog(ctx, ck / "runlog.json", table)
    pause_point("assemble")
    publish(ctx, ck, ctx.o.out_dir)
    if max_diff > PROFILE_APPLY_TOLERANCE and not ctx.o.refine:
        warnings.warn(f"profiled and applied errors differ by up to {max_diff:.3g} (> {PROFILE_APPLY_TOLERANCE:g})",
                      RuntimeWarning, stacklevel=4)
    return summary, table


def swap_in_memory_model(ctx: RunContext) -> None:
    """An in-memory model ends up compressed in place, read back from the published shards."""
    from rocketkit.apply import _set_submodule
    from rocketkit.pipeline.stage_evaluate import factorized_from_shard

    for i in range(ctx.n_blocks):
        for rel, module in factorized_from_shard(ctx, i, ctx.o.out_dir, ctx.wd.shard_name(i + 1)).items():
            module.train(ctx.blocks[i].get_submodule(rel).training)
            _set_submodule(ctx.blocks[i], rel, module)
