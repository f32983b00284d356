#!/usr/bin/env bash
# Set up and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
set +e
"$PY" -m pytest tests -q --durations=25 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $code
