#!/usr/bin/env bash
# Benchmark-only venv with TRL for bench/compare_trl.py. TRL brings accelerate, datasets and pandas,
# which the package never needs, so it gets its own venv layered on the dev venv: a .pth file adds
# the dev venv's site-packages (and with them r1v3's editable install), and pip adds only TRL.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEV=${R1V3_VENV:-$REPO/.venv}
BENCH=${R1V3_BENCH_VENV:-$HOME/.cache/r1v3/venv-bench}
[ -x "$DEV/bin/python" ] || bash "$REPO/.ci/setup.sh" dev
SITE=$("$DEV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -x "$BENCH/bin/python" ] || "$DEV/bin/python" -m venv "$BENCH"
BENCH_SITE=$("$BENCH/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$SITE')" > "$BENCH_SITE/r1v3-dev-venv.pth"
"$BENCH/bin/python" -m pip install -q 'trl==1.16.0' 2>&1 | grep -v "WARNING: Location" || true
"$BENCH/bin/python" -c 'import trl, r1v3; print(f"[setup_bench] ok: trl {trl.__version__} in '"$BENCH"'")'
