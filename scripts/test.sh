#!/usr/bin/env bash
# Set up and run the test suite. Arguments go to pytest; when the first one is a path (or a
# pytest node id), only those run instead of the whole tests/ folder:
#   bash scripts/test.sh                                       the whole suite (what CI runs)
#   bash scripts/test.sh -m "not slow"                         the fast inner loop
#   bash scripts/test.sh tests/algorithm/test_advantages.py    one file
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
targets=(tests)
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then targets=(); fi
"$PY" -m pytest "${targets[@]}" -q --durations=25 "${parallel[@]}" "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $code
