"""How many CPU threads fedshield may use: one setting, FEDSHIELD_NUM_THREADS.

It drives the native module's threads (``threads=0`` in any fedshield call: encryption and
decryption included) and, in fedshield's own training, torch's intra-op threads. Its
default is what this process may really use: the CPUs of its affinity mask, capped by a cgroup
CPU quota and by SLURM_CPUS_PER_TASK, and shared among torchrun's LOCAL_WORLD_SIZE ranks of one
node. Several sites on one machine each get their share (the Flower launcher sets it per site),
so their threads do not fight over cores.

Nothing is cached: every call reads the environment afresh, so two contexts or two sites in one
process never see each other's setting. The native module applies the same rule
(csrc/parallel.hpp, ``native.default_threads()``).
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


def _env_count(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_cpus() -> int:
    """CPUs this process may use: affinity, cgroup quota and SLURM_CPUS_PER_TASK together,
    divided among the LOCAL_WORLD_SIZE ranks torchrun started on this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, quota)
    slurm = _env_count("SLURM_CPUS_PER_TASK")
    if slurm is not None:
        cpus = min(cpus, slurm)
    ranks = _env_count("LOCAL_WORLD_SIZE")
    if ranks is not None:
        cpus //= ranks
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
    """Sets torch's intra-op threads to :func:`num_threads` (fedshield's own training sites
    call this; fs.Party leaves a user's torch settings alone)."""
    import torch  # noqa: PLC0415 - training sites only; the server never imports torch

    n = num_threads()
    torch.set_num_threads(n)
    return n
