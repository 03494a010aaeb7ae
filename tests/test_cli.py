"""The rocketkit command line: compress on a tiny model folder, info, clean errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rocketkit.cli import main


@pytest.fixture
def tiny_folder(tmp_path, smollm2):
    """A tiny seeded Llama saved as a HF folder with SmolLM2's real tokenizer (vocab 49152)."""
    from conftest import make_tiny_model

    model = make_tiny_model("llama", vocab_size=len(smollm2.tokenizer))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


def test_compress_and_info(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_folder), "--ratio", "0.3", "--cost", "blend", "--alpha", "0.3",
               "--calib-tokens", "96", "--seq-len", "32", "--eval-tokens", "64", "--grid", "reduced",
               "--out", str(out), "--no-progress", "--buckets", "5000"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ratio target / achieved" in text and "perplexity before / after" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["achieved_ratio"] >= 0.3 and summary["cost"] == "blend" and summary["alpha"] == 0.3
    assert summary["grid"]["kss"] == [1.0, 1.5, 2.0, 2.5, 3.0]
    # The stage table: printed at the end and kept in runlog.json, one row per stage plus the total.
    stages = ["load", "calibrate_profile", "allocate", "factorize", "eval_before", "eval_after", "save", "other", "total"]
    assert "stages (this attempt):" in text and all(f"\n  {name} " in text for name in stages)
    table = json.loads((out / "runlog.json").read_text())["stage_table"]
    assert [r["stage"] for r in table] == stages
    assert abs(sum(r["seconds"] for r in table[:-1]) - table[-1]["seconds"]) < 1e-6 and table[-1]["share"] == 1.0
    assert all(r["peak_rss_bytes"] > 0 for r in table if r["stage"] != "other")
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bytes C indices" in text and "params total" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"]["C_indices"] == summary["bytes"]["C_indices"]
    # Existing output folder: clean error, exit code 2.
    rc = main(["compress", str(tiny_folder), "--ratio", "0.3", "--calib-tokens", "32", "--seq-len", "32",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["rocket", "svdllm"])
def test_compress_baseline_methods(method, tiny_folder, tmp_path, capsys):
    """The baselines go through compress unchanged: recorded in summary.json and allocation.json,
    applied exactly as profiled."""
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_folder), "--ratio", "0.3", "--method", method, "--calib-tokens", "96",
               "--seq-len", "32", "--grid", "reduced", "--out", str(out), "--no-progress", "--buckets", "5000"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"{method} allocation" in text
    summary = json.loads((out / "summary.json").read_text())
    allocation = json.loads((out / "allocation.json").read_text())
    assert summary["method"] == allocation["method"] == method and summary["achieved_ratio"] >= 0.3
    assert summary["max_profiled_vs_applied_error"] < 1e-6
    layers = allocation["layers"]
    if method == "rocket":
        assert not any(d["dense"] for d in layers) and (allocation["power"], allocation["weighting"]) == (1, None)
    else:
        assert all(d["ks"] == 1.0 and d["s"] == d["k"] for d in layers)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compress", "MODEL", "--ratio", "1.2", "--out", "OUT"], "ratio must be in (0, 1)"),
        (["compress", "MODEL", "--ratio", "0", "--out", "OUT"], "ratio must be in (0, 1)"),
        (["compress", "MODEL", "--ratio", "0.2", "--cost", "blend", "--out", "OUT"], "alpha"),
        (["compress", "/nonexistent/model", "--ratio", "0.2", "--out", "OUT"], "not a local model folder"),
        (["compress", "MODEL", "--ratio", "0.2", "--threads", "-1", "--out", "OUT"], "num_threads must be"),
        (["compress", "MODEL", "--ratio", "0.2", "--work-dir", "OUT", "--out", "OUT"], "work_dir must differ"),
        (["compress", "MODEL", "--ratio", "0.2", "--work-dir", "MODEL", "--out", "OUT"], "not a rocketkit work folder"),
        (["info", "/nonexistent/ckpt"], "file not found"),
    ],
)
def test_bad_input_exit_code_2(argv, message, tiny_folder, tmp_path, capsys):
    argv = [str(tiny_folder) if a == "MODEL" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unsupported_model_exit_code_2(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    assert main(["compress", str(tmp_path / "gpt2"), "--ratio", "0.2", "--out", str(tmp_path / "o")]) == 2
    assert "not handled: attn.c_attn.weight (2-D parameter of Conv1D" in capsys.readouterr().err


def test_python_dash_m_and_argparse_errors():
    r = subprocess.run([sys.executable, "-m", "rocketkit", "compress", "x", "--ratio", "0.2", "--cost", "nope", "--out", "o"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "rocketkit", "info", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 2 and "rocketkit info: error" in r.stderr and "Traceback" not in r.stderr
