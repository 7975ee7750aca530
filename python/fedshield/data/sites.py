"""Each site's own data: the per-site files a split writes, and a site's held-out part.

A site reads only its own file. It trains on the whole file except its held-out part: a
seeded shuffle of the file, whose last ``eval_fraction`` (at least one example) it keeps for
evaluation. Its weight in the average is the number of examples it trained on.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Mapping, Sequence

from ..base.atomic import write_atomic
from ..base.errors import DataError, ParameterError
from .files import TASK_FIELD, load_instruction_data
from .splits import split_dirichlet, split_iid, split_non_iid
from .synthetic import make_synthetic_examples

SPLITS = ("tasks", "iid", "dirichlet")


def split_into_sites(examples: Sequence[Mapping], n_sites: int, how: str, seed: int,
                     alpha: float = 0.5, source: str = "data") -> list[list[Mapping]]:
    """``examples`` cut into ``n_sites`` shards: ``tasks`` (each site mostly one task; needs a
    task field), ``iid`` or ``dirichlet`` (Dirichlet(alpha) over the task field, else hashed
    instructions)."""
    if how == "iid":
        return split_iid(examples, n_sites, seed)
    if how == "dirichlet":
        return split_dirichlet(examples, n_sites, alpha, seed)
    if how != "tasks":
        raise ParameterError(f"split={how!r} is not one of {SPLITS}")
    if not all(TASK_FIELD in ex for ex in examples):
        raise DataError(f"{source}: split='tasks' needs a task field; map a column to it "
                        "(--columns task=COLUMN) or use --split iid|dirichlet")
    try:
        return split_non_iid(examples, n_sites, seed)
    except ValueError as exc:
        raise DataError(f"{source}: {exc}") from exc


def data_set(path: str, n_sites: int, per_site: int, seed: int, columns: str = "") -> list[dict]:
    """The one data set to split: generated (``path == "synthetic"``: ``per_site`` examples
    per site) or read from a local file."""
    if path == "synthetic":
        return make_synthetic_examples(n_sites * per_site, seed)
    return load_instruction_data(path, columns)


def write_site_files(shards: Sequence[Sequence[Mapping]], out_dir: str | Path,
                     prefix: str = "site") -> list[Path]:
    """One JSONL file per shard (``out_dir/site-I.jsonl``), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, shard in enumerate(shards):
        path = out_dir / f"{prefix}-{i}.jsonl"
        text = "".join(json.dumps(dict(ex), ensure_ascii=False) + "\n" for ex in shard)
        write_atomic(path, text.encode("utf-8"))
        paths.append(path)
    return paths


def holdout(examples: Sequence[Mapping], eval_fraction: float, seed: int,
            source: str = "data") -> tuple[list[Mapping], list[Mapping]]:
    """(train, held-out): a seeded shuffle whose last floor(eval_fraction * n) are held out
    (at least one example, and at least one left to train on)."""
    if not 0 < eval_fraction < 1:
        raise ParameterError(f"eval_fraction={eval_fraction!r} must be in (0, 1)")
    n = len(examples)
    if n < 2:
        raise DataError(f"{source}: {n} example(s); a site needs at least one to train on and "
                        "one to hold out")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, math.floor(eval_fraction * n)), n - 1)
    shuffled = [examples[i] for i in order]
    return shuffled[:n - n_eval], shuffled[n - n_eval:]
