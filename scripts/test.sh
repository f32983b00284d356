#!/usr/bin/env bash
# Set up and run the whole test suite. Extra arguments go to pytest.
# Two pytest-xdist workers by default (MEGATRON_PRIME_TEST_WORKERS=N for N, 0 for none): most tests
# spend their time in one single-threaded process (start-up, imports, one rank), so a second worker
# uses the second core. Each test file runs whole on one worker (its module fixtures are built once);
# more workers than cores would slow the two-rank tests down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
set +e
workers=${MEGATRON_PRIME_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadfile); fi
"$PY" -m pytest tests -q --durations=25 "${parallel[@]}" "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $code
