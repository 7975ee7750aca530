"""CKKSParams: defaults, immutability and every ParameterError path."""

from __future__ import annotations

import dataclasses

import pytest

import fedshield as fs
from fedshield.he.params import CKKSParams


def test_defaults():
    p = fs.CKKSParams()
    assert p.ring_dim == 16384
    assert p.scale_bits == 50
    assert p.first_mod_bits == 60
    assert p.packing == "complex"
    assert p.security_bits == 128
    assert p.slots == 8192
    assert p.values_per_ciphertext == 16384  # two reals per slot
    assert fs.CKKSParams(packing="real").values_per_ciphertext == 8192
    # headroom: q/2 >= 2**58, values at scale 2**50 -> |sum| <= 2**8, shared by max_clients
    assert p.total_bound == 2.0 ** 8
    assert p.value_bound == p.total_bound / p.max_clients


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
    p = fs.CKKSParams(ring_dim=32768, scale_bits=45, packing="real", max_clients=16)
    import json

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
    (2048, 60, 128),    # log2(QP) ~ 120 > 54
    (4096, 60, 128),    # 120 > 109
    (8192, 60, 256),    # 120 > 118
    (16384, 60, 256),   # 120 <= 237: fine, see below
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
    msg = _raises(["scale_bits=57", "max_clients=64"], scale_bits=57, max_clients=64)
    assert "headroom" in msg
    # the boundary is exact: 2 + ceil(log2(max_clients)) bits between scale and modulus
    fs.CKKSParams(scale_bits=52, max_clients=64)        # 8 bits: 2**6 / 64 = 1
    _raises(["65"], scale_bits=52, max_clients=65)       # needs 9 bits
    fs.CKKSParams(scale_bits=57, max_clients=2)          # 3 bits: 2 / 2 = 1


def test_bad_packing():
    _raises(["'complex2'"], packing="complex2")
    _raises(["None"], packing=None)


@pytest.mark.parametrize("field", ["ring_dim", "scale_bits", "first_mod_bits", "security_bits",
                                   "max_clients"])
@pytest.mark.parametrize("value", [16384.0, "50", True, None])
def test_non_int(field, value):
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
