"""Noise flooding of decryptions (IND-CPA^D): the native NTT and Gaussian sampler, the
multi-tower contexts it runs on (LMSS22-sized profiles and the 3-tower contexts made before
them), the sizing arithmetic, and the flooding noise every decryption that leaves a key holder
carries (shared-key decrypt_update, threshold partial decryptions), against the prediction of
fedshield.he.flooding."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import native
from fedshield.he import flood_sizing, flooding

from conftest import make_state, weighted_average

# A small NTT-friendly prime for the unit tests of the transform: 2N | q - 1 for N <= 2048.
SMALL_Q = 12289
FLOOD = fs.CKKSParams.for_precision(flood_bits=30, max_weight=0)  # shared keys: LMSS22-sized towers
# towers for parameters built by hand below
TOWERS = dict(ring_dim=16384, first_mod_bits=60, scale_bits=50)
# a flooding context as made before the LMSS22 sizing: 3 towers, no flood_towers in its JSON
LEGACY = fs.CKKSParams.from_dict({**TOWERS, "flood_bits": 30, "seeded": True})


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
    got = native.ntt_forward(coeffs, SMALL_Q, psi)
    assert got.tolist() == _reference_ntt(coeffs.tolist(), SMALL_Q, psi)
    assert coeffs.tolist() == _inverse_ntt(got.tolist(), SMALL_Q, psi)  # input left untouched


def test_ntt_rejects_bad_arguments():
    a = np.zeros(8, dtype=np.uint64)
    with pytest.raises(fs.InvalidUpdate, match="root"):
        native.ntt_forward(a, SMALL_Q, 1)
    with pytest.raises(fs.InvalidUpdate, match="root"):
        native.ntt_forward(a, SMALL_Q, _psi(16))  # a 32nd root is not primitive 16th
    with pytest.raises(fs.InvalidUpdate, match="power of two"):
        native.ntt_forward(np.zeros(6, dtype=np.uint64), SMALL_Q, _psi(8))


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
        native.flood_residues(blob, offsets, list(moduli), roots, n, *flooding.split_width(width))
        for t, (q, off) in enumerate(zip(moduli, offsets)):
            values = np.frombuffer(bytes(blob), dtype="<u8", count=n, offset=off).tolist()
            per_tower[t] += [_centered(v, q) for v in _inverse_ntt(values, q, roots[t])]
    return per_tower


def _moments_are_gaussian(f, sigma: float) -> None:
    """Mean 0, standard deviation sigma and a Gaussian's fourth moment (3; a uniform's is
    1.8), within about 4 standard errors."""
    z = np.asarray(f, dtype=np.float64) / sigma
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / z.size)
    assert abs((z ** 4).mean() / z.var() ** 2 - 3) < 4 * math.sqrt(24 / z.size)


def test_flooding_is_one_gaussian_integer_polynomial_in_every_tower():
    # two NTT-friendly primes for n = 16 (2n | q - 1), 11 generating both groups
    moduli, variance, n = (SMALL_Q, 40961), 100 ** 2, 16
    assert all(pow(11, (q - 1) // 2, q) == q - 1 for q in moduli)
    tower0, tower1 = _flooded_coefficients(n, moduli, variance, 200)
    # the same integers in both towers (one polynomial, reduced mod each prime)
    assert tower0 == tower1
    _moments_are_gaussian(tower0, math.sqrt(variance))
    # fresh randomness every call
    again = _flooded_coefficients(n, moduli, variance, 1)[0]
    assert again != tower0[:n]


def _ntt_prime(n: int, bits: int) -> tuple[int, int]:
    """The largest prime q < 2**bits with 2n | q - 1 and a primitive 2n-th root of unity."""
    q = (2 ** bits - 1) // (2 * n) * (2 * n) + 1
    while True:
        if q < 2 ** bits and all(pow(a, q - 1, q) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19)):
            for g in range(2, 200):
                psi = pow(g, (q - 1) // (2 * n), q)
                if pow(psi, n, q) == q - 1:
                    return q, psi
        q -= 2 * n


@pytest.mark.parametrize("variance", [2 ** 60, 2 ** 100, 2 ** 112 - 1])
def test_wide_gaussian_flooding_has_the_stated_variance(variance):
    """The exact sampler's 256-bit path (flooding variances, up to the largest it takes):
    moments of 4096 coefficients through one 61-bit tower."""
    n = 64
    q, psi = _ntt_prime(n, 61)
    values = []
    for _ in range(64):
        blob = bytearray(n.to_bytes(8, "little") + bytes(8 * n))
        native.flood_residues(blob, [8], [q], [psi], n, *flooding.split_width(variance))
        values += [_centered(c, q) for c in _inverse_ntt(
            np.frombuffer(bytes(blob), dtype="<u8", count=n, offset=8).tolist(), q, psi)]
    _moments_are_gaussian([float(v) for v in values], math.sqrt(variance))


def test_flood_residues_rejects_bad_arguments():
    n, q = 8, SMALL_Q
    good = bytearray(n.to_bytes(8, "little") + bytes(8 * n))
    psi = _psi(n)
    with pytest.raises(fs.InvalidUpdate, match="root"):
        native.flood_residues(good, [8], [q], [2], n, 0, 5)
    with pytest.raises(fs.InvalidUpdate, match="2\\^112"):
        native.flood_residues(good, [8], [q], [psi], n, 2**48, 0)
    with pytest.raises(fs.InvalidUpdate, match="variance"):
        native.flood_residues(good, [8], [q], [psi], n, 0, 0)
    bad = bytearray(good)
    bad[8:16] = q.to_bytes(8, "little")  # a residue not below q
    with pytest.raises(fs.InvalidUpdate, match="below"):
        native.flood_residues(bad, [8], [q], [psi], n, 0, 5)
    with pytest.raises(ValueError, match="outside|ring_dim"):
        native.flood_residues(good, [16], [q], [psi], n, 0, 5)
    with pytest.raises((ValueError, BufferError), match="writable"):
        native.flood_residues(bytes(good), [8], [q], [psi], n, 0, 5)
    with pytest.raises(ValueError, match="one offset per tower"):
        native.flood_residues(good, [8, 8], [q], [psi], n, 0, 5)
    for modulus in (0, 1, 2**62 + 1):
        with pytest.raises(fs.InvalidUpdate, match="modulus"):
            native.flood_residues(good, [8], [modulus], [psi], n, 0, 5)
    with pytest.raises(fs.InvalidUpdate, match="one modulus and one root"):
        native.flood_residues(good, [8], [q], [], n, 0, 5)


# -- parameters -------------------------------------------------------------------------------

def test_flooding_parameters():
    plain = fs.CKKSParams()
    assert not plain.flooding and plain.n_towers == 1 and plain.prescale_bits == 0
    assert "flood" not in plain.to_json()  # unchanged JSON and fingerprints without flooding
    p = FLOOD
    assert p.flooding and p.n_towers == p.towers >= 2 and p.value_bound == 1.0
    assert p.effective_scale_bits == p.log_q_min - 2 - 6  # Q/4 holds 64 clients of |x| <= 1
    assert fs.CKKSParams.from_dict(json.loads(p.to_json())) == p
    assert p.fingerprint() != plain.fingerprint()
    for bad in (1, 19, 65, -1):
        with pytest.raises(fs.ParameterError, match="flood_bits"):
            fs.CKKSParams(flood_bits=bad)
    with pytest.raises(fs.ParameterError, match="flood_log_queries"):
        fs.CKKSParams(flood_bits=30, flood_log_queries=41)
    with pytest.raises(fs.ParameterError, match="towers=5"):
        fs.CKKSParams(**TOWERS, flood_bits=30, towers=5)
    with pytest.raises(fs.ParameterError, match="security|ring_dim"):  # 3 towers: N = 16384
        fs.CKKSParams(**{**TOWERS, "ring_dim": 8192}, flood_bits=30, towers=3)
    # the Gaussian must stay within what the exact sampler draws
    with pytest.raises(fs.ParameterError, match="sampler"):
        flooding.flood_variance(fs.CKKSParams(**TOWERS, flood_bits=64, flood_log_queries=40,
                                              seeded=False), 5)


def test_contexts_made_before_the_lmss22_sizing_keep_their_layout_and_fingerprint():
    """A 3-tower flooding context's JSON names no flood_towers (as before it existed): it loads
    with 3 towers, values up to 4 per client, and the same fingerprint."""
    data = json.loads(LEGACY.to_json())
    assert "flood_towers" not in data and data["flood_bits"] == 30
    again = fs.CKKSParams.from_dict(data)
    assert again == LEGACY and again.n_towers == 3 and again.legacy_flooding
    assert fs.CKKSParams.from_dict(LEGACY.to_dict()) == LEGACY  # metrics.json's form
    # 3 towers of today's sizing are not the legacy layout: their JSON names them
    new3 = fs.CKKSParams(**TOWERS, flood_bits=30, towers=3)
    assert not new3.legacy_flooding and new3 != LEGACY
    assert json.loads(new3.to_json())["flood_towers"] == 3
    assert new3.prescale_bits > LEGACY.prescale_bits
    with pytest.raises(fs.ParameterError, match="legacy_flooding"):
        fs.CKKSParams(**TOWERS, flood_bits=30, towers=2, legacy_flooding=True)
    assert again.fingerprint() == LEGACY.fingerprint()
    assert again.value_bound == 4.0
    assert again.prescale_bits == again.log_q_min - 2 - (6 + 2) - again.scale_bits
    # what a reader of the old format would reject: a new context names its towers
    assert json.loads(FLOOD.to_json())["flood_towers"] == FLOOD.towers != 3


def test_keygen_refuses_flooding_that_costs_more_than_1e6():
    # 2 towers of 60 + 30 bits: 64 bits of security leave an error far above 1e-6 (the
    # flooding itself still fits Q/4 for one key holder)
    p = fs.CKKSParams(**{**TOWERS, "scale_bits": 30}, flood_bits=64)
    flooding.flood_variance(p, 1)
    assert 6 * flooding.slot_error_std(p, 1) > 1e-6
    with pytest.raises(fs.ParameterError, match="1e-06"):
        fs.keygen_shared(p)
    for bits in (20, 30, 40, 50, 64):  # every level passes at 2 towers of 60 + 50 bits
        for n_parties in (1, 3, 5, 16):
            flooding.check_precision(fs.CKKSParams(**TOWERS, flood_bits=bits), n_parties)
    for bits in (20, 30, 40):  # threshold keys (public-key noise) at 2 towers of 60 + 52
        for n_parties in (3, 5, 16):
            flooding.check_precision(fs.CKKSParams(**{**TOWERS, "scale_bits": 52},
                                                   flood_bits=bits, seeded=False), n_parties)


def test_the_flooding_variance_follows_lmss22_for_the_aggregate_bound():
    """sigma**2 = 12 tau 2**s t**2 (LMSS22 Cor. 2; docs/THREAT_MODEL.md), t the l2 bound of the
    aggregate's error from fedshield.he.flood_sizing, and what that implies: more decryptions,
    more security bits, more parties or more clients need more flooding; secret-key
    aggregates need less than public-key ones."""
    base = fs.CKKSParams(**TOWERS, flood_bits=30, seeded=False)
    t = flooding.noise_l2_bound(base, 3)
    sigma2 = flooding.flood_variance(base, 3)
    assert sigma2 == math.ceil(12 * 2.0 ** 20 * 2.0 ** 30 * t * t)
    # t itself: at least the expected norm of the error (sigma_e^2 N (P ||v||^2 + C +
    # C ||s||^2) with the ternary norms' means), and far below the per-coefficient union bound
    # the uniform smudging used (sqrt(N) * B)
    n, c, p = 16384, 64, 3
    mean = flood_sizing.ERROR_SIGMA * math.sqrt(n * (p * 2 * n * c / 3 + c + c * 2 * n * p / 3))
    assert mean < t < 4 * mean

    def var(**kw):
        params = dataclasses.replace(base, **{k: v for k, v in kw.items() if k != "parties"})
        return flooding.flood_variance(params, kw.get("parties", 3))

    assert var(flood_log_queries=21) > 2 * sigma2  # tau doubles, and t's union bound grows
    assert var(flood_log_queries=30) > 2 ** 10 * sigma2
    assert var(flood_bits=31) > 2 * sigma2
    assert var(parties=5) > sigma2 and var(max_clients=128) > sigma2
    assert flooding.flood_variance(dataclasses.replace(base, seeded=True), 3) < sigma2 / 2 ** 10
    # the profile grows with the decryption budget too: more bits of modulus, never fewer
    widths = [fs.CKKSParams.for_precision(keys="threshold", n_parties=3, flood_bits=30,
                                          flood_log_queries=lq).log_q for lq in (10, 20, 30)]
    assert widths[0] < widths[1] < widths[2]


def _negacyclic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * b in Z[X]/(X^N + 1)."""
    n, full = len(a), np.convolve(a, b)
    out = full[:n].copy()
    out[:n - 1] -= full[n:]
    return out


