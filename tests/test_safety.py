"""Source-level guarantees: no pickle is ever loaded, no remote code is trusted by default."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "python" / "rocketkit"


def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    return [(f, f.read_text()) for f in files]


def test_no_pickle_loads():
    bad = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|cloudpickle)\b"
        r"|\b(pickle|dill|joblib)\.loads?\("
        r"|torch\.load\((?![^)]*weights_only\s*=\s*True)"
        r"|allow_pickle\s*=\s*True"
    )
    hits = [f"{f.relative_to(SRC)}:{i + 1}: {line.strip()}"
            for f, text in _sources() for i, line in enumerate(text.splitlines()) if bad.search(line)]
    assert not hits, "pickle-capable loads found:\n" + "\n".join(hits)


def test_no_trust_remote_code_by_default():
    hits = [f"{f.relative_to(SRC)}:{i + 1}: {line.strip()}"
            for f, text in _sources() for i, line in enumerate(text.splitlines())
            if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert not hits, "trust_remote_code=True hard-coded:\n" + "\n".join(hits)
