"""Site workers forked from one warm process, for launchers that run several sites on one
machine (``fedshield run --engine flower``).

Each site worker imports torch and transformers before it can build its model: about 7 s of
CPU per process on this project's 2-core machine, four times side by side in the demo, while
the local engine pays it once. Here one process imports them once and forks every site's
worker from itself; each child then becomes what ``fedshield site worker`` would have been
(its own directory, environment and log, the same :func:`run_worker`). A real deployment
starts one worker per site with ``fedshield site worker``; nothing changes there.

The warm process is the group leader of its workers (a launcher stops them all with one
signal to the group), waits for them, and exits when they have: at once, stopping the others,
when one of them exits first, since a site worker only exits when it is stopped or fails.

Usage: ``python -m fedshield.engines.flower.warm_start SPEC`` with SPEC a JSON file (mode 0600:
it holds the workers' environments): ``{"exit_with": pid, "preload_run": path, "workers":
[{"config": path, "cwd": dir, "env": {...}, "log": path}, ...]}``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from ...base.errors import ParameterError
from ...base.private_file import open_private

# What every site worker imports before its model exists (the site worker itself, the demo's
# tiny Llama, its offline tokenizer and the LoRA layers): imported once, by the warm process
# only (the launcher, which writes the spec, never pays for torch), shared by every fork.
WARM_MODULES = ("torch", "tokenizers", "transformers", "transformers.models.llama.modeling_llama",
                "transformers.tokenization_utils_fast", "peft")
WORKER_KEYS = ("config", "cwd", "env", "log")


def write_spec(path: Path, workers: list[dict], *, exit_with: int, preload_run: Path) -> Path:
    """The spec file of :func:`main` (mode 0600: the environments may hold secrets)."""
    for w in workers:
        missing = [k for k in WORKER_KEYS if k not in w]
        if missing:
            raise ParameterError(f"a warm-start worker lacks {missing}: {sorted(w)}")
    fd = open_private(path)
    with os.fdopen(fd, "w") as f:
        json.dump({"exit_with": exit_with, "preload_run": str(preload_run),
                   "workers": [{k: (w[k] if k == "env" else str(w[k])) for k in WORKER_KEYS}
                               for w in workers]}, f)
    return path


def warm_up():
    """Imports what every worker needs (a module this installation lacks stays for the worker
    to report); returns the site worker's entry point."""
    from .site_worker import run_worker
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    return run_worker


def _become_worker(run_worker, worker: dict, spec: dict) -> NoReturn:
    """In the forked child: the site worker ``fedshield site worker`` would have started."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(worker["cwd"])
        os.environ.clear()
        os.environ.update(worker["env"])
        fd = open_private(worker["log"])
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        run_worker(worker["config"], exit_with=int(spec["exit_with"]),
                   preload_run=spec["preload_run"])  # ends the process itself
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the worker's log says why, then it exits
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fedshield.engines.flower.warm_start SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    stopping = False

    def on_sigterm(signum, frame) -> None:   # the group's workers got it too: wait for them
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    run_worker = warm_up()
    children: dict[int, str] = {}
    for worker in spec["workers"]:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _become_worker(run_worker, worker, spec)
        children[pid] = worker["config"]
        print(f"warm start: site worker {pid} for {worker['config']}", flush=True)
    first = 0
    while children:
        pid, status = os.wait()   # retried by Python when the SIGTERM handler runs (PEP 475)
        code = os.waitstatus_to_exitcode(status)
        config = children.pop(pid)
        print(f"warm start: site worker {pid} for {config} exited with {code}", flush=True)
        if not stopping:
            # a worker exits only when stopped or failed: the group ends, and the launcher
            # sees it (with the first one's code, or 1 when it exited 0 on its own)
            stopping, first = True, code or 1
            if children:
                print("warm start: stopping the other site workers", flush=True)
            for other in children:
                try:
                    os.kill(other, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    return first


if __name__ == "__main__":
    sys.exit(main())
