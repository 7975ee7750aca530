"""EncryptedUpdate on the wire: round trips, size, and hostile bytes (csrc/wire.hpp layout)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fedshield as fs
from fedshield import native
from conftest import (BITS, ELEMENTS, RING_DIM, SEED, WIRE_OVERHEAD, make_state,
                      weighted_average)
from forgery import MUTATION, fuzz_settings, mutate
from forgery import reseal_update as reseal

HEADER = 168

HYP = fuzz_settings(200)  # the update parser's fuzz targets (FEDSHIELD_FUZZ_EXAMPLES scales them)


def _payload_end(data: bytes) -> int:
    return HEADER + struct.unpack_from("<Q", data, 160)[0]


def set_residue(data: bytes, index: int, value: int, bits: int) -> bytes:
    """Overwrites residue `index` of the bit-packed payload (LSB-first, `bits` bits each)."""
    end = _payload_end(data)
    payload = int.from_bytes(data[HEADER:end], "little")
    mask = ((1 << bits) - 1) << (index * bits)
    payload = (payload & ~mask) | (value << (index * bits))
    return data[:HEADER] + payload.to_bytes(end - HEADER, "little") + data[end:]


def get_residue(data: bytes, index: int, bits: int) -> int:
    payload = int.from_bytes(data[HEADER:_payload_end(data)], "little")
    return (payload >> (index * bits)) & ((1 << bits) - 1)


# -- round trips and header ------------------------------------------------------------------

def test_round_trip_and_header(client_ctx, small_update, small_layout):
    data = small_update.to_bytes()
    assert isinstance(data, bytes)
    again = fs.EncryptedUpdate.from_bytes(data)
    assert again.to_bytes() == data
    for view in (bytearray(data), memoryview(data)):
        assert fs.EncryptedUpdate.from_bytes(view).to_bytes() == data
    assert again.header == small_update.header

    assert data[:8] == b"FSHLDUPD"
    assert struct.unpack_from("<H", data, 8)[0] == 3          # version
    assert data[146] == 1                                     # one RNS tower
    assert data[147] == ELEMENTS == 1                         # seeded: c0 only
    assert again.is_seeded and len(again.seeds) == 1 and len(again.seeds[0]) == SEED
    assert data[-8 - SEED:-8] == again.seeds[0]
    assert struct.unpack_from("<H", data, 10)[0] == 1         # kind: client update
    assert struct.unpack_from("<Q", data, len(data) - 8)[0] == native.checksum64(data[:-8])
    assert again.round == 7 and struct.unpack_from("<Q", data, 112)[0] == 7
    assert again.context_fingerprint == client_ctx.fingerprint == data[16:48]
    assert again.layout_fingerprint == small_layout.fingerprint == data[48:80]
    assert again.mask_fingerprint == bytes(32) == data[80:112]
    assert again.n_summed == 1 and not again.is_aggregate
    assert again.n_values == small_layout.numel + 1
    assert again.n_ciphertexts == 1
    h = again.header
    assert h["modulus"] == client_ctx.modulus and h["residue_bits"] == BITS
    assert h["ring_dim"] == RING_DIM and h["packing"] == 1
    assert h["weight_bound"] == 4.0
    assert len(data) == WIRE_OVERHEAD + h["payload_len"] + SEED
    assert h["payload_len"] == RING_DIM * BITS // 8
    assert again.nbytes == len(again) == len(data)
    # header is a copy: mutating it does not change the update
    h["round"] = 99
    assert again.round == 7


def test_round_trip_decrypts(client_ctx, small_update, small_state, small_layout):
    again = fs.EncryptedUpdate.from_bytes(bytes(small_update.to_bytes()))
    out = fs.decrypt_update(client_ctx, again, small_layout)
    ref = weighted_average([small_state], [3.0])
    for name, t in out.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == tuple(small_state[name].shape)
        np.testing.assert_allclose(t.double().numpy(), ref[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_values", [1, 100, RING_DIM - 1, RING_DIM, 2 * RING_DIM - 1,
                                      2 * RING_DIM + 5])
@pytest.mark.parametrize("seeded", [True, False])
def test_size_is_at_most_fresh_ciphertexts(client_ctx, unseeded_keys, n_values, seeded):
    ctx = client_ctx if seeded else unseeded_keys.client_context()
    ring, bits = ctx.params.ring_dim, ctx.modulus.bit_length()
    state = make_state(n_values, {"w": (n_values,)})
    layout = fs.Layout.from_state_dict(state)
    upd = fs.encrypt_update(ctx, state, layout, weight=1.0)
    n_cts = math.ceil((n_values + 1) / ring)
    assert upd.n_ciphertexts == n_cts and upd.is_seeded == seeded
    fresh = len(ctx.ciphertext_template[0])  # one fresh OpenFHE ciphertext
    assert len(upd.to_bytes()) <= n_cts * fresh + WIRE_OVERHEAD + SEED
    # and it is exactly the residues at bit_length(q) bits plus the fixed overhead (and seed)
    elements, extra = (1, SEED) if seeded else (2, 0)
    assert len(upd.to_bytes()) == n_cts * elements * ring * bits // 8 + WIRE_OVERHEAD + extra


def test_fresh_ciphertext_size_matches(client_ctx):
    template, layout = client_ctx.ciphertext_template
    # two polynomials of 8-byte residues and OpenFHE's framing around them
    assert len(template) == layout[4] > 2 * RING_DIM * 8


def test_bytes_per_value_large_state(client_ctx):
    # 8 full ciphertexts: 8 * N - 1 LoRA values + the weight (one more value would need a
    # ninth ciphertext for the weight alone)
    n = 8 * RING_DIM - 1
    state = make_state(11, {"a.lora_A.weight": (4, RING_DIM), "a.lora_B.weight": (RING_DIM, 3),
                            "c": (RING_DIM - 1,)})
    layout = fs.Layout.from_state_dict(state)
    assert layout.numel == n
    upd = fs.encrypt_update(client_ctx, state, layout, weight=2.0, weight_bound=2.0)
    assert upd.n_ciphertexts == 8
    per_value = len(upd.to_bytes()) / n
    print(f"bytes per LoRA value: {per_value:.3f}")
    assert BITS / 8 <= per_value < BITS / 8 + 0.01  # c0 at BITS bits, a seed, a header
    out = fs.decrypt_update(client_ctx, upd, layout)
    for name in state:
        np.testing.assert_allclose(out[name].numpy(), state[name].numpy(), atol=1e-6, rtol=0)


# -- hostile bytes ---------------------------------------------------------------------------

def test_truncated(small_update):
    data = small_update.to_bytes()
    for cut in [0, 1, 8, 100, HEADER, HEADER + 8, len(data) // 2, len(data) - 8, len(data) - 1]:
        with pytest.raises(fs.InvalidUpdate, match="truncated"):
            fs.EncryptedUpdate.from_bytes(data[:cut])


def test_trailing_bytes(small_update):
    data = small_update.to_bytes()
    for extra in [b"\0", b"x" * 8, data[:100]]:
        with pytest.raises(fs.InvalidUpdate, match="trailing"):
            fs.EncryptedUpdate.from_bytes(data + extra)


@pytest.mark.parametrize("offset", [0, 9, 16, 50, 112, 130, 150, 160, HEADER, HEADER + 12345,
                                    -9, -1])
def test_corrupted_byte(small_update, offset):
    data = bytearray(small_update.to_bytes())
    data[offset] ^= 0x10
    with pytest.raises(fs.InvalidUpdate):
        fs.EncryptedUpdate.from_bytes(bytes(data))


def test_payload_corruption_is_a_checksum_error(small_update):
    data = bytearray(small_update.to_bytes())
    data[HEADER + 777] ^= 1
    with pytest.raises(fs.InvalidUpdate, match="checksum"):
        fs.EncryptedUpdate.from_bytes(bytes(data))


def test_wrong_magic(small_update):
    data = small_update.to_bytes()
    for magic in [b"FSHLDUPE", b"\0" * 8, b"FSHLDCTX"]:
        with pytest.raises(fs.InvalidUpdate, match="magic"):
            fs.EncryptedUpdate.from_bytes(reseal(magic + data[8:]))


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_wrong_version(small_update, version):
    data = small_update.to_bytes()
    forged = reseal(data[:8] + struct.pack("<H", version) + data[10:])
    with pytest.raises(fs.InvalidUpdate, match=f"version {version}"):
        fs.EncryptedUpdate.from_bytes(forged)


@pytest.mark.parametrize("offset,fmt,value,needle", [
    (10, "<H", 7, "kind"),
    (12, "<I", 0, "n_summed"),
    (12, "<I", 2, "n_summed"),                  # client update with n_summed 2
    (120, "<Q", 0, "n_values"),
    (120, "<Q", RING_DIM + 1, "n_values"),
    (120, "<Q", 2**63, "n_values"),
    (128, "<I", 2 * RING_DIM, "payload_len|n_values"),  # payload no longer matches
    (128, "<I", 3, "ring_dim"),
    (132, "<I", 0, "n_ciphertexts"),
    (132, "<I", 2**32 - 1, "n_values"),
    (136, "<Q", 2**40, "modulus"),
    (136, "<Q", 2**61 - 1, "residue_bits"),
    (144, "<B", 61, "residue_bits"),
    (145, "<B", 0, "packing"),
    (146, "<B", 0, "n_towers"),
    (146, "<B", 9, "n_towers"),
    (146, "<B", 2, "truncated|payload_len|modulus|checksum"),  # a forged tower count
    (147, "<B", 0, "elements"),
    (147, "<B", 3, "elements"),
    (147, "<B", 2, "payload_len"),              # both polynomials announced, c0 and a seed sent
    (148, "<B", 1, "reserved"),
    (151, "<B", 0x80, "reserved"),
    (152, "<d", 0.0, "weight_bound"),
    (152, "<d", -1.0, "weight_bound"),
    (152, "<d", float("nan"), "weight_bound"),
    (160, "<Q", 0, "payload_len"),
    (160, "<Q", 2**64 - 1, "payload_len"),
])
def test_forged_header_fields(small_update, offset, fmt, value, needle):
    data = bytearray(small_update.to_bytes())
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(fs.InvalidUpdate, match=needle):
        fs.EncryptedUpdate.from_bytes(reseal(data))


# hypothesis: random truncations, flips, insertions and deletions of a valid update

@HYP
@given(ops=st.lists(MUTATION, min_size=1, max_size=4))
def test_hypothesis_mutations_never_parse(small_update, ops):
    data = small_update.to_bytes()
    bad = mutate(data, ops)
    if bad == data:
        assert fs.EncryptedUpdate.from_bytes(bad).to_bytes() == data
        return
    with pytest.raises(fs.InvalidUpdate):
        fs.EncryptedUpdate.from_bytes(bad)
    with pytest.raises(fs.InvalidUpdate):
        native.parse_update(bad)


@HYP
@given(ops=st.lists(st.tuples(st.integers(0, HEADER - 1), st.integers(0, 255)),
                    min_size=1, max_size=3))
def test_hypothesis_resealed_header_edits(small_update, server_ctx, ops):
    """A forger who recomputes the checksum: the header is parsed field by field, every field
    is range-checked, and nothing but a FedShieldError ever comes out."""
    data = bytearray(small_update.to_bytes())
    for at, value in ops:
        data[at] = value
    forged = reseal(data)
    try:
        upd = fs.EncryptedUpdate.from_bytes(forged)
    except fs.InvalidUpdate:
        return
    # it parsed: the header is still self-consistent; the server may still refuse it
    assert len(forged) == WIRE_OVERHEAD + upd.header["payload_len"] + SEED * len(upd.seeds)
    try:
        fs.aggregate(server_ctx, [upd])
    except (fs.InvalidUpdate, fs.IncompatibleUpdate, fs.HeadroomError):
        pass


@pytest.fixture(scope="module")
def valid_pair(client_ctx, server_ctx, small_layout):
    states = [make_state(21), make_state(22)]
    ups = [fs.encrypt_update(client_ctx, s, small_layout, weight=w, round=7, weight_bound=4.0)
           for s, w in zip(states, [2.0, 3.0])]
    agg = fs.aggregate(server_ctx, ups)
    out = fs.decrypt_update(client_ctx, agg, small_layout)
    ref = weighted_average(states, [2.0, 3.0])
    for name in ref:
        np.testing.assert_allclose(out[name].double().numpy(), ref[name], atol=1e-6, rtol=0)
    return ups, agg.to_bytes()


@fuzz_settings(100)
@given(ops=st.lists(MUTATION, min_size=1, max_size=3))
def test_hypothesis_mutated_bytes_to_aggregate(server_ctx, small_update, valid_pair, ops):
    data = small_update.to_bytes()
    bad = mutate(data, ops)
    ups, expected = valid_pair
    if bad == data:
        return
    with pytest.raises((fs.InvalidUpdate, fs.IncompatibleUpdate)):
        fs.aggregate(server_ctx, [bad])
    with pytest.raises((fs.InvalidUpdate, fs.IncompatibleUpdate)):
        fs.aggregate(server_ctx, [ups[0], bad, ups[1]])
    # skipped with on_reject: the rest of the round still sums to the valid aggregate
    rejected = []
    agg = fs.aggregate(server_ctx, [ups[0], bad, ups[1]],
                       on_reject=lambda i, e: rejected.append((i, type(e))))
    assert [i for i, _ in rejected] == [1]
    assert agg.to_bytes() == expected
    assert agg.n_summed == 2


# -- forged residues (>= q) with a recomputed checksum -----------------------------------------

def test_forged_residue_is_rejected(client_ctx, server_ctx, small_update, small_layout):
    q = client_ctx.modulus
    data = small_update.to_bytes()
    total = ELEMENTS * RING_DIM
    for index, value in [(0, q), (total - 1, (1 << BITS) - 1), (total // 2, q + 1), (1234, q)]:
        forged = reseal(set_residue(data, index, value, BITS))
        assert get_residue(forged, index, BITS) == value
        upd = fs.EncryptedUpdate.from_bytes(forged)  # header and checksum are fine ...
        with pytest.raises(fs.InvalidUpdate, match="modulus"):  # ... the residue is not
            fs.aggregate(server_ctx, [upd])
        with pytest.raises(fs.InvalidUpdate, match="modulus"):
            fs.decrypt_update(client_ctx, upd, small_layout)
    # control: q - 1 is a legal residue
    fs.aggregate(server_ctx, [reseal(set_residue(data, 5, q - 1, BITS))])


@pytest.mark.parametrize("threads", [1, 2, 3])
# three ciphertexts: residues in the first, the last and the middle of the aggregator's blocks
@pytest.mark.parametrize("bad_index", [0, 4095, 4096, 3 * RING_DIM - 1, RING_DIM + 7])
def test_aggregator_rejects_midway_and_keeps_its_sum(client_ctx, server_ctx, threads,
                                                    bad_index):
    q = client_ctx.modulus
    states = [make_state(31 + i, {"w": (3 * RING_DIM - 1,)}) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    a, b, c = (fs.encrypt_update(client_ctx, s, layout, weight=w, round=1,
                                 weight_bound=4.0).to_bytes()
               for s, w in zip(states, [1.0, 4.0, 2.0]))
    forged_b = reseal(set_residue(b, bad_index, q + bad_index % 7, BITS))

    def new():
        return native.Aggregator(server_ctx.fingerprint, q, RING_DIM, 64, threads,
                                  elements=ELEMENTS)

    reference = new()
    reference.add(a)
    reference.add(c)

    agg = new()
    agg.add(a)
    before = agg.result()
    with pytest.raises(fs.InvalidUpdate, match="modulus"):
        agg.add(forged_b)
    assert agg.count == 1
    assert agg.result() == before  # the partial fold was undone exactly
    agg.add(c)
    assert agg.count == 2
    assert agg.result() == reference.result()

    # a bad first update leaves the aggregator empty
    first = new()
    with pytest.raises(fs.InvalidUpdate):
        first.add(forged_b)
    assert first.count == 0
    with pytest.raises(fs.IncompatibleUpdate, match="no update"):
        first.result()
    first.add(a)
    first.add(c)
    assert first.result() == reference.result()

    out = fs.decrypt_update(client_ctx, fs.EncryptedUpdate.from_bytes(agg.result()), layout)
    ref = weighted_average([states[0], states[2]], [1.0, 2.0])
    for name in ref:
        np.testing.assert_allclose(out[name].double().numpy(), ref[name], atol=1e-6, rtol=0)
