"""Local IPC between a ClientApp process and its node's site worker (fedshield.flower.site_worker),
and the starting of that worker.

Flower 1.30 starts a fresh ClientApp process for every message; the site worker is one
long-lived process per node that holds the Site (model, tokenized data, key) across rounds. The
ClientApp hands it each message over a Unix socket private to this user and reads the reply.
The worker is keyed by its node config and serves one run config: a ClientApp of another run
has it exit and starts a fresh one.

A message is a frame: an 8-byte little-endian length, then a JSON head (``op`` or ``ok``,
``fields``, ``sizes``) and byte sections (updates, aggregates, shares). No pickle: neither side
runs code it receives.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..errors import FedShieldError

# Run config of the simulation runtime: each virtual SuperNode's node config (a JSON list by
# partition id; the virtual SuperNodes' own node configs hold only their partition id).
SIMULATION_SITES = "simulation-sites"
RESUME_STATE = "resume-state"   # run config: the server state a restarted ServerApp goes on from
SERVER_IDENTITY = "server-identity"  # run config: the server's identity key (pinned by the sites)
MAX_HEAD = 1 << 20            # a JSON head is small: fields and section sizes
MAX_FRAME = 1 << 40           # what one message may declare (payloads are checked later)


class SiteWorkerError(FedShieldError):
    """The site worker failed, refused a message, or could not be reached."""


def socket_path(node_config: dict) -> Path:
    """Where this node's site worker listens: short (AF_UNIX paths hold ~107 bytes) and
    unique per user and node config."""
    key = json.dumps([os.getuid(), sorted(node_config.items())], default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"fedshield-site-{digest}.sock"


def run_digest(run_config: dict) -> str:
    """Names the run a worker serves (its run config)."""
    return hashlib.sha256(json.dumps(sorted(run_config.items()), default=str).encode()
                          ).hexdigest()[:32]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, at = memoryview(buf), 0
    while at < n:
        got = sock.recv_into(view[at:], min(n - at, 1 << 24))
        if got == 0:
            raise SiteWorkerError(f"the connection closed after {at} of {n} bytes")
        at += got
    return bytes(buf)


def send_frame(sock: socket.socket, head: dict, sections: Sequence[bytes] = ()) -> None:
    sections = [bytes(s) for s in sections]
    raw = json.dumps({**head, "sizes": [len(s) for s in sections]}).encode()
    body_len = 4 + len(raw) + sum(len(s) for s in sections)
    sock.sendall(struct.pack("<QI", body_len, len(raw)) + raw)
    for s in sections:
        sock.sendall(s)


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytes]]:
    """(head, sections); SiteWorkerError for anything malformed."""
    body_len, head_len = struct.unpack("<QI", _recv_exact(sock, 12))
    if not (head_len <= MAX_HEAD and 4 + head_len <= body_len <= MAX_FRAME):
        raise SiteWorkerError(f"malformed frame (body {body_len} bytes, head {head_len})")
    try:
        head = json.loads(_recv_exact(sock, head_len))
        sizes = head["sizes"]
        if not (isinstance(head, dict) and isinstance(sizes, list) and all(
                isinstance(s, int) and s >= 0 for s in sizes)
                and 4 + head_len + sum(sizes) == body_len):
            raise ValueError(f"section sizes {sizes!r} do not add up to {body_len}")
    except (ValueError, KeyError, TypeError) as exc:
        raise SiteWorkerError(f"malformed frame head: {exc}") from exc
    return head, [_recv_exact(sock, s) for s in sizes]


def connect(path: Path, timeout: float | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def request(path: Path, op: str, fields: dict, sections: Sequence[bytes] = (),
            timeout: float | None = None) -> tuple[dict, list[bytes]]:
    """Sends one request to the worker at ``path`` and returns its reply (fields, sections);
    the worker's own error comes back as SiteWorkerError with its message."""
    try:
        with connect(path, timeout) as sock:
            send_frame(sock, {"op": op, "fields": fields}, sections)
            head, out = recv_frame(sock)
    except OSError as exc:
        raise SiteWorkerError(f"site worker at {path}: {exc}") from exc
    if not head.get("ok"):
        raise SiteWorkerError(str(head.get("error", "the site worker failed")))
    return head.get("fields", {}), out


def spawn_worker(path: Path, node_config: dict, run_config: dict, parent: int, *,
                 env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Starts a site worker for ``path`` in its own session (it outlives the process that
    starts it and exits with ``parent``); its pid goes to ``<socket>.pid``, its log to
    ``<socket>.log``."""
    spec_file = path.with_suffix(".spec.json")
    fd = os.open(spec_file, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"node_config": dict(node_config), "run_config": dict(run_config)}, fh)
    with open(path.with_suffix(".log"), "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedshield.flower.site_worker", "--socket", str(path),
             "--spec", str(spec_file), "--parent", str(parent)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env=env, cwd=cwd)
    path.with_suffix(".pid").write_text(str(proc.pid))
    return proc


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (0: no process to watch, always true)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _starting_pid(path: Path) -> int | None:
    """The pid of a worker started for ``path`` that is still alive (maybe still loading)."""
    try:
        pid = int(path.with_suffix(".pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def _ping(path: Path) -> dict | None:
    try:
        fields, _ = request(path, "ping", {}, timeout=5.0)
        return fields
    except SiteWorkerError:
        return None


def ensure_worker(node_config: dict, run_config: dict, parent: int,
                  timeout: float) -> Path:
    """The socket of this node's site worker for this run: the running one, one still
    loading, or a new one (a lock keeps two messages of a node from starting two)."""
    path = socket_path(node_config)
    digest = run_digest(run_config)
    info = _ping(path)
    if info is not None and info.get("run") == digest:
        return path
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = _ping(path)
        if info is not None and info.get("run") != digest:
            request(path, "shutdown", {}, timeout=30.0)  # a worker of another run
            info = None
        if info is not None:
            return path
        pid = _starting_pid(path)
        if pid is None:
            pid = spawn_worker(path, node_config, run_config, parent).pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = _ping(path)
            if info is not None:
                if info.get("run") != digest:
                    raise SiteWorkerError(f"the site worker at {path} serves another run")
                return path
            if not process_alive(pid):
                tail = path.with_suffix(".log").read_text(errors="replace")[-2000:]
                raise SiteWorkerError(f"the site worker (pid {pid}) exited before it was "
                                      f"ready; its log ends: {tail}")
            time.sleep(0.2)
        raise SiteWorkerError(f"the site worker (pid {pid}) was not ready after "
                              f"{timeout:.0f} s; see {path.with_suffix('.log')}")
