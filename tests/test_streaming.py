"""Streaming aggregation: updates read from disk one at a time, memory flat in clients."""

import tracemalloc

import pytest
import torch

import fedshield as fs


def _write_updates(tmp_path, client_ctx, n_clients):
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.rand(16, 4096, generator=g) * 2 - 1}  # 17 ciphertexts, ~0.37 MB/update
    layout = fs.Layout.from_state_dict(state)
    paths = []
    for i in range(n_clients):
        path = tmp_path / f"update_{i}.bin"
        # the same state each time (the average is the state, easy to check), each its own
        # encryption: a seeded update sent twice would be refused as a replay
        path.write_bytes(fs.encrypt_update(client_ctx, state, layout, weight=1.0,
                                           weight_bound=1.0, workers=1).to_bytes())
        paths.append(path)
    return paths, state, layout


def _peak_bytes_aggregating(server_ctx, paths):
    tracemalloc.start()
    try:
        agg = fs.aggregate(server_ctx, (p.read_bytes() for p in paths))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return agg, peak


def test_memory_does_not_grow_with_clients(tmp_path, shared_keys):
    client, server = shared_keys.client_context(), shared_keys.server_context()
    paths, state, layout = _write_updates(tmp_path, client, 50)
    update_size = paths[0].stat().st_size
    agg10, peak10 = _peak_bytes_aggregating(server, paths[:10])
    agg50, peak50 = _peak_bytes_aggregating(server, paths)
    assert agg10.n_summed == 10 and agg50.n_summed == 50
    # A list-based server would hold 50 updates (~60 MB); streaming holds a few at a time.
    assert peak50 < 4 * update_size
    assert peak50 < peak10 * 1.25 + update_size / 4
    avg = fs.decrypt_update(client, agg50, layout)
    assert torch.allclose(avg["w"].double(), state["w"].double(), atol=1e-6)


def test_generator_is_consumed_lazily(shared_keys):
    client, server = shared_keys.client_context(), shared_keys.server_context()
    state = {"w": torch.ones(3, 3) * 0.5}
    layout = fs.Layout.from_state_dict(state)
    blobs = [fs.encrypt_update(client, state, layout, weight_bound=1.0).to_bytes()
             for _ in range(5)]
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield blobs[i]

    gen = source()
    assert pulled == []  # nothing is read before aggregate asks
    agg = fs.aggregate(server, gen)
    assert pulled == [0, 1, 2, 3, 4] and agg.n_summed == 5


def test_bad_update_in_stream_is_skipped_with_on_reject(shared_keys):
    client, server = shared_keys.client_context(), shared_keys.server_context()
    state = {"w": torch.full((2, 2), 0.25)}
    layout = fs.Layout.from_state_dict(state)
    good, other = (fs.encrypt_update(client, state, layout, weight_bound=1.0).to_bytes()
                   for _ in range(2))
    rejected = []
    agg = fs.aggregate(server, [good, good[:-1], other],
                       on_reject=lambda i, exc: rejected.append((i, type(exc))))
    assert rejected == [(1, fs.InvalidUpdate)] and agg.n_summed == 2
    assert torch.allclose(fs.decrypt_update(client, agg, layout)["w"], state["w"], atol=1e-6)
    with pytest.raises(fs.InvalidUpdate):
        fs.aggregate(server, [good, good[:-1]])
    # the same seeded update twice: refused as a replay, whatever the order
    with pytest.raises(fs.InvalidUpdate, match="seed is already in the sum"):
        fs.aggregate(server, [good, other, good])
