"""A key holder's decryption budget: the ciphertexts its key has decrypted, counted on disk,
refused beyond a limit.

Noise flooding (fedshield.he.flooding) keeps what decryptions reveal statistically negligible
for 2**flood_log_queries decrypted ciphertexts per key; past that the guarantee is gone, and the
key must be rotated (a new key epoch). Charge the budget *before* a decryption leaves the node:
the count is on disk when :meth:`DecryptionBudget.charge` returns, so a crash can over-count,
never under-count.

The counter file (JSON, mode 0600, written atomically) sits beside the key file::

    {"version": 1, "context_fp": "<hex>", "decrypted": n, "limit": L, "retired": ["<hex>", ...]}

``retired`` lists the keys counted before the current one: :meth:`DecryptionBudget.reset_for`
starts a count for a new key only, so rotating back to a spent key does not reset its count.
A missing file is a key with nothing decrypted yet; a malformed one is refused, never reset.
Every read-modify-write holds an exclusive ``flock`` on the sibling ``<file>.lock``, so
threads and processes charging one budget at once count exactly.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from typing import Optional, Union

from ..base.atomic import write_atomic
from ..base.errors import DecryptionBudgetExceeded, KeyMaterialError, ParameterError

VERSION = 1
FINGERPRINT_SIZE = 32            # a context fingerprint (SHA-256)
_HEX_FP = re.compile(r"[0-9a-f]{64}")
_MAX_FILE = 1 << 20              # ~15,000 rotations of retired fingerprints
_FIELDS = {"version", "context_fp", "decrypted", "limit", "retired"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fp(context_fp) -> bytes:
    if not (isinstance(context_fp, (bytes, bytearray, memoryview))
            and len(context_fp) == FINGERPRINT_SIZE):
        got = (f"{len(context_fp)} bytes" if isinstance(context_fp, (bytes, bytearray, memoryview))
               else type(context_fp).__name__)
        raise ParameterError(f"context_fp must be the context's {FINGERPRINT_SIZE}-byte "
                             f"fingerprint (Context.fingerprint), got {got}")
    return bytes(context_fp)


def _describe_limit(limit: int) -> str:
    if limit & (limit - 1) == 0:
        return f"{limit} (2**{limit.bit_length() - 1}: 2**flood_log_queries)"
    return str(limit)


class DecryptionBudget:
    """The persistent count of ciphertexts one key has decrypted, at ``path``; at most
    ``limit`` (2**params.flood_log_queries for a flooded key)."""

    def __init__(self, path: Union[str, os.PathLike], limit: int) -> None:
        if not (_is_int(limit) and limit >= 1):
            raise ParameterError(f"decryption budget limit={limit!r} must be an int >= 1")
        self.path = os.fspath(path)
        self.limit = limit

    def __repr__(self) -> str:
        return f"DecryptionBudget({self.path!r}, limit={self.limit})"

    # - the public operations -
    def charge(self, context_fp: bytes, n_ciphertexts: int) -> int:
        """Counts ``n_ciphertexts`` decryptions with the key of ``context_fp`` and returns how
        many remain. Raises DecryptionBudgetExceeded (counting nothing) if they would pass the
        limit, KeyMaterialError if the file counts another key or is malformed."""
        fp = _check_fp(context_fp)
        if not (_is_int(n_ciphertexts) and n_ciphertexts >= 0):
            raise ParameterError(f"n_ciphertexts={n_ciphertexts!r} must be an int >= 0")
        with self._locked():
            state = self._read() or self._fresh(fp, retired=[])
            if state["context_fp"] != fp.hex():
                raise KeyMaterialError(
                    f"decryption counter {self.path!r} counts key {state['context_fp'][:16]}, "
                    f"not key {fp.hex()[:16]}: after a key rotation call reset_for(new key's "
                    "fingerprint) once, or use the new key's own counter file")
            done = state["decrypted"]
            if done + n_ciphertexts > self.limit:
                raise DecryptionBudgetExceeded(
                    f"decryption budget of key {fp.hex()[:16]} is spent: {done} ciphertexts "
                    f"decrypted, {n_ciphertexts} more asked, limit {_describe_limit(self.limit)}"
                    ". Noise flooding covers no more decryptions with this key: rotate keys "
                    f"(start a new key epoch) before decrypting again (counter: {self.path})")
            state["decrypted"] = done + n_ciphertexts
            self._write(state)
        return self.limit - state["decrypted"]

    def reset_for(self, new_context_fp: bytes) -> None:
        """Key rotation: from now on count the key of ``new_context_fp``, from 0. Refuses the
        key counted now and any key counted before (a spent key stays spent)."""
        fp = _check_fp(new_context_fp).hex()
        with self._locked():
            state = self._read()
            retired = [] if state is None else state["retired"] + [state["context_fp"]]
            if fp in retired:
                raise KeyMaterialError(
                    f"key {fp[:16]} has already been counted in {self.path!r}: reset_for starts "
                    "a count for a new key only (rotation makes a new key)")
            self._write(self._fresh(bytes.fromhex(fp), retired))

    @property
    def decrypted(self) -> int:
        """Ciphertexts the current key has decrypted (0 before the first charge)."""
        with self._locked():
            state = self._read()
        return 0 if state is None else state["decrypted"]

    @property
    def remaining(self) -> int:
        return self.limit - self.decrypted

    @property
    def context_fp(self) -> Optional[bytes]:
        """The fingerprint of the key counted now (None before the first charge or reset)."""
        with self._locked():
            state = self._read()
        return None if state is None else bytes.fromhex(state["context_fp"])

    # - the file -
    def _fresh(self, fp: bytes, retired: list) -> dict:
        return {"version": VERSION, "context_fp": fp.hex(), "decrypted": 0, "limit": self.limit,
                "retired": retired}

    @contextmanager
    def _locked(self):
        # a lock file of its own: the counter file is replaced on every write, so a lock on it
        # would be a lock on a file that is about to disappear
        fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)   # releases the lock

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyMaterialError(f"cannot read decryption counter {self.path!r}: {exc}") from exc
        try:
            if len(raw) > _MAX_FILE:
                raise ValueError(f"larger than {_MAX_FILE} bytes")
            state = json.loads(raw)
            self._check_state(state)
        except (ValueError, TypeError, RecursionError) as exc:
            raise KeyMaterialError(
                f"decryption counter {self.path!r} is malformed ({exc}); it is not reset "
                "automatically: find out what wrote it, then restore it or retire the key"
            ) from exc
        return state

    def _check_state(self, state) -> None:
        if not (isinstance(state, dict) and set(state) == _FIELDS):
            raise ValueError(f"expected an object with exactly the fields {sorted(_FIELDS)}")
        if state["version"] != VERSION or not _is_int(state["version"]):
            raise ValueError(f"version {state['version']!r}, expected {VERSION}")
        fps = state["retired"]
        if not (isinstance(fps, list) and all(isinstance(f, str) and _HEX_FP.fullmatch(f)
                                              for f in fps + [state["context_fp"]])):
            raise ValueError("context_fp and retired must be 64 lower-case hex digits each")
        if state["context_fp"] in fps:
            raise ValueError("the current key is also listed as retired")
        if state["limit"] != self.limit or not _is_int(state["limit"]):
            raise ValueError(f"limit {state['limit']!r}, but this key's limit is {self.limit}")
        if not (_is_int(state["decrypted"]) and 0 <= state["decrypted"] <= self.limit):
            raise ValueError(f"decrypted {state['decrypted']!r} is not an int in "
                             f"[0, {self.limit}]")

    def _write(self, state: dict) -> None:
        write_atomic(self.path, json.dumps(state, sort_keys=True).encode(), mode=0o600)
        # write_atomic fsyncs the file, not the rename: without the directory's fsync a crash
        # could bring back the previous, lower count
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


__all__ = ["DecryptionBudget"]
