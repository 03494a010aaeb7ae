"""Pass 1, calibrate and profile: each block runs over the calibration batches while hooks accumulate
its fp64 Grams (``rocketkit.calibrate``); every distinct Gram is whitened once, every candidate of
every linear is scored (``rocketkit.profile``), the block's profile is written atomically, and
the whitening factors of the blocks the cache budget admits are kept for pass 2
(``rocketkit.whitening_cache``). The block's dense outputs feed the next block."""

from __future__ import annotations

import time

import torch

from rocketkit.pipeline.context import RunContext, pause_point


def cache_plan(ctx: RunContext, todo: list[int]) -> set[int]:
    """The blocks among ``todo`` whose whitening is kept for pass 2 (the last ones first), within
    the cache budget; recorded in the run log."""
    from rocketkit.models import block_linears
    from rocketkit.whitening_cache import block_cache_bytes, plan_cached_blocks, resolve_budget

    itemsize = torch.empty((), dtype=ctx.dtype).element_size()
    reserved = sum(p.numel() for p in ctx.model.parameters()) * itemsize  # room for the checkpoint
    budget = resolve_budget(ctx.o.cache_budget, ctx.wd.cache, reserved)
    todo_set = set(todo)
    # Blocks other ranks own, or already profiled, are not written by this rank: they cost nothing.
    sizes = [block_cache_bytes([lin.in_features for lin in block_linears(b).values()]) if i in todo_set else 0
             for i, b in enumerate(ctx.blocks)]
    plan = set(plan_cached_blocks(sizes, budget)) & todo_set
    ctx.log.data["cache"] = {"budget": ctx.o.cache_budget, "budget_bytes": budget,
                             "estimated_bytes": sum(sizes[i] for i in plan), "cached_blocks": sorted(plan),
                             "recompute_blocks": sorted(todo_set - plan)}
    ctx.log.save()
    return plan


def run_profile(ctx: RunContext) -> None:
    from rocketkit.profile import Profile, profile_block, profile_meta
    from rocketkit.whitening_cache import WhiteningCache

    if ctx.wd.allocation_path.is_file():
        return  # the allocation exists, so every profile did
    o = ctx.o
    todo = [i for i in range(ctx.n_blocks) if ctx.comm.owns(i) and not ctx.wd.has_profile(i)]
    meta = profile_meta(ctx.model, ctx.calib_ids, o.crs, o.kss)
    cache, plan = WhiteningCache(ctx.wd.cache), cache_plan(ctx, todo)

    def work(i, cb, e):
        writer = cache.writer(i) if i in plan else None
        t = time.perf_counter()
        layers = profile_block(cb, o.crs, o.kss, num_threads=ctx.threads, on_layer=lambda name: ctx.bar.set_postfix_str(name),
                               free_grams=True, backend=ctx.errors_backend, on_whitened=writer)
        e["profile_s"] = time.perf_counter() - t - (writer.seconds if writer else 0.0)
        if writer is not None:  # the cache record, then the profile: a profiled block has its cache
            writer.finish()
            e["cache_bytes"], e["cache_write_s"] = writer.bytes, writer.seconds
        e["cached"] = i in plan
        t = time.perf_counter()
        Profile(layers=layers, meta=meta).save(ctx.wd.profile_stem(i))
        e["write_s"] = time.perf_counter() - t
        e["layers"] = len(layers)
        pause_point(f"profile:{i}")

    with ctx.log.stage("calibrate_profile", blocks_todo=len(todo)) as st:
        ctx.stream_blocks("profile", "pass 1/2 profile", todo, lambda i: "all", work)
    ctx.times["calibrate_profile"] = st["seconds"]
    ctx.comm.barrier()
