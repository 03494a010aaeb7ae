"""Block-by-block calibration: fp64 Gram matrices H = XᵀX of every linear layer's input.

The model runs once up to its first decoder block to capture that block's inputs and the
keyword arguments the model hands each block (mask, rotary embeddings, position ids...).
Then each block runs alone over all batches while hooks on its linears accumulate H, its
dense outputs become the next block's inputs, and only then is it yielded, so the consumer
may replace its modules. Only one block's Grams exist at a time.

A model from ``models.open_streaming`` keeps its blocks on the meta device: each block is
materialized just before it runs and released when the consumer asks for the next one, so only
one block's weights exist at a time too. The capture pass runs only block 0, once (recorders stand in).

``BlockStream`` is the explicit form the pipeline uses: it runs block i when asked, with Grams only
for the linears asked for (none for a block another rank owns or a resumed run already did).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from rocketkit.models import block_linears, prepare_model, streaming_weights, walk_model


@dataclass(eq=False)
class Gram:
    """H = Σ xᵀx over finite tokens, in fp64. Tokens with any NaN/Inf are counted in ``skipped``.

    By default :meth:`add` adds torch's full fp64 product and :meth:`finalize` averages the two
    triangles. ``syrk=True`` (CPU) updates the upper triangle only with the native SYRK and finalize
    mirrors it: 1.6-1.8x faster alone (benchmarks/bench_gram.py), but slower inside the calibration
    forward at 2 threads, where OpenBLAS's threads and torch's contend for the cores (SmolLM2 at 131k
    tokens, 2 cores: 17.9 s per block against 13.8 s; at 1 thread SYRK wins, 0.91 s against 1.31 s
    at 4k tokens; benchmarks/bench_gram_insitu.py). Either way H ends exactly symmetric."""

    H: torch.Tensor
    tokens: int = 0
    skipped: int = 0
    syrk: bool = False

    @property
    def one_triangle(self) -> bool:
        return self.syrk and self.H.device.type == "cpu"

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        finite = torch.isfinite(x).all(dim=1)
        n_ok = int(finite.sum())
        if n_ok < x.shape[0]:
            self.skipped += x.shape[0] - n_ok
            x = x[finite]
        if n_ok:
            # bf16/fp32 products are exact in fp64; fp32 accumulation loses PSD on outlier channels.
            x = x.to(torch.float64)
            if self.one_triangle:
                from rocketkit._native import gram_accumulate

                gram_accumulate(self.H.numpy(), x.contiguous().numpy())
            else:
                self.H.addmm_(x.T, x)
        self.tokens += n_ok

    def finalize(self) -> None:
        """Make H exactly symmetric once every batch is added."""
        if self.one_triangle:
            from rocketkit._native import gram_symmetrize

            gram_symmetrize(self.H.numpy())
        else:
            # addmm's two triangles may differ in the last bit; consumers factor a symmetric H.
            self.H = (self.H + self.H.T).mul_(0.5)


@dataclass
class CalibratedBlock:
    index: int
    name: str  # e.g. "model.layers.3"
    block: nn.Module
    linears: dict[str, nn.Linear]  # names relative to the block
    grams: dict[str, Gram] = field(default_factory=dict)  # same keys; shared inputs share one Gram object


class _StopForward(Exception):
    pass


def _block_output(out) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older ones a tuple headed by the hidden states.
    return out[0] if isinstance(out, (tuple, list)) else out


def block_output_like(arity: int | None, hidden_states: torch.Tensor):
    """What a block of this model returns, with ``hidden_states`` in it: the tensor itself (arity
    None, transformers 5) or a tuple headed by it (older code, hybrid models: ``h, attn = layer(...)``)."""
    return hidden_states if arity is None else (hidden_states,) + (None,) * (arity - 1)


def _capture_block_inputs(model, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device):
    """Per batch: block 0's hidden states, and per block the (args, kwargs) the model passes it
    besides the hidden states; and the arity of a block's output (see :func:`block_output_like`).
    Each block's forward is swapped for a recorder, so nothing after the embedding is computed
    (block 0 runs once, on the first batch, to learn what a block returns: the model's loop unpacks
    it); the last recorder stops the model's forward."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []  # [batch][block]
    current: list[tuple[tuple, dict]] = []
    arity: list[int | None] = []

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                hidden.append(hidden_states)
                if not arity:
                    out = type(blocks[0]).forward(blocks[0], hidden_states, *args, **kwargs)
                    arity.append(len(out) if isinstance(out, (tuple, list)) else None)
                    del out
            current.append((args, kwargs))
            if i == len(blocks) - 1:
                raise _StopForward
            return block_output_like(arity[0], hidden_states)

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            current = []
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            if len(current) != len(blocks):
                raise RuntimeError(f"expected the model to call {len(blocks)} decoder blocks, saw {len(current)}")
            calls.append(current)
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    return hidden, calls, arity[0] if arity else None


