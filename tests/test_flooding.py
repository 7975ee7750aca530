"""Noise flooding of decryptions (IND-CPA^D): the native NTT and sampler, the multi-tower
contexts it runs on, and the flooding noise every decryption that leaves a key holder carries
(shared-key decrypt_update, threshold partial decryptions), against the prediction of
fedshield.he.flooding."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import _native
from fedshield.he import flooding

from conftest import make_state, weighted_average

# A small NTT-friendly prime for the unit tests of the transform: 2N | q - 1 for N <= 2048.
SMALL_Q = 12289
FLOOD = fs.CKKSParams.for_precision(flood_bits=30)  # shared keys: 3 towers at N = 16384
# the towers of the flooding profiles, for parameters built by hand below
TOWERS = dict(ring_dim=16384, first_mod_bits=60, scale_bits=50)


def _psi(n: int, q: int = SMALL_Q) -> int:
    """A primitive 2n-th root of unity mod q (11 generates Z_12289^*)."""
    psi = pow(11, (q - 1) // (2 * n), q)
    assert pow(psi, n, q) == q - 1
    return psi


def _bitrev(j: int, bits: int) -> int:
    return int(format(j, f"0{bits}b")[::-1], 2) if bits else 0


def _reference_ntt(coeffs: list[int], q: int, psi: int) -> list[int]:
    """out[j] = f(psi^(2 * bitrev(j) + 1)) mod q: the order OpenFHE stores (see csrc/flood.hpp)."""
    n = len(coeffs)
    bits = n.bit_length() - 1
    return [sum(c * pow(psi, (2 * _bitrev(j, bits) + 1) * i, q) for i, c in enumerate(coeffs)) % q
            for j in range(n)]


def _inverse_ntt(values: list[int], q: int, psi: int) -> list[int]:
    n = len(values)
    bits = n.bit_length() - 1
    inv_n, inv_psi = pow(n, q - 2, q), pow(psi, q - 2, q)
    return [inv_n * sum(v * pow(inv_psi, (2 * _bitrev(j, bits) + 1) * i, q)
                        for j, v in enumerate(values)) % q for i in range(n)]


def _centered(v: int, q: int) -> int:
    return v - q if v > q // 2 else v


# -- the native transform and sampler --------------------------------------------------------

@pytest.mark.parametrize("n", [2, 8, 64])
def test_ntt_matches_the_reference_order(n):
    rng = np.random.default_rng(n)
    psi = _psi(n)
    coeffs = rng.integers(0, SMALL_Q, size=n, dtype=np.uint64)
    got = _native.ntt_forward(coeffs, SMALL_Q, psi)
    assert got.tolist() == _reference_ntt(coeffs.tolist(), SMALL_Q, psi)
    assert coeffs.tolist() == _inverse_ntt(got.tolist(), SMALL_Q, psi)  # input left untouched


def test_ntt_rejects_bad_arguments():
    a = np.zeros(8, dtype=np.uint64)
    with pytest.raises(fs.InvalidUpdate, match="root"):
        _native.ntt_forward(a, SMALL_Q, 1)
    with pytest.raises(fs.InvalidUpdate, match="root"):
        _native.ntt_forward(a, SMALL_Q, _psi(16))  # a 32nd root is not primitive 16th
    with pytest.raises(fs.InvalidUpdate, match="power of two"):
        _native.ntt_forward(np.zeros(6, dtype=np.uint64), SMALL_Q, _psi(8))


def _flooded_coefficients(n, moduli, width, samples):
    """Floods a zero polynomial `samples` times; returns the integer coefficients per tower."""
    roots = [_psi(n, q) for q in moduli]
    per_tower = [[] for _ in moduli]
    for _ in range(samples):
        blob = bytearray()
        offsets = []
        for _q in moduli:
            blob += n.to_bytes(8, "little")
            offsets.append(len(blob))
            blob += bytes(8 * n)
        _native.flood_residues(blob, offsets, list(moduli), roots, n, *flooding.split_width(width))
        for t, (q, off) in enumerate(zip(moduli, offsets)):
            values = np.frombuffer(bytes(blob), dtype="<u8", count=n, offset=off).tolist()
            per_tower[t] += [_centered(v, q) for v in _inverse_ntt(values, q, roots[t])]
    return per_tower


def test_flooding_is_one_uniform_integer_polynomial_in_every_tower():
    # two NTT-friendly primes for n = 16 (2n | q - 1), 11 generating both groups
    moduli, width, n = (SMALL_Q, 40961), 1000, 16
    assert all(pow(11, (q - 1) // 2, q) == q - 1 for q in moduli)
    tower0, tower1 = _flooded_coefficients(n, moduli, width, 200)
    # the same integers in both towers (one polynomial, reduced mod each prime)
    assert tower0 == tower1
    f = np.array(tower0)
    assert f.min() >= -width and f.max() <= width
    # uniform on [-W, W]: mean 0, variance W(W+1)/3, both ends reached
    assert abs(f.mean()) < 4 * width / np.sqrt(3 * f.size)
    assert abs(f.var() / (width * (width + 1) / 3) - 1) < 0.1
    assert f.min() < -0.95 * width and f.max() > 0.95 * width
    # fresh randomness every call
    again = _flooded_coefficients(n, moduli, width, 1)[0]
    assert again != tower0[:n]


def test_flood_residues_rejects_bad_arguments():
    n, q = 8, SMALL_Q
    good = bytearray(n.to_bytes(8, "little") + bytes(8 * n))
    psi = _psi(n)
    with pytest.raises(fs.InvalidUpdate, match="root"):
        _native.flood_residues(good, [8], [q], [2], n, 0, 5)
    with pytest.raises(fs.InvalidUpdate, match="2\\^126"):
        _native.flood_residues(good, [8], [q], [psi], n, 2**62, 0)
    bad = bytearray(good)
    bad[8:16] = q.to_bytes(8, "little")  # a residue not below q
    with pytest.raises(fs.InvalidUpdate, match="below"):
        _native.flood_residues(bad, [8], [q], [psi], n, 0, 5)
    with pytest.raises(ValueError, match="outside|ring_dim"):
        _native.flood_residues(good, [16], [q], [psi], n, 0, 5)
    with pytest.raises((ValueError, BufferError), match="writable"):
        _native.flood_residues(bytes(good), [8], [q], [psi], n, 0, 5)
    with pytest.raises(ValueError, match="one offset per tower"):
        _native.flood_residues(good, [8, 8], [q], [psi], n, 0, 5)
    for modulus in (0, 1, 2**62 + 1):
        with pytest.raises(fs.InvalidUpdate, match="modulus"):
            _native.flood_residues(good, [8], [modulus], [psi], n, 0, 5)
    with pytest.raises(fs.InvalidUpdate, match="one modulus and one root"):
        _native.flood_residues(good, [8], [q], [], n, 0, 5)


# -- parameters -------------------------------------------------------------------------------

def test_flooding_parameters():
    plain = fs.CKKSParams()
    assert not plain.flooding and plain.n_towers == 1 and plain.prescale_bits == 0
    assert "flood" not in plain.to_json()  # unchanged JSON and fingerprints without flooding
    p = FLOOD
    assert p.flooding and p.n_towers == 3 and p.value_bound == 4.0
    assert p.effective_scale_bits == p.log_q_min - 2 - 8  # Q/4 holds 64 clients of |x| <= 4
    assert fs.CKKSParams.from_dict(json.loads(p.to_json())) == p
    assert p.fingerprint() != plain.fingerprint()
    for bad in (1, 19, 65, -1):
        with pytest.raises(fs.ParameterError, match="flood_bits"):
            fs.CKKSParams(flood_bits=bad)
    with pytest.raises(fs.ParameterError, match="flood_log_queries"):
        fs.CKKSParams(flood_bits=30, flood_log_queries=41)
    with pytest.raises(fs.ParameterError, match="security|ring_dim"):  # 3 towers: N = 16384
        fs.CKKSParams(**{**TOWERS, "ring_dim": 8192}, flood_bits=30)
    # the flooding must fit its quarter of Q: 64 bits of security for 5 parties at scale 2**30
    # does not
    with pytest.raises(fs.ParameterError, match="flood"):
        flooding.flood_width(fs.CKKSParams(**{**TOWERS, "scale_bits": 30}, flood_bits=64), 5)


def test_keygen_refuses_flooding_that_costs_more_than_1e6():
    # scale 2**30 towers: 64 bits of security leave an error far above 1e-6 (the flooding
    # itself still fits Q/4 for one key holder)
    p = fs.CKKSParams(**{**TOWERS, "scale_bits": 40}, flood_bits=64)
    flooding.flood_width(p, 1)
    assert 6 * flooding.slot_error_std(p, 1) > 1e-6
    with pytest.raises(fs.ParameterError, match="1e-06"):
        fs.keygen_shared(p)
    with pytest.raises(fs.ParameterError, match="1e-06"):
        fs.keygen_threshold(dataclasses.replace(p, seeded=False), 3)
    for bits in (20, 30, 40, 50, 64):  # every level at the flooding profiles' scales passes
        for n_parties in (1, 3, 5, 16):
            flooding.check_precision(fs.CKKSParams(**TOWERS, flood_bits=bits), n_parties)
            flooding.check_precision(fs.CKKSParams(**{**TOWERS, "scale_bits": 52},
                                                   flood_bits=bits), n_parties)


def test_stated_bound_arithmetic():
    """W = 2^(lambda+1) * N * Q * B, B = tau * t: the numbers docs/THREAT_MODEL.md states."""
    b = flooding.noise_bound(FLOOD, 1)
    tau = flooding.ERROR_SIGMA * np.sqrt(64 * (2 * 16384 + 1))
    t = np.sqrt(2 * np.log(2) * (30 + 2 + 14 + 20))
    assert b == int(np.ceil(tau * t))
    assert flooding.flood_width(FLOOD, 1) == 2**31 * 16384 * 2**20 * b
    assert flooding.noise_bound(FLOOD, 5) > b  # more key holders, larger key and pk error
    # statistical distance over N * Q coefficients: N * Q * B / (2W) = 2^-(lambda + 2)
    w = flooding.flood_width(FLOOD, 1)
    assert 16384 * 2**20 * b / (2 * w) == 2.0 ** -32


# -- end to end: shared keys ------------------------------------------------------------------

@pytest.fixture(scope="module")
def flood_keys():
    return fs.keygen_shared(FLOOD)


def test_flooding_context_has_three_towers(flood_keys):
    ctx = flood_keys.client_context()
    assert len(ctx.moduli) == 3 and ctx.moduli[0] == ctx.modulus
    assert ctx.moduli[0].bit_length() == 60
    assert all(abs(np.log2(q) - 50) < 1e-3 for q in ctx.moduli[1:])  # primes next to 2**50
    product = ctx.moduli[0] * ctx.moduli[1] * ctx.moduli[2]
    assert product.bit_length() - 1 >= FLOOD.log_q_min  # the bound the headroom relies on
    layout = ctx.ciphertext_template[1]
    assert len(layout) == 2 + 3 * 3 and tuple(layout[1:4]) == ctx.moduli
    for q, root in zip(ctx.moduli, ctx.tower_roots):
        assert pow(root, 16384, q) == q - 1
    # a context file round trip keeps the towers; a forged tower list is refused
    blob = ctx.to_bytes(include_secret=True)
    again = fs.load_context(blob)
    assert again.moduli == ctx.moduli and again.fingerprint == ctx.fingerprint
    public = fs.load_context(flood_keys.server_context().to_bytes())
    assert public.moduli == ctx.moduli and not public.has_secret_key


def _zero_state_error_std(outs) -> float:
    return float(np.concatenate([t.double().numpy().ravel() for t in outs.values()]).std())


def test_shared_decryption_is_flooded_and_precise(flood_keys):
    client, server = flood_keys.client_context(), flood_keys.server_context()
    states = [make_state(300 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    weights = [3.0, 5.0, 8.0]
    ups = [fs.EncryptedUpdate.from_bytes(
        fs.encrypt_update(client, s, layout, weight=w, weight_bound=16.0).to_bytes())
        for s, w in zip(states, weights)]
    assert ups[0].header["n_towers"] == 3 and ups[0].header["moduli"] == client.moduli
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server, ups).to_bytes())
    ctx = fs.load_context(client.to_bytes(include_secret=True))
    out = fs.decrypt_update(ctx, agg, layout)
    ref = weighted_average(states, weights)
    for name, r in ref.items():
        assert np.abs(out[name].double().numpy() - r).max() <= 1e-6 + 1e-7
    # a one-tower server refuses three-tower updates
    other = fs.keygen_shared().server_context()
    with pytest.raises(fs.IncompatibleUpdate):
        fs.aggregate(other, ups)


def test_shared_flooding_noise_matches_the_prediction(flood_keys, monkeypatch):
    """With W inflated until the noise is visible, the decrypted error's spread is what the
    uniform flooding polynomial predicts: the noise really is added, in the coefficient
    domain, with the stated variance."""
    client, server = flood_keys.client_context(), flood_keys.server_context()
    zeros = {"x": torch.zeros(16383)}
    layout = fs.Layout.from_state_dict(zeros)
    agg = fs.aggregate(server, [fs.encrypt_update(client, zeros, layout, weight=1.0,
                                                  weight_bound=1.0)])
    quiet = fs.decrypt_update(client, agg, layout)
    assert _zero_state_error_std(quiet) < 1e-12  # W of flood_bits=30 is invisible
    target = 1e-5
    width = int(target / np.sqrt(FLOOD.ring_dim / 2 / 3) * 2.0 ** FLOOD.effective_scale_bits)
    monkeypatch.setattr(flooding, "flood_width", lambda params, n_parties=1: width)
    std = _zero_state_error_std(fs.decrypt_update(client, agg, layout, tolerance=1.0))
    assert 0.9 * target < std < 1.1 * target, std


# -- end to end: threshold --------------------------------------------------------------------

@pytest.fixture(scope="module")
def flood_federation():
    # scale-50 towers, so that the tests can inflate the flooding into view (below 2**126)
    parties, server = fs.keygen_threshold(fs.CKKSParams(**TOWERS, flood_bits=40, seeded=False),
                                          3, 2)
    return parties, server


def test_threshold_partial_decryptions_are_flooded(flood_federation, monkeypatch):
    parties, server = flood_federation
    states = [make_state(400 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    weights = [2.0 ** 16 / 3] * 3
    ups = [fs.encrypt_update(p, s, layout, weight=w) for p, s, w in zip(parties, states, weights)]
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server, ups).to_bytes())
    ref = weighted_average(states, weights)
    # 2 of 3 (party 2 absent: t-of-n key sharing per tower), then all 3
    for present in ([0, 1], None):
        ids = present or [0, 1, 2]
        out = fs.combine_partials(agg, [fs.partial_decrypt(parties[i], agg, present)
                                        for i in ids], layout, ctx=parties[0])
        for name, r in ref.items():
            assert np.abs(out[name].double().numpy() - r).max() <= 1e-6 + 1e-7
    # the flooding is in every share: inflate W and measure the fused noise of 3 parties
    zeros = {"x": torch.zeros(16383)}
    zlayout = fs.Layout.from_state_dict(zeros)
    zagg = fs.aggregate(server, [fs.encrypt_update(p, zeros, zlayout, weight=1.0,
                                                   weight_bound=2.0) for p in parties[:2]])
    target = 1e-5
    params = parties[0].params
    width = int(target / np.sqrt(params.ring_dim / 2 / 3) * 2.0 ** params.effective_scale_bits)
    monkeypatch.setattr(flooding, "flood_width", lambda params, n_parties=1: width)
    for ids in ([0], [1], [0, 1, 2]):
        # flood only the shares of `ids` (the others keep OpenFHE's own 2**20 only)
        shares = []
        for i in range(3):
            if i not in ids:
                monkeypatch.setattr(flooding, "flood_width", lambda params, n_parties=1: 0)
            shares.append(fs.partial_decrypt(parties[i], zagg))
            monkeypatch.setattr(flooding, "flood_width", lambda params, n_parties=1: width)
        std = _zero_state_error_std(fs.combine_partials(zagg, shares, zlayout, ctx=server,
                                                        tolerance=1.0))
        expect = target * np.sqrt(len(ids))
        assert 0.9 * expect < std < 1.1 * expect, (ids, std, expect)


def test_flooding_with_worker_processes(flood_keys):
    """The encryption and decryption pools load the 3-tower context from its bytes; decrypted
    values are flooded before the pool sees the ciphertexts."""
    client, server = flood_keys.client_context(), flood_keys.server_context()
    state = make_state(7, {"big": (3, 16384)})
    layout = fs.Layout.from_state_dict(state)
    ups = [fs.encrypt_update(client, state, layout, weight=2.0, weight_bound=4.0, workers=2)
           for _ in range(2)]
    assert ups[0].n_ciphertexts == 4 and ups[0].header["n_towers"] == 3
    agg = fs.aggregate(server, ups, allow_partial_aggregates=False)
    out = fs.decrypt_update(client, agg, layout, workers=2)
    ref = weighted_average([state, state], [2.0, 2.0])
    assert np.abs(out["big"].double().numpy() - ref["big"]).max() <= 1e-6 + 1e-7


def _context_meta(blob: bytes):
    head_len = int.from_bytes(blob[10:14], "little")
    return json.loads(blob[14:14 + head_len]), head_len


def _rebuild(blob: bytes, meta: dict) -> bytes:
    import hashlib

    _, head_len = _context_meta(blob)
    head = json.dumps(meta, sort_keys=True).encode()
    body = blob[:8] + blob[8:10] + len(head).to_bytes(4, "little") + head + \
        blob[14 + head_len:-32]
    return body + hashlib.sha256(body).digest()


def test_forged_tower_lists_in_context_files_are_refused(flood_keys):
    blob = flood_keys.server_context().to_bytes()
    meta, _ = _context_meta(blob)
    assert len(meta["moduli"]) == 3
    assert fs.load_context(_rebuild(blob, meta)).moduli == tuple(meta["moduli"])
    forged = []
    for moduli in (meta["moduli"][:2], meta["moduli"][:1], "x", [meta["moduli"][0]] * 3,
                   [meta["moduli"][0], meta["moduli"][2], meta["moduli"][1]],
                   [meta["moduli"][0], meta["moduli"][1], meta["moduli"][2] + 2]):
        forged.append({**meta, "moduli": moduli})
    forged.append({k: v for k, v in meta.items() if k != "moduli"})  # a 3-tower file without
    for m in forged:
        with pytest.raises(fs.KeyMaterialError):
            fs.load_context(_rebuild(blob, m))


def test_forged_towers_in_a_real_update_are_refused(flood_keys):
    client, server = flood_keys.client_context(), flood_keys.server_context()
    state = make_state(11)
    layout = fs.Layout.from_state_dict(state)
    data = fs.encrypt_update(client, state, layout).to_bytes()
    q1, q2 = client.moduli[1], client.moduli[2]
    assert int.from_bytes(data[168:176], "little") == q1
    assert int.from_bytes(data[176:184], "little") == q2

    def reseal(body: bytearray) -> bytes:
        return bytes(body[:-8]) + _native.checksum64(bytes(body[:-8])).to_bytes(8, "little")

    # another odd modulus of the same width for tower 1: well-formed, but not this context's
    body = bytearray(data)
    body[168:176] = (q1 + 2).to_bytes(8, "little")
    forged = fs.EncryptedUpdate.from_bytes(reseal(body))
    with pytest.raises(fs.IncompatibleUpdate, match="modulus"):
        fs.aggregate(server, [forged])
    with pytest.raises(fs.IncompatibleUpdate, match="modulus"):
        fs.decrypt_update(client, forged, layout)
    # towers swapped: same set, other order
    body = bytearray(data)
    body[168:176], body[176:184] = data[176:184], data[168:176]
    with pytest.raises(fs.IncompatibleUpdate, match="modulus"):
        fs.aggregate(server, [reseal(body)])
    # a tower count that does not match the bytes
    for towers in (1, 2, 4):
        body = bytearray(data)
        body[146] = towers
        with pytest.raises(fs.InvalidUpdate):
            fs.EncryptedUpdate.from_bytes(reseal(body))
    # a flipped payload byte without a new checksum
    body = bytearray(data)
    body[200] ^= 1
    with pytest.raises(fs.InvalidUpdate, match="checksum"):
        fs.EncryptedUpdate.from_bytes(bytes(body))


def test_flooding_party_context_files(flood_federation):
    """t-of-n party files hold 3-tower key shares; a party loaded from its file still decrypts
    (its flooded share fuses with the others)."""
    parties, server = flood_federation
    loaded = [fs.load_context(p.to_bytes(include_secret=True)) for p in parties]
    assert all(len(p.key_share_senders) == 2 for p in loaded)
    assert all(len(p.key_share(j)) == 8 * 16384 * 3 for p in loaded
               for j in p.key_share_senders)
    server2 = fs.load_context(server.to_bytes())
    states = [make_state(500 + i) for i in range(2)]
    layout = fs.Layout.from_state_dict(states[0])
    weights = [2.0 ** 16 / 2] * 2
    agg = fs.aggregate(server2, [fs.encrypt_update(p, s, layout, weight=w)
                                 for p, s, w in zip(loaded, states, weights)])
    out = fs.combine_partials(agg, [fs.partial_decrypt(loaded[i], agg, [1, 2]) for i in (1, 2)],
                              layout, ctx=loaded[1])
    for name, r in weighted_average(states, weights).items():
        assert np.abs(out[name].double().numpy() - r).max() <= 1e-6 + 1e-7
    # a key share of one tower's length (a one-tower party file spliced in) is refused on load
    import hashlib

    blob = parties[0].to_bytes(include_secret=True)
    meta, head_len = _context_meta(blob)
    at, sections = 14 + head_len, []
    for name, size in meta["sections"]:
        sections.append([name, blob[at:at + size]])
        at += size
    for sec in sections:
        if sec[0].startswith("key_share:"):
            assert len(sec[1]) == 8 * 16384 * 3
            sec[1] = sec[1][:8 * 16384]
            break
    meta["sections"] = [[n, len(b)] for n, b in sections]
    head = json.dumps(meta, sort_keys=True).encode()
    body = blob[:10] + len(head).to_bytes(4, "little") + head + b"".join(b for _, b in sections)
    with pytest.raises(fs.KeyMaterialError, match="key share"):
        fs.load_context(body + hashlib.sha256(body).digest())
