"""A run's output directory: what marks it as holding a run, refusing to replace one without
being asked, and how far a run there got (what an interrupted run has saved).

Standard library only: the CLI checks ``--out`` with it before torch, the model or the keys
load, and reads the saved rounds of an interrupted run without loading the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..base.errors import ParameterError
from ..base.validate import is_int

log = logging.getLogger("fedshield")

METRICS = "metrics.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_INDEX = "checkpoint.json"
ADAPTER_DIR = "adapter"
PLOTS_DIR = "plots"
SERVER_STATE = "server-state.json"   # a Flower run's server state (--resume goes on from it)
# Any of these means the directory holds (part of) a run that --out would replace.
RUN_MARKERS = (METRICS, CHECKPOINT_DIR, ADAPTER_DIR)
# What --overwrite removes before a new run starts: the old run's results. Not sites/ or
# base_model/ (rewritten file by file; a user may keep --site-data files under sites/).
REPLACED = (METRICS, CHECKPOINT_DIR, ADAPTER_DIR, PLOTS_DIR, SERVER_STATE)


def _flag(path: Path) -> str:
    return f"--out {str(path)!r}"


def held_run(out: str | Path) -> list[str]:
    """The run markers present in ``out`` (empty: no run there)."""
    out = Path(out)
    return [name for name in RUN_MARKERS if (out / name).exists()]


def check_out_dir(out: str | Path, *, overwrite: bool = False) -> None:
    """Refuses an ``out`` that is not a directory, or one that holds a run (unless
    ``overwrite``). Reads only: nothing is created or removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"{_flag(out)} is an existing file; expected a directory for the "
                             "run's outputs (a new one, or one without a run)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ParameterError(f"{_flag(out)}: {str(parent)!r} is a file, not a "
                                     "directory")
            break
    markers = held_run(out)
    if markers and not overwrite:
        raise ParameterError(f"{_flag(out)} already holds a run ({describe_run(out)}); pass "
                             f"--overwrite to replace it, `--resume {out}` to continue it, or "
                             "another --out")


def claim_out_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Checks ``out`` as :func:`check_out_dir` does, then creates it; with ``overwrite`` the
    earlier run's results (metrics.json, checkpoint/, adapter/, plots/) are removed first, so
    that nothing of it can be mistaken for the new run's."""
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    markers = held_run(out)
    if markers:
        log.info("fedshield: --overwrite: replacing the run in %s (%s)", out, describe_run(out))
        for name in REPLACED:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def checkpointed_round(out: str | Path) -> int:
    """The last round whose checkpoint is complete in ``out`` (0: none). Reads the index only;
    an unreadable index counts as none (resume then says why)."""
    index = Path(out) / CHECKPOINT_DIR / CHECKPOINT_INDEX
    try:
        value = json.loads(index.read_text()).get("round", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if is_int(value) and value > 0 else 0


def recorded_rounds(out: str | Path) -> tuple[int, int | None]:
    """(rounds recorded, rounds planned) according to ``out``/metrics.json; (0, None) when it
    is missing or unreadable."""
    try:
        metrics = json.loads((Path(out) / METRICS).read_text())
        done = len(metrics.get("rounds", []))
        planned = metrics.get("config", {}).get("training", {}).get("rounds")
    except (OSError, ValueError, AttributeError, TypeError):
        return 0, None
    return done, planned if isinstance(planned, int) else None


def describe_run(out: str | Path) -> str:
    """A few words on the run in ``out``: its rounds, whether it finished, its files."""
    out = Path(out)
    try:
        finished = bool(json.loads((out / METRICS).read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        finished = False
    done, planned = recorded_rounds(out)
    done = max(done, checkpointed_round(out))
    rounds = f"{done} of {planned} rounds" if planned and not finished else f"{done} rounds"
    files = ", ".join(f"{name}/" if (out / name).is_dir() else name for name in held_run(out))
    return f"{rounds}{', finished' if finished else ''}: {files}"