@pytest.mark.parametrize("public_key", [True, False])
def test_the_l2_bound_covers_simulated_aggregates(public_key):
    """The noise model of fedshield.he.flood_sizing, simulated: C fresh encryptions' errors
    (public-key: v * e_pk + e0 + s * e1 under P parties' ternary secrets and key errors;
    secret-key: e) summed, N = 1024. The bound t exceeds every simulated ||e||_2 and is not
    vacuous (within a few times the largest)."""
    rng = np.random.default_rng(7)
    n, c, p = 1024, 4, 3

    def gauss():
        return np.rint(rng.normal(0, flood_sizing.ERROR_SIGMA, n)).astype(np.int64)

    def ternary():
        return rng.integers(-1, 2, n).astype(np.int64)

    s = sum(ternary() for _ in range(p))
    e_pk = sum(gauss() for _ in range(p))
    norms = []
    for _ in range(30):
        e = np.zeros(n, dtype=np.int64)
        for _ in range(c):
            e += (_negacyclic(ternary(), e_pk) + gauss() + _negacyclic(s, gauss())
                  if public_key else gauss())
        norms.append(float(np.linalg.norm(e)))
    t = flood_sizing.noise_l2_bound(n, c, 30, 20, public_key=public_key, n_parties=p)
    assert max(norms) < t < (5 if public_key else 2) * max(norms)


