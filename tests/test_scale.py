"""Streaming (one decoder block in memory at a time): exact Grams, and peak RSS independent of depth.

Peak RSS is measured in a fresh subprocess (this file run as a script) so the test process's own
allocations do not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024

# Llama-like block of 1024 hidden / 2816 MLP: 12.85M parameters, 51 MB in fp32.
_WIDE = dict(
    vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
    max_position_embeddings=256, tie_word_embeddings=False,
)


def _write_checkpoint(folder: Path, n_blocks: int, seed: int = 0, max_shard_size="40MB", **overrides) -> int:
    """Random-weight Llama checkpoint (sharded safetensors); returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**_WIDE, "num_hidden_layers": n_blocks, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return sum(p.numel() for p in model.parameters())


def _dense(folder) -> torch.nn.Module:
    # load_model wants a tokenizer; these synthetic folders have none.
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


def _start_worker(folder: Path, mode: str, *extra) -> subprocess.Popen:
    # A fixed glibc mmap threshold keeps freed block-sized tensors from lingering in the heap, so the
    # peak measures what is allocated rather than allocator retention (which varies by ~1 block).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(folder), mode, *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish_worker(proc: subprocess.Popen, timeout: float = 600) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _run_worker(folder: Path, mode: str) -> dict:
    return _finish_worker(_start_worker(folder, mode), timeout=300)


@pytest.fixture(scope="module")
def wide_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    params = {n: _write_checkpoint(root / f"b{n}", n) for n in (2, 4)}
    return root, params


def test_streaming_peak_rss_independent_of_depth(wide_checkpoints):
    root, params = wide_checkpoints
    block_bytes = (params[4] - params[2]) // 2 * 4  # fp32
    full_bytes = params[4] * 4
    s2 = _run_worker(root / "b2", "stream")
    s4 = _run_worker(root / "b4", "stream")
    f4 = _run_worker(root / "b4", "full")
    report = {k: round(v["peak_rss"] / MIB, 1) for k, v in (("stream2", s2), ("stream4", s4), ("full4", f4))}
    print(f"\npeak RSS MiB {report}; block {block_bytes / MIB:.1f} MiB, full model {full_bytes / MIB:.1f} MiB")
    assert s4["blocks"] == 4 and s2["blocks"] == 2
    # Two extra blocks would add 2·block_bytes (~103 MB) if they stayed resident; streaming adds < half a block.
    assert abs(s4["peak_rss"] - s2["peak_rss"]) < 0.5 * block_bytes
    # The control shows the measurement sees depth: the materialized model is at least 2 blocks bigger.
    assert f4["peak_rss"] - s4["peak_rss"] > 1.5 * block_bytes
    # Above the bare interpreter: the full model's size plus a fixed margin for the Grams and the
    # whitening temporaries (six 2816² fp64 matrices).
    assert s4["peak_rss"] - s4["base_rss"] < full_bytes + 6 * 2816**2 * 8


def test_streaming_compress_peak_rss_independent_of_depth(wide_checkpoints, tmp_path):
    """The whole compress (both passes, allocation, shard-by-shard checkpoint) on 2 and 4 blocks."""
    from rocketkit import load_pretrained

    root, params = wide_checkpoints
    block_bytes = (params[4] - params[2]) // 2 * 4  # fp32
    full_bytes = params[4] * 4
    # Both depths at once (one thread each): the test costs the deeper run's time.
    procs = {n: _start_worker(root / f"b{n}", "compress", tmp_path / f"out{n}") for n in (2, 4)}
    runs = {n: _finish_worker(p) for n, p in procs.items()}
    report = {n: round(r["peak_rss"] / MIB, 1) for n, r in runs.items()}
    print(f"\ncompress peak RSS MiB {report}; block {block_bytes / MIB:.1f} MiB, full model {full_bytes / MIB:.1f} MiB")
    for n, r in runs.items():
        assert r["blocks"] == n and r["factorized_layers"] > 0
        assert r["max_profiled_vs_applied_error"] <= 1e-6
        # The run log's per-block peaks are what the whole-run peak is made of.
        assert max(r["block_peaks"]) <= r["peak_rss"]
    assert abs(runs[4]["peak_rss"] - runs[2]["peak_rss"]) < 0.5 * block_bytes
    # Above the interpreter with its libraries: the full fp32 model plus a fixed margin for one
    # block's Grams and whitening temporaries (eight 2816² fp64 matrices), not a multiple of depth.
    assert runs[4]["peak_rss"] - runs[4]["base_rss"] < full_bytes + 8 * 2816**2 * 8
    cfg = json.loads((tmp_path / "out4" / "config.json").read_text())
    index = json.loads((tmp_path / "out4" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # non-block weights + one shard per block
    model = load_pretrained(tmp_path / "out4")
    assert sum(1 for r in cfg["rocketkit"]["layers"]) == runs[4]["factorized_layers"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long)).logits).all()


