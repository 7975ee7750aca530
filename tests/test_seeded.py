"""Seeded updates (wire v3, shared keys): only c0 and a seed travel; c1 is expanded again.

Checked against OpenFHE's own decryption after a serialize round trip, and against the
plaintext with an explicit tolerance; the expansion's domain separation and uniformity; what
happens to an altered or replayed seed.
"""

from __future__ import annotations

import numpy as np
import pytest

import fedshield as fs
from fedshield import native
from fedshield.he import backend, seeded
from fedshield.he.encryption import rebuild_ciphertexts

from conftest import BITS, RING_DIM, make_state, weighted_average

# Max |error| of one decrypted slot of a sum of <= 3 secret-key encryptions at the default
# scale (measured ~1e-7 at scale 2**34: OpenFHE's encryption noise is ~2**9.5 in slot units).
SLOT_TOL = 1e-6


def openfhe_decrypt(ctx: fs.Context, blobs: list[bytes]) -> np.ndarray:
    """OpenFHE's own path: DeserializeCiphertextString + Decrypt with the secret key, complex
    slots unfolded to reals (complex packing: re, im of each slot)."""
    o = backend.openfhe()
    cc, _, sk = ctx.openfhe_objects(need_secret=True)
    out = []
    for blob in blobs:
        pt = cc.Decrypt(sk, o.DeserializeCiphertextString(blob, o.BINARY))
        pt.SetLength(ctx.params.slots)
        slots = np.asarray(pt.GetCKKSPackedValue(), dtype=np.complex128)
        out.append(np.stack([slots.real, slots.imag], axis=1).ravel())
    return np.concatenate(out)


def packed_reference(states, weights, bound: float) -> np.ndarray:
    """The slots a sum of updates should decrypt to: sum(w/B * x) in layout order, then the
    weight slot sum(w/B)."""
    layout = fs.Layout.from_state_dict(states[0])
    total = sum((w / bound) * np.concatenate([st[s.name].double().numpy().ravel()
                                              for s in layout.specs])
                for st, w in zip(states, weights))
    return np.concatenate([total, [sum(weights) / bound]])


def test_seeded_sum_decrypts_through_openfhe_after_a_round_trip(client_ctx, server_ctx):
    states = [make_state(700 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    weights, bound = [5.0, 1.0, 4.0], 8.0
    blobs = [fs.encrypt_update(client_ctx, s, layout, weight=w, weight_bound=bound,
                               round=3).to_bytes() for s, w in zip(states, weights)]
    for b in blobs:
        assert fs.EncryptedUpdate.from_bytes(b).is_seeded
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server_ctx, blobs).to_bytes())
    assert agg.is_seeded and len(agg.seeds) == 3
    # c1 is nowhere on the wire: the update is c0 (BITS-bit residues) + seeds + header
    n_cts = agg.n_ciphertexts
    assert len(agg.to_bytes()) == 168 + 8 + n_cts * RING_DIM * BITS // 8 + 3 * 32
    ref = packed_reference(states, weights, bound)
    got = openfhe_decrypt(client_ctx, rebuild_ciphertexts(client_ctx, agg))
    assert np.abs(got[:ref.size] - ref).max() <= SLOT_TOL
    assert np.abs(got[ref.size:]).max() <= SLOT_TOL  # the padding slots decrypt to 0
    # and the public path agrees with the plaintext weighted average
    out = fs.decrypt_update(client_ctx, agg, layout)
    want = weighted_average(states, weights)
    assert max(float(np.abs(out[n].double().numpy() - want[n]).max()) for n in want) <= 1e-6


def test_one_seeded_update_decrypts_through_openfhe(client_ctx, small_state, small_layout):
    upd = fs.encrypt_update(client_ctx, small_state, small_layout, weight=3.0, weight_bound=4.0)
    again = fs.EncryptedUpdate.from_bytes(upd.to_bytes())
    got = openfhe_decrypt(client_ctx, rebuild_ciphertexts(client_ctx, again))
    ref = packed_reference([small_state], [3.0], 4.0)
    assert np.abs(got[:ref.size] - ref).max() <= SLOT_TOL


def test_the_expansion_separates_contexts_rounds_seeds_ciphertexts_and_towers():
    moduli = (2**61 - 1, 1152921504606830593)
    seed, fp = bytes(range(32)), bytes(32)
    a = seeded.expand(seed, fp, 1, 2, moduli, 1024)
    assert a.shape == (2 * 2 * 1024,) and a.dtype == np.uint64
    assert np.array_equal(a, seeded.expand(seed, fp, 1, 2, moduli, 1024))  # deterministic
    blocks = a.reshape(4, 1024)
    for i in range(4):
        assert (blocks[i] < moduli[i % 2]).all()
        for j in range(i):
            assert not np.array_equal(blocks[i], blocks[j])
    for other in (seeded.expand(bytes(31) + b"\1", fp, 1, 2, moduli, 1024),
                  seeded.expand(seed, b"\1" + bytes(31), 1, 2, moduli, 1024),
                  seeded.expand(seed, fp, 2, 2, moduli, 1024)):
        assert (other != a).mean() > 0.99


