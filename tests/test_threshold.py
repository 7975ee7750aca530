"""Threshold mode: multiparty key generation, partial decryption, t-of-n key sharing, key files."""

from __future__ import annotations

import math
import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import native
from fedshield.he import threshold as th
from fedshield.he.frames import CHECKSUM, CHECKSUMMED, DIGEST, frame, unframe
from fedshield.he.partial import PARTIAL_MAGIC, PartialDecryption

from conftest import make_state, weighted_average
from forgery import build_context, seal_frame, split_context

WEIGHT_BOUND = 2.0 ** 16  # a common bound for the parties of one aggregate
# Max |error| of one decrypted slot value at scale 2**50 (OpenFHE's multiparty flooding noise;
# measured ~6e-7 with 3 parties, ~8e-7 with 5). The weighted average divides by
# sum(w)/weight_bound, which scales it by weight_bound/sum(w).
SLOT_TOLERANCE = 2e-6


def round_bound(weights) -> float:
    """The weight bound of a round: the next power of two of its largest weight."""
    return float(2 ** math.ceil(math.log2(max(weights))))


# The engines' threshold profile (their Server sends each round's weight bound): one tower, so
# OpenFHE's own calls on these contexts see the values at the context's scale. The default
# parameters' two-tower profile is tested through the documented calls in test_weights.py.
ONE_TOWER = fs.CKKSParams.for_precision(keys="threshold", max_weight=0)


def tolerance(weights) -> float:
    return SLOT_TOLERANCE * round_bound(weights) / sum(weights) + 1e-7  # + float32 rounding


class Federation:
    def __init__(self, n_parties: int, threshold=None, weights=None,
                 params=ONE_TOWER) -> None:
        self.parties, self.server = fs.keygen_threshold(params, n_parties, threshold)
        self.states = [make_state(100 + i) for i in range(n_parties)]
        self.layout = fs.Layout.from_state_dict(self.states[0])
        # weights summing to the bound: the slot error reaches the average unamplified
        self.weights = weights or [WEIGHT_BOUND / n_parties] * n_parties
        self.updates = [fs.encrypt_update(p, s, self.layout, weight=w,
                                          weight_bound=round_bound(self.weights))
                        for p, s, w in zip(self.parties, self.states, self.weights)]
        self.agg = fs.aggregate(self.server, self.updates)
        self.reference = weighted_average(self.states, self.weights)

    def shares(self, ids, present=None, agg=None):
        return [fs.partial_decrypt(self.parties[i], agg or self.agg, present) for i in ids]

    def combine(self, shares, agg=None):
        return fs.combine_partials(agg or self.agg, shares, self.layout, ctx=self.parties[0])

    def check(self, out, weights=None) -> None:
        tol = tolerance(weights or self.weights)
        for name, ref in self.reference.items():
            err = np.abs(out[name].double().numpy() - ref)
            assert err.max() <= tol, (name, int(err.argmax()), float(err.max()), tol)


@pytest.fixture(scope="module")
def n_of_n() -> Federation:
    return Federation(3)


@pytest.fixture(scope="module")
def t_of_n() -> Federation:
    return Federation(5, threshold=3)


def secret_residues(ctx: fs.Context) -> bytes:
    offset = native.locate_key_residues(ctx.secret_key_bytes(), ctx.params.ring_dim, ctx.modulus)
    return ctx.secret_key_bytes()[offset:offset + 8 * ctx.params.ring_dim]


def contains_window(data: bytes, secret: bytes, window: int = 64) -> bool:
    """True if any 64-byte window of ``secret`` (at any 8-byte step) occurs anywhere in data."""
    windows = {secret[i:i + window] for i in range(0, len(secret) - window + 1, 8)}
    return any(data[i:i + window] in windows for i in range(len(data) - window + 1))


# -- who can decrypt ---------------------------------------------------------------------------
def test_server_context_cannot_decrypt(n_of_n):
    server = n_of_n.server
    assert server.has_secret_key is False and not server.is_party
    with pytest.raises(fs.KeyMaterialError, match="no secret key"):
        fs.decrypt_update(server, n_of_n.agg, n_of_n.layout)
    with pytest.raises(fs.KeyMaterialError):
        server.to_bytes(include_secret=True)
    with pytest.raises(fs.KeyMaterialError, match="not a threshold party"):
        fs.partial_decrypt(server, n_of_n.agg)


def test_one_party_alone_cannot_decrypt(n_of_n):
    party = n_of_n.parties[1]
    assert party.has_secret_key is False and party.is_party
    assert (party.party_id, party.n_parties, party.threshold) == (1, 3, 3)
    with pytest.raises(fs.KeyMaterialError, match="party 1's key share"):
        fs.decrypt_update(party, n_of_n.agg, n_of_n.layout)
    with pytest.raises(fs.NotEnoughShares, match="1 shares given, 3 needed"):
        fs.combine_partials(n_of_n.agg, n_of_n.shares([1]), n_of_n.layout, ctx=party)
    with pytest.raises(fs.NotEnoughShares, match="0 partial"):
        fs.combine_partials(n_of_n.agg, [], n_of_n.layout, ctx=party)


