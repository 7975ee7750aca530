"""Round checkpoints of a run: global LoRA state, round number, RNG states, metrics.

DIR/checkpoint/ holds `state-rNNNNNN.safetensors` (the global state and the RNG states as
tensors) and `checkpoint.json` (round, config, metrics, the Server's public state, the python
RNG state, the name of the state file). A resumed run's Server restores from the last two, as
a resumed Flower server does from its server state (fedshield.fl.server.Server.restore). A checkpoint is written file by file, each fsynced and renamed into place, and
`checkpoint.json` last: a crash at any point leaves the previous complete checkpoint readable.
Both are mode 0600 (the model state and the RNG states are the run owner's alone).
Key material is never written here (a resumed simulation generates fresh keys).
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..base.atomic import write_atomic
from ..base.errors import ParameterError, StorageError
from .run_dir import CHECKPOINT_DIR
from .run_dir import CHECKPOINT_INDEX as INDEX
from ..base.validate import is_int

FORMAT = 1
_STATE = "state."
_RNG = "rng."


def capture_rng() -> tuple[dict, dict]:
    """(tensors, json) of torch, CUDA, numpy and python RNG states."""
    tensors = {_RNG + "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_RNG}cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors[_RNG + "numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss_next = random.getstate()
    extra = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), gauss_next]}
    return tensors, extra


def restore_rng(tensors: dict, extra: dict) -> None:
    """Restores what capture_rng() saved; ParameterError when a checkpoint's states are not
    what it wrote (a damaged or edited file)."""
    try:
        torch.set_rng_state(tensors[_RNG + "torch"])
        cuda = sorted(k for k in tensors if k.startswith(_RNG + "cuda"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
        kind, pos, has_gauss, gauss = extra["numpy"]
        keys = tensors[_RNG + "numpy"].numpy().view(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, gauss))
        version, internal, gauss_next = extra["python"]
        random.setstate((version, tuple(internal), gauss_next))
    except (KeyError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise ParameterError(f"the checkpoint's RNG states are unreadable "
                             f"({type(exc).__name__}: {exc})") from exc


def save_checkpoint(out: Path, *, round_idx: int, state: dict, metrics: dict,
                    config: dict, server: dict | None = None) -> Path:
    """Writes the checkpoint of completed round `round_idx`; returns its index file.
    ``server``: the Server's checkpoint without its record (which is ``metrics``).

    StorageError (naming the file) when the disk is full or read-only: the previous
    checkpoint is then still complete."""
    from safetensors.torch import save  # noqa: PLC0415

    ckpt = Path(out) / CHECKPOINT_DIR
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the checkpoint directory {str(ckpt)!r}: "
                           f"{exc.strerror or exc}") from exc
    rng_tensors, rng_extra = capture_rng()
    tensors = {_STATE + k: v.detach().cpu().contiguous() for k, v in state.items()}
    tensors.update(rng_tensors)
    state_name = f"state-r{round_idx:06d}.safetensors"
    # serialized in memory, so every byte goes through the one atomic writer (an interruption
    # or a full disk leaves no partial file behind)
    write_atomic(ckpt / state_name, save(tensors), mode=0o600)   # model state: the owner's
    index = {"format": FORMAT, "round": round_idx, "state_file": state_name, "config": config,
             "rng": rng_extra, "metrics": metrics}
    if server is not None:
        index["server"] = server
    write_atomic(ckpt / INDEX, json.dumps(index).encode(), mode=0o600)
    for old in ckpt.glob("state-r*.safetensors"):  # only after the new index points elsewhere
        if old.name != state_name:
            with contextlib.suppress(OSError):  # a stale file costs space, not correctness
                old.unlink(missing_ok=True)
    return ckpt / INDEX


def load_checkpoint(out: Path) -> dict:
    """{'round', 'config', 'metrics', 'server', 'state', 'rng'} of DIR's checkpoint: 'server'
    is what Server.restore takes (its record is 'metrics'); the caller restores the RNG states
    with restore_rng(*ckpt['rng']) once its set-up is done."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    ckpt = Path(out) / CHECKPOINT_DIR
    index_path = ckpt / INDEX
    if not index_path.is_file():
        raise ParameterError(f"--resume {str(out)!r}: no {CHECKPOINT_DIR}/{INDEX}; was it "
                             "written by `fedshield run` (which checkpoints after every round)?")
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format') if isinstance(index, dict) else index!r}"
                             f", expected {FORMAT}")
        round_idx, state_file = index["round"], index["state_file"]
        if not is_int(round_idx) or round_idx < 1:
            raise ValueError(f"round {round_idx!r} is not a completed round")
        if state_file != f"state-r{round_idx:06d}.safetensors":  # no path from outside
            raise ValueError(f"state file {state_file!r} is not round {round_idx}'s")
        config, metrics, rng_extra = index["config"], index["metrics"], index["rng"]
        if not (isinstance(config, dict) and isinstance(metrics, dict)
                and isinstance(rng_extra, dict)):
            raise ValueError("config, metrics and rng must be objects")
        # a checkpoint of an earlier version has no server state: the one its metrics imply
        server = index.get("server", {"format": 1, "round": round_idx, "version": round_idx,
                                      "epoch": 0, "roster": {}})
        if not isinstance(server, dict):
            raise ValueError("the server state must be an object")
        if [r["round"] for r in metrics["rounds"]] != list(range(1, round_idx + 1)):
            raise ValueError(f"metrics hold rounds {[r['round'] for r in metrics['rounds']]}, "
                             f"not 1..{round_idx}")
        tensors = load_file(str(ckpt / state_file))
        state = {k[len(_STATE):]: v for k, v in tensors.items() if k.startswith(_STATE)}
        rng = ({k: v for k, v in tensors.items() if k.startswith(_RNG)}, rng_extra)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ParameterError(f"--resume {str(out)!r}: the checkpoint is unreadable "
                             f"({type(exc).__name__}: {exc})") from exc
    return {"round": round_idx, "config": config, "metrics": metrics,
            "server": {**server, "record": metrics}, "state": state, "rng": rng}
