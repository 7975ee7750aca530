"""The loop of one crypto worker process (started by fedshield.he.crypto_pool.CryptoPool):
(op, payload) pickles in on stdin, (status, value) pickles out on the original stdout."""

from __future__ import annotations

import os
import pickle
import signal
import sys

from .context import load_context
from .crypto_pool import dispatch


def _serve() -> None:
    """Worker loop: (op, payload) in on stdin, (status, value) out on the original stdout."""
    # A Ctrl-C at a terminal reaches the whole process group: the parent handles it and ends
    # its workers (stdin closes, or a kill); a traceback from each worker would only bury its
    # message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    inp = sys.stdin.buffer
    objects = params = None
    while True:
        try:
            op, payload = pickle.load(inp)
        except EOFError:
            return
        try:
            if op == "init":
                ctx = load_context(payload)
                params = ctx.params
                objects = ctx.openfhe_objects(need_secret=ctx.has_secret_key)
                result = None
            else:
                result = dispatch(objects, params, op, payload)
            reply = ("ok", result)
        except Exception as exc:  # reported to the parent, which raises it
            reply = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    _serve()