def test_the_expansion_is_uniform_mod_q():
    # A modulus just above a power of two: half the masked words are rejected, and a biased
    # reduction (x mod q) would pile up below 2**k - q.
    q = 2**40 + 15
    a = seeded.expand(seeded.new_seed(), bytes(32), 0, 16, (q,), 4096).astype(np.float64) / q
    assert (a < 1).all()
    counts, _ = np.histogram(a, bins=16, range=(0.0, 1.0))
    expected = a.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50, counts  # 15 degrees of freedom: p < 1e-5 for a uniform sample
    assert abs(a.mean() - 0.5) < 0.01


def test_expand_sum_adds_mod_q():
    q = 2**40 + 15
    seeds = [seeded.new_seed() for _ in range(3)]
    total = seeded.expand_sum(seeds, bytes(32), 5, 2, (q,), 1024)
    ref = sum(seeded.expand(s, bytes(32), 5, 2, (q,), 1024).astype(object) for s in seeds)
    assert np.array_equal(total.astype(object), ref % q)


def test_sample_uniform_rejects_bad_input():
    q = 2**40 + 15
    with pytest.raises(ValueError):
        native.sample_uniform(b"\0" * 12, q, 4)  # not whole 8-byte words
    # a stream too short to fill the polynomial: None, so the caller draws more
    assert native.sample_uniform(b"\xff" * 64, q, 8) is None
    with pytest.raises(fs.InvalidUpdate, match="seed"):
        seeded.expand(b"short", bytes(32), 0, 1, (q,), 1024)


def test_an_altered_seed_is_refused_at_decryption(client_ctx, server_ctx, small_layout):
    """Without signatures nothing authenticates a seed; an altered one (checksum rewritten,
    as an attacker on the path would) decrypts to noise far outside the weight range, and
    decryption refuses it instead of returning it. That is a detector, not a guarantee
    (docs/WIRE.md: the noise lands inside the range with a probability of about n/8500, and a
    CI run once saw it happen), so 30 alterations may let at most 2 through (expected: 0.01;
    at that rate 3 or more happen once in ~10^5 runs). Signed records (tests/test_guard.py)
    refuse every one."""
    states = [make_state(720 + i) for i in range(3)]
    refused = 0
    for trial in range(10):
        agg = fs.aggregate(server_ctx, [fs.encrypt_update(client_ctx, s, small_layout,
                                                          weight=2.0, weight_bound=2.0)
                                        for s in states])
        data, header = agg.to_bytes(), agg.header
        body_len = header["payload_len"] + 32 * len(agg.seeds)
        for flip in (1, 40, 95):  # a bit in the last, the second, the first seed
            body = bytearray(data[-8 - body_len:-8])
            body[-flip] ^= 0x10
            forged = fs.EncryptedUpdate.from_bytes(native.encode_update(header, bytes(body)))
            try:
                fs.decrypt_update(client_ctx, forged, small_layout)
            except fs.InvalidUpdate as exc:
                assert "altered after encryption" in str(exc)
                refused += 1
    assert refused >= 28, refused
    # the checksum alone catches an alteration that does not rewrite it
    with pytest.raises(fs.InvalidUpdate, match="checksum"):
        fs.EncryptedUpdate.from_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])


def test_duplicate_and_replayed_seeds_are_refused(client_ctx, server_ctx, small_state,
                                                   small_layout):
    upd = fs.encrypt_update(client_ctx, small_state, small_layout, weight=1.0, weight_bound=1.0)
    with pytest.raises(fs.InvalidUpdate, match="seed"):
        fs.aggregate(server_ctx, [upd, upd])
    agg = fs.aggregate(server_ctx, [upd, fs.encrypt_update(client_ctx, small_state, small_layout,
                                                           weight=1.0, weight_bound=1.0)])
    # an aggregate whose seed list names one seed twice does not parse
    data, header = agg.to_bytes(), agg.header
    body = bytearray(data[-8 - header["payload_len"] - 64:-8])
    body[-32:] = body[-64:-32]
    with pytest.raises(fs.InvalidUpdate, match="seed"):
        fs.EncryptedUpdate.from_bytes(native.encode_update(header, bytes(body)))


def test_seeded_and_unseeded_updates_never_mix(client_ctx, server_ctx, unseeded_keys,
                                               small_state, small_layout):
    plain = fs.encrypt_update(unseeded_keys.client_context(), small_state, small_layout)
    assert not plain.is_seeded and plain.seeds == ()
    with pytest.raises(fs.IncompatibleUpdate):
        fs.aggregate(server_ctx, [plain])
