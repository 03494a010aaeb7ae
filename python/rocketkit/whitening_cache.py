"""What pass 1 keeps for pass 2: each block's whitening factors, so factorizing needs no second
calibration forward and no second Gram.

Per distinct input Gram of a block, the upper Cholesky factor S is stored packed (its upper
triangle row by row, d(d+1)/2 fp64 values: half of H or S in full) in
``cache/block-00003-g1.safetensors``; ``cache/block-00003.json``, written last, lists the groups
(the linears sharing each S, jitter, dead channels) and marks the block complete. S is stored bit
for bit, so a factorization from the cache equals one from recomputed Grams (the same forward, the
same Grams, the same whitening), and the checkpoint is byte-identical either way.

The budget (``--cache-budget``) decides which blocks are cached before pass 1 starts: the last
blocks first, so that pass 2 recomputes (forward + Grams) only the leading blocks that did not fit
and runs no forward past them.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CACHE_FORMAT = "rocketkit-whitening-cache"
CACHE_FORMAT_VERSION = 1
# The share of the work folder's free space that `auto` may fill, after the checkpoint's own room.
AUTO_FREE_SHARE = 0.5
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_cache_budget(value) -> int | str:
    """``"auto"``, or a byte count: an integer >= 0 or a string such as ``"12G"`` / ``"512MiB"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        m = re.fullmatch(r"(\d+)\s*([kmgt]?)(i?b)?", text)
        if m is None:
            raise ValueError(f"cache budget must be 'auto', 0 or a byte count such as 8G or 512MiB, got {value!r}")
        return int(m.group(1)) * _SUFFIX[m.group(2)]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"cache budget must be 'auto' or an integer >= 0, got {value!r}")
    return value


def packed_bytes(d: int) -> int:
    return d * (d + 1) // 2 * 8


def block_cache_bytes(in_features: list[int]) -> int:
    """Upper bound of one block's cache: one packed S per linear (shared inputs make it smaller)."""
    return sum(packed_bytes(d) for d in in_features)


def resolve_budget(budget, folder: Path, reserved: int) -> int:
    """Bytes the cache may use: ``budget`` as given, or for ``"auto"`` AUTO_FREE_SHARE of the free
    space on ``folder``'s file system once ``reserved`` bytes (the checkpoint) are set aside."""
    if budget != "auto":
        return int(budget)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    return max(0, int(AUTO_FREE_SHARE * (free - reserved)))


def plan_cached_blocks(block_bytes: list[int], budget: int) -> list[int]:
    """The blocks to cache: the longest suffix of blocks whose total fits ``budget``."""
    chosen, used = [], 0
    for i in range(len(block_bytes) - 1, -1, -1):
        if used + block_bytes[i] > budget:
            break
        used += block_bytes[i]
        chosen.append(i)
    return sorted(chosen)


def pack_upper(S: torch.Tensor) -> torch.Tensor:
    a = S.detach().to("cpu").numpy()
    return torch.from_numpy(np.concatenate([a[i, i:] for i in range(a.shape[0])]))


def unpack_upper(packed: np.ndarray, d: int) -> np.ndarray:
    S = np.zeros((d, d), dtype=np.float64)
    start = 0
    for i in range(d):
        S[i, i:] = packed[start : start + d - i]
        start += d - i
    return S


@dataclass
class CachedGroup:
    rels: list[str]  # the block's linears (relative names) sharing this input
    d: int
    jitter: float
    dead_channels: int


