"""Run untrusted generated programs against test cases inside a bubblewrap sandbox.

What the graded program gets (see ``_bwrap_argv``):
  * new user, pid, network, ipc, uts and cgroup namespaces (``--unshare-all``): no network at
    all (not even the host's 127.0.0.1), no view of host processes, no nested user namespaces;
  * a read-only view of /usr (and the /bin, /lib symlinks) plus /etc/ld.so.cache, nothing else of
    the host: no home, no project, no checkpoints; ``/`` and ``/dev`` are remounted read-only and
    the only writable place is a size-capped tmpfs at /tmp;
  * a cleared environment (``--clearenv``), so none of our environment variables;
  * limits: address space, processes, file size and open files via setrlimit, CPU seconds and
    wall time per test case, a total wall budget per program, and at most N bytes of output read;
  * ``--die-with-parent`` and its own pid namespace: killing the outer bwrap (which we do on a
    wall timeout, by process group) kills every process in the sandbox, including ones that
    called ``setsid`` to escape their process group.
When we run as root, each sandbox runs under its own otherwise unused uid, so the process limit
is counted for that sandbox alone (RLIMIT_NPROC is per uid and never applies to root).

If bubblewrap is missing or cannot start, ``SandboxUnavailableError`` is raised. There is no
silent fallback: running generated code without the sandbox needs the explicit, documented unsafe
flag, ``MEGATRON_PRIME_UNSAFE_CODE_EXEC=1`` or ``unsafe=True``; it still applies the resource
limits but gives no isolation at all (the code can read and write your files and the network).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

UNSAFE_ENV = "MEGATRON_PRIME_UNSAFE_CODE_EXEC"
SANDBOX_PYTHON_ENV = "MEGATRON_PRIME_SANDBOX_PYTHON"
INSTALL_HINT = "install bubblewrap: apt-get install bubblewrap"

_HERE = Path(__file__).resolve().parent
_HARNESS = (_HERE / "_harness.py").read_bytes()
_CALL_RUNNER = (_HERE / "_call_runner.py").read_bytes()

# Paths inside the sandbox.
_SOLUTION = "/sandbox/solution.py"
_HARNESS_PATH = "/sandbox/harness.py"
_CALL_RUNNER_PATH = "/sandbox/call_runner.py"


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is not installed or cannot create a sandbox on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock (and, rounded up, CPU seconds) per test case
    total_timeout_s: float = 60.0  # wall clock for all test cases of one program
    memory_bytes: int = 1 << 30  # RLIMIT_AS of every process in the sandbox
    max_processes: int = 16  # RLIMIT_NPROC: sandbox init + harness + case + a few spare
    max_output_bytes: int = 1 << 20  # stdout kept per test case; more fails the case
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE and the size of the /tmp tmpfs
    max_open_files: int = 256


@dataclass
class CaseResult:
    status: str  # ok | error | timeout | output_limit | skipped | no_result
    stdout: str
    returncode: int | None


def unsafe_requested(unsafe: bool | None = None) -> bool:
    if unsafe is not None:
        return unsafe
    return os.environ.get(UNSAFE_ENV, "") == "1"


def sandbox_python() -> str:
    """The interpreter used inside the sandbox: the system one, so nothing from our environment
    (virtualenv, site-packages under a home directory) needs to be visible."""
    override = os.environ.get(SANDBOX_PYTHON_ENV)
    if override:
        return override
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return candidate
    return sys.executable


# ---------------------------------------------------------------------------------------------
# uids: one per concurrent sandbox when we are root, so RLIMIT_NPROC means something.

_UID_BASE = 1_000_000_000
_SLOTS_PER_PROCESS = 64
_uid_slots: queue.Queue[int] | None = None
_uid_lock = threading.Lock()


def _acquire_uid() -> int | None:
    global _uid_slots
    if os.geteuid() != 0:
        return None
    with _uid_lock:
        if _uid_slots is None:
            # Spread processes (several trainer ranks on a node) over disjoint uid ranges.
            base = _UID_BASE + (os.getpid() % 1_000_000) * _SLOTS_PER_PROCESS
            _uid_slots = queue.Queue()
            for k in range(_SLOTS_PER_PROCESS):
                _uid_slots.put(base + k)
    return _uid_slots.get()


def _release_uid(uid: int | None) -> None:
    if uid is not None and _uid_slots is not None:
        _uid_slots.put(uid)


def _processes_of_current_user() -> int:
    uid = str(os.getuid())
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            count += line.split()[1] == uid
                            break
            except OSError:
                pass
    return count


def _prlimit_argv(limits: SandboxLimits, uid: int | None, cpu_s: int) -> list[str]:
    """Resource limits via util-linux ``prlimit`` rather than a preexec_fn, which is unsafe in
    the threaded programs that grade code (a thread pool)."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        raise SandboxUnavailableError("prlimit (util-linux) not found on PATH")
    # Without a dedicated uid the process limit counts all of the user's processes.
    nproc = limits.max_processes + (0 if uid is not None else _processes_of_current_user())
    return [
        prlimit,
        f"--as={limits.memory_bytes}",
        f"--fsize={limits.max_file_bytes}",
        f"--nofile={limits.max_open_files}",
        "--core=0",
        f"--cpu={cpu_s}",
        f"--nproc={nproc}",
        "--",
    ]


