"""Sites of very different sizes through the documented calls, with no weight bound passed:
the raw API and fs.Party, shared keys, threshold keys and threshold keys with flooding, each
against plaintext FedAvg at 1e-6 after a serialize -> load round trip.

At default parameters (fs.CKKSParams(), max_weight=10**6) every update encrypted without a
bound is pre-divided by the same default bound, 2**20, and the profiles are sized for the worst
weight mix it allows. Parameters with max_weight=0 (what the engines use: their Server sends
each round's bound) keep each weight's own bound: mixing bounds there is refused, saying what
to pass."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fedshield as fs
from fedshield.training.lora import get_lora_state
from conftest import make_state, weighted_average
from rank_site import tiny_peft, train_steps

WEIGHTS = (120.0, 45.0, 30000.0)
# the contract's extremes: weights 1 and 10**6 side by side, and sites of weight 1 only
EXTREMES = {"sites": WEIGHTS, "extremes": (1.0, 1e6, 1.0), "ones": (1.0, 1.0, 1.0)}
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


@pytest.mark.parametrize("which", list(EXTREMES))
def test_shared_keys_raw_api(states, shared_keys, which):
    weights = EXTREMES[which]
    client, server = shared_keys.client_context(), shared_keys.server_context()
    server = fs.load_context(server.to_bytes())
    layout = fs.Layout.from_state_dict(states[0])
    wire = [fs.encrypt_update(client, s, layout, weight=w).to_bytes()
            for s, w in zip(states, weights)]
    agg = fs.aggregate(server, (fs.EncryptedUpdate.from_bytes(b) for b in wire))
    agg = fs.EncryptedUpdate.from_bytes(agg.to_bytes())
    assert agg.header["weight_bound"] == client.params.default_weight_bound == 2.0 ** 20
    out = fs.decrypt_update(client, agg, layout)
    assert _max_error(out, weighted_average(states, list(weights))) <= TOLERANCE


@pytest.mark.parametrize("mode, which", [("threshold", "sites"), ("threshold", "extremes"),
                                         ("threshold", "ones"), ("flooded", "sites")])
def test_threshold_keys_raw_api(states, threshold_sets, mode, which):
    weights = EXTREMES[which]
    parties, server = threshold_sets[mode]
    assert not server.params.seeded and server.params.flooding == (mode == "flooded")
    layout = fs.Layout.from_state_dict(states[0])
    updates = [fs.encrypt_update(p, s, layout, weight=w).to_bytes()
               for p, s, w in zip(parties, states, weights)]
    agg = fs.aggregate(fs.load_context(server.to_bytes()), updates)
    agg = fs.EncryptedUpdate.from_bytes(agg.to_bytes())
    shares = [fs.partial_decrypt(p, agg) for p in parties]
    out = fs.combine_partials(agg, shares, layout, ctx=parties[0])
    assert _max_error(out, weighted_average(states, list(weights))) <= TOLERANCE


@pytest.mark.parametrize("mode", ["shared", "threshold"])
def test_party_in_a_plain_loop(shared_keys, threshold_sets, mode):
    """Three fs.Party sites, one round, no bound passed: each model ends at the
    example-weighted average of the sites' LoRA weights."""
    if mode == "shared":
        contexts = [shared_keys.client_context()] * 3
        server = shared_keys.server_context()
    else:
        contexts, server = threshold_sets["threshold"]
    models = [tiny_peft() for _ in WEIGHTS]
    parties = [fs.Party(c, m) for c, m in zip(contexts, models)]
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


def test_a_weight_above_the_default_bound_is_refused_with_what_to_pass(states, shared_keys):
    client = shared_keys.client_context()
    layout = fs.Layout.from_state_dict(states[0])
    with pytest.raises(fs.ParameterError, match=r"weight=2000000.0 is above 1.04858e\+06, the "
                                                r"default weight bound .*max_weight=1000000.*"
                                                r"weight_bound="):
        fs.encrypt_update(client, states[0], layout, weight=2e6)
    # an explicit bound still works, and is checked as before
    upd = fs.encrypt_update(client, states[0], layout, weight=2e6, weight_bound=2.0 ** 21)
    assert upd.header["weight_bound"] == 2.0 ** 21
    with pytest.raises(fs.ParameterError, match="weight=30000.0 must be in"):
        fs.encrypt_update(client, states[2], layout, weight=30000.0, weight_bound=128.0)


def test_explicit_parameters_too_small_for_their_max_weight_are_refused_before_sending(states):
    """max_weight=10**6 on the engines' 42-bit profile: weight 1 at the bound 2**20 cannot keep
    1e-6, so encryption refuses, naming what to do."""
    small = dataclasses.replace(fs.CKKSParams.for_precision(max_weight=0), max_weight=10 ** 6)
    client = fs.keygen_shared(small).client_context()
    layout = fs.Layout.from_state_dict(states[0])
    with pytest.raises(fs.ParameterError, match=r"default weight bound 1.04858e\+06 .*not "
                                                r"within tolerance=1e-06"):
        fs.encrypt_update(client, states[0], layout, weight=1.0)
    # with the round's bound passed, the same parameters are fine
    fs.encrypt_update(client, states[0], layout, weight=1.0, weight_bound=1.0)


def test_with_max_weight_0_updates_of_different_bounds_are_refused_with_what_to_pass(states):
    """max_weight=0 (the engines' profile): with no bound each update takes its weight's next
    power of two (128, 64, 32768); one aggregate cannot sum them, and the error says what to
    pass instead."""
    keys = fs.keygen_shared(fs.CKKSParams.for_precision(max_weight=0))
    client, server = keys.client_context(), keys.server_context()
    assert client.params.default_weight_bound is None
    layout = fs.Layout.from_state_dict(states[0])
    updates = [fs.encrypt_update(client, s, layout, weight=w) for s, w in zip(states, WEIGHTS)]
    assert [u.header["weight_bound"] for u in updates] == [128.0, 64.0, 32768.0]
    with pytest.raises(fs.IncompatibleUpdate, match=r"weight_bound 64 differs from 128: .*"
                                                    r"weight_bound= the round's"):
        fs.aggregate(server, updates)
