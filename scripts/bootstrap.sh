#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install mplus_fast into it, editable.
# - A CUDA torch already installed on the machine (GPU boxes) is kept: the venv sees system
#   site-packages, and torch is only installed when none is importable.
# - Otherwise torch==2.13.0 is installed (a CPU build where the machine provides one).
# - The package is built without build isolation, so no second torch is ever pulled in.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
V="$VENV/bin/python"
if ! "$V" -c "import torch" >/dev/null 2>&1; then
  "$V" -m pip install -q "torch==${MPLUS_FAST_TORCH_VERSION:-2.13.0}"
fi
"$V" -m pip install -q "setuptools>=64" wheel ninja
"$V" -m pip install -q --no-build-isolation -e ".[test,plot]"
# Triton runs under its CPU interpreter in tests (TRITON_INTERPRET=1); CUDA torch ships its own.
if ! "$V" -c "import triton" >/dev/null 2>&1; then
  "$V" -m pip install -q triton || echo "bootstrap: triton unavailable; Triton tests will be skipped" >&2
fi
touch "$VENV/.mplus-installed"
