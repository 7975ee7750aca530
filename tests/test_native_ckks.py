"""fedshield's own CKKS arithmetic (csrc/ckks.cpp) against OpenFHE, the reference: our
ciphertexts decrypt with OpenFHE and OpenFHE's with ours, in both key modes, after a serialize ->
load round trip; threshold shares fuse across the two implementations; the samplers pass
statistical tests; hostile bytes reach the new native entry points only as fs errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

import fedshield as fs
from fedshield import native
from fedshield.he import backend, encryption, partial
from fedshield.he.encryption import (ckks_ring, decrypt_values, pack_update, rebuild_ciphertexts,
                                     seal_update)
from forgery import MUTATIONS, fuzz_settings, mutate, reseal_update

TOL = 1e-6  # the package's precision promise, values of magnitude <= 1


def _state(seed: int, n: int = 6000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.uniform(-1, 1, (3, n // 3)).astype(np.float32),
            "a.lora_B.weight": rng.uniform(-1, 1, (n // 3, 1)).astype(np.float32)}


def _flat(tensors: dict) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in sorted(tensors)])


def _average(states, weights) -> np.ndarray:
    return sum(w * _flat(s) for w, s in zip(weights, states)) / sum(weights)


def _secret_residues(ctx: fs.Context) -> np.ndarray:
    """The secret key's residues, every tower, as the native decryption takes them."""
    return np.ascontiguousarray(np.concatenate([r for _, r in ctx.key_residues()]))


def _roundtrip(ctx: fs.Context) -> fs.Context:
    return fs.load_context(ctx.to_bytes(include_secret=ctx.has_secret_key or ctx.is_party))


def _openfhe_update(ctx: fs.Context, state, layout, weight, bound) -> fs.EncryptedUpdate:
    """An update whose ciphertexts OpenFHE encrypted (Encrypt with the secret key when seeded,
    else the public key), assembled by the wire codec."""
    packed = pack_update(ctx, state, layout, weight=weight, weight_bound=bound)
    cc, pk, sk = ctx.openfhe_objects(need_secret=packed.header["elements"] == 1)
    key = sk if packed.header["elements"] == 1 else pk
    cts = backend.encrypt_buffer(cc, key, packed.buffer, ctx.params)
    return fs.EncryptedUpdate.from_bytes(seal_update(ctx, packed.header, cts).to_bytes())


def _openfhe_decrypt(ctx: fs.Context, update: fs.EncryptedUpdate) -> np.ndarray:
    cc, _, sk = ctx.openfhe_objects(need_secret=True)
    return backend.decrypt_ciphertexts(cc, sk, rebuild_ciphertexts(ctx, update), ctx.params)


@pytest.fixture(scope="module")
def flood_keys() -> fs.SharedKeys:
    return fs.keygen_shared(fs.CKKSParams.for_precision(flood_bits=30))


@pytest.fixture(scope="module")
def threshold_keys():
    return fs.keygen_threshold(fs.CKKSParams.for_precision(keys="threshold", max_weight=0),
                               n_parties=3)


# --- encoding --------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["complex", "real"])
def test_encode_then_decode_is_the_identity_up_to_rounding(client_ctx, packing):
    params = client_ctx.params
    ring = (params.ring_dim, list(client_ctx.moduli), list(client_ctx.tower_roots),
            params.scale_bits, packing == "complex")
    per_ct = params.ring_dim if packing == "complex" else params.ring_dim // 2
    values = np.random.default_rng(0).uniform(-1, 1, per_ct)
    back = native.ckks_decode(ring, native.ckks_encode(ring, values))
    # rounding to integers at scale 2**scale_bits, spread by the canonical embedding
    assert np.max(np.abs(back - values)) < params.ring_dim * 2.0 ** -params.scale_bits


def test_decoding_matches_openfhe_on_its_own_ciphertexts(client_ctx):
    """OpenFHE's Decrypt and ours on the same OpenFHE ciphertexts: the same arithmetic, so
    they agree far below the encryption noise."""
    ctx = _roundtrip(client_ctx)
    state = _state(1)
    layout = fs.Layout.from_state_dict(state)
    upd = _openfhe_update(ctx, state, layout, 3.0, 4.0)
    ours, theirs = decrypt_values(ctx, upd), _openfhe_decrypt(ctx, upd)
    assert np.max(np.abs(ours - theirs)) < 1e-12


