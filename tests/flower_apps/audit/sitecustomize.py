"""Loaded by every Python process of a test deployment (through PYTHONPATH) when
FEDSHIELD_TEST_OPEN_LOG names a directory: each process records there, in <pid>.txt, its
working directory and command line, then every .jsonl file it opens (a Python audit hook)."""

import os
import sys

_LOG_DIR = os.environ.get("FEDSHIELD_TEST_OPEN_LOG")
_busy = False


def _record(event, args):
    global _busy
    if event != "open" or _busy or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, str) or not path.endswith(".jsonl"):
        return
    _busy = True
    try:
        log = os.path.join(_LOG_DIR, f"{os.getpid()}.txt")
        first = not os.path.exists(log)
        with open(log, "a") as fh:
            if first:
                fh.write(f"cwd {os.getcwd()}\nargv {' '.join(sys.argv)}\n")
            fh.write(f"open {os.path.abspath(path)}\n")
    finally:
        _busy = False


if _LOG_DIR:
    sys.addaudithook(_record)
