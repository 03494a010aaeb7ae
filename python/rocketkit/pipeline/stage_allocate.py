"""Allocate: every block's profile is read back (validated) and joined; rank 0 solves the knapsack
(``rocketkit.allocate``), writes allocation.json and every rank uses it as read back, so a resumed
run starts pass 2 from the same bytes."""

from __future__ import annotations

import json

from rocketkit.pipeline.context import RunContext


def merged_profile(ctx: RunContext):
    """All blocks' profiles read back (validated) and joined in block order."""
    from rocketkit.profile import Profile, profile_meta

    o, layers = ctx.o, {}
    for i in range(ctx.n_blocks):
        stem = ctx.wd.profile_stem(i)
        try:
            p = Profile.load(stem)
        except ValueError as e:
            raise ValueError(f"{e} (delete that block's profile files to recompute it, or pass --restart)") from None
        expected = [f"{ctx.prefix}.{i}.{rel}" for rel in ctx.linears(i)]
        if list(p.layers) != expected or list(p.crs) != list(o.crs) or list(p.kss) != list(o.kss):
            raise ValueError(f"{stem}.json: does not hold block {i}'s layers on this grid (pass --restart)")
        layers.update(p.layers)
    return Profile(layers=layers, meta=profile_meta(ctx.model, ctx.calib_ids, o.crs, o.kss))


def run_allocate(ctx: RunContext) -> None:
    from rocketkit.allocate import Allocation, allocate

    o = ctx.o
    with ctx.log.stage("allocate") as st:
        data = None
        if ctx.comm.is_main:
            # Read (and validate) every profile even when resuming past the allocation: a damaged
            # file is reported now, not after the second pass.
            ctx.profile = profile = merged_profile(ctx)
            st["layers"] = len(profile.layers)
            if not ctx.wd.allocation_path.is_file():
                allocation = allocate(profile, o.ratio, cost=o.cost, alpha=o.alpha, buckets=o.buckets,
                                      weighting=o.weighting, method=o.method, power=o.power, error_cap=o.error_cap)
                allocation.save(ctx.wd.allocation_path)
            data = json.dumps(Allocation.load(ctx.wd.allocation_path).to_json()).encode()
        data = ctx.comm.broadcast_bytes(data)
        ctx.allocation = Allocation.from_json(json.loads(data), where=str(ctx.wd.allocation_path))
    ctx.times["allocate"] = st["seconds"]
    expected = {f"{ctx.prefix}.{i}.{rel}" for i in range(ctx.n_blocks) for rel in ctx.linears(i)}
    if set(ctx.allocation.layers) != expected:
        raise ValueError(f"{ctx.wd.allocation_path}: its layers are not this model's (pass --restart)")