# --- shared keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("keys", ["client", "flood"])
def test_ours_decrypt_with_openfhe_and_theirs_with_ours(client_ctx, flood_keys, keys):
    ctx = _roundtrip(client_ctx if keys == "client" else flood_keys.client_context())
    params = ctx.params
    pre = 2.0 ** params.prescale_bits
    states, weights = [_state(2), _state(3)], [3.0, 4.0]
    layout = fs.Layout.from_state_dict(states[0])
    ours = fs.EncryptedUpdate.from_bytes(fs.encrypt_update(
        ctx, states[0], layout, weight=weights[0], weight_bound=4.0).to_bytes())
    n = layout.kept_count(None)
    # OpenFHE decrypts ours (without flooding: OpenFHE's own decryption)
    got = _openfhe_decrypt(ctx, ours)[:n] / pre
    assert np.max(np.abs(got - 0.75 * _flat(states[0]))) < TOL
    # ours decrypts OpenFHE's, and the sum of one of each
    theirs = _openfhe_update(ctx, states[1], layout, weights[1], 4.0)
    agg = fs.aggregate(ctx.public(), [ours.to_bytes(), theirs.to_bytes()])
    avg = fs.decrypt_update(ctx, fs.EncryptedUpdate.from_bytes(agg.to_bytes()), layout)
    assert np.max(np.abs(_flat(avg) - _average(states, weights))) < TOL


def test_public_key_encryption_decrypts_with_openfhe(unseeded_keys):
    """Unseeded shared keys: our public-key encryption (both polynomials on the wire)."""
    ctx = _roundtrip(unseeded_keys.client_context())
    state = _state(4)
    layout = fs.Layout.from_state_dict(state)
    upd = fs.encrypt_update(ctx, state, layout, weight=1.0)
    assert not upd.is_seeded
    got = _openfhe_decrypt(ctx, fs.EncryptedUpdate.from_bytes(upd.to_bytes()))
    assert np.max(np.abs(got[:layout.kept_count(None)] - _flat(state))) < TOL


# --- threshold keys --------------------------------------------------------------------------

def _openfhe_shares(parties, agg) -> list[list[bytes]]:
    """OpenFHE's MultipartyDecryptLead/Main of every ciphertext, as packed residues."""
    out = []
    for i, party in enumerate(parties):
        cc, _, sk = party.openfhe_objects(need_secret=True)
        decrypt = cc.MultipartyDecryptLead if i == 0 else cc.MultipartyDecryptMain
        params = party.params
        row = []
        for blob in rebuild_ciphertexts(party, agg):
            share = backend.serialize(decrypt([backend.load_rebuilt_ciphertext(blob)], sk)[0])
            row.append(native.encode_partial(share, params.ring_dim, list(party.moduli)))
        out.append(row)
    return out


def _openfhe_fuse(ctx, shares: list[list[bytes]], lead_first=True) -> np.ndarray:
    templates = partial.partial_template(ctx)
    values = []
    for k in range(len(shares[0])):
        cts = [backend.load_rebuilt_ciphertext(native.rebuild_partial(
            row[k], *templates[lead_first and i == 0])) for i, row in enumerate(shares)]
        cc = cts[0].GetCryptoContext()
        backend.enable_multiparty(cc)
        pt = cc.MultipartyDecryptFusion(cts)
        pt.SetLength(ctx.params.slots)
        values.append(np.asarray(pt.GetCKKSPackedValue(), dtype=np.complex128).view(np.float64))
    return np.concatenate(values)


