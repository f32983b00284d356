# Sourced by setup.sh, demo.sh and test.sh: which Python megatron-prime installs into and runs with.
#   PYTHON=/path/to/python   your own interpreter (e.g. a conda env); used as it is
#   an active virtual environment ($VIRTUAL_ENV)   its python
#   otherwise                the project's own .venv (created by setup.sh), so a system Python
#                            that refuses `pip install` (PEP 668, "externally-managed-environment")
#                            is never touched
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PY=$VIRTUAL_ENV/bin/python
else
    PY=$PWD/.venv/bin/python
fi
