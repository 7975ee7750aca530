"""What this process and its children do while a test runs, sampled in a background thread.

- :class:`BusyThreads` (tests/test_threads.py): a thread is busy in a window when it ran or
  waited to run (``/proc/.../schedstat``: time on a CPU plus time on the run queue) for at
  least half of it: more busy threads than CPUs means threads queue for cores
  (oversubscription) even where each gets less than a full core.
- :class:`PeakMemory` (tests/test_soak.py): the peak of the children's summed resident memory.
"""

from __future__ import annotations

import os
import threading

import psutil  # a dependency of peft and accelerate


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


class Sampler:
    """Context manager calling :meth:`sample` every ``period`` seconds in a thread of its own
    until it exits."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Called in the sampling thread before the first period."""

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        self.start()
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class BusyThreads(Sampler):
    """``max_busy`` is the most busy threads seen in any window."""

    def __init__(self, window: float = 0.02) -> None:
        super().__init__(window)
        self.counts: list[int] = []

    def start(self) -> None:
        self._me = threading.get_native_id()
        self._before = _busy_ns(self._me)

    def sample(self) -> None:
        now = _busy_ns(self._me)
        elapsed_ns = self.period * 1e9
        self.counts.append(sum(1 for k, v in now.items()
                               if v - self._before.get(k, v) >= 0.5 * elapsed_ns))
        self._before = now

    @property
    def max_busy(self) -> int:
        return max(self.counts, default=0)


class PeakMemory(Sampler):
    """Peak of the summed resident memory of this process's descendants, sampled each second
    (pages shared between processes, such as torch's libraries, count once per process)."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(period)
        self._me = psutil.Process()
        self.peak_mb, self.processes = 0.0, 0

    def sample(self) -> None:
        total, n = 0, 0
        for p in self._me.children(recursive=True):
            try:
                total += p.memory_info().rss
                n += 1
            except Exception:  # noqa: BLE001 - a process that just ended
                continue
        if total / 2**20 > self.peak_mb:
            self.peak_mb, self.processes = total / 2**20, n
