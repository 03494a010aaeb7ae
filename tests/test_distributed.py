"""``torchrun --nproc-per-node 2 -m rocketkit compress`` (gloo on the CPU) writes the same checkpoint,
byte for byte, as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_resume import TIMING_FILES, assert_same_checkpoint, compress_argv, make_tiny_folder

pytest.importorskip("torch.distributed.run")


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    folder = make_tiny_folder(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "rocketkit", *compress_argv(folder, one)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "rocketkit", *compress_argv(folder, two)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("rocketkit compress: done") == 1  # rank 0 reports
    assert_same_checkpoint(one, two)
    assert (one / "allocation.json").read_bytes() == (two / "allocation.json").read_bytes()
    assert not (tmp_path / "two.partial").exists()
    # Block i was profiled and factorized by rank i % 2; every rank ran every block's forward.
    log = json.loads((two / "runlog.json").read_text())
    (attempt,) = log["attempts"]
    assert [r["meta"]["rank"] for r in attempt["ranks"]] == [0, 1]
    for r in attempt["ranks"]:
        rank = r["meta"]["rank"]
        assert r["meta"]["world"] == 2
        for stage in ("profile", "factorize"):
            entries = [b for b in r["blocks"] if b["stage"] == stage]
            worked = [b["index"] for b in entries if b["work"] == stage]
            assert worked == [i for i in range(4) if i % 2 == rank]
            assert all(b["index"] <= max(worked) for b in entries)  # no forward past its last block
    assert "runlog.json" in TIMING_FILES
