"""Perplexity on held-out token sequences."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model, input_ids: torch.Tensor, batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = True
) -> float:
    """exp(mean next-token NLL) over every predicted token of every row of ``input_ids`` (n_seq, seq_len)."""
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (n_seq, seq_len) with n_seq >= 1, seq_len >= 2, got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = input_ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            targets = batch[:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            )
            total += float(nll.double())
            count += targets.numel()
            del logits
    finally:
        model.train(was_training)
    return math.exp(total / count)
