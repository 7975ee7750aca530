"""Encryption/decryption in worker processes gives the same results as in-process."""

import math

import pytest
import torch

import fedshield as fs


def test_two_workers_match_plaintext_and_single_process(shared_keys):
    client, server = shared_keys.client_context(), shared_keys.server_context()
    g = torch.Generator().manual_seed(3)
    states = [{"a": torch.rand(8, 4096, generator=g) * 2 - 1,      # 2 + ciphertexts each
               "b": torch.rand(3, 5, generator=g) * 2 - 1} for _ in range(2)]
    layout = fs.Layout.from_state_dict(states[0])
    ups = [fs.encrypt_update(client, s, layout, weight=w, weight_bound=8.0, workers=2)
           for s, w in zip(states, (3.0, 5.0))]
    assert ups[0].n_ciphertexts == math.ceil((layout.numel + 1) / client.params.ring_dim) > 2
    agg = fs.aggregate(server, ups)
    parallel = fs.decrypt_update(client, agg, layout, workers=2)
    single = fs.decrypt_update(client, agg, layout, workers=1)
    for k in layout.names:
        ref = (3.0 * states[0][k].double() + 5.0 * states[1][k].double()) / 8.0
        assert (parallel[k].double() - ref).abs().max() <= 1e-6
        assert torch.equal(parallel[k], single[k])  # decryption is deterministic


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_bad_worker_count(shared_keys, workers):
    state = {"w": torch.zeros(2, 2)}
    layout = fs.Layout.from_state_dict(state)
    with pytest.raises(fs.ParameterError, match="workers"):
        fs.encrypt_update(shared_keys.client_context(), state, layout, workers=workers)


def test_dead_worker_is_reported(shared_keys):
    client = fs.load_context(shared_keys.client_context().to_bytes(include_secret=True))
    state = {"w": torch.zeros(4, 16384)}
    layout = fs.Layout.from_state_dict(state)
    fs.encrypt_update(client, state, layout, workers=2)
    pool = client.crypto_pool(2, need_secret=True)  # seeded: the workers encrypt with the key
    assert len(pool._workers) == 1    # this process takes the other share itself
    pool._workers[0].proc.kill()
    pool._workers[0].proc.wait()
    with pytest.raises(fs.FedShieldError, match="died"):
        fs.encrypt_update(client, state, layout, workers=2)
    # The broken pool is replaced on the next call.
    upd = fs.encrypt_update(client, state, layout, workers=2)
    assert client.crypto_pool(2, need_secret=True) is not pool
    assert upd.n_ciphertexts == math.ceil((4 * 16384 + 1) / client.params.ring_dim)


def test_dropped_pool_leaves_no_processes(shared_keys):
    import gc

    from fedshield.he.crypto_pool import CryptoPool

    ctx = shared_keys.client_context()
    pool = CryptoPool(ctx.to_bytes(), ctx.params, 3, local=None)
    procs = [w.proc for w in pool._workers]
    assert all(p.poll() is None for p in procs)
    del pool
    gc.collect()
    for p in procs:
        assert p.wait(timeout=20) is not None  # closed with the pool, not at interpreter exit


def test_failed_pool_start_kills_started_workers(shared_keys):
    from fedshield.he.crypto_pool import CryptoPool

    ctx = shared_keys.client_context()
    with pytest.raises(fs.FedShieldError, match="crypto worker"):
        CryptoPool(b"not a context", ctx.params, 2, local=None)  # the worker's init fails
