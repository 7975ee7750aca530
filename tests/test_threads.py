"""FEDSHIELD_NUM_THREADS: one setting for native threads (encryption included) and torch;
its default is the CPUs this process may use; measured, encryption never keeps more threads
busy than that; nothing is global."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import native
from fedshield.base.threads import available_cpus, num_threads

from conftest import make_state, weighted_average

TESTS = Path(__file__).parent
CPUS = sorted(os.sched_getaffinity(0))


def _child(code: str, env: dict, cpus: list[int] | None = None, timeout: float = 300) -> dict:
    """Runs ``code`` (which prints one JSON line last) in a fresh interpreter with ``env`` added
    and, optionally, its affinity narrowed to ``cpus``."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("FEDSHIELD_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE",
                         "OMP_NUM_THREADS")}
    full.update(env, PYTHONPATH=str(TESTS))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SETTINGS = """
import json
from fedshield import native
from fedshield.base.threads import num_threads
print(json.dumps([num_threads(), native.default_threads()]))
"""


@pytest.mark.parametrize("env, cpus, expected", [
    ({}, None, len(CPUS)),
    ({}, CPUS[:1], 1),                                        # affinity (taskset, srun binding)
    ({"SLURM_CPUS_PER_TASK": "1"}, None, 1),
    ({"FEDSHIELD_NUM_THREADS": "3"}, None, 3),                # explicit: may exceed the CPUs
    ({"FEDSHIELD_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "1"}, None, 3),
    ({"LOCAL_WORLD_SIZE": "2"}, None, max(1, len(CPUS) // 2)),   # torchrun ranks share a node
    ({"SLURM_CPUS_PER_TASK": "junk"}, None, len(CPUS)),
])
def test_one_setting_for_python_and_native_threads(env, cpus, expected):
    """Python (threads.num_threads) and C++ (native.default_threads, what threads=0 means in
    every native call, encryption and decryption included) apply the same rule."""
    assert _child(SETTINGS, env, cpus) == [expected] * 2


def test_a_bad_setting_names_its_value(monkeypatch):
    monkeypatch.setenv("FEDSHIELD_NUM_THREADS", "two")
    with pytest.raises(fs.ParameterError, match="FEDSHIELD_NUM_THREADS='two'"):
        num_threads()


def test_settings_are_read_on_every_call(monkeypatch):
    """No value is cached at import: a change applies to the next call, native included."""
    monkeypatch.setenv("FEDSHIELD_NUM_THREADS", "5")
    assert (num_threads(), native.default_threads()) == (5, 5)
    monkeypatch.setenv("FEDSHIELD_NUM_THREADS", "1")
    assert (num_threads(), native.default_threads()) == (1, 1)
    monkeypatch.delenv("FEDSHIELD_NUM_THREADS")
    assert num_threads() == available_cpus() == native.default_threads()


BUSY = """
import json, torch, fedshield as fs
from process_sampling import BusyThreads
ctx = fs.keygen_shared().client_context()
torch.manual_seed(0)
state = {"w": torch.rand(1 << 20) - 0.5}          # 257 ciphertexts: every native thread works
layout = fs.Layout.from_state_dict(state)
upd = fs.encrypt_update(ctx, state, layout, weight=3.0, weight_bound=4.0)
with BusyThreads() as busy:  # native encryption is fast: enough rounds for the 20 ms windows
    for _ in range(12):
        upd = fs.encrypt_update(ctx, state, layout, weight=3.0, weight_bound=4.0)
        avg = fs.decrypt_update(ctx, upd, layout)
err = float((avg["w"] - state["w"]).abs().max())
print(json.dumps({"max_busy": busy.max_busy, "windows": len(busy.counts), "err": err}))
"""


@pytest.mark.parametrize("env, cpus, allowed", [
    ({}, CPUS[:2], min(2, len(CPUS))),                 # 2 CPUs allowed (affinity)
    ({"SLURM_CPUS_PER_TASK": "1"}, None, 1),           # a Slurm task of one CPU
    ({"FEDSHIELD_NUM_THREADS": "1"}, None, 1),
])
def test_encryption_never_oversubscribes(env, cpus, allowed):
    """Sampled every 20 ms from /proc (time on a CPU or queued for one, per thread, across the
    process and any child): encrypting and decrypting a 1M-value update keeps at most
    ``allowed`` threads busy."""
    got = _child(BUSY, env, cpus)
    assert got["windows"] >= 10 and got["err"] < 1e-6
    assert 1 <= got["max_busy"] <= allowed, got


def test_two_contexts_in_one_process_never_interfere():
    """Two federations' contexts encrypt and decrypt at the same time from two threads (the
    native calls release the GIL); each gets its own average, and neither decrypts the
    other's updates."""
    keys = [fs.keygen_shared(), fs.keygen_shared()]
    ctxs = [k.client_context() for k in keys]
    states = [make_state(i, {"w": (40_000, 4)}) for i in range(4)]
    layout = fs.Layout.from_state_dict(states[0])
    results: dict[int, object] = {}

    def federation(i: int) -> None:
        try:
            mine = states[2 * i:2 * i + 2]
            ups = [fs.encrypt_update(ctxs[i], s, layout, weight=w, weight_bound=4.0)
                   for s, w in zip(mine, (1.0, 3.0))]
            agg = fs.aggregate(keys[i].server_context(), ups)
            results[i] = (agg, fs.decrypt_update(ctxs[i], agg, layout))
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=federation, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert not isinstance(results[i], Exception), results[i]
        agg, avg = results[i]
        ref = weighted_average(states[2 * i:2 * i + 2], [1.0, 3.0])
        np.testing.assert_allclose(avg["w"].numpy(), ref["w"], atol=1e-6, rtol=0)
        with pytest.raises(fs.IncompatibleUpdate):
            fs.decrypt_update(ctxs[1 - i], agg, layout)


def test_torch_threads_follow_the_setting(monkeypatch):
    from fedshield.base.threads import apply_to_torch

    before = torch.get_num_threads()
    monkeypatch.setenv("FEDSHIELD_NUM_THREADS", "1")
    try:
        assert apply_to_torch() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
