"""Helpers of the tests that stop a real `fedshield run` process with a signal: start it in a
session of its own, wait until it is mid-run, signal it, and check how it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def live_processes() -> list[dict]:
    """Every live process this user can read: pid, session, working directory, command."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if state != "Z":
            found.append({"pid": int(entry), "session": int(session), "cwd": cwd,
                          "cmdline": cmdline.decode(errors="replace")})
    return found


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_run(argv: list[str], **kwargs) -> subprocess.Popen:
    """`fedshield run ARGV` in a session of its own (its pid is its process group)."""
    return subprocess.Popen([sys.executable, "-m", "fedshield.cli", "run", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, **kwargs)


def interrupt(proc: subprocess.Popen, ready: Callable[[], bool], send: Callable[[], None],
              timeout: float = 240) -> str:
    """Once ``ready()``, ``send()`` a signal; returns the last line of stderr after checking
    that the run exited with 130, one "interrupted" line and no traceback. The run is killed
    if anything goes wrong."""
    try:
        wait_until(lambda: proc.poll() is not None or ready(), timeout, "the run to be ready")
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        send()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert sum("interrupted" in line for line in err.splitlines()) == 1, err[-3000:]
    return err.strip().splitlines()[-1]
