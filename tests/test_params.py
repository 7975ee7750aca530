"""CKKSParams: defaults, immutability and every ParameterError path."""

from __future__ import annotations

import dataclasses
import json

import pytest

import fedshield as fs
from fedshield.he.params import (HE_STANDARD_MAX_LOGQ, KEYSWITCH_BITS, MIN_SCALE_BITS, keyswitch_bits,
                                 CKKSParams)


def test_defaults():
    p = fs.CKKSParams()
    assert p == CKKSParams.for_precision(1e-6, 64)  # the profile for 1e-6 at 64 clients
    # ... for any weights from 1 to 10**6 with no bound passed: one update of weight 1 at the
    # default bound 2**20 is the worst case, so the scale takes ~20 bits more than a round's
    assert p.max_weight == 10 ** 6 and p.default_weight_bound == 2.0 ** 20
    assert (p.ring_dim, p.scale_bits, p.first_mod_bits, p.towers) == (8192, 51, 59, 1)
    assert p.average_error_bound(1, 1 / 2 ** 20) <= 1e-6
    assert p.seeded is True
    assert p.packing == "complex"
    assert p.security_bits == 128
    assert p.slots == 4096
    assert p.values_per_ciphertext == 8192  # two reals per slot
    assert fs.CKKSParams(packing="real").values_per_ciphertext == 4096
    # headroom: q/2 >= 2**57, values at scale 2**51 -> |sum| <= 2**6, shared by max_clients
    assert p.total_bound == 2.0 ** 6
    assert p.value_bound == p.total_bound / p.max_clients == 1.0
    # what fedshield's engines use (their Server sends each round's bound): 5.25 B/value
    run = CKKSParams.for_precision(1e-6, 64, max_weight=0)
    assert (run.ring_dim, run.scale_bits, run.first_mod_bits, run.max_weight) == (4096, 34, 42, 0)
    assert run.default_weight_bound is None


@pytest.mark.parametrize("keys, kwargs, expected", [
    ("shared", {}, (4096, 34, 42)),
    ("shared", dict(max_clients=16), (4096, 33, 39)),
    ("shared", dict(tolerance=1e-4), (4096, MIN_SCALE_BITS, MIN_SCALE_BITS + 8)),
    ("threshold", {}, (8192, 52, 60)),
    ("threshold", dict(n_parties=3), (8192, 51, 59)),
])
def test_profiles_by_precision(keys, kwargs, expected):
    """The profiles of rounds whose bound is within 2x of their largest weight (max_weight=0)."""
    p = CKKSParams.for_precision(keys=keys, max_weight=0, **kwargs)
    assert (p.ring_dim, p.scale_bits, p.first_mod_bits) == expected
    assert p.seeded == (keys == "shared")
    # the profile meets its own bound at the contract's worst case: weight sum >= bound / 2
    decryptors = kwargs.get("n_parties", 16) if keys == "threshold" else 0
    assert p.average_error_bound(p.max_clients, 0.5, decryptors) <= kwargs.get("tolerance", 1e-6)
    # and the smallest ring OpenFHE accepts at 128-bit security for that modulus
    smaller = p.ring_dim // 2
    assert p.first_mod_bits + KEYSWITCH_BITS > HE_STANDARD_MAX_LOGQ[128][smaller]


@pytest.mark.parametrize("keys, towers, decryptors", [("shared", 1, 0), ("threshold", 2, 16)])
def test_the_default_weight_bound_profiles_meet_the_tolerance_at_weight_one(keys, towers,
                                                                             decryptors):
    """With max_weight (the default), one update of weight 1 at the default bound keeps the
    tolerance; threshold keys need a second tower for it (no flooding)."""
    p = CKKSParams.for_precision(keys=keys)
    assert p.n_towers == towers and not p.flooding
    assert p.average_error_bound(1, 1 / p.default_weight_bound, decryptors) <= 1e-6
    assert p.average_error_bound(p.max_clients, 0.5, decryptors) <= 1e-6
    assert p.value_bound == 1.0  # and max_clients values of magnitude 1 still fit
    assert CKKSParams.from_dict(json.loads(p.to_json())) == p
    assert json.loads(p.to_json())["max_weight"] == 10 ** 6


