"""The local channel between a SuperNode's ClientApp (Flower ships it in the app package, so a
site does not trust it) and the site's own worker (fedshield.engines.flower.site_worker, started by the
site from its own install and site config).

The worker listens on a Unix socket in a directory the site chooses. Every connection opens
with a challenge-response over the relay secret, a token file the site's administrator hands
to the SuperNode (its node config's ``token-file``); the token itself never crosses the socket:

    worker -> relay:  MAGIC, 32-byte nonce Nw
    relay  -> worker: 32-byte nonce Nr, HMAC-SHA256(token, "relay" | Nw | Nr)
    worker -> relay:  HMAC-SHA256(token, "worker" | Nw | Nr)       (else it hangs up)

then one request and its reply, each a frame: an 8-byte little-endian length, then a JSON head
(``op`` and ``fields``, or ``ok`` and ``fields``/``error-type``/``error``, and ``sizes``) and
byte sections (updates, aggregates, shares). No pickle: neither side runs code it receives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ...base.errors import FedShieldError

# Run config of the simulation runtime: each virtual SuperNode's relay settings (a JSON list by
# partition id; the virtual SuperNodes' own node configs hold only their partition id).
SIMULATION_SITES = "simulation-sites"
RESUME_STATE = "resume-state"   # run config: the server state a restarted ServerApp goes on from
# Node config of a SuperNode: all that its ClientApp needs (never a data or key path).
NODE_SOCKET, NODE_TOKEN = "socket", "token-file"
SERVER_IDENTITY = "server-identity"  # run config: the server's identity key (pinned by the sites)
# The ServerApp's last log line, once metrics.json says finished (plots written): when `flwr run
# --stream` has printed it, the launcher has the whole run and its output.
RUN_COMPLETE = "fedshield: the run is complete"
MAX_HEAD = 1 << 20            # a JSON head is small: fields and section sizes
MAX_FRAME = 1 << 40           # what one message may declare (payloads are checked later)
MAGIC = b"FSRELAY1"
NONCE = 32
TOKEN_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0     # what the worker gives a peer to prove the token
MAX_SUN_PATH = 107


class SiteWorkerError(FedShieldError):
    """The site worker refused a request or could not be reached; the text is the worker's
    error type and its fixed message."""


class WorkerRefused(SiteWorkerError):
    """The worker answered with a refusal: its error type and fixed message."""


class RelayAuthError(SiteWorkerError):
    """The other end of the relay socket does not hold the relay secret."""


# -- the relay secret --------------------------------------------------------------------------
def make_token(path: str | Path) -> Path:
    """A new relay secret at ``path`` (mode 0600) unless one is there already."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        read_token(path)   # a file that is there must be a token
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(TOKEN_BYTES) + "\n")
    return path


def read_token(path: str | Path) -> bytes:
    """The relay secret in ``path`` (64 hex digits)."""
    try:
        text = Path(path).read_text().strip()
        token = bytes.fromhex(text)
    except OSError as exc:
        raise RelayAuthError(f"cannot read the relay token file {str(path)!r}: "
                             f"{exc.strerror or exc}") from exc
    except ValueError as exc:
        raise RelayAuthError(f"the relay token file {str(path)!r} does not hold "
                             f"{2 * TOKEN_BYTES} hex digits") from exc
    if len(token) != TOKEN_BYTES:
        raise RelayAuthError(f"the relay token file {str(path)!r} holds {len(token)} bytes, "
                             f"expected {TOKEN_BYTES}")
    return token


def _mac(token: bytes, role: bytes, nonce_w: bytes, nonce_r: bytes) -> bytes:
    return hmac.new(token, b"fedshield-relay|" + role + b"|" + nonce_w + nonce_r,
                    hashlib.sha256).digest()