def test_party_and_server_contexts_share_the_fingerprint(t_of_n):
    assert {p.fingerprint for p in t_of_n.parties} == {t_of_n.server.fingerprint}
    assert {u.context_fingerprint for u in t_of_n.updates} == {t_of_n.server.fingerprint}


def test_n_of_n_decrypts_with_every_share(n_of_n):
    n_of_n.check(n_of_n.combine(n_of_n.shares([2, 0, 1])))


def test_n_minus_one_shares_fail_in_n_of_n(n_of_n):
    with pytest.raises(fs.NotEnoughShares, match=r"2 shares given, 3 needed.*missing parties \[2\]"):
        n_of_n.combine(n_of_n.shares([0, 1]))
    with pytest.raises(fs.NotEnoughShares, match="2 parties present"):
        fs.partial_decrypt(n_of_n.parties[0], n_of_n.agg, present=[0, 1])


@pytest.mark.parametrize("present", [None, [0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 2, 4],
                                     [1, 3, 4], [1, 2, 3, 4]])
def test_t_of_n_decrypts_with_any_present_set(t_of_n, present):
    ids = present or range(5)
    shares = t_of_n.shares(ids, present)
    t_of_n.check(t_of_n.combine(shares[::-1]))


def test_t_of_n_fails_with_fewer_than_t(t_of_n):
    with pytest.raises(fs.NotEnoughShares, match="2 parties present"):
        fs.partial_decrypt(t_of_n.parties[1], t_of_n.agg, present=[1, 2])
    shares = t_of_n.shares([1, 2, 4], [1, 2, 4])
    with pytest.raises(fs.NotEnoughShares, match=r"2 shares given, 3 needed.*missing parties \[4\]"):
        t_of_n.combine(shares[:2])


def test_realistic_weights_stay_within_the_documented_tolerance():
    weights = [120.0, 75.0, 300.0]
    fed = Federation(3, threshold=2, weights=weights)
    fed.check(fed.combine(fed.shares([0, 2], [0, 2])), weights)


@pytest.mark.parametrize("flood_bits", [0, 30])
@pytest.mark.parametrize("weights", [(5.0, 1.0, 4.0), (1.0, 1e6, 3.0)])
def test_tiny_and_huge_weights_stay_within_1e6(weights, flood_bits):
    """Example counts of small and huge sites, with the round's bound (the next power of two
    of the largest): <= 1e-6 absolute on values in [-1, 1], flooded or not."""
    params = fs.CKKSParams.for_precision(keys="threshold", flood_bits=flood_bits)
    fed = Federation(3, threshold=2, weights=list(weights), params=params)
    out = fed.combine(fed.shares([0, 2], [0, 2]))
    err = max(float(np.abs(out[n].double().numpy() - r).max()) for n, r in fed.reference.items())
    assert err <= 1e-6, err


