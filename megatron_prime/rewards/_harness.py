"""Test harness that runs *inside* the sandbox (stdlib only, Python >= 3.8).

It is copied into the sandbox as /sandbox/harness.py and started once per graded program, so one
sandbox launch covers all of a program's test cases. Each test case still runs in its own child
process with its own wall-clock and CPU limit and an output cap, so one slow or noisy case only
fails itself.

Protocol: a JSON job on stdin
    {"token", "mode": "stdio"|"call"|"check", "fn_name", "inputs", "timeout_s", "budget_s",
     "max_output_bytes", "python", "solution", "call_runner"}
and one line on stdout: token + JSON {"results": [{"status", "stdout", "returncode"}, ...]}.
The token is random per run and only ever travels on our stdin, so the graded program (which
cannot read our memory or file descriptors, see _make_undumpable) cannot forge a result line.
"""

import ctypes
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time


def _make_undumpable():
    # PR_SET_DUMPABLE=0 makes /proc/<our pid>/{fd,mem,environ} inaccessible to the graded
    # program even though it runs under the same uid; it cannot write into our stdout or read
    # our stdin (the token) through /proc.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass


def _memfd_with(data):
    fd = os.memfd_create("stdin", 0)
    _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _run_case(argv, stdin_bytes, timeout_s, max_output_bytes):
    cpu_s = int(timeout_s) + 1

    def limit_child():
        # CPU seconds bound a busy loop even if the wall clock check below were late.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))

    stdin_fd = _memfd_with(stdin_bytes)
    try:
        child = subprocess.Popen(
            argv,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd="/tmp",
            start_new_session=True,  # so a timeout can kill the case's whole process group
            preexec_fn=limit_child,
        )
    finally:
        os.close(stdin_fd)
    out = bytearray()
    status = None
    deadline = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        if not sel.select(left):
            continue
        chunk = os.read(child.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
        if len(out) > max_output_bytes:
            status = "output_limit"
            break
    sel.close()
    if status is not None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        rc = child.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        # stdout closed but the process lingers (e.g. closed fd 1 and kept looping).
        os.killpg(child.pid, signal.SIGKILL)
        rc = child.wait()
        status = status or "timeout"
    child.stdout.close()
    if status is None:
        status = "ok" if rc == 0 else "error"
    text = "" if status == "output_limit" else out.decode("utf-8", errors="replace")
    return {"status": status, "stdout": text, "returncode": rc}


def main():
    _make_undumpable()
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    token = job["token"]
    deadline = time.monotonic() + job["budget_s"]
    if job["mode"] == "stdio":
        argv = [job["python"], "-I", job["solution"]]
    else:
        argv = [job["python"], "-I", job["call_runner"], job["solution"], job["fn_name"]]
        argv += ["--check"] if job["mode"] == "check" else []
    results = []
    for case_input in job["inputs"]:
        left = deadline - time.monotonic()
        if left <= 0.05:
            results.append({"status": "skipped", "stdout": "", "returncode": None})
            continue
        data = json.dumps(case_input) if job["mode"] == "call" else case_input
        results.append(
            _run_case(argv, data.encode("utf-8"), min(job["timeout_s"], left), job["max_output_bytes"])
        )
    sys.stdout.write(token + json.dumps({"results": results}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
