"""Counts busy threads of this process and its children (tests/test_threads.py).

A thread is busy in a window when it ran or waited to run (``/proc/.../schedstat``: time on a
CPU plus time on the run queue) for at least half of it: more busy threads than CPUs means
threads queue for cores (oversubscription) even where each gets less than a full core.
"""

from __future__ import annotations

import os
import threading


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        children = []
    for child in children:
        pids += _tree(int(child))
    return pids


def _busy_ns(skip: int) -> dict[tuple[int, int], int]:
    out = {}
    for pid in _tree(os.getpid()):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in map(int, tids):
            if tid == skip:
                continue
            try:
                run, wait = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[:2]
            except (OSError, ValueError):
                continue
            out[(pid, tid)] = int(run) + int(wait)
    return out


class BusyThreads:
    """Context manager: ``max_busy`` is the most busy threads seen in any window."""

    def __init__(self, window: float = 0.02) -> None:
        self.window = window
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = threading.get_native_id()
        before = _busy_ns(me)
        while not self._stop.wait(self.window):
            now = _busy_ns(me)
            elapsed_ns = self.window * 1e9
            self.counts.append(sum(1 for k, v in now.items()
                                   if v - before.get(k, v) >= 0.5 * elapsed_ns))
            before = now

    @property
    def max_busy(self) -> int:
        return max(self.counts, default=0)

    def __enter__(self) -> "BusyThreads":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