def test_threshold_interop_both_ways(threshold_keys):
    parties, server = threshold_keys
    parties = [_roundtrip(p) for p in parties]
    states, weights = [_state(5), _state(6)], [2.0, 1.0]
    layout = fs.Layout.from_state_dict(states[0])
    ours = fs.encrypt_update(parties[1], states[0], layout, weight=weights[0], weight_bound=2.0)
    theirs = _openfhe_update(parties[2], states[1], layout, weights[1], 2.0)
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server, [ours, theirs]).to_bytes())
    want = _average(states, weights)
    n = layout.kept_count(None)
    # our shares, fused by us
    shares = [partial.partial_decrypt(p, agg) for p in parties]
    avg = fs.combine_partials(agg, shares, layout, ctx=server)
    assert np.max(np.abs(_flat(avg) - want)) < TOL
    total = 1.5  # sum(w) / weight_bound
    # our shares fused by OpenFHE, OpenFHE's shares fused by us
    ours_packed = [partial.PartialDecryption.from_bytes(s).parts for s in shares]
    theirs_packed = _openfhe_shares(parties, agg)
    for fused in (_openfhe_fuse(parties[0], ours_packed),
                  native.ckks_fuse(theirs_packed, ckks_ring(server), len(ours_packed[0]) *
                                    server.params.values_per_ciphertext, 0)):
        assert np.max(np.abs(fused[:n] / total - want)) < TOL
    # and a mix: the lead's share from OpenFHE, the others ours
    mixed = [theirs_packed[0], *ours_packed[1:]]
    fused = native.ckks_fuse(mixed, ckks_ring(server), len(mixed[0]) *
                              server.params.values_per_ciphertext, 0)
    assert np.max(np.abs(fused[:n] / total - want)) < TOL