def test_the_flooding_profile_is_the_smallest_that_keeps_1e6():
    """for_precision's flooding profile: within 1e-6 (6 standard deviations over the weight
    sum's 1/2) and one bit less of effective scale would not be."""
    for keys, parties in (("shared", 1), ("threshold", 3), ("threshold", 16)):
        p = fs.CKKSParams.for_precision(keys=keys, n_parties=parties, flood_bits=30, max_weight=0)
        assert p.flooding and p.log_q + 61 <= 218 and p.ring_dim == 8192
        err = 2 * 6 * flooding.slot_error_std(p, parties)
        assert err <= 1e-6 < 2 * err


# -- end to end: shared keys ------------------------------------------------------------------

@pytest.fixture(scope="module")
def flood_keys():
    return fs.keygen_shared(FLOOD)


@pytest.fixture(scope="module")
def legacy_keys():
    return fs.keygen_shared(LEGACY)


@pytest.mark.parametrize("which", ["flood_keys", "legacy_keys"])
def test_flooding_context_has_its_towers(which, request):
    keys = request.getfixturevalue(which)
    ctx = keys.client_context()
    params = ctx.params
    towers = params.n_towers
    assert towers == (3 if which == "legacy_keys" else FLOOD.towers)
    assert len(ctx.moduli) == towers and ctx.moduli[0] == ctx.modulus
    assert ctx.moduli[0].bit_length() == params.first_mod_bits
    # primes next to 2**scale_bits
    assert all(abs(np.log2(q) - params.scale_bits) < 1e-3 for q in ctx.moduli[1:])
    product = math.prod(ctx.moduli)
    assert product.bit_length() - 1 >= params.log_q_min  # the bound the headroom relies on
    layout = ctx.ciphertext_template[1]
    assert len(layout) == 2 + 3 * towers and tuple(layout[1:1 + towers]) == ctx.moduli
    for q, root in zip(ctx.moduli, ctx.tower_roots):
        assert pow(root, params.ring_dim, q) == q - 1
    # a context file round trip keeps the towers; a forged tower list is refused
    blob = ctx.to_bytes(include_secret=True)
    again = fs.load_context(blob)
    assert again.moduli == ctx.moduli and again.fingerprint == ctx.fingerprint
    public = fs.load_context(keys.server_context().to_bytes())
    assert public.moduli == ctx.moduli and not public.has_secret_key