def test_parameters_written_before_max_weight_keep_their_meaning_and_fingerprint():
    """JSON with no max_weight is the old meaning (each update's own bound), and a max_weight
    of 0 writes no field, so the fingerprints of earlier contexts stay."""
    run = CKKSParams.for_precision(max_weight=0)
    assert "max_weight" not in json.loads(run.to_json())
    old = json.loads(run.to_json())
    assert CKKSParams.from_dict(old).max_weight == 0
    assert CKKSParams.from_dict(old).fingerprint() == run.fingerprint()
    explicit = CKKSParams(ring_dim=4096, scale_bits=34, first_mod_bits=42)
    assert explicit.max_weight == 0 and explicit == run
    with pytest.raises(fs.ParameterError, match="max_weight=-1"):
        CKKSParams(max_weight=-1)
    with pytest.raises(fs.ParameterError, match="both towers and flood_towers"):
        CKKSParams.from_dict({**old, "towers": 1, "flood_towers": 2})


def test_profile_security_is_checked_by_openfhe():
    """Every profile's ring dimension is one OpenFHE accepts (and one below is refused)."""
    for p in (CKKSParams.for_precision(), CKKSParams.for_precision(keys="threshold")):
        fs.keygen_shared(dataclasses.replace(p, seeded=True))  # builds a crypto context
        with pytest.raises(fs.ParameterError, match="security"):
            dataclasses.replace(p, ring_dim=p.ring_dim // 2)


@pytest.mark.parametrize("security_bits", [128, 192, 256])
@pytest.mark.parametrize("flood_bits", [0, 30])
@pytest.mark.parametrize("keys", ["shared", "threshold"])
def test_every_profile_is_within_the_he_standard(keys, flood_bits, security_bits):
    """Across precisions and federation sizes a profile is either refused or secure: its
    modulus plus OpenFHE's key-switching modulus fits the HE-standard table for its ring."""
    table = HE_STANDARD_MAX_LOGQ[security_bits]
    made = 0
    for tolerance in (1e-3, 1e-6, 1e-8):
        for max_clients in (2, 64, 1024):
            try:
                p = CKKSParams.for_precision(tolerance, max_clients, keys=keys,
                                             flood_bits=flood_bits, security_bits=security_bits)
            except fs.ParameterError as exc:
                assert "tolerance" in str(exc) or "ring dimension" in str(exc)
                continue
            made += 1
            assert p.security_bits == security_bits
            assert p.log_q + keyswitch_bits(p.first_mod_bits, p.scale_bits, p.towers) <= table[p.ring_dim]
            assert p.n_towers == p.towers
            assert not flood_bits or p.n_towers >= 2
    assert made >= 5


def test_flooding_profiles_are_accepted_by_openfhe():
    for keys in ("shared", "threshold"):
        p = CKKSParams.for_precision(keys=keys, flood_bits=30)
        keys_ = fs.keygen_shared(p)
        assert len(keys_.client_context().moduli) == p.towers >= 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(tolerance=0.0), "tolerance=0.0"),
    (dict(tolerance=1e-80), r"tolerance=1e-80 must be a number in \[6e-08, 1\): decrypted values"),
    (dict(max_weight=10 ** 60), "at most 4 towers hold tolerance=1e-06 .* weights up to 1000000"),
    (dict(max_clients=0), "max_clients=0"),
    (dict(keys="triple"), "keys='triple'"),
    (dict(security_bits=100), "security_bits=100"),
])
def test_bad_profile_requests(kwargs, match):
    with pytest.raises(fs.ParameterError, match=match):
        CKKSParams.for_precision(**kwargs)


