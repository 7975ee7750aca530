"""Splits of one data set into sites: tasks (each site mostly one task), IID, Dirichlet."""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from typing import Callable, Dict, List, Mapping, Sequence, Union

import numpy as np

from ..base.errors import DataError, ParameterError
from .files import TASK_FIELD
from ..base.validate import is_int

log = logging.getLogger("fedshield")


def split_non_iid(
    examples: Sequence[Mapping[str, str]],
    n_clients: int,
    seed: int,
    dominant: float = 0.8,
) -> List[List[Mapping[str, str]]]:
    """Partition ``examples`` into ``n_clients`` label-skewed shards.

    Client ``c`` is assigned dominant task ``tasks[c % n_tasks]`` (tasks in
    first-appearance order) and receives ``round(dominant * size)`` examples
    of it where the pool allows; the rest of its shard is filled from the
    other tasks, taking from whichever has most left so the minority mix stays
    balanced. Every example lands in exactly one shard, shard sizes differ by
    at most one, and the result depends only on ``seed``.
    """
    n = len(examples)
    if not is_int(n_clients) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if n_clients > n:
        raise ValueError(
            f"n_clients={n_clients} is more than the number of examples ({n}); "
            "every client needs at least one example"
        )
    if not 0.0 <= dominant <= 1.0:
        raise ValueError(f"dominant must be in [0, 1], got {dominant}")
    missing = [i for i, ex in enumerate(examples) if "task" not in ex]
    if missing:
        raise ValueError(f"examples at indices {missing[:5]} have no 'task' key")

    rng = random.Random(seed)
    task_order = list(dict.fromkeys(ex["task"] for ex in examples))
    pools: Dict[str, List[Mapping[str, str]]] = {t: [] for t in task_order}
    for ex in examples:
        pools[ex["task"]].append(ex)
    for t in task_order:
        rng.shuffle(pools[t])

    sizes = [n // n_clients + (1 if c < n % n_clients else 0) for c in range(n_clients)]
    dom_task = [task_order[c % len(task_order)] for c in range(n_clients)]
    shards: List[List[Mapping[str, str]]] = [[] for _ in range(n_clients)]

    # Phase 1: dominant examples. Clients sharing a dominant task share its
    # pool; if the pool is short, each gets a proportional part of it.
    for t in task_order:
        clients = [c for c in range(n_clients) if dom_task[c] == t]
        if not clients:
            continue
        wants = [round(dominant * sizes[c]) for c in clients]
        total_want = sum(wants)
        avail = len(pools[t])
        if total_want > avail:
            wants = [w * avail // total_want for w in wants]
        for c, w in zip(clients, wants):
            shards[c].extend(pools[t][:w])
            del pools[t][:w]

    # Phase 2: fill the remaining slots one example at a time, round-robin,
    # preferring non-dominant tasks. Leftovers exactly equal remaining needs.
    needs = [sizes[c] - len(shards[c]) for c in range(n_clients)]
    while any(needs):
        for c in range(n_clients):
            if not needs[c]:
                continue
            others = [t for t in task_order if t != dom_task[c] and pools[t]]
            if others:
                t = max(others, key=lambda k: len(pools[k]))  # ties: first in order
            else:
                t = next(k for k in task_order if pools[k])
            shards[c].append(pools[t].pop())
            needs[c] -= 1

    for shard in shards:
        rng.shuffle(shard)  # so dominant examples are not all at the front
    for c, shard in enumerate(shards):
        counts = Counter(ex["task"] for ex in shard)
        log.debug("client %d: %d examples, tasks %s", c, len(shard), dict(counts))
    return shards


def _check_split_args(examples: Sequence, n_clients) -> None:
    if not is_int(n_clients) or n_clients < 1:
        raise ParameterError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if len(examples) < n_clients:
        raise DataError(f"{len(examples)} examples cannot give each of {n_clients} clients "
                        "at least one")


def split_iid(examples: Sequence[Mapping], n_clients: int, seed: int) -> List[List[Mapping]]:
    """A seeded shuffle cut into ``n_clients`` shards whose sizes differ by at most one."""
    _check_split_args(examples, n_clients)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [[examples[i] for i in part] for part in np.array_split(order, n_clients)]


def _stable_bucket(text: str, buckets: int) -> int:
    # Python's hash() is salted per process; a digest keeps splits reproducible.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                          "little") % buckets


def dirichlet_labels(examples: Sequence[Mapping], key: Union[str, Callable, None] = None,
                     buckets: int = 10) -> List[str]:
    """The class of every example that :func:`split_dirichlet` skews over.

    ``key`` is a field name or a function of the example. ``None`` uses the ``task`` field when
    every example has one, else the instruction text. Data without labels (alpaca, flashcards)
    has near-unique instructions; when a key takes more than ``buckets`` distinct values, the
    classes are ``buckets`` stable-hash buckets of it (arbitrary but reproducible groups).
    fingpt-sentiment's few instruction templates stay classes of their own.
    """
    if key is None:
        key = TASK_FIELD if all(TASK_FIELD in ex for ex in examples) else "instruction"
    if isinstance(key, str):
        field = key
        absent = [i for i, ex in enumerate(examples) if field not in ex]
        if absent:
            raise DataError(f"examples {absent[:5]} have no {field!r} field to split on")
        values = [str(ex[field]) for ex in examples]
    elif callable(key):
        values = [str(key(ex)) for ex in examples]
    else:
        raise ParameterError(f"key must be a field name, a function or None, got {key!r}")
    if not is_int(buckets) or buckets < 1:
        raise ParameterError(f"buckets must be an int >= 1, got {buckets!r}")
    if len(set(values)) > buckets:
        values = [f"bucket{_stable_bucket(v, buckets)}" for v in values]
    return values


def split_dirichlet(examples: Sequence[Mapping], n_clients: int, alpha: float, seed: int,
                    key: Union[str, Callable, None] = None, buckets: int = 10,
                    max_tries: int = 100) -> List[List[Mapping]]:
    """Non-IID split: each class's examples go to clients in Dirichlet(alpha) proportions.

    Classes come from :func:`dirichlet_labels` (``key``, ``buckets``). Small ``alpha`` gives
    each client few classes, large ``alpha`` tends to IID. As in Hsu et al. (2019) and
    FedLab, a client already holding ``len(examples) / n_clients`` examples gets no more of
    the next class, which keeps sizes from running away. Draws repeat (seeded, so the result
    is deterministic) until every client has an example; after ``max_tries`` it raises.
    """
    _check_split_args(examples, n_clients)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ParameterError(f"alpha must be a finite number > 0, got {alpha!r}")
    labels = dirichlet_labels(examples, key, buckets)
    classes = sorted(set(labels))
    by_class = {c: [i for i, lab in enumerate(labels) if lab == c] for c in classes}
    rng = np.random.default_rng(seed)
    n, cap = len(examples), len(examples) / n_clients
    for _ in range(max_tries):
        parts: List[List[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(by_class[c])
            p = rng.dirichlet([alpha] * n_clients)
            p = p * np.array([len(part) < cap for part in parts])
            if p.sum() == 0:  # every client full: spread the rest evenly
                p = np.ones(n_clients)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(int(i) for i in chunk)
        if min(len(part) for part in parts) > 0:
            shards = []
            for part in parts:
                rng.shuffle(part)
                shards.append([examples[i] for i in part])
            log.debug("dirichlet split (alpha=%s, %d classes): sizes %s", alpha, len(classes),
                      [len(s) for s in shards])
            return shards
    raise DataError(f"split_dirichlet: after {max_tries} draws with alpha={alpha}, some of the "
                    f"{n_clients} clients still got no example ({n} examples, {len(classes)} "
                    "classes); use a larger alpha, fewer clients or more data")