def _variance_for(target: float, params) -> int:
    """The flooding variance whose decrypted spread is `target` per real value (N/2 per real
    part through the canonical embedding, over the effective scale)."""
    return int((target / np.sqrt(params.ring_dim / 2) * 2.0 ** params.effective_scale_bits) ** 2)


def _zero_state_error_std(outs) -> float:
    return float(np.concatenate([t.double().numpy().ravel() for t in outs.values()]).std())


@pytest.mark.parametrize("which", ["flood_keys", "legacy_keys"])
def test_shared_decryption_is_flooded_and_precise(which, request):
    keys = request.getfixturevalue(which)
    client, server = keys.client_context(), keys.server_context()
    states = [make_state(300 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    weights = [3.0, 5.0, 8.0]
    ups = [fs.EncryptedUpdate.from_bytes(
        fs.encrypt_update(client, s, layout, weight=w, weight_bound=16.0).to_bytes())
        for s, w in zip(states, weights)]
    assert ups[0].header["n_towers"] == client.params.n_towers
    assert ups[0].header["moduli"] == client.moduli
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
    """With the variance inflated until the noise is visible, the decrypted error's spread is
    what the Gaussian flooding polynomial predicts: the noise really is added, in the
    coefficient domain, with the stated variance."""
    client, server = flood_keys.client_context(), flood_keys.server_context()
    zeros = {"x": torch.zeros(2 * FLOOD.ring_dim - 1)}
    layout = fs.Layout.from_state_dict(zeros)
    agg = fs.aggregate(server, [fs.encrypt_update(client, zeros, layout, weight=1.0,
                                                  weight_bound=1.0)])
    quiet = _zero_state_error_std(fs.decrypt_update(client, agg, layout))
    # flood_bits=30: the predicted spread, far below the tolerance
    assert 0.8 < quiet / flooding.slot_error_std(FLOOD, 1) < 1.2
    target = 1e-5
    variance = _variance_for(target, FLOOD)
    monkeypatch.setattr(flooding, "flood_variance", lambda params, n_parties=1: variance)
    std = _zero_state_error_std(fs.decrypt_update(client, agg, layout, tolerance=1.0))
    assert 0.9 * target < std < 1.1 * target, std


# -- end to end: threshold --------------------------------------------------------------------

@pytest.fixture(scope="module")
def flood_federation():
    # towers of 54 + 30 bits (effective scale 2**75): precise at flood_bits 20, and the tests
    # can inflate the flooding into view within the sampler's 2**112
    params = fs.CKKSParams(ring_dim=16384, first_mod_bits=54, scale_bits=30, flood_bits=20,
                           seeded=False)
    parties, server = fs.keygen_threshold(params, 3, 2)
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
    # the flooding is in every share: inflate it and measure the fused noise of 3 parties
    zeros = {"x": torch.zeros(16383)}
    zlayout = fs.Layout.from_state_dict(zeros)
    zagg = fs.aggregate(server, [fs.encrypt_update(p, zeros, zlayout, weight=1.0,
                                                   weight_bound=2.0) for p in parties[:2]])
    target = 1e-4
    variance = _variance_for(target, parties[0].params)
    monkeypatch.setattr(flooding, "flood_variance", lambda params, n_parties=1: variance)
    for ids in ([0], [1], [0, 1, 2]):
        # flood only the shares of `ids` (the others keep OpenFHE's own 2**20 only)
        shares = []
        for i in range(3):
            if i not in ids:
                monkeypatch.setattr(flooding, "flood_variance", lambda params, n_parties=1: 0)
            shares.append(fs.partial_decrypt(parties[i], zagg))
            monkeypatch.setattr(flooding, "flood_variance",
                                lambda params, n_parties=1: variance)
        std = _zero_state_error_std(fs.combine_partials(zagg, shares, zlayout, ctx=server,
                                                        tolerance=1.0))
        expect = target * np.sqrt(len(ids))
        assert 0.9 * expect < std < 1.1 * expect, (ids, std, expect)


@pytest.mark.parametrize("weights", [(5.0, 1.0, 4.0), (1.0, 1e6, 3.0)])
def test_the_threshold_profile_round_trips_within_1e6(weights):
    """The LMSS22-sized threshold profile a keygen resolves for 3 parties: party files, updates,
    the aggregate and every share go through bytes; the fused average is within 1e-6 of the
    plaintext one (weights of small and huge sites, the round's bound their next power of
    two), with every share flooded."""
    parties, server = fs.keygen_threshold(fs.CKKSParams(flood_bits=30), 3)
    params = parties[0].params
    assert params == fs.CKKSParams.for_precision(keys="threshold", n_parties=3, flood_bits=30)
    assert params.flooding and params.n_towers == params.towers == 2
    loaded = [fs.load_context(p.to_bytes(include_secret=True)) for p in parties]
    server = fs.load_context(server.to_bytes())
    states = [make_state(700 + i, {"a": (64, 300), "b": (7, 11)}) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    bound = float(2 ** math.ceil(math.log2(max(weights))))
    ups = [fs.EncryptedUpdate.from_bytes(
        fs.encrypt_update(p, s, layout, weight=w, weight_bound=bound).to_bytes())
        for p, s, w in zip(loaded, states, weights)]
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server, ups).to_bytes())
    shares = [bytes(fs.partial_decrypt(p, agg)) for p in loaded]
    out = fs.combine_partials(agg, shares, layout, ctx=loaded[0])
    for name, ref in weighted_average(states, list(weights)).items():
        assert np.abs(out[name].double().numpy() - ref).max() <= 1e-6


def test_flooding_with_worker_processes(flood_keys):
    """The encryption and decryption pools load the multi-tower context from its bytes;
    decrypted values are flooded before the pool sees the ciphertexts."""
    client, server = flood_keys.client_context(), flood_keys.server_context()
    state = make_state(7, {"big": (3, 16384)})
    layout = fs.Layout.from_state_dict(state)
    ups = [fs.encrypt_update(client, state, layout, weight=2.0, weight_bound=4.0, workers=2)
           for _ in range(2)]
    assert ups[0].n_ciphertexts == math.ceil((3 * 16384 + 1) / FLOOD.values_per_ciphertext)
    assert ups[0].header["n_towers"] == FLOOD.n_towers
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


def test_forged_tower_lists_in_context_files_are_refused(legacy_keys):
    blob = legacy_keys.server_context().to_bytes()
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


def test_forged_towers_in_a_real_update_are_refused(legacy_keys):
    client, server = legacy_keys.client_context(), legacy_keys.server_context()
    state = make_state(11)
    layout = fs.Layout.from_state_dict(state)
    data = fs.encrypt_update(client, state, layout).to_bytes()
    q1, q2 = client.moduli[1], client.moduli[2]
    assert int.from_bytes(data[168:176], "little") == q1
    assert int.from_bytes(data[176:184], "little") == q2

    def reseal(body: bytearray) -> bytes:
        return bytes(body[:-8]) + native.checksum64(bytes(body[:-8])).to_bytes(8, "little")

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
    """t-of-n party files hold multi-tower key shares; a party loaded from its file still
    decrypts (its flooded share fuses with the others)."""
    parties, server = flood_federation
    loaded = [fs.load_context(p.to_bytes(include_secret=True)) for p in parties]
    assert all(len(p.key_share_senders) == 2 for p in loaded)
    assert all(len(p.key_share(j)) == 8 * 16384 * parties[0].params.n_towers for p in loaded
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
            assert len(sec[1]) == 8 * 16384 * parties[0].params.n_towers
            sec[1] = sec[1][:8 * 16384]
            break
    meta["sections"] = [[n, len(b)] for n, b in sections]
    head = json.dumps(meta, sort_keys=True).encode()
    body = blob[:10] + len(head).to_bytes(4, "little") + head + b"".join(b for _, b in sections)
    with pytest.raises(fs.KeyMaterialError, match="key share"):
        fs.load_context(body + hashlib.sha256(body).digest())
