"""Every kind of file rocketkit writes, truncated in turn, gets a clear error naming that file from
the reader that consumes it (never a crash, never a silently partial model)."""

from __future__ import annotations

import shutil

import pytest

from conftest import make_tiny_ids, make_tiny_model
from rocketkit import load_pretrained
from rocketkit.allocate import Allocation
from rocketkit.fileio import read_json
from rocketkit.models import LoadedModel
from rocketkit.pipeline import compress
from rocketkit.profile import Profile


def _readers(folder):
    """file name pattern → the call that reads it."""
    return {
        "config.json": lambda: load_pretrained(folder),
        "generation_config.json": lambda: load_pretrained(folder),
        "model.safetensors.index.json": lambda: load_pretrained(folder),
        "model-": lambda: load_pretrained(folder),
        "profile.": lambda: Profile.load(folder / "profile"),
        "allocation.json": lambda: Allocation.load(folder / "allocation.json"),
        "summary.json": lambda: read_json(folder / "summary.json"),
        "runlog.json": lambda: read_json(folder / "runlog.json"),
    }


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    out = tmp_path_factory.mktemp("trunc") / "o"
    compress(LoadedModel(make_tiny_model("llama"), None, "tiny"), 0.3, out_dir=out, calib_ids=make_tiny_ids(3, 13),
             progress=False, buckets=2000, crs=(0.2, 0.5), kss=(1.0, 2.0))
    return out


def test_every_output_file_truncated_in_turn(output, tmp_path):
    files = sorted(p.name for p in output.iterdir())
    assert len(files) >= 9
    for name in files:
        if name == "README.md":  # the model card: for people and the Hub; no reader consumes it
            continue
        reader_key = next((k for k in _readers(output) if name.startswith(k)), None)
        assert reader_key is not None, f"no reader covers {name}: add it to this test"
        data = (output / name).read_bytes()
        for cut in (len(data) // 2, 1, 0):
            folder = tmp_path / f"{name}-{cut}"
            shutil.copytree(output, folder)
            (folder / name).write_bytes(data[:cut])
            with pytest.raises(ValueError, match=name.replace(".", r"\.")):
                _readers(folder)[reader_key]()
    load_pretrained(output)  # the untouched original still loads
