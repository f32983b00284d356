#!/usr/bin/env bash
# Install everything megatron-prime needs on a fresh machine (idempotent, quiet when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v bwrap >/dev/null 2>&1; then  # sandbox for model-generated code
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null
    else
        echo "warning: bubblewrap (bwrap) is not installed; code grading will refuse to run" >&2
    fi
fi
# CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
if ! $PYTHON -c "import torch" >/dev/null 2>&1; then
    $PYTHON -m pip install -q "torch==2.13.0"
fi
$PYTHON -m pip install -q -e ".[test]"
