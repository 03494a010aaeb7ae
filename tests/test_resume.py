"""Resumable compress: SIGKILL / SIGINT mid-run, rerun, and the checkpoint is bit-identical; a changed
configuration is refused; --restart discards the unfinished run.

The interrupted runs are real ``python -m rocketkit compress`` processes. ``ROCKETKIT_TEST_PAUSE_AT``
makes one sleep at a chosen point (after block i's profile file, or with block i factorized but its
shard unwritten), where the test kills or interrupts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rocketkit.cli import main

N_BLOCKS = 4
# Tiny seeded Llama, real tokenizer and BoolQ calibration text; one thread so runs are comparable.
ARGS = ["--ratio", "0.3", "--calib-tokens", "192", "--seq-len", "32", "--eval-tokens", "64", "--crs", "0.2,0.4,0.6",
        "--kss", "1,2", "--buckets", "5000", "--batch-size", "2", "--threads", "1", "--no-progress"]
TIMING_FILES = {"runlog.json"}  # wall times and memory differ between runs; everything else must not


def make_tiny_folder(root: Path) -> Path:
    """A 4-block tiny Llama saved with SmolLM2's tokenizer (vocab 49152)."""
    from conftest import make_tiny_model
    from transformers import AutoTokenizer

    from rocketkit.models import resolve_spec

    tokenizer = AutoTokenizer.from_pretrained(resolve_spec("smollm2"), local_files_only=True)
    model = make_tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=N_BLOCKS)
    folder = root / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compress_argv(folder: Path, out: Path, *extra) -> list[str]:
    return ["compress", str(folder), *ARGS, "--out", str(out), *extra]


def start(folder: Path, out: Path, pause_at: str, *extra) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ROCKETKIT_TEST_PAUSE_AT": pause_at}
    # SIGINT back to its default: a shell without job control starts background jobs (and so this
    # pytest and its children) with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "rocketkit", *compress_argv(folder, out, *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, bytes]:
    """Send ``sig``; returns (exit code, the rest of stderr)."""
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a paused run behind (it would sleep for an hour)
        proc.communicate()
        raise
    return proc.returncode, err


