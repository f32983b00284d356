"""The package runs where it is installed, without the checkout: a wheel built from the repository,
installed into a fresh virtual environment, run from another directory. ``plan`` finds the model
shapes and example configs shipped in the package, and ``demo --help`` its default config.

The fresh environment reaches the (large) dependencies through a path entry to the running
interpreter's site-packages: a plain path line, so the ``.pth`` files there (among them the
checkout's editable install) are not processed and ``megatron_prime`` comes from the wheel alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

from tests.helpers import ROOT


def _run(cmd: list[str], cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_in_a_fresh_venv_plans_and_runs_the_demo_help(tmp_path):
    dist, venv, elsewhere, source = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere", tmp_path / "src"
    elsewhere.mkdir()
    # a copy of what a source distribution holds, so the build's scratch files stay out of the checkout
    shutil.copytree(os.path.join(ROOT, "megatron_prime"), source / "megatron_prime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(dist)], cwd=str(tmp_path))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("megatron_prime-*.whl")
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(tmp_path)).returncode == 0
    python = str(venv / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=str(tmp_path))
    venv_site = site.stdout.strip()
    with open(os.path.join(venv_site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # pip of the running interpreter installs into the fresh environment (--target its site-packages)
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                      venv_site, str(wheel)], cwd=str(tmp_path))
    assert installed.returncode == 0, installed.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([python, "-c", "import megatron_prime; print(megatron_prime.__file__)"], cwd=str(elsewhere), env=env)
    assert where.stdout.strip().startswith(venv_site), where.stdout + where.stderr
    entry = [python, "-m", "megatron_prime.cli"]
    plan = _run([*entry, "plan", "examples/configs/prime_7b.yaml", "--gpus", "8"], cwd=str(elsewhere), env=env)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert "shape from" in plan.stdout and os.path.join(venv_site, "megatron_prime", "examples", "models") in plan.stdout
    assert "FITS" in plan.stdout
    demo = _run([*entry, "demo", "--help"], cwd=str(elsewhere), env=env)
    assert demo.returncode == 0 and "--task" in demo.stdout, demo.stderr[-3000:]
    shipped = _run([python, "-c", "from megatron_prime.training.demo import DEFAULT_CONFIG; import os; "
                    "print(os.path.exists(DEFAULT_CONFIG), DEFAULT_CONFIG)"], cwd=str(elsewhere), env=env)
    assert shipped.stdout.startswith("True " + venv_site), shipped.stdout + shipped.stderr