def test_contexts_written_before_seeding_load_as_unseeded():
    import json

    old = json.loads(fs.CKKSParams(ring_dim=16384, scale_bits=50, first_mod_bits=60).to_json())
    old.pop("seeded")  # what a version-2 context file holds
    p = CKKSParams.from_dict(old)
    assert p.seeded is False
    # and its fingerprint is the one it had: the JSON of unseeded params names no "seeded"
    assert "seeded" not in p.to_json()


def test_frozen_and_hashable():
    p = fs.CKKSParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ring_dim = 8192  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.packing = "real"  # type: ignore[misc]
    assert p == fs.CKKSParams() and hash(p) == hash(fs.CKKSParams())
    assert p.fingerprint() == fs.CKKSParams().fingerprint()
    assert p.fingerprint() != fs.CKKSParams(max_clients=8).fingerprint()


def test_json_round_trip():
    import json

    for seeded in (True, False):
        p = fs.CKKSParams(ring_dim=32768, scale_bits=45, first_mod_bits=60, packing="real",
                          max_clients=16, seeded=seeded)
        assert CKKSParams.from_dict(json.loads(p.to_json())) == p


def test_parameter_error_is_value_error():
    assert issubclass(fs.ParameterError, ValueError)
    assert issubclass(fs.ParameterError, fs.FedShieldError)
    assert issubclass(fs.HeadroomError, fs.ParameterError)


def _raises(match_values: list[str], **kwargs) -> str:
    with pytest.raises(fs.ParameterError) as info:
        fs.CKKSParams(**kwargs)
    msg = str(info.value)
    for v in match_values:
        assert v in msg, f"{v!r} not named in {msg!r}"
    return msg


@pytest.mark.parametrize("ring_dim,first_mod_bits,security", [
    (2048, 60, 128),    # log2(QP) ~ 60 + 61 > 54
    (4096, 60, 128),    # 121 > 109
    (4096, 49, 128),    # 110 > 109: OpenFHE refuses it too
    (8192, 60, 256),    # 121 > 118
    (16384, 60, 256),   # 121 <= 237: fine, see below
])
def test_below_security(ring_dim, first_mod_bits, security):
    kwargs = dict(ring_dim=ring_dim, first_mod_bits=first_mod_bits, security_bits=security,
                  scale_bits=40, max_clients=4)
    if (ring_dim, security) == (16384, 256):
        fs.CKKSParams(**kwargs)  # control: a secure combination passes
        return
    msg = _raises([str(ring_dim), str(first_mod_bits)], **kwargs)
    assert "security" in msg


def test_scale_not_below_modulus():
    _raises(["scale_bits=60", "first_mod_bits=60"], scale_bits=60, first_mod_bits=60)
    _raises(["scale_bits=59", "first_mod_bits=55"], scale_bits=59, first_mod_bits=55)


def test_no_headroom():
    # 60 - 57 = 3 bits: |sum| <= 2**1 cannot hold 64 clients' values of magnitude 1
    big = dict(ring_dim=16384, first_mod_bits=60)
    msg = _raises(["scale_bits=57", "max_clients=64"], scale_bits=57, max_clients=64, **big)
    assert "headroom" in msg
    # the boundary is exact: 2 + ceil(log2(max_clients)) bits between scale and modulus
    fs.CKKSParams(scale_bits=52, max_clients=64, **big)        # 8 bits: 2**6 / 64 = 1
    _raises(["65"], scale_bits=52, max_clients=65, **big)       # needs 9 bits
    fs.CKKSParams(scale_bits=57, max_clients=2, **big)          # 3 bits: 2 / 2 = 1


def test_bad_packing():
    _raises(["'complex2'"], packing="complex2")
    _raises(["None"], packing=None)


@pytest.mark.parametrize("field", ["ring_dim", "scale_bits", "first_mod_bits", "security_bits",
                                   "max_clients"])