def prove_worker(conn: socket.socket, token: bytes) -> bool:
    """The worker's side of the handshake: whether the peer holds the token (it then knows
    the worker does too)."""
    nonce_w = secrets.token_bytes(NONCE)
    conn.sendall(MAGIC + nonce_w)
    got = _recv_exact(conn, NONCE + 32)
    nonce_r, mac = got[:NONCE], got[NONCE:]
    if not hmac.compare_digest(mac, _mac(token, b"relay", nonce_w, nonce_r)):
        return False
    conn.sendall(_mac(token, b"worker", nonce_w, nonce_r))
    return True


def _prove_relay(conn: socket.socket, token: bytes) -> None:
    hello = _recv_exact(conn, len(MAGIC) + NONCE)
    if hello[:len(MAGIC)] != MAGIC:
        raise RelayAuthError("the socket does not speak the fedshield relay protocol")
    nonce_w, nonce_r = hello[len(MAGIC):], secrets.token_bytes(NONCE)
    conn.sendall(nonce_r + _mac(token, b"relay", nonce_w, nonce_r))
    try:
        answer = _recv_exact(conn, 32)
    except SiteWorkerError as exc:
        raise RelayAuthError("the site worker refused the relay token") from exc
    if not hmac.compare_digest(answer, _mac(token, b"worker", nonce_w, nonce_r)):
        raise RelayAuthError("the socket's owner does not hold the relay token")


# -- frames ------------------------------------------------------------------------------------
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
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes)
                and 4 + head_len + sum(sizes) == body_len):
            raise ValueError("section sizes do not add up to the frame")
    except (ValueError, KeyError, TypeError) as exc:
        raise SiteWorkerError(f"malformed frame head: {exc}") from exc
    return head, [_recv_exact(sock, s) for s in sizes]


# -- addresses ---------------------------------------------------------------------------------
@contextmanager
def unix_address(path: str | Path):
    """``path`` as an AF_UNIX address; one longer than sun_path holds goes through the
    directory's /proc/self/fd entry (Linux)."""
    path = Path(path)
    if len(os.fsencode(str(path))) <= MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Relay:
    """Where a site's worker listens and the secret that opens it (what a SuperNode's node
    config names)."""

    socket: Path
    token: bytes

    @classmethod
    def from_node_config(cls, node: Mapping) -> "Relay":
        try:
            sock, token_file = str(node[NODE_SOCKET]), str(node[NODE_TOKEN])
        except KeyError as exc:
            raise SiteWorkerError(
                f"the node config lacks {exc}: start the SuperNode with --node-config "
                f"'{NODE_SOCKET}=\"SOCKET\" {NODE_TOKEN}=\"FILE\"' (the site worker's socket "
                "and a copy of its relay token)") from exc
        return cls(Path(sock), read_token(token_file))

    def connect(self, timeout: float | None = None) -> socket.socket:
        """An authenticated connection to the worker."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:   # a busy worker greets a queued connection when it is done: wait as for a reply
            sock.settimeout(timeout)
            with unix_address(self.socket) as address:
                sock.connect(address)
            _prove_relay(sock, self.token)
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, op: str, fields: Mapping, sections: Sequence[bytes] = (),
                timeout: float | None = None) -> tuple[dict, list[bytes]]:
        """Sends one request and returns the reply (fields, sections); a refusal comes back as
        SiteWorkerError with the worker's error type and fixed message."""
        try:
            with self.connect(timeout) as sock:
                send_frame(sock, {"op": op, "fields": dict(fields)}, sections)
                head, out = recv_frame(sock)
        except OSError as exc:   # which socket stays on this node, in its log
            raise SiteWorkerError(f"the site worker cannot be reached "
                                  f"({type(exc).__name__})") from exc
        if head.get("ok") is not True:
            detail = head.get("detail")
            raise WorkerRefused(f"{head.get('error-type', 'SiteError')}: "
                                f"{head.get('error', 'the site worker failed')}"
                                + (f" ({detail})" if isinstance(detail, str) else ""))
        fields_out = head.get("fields", {})
        if not isinstance(fields_out, dict):
            raise SiteWorkerError("malformed reply from the site worker")
        return fields_out, out
