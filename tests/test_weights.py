"""Sites of very different sizes (120, 45 and 30,000 examples) through the documented calls:
the raw API and fs.Party, shared keys, threshold keys and threshold keys with flooding, each
against plaintext FedAvg at 1e-6 after a serialize -> load round trip.

What one aggregate cannot do is mix weight bounds: each update's values are pre-divided by its
bound, and dividing a ciphertext mod a prime by a power of two is no exact operation, so the
sites of a round pass one bound (fedshield's Server sends it). Without one, the aggregation
refuses and says what to pass."""

from __future__ import annotations

import numpy as np
import pytest

import fedshield as fs
from fedshield.training.lora import get_lora_state
from conftest import make_state, weighted_average
from rank_site import tiny_peft, train_steps

WEIGHTS = (120.0, 45.0, 30000.0)
BOUND = 32768.0      # the round's: the next power of two of its largest weight
TOLERANCE = 1e-6


def _max_error(out: dict, reference: dict) -> float:
    return max(float(np.abs(out[n].double().numpy() - np.asarray(r, dtype=np.float64)).max())
               for n, r in reference.items())


@pytest.fixture(scope="module")
def states():
    return [make_state(200 + i) for i in range(3)]


@pytest.fixture(scope="module")
def threshold_sets():
    """fs.keygen_threshold(fs.CKKSParams(), n_parties=3) and with flood_bits=30: precision
    requests each keygen resolves for threshold keys."""
    return {"threshold": fs.keygen_threshold(fs.CKKSParams(), n_parties=3),
            "flooded": fs.keygen_threshold(fs.CKKSParams(flood_bits=30), n_parties=3)}


def test_shared_keys_raw_api(states, shared_keys):
    client, server = shared_keys.client_context(), shared_keys.server_context()
    server = fs.load_context(server.to_bytes())
    layout = fs.Layout.from_state_dict(states[0])
    wire = [fs.encrypt_update(client, s, layout, weight=w, weight_bound=BOUND).to_bytes()
            for s, w in zip(states, WEIGHTS)]
    agg = fs.aggregate(server, (fs.EncryptedUpdate.from_bytes(b) for b in wire))
    agg = fs.EncryptedUpdate.from_bytes(agg.to_bytes())
    out = fs.decrypt_update(client, agg, layout)
    assert _max_error(out, weighted_average(states, list(WEIGHTS))) <= TOLERANCE


@pytest.mark.parametrize("mode", ["threshold", "flooded"])
def test_threshold_keys_raw_api(states, threshold_sets, mode):
    parties, server = threshold_sets[mode]
    assert not server.params.seeded and server.params.flooding == (mode == "flooded")
    layout = fs.Layout.from_state_dict(states[0])
    updates = [fs.encrypt_update(p, s, layout, weight=w, weight_bound=BOUND).to_bytes()
               for p, s, w in zip(parties, states, WEIGHTS)]
    agg = fs.aggregate(fs.load_context(server.to_bytes()), updates)
    agg = fs.EncryptedUpdate.from_bytes(agg.to_bytes())
    shares = [fs.partial_decrypt(p, agg) for p in parties]
    out = fs.combine_partials(agg, shares, layout, ctx=parties[0])
    assert _max_error(out, weighted_average(states, list(WEIGHTS))) <= TOLERANCE


@pytest.mark.parametrize("mode", ["shared", "threshold"])
def test_party_in_a_plain_loop(shared_keys, threshold_sets, mode):
    """Three fs.Party sites, one round: each model ends at the example-weighted average of
    the sites' LoRA weights."""
    if mode == "shared":
        contexts = [shared_keys.client_context()] * 3
        server = shared_keys.server_context()
    else:
        contexts, server = threshold_sets["threshold"]
    models = [tiny_peft() for _ in WEIGHTS]
    parties = [fs.Party(c, m, weight_bound=BOUND) for c, m in zip(contexts, models)]
    local = []
    for i, model in enumerate(models):
        train_steps(model, seed=300 + i, steps=1)
        local.append(get_lora_state(model))
    agg = fs.aggregate(fs.load_context(server.to_bytes()),
                       [p.encrypt_update(weight=w).to_bytes() for p, w in zip(parties, WEIGHTS)])
    shares = None if mode == "shared" else [p.partial_decrypt(agg) for p in parties]
    reference = weighted_average(local, list(WEIGHTS))
    for party, model in zip(parties, models):
        party.apply_aggregate(agg.to_bytes(), shares=shares)
        assert _max_error(get_lora_state(model), reference) <= TOLERANCE


def test_updates_of_different_bounds_are_refused_with_what_to_pass(states, shared_keys):
    """With no bound each update takes its weight's next power of two (128, 64, 32768): one
    aggregate cannot sum them, and the error says what to pass instead."""
    client, server = shared_keys.client_context(), shared_keys.server_context()
    layout = fs.Layout.from_state_dict(states[0])
    updates = [fs.encrypt_update(client, s, layout, weight=w) for s, w in zip(states, WEIGHTS)]
    assert [u.header["weight_bound"] for u in updates] == [128.0, 64.0, 32768.0]
    with pytest.raises(fs.IncompatibleUpdate, match=r"weight_bound 64 differs from 128: .*"
                                                    r"weight_bound= the round's"):
        fs.aggregate(server, updates)
    with pytest.raises(fs.ParameterError, match="weight=30000.0 must be in"):
        fs.encrypt_update(client, states[2], layout, weight=30000.0, weight_bound=128.0)