# ---------------------------------------------------------------------------------------------
# Launching.


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _bwrap_argv(python: str, limits: SandboxLimits, data_fds: dict[str, int]) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(f"bubblewrap (bwrap) not found on PATH; {INSTALL_HINT}")
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",  # explicit, so --disable-userns is allowed
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / top
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    real_python = os.path.realpath(python)
    if not real_python.startswith("/usr/"):
        # An interpreter outside /usr (pyenv, conda): expose only its own installation.
        prefix = str(Path(real_python).parent.parent)
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(limits.max_file_bytes), "--tmpfs", "/tmp"]
    for dest, fd in data_fds.items():
        argv += ["--ro-bind-data", str(fd), dest]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--"]
    return argv


@dataclass
class _Raw:
    stdout: bytes
    stderr: bytes
    returncode: int
    timed_out: bool


def _communicate(proc: subprocess.Popen, deadline: float, max_stdout: int) -> tuple[bytes, bytes, bool]:
    """Read stdout (at most max_stdout bytes) and the tail of stderr until EOF or the deadline."""
    out, err = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    timed_out = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            key.data.extend(chunk)
            if key.data is err:
                del err[:-8192]
            elif len(out) > max_stdout:
                timed_out = True  # treated like a timeout: the run is killed, no result
                sel.close()
                return bytes(out[:max_stdout]), bytes(err), timed_out
    sel.close()
    return bytes(out), bytes(err), timed_out


def _launch(job: dict, solution: bytes, limits: SandboxLimits, unsafe: bool) -> _Raw:
    python = sandbox_python()
    total = limits.total_timeout_s
    # The harness stops starting cases once its budget is spent; we kill it a little later.
    job = dict(job, python=python, budget_s=total)
    max_stdout = len(job["inputs"]) * (limits.max_output_bytes * 2 + 256) + 65536
    uid = None
    fds: list[int] = []
    workdir = None
    try:
        if unsafe:
            workdir = tempfile.mkdtemp(prefix="mp_unsafe_")
            files = {"solution": solution, "harness": _HARNESS, "call_runner": _CALL_RUNNER}
            paths = {name: os.path.join(workdir, name + ".py") for name in files}
            for name, content in files.items():
                Path(paths[name]).write_bytes(content)
            job.update(solution=paths["solution"], call_runner=paths["call_runner"])
            argv = [python, "-I", paths["harness"]]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
        else:
            data = {_SOLUTION: solution, _HARNESS_PATH: _HARNESS, _CALL_RUNNER_PATH: _CALL_RUNNER}
            data_fds = {dest: _memfd(Path(dest).name, content) for dest, content in data.items()}
            fds += data_fds.values()
            argv = _bwrap_argv(python, limits, data_fds) + [python, "-I", _HARNESS_PATH]
            env = {}
            uid = _acquire_uid()
        argv = _prlimit_argv(limits, uid, cpu_s=int(total) + 2) + argv
        stdin_fd = _memfd("job", json.dumps(job).encode("utf-8"))
        fds.append(stdin_fd)
        proc = subprocess.Popen(
            argv,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=[fd for fd in fds if fd != stdin_fd],
            env=env,
            cwd=workdir or "/",
            start_new_session=True,  # our kill reaches bwrap and anything it left in the group
            **({} if uid is None else {"user": uid, "group": uid, "extra_groups": []}),
        )
        for fd in fds:
            os.close(fd)
        fds = []
        try:
            stdout, stderr, timed_out = _communicate(proc, time.monotonic() + total + 2.0, max_stdout)
        finally:
            _kill_group(proc)
        return _Raw(stdout, stderr, proc.returncode, timed_out)
    finally:
        for fd in fds:
            os.close(fd)
        _release_uid(uid)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    # Killing bwrap's process group ends bwrap; --die-with-parent and the pid namespace then take
    # every sandboxed process with it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