# -- bad shares and bad partial_decrypt calls -----------------------------------------------------
def test_bad_shares_are_rejected(t_of_n, n_of_n):
    agg, layout, ctx = t_of_n.agg, t_of_n.layout, t_of_n.parties[0]
    good = t_of_n.shares([0, 1, 2], [0, 1, 2])
    with pytest.raises(fs.InvalidUpdate, match="two shares of party 1"):
        fs.combine_partials(agg, good + [good[1]], layout, ctx=ctx)
    other = t_of_n.shares([1, 2, 3], [1, 2, 3])
    with pytest.raises(fs.IncompatibleUpdate, match="present="):
        fs.combine_partials(agg, good[:2] + other[1:2], layout, ctx=ctx)
    other_agg = fs.aggregate(t_of_n.server, t_of_n.updates[:2])
    with pytest.raises(fs.IncompatibleUpdate, match="different aggregate"):
        fs.combine_partials(other_agg, good, layout, ctx=ctx)
    with pytest.raises(fs.IncompatibleUpdate, match="another context"):
        fs.combine_partials(agg, n_of_n.shares([0, 1, 2]), layout, ctx=ctx)
    corrupted = bytearray(good[2])
    corrupted[len(corrupted) // 2] ^= 1
    for bad in (bytes(corrupted), good[2][:100], good[2][:-1], b"", b"FSHLDPDS" + bytes(64)):
        with pytest.raises(fs.InvalidUpdate):
            fs.combine_partials(agg, good[:2] + [bad], layout, ctx=ctx)
    with pytest.raises(TypeError):
        fs.combine_partials(agg, good[0], layout, ctx=ctx)
    with pytest.raises(fs.IncompatibleUpdate, match="another layout"):
        fs.combine_partials(agg, good, fs.Layout.from_state_dict({"x": torch.zeros(3)}), ctx=ctx)


def _as_sha256_frame(blob: bytes) -> bytes:
    """The frame as written before the checksum: version field without CHECKSUMMED, SHA-256."""
    body = bytearray(blob[:-CHECKSUM])
    version = int.from_bytes(body[8:10], "little")
    assert version & CHECKSUMMED
    body[8:10] = (version & ~CHECKSUMMED).to_bytes(2, "little")
    return seal_frame(body)


def test_shares_framed_before_the_checksum_still_fuse(t_of_n):
    """Shares are framed with the 8-byte wire checksum now; shares framed with the SHA-256
    trailer before it fuse to the same average, and a damaged one is refused the same way."""
    agg, layout, ctx = t_of_n.agg, t_of_n.layout, t_of_n.parties[0]
    good = t_of_n.shares([0, 1, 2], [0, 1, 2])
    assert all(int.from_bytes(share[8:10], "little") & CHECKSUMMED for share in good)
    old = [_as_sha256_frame(share) for share in good]
    assert [len(o) - len(g) for o, g in zip(old, good)] == [DIGEST - CHECKSUM] * 3
    want = fs.combine_partials(agg, good, layout, ctx=ctx)
    got = fs.combine_partials(agg, old[:2] + good[2:], layout, ctx=ctx)
    assert all(torch.equal(got[name], want[name]) for name in want)
    damaged = bytearray(old[1])
    damaged[len(damaged) // 2] ^= 4
    with pytest.raises(fs.InvalidUpdate, match="corrupted"):
        fs.combine_partials(agg, [good[0], bytes(damaged), good[2]], layout, ctx=ctx)
    with pytest.raises(ValueError, match="below 32768"):
        frame(PARTIAL_MAGIC, {}, [], version=CHECKSUMMED)


def test_forged_share_headers_are_rejected(t_of_n):
    good = t_of_n.shares([0, 1, 2], [0, 1, 2])

    def reframe(blob, **changes):
        meta, sections = unframe(blob, PARTIAL_MAGIC, "share", fs.InvalidUpdate)
        meta.update(changes)
        meta.pop("sizes")
        return frame(PARTIAL_MAGIC, meta, sections)

    with pytest.raises(fs.InvalidUpdate, match="lead flag"):
        t_of_n.combine([reframe(good[0], lead=False)] + good[1:])
    with pytest.raises(fs.IncompatibleUpdate, match="not among the present"):
        t_of_n.combine(good[:2] + [reframe(good[2], party_id=3)])
    with pytest.raises(fs.InvalidUpdate, match="malformed"):
        t_of_n.combine(good[:2] + [reframe(good[2], party_id=-1)])
    with pytest.raises(fs.InvalidUpdate, match="partial ciphertext"):
        t_of_n.combine(good[:2] + [frame(
            PARTIAL_MAGIC, {k: v for k, v in json.loads(json.dumps(
                unframe(good[2], PARTIAL_MAGIC, "s", fs.InvalidUpdate)[0])).items()
                if k != "sizes"}, [b"garbage"])])


def test_partial_decrypt_rejects_bad_calls(t_of_n, n_of_n):
    party = t_of_n.parties[0]
    with pytest.raises(fs.IncompatibleUpdate, match="only decrypt aggregates"):
        fs.partial_decrypt(party, t_of_n.updates[0])
    with pytest.raises(fs.IncompatibleUpdate, match="another context"):
        fs.partial_decrypt(party, n_of_n.agg)
    with pytest.raises(fs.ParameterError, match="not among the present"):
        fs.partial_decrypt(party, t_of_n.agg, present=[1, 2, 3])
    for bad in ([0, 1, 7], [0, 1, -1], [0, 1, "2"], 5):
        with pytest.raises(fs.ParameterError):
            fs.partial_decrypt(party, t_of_n.agg, present=bad)
    with pytest.raises(fs.InvalidUpdate):
        fs.partial_decrypt(party, b"not an update")
    with pytest.raises(TypeError):
        fs.partial_decrypt(party, 42)


def _collective(n: int, t: int, params=ONE_TOWER, seed: bytes | None = None):
    """Every party's key share and b_i under one seed's a (no shares dealt)."""
    seed = seed or os.urandom(th.SEED_BYTES)
    return seed, [th.start_keygen(params, n, t, i, seed) for i in range(n)]


def test_party_without_key_shares_cannot_cover_for_the_absent():
    seed, states = _collective(3, 2)
    contributions = [s.contribution for s in states]
    parties = [th.finish_keygen(s, contributions) for s in states]
    server = th.server_context(contributions, ONE_TOWER, 3, 2, seed)
    layout = fs.Layout.from_state_dict(make_state(1))
    agg = fs.aggregate(server, [fs.encrypt_update(parties[i], make_state(i), layout)
                                for i in range(2)])
    with pytest.raises(fs.KeyMaterialError, match=r"no key share from absent parties \[2\]"):
        fs.partial_decrypt(parties[0], agg, present=[0, 1])


# -- collective key generation as bytes --------------------------------------------------------
def test_every_party_uses_the_seed_s_a_and_a_fresh_key_share():
    seed, states = _collective(3, 3)
    n, moduli = ONE_TOWER.ring_dim, states[0].moduli
    a = th.packed_a(seed, n, moduli)
    for state in states:   # (b_i, a): OpenFHE kept the common a
        blob = state.own_context.public_key_bytes()
        offsets = native.find_residue_arrays(blob, n, list(moduli), 2 * len(moduli))
        residues = np.concatenate([np.frombuffer(blob, dtype="<u8", count=n, offset=o)
                                   for o in offsets[len(moduli):]])
        assert bytes(native.pack_key_polys(residues, n, list(moduli), 1)) == a
    assert len({s.contribution for s in states}) == 3
    assert len({s.commitment for s in states}) == 3
    assert th.packed_a(os.urandom(32), n, moduli) != a
    # the same party, seed and b_i commit the same; any other b_i or party does not
    assert th.commitment(seed, 0, states[0].contribution) == states[0].commitment
    assert th.commitment(seed, 1, states[0].contribution) != states[0].commitment
    for bad in (b"short", 42, "x" * 32):
        with pytest.raises(fs.ParameterError):
            th.start_keygen(ONE_TOWER, 3, 3, 0, bad)
    for party in (3, -1, True, "0"):
        with pytest.raises(fs.ParameterError):
            th.start_keygen(ONE_TOWER, 3, 3, party, seed)


def test_the_seed_binds_parameters_roster_and_epoch():
    roster = [bytes([i]) * 32 for i in range(3)]
    base = th.keygen_seed(ONE_TOWER, 3, 2, roster, 1)
    assert th.keygen_seed(ONE_TOWER, 3, 2, roster, 1) == base
    assert len({base, th.keygen_seed(ONE_TOWER, 3, 2, roster, 2),
                th.keygen_seed(ONE_TOWER, 3, 3, roster, 1),
                th.keygen_seed(ONE_TOWER, 3, 2, roster[::-1], 1),
                th.keygen_seed(fs.CKKSParams.for_precision(keys="threshold", flood_bits=30),
                               3, 2, roster, 1)}) == 5


def test_the_joint_key_works_with_openfhe_s_own_multiparty_decryption():
    """OpenFHE encrypts under the joint key of collective key generation, and its own
    MultipartyDecryptLead/Main/Fusion with the parties' key shares decrypts it."""
    seed, states = _collective(3, 3)
    contributions = [s.contribution for s in states]
    parties = [th.finish_keygen(s, contributions) for s in states]
    cc, pk, _ = parties[0].openfhe_objects()
    values = [0.25 * i - 1.0 for i in range(9)]
    ct = cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(values))
    keys = [p.openfhe_objects(need_secret=True)[2] for p in parties]
    shares = [cc.MultipartyDecryptLead([ct], keys[0])[0]]
    shares += [cc.MultipartyDecryptMain([ct], k)[0] for k in keys[1:]]
    out = cc.MultipartyDecryptFusion(shares)
    out.SetLength(len(values))
    got = np.array([v.real for v in out.GetCKKSPackedValue()])
    assert np.abs(got - values).max() < 1e-6
    # one key share short: noise
    out = cc.MultipartyDecryptFusion(shares[:2])
    out.SetLength(len(values))
    assert np.abs(np.array([v.real for v in out.GetCKKSPackedValue()]) - values).max() > 1


def test_keygen_protocol_bytes_only_and_bad_messages():
    params = ONE_TOWER
    seed, states = _collective(3, 2, params)
    messages = [th.contribution_message(s) for s in states]
    got = th.read_contribution(bytearray(messages[1]), params, 3, 2, seed, states[1].moduli)
    assert got.sender == 1 and got.packed == states[1].contribution
    assert th.read_contribution(messages[1], params, 3, 2, seed).moduli == states[1].moduli
    with pytest.raises(fs.KeyMaterialError, match="seed="):
        th.read_contribution(messages[1], params, 3, 2, os.urandom(32))
    with pytest.raises(fs.KeyMaterialError, match="n_parties=3"):
        th.read_contribution(messages[1], params, 4, 3, seed)   # another federation's
    with pytest.raises(fs.KeyMaterialError, match="tower moduli"):
        th.read_contribution(messages[1], params, 3, 2, seed, [q + 2 for q in states[1].moduli])
    bad = bytearray(messages[1])
    bad[-40] ^= 1
    meta, sections = unframe(messages[1], th.KEYGEN_MAGIC, "c", fs.KeyMaterialError,
                             version=th.KEYGEN_VERSION)
    meta.pop("sizes")
    old = frame(th.KEYGEN_MAGIC, meta, sections, version=2)   # a chain step's version
    for broken in (bytes(bad), messages[1][:50], b"", b"FSHLDCTX" + messages[1][8:], old):
        with pytest.raises(fs.KeyMaterialError):
            th.read_contribution(broken, params, 3, 2, seed)
    with pytest.raises(fs.KeyMaterialError, match="format version 2 is not supported"):
        th.read_contribution(old, params, 3, 2, seed)
    dealt = [th.deal_key_shares(s) for s in states]
    assert sorted(dealt[0]) == [1, 2]
    with pytest.raises(fs.KeyMaterialError, match="addressed to party 2"):
        th.accept_key_shares(states[1], [dealt[0][2]])
    with pytest.raises(fs.KeyMaterialError, match="already held"):
        th.accept_key_shares(states[1], [dealt[0][1], dealt[0][1]])
    _, others = _collective(3, 2, params)
    with pytest.raises(fs.KeyMaterialError, match="another key epoch"):
        th.accept_key_shares(states[1], [th.deal_key_shares(others[0])[1]])
    with pytest.raises(fs.KeyMaterialError, match="corrupted"):
        th.accept_key_shares(states[1], [dealt[0][1][:-1] + b"x"])
    states = [th.accept_key_shares(state, [dealt[j][i] for j in range(3) if j != i])
              for i, state in enumerate(states)]
    contributions = [s.contribution for s in states]
    with pytest.raises(fs.KeyMaterialError, match="contributions of all 3"):
        th.finish_keygen(states[0], contributions[:2])
    with pytest.raises(fs.KeyMaterialError, match="not the one in its place"):
        th.finish_keygen(states[0], contributions[::-1])
    parties = [th.finish_keygen(s, contributions) for s in states]
    server = fs.load_context(th.server_context(contributions, params, 3, 2, seed).to_bytes())
    assert server.fingerprint == parties[0].fingerprint
    th.check_joint_key(server, contributions, seed)   # natively: (sum b_i, a)
    with pytest.raises(fs.KeyMaterialError, match="not the sum"):
        th.check_joint_key(server, contributions[:2] + [others[2].contribution], seed)
    with pytest.raises(fs.KeyMaterialError, match="not the sum"):
        th.check_joint_key(server, contributions, os.urandom(32))
    states = [make_state(7), make_state(8)]
    layout = fs.Layout.from_state_dict(states[0])
    ups = [fs.encrypt_update(parties[i], states[i], layout, weight=WEIGHT_BOUND / 2).to_bytes()
           for i in range(2)]
    agg = fs.aggregate(server, ups).to_bytes()
    shares = [fs.partial_decrypt(parties[i], agg, present=[1, 2]) for i in (1, 2)]
    out = fs.combine_partials(agg, shares, layout, ctx=parties[1])
    ref = weighted_average(states, [1, 1])
    for name in ref:
        assert np.abs(out[name].double().numpy() - ref[name]).max() <= tolerance([WEIGHT_BOUND])


@pytest.mark.parametrize("n_parties, threshold", [(1, None), (3, 1), (4, 2), (3, 4), (3, 2.5),
                                                  (True, None), (3, 0)])
def test_keygen_threshold_rejects_bad_party_counts(n_parties, threshold):
    with pytest.raises(fs.ParameterError):
        fs.keygen_threshold(ONE_TOWER, n_parties, threshold)


def test_deal_key_shares_is_empty_in_n_of_n(n_of_n):
    _, states = _collective(3, 3)
    assert th.deal_key_shares(states[0]) == {}
    with pytest.raises(TypeError):
        th.deal_key_shares(n_of_n.server)


def test_native_shamir_reconstructs_from_any_t_points():
    q = 1152921504606748673  # the default 60-bit prime
    rng = np.random.default_rng(0)
    secret = rng.integers(0, q, size=257, dtype=np.uint64)
    shares = native.shamir_split(secret, q, 3, [1, 2, 3, 4, 5])
    for ids in ([0, 1, 2], [2, 3, 4], [0, 2, 4]):
        xs = [i + 1 for i in ids]
        acc = np.zeros(257, dtype=np.uint64)
        for k, i in enumerate(ids):
            acc = native.cover_absent(acc, [shares[i]], native.lagrange_at_zero(xs, k, q), q)
        assert (acc == secret).all()
    # t-1 shares: a fresh polynomial each time, so the same secret gives different shares
    again = native.shamir_split(secret, q, 3, [1, 2, 3, 4, 5])
    assert not (again[0] == shares[0]).all()
    with pytest.raises(fs.ParameterError, match="threshold 6"):
        native.shamir_split(secret, q, 6, [1, 2, 3, 4, 5])
    with pytest.raises(fs.ParameterError, match="distinct"):
        native.shamir_split(secret, q, 2, [1, 1])
    with pytest.raises(fs.ParameterError, match="below q"):
        native.cover_absent(np.full(3, q, dtype=np.uint64), [], 1, q)


# -- serialization, key files, and what the server sees ------------------------------------------
def test_everything_round_trips_through_bytes_and_files(t_of_n, tmp_path):
    paths = []
    for party in t_of_n.parties:
        path = tmp_path / f"party{party.party_id}.key"
        party.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        paths.append(path)
    t_of_n.server.save(tmp_path / "server.ctx")
    assert stat.S_IMODE(os.stat(tmp_path / "server.ctx").st_mode) == 0o600
    loaded = [fs.load_context(p) for p in paths]
    for a, b in zip(loaded, t_of_n.parties):
        assert (a.party_id, a.n_parties, a.threshold, a.fingerprint) == (
            b.party_id, b.n_parties, b.threshold, b.fingerprint)
        assert a.key_share_senders == b.key_share_senders and all(
            a.key_share(j) == b.key_share(j) for j in a.key_share_senders)
        assert a.secret_key_bytes() == b.secret_key_bytes()
    server = fs.load_context((tmp_path / "server.ctx").read_bytes())
    assert not server.has_secret_key and not server.is_party
    updates = [fs.encrypt_update(p, s, t_of_n.layout, weight=w).to_bytes()
               for p, s, w in zip(loaded, t_of_n.states, t_of_n.weights)]
    agg = fs.aggregate(server, updates).to_bytes()
    present = [1, 3, 4]
    shares = [bytes(fs.partial_decrypt(loaded[i], agg, present)) for i in present]
    t_of_n.check(fs.combine_partials(fs.EncryptedUpdate.from_bytes(agg), shares, t_of_n.layout,
                                     ctx=server))
    # the public bytes of a party context are a server context: no party id, no key
    public = fs.load_context(loaded[2].to_bytes())
    assert not public.is_party and not public.has_secret_key
    # saving again replaces the file atomically, still 0600, no temp files left behind
    loaded[0].save(paths[0])
    assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in paths] + ["server.ctx"])