def test_streamed_grams_equal_dense(tmp_path):
    from rocketkit.calibrate import stream_blocks
    from rocketkit.models import open_streaming, streaming_weights

    for tie in (False, True):
        folder = tmp_path / f"tie{tie}"
        _write_checkpoint(folder, 3, seed=1, max_shard_size="200KB", hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=257, tie_word_embeddings=tie)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, 257, (5, 19), generator=g)
        dense = _dense(folder)
        ref = {f"{cb.name}.{k}": v.H.clone() for cb in stream_blocks(dense, ids, batch_size=2, progress=False)
               for k, v in cb.grams.items()}
        lm = open_streaming(str(folder))
        assert lm.streaming is streaming_weights(lm.model) and len(lm.streaming) == 3
        assert all(p.device.type == "meta" for p in lm.streaming.blocks.parameters())
        if tie:
            assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
        got = {}
        for cb in stream_blocks(lm.model, ids, batch_size=2, progress=False):
            assert lm.streaming.is_materialized(cb.index)
            assert all(p.device.type == "cpu" for p in cb.block.parameters())
            got.update({f"{cb.name}.{k}": v.H.clone() for k, v in cb.grams.items()})
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-10)
        # Every block went back to meta; the non-block weights equal the dense model's.
        assert all(p.device.type == "meta" for p in lm.streaming.blocks.parameters())
        # With every block materialized the skeleton is the dense model.
        for i in range(3):
            lm.streaming.materialize_block(i)
        with torch.no_grad():
            torch.testing.assert_close(lm.model(ids).logits, dense(ids).logits, rtol=0, atol=1e-6)
        lm.streaming.release_block(1)
        assert all(p.device.type == "meta" for p in lm.streaming.blocks[1].parameters())


def test_release_keeps_swapped_modules(tmp_path):
    from torch import nn

    from rocketkit.models import open_streaming

    _write_checkpoint(tmp_path, 1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50)
    lm = open_streaming(str(tmp_path))
    block = lm.streaming.materialize_block(0)
    new = nn.Linear(32, 32, bias=False)
    block.self_attn.q_proj = new
    lm.streaming.release_block(0)
    assert new.weight.device.type == "cpu" and block.self_attn.k_proj.weight.device.type == "meta"
    with pytest.raises(ValueError, match="out of range"):
        lm.streaming.materialize_block(1)


def test_load_model_stream_flag_and_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from rocketkit.models import load_model

    _write_checkpoint(tmp_path, 2, max_shard_size="10GB", hidden_size=32, intermediate_size=48,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    lm = load_model(str(tmp_path), stream=True)
    assert lm.streaming is not None and lm.tokenizer is None
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    lm = load_model(str(tmp_path), stream=True)
    lm.streaming.materialize_block(0)
    with pytest.raises(ValueError, match="up_proj"):
        lm.streaming.materialize_block(1)


def test_runlog(tmp_path):
    from rocketkit.fileio import read_json
    from rocketkit.runlog import RunLog

    log = RunLog(tmp_path / "run.json", model="x")
    with log.stage("calibrate") as e:
        e["tokens"] = 7
    for i in range(2):
        with log.block(i, f"model.layers.{i}"):
            _ = bytearray(8 * MIB)
    data = read_json(tmp_path / "run.json")
    assert data["meta"]["model"] == "x" and data["stages"][0]["tokens"] == 7
    assert [b["index"] for b in data["blocks"]] == [0, 1]
    assert all(b["seconds"] >= 0 and b["peak_rss_bytes"] > 0 for b in data["stages"] + data["blocks"])
    assert data["peak_rss_bytes"] >= max(b["peak_rss_bytes"] for b in data["blocks"])


def _worker(folder: str, mode: str) -> None:
    """Calibrate + whiten every block of ``folder`` on 4 x 64 tokens; print peak RSS as JSON."""
    torch.set_num_threads(1)
    from rocketkit.calibrate import stream_blocks
    from rocketkit.models import load_model
    from rocketkit.whiten import whiten

    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) high-water mark into ru_maxrss
    # across fork + exec, so every worker would report the test process's peak.
    from transformers import AutoModelForCausalLM  # noqa: F401  (the libraries are not the model)

    from rocketkit.runlog import vm_hwm_bytes

    base = vm_hwm_bytes()
    model = load_model(folder, stream=True).model if mode == "stream" else _dense(folder)
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    n = 0
    for cb in stream_blocks(model, ids, batch_size=2, progress=False):
        for g in {id(g): g for g in cb.grams.values()}.values():
            whiten(g.H)
        n += 1
        del cb
    peak = vm_hwm_bytes()
    print(json.dumps({"peak_rss": peak, "base_rss": base, "blocks": n}))


def _compress_worker(folder: str, out: str) -> None:
    """pipeline.compress of ``folder`` (small grid, 4 x 64 tokens); print the run's peak RSS as JSON."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (the libraries are not the model)

    from rocketkit.pipeline import compress
    from rocketkit.runlog import vm_hwm_bytes

    base = vm_hwm_bytes()
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    s = compress(folder, 0.1, out_dir=out, calib_ids=ids, crs=(0.5,), kss=(1.0,), buckets=2000, batch_size=2,
                 num_threads=1, progress=False)
    # The run log resets VmHWM per block and keeps the maximum; whatever ran after its last entry
    # shows in the current VmHWM.
    log = json.loads((Path(out) / "runlog.json").read_text())
    blocks = log["attempts"][0]["ranks"][0]["blocks"]
    print(json.dumps({"peak_rss": max(log["peak_rss_bytes"], vm_hwm_bytes()), "base_rss": base, "blocks": s["blocks"],
                      "factorized_layers": s["factorized_layers"],
                      "max_profiled_vs_applied_error": s["max_profiled_vs_applied_error"],
                      "block_peaks": [b["peak_rss_bytes"] for b in blocks]}))


if __name__ == "__main__":
    if sys.argv[2] == "compress":
        _compress_worker(sys.argv[1], sys.argv[3])
    else:
        _worker(sys.argv[1], sys.argv[2])