# ---------------------------------------------------------------------------------------------
# Public entry points.

_checked = False
_check_lock = threading.Lock()


def check_sandbox() -> None:
    """Start one trivial sandbox; raise SandboxUnavailableError (with bwrap's message) if that
    fails. Cached after the first success."""
    global _checked
    with _check_lock:
        if _checked:
            return
        results = _run(
            "print(6 * 7)", "stdio", [""], None, SandboxLimits(timeout_s=10, total_timeout_s=20), False
        )
        if results is None or results[0].stdout.strip() != "42":
            raise SandboxUnavailableError(f"the bubblewrap sandbox could not run Python: {results}")
        _checked = True


def _run(source, mode, inputs, fn_name, limits, unsafe) -> list[CaseResult] | None:
    token = secrets.token_hex(16)
    job = {
        "token": token,
        "mode": mode,
        "fn_name": fn_name,
        "inputs": inputs,
        "timeout_s": limits.timeout_s,
        "max_output_bytes": limits.max_output_bytes,
        "solution": _SOLUTION,
        "call_runner": _CALL_RUNNER_PATH,
    }
    raw = _launch(job, source.encode("utf-8"), limits, unsafe)
    for line in reversed(raw.stdout.decode("utf-8", errors="replace").splitlines()):
        if line.startswith(token):
            return [CaseResult(**r) for r in json.loads(line[len(token) :])["results"]]
    message = raw.stderr.decode("utf-8", errors="replace").strip()
    if message.startswith("bwrap:"):
        # bwrap failed before running anything: a broken sandbox must not look like wrong code.
        raise SandboxUnavailableError(f"bubblewrap failed to start: {message}; {INSTALL_HINT}")
    return None


def run_tests(
    source: str,
    inputs: list,
    *,
    mode: str = "stdio",
    fn_name: str | None = None,
    limits: SandboxLimits = SandboxLimits(),
    unsafe: bool | None = None,
) -> list[CaseResult]:
    """Run ``source`` once per test input inside the sandbox.

    mode "stdio": each input is a string fed to the program's stdin; ``stdout`` is what it printed.
    mode "call": each input is a JSON list of arguments for ``fn_name`` (a function, or a method
    of ``class Solution``); ``stdout`` is the runner's JSON line {"ok", "result"}.
    If the whole run produced no result (the harness was killed, e.g. by the program killing its
    parent or by the total time limit), every case has status "no_result".
    """
    if mode not in ("stdio", "call"):
        raise ValueError(f"mode must be 'stdio' or 'call', got {mode!r}")
    if mode == "call" and not fn_name:
        raise ValueError("mode 'call' needs fn_name")
    unsafe = unsafe_requested(unsafe)
    if unsafe:
        _warn_unsafe()
    else:
        check_sandbox()
    if not inputs:
        return []
    results = _run(source, mode, list(inputs), fn_name, limits, unsafe)
    if results is None:
        return [CaseResult("no_result", "", None) for _ in inputs]
    return results


_warned = False


def _warn_unsafe() -> None:
    global _warned
    if not _warned:
        logger.warning(
            "%s=1: generated code runs WITHOUT the sandbox (resource limits only); "
            "it can read and write your files and use the network", UNSAFE_ENV
        )
        _warned = True
