#!/usr/bin/env bash
# Compatibility run against a newer megatron-core (what NGC containers carry: Python 3.12,
# megatron-core 0.17-0.19). Not part of CI: it downloads a CUDA build of torch (several GB; it
# runs on CPU too). Builds its own environment outside git (.venv-compat/, ignored) and runs the
# model/bridge, trainer-parallel, resume and planner tests there.
#   bash scripts/test_compat.sh                 # megatron-core 0.19.2 on Python 3.12
#   MCORE=0.17.0 bash scripts/test_compat.sh    # another release; extra arguments go to pytest
# PYTHON312=/path/to/python3.12 picks the interpreter (default: pyenv's 3.12.1, else python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE=${MCORE:-0.19.2}
VENV=${COMPAT_VENV:-.venv-compat}
if [ -z "${PYTHON312:-}" ]; then
    PYTHON312=$(command -v pyenv >/dev/null && echo "$(pyenv root)/versions/3.12.1/bin/python" || true)
    [ -x "$PYTHON312" ] || PYTHON312=$(command -v python3.12 || true)
fi
[ -x "$PYTHON312" ] || { echo "error: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON312" -m venv "$VENV"
PY=$VENV/bin/python
start=$(date +%s)
"$PY" -m pip install -q "megatron-core==$MCORE" -e ".[test]"
echo "environment: $("$PY" -c 'import sys, torch, megatron.core as m; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")') ($(( $(date +%s) - start )) s to install)"
"$PY" -m pytest -q -p no:cacheprovider \
    tests/bridge/test_convert.py tests/training/test_prime_step_parallel.py tests/e2e/test_resume.py tests/planner/test_plan.py "$@"