def test_shares_and_combination_in_fresh_processes(t_of_n, tmp_path):
    """Parties decrypt from their key files and the combiner fuses, each in its own process."""
    for party in t_of_n.parties:
        party.save(tmp_path / f"party{party.party_id}.key")
    (tmp_path / "agg.bin").write_bytes(t_of_n.agg.to_bytes())
    (tmp_path / "layout.json").write_text(t_of_n.layout.to_json())
    make_shares = textwrap.dedent("""
        import sys, pathlib, fedshield as fs
        d = pathlib.Path(sys.argv[1]); present = [0, 2, 3]
        agg = (d / "agg.bin").read_bytes()
        for i in present:
            ctx = fs.load_context(d / f"party{i}.key")
            (d / f"share{i}.bin").write_bytes(fs.partial_decrypt(ctx, agg, present))
    """)
    combine = textwrap.dedent("""
        import sys, pathlib, numpy as np, fedshield as fs
        d = pathlib.Path(sys.argv[1])
        layout = fs.Layout.from_json((d / "layout.json").read_text())
        shares = [(d / f"share{i}.bin").read_bytes() for i in (3, 0, 2)]
        ctx = fs.load_context(d / "party0.key")
        out = fs.combine_partials((d / "agg.bin").read_bytes(), shares, layout, ctx=ctx)
        np.savez(d / "out.npz", **{k: v.numpy() for k, v in out.items()})
    """)
    for script in (make_shares, combine):
        subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    with np.load(tmp_path / "out.npz") as data:
        t_of_n.check({k: torch.from_numpy(data[k]) for k in data.files})


