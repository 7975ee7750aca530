"""Encryption and decryption run on the native thread pool: no worker process is started, and
the results do not depend on the (legacy) ``workers`` argument."""

import math
import os

import pytest
import torch

import fedshield as fs


def _children() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def test_threads_not_processes_and_workers_changes_nothing(shared_keys):
    client, server = shared_keys.client_context(), shared_keys.server_context()
    g = torch.Generator().manual_seed(3)
    states = [{"a": torch.rand(8, 4096, generator=g) * 2 - 1,      # 2 + ciphertexts each
               "b": torch.rand(3, 5, generator=g) * 2 - 1} for _ in range(2)]
    layout = fs.Layout.from_state_dict(states[0])
    before = _children()
    ups = [fs.encrypt_update(client, s, layout, weight=w, weight_bound=8.0, workers=2)
           for s, w in zip(states, (3.0, 5.0))]
    assert ups[0].n_ciphertexts == math.ceil((layout.numel + 1) / client.params.ring_dim) > 2
    agg = fs.aggregate(server, ups)
    two = fs.decrypt_update(client, agg, layout, workers=2)
    one = fs.decrypt_update(client, agg, layout, workers=1, threads=1)
    assert _children() == before  # no crypto worker process
    for k in layout.names:
        ref = (3.0 * states[0][k].double() + 5.0 * states[1][k].double()) / 8.0
        assert (two[k].double() - ref).abs().max() <= 1e-6
        assert torch.equal(two[k], one[k])  # decryption is deterministic, threads or not


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_bad_worker_count(shared_keys, workers):
    state = {"w": torch.zeros(2, 2)}
    layout = fs.Layout.from_state_dict(state)
    with pytest.raises(fs.ParameterError, match="workers"):
        fs.encrypt_update(shared_keys.client_context(), state, layout, workers=workers)