@pytest.mark.parametrize("value", [16384.0, "50", True, None])
def test_non_int(field, value):
    if value is None and field in ("ring_dim", "scale_bits", "first_mod_bits"):
        return  # None there is a request, resolved (test_a_request_is_resolved_per_key_mode)
    _raises([field, repr(value)], **{field: value})


@pytest.mark.parametrize("security", [0, 100, 127, 512])
def test_bad_security_level(security):
    _raises([f"security_bits={security}"], security_bits=security)


@pytest.mark.parametrize("ring_dim", [0, 1000, 3000, 16385, 512, 1 << 18])
def test_bad_ring_dim(ring_dim):
    _raises([f"ring_dim={ring_dim}"], ring_dim=ring_dim)


@pytest.mark.parametrize("kwargs,named", [
    (dict(first_mod_bits=61), "first_mod_bits=61"),
    (dict(first_mod_bits=0), "first_mod_bits=0"),
    (dict(scale_bits=20, first_mod_bits=40), "scale_bits=20"),
    (dict(seeded="yes"), "seeded"),
    (dict(max_clients=0), "max_clients=0"),
    (dict(max_clients=-3), "max_clients=-3"),
])
def test_out_of_range(kwargs, named):
    _raises([named], **kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(fs.ParameterError, match="bogus"):
        CKKSParams.from_dict({"ring_dim": 16384, "bogus": 1})


def test_insecure_params_never_reach_openfhe():
    # ParameterError at construction: keygen is never attempted with insecure values
    with pytest.raises(fs.ParameterError):
        fs.keygen_shared(fs.CKKSParams(ring_dim=2048))


def test_a_request_is_resolved_per_key_mode():
    """CKKSParams() with no ring, modulus or scale states a precision request: the fields show
    its shared-key (seeded) resolution, and each keygen resolves it for its own key mode."""
    request = fs.CKKSParams()
    assert request.request and request == fs.CKKSParams.for_precision(keys="shared")
    assert request.fingerprint() == fs.CKKSParams.for_precision().fingerprint()
    threshold = request.for_keys("threshold", n_parties=3)
    assert threshold == fs.CKKSParams.for_precision(keys="threshold") and not threshold.seeded
    flooded = fs.CKKSParams(flood_bits=30)
    assert flooded.request and flooded == fs.CKKSParams.for_precision(flood_bits=30)
    flooded_t = flooded.for_keys("threshold", 3)
    assert (flooded_t.flooding, flooded_t.seeded) == (True, False)
    loose = fs.CKKSParams(tolerance=1e-4)
    assert loose.scale_bits < request.scale_bits and "tolerance" not in loose.to_json()
    # explicit values are honoured (the rest comes from the request) and validated
    explicit = fs.CKKSParams(ring_dim=8192)
    assert not explicit.request and (explicit.ring_dim, explicit.first_mod_bits) == (8192, 59)
    assert explicit.for_keys("threshold", 3) is explicit
    _raises(["ring_dim=2048", "59"], ring_dim=2048)
    _raises(["tolerance", "2"], tolerance=2)
    _raises(["tolerance", "True"], tolerance=True)


def test_each_keygen_resolves_the_request():
    shared = fs.keygen_shared(fs.CKKSParams()).client_context()
    assert shared.params.seeded and shared.params.ring_dim == 8192
    parties, server = fs.keygen_threshold(fs.CKKSParams(), n_parties=3)
    assert server.params == parties[0].params == fs.CKKSParams.for_precision(keys="threshold")
    parties, server = fs.keygen_threshold(fs.CKKSParams(flood_bits=30), n_parties=3)
    assert parties[0].params.flood_bits == 30 and not parties[0].params.seeded
    assert fs.load_context(server.to_bytes()).params == server.params
    with pytest.raises(fs.ParameterError, match="seeded"):   # explicit and seeded: refused
        fs.keygen_threshold(fs.CKKSParams(ring_dim=8192, first_mod_bits=60, scale_bits=52),
                            n_parties=3)
