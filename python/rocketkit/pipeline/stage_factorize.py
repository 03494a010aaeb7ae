"""Pass 2, factorize: each block's allocated layers are factorized with the whitening pass 1 saw,
so every applied error equals its profiled one, and the block is written as its own safetensors
shard, atomically.

Blocks whose whitening pass 1 cached are factorized from the cache: their weights are loaded and
no forward runs. The others are recomputed: the calibration forward runs up to the last of them,
with Grams for their factorized layers (the same inputs give the same Grams, hence the same S).
Each block's run-log entry says which (``source``: cache | recompute)."""

from __future__ import annotations

import time
from dataclasses import asdict

from rocketkit.pipeline.context import RunContext, pause_point


def write_block(ctx: RunContext, i: int, block, name: str, fact: dict, e: dict) -> None:
    """Block i's shard (its factorized layers and the rest of its weights) and record."""
    from rocketkit.fileio import atomic_write_json
    from rocketkit.shards import block_tensors, write_shard

    e["factorized_layers"] = len(fact)
    tensors = block_tensors(block, name, {rel: m for rel, (m, _) in fact.items()})
    pause_point(f"factorize:{i}")
    t = time.perf_counter()
    rec = write_shard(ctx.wd.block_shard_path(i), tensors)
    rec["block"] = i
    rec["applied"] = {a.name: asdict(a) for _, a in fact.values()}
    del tensors
    atomic_write_json(ctx.wd.block_record_path(i), rec)
    e["write_s"] = time.perf_counter() - t
    e["shard_bytes"] = rec["bytes"]


def run_factorize(ctx: RunContext) -> None:
    from tqdm.auto import tqdm

    from rocketkit.apply import factorize_block, factorize_groups
    from rocketkit.models import block_linears
    from rocketkit.whitening_cache import WhiteningCache

    todo = [i for i in range(ctx.n_blocks) if ctx.comm.owns(i) and not ctx.wd.has_block(i)]
    cache = WhiteningCache(ctx.wd.cache)
    cached = {i: groups for i in todo if (groups := cache.groups(i)) is not None}
    recompute = [i for i in todo if i not in cached]

    def recomputed(i, cb, e):
        decisions = ctx.decisions(i)
        t = time.perf_counter()
        fact = factorize_block(cb, decisions, free_grams=True, refine=ctx.o.refine) if decisions else {}
        e["factorize_s"], e["source"] = time.perf_counter() - t, "recompute"
        write_block(ctx, i, cb.block, cb.name, fact, e)

    def from_cache(i, e):
        t = time.perf_counter()
        block = ctx.blocks[i] if ctx.streaming is None else ctx.streaming.materialize_block(i)
        e["load_s"] = time.perf_counter() - t
        try:
            decisions, name = ctx.decisions(i), f"{ctx.prefix}.{i}"
            t = time.perf_counter()
            fact = (factorize_groups(name, block_linears(block), decisions, cache.group_loaders(i, device=ctx.device),
                                     refine=ctx.o.refine)
                    if decisions else {})
            e["factorize_s"], e["source"] = time.perf_counter() - t, "cache"
            write_block(ctx, i, block, name, fact, e)
        finally:
            if ctx.streaming is not None:
                ctx.streaming.release_block(i)

    with ctx.log.stage("factorize", blocks_todo=len(todo), from_cache=len(cached), recomputed=len(recompute)) as st:
        ctx.stream_blocks("factorize", "pass 2/2 factorize (recompute)", recompute, lambda i: list(ctx.decisions(i)),
                          recomputed)
        bar = tqdm(total=len(cached), desc="pass 2/2 factorize", unit="block", disable=not ctx.progress or not cached)
        try:
            for i in sorted(cached):
                with ctx.log.block(i, f"{ctx.prefix}.{i}", stage="factorize", work="factorize") as e:
                    from_cache(i, e)
                bar.update(1)
        finally:
            bar.close()
    ctx.times["factorize"] = st["seconds"]
    ctx.comm.barrier()
