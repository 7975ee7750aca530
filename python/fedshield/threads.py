"""How many CPU threads fedshield may use: one setting, FEDSHIELD_NUM_THREADS.

Its default is what this process may really use: the CPUs of its affinity mask, capped by a
cgroup CPU quota and by SLURM_CPUS_PER_TASK. Several sites on one machine each get their share
(the Flower launcher sets it per site), so their training threads do not fight over cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import ParameterError

ENV = "FEDSHIELD_NUM_THREADS"


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup v2 quota (cpu.max), rounded up; None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: affinity, cgroup quota and SLURM_CPUS_PER_TASK together."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)


def num_threads() -> int:
    """FEDSHIELD_NUM_THREADS if set (a positive int), else :func:`available_cpus`."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return available_cpus()
    if not value.isdigit() or int(value) < 1:
        raise ParameterError(f"{ENV}={value!r} must be a positive int")
    return int(value)


def apply_to_torch() -> int:
    """Sets torch's intra-op threads to :func:`num_threads` (training sites call this)."""
    import torch  # noqa: PLC0415 - training sites only; the server never imports torch

    n = num_threads()
    torch.set_num_threads(n)
    return n
