"""Evaluate: held-out perplexity of the dense model and of the compressed one, computed one decoder
block at a time (a streaming model is never materialized); the compressed blocks are read back from
the shards pass 2 wrote, so the figure is the saved checkpoint's."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from rocketkit.pipeline.context import RunContext


@torch.no_grad()
def blockwise_perplexity(model, input_ids, batch_size: int = 4, device="cpu", replace=None, progress: bool = False,
                         desc: str = "perplexity") -> float:
    """Perplexity computed one decoder block at a time (a streaming model is never materialized);
    the same definition as ``evaluate.perplexity``. ``replace(i, block)`` may return
    {relative name: module} to use in block i instead of its own modules (a compressed block)."""
    from tqdm.auto import tqdm

    from rocketkit.calibrate import BlockStream
    from rocketkit.apply import _set_submodule
    from rocketkit.models import logits_after_blocks

    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (n_seq, seq_len) with seq_len >= 2, got {tuple(input_ids.shape)}")
    stream = BlockStream(model, input_ids, batch_size=batch_size, device=device)
    try:
        for i in tqdm(range(len(stream)), desc=desc, unit="block", disable=not progress):
            originals = {}

            def swap_in(block, i=i):
                for rel, module in (replace(i, block) if replace is not None else {}).items():
                    originals[rel] = block.get_submodule(rel)
                    _set_submodule(block, rel, module)

            try:
                stream.run(i, grams_for=None, before=swap_in)
            finally:
                for rel, module in originals.items():
                    _set_submodule(stream.blocks[i], rel, module)
                stream.release(i)
        total, count = 0.0, 0
        for b, hidden in enumerate(stream.hidden):
            batch = input_ids[b * batch_size : (b + 1) * batch_size].to(device)
            logits = logits_after_blocks(model, stream.blocks, batch, hidden, stream.output_arity)
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            )
            total += float(nll.double())
            count += targets.numel()
            del logits
    finally:
        stream.close()
    return math.exp(total / count)



def factorized_from_shard(ctx: RunContext, i: int, folder: Path, shard_name: str) -> dict:
    """Block i's FactorizedLinear modules (rel -> module) read from its shard."""
    from rocketkit.shards import load_factorized_block

    recs = {rel: asdict(d) for rel, d in ctx.decisions(i).items()}
    if not recs:
        return {}
    return load_factorized_block(folder / shard_name, f"{ctx.prefix}.{i}", recs, dtype=ctx.dtype, device=ctx.device)


def run_evaluate(ctx: RunContext) -> None:
    from rocketkit.fileio import atomic_write_json, read_json

    ctx.ppl = (None, None)
    if ctx.eval_ids is None:
        return
    if ctx.comm.is_main:
        if ctx.wd.eval_path.is_file():
            doc = read_json(ctx.wd.eval_path)
            ctx.ppl = (doc["ppl_before"], doc["ppl_after"])
        else:
            bs = ctx.o.batch_size
            with ctx.log.stage("eval_before") as st:
                before = blockwise_perplexity(ctx.model, ctx.eval_ids, bs, ctx.device, progress=ctx.progress,
                                              desc="perplexity (dense)")
            ctx.times["eval_before"] = st["seconds"]
            with ctx.log.stage("eval_after") as st:
                after = blockwise_perplexity(
                    ctx.model, ctx.eval_ids, bs, ctx.device, progress=ctx.progress, desc="perplexity (compressed)",
                    replace=lambda i, block: factorized_from_shard(ctx, i, ctx.wd.checkpoint, ctx.wd.shard_name(i + 1)),
                )
            ctx.times["eval_after"] = st["seconds"]
            atomic_write_json(ctx.wd.eval_path, {"ppl_before": before, "ppl_after": after})
            ctx.ppl = (before, after)
    ctx.comm.barrier()
