"""Synthetic instruction data: five generated tasks, built locally (nothing is downloaded)."""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    # Random letter strings rather than a word list: unlimited, no bundled data.
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _task_reverse(rng: random.Random):
    w = _word(rng)
    return "Reverse the word.", w, w[::-1]


def _task_uppercase(rng: random.Random):
    w = _word(rng)
    return "Uppercase the word.", w, w.upper()


def _task_add(rng: random.Random):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _task_sort(rng: random.Random):
    w = _word(rng)
    return "Sort the letters.", w, "".join(sorted(w))


def _task_repeat(rng: random.Random):
    w = _word(rng)
    return "Repeat the word twice.", w, f"{w} {w}"


TASKS: Dict[str, Callable[[random.Random], tuple]] = {
    "reverse": _task_reverse,
    "uppercase": _task_uppercase,
    "add": _task_add,
    "sort": _task_sort,
    "repeat": _task_repeat,
}


def make_synthetic_examples(
    n: int, seed: int, tasks: Optional[Sequence[str]] = None
) -> List[Dict[str, str]]:
    """Return ``n`` examples (keys instruction, input, output, task).

    Tasks are cycled in order so every task is equally represented; the
    content is drawn from ``random.Random(seed)`` so it is deterministic and
    never touches the global RNG.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    names = list(TASKS) if tasks is None else list(tasks)
    if not names:
        raise ValueError(f"tasks must be non-empty, got {tasks!r}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        instruction, inp, output = TASKS[task](rng)
        out.append({"instruction": instruction, "input": inp, "output": output, "task": task})
    return out