def test_smudging_noise_has_openfhes_size(threshold_keys):
    """A non-lead share of an aggregate whose c1 is zero, with a zero key, is the smudging
    noise alone: standard deviation 2**20 (OpenFHE's MP_SD), mean 0, Gaussian tails."""
    parties, server = threshold_keys
    params, ring = server.params, ckks_ring(server)
    state = _state(7, 3 * params.ring_dim)
    layout = fs.Layout.from_state_dict(state)
    upd = fs.encrypt_update(parties[0], state, layout, weight=1.0)
    header = upd.header
    h = native.HEADER_SIZE + 8 * (len(server.moduli) - 1)
    body = bytearray(upd.to_bytes())
    body[h:h + header["payload_len"]] = bytes(header["payload_len"])  # c0 = c1 = 0
    zero = reseal_update(body)
    key = np.zeros(params.ring_dim * len(server.moduli), dtype=np.uint64)
    parts = native.ckks_partial_decrypt(zero, ring, key, False, 0, 0, 0)
    q, n = server.moduli[0], params.ring_dim
    samples = []
    for part in parts:
        # a one-tower template: the array's length word (n), its n residues, 8 more bytes
        template = np.uint64(n).tobytes() + bytes(8 * n + 8)
        residues = np.frombuffer(native.rebuild_partial(
            part, template, (n, q, 8, 8 * n + 16)), dtype="<u8")[1:1 + n]
        coeffs = native.ntt_inverse(np.ascontiguousarray(residues), q, ring[2][0])
        samples.append(np.where(coeffs > q // 2, coeffs.astype(np.float64) - q, coeffs))
    e = np.concatenate(samples).astype(np.float64)
    sigma = 2.0 ** 20
    assert abs(e.mean()) < 5 * sigma / math.sqrt(e.size)
    assert abs(e.std() / sigma - 1) < 0.02
    assert np.mean(np.abs(e) > 3 * sigma) < 2 * 0.0027 and np.max(np.abs(e)) < 8 * sigma


# --- samplers --------------------------------------------------------------------------------

def test_encryption_error_is_openfhes_discrete_gaussian():
    """Moments, a chi-square against exp(-x^2 / (2 * 3.19^2)) and the tails."""
    x = native.ckks_sample_error(400_000)
    sigma = native.CKKS_ERROR_SIGMA
    support = np.arange(-40, 41)
    p = np.exp(-support.astype(float) ** 2 / (2 * sigma ** 2))
    p /= p.sum()
    var = float((p * support ** 2).sum())
    assert abs(x.mean()) < 5 * math.sqrt(var / x.size)
    assert abs(x.var() / var - 1) < 0.02
    assert np.max(np.abs(x)) <= 40
    counts = np.bincount(np.clip(x + 40, 0, 80), minlength=81)
    expected = p * x.size
    keep = expected >= 20  # pool the sparse tails into one cell
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    tail_obs, tail_exp = counts[~keep].sum(), expected[~keep].sum()
    chi2 += (tail_obs - tail_exp) ** 2 / max(tail_exp, 1.0)
    dof = int(keep.sum())
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # about 6 standard deviations
    assert np.mean(np.abs(x) >= 10) < 5 * 2 * p[support >= 10].sum() + 1e-4


def test_ternary_and_seeded_uniform_pass_chi_square(client_ctx):
    t = native.ckks_sample_ternary(300_000)
    assert set(np.unique(t)) == {-1, 0, 1}
    counts = np.bincount(t + 1)
    chi2 = ((counts - t.size / 3) ** 2 / (t.size / 3)).sum()
    assert chi2 < 2 + 6 * 2  # dof 2
    from fedshield.he import seeded
    q = client_ctx.moduli[0]
    a = seeded.expand(bytes(range(32)), client_ctx.fingerprint, 0, 40, client_ctx.moduli,
                      client_ctx.params.ring_dim)
    assert int(a.max()) < q
    bins = 64
    counts = np.bincount((a.astype(np.float64) / q * bins).astype(int), minlength=bins)
    expected = a.size / bins
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < bins - 1 + 6 * math.sqrt(2 * (bins - 1))


def _smudging_sigma0_squared():
    from fractions import Fraction
    return Fraction(2 ** 40, native.SMUDGING_BASE_DIVISOR)


def test_smudging_convolution_meets_micciancio_walters_conditions():
    """x = 505 b + 504 b', b = 20 a + 19 a', a = 4 y + 3 y' (csrc/smudging.hpp): every level's
    pair is coprime, every level's input sigma is >= sqrt(2) * z * eta_eps(Z) (MW17, Theorem 3;
    eta in units of sigma), and the variances multiply to 2**40 exactly."""
    eps_bits = native.SMUDGING_EPS_BITS
    eta = math.sqrt(math.log(2 + 2 * 2.0 ** eps_bits) / math.pi) / math.sqrt(2 * math.pi)
    variance = _smudging_sigma0_squared()
    for z, w in native.SMUDGING_LEVELS:
        assert math.gcd(z, w) == 1
        assert math.sqrt(variance) >= math.sqrt(2) * max(z, w) * eta, (z, w)
        variance *= z * z + w * w
    assert variance == 2 ** 40 and eps_bits >= 100


def test_smudging_base_table_is_the_exact_cdf_within_2_pow_minus_100():
    """Every 126-bit threshold of the base table against the CDF of D_{Z, sigma0} computed here
    in 60-digit decimal arithmetic; and the tail the table folds in is below 2**-100."""
    from decimal import Decimal, getcontext
    getcontext().prec = 60
    s2 = _smudging_sigma0_squared()
    hi, lo = native.smudging_table()
    m = len(hi)
    weights = [Decimal(1)] + [2 * (-(Decimal(k * k * s2.denominator) /
                                     (2 * s2.numerator))).exp() for k in range(1, 3 * m)]
    total = sum(weights)
    cdf = Decimal(0)
    for k in range(m):
        cdf += weights[k] / total
        got = (Decimal(int(hi[k])) * 2 ** 63 + Decimal(int(lo[k]))) / Decimal(2) ** 126
        assert abs(got - cdf) < Decimal(2) ** -100, k
    assert 1 - cdf < Decimal(2) ** -100


def test_smudging_base_draws_pass_chi_square():
    y = native.smudging_sample(400_000, True)
    s2 = float(_smudging_sigma0_squared())
    support = np.arange(-60, 61)
    p = np.exp(-support.astype(float) ** 2 / (2 * s2))
    p /= p.sum()
    var = float((p * support ** 2).sum())
    assert abs(y.mean()) < 5 * math.sqrt(var / y.size)
    assert abs(y.var() / var - 1) < 6 * math.sqrt(2 / y.size)
    counts = np.bincount(np.clip(y + 60, 0, 120), minlength=121)
    expected = p * y.size
    keep = expected >= 20
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    chi2 += (counts[~keep].sum() - expected[~keep].sum()) ** 2 / max(expected[~keep].sum(), 1.0)
    dof = int(keep.sum())
    assert chi2 < dof + 6 * math.sqrt(2 * dof)


def _exact_base_draw(word: int, extra: int, hi, lo) -> int:
    """The base draw of a word with every bit of every threshold compared (smudging.cpp's
    definition): |y| = #{k: (hi, lo) <= (word >> 1, extra >> 1)} on the 126-bit thresholds,
    strictly below in the high half; the sign from bit 0."""
    u, v = word >> 1, extra >> 1
    mag = sum(1 for h, l in zip(hi, lo) if int(h) < u or (int(h) == u and int(l) <= v))
    return -mag if word & 1 else mag


@pytest.mark.parametrize("ties", [1, 2, 3, 4, 8])
def test_smudging_fast_scan_settles_every_tie_exactly(ties):
    """The 31-bit scan reports a tie wherever a word's top 31 bits equal a threshold's; each
    tie is settled with every bit, whether the block has at most two (the masked passes) or
    more (the plain loop): every draw equals the exact 126-bit comparison."""
    hi, lo = native.smudging_table()
    rng = np.random.default_rng(ties)
    words = [int(w) for w in rng.integers(0, 2 ** 63, 61, dtype=np.uint64) * 2
             + rng.integers(0, 2, 61, dtype=np.uint64)]
    words += [0, 1, 2 ** 64 - 2]  # the bottom, and a top of 2^31 - 1: a tie past the scan
    edge = []  # with the last word above: ties words that tie
    for j in range(ties - 1):  # a word equal to a threshold's high half, or just beside it
        k = int(rng.integers(0, len(hi)))
        u = int(hi[k]) + int(rng.integers(-1, 2))
        edge.append(((min(max(u, 0), 2 ** 63 - 1)) << 1) | (j & 1))
    positions = rng.choice(len(words) + len(edge), len(edge), replace=False)
    for at, word in sorted(zip(positions, edge)):
        words.insert(int(at), word)
    extra = int(lo[7]) << 1  # the same low bits for every settled tie: order does not matter
    got = native.smudging_base_from_words(np.array(words, dtype=np.uint64),
                                          np.full(2 + ties, extra, dtype=np.uint64))
    want = [_exact_base_draw(w, extra, hi, lo) for w in words]
    assert got.tolist() == want


def test_smudging_base_from_words_refuses_too_few_extra_words():
    hi, _ = native.smudging_table()
    tied = [int(hi[3]) << 1] * 3  # 3 ties: 2 extra words for the masked passes, then 1 each
    with pytest.raises(fs.ParameterError, match="extra words"):
        native.smudging_base_from_words(np.array(tied, dtype=np.uint64),
                                        np.zeros(2, dtype=np.uint64))


def test_smudging_noise_is_a_gaussian_of_variance_2_pow_40():
    """2**20 samples: moments (mean, variance, a Gaussian's kurtosis 3) within 5 standard
    errors, a chi-square over 64 bins of sigma / 8 with the tails pooled, and the tails."""
    x = native.smudging_sample(1 << 20).astype(np.float64)
    sigma = 2.0 ** 20
    z = x / sigma
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)
    assert abs((z ** 4).mean() / z.var() ** 2 - 3) < 5 * math.sqrt(24 / z.size)
    edges = np.arange(-32, 33) / 8.0  # in units of sigma; every edge an integer multiple
    cdf = np.array([0.5 * (1 + math.erf(e / math.sqrt(2))) for e in edges])
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]])) * z.size
    counts = np.bincount(np.searchsorted(edges, z, side="right"), minlength=len(edges) + 1)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)
    assert np.max(np.abs(z)) < 7