def test_server_path_bytes_hold_no_secret_key(t_of_n, tmp_path):
    t_of_n.server.save(tmp_path / "server.ctx")
    present = [1, 2, 4]
    server_side = [t_of_n.server.to_bytes(), (tmp_path / "server.ctx").read_bytes(),
                   t_of_n.agg.to_bytes(), *(u.to_bytes() for u in t_of_n.updates),
                   *(p.to_bytes() for p in t_of_n.parties),  # a party's public bytes
                   *t_of_n.shares(present, present)]
    for party in t_of_n.parties:
        secret = secret_residues(party)
        for blob in server_side:
            assert not contains_window(blob, secret), f"party {party.party_id}'s key leaked"
    # the scan does find a key where one is: the party's own key file
    party = t_of_n.parties[0]
    party.save(tmp_path / "party0.key")
    assert contains_window((tmp_path / "party0.key").read_bytes(), secret_residues(party))


def _reframe_context(blob: bytes, edit_meta=None, edit_sections=None) -> bytes:
    """Rebuilds context bytes with edited metadata/sections and a valid digest (a forgery)."""
    meta, blobs = split_context(blob)
    sections = [[name, b] for (name, _), b in zip(meta["sections"], blobs)]
    if edit_meta:
        edit_meta(meta)
    if edit_sections:
        edit_sections(sections)
    meta["sections"] = [[name, len(b)] for name, b in sections]
    return build_context(meta, [b for _, b in sections])


