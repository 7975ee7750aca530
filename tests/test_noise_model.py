"""The noise model that sizes every profile (fedshield.he.params.slot_noise_std) against the
noise the encryptions and decryptions really carry: encrypting zeros leaves the noise alone in
each decrypted value, so its spread is measured directly and compared with the model's.

The model must not under-estimate (the profiles would then miss the tolerance, as a CI run did
when the model was a measured maximum) nor be loose (the wire pays for every bit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield.he.params import OUTPUT_ROUNDING, PRECISION_SIGMAS, slot_noise_std

N_VALUES = 1 << 16  # 8 ciphertexts at N=8192: the spread is measured within about 1%
NAME = "a.lora_A.weight"


def _zeros() -> dict[str, torch.Tensor]:
    return {NAME: torch.zeros(N_VALUES // 8, 8)}


def _spread_in_scale_units(out: dict, params: fs.CKKSParams, weight_sum: float) -> float:
    """The standard deviation of the decrypted values' error in units of 2**-scale: the
    average divides the summed noise by sum(w) / weight_bound."""
    error = np.asarray(out[NAME], dtype=np.float64).ravel()
    return float(error.std()) * 2.0 ** params.effective_scale_bits * weight_sum


def test_shared_key_noise_matches_the_model(shared_keys):
    ctx = shared_keys.client_context()
    params, state = ctx.params, _zeros()
    layout = fs.Layout.from_state_dict(state)
    update = fs.EncryptedUpdate.from_bytes(fs.encrypt_update(ctx, state, layout).to_bytes())
    out = fs.decrypt_update(ctx, update, layout)
    measured = _spread_in_scale_units(out, params, 1.0 / params.default_weight_bound)
    model = slot_noise_std(1, seeded=True, ring_dim=params.ring_dim)
    assert 0.95 * model <= measured <= 1.05 * model, (measured, model)
    # the largest error stays below the PRECISION_SIGMAS bound the profile is sized by
    assert np.abs(np.asarray(out[NAME])).max() <= params.average_error_bound(
        1, 1.0 / params.default_weight_bound)


def test_threshold_noise_matches_the_model():
    parties, server = fs.keygen_threshold(fs.CKKSParams(), n_parties=3)
    params, state = server.params, _zeros()
    layout = fs.Layout.from_state_dict(state)
    updates = [fs.encrypt_update(p, state, layout, weight=1.0).to_bytes() for p in parties[:2]]
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server, updates).to_bytes())
    out = fs.combine_partials(agg, [fs.partial_decrypt(p, agg) for p in parties], layout,
                              ctx=parties[0])
    weight_sum = 2.0 / params.default_weight_bound
    measured = _spread_in_scale_units(out, params, weight_sum)
    model = slot_noise_std(2, seeded=False, decryptors=3, ring_dim=params.ring_dim)
    assert 0.95 * model <= measured <= 1.05 * model, (measured, model)
    assert np.abs(np.asarray(out[NAME])).max() <= params.average_error_bound(2, weight_sum, 3)


@pytest.mark.parametrize("keys", ["shared", "threshold"])
def test_the_bound_is_the_spread_at_precision_sigmas_plus_float32_rounding(keys):
    p = fs.CKKSParams.for_precision(keys=keys, max_weight=0)
    decryptors = 0 if p.seeded else 3
    std = slot_noise_std(4, seeded=p.seeded, decryptors=decryptors, ring_dim=p.ring_dim)
    assert math.isclose(p.average_error_bound(4, 0.5, decryptors),
                        PRECISION_SIGMAS * std / 2.0 ** p.effective_scale_bits / 0.5
                        + OUTPUT_ROUNDING)