def _gram_hooks(linears: dict[str, nn.Linear], grams: dict[str, Gram], seen: dict):
    """Forward pre-hooks adding each linear's input to its Gram. Linears whose input is the same
    tensor in one forward call (same storage, shape, stride, dtype) share one Gram; ``seen`` maps that
    identity to (tensor, Gram) and is cleared per call — holding the tensor keeps its address from
    being reused by another input during the call."""
    handles = []

    def hook_for(name: str, d1: int, device):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            hit = seen.get(key)
            if hit is not None:
                gram = hit[1]
                if grams.setdefault(name, gram) is not gram:
                    raise RuntimeError(f"input sharing of {name} changed between calibration batches")
                return
            gram = grams.get(name)
            if gram is None:
                gram = grams[name] = Gram(torch.zeros(d1, d1, dtype=torch.float64, device=device))
            seen[key] = (x, gram)
            gram.add(x.detach())

        return hook

    for name, lin in linears.items():
        handles.append(lin.register_forward_pre_hook(hook_for(name, lin.in_features, lin.weight.device)))
    return handles


class BlockStream:
    """The decoder blocks of ``model`` run one at a time, in order, over every calibration batch.

    Construction runs the model up to its first block (recorders stand in for the blocks) to
    capture block 0's inputs and the arguments the model hands each block. ``run(i, ...)`` then
    materializes block i (streaming models), feeds it the current activations with Gram hooks on
    the requested linears only, and makes its dense outputs the next block's inputs; ``release(i)``
    frees block i's weights. Callers that need no Grams of a block (another rank owns it, or a
    resumed run already profiled it) still run it, so every block sees the same inputs.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, device="cpu"):
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be (n_seq, seq_len) with n_seq >= 1, got {tuple(input_ids.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        prepare_model(model)  # 3-D MoE experts become per-expert linears (idempotent)
        walk = walk_model(model)  # fails before any work
        self.path, self.blocks = walk.prefix, walk.blocks
        self.streaming = streaming_weights(model)
        self._was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.streaming is not None:
                    self.streaming.materialize_block(0)  # the capture runs block 0 once
                self.hidden, self.calls, self.output_arity = _capture_block_inputs(
                    model, self.blocks, input_ids, batch_size, device)
        except BaseException:
            model.train(self._was_training)
            raise
        self.next_index = 0

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def n_batches(self) -> int:
        return len(self.hidden)

    @torch.no_grad()
    def run(self, i: int, grams_for="all", on_batch=None, before=None) -> CalibratedBlock:
        """Run block i (the next one) over every batch; Grams of the linears named in ``grams_for``
        ("all", None, or names relative to the block). ``before(block)`` runs after the weights are
        materialized and before the forward (to swap modules in). Returns the block with its Grams;
        its weights stay materialized until :meth:`release`."""
        if i != self.next_index:
            raise RuntimeError(f"blocks run in order: expected block {self.next_index}, got {i}")
        if self.streaming is not None:
            self.streaming.materialize_block(i)
        block = self.blocks[i]
        if before is not None:
            before(block)
        # Without Grams the block may have no nn.Linear left (all swapped for compressed modules).
        linears = (block_linears(block) if grams_for is not None
                   else {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)})
        if grams_for == "all":
            wanted = linears
        else:
            names = set(grams_for or ())
            unknown = names - set(linears)
            if unknown:
                raise ValueError(f"{self.path}.{i}: no linears named {sorted(unknown)}")
            wanted = {n: m for n, m in linears.items() if n in names}
        grams: dict[str, Gram] = {}
        seen: dict = {}
        handles = _gram_hooks(wanted, grams, seen)
        try:
            outputs = []
            for b, x in enumerate(self.hidden):
                seen.clear()
                args, kwargs = self.calls[b][i]
                outputs.append(_block_output(block(x, *args, **kwargs)))
                if on_batch is not None:
                    on_batch()
            seen.clear()
        finally:
            for h in handles:
                h.remove()
        for n in wanted:
            if n not in grams:
                # Never called (an MoE expert no calibration token was routed to): an empty Gram, so
                # the profile keeps the layer dense and says why.
                lin = wanted[n]
                grams[n] = Gram(torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=lin.weight.device))
        for gram in {id(g): g for g in grams.values()}.values():
            gram.finalize()
        # Dense outputs feed the next block before the consumer touches this one.
        self.hidden = outputs
        self.next_index = i + 1
        return CalibratedBlock(index=i, name=f"{self.path}.{i}", block=block, linears=linears, grams=grams)

    def release(self, i: int) -> None:
        if self.streaming is not None:
            self.streaming.release_block(i)

    def close(self) -> None:
        """Drop the activations and restore the model's training flag."""
        if self.streaming is not None and self.next_index == 0:
            self.streaming.release_block(0)  # materialized by the capture, never handed out
        self.hidden, self.calls = [], []
        self.model.train(self._was_training)


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Iterator[CalibratedBlock]:
    """Yield each decoder block with the fp64 Grams of its linears' inputs, in order.

    The model must already be on ``device``; ``input_ids`` (n_seq, seq_len) are moved there batch by
    batch. A streaming model (``models.open_streaming``) has block i's weights only while block i is
    being calibrated or held by the consumer; they are released when the generator resumes.
    Activations of all batches stay on ``device`` (inputs and outputs of one block at a time).
    """
    stream = BlockStream(model, input_ids, batch_size=batch_size, device=device)
    try:
        bar = tqdm(total=len(stream) * stream.n_batches, desc="calibrate", unit="batch", disable=not progress)
        try:
            for i in range(len(stream)):
                try:
                    yield stream.run(i, on_batch=lambda: bar.update(1))
                finally:
                    # Resumed (or closed): the consumer is done with this block.
                    stream.release(i)
        finally:
            bar.close()
    finally:
        stream.close()