def test_bad_key_files_raise_key_material_error(t_of_n, n_of_n, tmp_path):
    party = t_of_n.parties[1]
    good = party.to_bytes(include_secret=True)
    assert fs.load_context(_reframe_context(good)).party_id == 1  # the forger itself is sound

    def swap_secret(sections):  # another federation's key share under this public key
        other = n_of_n.parties[1].to_bytes(include_secret=True)
        donor = dict(_sections(other))
        for s in sections:
            if s[0] == "secret_key":
                s[1] = donor["secret_key"]

    def bad_party(value):
        return lambda meta: meta.__setitem__("party", value)

    def short_share(sections):
        for s in sections:
            if s[0].startswith("key_share:"):
                s[1] = s[1][:-8]

    corrupted = bytearray(good)
    corrupted[len(good) // 3] ^= 0x10
    cases = {
        "corrupted": (bytes(corrupted), "corrupted"),
        "truncated": (good[:-100], "corrupted"),
        "empty": (b"", "not a fedshield context"),
        "wrong file": (t_of_n.agg.to_bytes(), "not a fedshield context"),
        "foreign secret key": (_reframe_context(good, edit_sections=swap_secret),
                               "does not belong"),
        "party id out of range": (_reframe_context(good, bad_party([7, 5, 3])), "malformed"),
        "threshold too low": (_reframe_context(good, bad_party([1, 5, 2])), "malformed"),
        "party not a list": (_reframe_context(good, bad_party("x")), "malformed"),
        "short key share": (_reframe_context(good, edit_sections=short_share), "malformed"),
        "party without key": (_reframe_context(
            good, edit_sections=lambda s: s.__setitem__(slice(None), [x for x in s if x[0] !=
                                                                       "secret_key"])),
            "malformed|secret key"),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(blob)
        with pytest.raises(fs.KeyMaterialError, match=message):
            fs.load_context(path)
    with pytest.raises(fs.KeyMaterialError, match="cannot read key file"):
        fs.load_context(tmp_path / "missing.key")


def _sections(blob: bytes):
    meta, sections = split_context(blob)
    return [(name, b) for (name, _), b in zip(meta["sections"], sections)]


def test_parties_refuse_an_aggregate_of_one_update():
    parties, server = fs.keygen_threshold(ONE_TOWER, n_parties=2)
    layout = fs.Layout.from_state_dict(make_state(1))
    lonely = fs.aggregate(server, [fs.encrypt_update(parties[0], make_state(1), layout)])
    with pytest.raises(fs.IncompatibleUpdate, match="at least 2"):
        fs.partial_decrypt(parties[1], lonely)


def test_shares_carry_residues_only_and_are_checked_natively(t_of_n):
    """A share's sections are its bit-packed residues (no OpenFHE bytes travel); a residue at
    or above q, a wrong size or a second tower is refused by the native check the keyless
    server runs too, before anything reaches OpenFHE."""
    good = t_of_n.shares([0, 1, 2], [0, 1, 2])
    ctx, server = t_of_n.parties[0], t_of_n.server
    n, q = ctx.params.ring_dim, ctx.modulus
    meta, sections = unframe(good[2], PARTIAL_MAGIC, "share", fs.InvalidUpdate)
    bits = q.bit_length()
    assert [len(s) for s in sections] == [native.partial_bytes(n, [q])] == [n * bits // 8]
    meta.pop("sizes")

    def with_residue(index: int, value: int) -> bytes:
        packed = int.from_bytes(sections[0], "little")
        mask = ((1 << bits) - 1) << (bits * index)
        packed = (packed & ~mask) | (value << (bits * index))
        return frame(PARTIAL_MAGIC, meta, [packed.to_bytes(len(sections[0]), "little")])

    share = PartialDecryption.from_bytes(good[2])
    share.check_for(server, t_of_n.agg)  # the server's own check passes an honest share
    for bad, needle in ((with_residue(7, q), "not below its modulus"),
                        (with_residue(n - 1, 2**bits - 1), "not below its modulus"),
                        (frame(PARTIAL_MAGIC, meta, [sections[0][:-1]]), "bytes, expected"),
                        (frame(PARTIAL_MAGIC, meta, [sections[0] * 2]), "bytes, expected")):
        with pytest.raises(fs.InvalidUpdate, match=needle):
            PartialDecryption.from_bytes(bad).check_for(server, t_of_n.agg)
        with pytest.raises(fs.InvalidUpdate, match=needle):
            t_of_n.combine(good[:2] + [bad])
    # q - 1 is a legal residue: it passes the native check and fails the range check of the
    # fused values (the residue changed, so the share no longer decrypts this aggregate)
    with pytest.raises(fs.InvalidUpdate, match="beyond the .* an aggregate of 5 updates"):
        t_of_n.combine(good[:2] + [with_residue(7, q - 1)])
    with pytest.raises(fs.IncompatibleUpdate, match="another context"):
        share.check_for(fs.keygen_threshold(ONE_TOWER, 3)[1], t_of_n.agg)


def test_key_share_section_names_are_parsed_strictly(t_of_n):
    """Issue 15, item 5: int() read "key_share:01" and "key_share: 1" as sender 1, so two
    sections of one file aliased one sender (the later replaced the earlier). Only canonical
    decimal ids load now, and unknown sections are refused."""
    party = t_of_n.parties[1]
    good = party.to_bytes(include_secret=True)
    senders = [name for name, _ in _sections(good) if name.startswith("key_share:")]
    assert senders and fs.load_context(good).key_share_senders == [0, 2, 3, 4]

    def rename(old, new):
        return lambda sections: [s.__setitem__(0, new) for s in sections if s[0] == old]

    def add_alias(alias):
        def edit(sections):
            sections.append([alias, dict(map(tuple, sections))["key_share:0"]])
        return edit

    for name in ("key_share:01", "key_share: 1", "key_share:+1", "key_share:1 ", "key_share:",
                 "key_share:x", "key_share:１", "key_share:-0", "key_share:00"):
        for blob in (_reframe_context(good, edit_sections=rename("key_share:0", name)),
                     _reframe_context(good, edit_sections=add_alias(name))):
            with pytest.raises(fs.KeyMaterialError, match="canonical decimal"):
                fs.load_context(blob)
    with pytest.raises(fs.KeyMaterialError, match="unknown section 'extra'"):
        fs.load_context(_reframe_context(
            good, edit_sections=lambda s: s.append(["extra", b"x"])))


def test_malformed_share_heads_raise_invalid_update(t_of_n):
    """Issue 15, item 5: a share whose head carried unhashable or mistyped values raised
    TypeError. Every field of the head, set to values of the wrong type (lists, dicts, nested
    lists, floats, strings, bools, None) or removed, gives fs.InvalidUpdate or
    fs.IncompatibleUpdate, from the server's screening and from the fusion alike."""
    good = t_of_n.shares([0, 1, 2], [0, 1, 2])
    meta, sections = unframe(good[1], PARTIAL_MAGIC, "share", fs.InvalidUpdate)
    meta.pop("sizes")
    values = [[1], [[1]], {"a": [1]}, None, 1.5, "1", True, 2**70, -1, [0, [1], 2],
              [0, 1, 1], [[0], 1, 2], [2, 1, 0]]
    for key in sorted(meta):
        for value in values + [...]:
            head = {k: v for k, v in meta.items() if k != key}
            if value is not ...:
                head[key] = value
            bad = frame(PARTIAL_MAGIC, head, sections)
            with pytest.raises((fs.InvalidUpdate, fs.IncompatibleUpdate)):
                t_of_n.combine([good[0], bad, good[2]])
            try:
                PartialDecryption.from_bytes(bad).check_for(t_of_n.server, t_of_n.agg)
            except (fs.InvalidUpdate, fs.IncompatibleUpdate):
                pass


def test_closing_a_party_wipes_its_key_share_and_the_shares_it_holds(t_of_n, wipes):
    party = fs.load_context(t_of_n.parties[2].to_bytes(include_secret=True))
    held = [party.secret_key_bytes(), *map(party.key_share, party.key_share_senders)]
    assert len(held) == 5 and all(any(b) for b in held)
    with party:
        t_of_n.check(t_of_n.combine(
            [fs.partial_decrypt(p, t_of_n.agg, [0, 2, 4]) for p in
             (t_of_n.parties[0], party, t_of_n.parties[4])]))
    assert all(map(wipes.zeroed, held))  # each buffer zeroed in place, not merely dropped
    assert party.key_share_senders == []
    with pytest.raises(fs.KeyMaterialError, match="closed"):
        fs.partial_decrypt(party, t_of_n.agg, [0, 2, 4])
