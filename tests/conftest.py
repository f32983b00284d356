"""Markers (``pytest -m "not slow"`` is the fast inner loop) and where they apply.

* ``multi_rank``: starts real torch.distributed process groups (2 gloo ranks, or torchrun);
* ``slow``: a whole training run, a real engine (vLLM, a browser) or many process starts; every
  test under ``tests/e2e/`` is slow;
* ``gpu``: needs CUDA (skips with its reason on a CPU machine).
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "multi_rank: starts real torch.distributed process groups")
    config.addinivalue_line("markers", "slow: a training run, a real engine or many process starts (tests/e2e/ all)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skips with its reason without one")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)
