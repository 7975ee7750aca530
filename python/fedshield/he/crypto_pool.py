"""Encryption and decryption on every core: the parent side (the pool).

The openfhe binding holds the GIL through Encrypt/Decrypt (measured: two Python threads
encrypt no faster than one), so parallelism needs processes. Each worker is a plain
`python -m fedshield.he.crypto_worker` child that loads the context once; afterwards only slot
buffers and serialized ciphertexts cross its pipes. Plain children rather than
multiprocessing: "spawn" re-imports the user's __main__ (a script without a main guard
would recurse) and fork() is unsafe after OpenFHE/torch have started OpenMP threads.
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import threading
import weakref
from typing import Callable

import numpy as np

from ..errors import FedShieldError
from . import backend
from ..threads import ENV as THREADS_ENV
from ..threads import num_threads
from .params import CKKSParams

# Below this many ciphertexts the pool costs more than it saves (pipe transfer, scheduling).
MIN_PARALLEL_CIPHERTEXTS = 8


def default_workers() -> int:
    """One worker process per thread fedshield may use (FEDSHIELD_NUM_THREADS)."""
    return num_threads()


class _Worker:
    def __init__(self, context_blob: bytes) -> None:
        # Each worker is one busy thread: its native calls and OpenFHE's OpenMP stay at one.
        env = {**os.environ, THREADS_ENV: "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fedshield.he.crypto_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            self.send(("init", context_blob))
            self.receive()
        except BaseException:
            self.proc.kill()  # never leave a half-started worker behind
            self.proc.wait()
            raise

    def send(self, message) -> None:
        try:
            pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise FedShieldError(f"crypto worker {self.proc.pid} died "
                                 f"(exit code {self.proc.poll()})") from exc

    def receive(self):
        try:
            status, value = pickle.load(self.proc.stdout)
        except EOFError as exc:
            raise FedShieldError(f"crypto worker {self.proc.pid} died "
                                 f"(exit code {self.proc.wait()})") from exc
        if status != "ok":
            raise FedShieldError(f"crypto worker failed: {value}")
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def dispatch(objects, params: CKKSParams, op: str, payload):
    """One crypto operation on live openfhe objects (crypto_context, public_key, secret_key):
    what a worker process does, and the calling process's own share of a batch."""
    if op == "encrypt":
        return backend.encrypt_buffer(objects[0], objects[1], payload, params)
    if op == "encrypt_secret":
        return backend.encrypt_buffer(objects[0], objects[2], payload, params)
    if op == "decrypt":
        return backend.decrypt_ciphertexts(objects[0], objects[2], payload, params)
    raise ValueError(f"unknown op {op!r}")


class CryptoPool:
    """``workers`` threads of work on one context, split by whole ciphertexts: the calling
    process takes the last share itself (``local(op, part)``), ``workers - 1`` worker processes
    the others. So the caller, which feeds the workers through pipes, is one of the ``workers``
    busy threads instead of one more (measured: with 2 CPUs, 2 worker processes plus the
    caller's pipe transfers kept 3 threads busy at times)."""

    def __init__(self, context_blob: bytes, params: CKKSParams, workers: int,
                 local: Callable[[str, object], object]) -> None:
        self.params = params
        self._local = local
        self._workers: list[_Worker] = []
        self.broken = False  # a failed batch leaves pipes in an unknown state: start afresh
        try:
            for _ in range(workers - 1):
                self._workers.append(_Worker(context_blob))
        except BaseException:
            self.broken = True
            self.close()
            raise
        self._lock = threading.Lock()  # one batch at a time through the pipes
        # A weak reference: the exit hook must not keep dropped pools (and their processes) alive.
        atexit.register(_close_if_alive, weakref.ref(self))

    def _run(self, op: str, parts: list) -> list:
        with self._lock:
            remote, own = parts[:-1], parts[-1]
            used = self._workers[:len(remote)]
            try:
                for worker, part in zip(used, remote):
                    worker.send((op, part))
                mine = self._local(op, own)   # while the workers work on theirs
                return [worker.receive() for worker in used] + [mine]
            except BaseException:
                self.broken = True
                self.close()
                raise

    def _split(self, n: int) -> list[tuple[int, int]]:
        bounds = np.linspace(0, n, len(self._workers) + 2).astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def encrypt(self, buffer: np.ndarray, with_secret_key: bool = False) -> list[bytes]:
        """Serialized ciphertexts of the buffer, under the public key or (a pool started with
        the secret key) under the secret key."""
        per_ct = self.params.values_per_ciphertext
        parts = [buffer[a * per_ct:b * per_ct] for a, b in self._split(buffer.size // per_ct)]
        op = "encrypt_secret" if with_secret_key else "encrypt"
        return [ct for cts in self._run(op, parts) for ct in cts]

    def decrypt(self, cts: list[bytes]) -> np.ndarray:
        parts = [cts[a:b] for a, b in self._split(len(cts))]
        return np.concatenate(self._run("decrypt", parts))

    def close(self) -> None:
        """Stops the workers (they hold the context, maybe its secret key); a context that
        shares this pool starts a fresh one on its next use."""
        for worker in self._workers:
            if self.broken:
                worker.proc.kill()
            worker.close()
        self.broken = True

    def __del__(self) -> None:
        self.close()


def _close_if_alive(ref) -> None:
    pool = ref()
    if pool is not None:
        pool.close()
