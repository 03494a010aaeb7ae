"""Pass 1's whitening cache: exact round trip, the budget plan, and damaged files refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from rocketkit.whiten import whiten
from rocketkit.whitening_cache import (CachedGroup, WhiteningCache, block_cache_bytes, parse_cache_budget,
                                       plan_cached_blocks)


def _factor(d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d + 1, d, generator=g, dtype=torch.float64)
    return whiten(x.T @ x)


@pytest.mark.parametrize("d", [1, 19, 111])
def test_round_trip_is_bit_exact(tmp_path, d):
    wh = _factor(d, d)
    cache = WhiteningCache(tmp_path)
    assert cache.groups(3) is None  # nothing cached yet
    written = cache.save_group(3, 0, wh.S)
    group = CachedGroup(["q", "k"], d, wh.jitter, wh.dead_channels)
    cache.finish_block(3, [group])
    assert written > d * (d + 1) // 2 * 8  # the packed triangle plus the header
    (got,) = cache.groups(3)
    assert got == group
    back = cache.load_whitening(3, 0, got)
    assert torch.equal(back.S, wh.S) and back.jitter == wh.jitter


def test_block_without_its_record_or_files_is_not_cached(tmp_path):
    cache = WhiteningCache(tmp_path)
    cache.save_group(0, 0, _factor(7, 0).S)
    assert cache.groups(0) is None  # killed before the record: recomputed in pass 2
    cache.finish_block(0, [CachedGroup(["a"], 7, 0.0, 0), CachedGroup(["b"], 7, 0.0, 0)])
    assert cache.groups(0) is None  # the second group's file is missing


def test_damaged_files_are_refused_by_name(tmp_path):
    cache = WhiteningCache(tmp_path)
    wh = _factor(11, 1)
    cache.save_group(2, 0, wh.S)
    cache.finish_block(2, [CachedGroup(["a"], 11, 0.0, 0)])
    path = tmp_path / "block-00002-g0.safetensors"
    with pytest.raises(ValueError, match="block-00002-g0.safetensors"):
        cache.load_whitening(2, 0, CachedGroup(["a"], 12, 0.0, 0))  # another width than stored
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="block-00002-g0.safetensors"):
        cache.load_whitening(2, 0, cache.groups(2)[0])
    record = tmp_path / "block-00002.json"
    record.write_text(json.dumps({"format": "rocketkit-whitening-cache", "version": 99, "block": 2, "groups": []}))
    with pytest.raises(ValueError, match="block-00002.json"):
        cache.groups(2)


def test_budget_plan_caches_the_last_blocks_first():
    sizes = [block_cache_bytes([4, 4]), block_cache_bytes([4, 4]), block_cache_bytes([4, 8])]
    assert sizes == [160, 160, 368]
    assert plan_cached_blocks(sizes, 10**9) == [0, 1, 2]
    assert plan_cached_blocks(sizes, 368 + 160) == [1, 2]
    assert plan_cached_blocks(sizes, 367) == []
    assert plan_cached_blocks(sizes, 0) == []


@pytest.mark.parametrize("text, value", [("auto", "auto"), (" AUTO ", "auto"), ("0", 0), ("512", 512), ("8G", 8 << 30),
                                         ("512MiB", 512 << 20), ("3kb", 3 << 10), (0, 0), (10, 10)])
def test_parse_cache_budget(text, value):
    assert parse_cache_budget(text) == value


@pytest.mark.parametrize("bad", ["-1", "1.5G", "lots", "", -1, True, 2.0])
def test_parse_cache_budget_rejects(bad):
    with pytest.raises(ValueError, match="cache budget"):
        parse_cache_budget(bad)


def test_apply_from_cache_equals_apply_allocation(tmp_path, tiny_llama, tiny_ids):
    """The study's runs factorize from the profile's cache: the same modules, bit for bit, as the
    calibration forward would give, and the same applied errors."""
    import copy

    from rocketkit.allocate import allocate
    from rocketkit.apply import apply_allocation, apply_from_cache
    from rocketkit.profile import REDUCED_CRS, REDUCED_KS, profile_model

    cache = WhiteningCache(tmp_path)
    prof = profile_model(tiny_llama, tiny_ids, crs=REDUCED_CRS, kss=REDUCED_KS, batch_size=2, progress=False,
                         whitening_cache=cache)
    allocation = allocate(prof, 0.3)
    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    applied_a = apply_allocation(a, tiny_ids, allocation, batch_size=2, progress=False)
    applied_b = apply_from_cache(b, allocation, cache, progress=False)
    assert applied_a and applied_a == applied_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_from_cache(b, allocation, cache, progress=False)  # already compressed