# --- AES-256-CTR: a's expansion and the noise generator ---------------------------------------

@pytest.mark.skipif(not native.HAVE_AES_NI, reason="this CPU has no AES-NI")
def test_aes256_ctr_matches_sp800_38a_and_cryptography():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    # NIST SP 800-38A, F.5.5 (CTR-AES256.Encrypt), blocks 1 and 2
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    stream = native.aes256_ctr(key, counter, 2)
    assert bytes(a ^ b for a, b in zip(stream, plain)).hex() == (
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5")
    # the counter is one 128-bit big-endian integer: the carry crosses the 64-bit halves
    for start in ("00000000000000fffffffffffffffff9", "ffffffffffffffffffffffffffffffff"):
        c = bytes.fromhex(start)
        want = Cipher(algorithms.AES(key), modes.CTR(c)).encryptor().update(bytes(16 * 21))
        assert native.aes256_ctr(key, c, 21) == want


@pytest.mark.skipif(not native.HAVE_AES_NI, reason="this CPU has no AES-NI")
def test_native_expansion_is_the_cryptography_packages(client_ctx, flood_keys):
    """The native expansion of a (inside encryption and decryption) is bit for bit the wire
    format's, which he/seeded.py computes with the `cryptography` package."""
    from fedshield.he import seeded
    for ctx in (client_ctx, flood_keys.client_context()):
        seed, n = bytes(range(32)), ctx.params.ring_dim
        want = seeded.expand(seed, ctx.fingerprint, 5, 3, ctx.moduli, n)
        key = seeded.stream_key(ctx.fingerprint, 5, seed)
        got = np.concatenate([native.expand_uniform(key, k, t, q, n) for k in range(3)
                              for t, q in enumerate(ctx.moduli)])
        assert np.array_equal(got, want)


# --- safety ----------------------------------------------------------------------------------

KEY_DEPENDENT = ("csub", "add_q", "sub_q", "mul_shoup", "mul_shoup_lazy", "signed_mod",
                 "mul_acc", "error_block", "ternary_sample", "ntt_fwd", "fwd_level", "ntt_inv",
                 "avx_csub",
                 "avx_twiddle", "avx_mul_shoup", "avx_pairs", "avx_unpacked", "avx_ntt_fwd",
                 "avx_ntt_inv")


@pytest.mark.parametrize("source, names", [("ckks.cpp", KEY_DEPENDENT),
                                           ("smudging.cpp", ("base_block", "settle_tie",
                                                             "find_ties", "put_settled"))])
def test_key_dependent_helpers_have_no_branches_or_lookups_by_value(source, names):
    """The helpers every key-, noise- or plaintext-dependent loop of csrc/ckks.cpp goes through,
    and the smudging sampler's table scan, compute with masks: no if, no ?:, no early exit, no
    array indexed by a computed value."""
    src = (Path(__file__).resolve().parents[1] / "csrc" / source).read_text()
    for name in names:
        m = re.search(r"\n(?:FEDSHIELD_\w+ )?(?:inline )?[\w:<>]+ " + name + r"\(([^)]*)\) \{(.*?)\n\}",
                      src, re.S)
        assert m, f"{name} not found in csrc/{source}"
        body = m.group(2)
        # the only ?: allowed picks a block's length, a public count
        body = body.replace("count - at < kLane ? count - at : kLane", "")
        body = body.replace("i < m ? static_cast<int64_t>(words[at + i] >> 1) : 0", "")
        body = body.replace("i < m ? static_cast<int32_t>(words[at + i] >> 33) : 0", "")
        assert not re.search(r"\bif\b|\?|\bbreak\b|\breturn\b.*\breturn\b", body), name
        # array indexing only by loop counters and positions of fixed bounds (or stride)
        for index in re.findall(r"\w+\[([^\]]+)\]", body):
            assert index.isdigit() or index in ("i", "j", "k", "m + i", "h + i", "at + i",
                                                "kLane", "2 * i", "2 * i + 1"), \
                f"{name} indexes by {index!r}"


def _ntt_primes(bits: int, count: int, two_n: int = 16384) -> list[tuple[int, int]]:
    """The `count` largest primes q < 2**bits with two_n | q - 1, each with a primitive
    two_n-th root of unity mod q."""
    found, q = [], (2 ** bits - 1) // two_n * two_n + 1
    while len(found) < count:
        if all(pow(b, q - 1, q) == 1 for b in (2, 3, 5, 7, 11, 13, 17, 19, 23)):
            psi = next(r for r in (pow(g, (q - 1) // two_n, q) for g in range(2, 200))
                       if pow(r, two_n // 2, q) == q - 1)
            found.append((q, psi))
        q -= two_n
    return found


@pytest.mark.parametrize("bits", [60, 55])
def test_avx2_ntt_is_the_scalar_ntt_bit_for_bit(bits):
    """The four-lane 64-bit NTT (moduli in [2^50, 2^60), threshold keys' tower) against the
    scalar Shoup path it replaces, both directions, and the forward one against flood.cpp's
    separate implementation: the same residues, fully reduced, for random inputs and the edge
    values 0 and q - 1."""
    rng = np.random.default_rng(bits)
    for q, psi_max in _ntt_primes(bits, 3):
        if native.ckks_ntt_path(8192, q) != "avx2":
            pytest.skip("this CPU has no AVX2: the scalar path is the only one")
        for n in (16, 1024, 8192):
            psi = pow(psi_max, 8192 // n, q)
            inputs = [rng.integers(0, q, n, dtype=np.uint64),
                      np.where(rng.random(n) < 0.5, 0, q - 1).astype(np.uint64),
                      np.full(n, q - 1, dtype=np.uint64), np.zeros(n, dtype=np.uint64)]
            for a in inputs:
                fwd = native.ckks_ntt(a, q, psi, False, "scalar")
                inv = native.ckks_ntt(a, q, psi, True, "scalar")
                assert np.array_equal(native.ckks_ntt(a, q, psi, False, "avx2"), fwd), (q, n)
                assert np.array_equal(native.ckks_ntt(a, q, psi, True, "avx2"), inv), (q, n)
                assert np.array_equal(native.ckks_ntt(a, q, psi), fwd)  # 'auto' takes avx2
                assert np.array_equal(fwd, native.ntt_forward(a, q, psi))
                assert np.array_equal(native.ckks_ntt(fwd, q, psi, True, "avx2"), a)
                assert fwd.max() < q and inv.max() < q


def _fft(v: np.ndarray, inverse: bool = False, path: str = "auto") -> np.ndarray:
    out = v.copy()
    native.ckks_fft(out, inverse, path)  # in place
    return out


def test_avx2_special_fft_is_the_scalar_fft_bit_for_bit():
    """Encoding's special FFT with AVX2 (bit reversal fused into the first levels, two or three
    levels per pass) against the plain loops it must equal: the same doubles, both directions,
    for values of very different sizes (each rounding step must be the same one)."""
    rng = np.random.default_rng(22)
    try:
        _fft(np.zeros(64), False, "avx2")
    except fs.ParameterError:
        pytest.skip("this CPU has no AVX2: the scalar path is the only one")
    for n in (16, 64, 4096, 8192, 16384):
        inputs = [rng.standard_normal(n), rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)]
        for v in inputs:
            for inverse in (False, True):
                want = _fft(v, inverse, "scalar")
                got = _fft(v, inverse, "auto" if n == 16 else "avx2")
                assert np.array_equal(got.view(np.uint64), want.view(np.uint64)), (n, inverse)
            assert np.allclose(_fft(_fft(v, True)), v, rtol=0, atol=1e-9 * np.abs(v).max())
    with pytest.raises(fs.ParameterError, match="N >= 32"):
        _fft(np.zeros(16), False, "avx2")  # 8 slots: the plain loops only
    with pytest.raises(fs.ParameterError, match="power of two"):
        _fft(np.zeros(24))
    with pytest.raises(ValueError, match="path"):
        _fft(np.zeros(16), False, "fast")
    with pytest.raises(ValueError, match="float64"):
        _fft(np.zeros(16, np.float32))


def test_ntt_paths_are_refused_where_they_cannot_run():
    (q, psi), = _ntt_primes(61, 1, 32)
    assert native.ckks_ntt_path(16, q) == "scalar"  # q >= 2^60: beyond the four-lane bounds
    with pytest.raises(fs.ParameterError, match="2\\^60"):
        native.ckks_ntt(np.zeros(16, np.uint64), q, psi, False, "avx2")
    for gone in ("fast", "fp"):  # "fp": the double-precision NTT, which no CPU took, is gone
        with pytest.raises(ValueError, match="path"):
            native.ckks_ntt(np.zeros(16, np.uint64), q, psi, False, gone)
    with pytest.raises(fs.ParameterError, match="below the modulus"):
        native.ckks_ntt(np.full(16, q, np.uint64), q, psi)
    with pytest.raises(fs.ParameterError, match="power of two"):
        native.ckks_ntt(np.zeros(24, np.uint64), q, psi)


def test_decrypted_and_packed_plaintexts_are_wiped(client_ctx, monkeypatch):
    state = _state(8)
    layout = fs.Layout.from_state_dict(state)
    kept = {}
    real_pack, real_decrypt = encryption.pack_update, native.ckks_decrypt

    def pack(*args, **kw):
        kept["packed"] = real_pack(*args, **kw)
        return kept["packed"]

    def decrypt(*args, **kw):
        kept["decrypted"] = real_decrypt(*args, **kw)
        return kept["decrypted"]

    monkeypatch.setattr(encryption, "pack_update", pack)
    monkeypatch.setattr(native, "ckks_decrypt", decrypt)
    upd = fs.encrypt_update(client_ctx, state, layout)
    avg = fs.decrypt_update(client_ctx, upd, layout)
    assert np.max(np.abs(_flat(avg) - _flat(state))) < TOL
    assert not kept["packed"].buffer.any() and not kept["decrypted"].any()


def test_bad_arguments_are_refused(client_ctx, small_update):
    ring = ckks_ring(client_ctx)
    s = _secret_residues(client_ctx)
    n_values = small_update.n_ciphertexts * client_ctx.params.values_per_ciphertext
    with pytest.raises(fs.InvalidUpdate, match="expanded c1"):
        native.ckks_decrypt(small_update.to_bytes(), ring, s, None, [], 0, 0, n_values, 1)
    with pytest.raises(fs.ParameterError, match="root"):
        native.ckks_decrypt(small_update.to_bytes(), (*ring[:2], [3], *ring[3:]), s, None, [],
                             0, 0, n_values, 1)
    with pytest.raises(fs.ParameterError, match="output holds"):
        native.ckks_decrypt(small_update.to_bytes(), ring, s, np.zeros(4096, np.uint64), [],
                             0, 0, n_values + 1, 1)
    with pytest.raises(fs.IncompatibleUpdate, match="seeded"):
        native.ckks_partial_decrypt(small_update.to_bytes(), ring, s, True, 0, 0, 1)
    with pytest.raises(fs.HeadroomError, match="not finite"):
        native.ckks_encode(ring, np.full(client_ctx.params.values_per_ciphertext, np.nan))
    with pytest.raises(fs.InvalidUpdate, match="partial decryption"):
        native.ckks_fuse([[b"\x00" * 10]], ring, client_ctx.params.values_per_ciphertext, 1)


# --- fuzz targets ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def threshold_aggregate(threshold_keys):
    parties, server = threshold_keys
    state = _state(9, 300)
    layout = fs.Layout.from_state_dict(state)
    agg = fs.aggregate(server, [fs.encrypt_update(parties[k], state, layout) for k in (0, 1)])
    shares = [partial.PartialDecryption.from_bytes(partial.partial_decrypt(p, agg)).parts
              for p in parties]
    return agg, shares


@fuzz_settings(60)
@given(ops=MUTATIONS)
def test_fuzz_native_decrypt(client_ctx, small_update, ops):
    """Mutated (and re-checksummed) updates reach the native decryption as fs errors or as
    some decryption, never a crash."""
    from fedshield.he import seeded
    upd = small_update
    c1 = seeded.expand_sum(upd.seeds, client_ctx.fingerprint, upd.round, upd.n_ciphertexts,
                           client_ctx.moduli, client_ctx.params.ring_dim)
    n_values = upd.n_ciphertexts * client_ctx.params.values_per_ciphertext
    for data in (mutate(upd.to_bytes(), ops), reseal_update(mutate(upd.to_bytes(), ops))):
        try:
            native.ckks_decrypt(data, ckks_ring(client_ctx),
                                 _secret_residues(client_ctx), c1, [], 0, 0, n_values,
                                 1)
        except (fs.InvalidUpdate, fs.IncompatibleUpdate, fs.ParameterError):
            pass


@fuzz_settings(60)
@given(ops=MUTATIONS)
def test_fuzz_native_partial_and_fusion(threshold_keys, threshold_aggregate, ops):
    parties, server = threshold_keys
    agg, shares = threshold_aggregate
    ring = ckks_ring(server)
    n_values = agg.n_ciphertexts * server.params.values_per_ciphertext
    bad = [[mutate(part, ops, head=64) for part in shares[0]], *shares[1:]]
    try:
        native.ckks_fuse(bad, ring, n_values, 1)
    except (fs.InvalidUpdate, fs.ParameterError):
        pass
    key = np.ascontiguousarray(np.concatenate([r for _, r in parties[0].key_residues()]))
    for data in (mutate(agg.to_bytes(), ops), reseal_update(mutate(agg.to_bytes(), ops))):
        try:
            native.ckks_partial_decrypt(data, ring, key, True, 0, 0, 1)
        except (fs.InvalidUpdate, fs.IncompatibleUpdate, fs.ParameterError):
            pass
