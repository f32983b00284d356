#!/usr/bin/env bash
# Set up and run the main job: the tiny CPU PRIME demo. Extra arguments go to `megatron-prime demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec "$PY" -m megatron_prime.cli demo "$@"