def wait_paused(proc: subprocess.Popen, event: str, timeout: float = 300) -> None:
    """Read stderr until the process reports that it paused at ``event``."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if f"paused at {event}".encode() in line:
            return
    proc.kill()
    raise AssertionError(f"the run never paused at {event}:\n{seen.decode(errors='replace')[-3000:]}")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    fa, fb = folder_bytes(a), folder_bytes(b)
    assert sorted(fa) == sorted(fb)
    different = [n for n in fa if n not in TIMING_FILES and fa[n] != fb[n]]
    assert not different, f"files differ between {a} and {b}: {different}"


def assert_no_temporaries(root: Path) -> None:
    left = [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(model folder, checkpoint of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("resume")
    folder = make_tiny_folder(root)
    ref = root / "ref"
    assert main(compress_argv(folder, ref)) == 0
    assert not (root / "ref.partial").exists()
    return folder, ref


@pytest.mark.parametrize("cache", ["0", "auto"])
def test_sigkill_mid_profile_and_mid_factorize_then_resume_is_bit_identical(reference, tmp_path, capsys, cache):
    """With the whitening cache (auto) and without it (0, pass 2 recomputes): the reference was made
    with the cache, so the checkpoint is also the same bytes either way."""
    import json

    folder, ref = reference
    out, work = tmp_path / "out", tmp_path / "out.partial"
    budget = ("--cache-budget", cache)
    proc = start(folder, out, "profile:1", *budget)
    wait_paused(proc, "profile:1")
    assert stop(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    assert not out.exists()
    assert sorted(p.name for p in (work / "profiles").iterdir()) == [
        "block-00000.json", "block-00000.safetensors", "block-00001.json", "block-00001.safetensors"]
    assert not (work / "allocation.json").exists()

    proc = start(folder, out, "factorize:2", *budget)
    wait_paused(proc, "factorize:2")
    assert stop(proc, signal.SIGKILL)[0] == -signal.SIGKILL
    assert not out.exists()
    assert (work / "allocation.json").is_file()
    assert sorted(p.name for p in (work / "blocks").iterdir()) == ["block-00000.json", "block-00001.json"]

    if cache == "auto":
        assert sorted(p.name for p in (work / "cache").glob("*.json")) == [f"block-0000{i}.json" for i in range(N_BLOCKS)]
    else:
        assert not any((work / "cache").iterdir())
    assert main(compress_argv(folder, out, *budget)) == 0
    capsys.readouterr()
    assert not work.exists()
    assert_same_checkpoint(ref, out)
    # The run log keeps every attempt: the last one profiled nothing and factorized blocks 2 and 3,
    # from the cache without any forward, or after running blocks 0 and 1 forward again.
    log = json.loads((out / "runlog.json").read_text())
    assert [a["attempt"] for a in log["attempts"]] == [1, 2, 3]
    last = log["attempts"][-1]["ranks"][0]["blocks"]
    forward = [] if cache == "auto" else [("factorize", 0, "forward"), ("factorize", 1, "forward")]
    assert [(b["stage"], b["index"], b["work"]) for b in last] == [
        *forward, ("factorize", 2, "factorize"), ("factorize", 3, "factorize")]
    assert [b["source"] for b in last if b["work"] == "factorize"] == ["cache" if cache == "auto" else "recompute"] * 2
    assert all(b["peak_rss_bytes"] > 0 and b["seconds"] >= 0 for b in last)
    # Killed runs keep the entries they finished: attempt 1 profiled block 0 (block 1 was cut off),
    # attempt 2 profiled blocks 2 and 3 and allocated.
    first, second = (log["attempts"][k]["ranks"][0] for k in (0, 1))
    assert [(b["index"], b["work"]) for b in first["blocks"]] == [(0, "profile")]
    assert [(b["index"], b["work"]) for b in second["blocks"] if b["stage"] == "profile"] == [
        (0, "forward"), (1, "forward"), (2, "profile"), (3, "profile")]
    assert [s["name"] for s in second["stages"]] == ["load", "calibrate_profile", "allocate"]


def test_sigint_leaves_output_untouched_then_changed_config_is_refused(reference, tmp_path, capsys):
    folder, ref = reference
    out, work = tmp_path / "out", tmp_path / "out.partial"
    proc = start(folder, out, "factorize:1")
    wait_paused(proc, "factorize:1")
    rc, err = stop(proc, signal.SIGINT)
    assert rc == 130, err.decode()[-2000:]
    assert b"Rerun the same command to resume" in err and b"Traceback" not in err
    assert not out.exists()
    assert_no_temporaries(work)
    assert (work / "blocks" / "block-00000.json").is_file() and not (work / "blocks" / "block-00001.json").exists()

    # Another ratio (and another grid) must not be mixed with the profiles on disk.
    rc = main(compress_argv(folder, out, "--ratio", "0.4", "--kss", "1,3"))
    err = capsys.readouterr().err
    assert rc == 2 and "different configuration" in err
    assert "allocation.ratio: 0.3 -> 0.4" in err and "grid.kss" in err and "--restart" in err
    assert not out.exists()

    # A damaged file in the work folder is a clear error naming it (before any further work).
    for damaged in (work / "profiles" / "block-00002.safetensors", work / "allocation.json", work / "manifest.json"):
        good = damaged.read_bytes()
        damaged.write_bytes(good[: len(good) // 2])
        assert main(compress_argv(folder, out)) == 2
        err = capsys.readouterr().err
        assert str(damaged) in err and "Traceback" not in err, err
        damaged.write_bytes(good)

    assert main(compress_argv(folder, out)) == 0
    capsys.readouterr()
    assert_same_checkpoint(ref, out)


def test_interrupt_before_final_rename_and_restart(reference, tmp_path, capsys):
    import json

    folder, ref = reference
    out, work = tmp_path / "out", tmp_path / "out.partial"
    # Everything written but the rename: still no output folder.
    proc = start(folder, out, "assemble")
    wait_paused(proc, "assemble")
    assert stop(proc, signal.SIGINT)[0] == 130 and not out.exists()
    assert (work / "checkpoint" / "config.json").is_file()
    assert_no_temporaries(work)
    # --restart discards the unfinished run, so a new configuration is accepted.
    assert main(compress_argv(folder, out, "--ratio", "0.4", "--restart")) == 0
    capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["ratio"] == 0.4
    assert not work.exists()
    # An existing output is refused, then replaced with --overwrite by the same run as the reference.
    assert main(compress_argv(folder, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(compress_argv(folder, out, "--overwrite")) == 0
    capsys.readouterr()
    assert_same_checkpoint(ref, out)


def test_partial_cache_budget_recomputes_leading_blocks_only(reference, tmp_path, capsys):
    """A budget for two blocks caches the last two; pass 2 recomputes blocks 0 and 1 (forward and
    Grams), runs no forward past them, and writes the same checkpoint."""
    import json

    from transformers import AutoConfig

    from rocketkit.whitening_cache import block_cache_bytes

    folder, ref = reference
    cfg = AutoConfig.from_pretrained(folder)
    h, m = cfg.hidden_size, cfg.intermediate_size
    per_block = block_cache_bytes([h, h, h, h, h, h, m])  # q k v o gate up down
    out = tmp_path / "out"
    assert main(compress_argv(folder, out, "--cache-budget", str(2 * per_block))) == 0
    capsys.readouterr()
    assert_same_checkpoint(ref, out)
    rank = json.loads((out / "runlog.json").read_text())["attempts"][0]["ranks"][0]
    assert rank["cache"]["cached_blocks"] == [2, 3] and rank["cache"]["recompute_blocks"] == [0, 1]
    assert rank["cache"]["budget_bytes"] == 2 * per_block
    pass2 = [(b["index"], b["work"], b.get("source")) for b in rank["blocks"] if b["stage"] == "factorize"]
    assert pass2 == [(0, "factorize", "recompute"), (1, "factorize", "recompute"), (2, "factorize", "cache"),
                     (3, "factorize", "cache")]


def test_cache_budget_is_validated(reference, tmp_path, capsys):
    folder, _ = reference
    for bad in ("-1", "lots", "1.5G"):
        assert main(compress_argv(folder, tmp_path / "out", "--cache-budget", bad)) == 2
        assert "cache budget" in capsys.readouterr().err