class WhiteningCache:
    """The ``cache/`` folder of a work folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _record(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.json"

    def _group_file(self, i: int, g: int) -> Path:
        return self.folder / f"block-{i:05d}-g{g}.safetensors"

    def save_group(self, i: int, g: int, S: torch.Tensor) -> int:
        """Store group g's factor of block i; returns the bytes written."""
        from rocketkit.fileio import atomic_save_safetensors

        path = self._group_file(i, g)
        atomic_save_safetensors(path, {"S_packed": pack_upper(S)},
                                {"format": CACHE_FORMAT, "version": str(CACHE_FORMAT_VERSION), "d": str(S.shape[0])})
        return path.stat().st_size

    def writer(self, i: int) -> "BlockWriter":
        """A collector of block i's factors, to pass as ``profile_block(on_whitened=...)``."""
        return BlockWriter(self, i)

    def finish_block(self, i: int, groups: list[CachedGroup]) -> None:
        """Mark block i complete (after every group's file is written)."""
        from dataclasses import asdict

        from rocketkit.fileio import atomic_write_json

        atomic_write_json(self._record(i), {"format": CACHE_FORMAT, "version": CACHE_FORMAT_VERSION, "block": i,
                                            "groups": [asdict(g) for g in groups]})

    def groups(self, i: int) -> list[CachedGroup] | None:
        """Block i's groups, or None when it has no complete cache (or an unreadable record)."""
        from rocketkit.fileio import read_json

        path = self._record(i)
        if not path.is_file():
            return None
        doc = read_json(path)
        if doc.get("format") != CACHE_FORMAT or doc.get("version") != CACHE_FORMAT_VERSION or doc.get("block") != i:
            raise ValueError(f"{path}: not a rocketkit whitening-cache record of version {CACHE_FORMAT_VERSION} for block {i}")
        try:
            groups = [CachedGroup(list(g["rels"]), int(g["d"]), float(g["jitter"]), int(g["dead_channels"]))
                      for g in doc["groups"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed group record ({e})") from None
        if not all(self._group_file(i, g).is_file() for g in range(len(groups))):
            return None
        return groups

    def group_loaders(self, i: int, device="cpu") -> list:
        """Block i's groups as ``apply.factorize_groups`` takes them: (load its whitening, rels)."""
        groups = self.groups(i)
        if groups is None:
            raise ValueError(f"{self.folder}: block {i} has no complete whitening cache")
        return [(lambda g=g, grp=grp: self.load_whitening(i, g, grp, device=device), grp.rels)
                for g, grp in enumerate(groups)]

    def load_whitening(self, i: int, g: int, group: CachedGroup, device="cpu"):
        """Group g's :class:`rocketkit.whiten.Whitening` of block i, validated."""
        from rocketkit.fileio import load_safetensors
        from rocketkit.whiten import Whitening

        path = self._group_file(i, g)
        tensors, meta = load_safetensors(path)
        t = tensors.get("S_packed")
        n = group.d * (group.d + 1) // 2
        if (meta.get("format") != CACHE_FORMAT or meta.get("d") != str(group.d) or t is None
                or t.dtype != torch.float64 or tuple(t.shape) != (n,)):
            raise ValueError(f"{path}: expected S_packed float64 ({n},) of a {group.d}² factor "
                             "(delete the cache folder to recompute)")
        S = torch.from_numpy(unpack_upper(t.numpy(), group.d)).to(device)
        return Whitening(S=S, jitter=group.jitter, dead_channels=group.dead_channels)


class BlockWriter:
    """Saves block i's factors as ``profile.profile_block`` whitens them (its ``on_whitened``);
    :meth:`finish` marks the block complete. Groups kept dense (no whitening) are not stored."""

    def __init__(self, cache: WhiteningCache, i: int):
        self.cache, self.i = cache, i
        self.groups: list[CachedGroup] = []
        self.bytes, self.seconds = 0, 0.0

    def __call__(self, g: int, rels, wh) -> None:
        import time

        if wh is None:
            return
        t = time.perf_counter()
        self.bytes += self.cache.save_group(self.i, len(self.groups), wh.S)
        self.groups.append(CachedGroup(list(rels), int(wh.S.shape[0]), float(wh.jitter), int(wh.dead_channels)))
        self.seconds += time.perf_counter() - t

    def finish(self) -> None:
        self.cache.finish_block(self.i, self.groups)
