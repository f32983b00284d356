"""Hostile programs against the code sandbox.

Every case is graded like a model response whose test expects exactly what a *successful* attack
would print, so a score of 0 means the attack failed; each case also checks the host directly
(planted files unchanged, nothing written, a bystander process alive, no sandboxed process left
behind, nobody connected to our server) and that grading returned within its time bound.
"""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from megatron_prime.rewards import SandboxUnavailableError, grade_code, run_tests, sandbox

TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + 6.0  # one test case: its limit plus sandbox start-up and teardown (on a busy machine)


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def _live_processes():
    """(pid, uid, comm) of every process that is still running. Zombies are skipped: they run
    nothing, and bwrap's pid-1 is reaped by the host's init, not by us (bubblewrap behaviour)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            uid = os.stat(f"/proc/{entry.name}").st_uid
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        if state not in "ZX":
            yield int(entry.name), uid, comm


def processes_named(marker: str) -> list[int]:
    return [pid for pid, _, comm in _live_processes() if comm == marker]


def sandbox_uid_processes() -> list[int]:
    """Processes still running under one of the sandbox's dedicated uids (root mode)."""
    return [pid for pid, uid, _ in _live_processes() if uid >= sandbox._UID_BASE]


def set_name(marker: str) -> str:
    """Python source that renames the current process (inherited by its children)."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"


@pytest.fixture
def host(tmp_path):
    """A host with a planted secret, a bystander process and a fresh marker; checked afterwards."""
    secret = tmp_path / "secret.txt"
    secret.write_text(uuid.uuid4().hex)
    before = secret.read_text(), secret.stat().st_mtime_ns
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    state = {"secret": secret, "dir": tmp_path, "marker": "mp" + uuid.uuid4().hex[:12]}
    try:
        yield state
        # Untouched: the same single file with the same content, the bystander alive, and no
        # process from the sandbox still running.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
        assert (secret.read_text(), secret.stat().st_mtime_ns) == before
        assert bystander.poll() is None, "a process outside the sandbox was killed"
        deadline = time.monotonic() + 2.0
        while (processes_named(state["marker"]) or sandbox_uid_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_named(state["marker"]) == []
        assert sandbox_uid_processes() == []
    finally:
        bystander.kill()
        bystander.wait()


def grade_timed(code: str, expected_output: str, timeout_s: float = TIMEOUT_S) -> tuple[float, float]:
    start = time.monotonic()
    score = grade_code(fenced(code), {"inputs": [""], "outputs": [expected_output]}, timeout_s=timeout_s)
    return score, time.monotonic() - start


def test_infinite_loop(host):
    score, elapsed = grade_timed("while True:\n    pass", "done\n")
    assert score == 0.0 and elapsed < BOUND_S


def test_fork_bomb(host):
    code = set_name(host["marker"]) + (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    score, elapsed = grade_timed(code, "done\n")
    assert score == 0.0 and elapsed < BOUND_S


def test_memory_hog(host):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    score, elapsed = grade_timed(code + "print('allocated')", "allocated\n")
    assert score == 0.0 and elapsed < BOUND_S
    score, elapsed = grade_timed("x = bytearray(64 * 1024 ** 3)\nprint('allocated')", "allocated\n")
    assert score == 0.0 and elapsed < BOUND_S


def test_gigabytes_of_output(host):
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = "import sys\nblock = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.stdout.write(block)\n"
    score, elapsed = grade_timed(code, "x\n")
    assert score == 0.0 and elapsed < BOUND_S
    # Writing to stderr instead must not fill anything either.
    score, elapsed = grade_timed(code.replace("stdout", "stderr"), "x\n")
    assert score == 0.0 and elapsed < BOUND_S
    # We read at most the capped output, not gigabytes (maxrss is in KiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024


def test_reading_a_secret_file_outside(host):
    secret = host["secret"]
    code = (
        "import os\n"
        f"for path in [{str(secret)!r}, '/proc/1/root' + {str(secret)!r}, {str(secret.parent)!r}]:\n"
        "    try:\n"
        "        print(open(path).read(), end='')\n"
        "    except Exception:\n"
        "        pass\n"
    )
    score, elapsed = grade_timed(code, secret.read_text())
    assert score == 0.0 and elapsed < BOUND_S
    # And the host's home and project are simply not there.
    out = run_tests("import os\nprint(os.path.exists(os.path.expanduser('~root')), os.path.exists(os.getcwd() + '/setup.py'), os.path.exists('/work'), os.path.exists('/root'))", [""])
    assert out[0].stdout.split() == ["False", "False", "False", "False"]


def test_writing_outside_the_temp_dir(host):
    targets = [str(host["dir"] / "pwned"), "/usr/pwned", "/pwned", "/etc/pwned", "/dev/shm/pwned", "/root/pwned"]
    code = (
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('/tmp/fine', 'w').write('private scratch space works')\n"
    )
    out = run_tests(code, [""])
    assert out[0].status == "ok" and out[0].stdout == ""
    score, elapsed = grade_timed(code.replace("'wrote', path", "'wrote'"), "wrote\n")
    assert score == 0.0 and elapsed < BOUND_S
    for path in targets:
        assert not os.path.exists(path)


def test_connecting_to_a_local_server(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except socket.timeout:
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        code = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
            "s.sendall(b'hello')\n"
            "print('connected')\n"
        )
        score, elapsed = grade_timed(code, "connected\n")
        assert score == 0.0 and elapsed < BOUND_S
        out = run_tests("import socket\nprint(socket.gethostbyname('example.com'))", [""])
        assert out[0].status == "error"  # no DNS, no network
    finally:
        stop.set()
        thread.join()
        server.close()
    assert accepted == []


def test_setsid_child_does_not_outlive_the_sandbox(host):
    code = set_name(host["marker"]) + (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"  # a grandchild in its own session, re-parented away from us
        "        while True:\n"
        "            time.sleep(0.1)\n"
        "    os._exit(0)\n"
        "while True:\n"
        "    pass\n"
    )
    score, elapsed = grade_timed(code, "done\n")
    assert score == 0.0 and elapsed < BOUND_S
    # host fixture: no process carrying the marker survives.


def test_killing_its_parent(host):
    for code in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('x')",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('x')"):
        score, elapsed = grade_timed(code, "x\n")
        assert score == 0.0 and elapsed < BOUND_S
    # A killed harness reports nothing, so a correct-looking print cannot count.
    assert [r.status for r in run_tests("import os\nos.kill(os.getppid(), 9)", ["", ""])] == ["no_result"] * 2


def test_reading_our_environment(host, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("MP_TEST_SECRET", secret)
    code = (
        "import os, glob\n"
        "print(os.environ.get('MP_TEST_SECRET', ''))\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        print(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n"
        "        pass\n"
    )
    score, elapsed = grade_timed(code, secret + "\n")
    assert score == 0.0 and elapsed < BOUND_S
    out = run_tests(code, [""])[0].stdout
    assert secret not in out


# ---------------------------------------------------------------------------------------------
# Failing loudly, and the explicit unsafe flag.


def test_missing_bwrap_fails_loudly(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sandbox, "_checked", False)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        grade_code(fenced("print(1)"), {"inputs": [""], "outputs": ["1"]})


def test_sandbox_that_cannot_start_fails_loudly(monkeypatch):
    monkeypatch.setenv(sandbox.SANDBOX_PYTHON_ENV, "/usr/bin/no-such-python")
    monkeypatch.setattr(sandbox, "_checked", False)
    with pytest.raises(SandboxUnavailableError, match="bwrap"):
        grade_code(fenced("print(1)"), {"inputs": [""], "outputs": ["1"]})


def test_unsafe_flag_runs_without_sandbox_only_when_set(monkeypatch):
    code = "import os\nprint(os.path.exists('/work') or os.path.exists('/root'))"
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert run_tests(code, [""])[0].stdout.strip() == "True"  # sees the host: no isolation
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")
    assert run_tests(code, [""])[0].stdout.strip() == "False"
    monkeypatch.delenv(sandbox.UNSAFE_ENV)
    assert run_tests(code, [""])[0].stdout.strip() == "False"
    assert run_tests(code, [""], unsafe=True)[0].stdout.strip() == "True"
