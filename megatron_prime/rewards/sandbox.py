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
  * its own pid namespace: on a wall timeout we SIGKILL the sandbox's pid 1 (found through
    bwrap's --info-fd), and the kernel then kills every process in the namespace, including
    ones that called ``setsid`` to leave their process group; ``--die-with-parent`` does the
    same if we die.
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
USERNS_HINT = (
    "bubblewrap needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on "
    "Ubuntu >= 23.10 kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for "
    f"bwrap); if it is missing, {INSTALL_HINT}"
)

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
_uid_slots_pid = 0
_uid_lock = threading.Lock()


def _acquire_uid() -> int | None:
    global _uid_slots, _uid_slots_pid
    if os.geteuid() != 0:
        return None
    with _uid_lock:
        if _uid_slots is None or _uid_slots_pid != os.getpid():  # a forked child gets its own
            _uid_slots_pid = os.getpid()
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


_options_cache: dict[str, frozenset[str]] = {}


def _bwrap_options(bwrap: str) -> frozenset[str]:
    """Options this bwrap knows: --disable-userns needs 0.8 and --size 0.7 (Ubuntu 22.04 ships
    0.6); without them the sandbox is slightly weaker, not absent."""
    if bwrap not in _options_cache:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True).stdout
        _options_cache[bwrap] = frozenset(w for w in text.split() if w.startswith("--"))
    return _options_cache[bwrap]


def _bwrap_argv(python: str, limits: SandboxLimits, data_fds: dict[str, int], info_fd: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(f"bubblewrap (bwrap) not found on PATH; {INSTALL_HINT}")
    options = _bwrap_options(bwrap)
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",  # explicit: --unshare-all only tries, and --disable-userns needs it
        *(["--disable-userns"] if "--disable-userns" in options else []),
        "--die-with-parent",
        "--new-session",
        "--info-fd", str(info_fd),
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
    if "--size" in options:
        argv += ["--size", str(limits.max_file_bytes)]
    argv += ["--tmpfs", "/tmp"]
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
    fds: list[int] = []  # to close in the parent once the child has them
    info_r = None
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
            # bwrap reports the host pid of the sandbox's init on this pipe (see _stop).
            info_r, info_w = os.pipe()
            fds.append(info_w)
            argv = _bwrap_argv(python, limits, data_fds, info_w) + [python, "-I", _HARNESS_PATH]
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
        deadline = time.monotonic() + total + 2.0
        init_pidfd = _sandbox_init_pidfd(info_r, deadline) if info_r is not None else None
        timed_out = True  # until _communicate says otherwise
        try:
            stdout, stderr, timed_out = _communicate(proc, deadline, max_stdout)
        finally:
            _stop(proc, init_pidfd, kill_now=timed_out)
        return _Raw(stdout, stderr, proc.returncode, timed_out)
    finally:
        for fd in fds:
            os.close(fd)
        if info_r is not None:
            os.close(info_r)
        _release_uid(uid)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _sandbox_init_pidfd(info_r: int, deadline: float) -> int | None:
    """A pidfd for the sandbox's pid-1 from bwrap's --info-fd JSON (bwrap closes the pipe right
    after writing it); None if bwrap failed before creating the sandbox."""
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(info_r, selectors.EVENT_READ)
        while time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            data += chunk
    try:
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):
        return None


def _stop(proc: subprocess.Popen, init_pidfd: int | None, kill_now: bool) -> None:
    """End the run and reap it. Killing the sandbox's pid-1 makes the kernel kill every process
    in its pid namespace (setsid or not); bwrap then sees it die and exits."""
    try:
        if init_pidfd is not None:
            try:
                # After a clean finish bwrap exits by itself within moments.
                proc.wait(timeout=0 if kill_now else 0.5)
            except subprocess.TimeoutExpired:
                signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            # Unsafe mode, or bwrap stuck: kill its whole process group.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        proc.wait()
    finally:
        if init_pidfd is not None:
            os.close(init_pidfd)
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
        limits = SandboxLimits(timeout_s=10, total_timeout_s=20)
        results, stderr = _run("print(6 * 7)", "stdio", [""], None, limits, False)
        if results is None or results[0].stdout.strip() != "42":
            raise SandboxUnavailableError(
                f"the bubblewrap sandbox could not run {sandbox_python()}: {results}, stderr: {stderr!r}"
            )
        _checked = True


def _run(source, mode, inputs, fn_name, limits, unsafe) -> tuple[list[CaseResult] | None, str]:
    """(results, stderr tail); results is None when the harness reported nothing."""
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
    message = raw.stderr.decode("utf-8", errors="replace").strip()
    for line in reversed(raw.stdout.decode("utf-8", errors="replace").splitlines()):
        if line.startswith(token):
            return [CaseResult(**r) for r in json.loads(line[len(token) :])["results"]], message
    if message.startswith("bwrap:"):
        # bwrap failed before running anything: a broken sandbox must not look like wrong code.
        raise SandboxUnavailableError(f"bubblewrap failed to start: {message}; {USERNS_HINT}")
    return None, message


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
    mode "check": each input is HumanEval-style test code defining ``check(candidate)``, called
    with ``fn_name``; the runner's line has "ok": true when no assertion failed.
    If the whole run produced no result (the harness was killed, e.g. by the program killing its
    parent or by the total time limit), every case has status "no_result".
    """
    if mode not in ("stdio", "call", "check"):
        raise ValueError(f"mode must be 'stdio', 'call' or 'check', got {mode!r}")
    if mode != "stdio" and not fn_name:
        raise ValueError(f"mode {mode!r} needs fn_name")
    unsafe = unsafe_requested(unsafe)
    if unsafe:
        _warn_unsafe()
    else:
        check_sandbox()
    if not inputs:
        return []
    results, _ = _run(source, mode, list(inputs), fn_name, limits, unsafe)
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
