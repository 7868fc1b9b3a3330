#!/usr/bin/env bash
# Create (or reuse) the project venv and install r1v3 into it.
#   bash .ci/setup.sh          # runtime only
#   bash .ci/setup.sh dev      # + test tools
# Without a CUDA GPU the CPU build of torch goes in first, so that pip never pulls the multi-GB
# CUDA wheel to satisfy the unpinned `torch` requirement. Wheels are cached by pip in
# ~/.cache/pip (outside the clone), so a re-install takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${R1V3_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${R1V3_TORCH_VERSION:-2.13.0}
extras=${1:-}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# This machine's pip config lists local index folders that may be absent: drop that noise.
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    pip install -q "torch==$TORCH_VERSION"
  else
    echo "[setup] no CUDA GPU: installing the CPU build of torch==$TORCH_VERSION"
    pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "[setup] installing r1v3 ($spec) into $VENV"
pip install -q -e "$spec"
"$VENV/bin/python" -c "import r1v3, torch; print('[setup] ok: torch', torch.__version__)"
