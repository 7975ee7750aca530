"""Native packing (LoRA tensors <-> slot buffers) against a numpy reference, and the wire codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import native
from fedshield.he import backend

SHAPE_SETS = [
    [(1, 1)],
    [(3, 5)],
    [(1, 1023)],
    [(1, 1), (3, 5), (1, 1023)],
    # > 2**16 values in total: the multi-threaded path
    [(4097, 8), (7, 4097), (1, 1), (3, 5)],
]
THREADS = [0, 1, 2, 3]


def _tensors(rng, shapes, scale=1.0):
    return [np.ascontiguousarray((rng.uniform(-1, 1, size=s) * scale).astype(np.float32)
                                 .reshape(-1)) for s in shapes]


def _masks(rng, shapes, kind):
    if kind == "none":
        return [None] * len(shapes)
    out = []
    for i, s in enumerate(shapes):
        n = int(np.prod(s))
        if kind == "random":
            m = rng.random(n) < 0.4
        elif kind == "mixed":  # all-False, all-True and random tensors in one state
            m = [np.zeros(n, bool), np.ones(n, bool), rng.random(n) < 0.7][i % 3]
        elif kind == "all_false":
            m = np.zeros(n, bool)
        else:
            m = np.ones(n, bool)
        out.append(np.ascontiguousarray(m))
    return out


def ref_pack(tensors, masks, scale, weight, out_len):
    kept = [t.astype(np.float64) if m is None else t[m].astype(np.float64)
            for t, m in zip(tensors, masks)]
    flat = np.concatenate(kept) * scale if kept else np.zeros(0)
    out = np.zeros(out_len)
    out[:flat.size] = flat
    out[flat.size] = weight
    return out


def ref_unpack(buf, shapes_numel, masks, divide):
    n_kept = sum(n if m is None else int(m.sum()) for n, m in zip(shapes_numel, masks))
    w = buf[n_kept]
    at, out = 0, []
    for n, m in zip(shapes_numel, masks):
        o = np.zeros(n, np.float64)
        k = n if m is None else int(m.sum())
        vals = buf[at:at + k] * (1.0 / w if divide else 1.0)  # native multiplies by 1/w
        at += k
        if m is None:
            o[:] = vals
        else:
            o[m] = vals
        out.append(o.astype(np.float32))
    return w, out


@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=lambda s: "+".join(f"{a}x{b}" for a, b in s))
@pytest.mark.parametrize("mask_kind", ["none", "random", "mixed", "all_false", "all_true"])
@pytest.mark.parametrize("threads", THREADS)
def test_pack_matches_reference(shapes, mask_kind, threads):
    rng = np.random.default_rng(hash((str(shapes), mask_kind)) % 2**32)
    tensors = _tensors(rng, shapes)
    masks = _masks(rng, shapes, mask_kind)
    n_kept = sum(t.size if m is None else int(m.sum()) for t, m in zip(tensors, masks))
    out_len = n_kept + 1 + int(rng.integers(0, 40))  # zero padding after the weight
    scale, weight = 0.375, 0.123
    buf = native.pack_values(tensors, masks, scale, weight, 4.0, out_len, threads)
    assert buf.dtype == np.float64 and buf.shape == (out_len,)
    ref = ref_pack(tensors, masks, scale, weight, out_len)
    np.testing.assert_array_equal(buf, ref)  # exact: float32 * scale in float64
    assert buf[n_kept] == weight  # the weight sits right after the kept values
    assert not buf[n_kept + 1:].any()  # zero padding
    assert native.kept_counts([np.ones(t.size, bool) if m is None else m
                                for t, m in zip(tensors, masks)]) == \
        [t.size if m is None else int(m.sum()) for t, m in zip(tensors, masks)]

    # unpack: divides by the weight, zeros at pruned positions
    for divide in (True, False):
        outs = [np.full(t.size, np.nan, np.float32) for t in tensors]
        w = native.unpack_values(buf, outs, masks, divide, threads)
        assert w == weight
        w_ref, ref_outs = ref_unpack(buf, [t.size for t in tensors], masks, divide)
        for o, r, t, m in zip(outs, ref_outs, tensors, masks):
            np.testing.assert_array_equal(o, r)
            if m is not None:
                assert not o[~m].any()
            if divide:  # (x * scale) / weight
                expect = t * (scale / weight) if m is None else np.where(m, t * (scale / weight), 0)
                np.testing.assert_allclose(o, expect, rtol=1e-6, atol=0)
            else:
                expect = t * scale if m is None else np.where(m, t * scale, 0)
                np.testing.assert_allclose(o, expect, rtol=1e-7, atol=0)


def test_pack_mask_accepts_bool_and_uint8():
    t = [np.arange(6, dtype=np.float32)]
    m_bool = [np.array([1, 0, 1, 0, 0, 1], bool)]
    m_u8 = [np.array([1, 0, 1, 0, 0, 1], np.uint8)]
    a = native.pack_values(t, m_bool, 1.0, 1.0, 10.0, 5, 1)
    b = native.pack_values(t, m_u8, 1.0, 1.0, 10.0, 5, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, [0, 2, 5, 1, 0])


def test_pack_rejects_bad_arguments():
    t = [np.zeros(4, np.float32)]
    with pytest.raises(ValueError, match="mask"):
        native.pack_values(t, [np.ones(3, bool)], 1.0, 1.0, 1.0, 8, 1)
    with pytest.raises(ValueError, match="one mask"):
        native.pack_values(t, [], 1.0, 1.0, 1.0, 8, 1)
    with pytest.raises(fs.HeadroomError, match="do not fit"):  # 4 values + weight > 4
        native.pack_values(t, [None], 1.0, 1.0, 1.0, 4, 1)
    native.pack_values(t, [None], 1.0, 1.0, 1.0, 5, 1)  # exactly fits


def test_unpack_rejects_bad_arguments():
    buf = native.pack_values([np.ones(4, np.float32)], [None], 1.0, 0.5, 4.0, 8, 1)
    with pytest.raises(fs.HeadroomError, match="needs 5 values"):
        native.unpack_values(buf[:4].copy(), [np.empty(4, np.float32)], [None], True, 1)
    bad_w = buf.copy()
    bad_w[4] = 0.0
    with pytest.raises(fs.HeadroomError, match="not positive"):
        native.unpack_values(bad_w, [np.empty(4, np.float32)], [None], True, 1)
    bad_w[4] = -1.0
    with pytest.raises(fs.HeadroomError, match="not positive"):
        native.unpack_values(bad_w, [np.empty(4, np.float32)], [None], True, 1)
    # without division a non-positive weight is returned as is
    assert native.unpack_values(bad_w, [np.empty(4, np.float32)], [None], False, 1) == -1.0


@pytest.mark.parametrize("out", [
    np.zeros(8, np.float32)[::2],   # non-contiguous
    np.zeros(4, np.float16),        # wrong dtype
    np.zeros(4, np.float64),
], ids=["strided", "float16", "float64"])
def test_unpack_never_writes_into_a_hidden_copy(out):
    buf = native.pack_values([np.arange(4, dtype=np.float32)], [None], 1.0, 0.5, 4.0, 8, 1)
    with pytest.raises((ValueError, TypeError)):
        native.unpack_values(buf, [out], [None], True, 1)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        native.unpack_values(buf, [ro], [None], True, 1)
    good = np.zeros(4, np.float32)
    native.unpack_values(buf, [good], [None], True, 1)
    np.testing.assert_array_equal(good, [0, 2, 4, 6])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_values_raise_naming_the_element(bad, threads):
    rng = np.random.default_rng(1)
    shapes = [(3, 5), (4097, 8), (7, 4097)]
    tensors = _tensors(rng, shapes)
    tensors[2][12345] = bad
    with pytest.raises(fs.HeadroomError) as info:
        native.pack_values(tensors, [None] * 3, 1.0, 1.0, 4.0, 70000, threads)
    msg = str(info.value)
    assert "tensor 2" in msg and "element 12345" in msg and "not finite" in msg
    # a non-finite value at a pruned position is never packed: no error
    masks = [None, None, np.ones(tensors[2].size, bool)]
    masks[2][12345] = False
    native.pack_values(tensors, masks, 1.0, 1.0, 4.0, 70000, threads)


def test_over_bound_values_raise():
    t = [np.array([0.5, -2.0, 1.0], np.float32), np.array([3.0, -4.0], np.float32)]
    # |value * scale| <= bound passes, exactly at the bound included
    native.pack_values(t, [None, None], 1.0, 1.0, 4.0, 8, 1)
    with pytest.raises(fs.HeadroomError) as info:
        native.pack_values(t, [None, None], 1.25, 1.0, 4.0, 8, 1)  # -4 * 1.25 = -5
    msg = str(info.value)
    assert "tensor 1 element 1" in msg and "headroom" in msg
    with pytest.raises(fs.HeadroomError, match="tensor 0 element 1"):
        native.pack_values(t, [None, None], 1.0, 1.0, 1.9, 8, 1)
    # the over-bound value pruned away: fine
    native.pack_values(t, [None, np.array([1, 0], bool)], 1.25, 1.0, 4.0, 8, 1)


def test_encrypt_update_names_the_bad_tensor(client_ctx):
    state = {"a.lora_A.weight": torch.zeros(2, 3), "b.lora_B.weight": torch.zeros(4, 5)}
    state["b.lora_B.weight"][2, 1] = float("nan")
    layout = fs.Layout.from_state_dict(state)
    with pytest.raises(fs.HeadroomError) as info:
        fs.encrypt_update(client_ctx, state, layout, weight=1.0)
    assert "b.lora_B.weight" in str(info.value)
    assert "(2, 1)" in str(info.value)
    state["b.lora_B.weight"][2, 1] = 1e6  # finite but over the headroom
    with pytest.raises(fs.HeadroomError, match="b.lora_B.weight"):
        fs.encrypt_update(client_ctx, state, layout, weight=2.0 ** 16)


# -- complex interleave: value 2k is the real part of slot k, 2k+1 its imaginary part --------

def test_complex_interleave_semantics(client_ctx):
    params = client_ctx.params
    assert params.packing == "complex"
    rng = np.random.default_rng(5)
    buf = rng.uniform(-1, 1, params.values_per_ciphertext)
    slots = buf.view(np.complex128)
    assert slots.size == params.slots
    k = 1234
    assert slots[k] == complex(buf[2 * k], buf[2 * k + 1])

    # through OpenFHE itself: slot k decrypts to buf[2k] + i*buf[2k+1]
    cc, pk, sk = client_ctx.openfhe_objects(need_secret=True)
    ct_bytes = backend.encrypt_buffer(cc, sk, buf, params)  # the default profile's encryption
    assert len(ct_bytes) == 1
    o = backend.openfhe()
    pt = cc.Decrypt(sk, o.DeserializeCiphertextString(ct_bytes[0], o.BINARY))
    pt.SetLength(params.slots)
    got = np.asarray(pt.GetCKKSPackedValue(), dtype=np.complex128)
    np.testing.assert_allclose(got.real, buf[0::2], atol=1e-7)
    np.testing.assert_allclose(got.imag, buf[1::2], atol=1e-7)
    back = backend.decrypt_ciphertexts(cc, sk, ct_bytes, params)
    np.testing.assert_allclose(back, buf, atol=1e-7)


# -- the wire codec: header dict round trip and residue bit packing ------------------------

def _header(**over):
    h = {
        "kind": 1, "n_summed": 1, "context_fp": bytes(range(32)),
        "layout_fp": bytes(range(32, 64)), "mask_fp": bytes(32), "round": 2**40 + 3,
        "n_values": 1500, "ring_dim": 1024, "n_ciphertexts": 2, "modulus": (1 << 59) - 55,
        "packing": 1, "weight_bound": 65536.0,
    }
    h.update(over)
    return h


def ref_bitpack(residues: np.ndarray, bits: int) -> bytes:
    """LSB-first packing of each residue into exactly `bits` bits (numpy reference)."""
    as_bytes = residues.astype("<u8").view(np.uint8).reshape(-1, 8)
    b = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits].reshape(-1)
    return np.packbits(b, bitorder="little").tobytes()


def _random_residues(rng, h):
    n = 2 * h["ring_dim"] * h["n_ciphertexts"]
    return rng.integers(0, h["modulus"], size=n, dtype=np.uint64)


@pytest.mark.parametrize("modulus", [(1 << 59) - 55, 1152921504606748673, 2**31 - 1, 3,
                                     (1 << 62) - 57])
@pytest.mark.parametrize("packing,n_values,n_cts", [(1, 1500, 2), (2, 513, 2), (1, 1024, 1),
                                                    (2, 1, 1)])
def test_encode_parse_round_trip(modulus, packing, n_values, n_cts):
    rng = np.random.default_rng(modulus % 1000 + n_values)
    h = _header(modulus=modulus, packing=packing, n_values=n_values, n_ciphertexts=n_cts)
    bits = modulus.bit_length()
    residues = _random_residues(rng, h)
    payload = ref_bitpack(residues, bits)
    assert len(payload) == (residues.size * bits + 7) // 8
    data = native.encode_update(h, payload)
    assert len(data) == native.HEADER_SIZE + len(payload) + native.CHECKSUM_SIZE
    assert data[:8] == b"FSHLDUPD"
    assert int.from_bytes(data[8:10], "little") == native.WIRE_VERSION == 3
    assert data[146] == 1  # one RNS tower: the same size as wire version 1
    assert data[147] == 2  # both polynomials (unseeded)
    assert data[168:-8] == payload
    assert int.from_bytes(data[-8:], "little") == native.checksum64(data[:-8])
    parsed = native.parse_update(data)
    assert parsed == {**h, "residue_bits": bits, "payload_len": len(payload),
                      "moduli": (modulus,), "n_towers": 1, "elements": 2, "seeds": ()}
    # the same bytes as wire version 2 (byte 147 reserved, zero) parse the same way
    v2 = bytearray(data)
    v2[8:10], v2[147] = (2).to_bytes(2, "little"), 0
    v2[-8:] = native.checksum64(bytes(v2[:-8])).to_bytes(8, "little")
    assert native.parse_update(bytes(v2)) == parsed

    # the native bit unpacker agrees with the reference packer: an aggregator holding one
    # update re-packs exactly the same payload; holding it twice, the residue-wise sum mod q
    agg = native.Aggregator(h["context_fp"], modulus, 1024, 8, 2, packing=packing)
    agg.add(data)
    one = native.parse_update(agg.result())
    assert one["kind"] == 2 and one["n_summed"] == 1
    assert agg.result()[168:-8] == payload
    agg.add(data)
    doubled = [(int(r) * 2) % modulus for r in residues]
    assert agg.result()[168:-8] == ref_bitpack(np.array(doubled, dtype=np.uint64), bits)
    assert agg.count == 2


def ref_tower_pack(residues: np.ndarray, moduli, ring_dim: int) -> bytes:
    """Each run of ring_dim residues (cycling through the towers) packed to its own tower's
    bit_length, runs one after the other (numpy reference of the wire payload)."""
    runs = residues.reshape(-1, ring_dim)
    return b"".join(ref_bitpack(run, moduli[k % len(moduli)].bit_length())
                    for k, run in enumerate(runs))


def _tower_residues(rng, h):
    """Random residues in wire order: per ciphertext, c0 towers 0..T-1, then c1 towers."""
    n, qs = h["ring_dim"], h["moduli"]
    blocks = [rng.integers(0, qs[k % len(qs)], size=n, dtype=np.uint64)
              for k in range(2 * len(qs) * h["n_ciphertexts"])]
    return np.concatenate(blocks)


@pytest.mark.parametrize("ring_dim", [1024, 8192])
@pytest.mark.parametrize("moduli", [
    (1152921504606748673, 1125899904679937, 1125899908022273),  # a 3-tower flooding context
    ((1 << 59) - 55, 3),
    ((1 << 62) - 57, (1 << 61) - 1, 2**31 - 1, 1125899904679937, 5, 7, 11, 13),  # 8 towers
])
def test_multi_tower_encode_parse_aggregate(moduli, ring_dim):
    rng = np.random.default_rng(len(moduli) + ring_dim)
    h = _header(modulus=moduli[0], moduli=moduli, ring_dim=ring_dim, n_ciphertexts=2,
                n_values=ring_dim + 5)
    bits = max(q.bit_length() for q in moduli)
    residues = _tower_residues(rng, h)
    payload = ref_tower_pack(residues, moduli, ring_dim)
    # each tower at its own width: 2 ciphertexts * 2 elements * sum of N * bits_i / 8
    assert len(payload) == 2 * 2 * sum(ring_dim * q.bit_length() // 8 for q in moduli)
    data = native.encode_update(h, payload)
    extra = 8 * (len(moduli) - 1)  # the other towers' moduli follow the fixed header
    assert len(data) == native.HEADER_SIZE + extra + len(payload) + native.CHECKSUM_SIZE
    assert data[146] == len(moduli)
    assert data[168 + extra:-8] == payload
    parsed = native.parse_update(data)
    assert parsed["moduli"] == tuple(moduli) and parsed["n_towers"] == len(moduli)
    assert parsed["residue_bits"] == bits and parsed["modulus"] == moduli[0]

    # the aggregator adds each residue mod its own tower's modulus (blocks of 4096 residues
    # cross tower boundaries when ring_dim < 4096)
    agg = native.Aggregator(h["context_fp"], list(moduli), ring_dim, 8, 2, packing=1)
    agg.add(data)
    assert agg.result()[168 + extra:-8] == payload
    other = _tower_residues(rng, h)
    h2 = dict(h)
    data2 = native.encode_update(h2, ref_tower_pack(other, moduli, ring_dim))
    agg.add(data2)
    q_of = np.array([moduli[(i // ring_dim) % len(moduli)] for i in range(residues.size)],
                    dtype=object)
    expect = (residues.astype(object) + other.astype(object)) % q_of
    assert agg.result()[168 + extra:-8] == ref_tower_pack(expect.astype(np.uint64), moduli,
                                                          ring_dim)

    # a server of another tower list refuses it; so does one with the towers reordered
    for wrong in (list(moduli[:1]), list(reversed(moduli))):
        with pytest.raises(fs.IncompatibleUpdate, match="modulus"):
            native.Aggregator(h["context_fp"], wrong, ring_dim, 8, 2).add(data)

    # a residue of a smaller tower that is below q_0 but not below its own modulus is refused
    bad = residues.copy()
    bad[ring_dim] = moduli[1]  # first residue of tower 1 of c0: == q_1
    if moduli[1] < 2**moduli[1].bit_length():  # always: q_1 itself fits its own width
        data_bad = native.encode_update(h, ref_tower_pack(bad, moduli, ring_dim))
        with pytest.raises(fs.InvalidUpdate, match="modulus"):
            native.Aggregator(h["context_fp"], list(moduli), ring_dim, 8, 2).add(data_bad)


def _forge(data: bytes, at: int, raw: bytes) -> bytes:
    """Overwrites bytes at `at` and re-seals the checksum (a forger can always do that)."""
    body = bytearray(data[:-8])
    body[at:at + len(raw)] = raw
    return bytes(body) + native.checksum64(bytes(body)).to_bytes(8, "little")


def test_multi_tower_header_forgeries_are_refused():
    moduli = (1152921504606748673, 1125899904679937, 1125899908022273)
    h = _header(modulus=moduli[0], moduli=moduli)
    data = native.encode_update(h, ref_tower_pack(_tower_residues(np.random.default_rng(0), h),
                                                   moduli, h["ring_dim"]))
    native.parse_update(data)
    cases = [
        (146, bytes([2]), "checksum|trailing|payload_len|truncated"),   # tower count shrunk
        (146, bytes([4]), "truncated|payload_len|modulus|residue_bits"),  # grown
        (146, bytes([0]), "n_towers"),
        (146, bytes([9]), "n_towers"),
        (147, bytes([1]), "payload_len"),                               # seeded, c1 sent
        (148, bytes([1]), "reserved"),
        (168, (2**40).to_bytes(8, "little"), "modulus"),               # even tower modulus
        (168, moduli[0].to_bytes(8, "little"), "twice"),                # duplicate tower
        (176, (2**62 + 1).to_bytes(8, "little"), "residue_bits"),       # too wide
        (8, (1).to_bytes(2, "little"), "version"),                      # wire version 1
    ]
    for at, raw, needle in cases:
        with pytest.raises(fs.InvalidUpdate, match=needle):
            native.parse_update(_forge(data, at, raw))
    with pytest.raises(fs.InvalidUpdate):
        native.parse_update(data[:168 + 8])  # cut inside the extra moduli


@pytest.mark.parametrize("field,value,needle", [
    ("kind", 3, "kind"),
    ("n_summed", 2, "n_summed"),            # a client update sums exactly one
    ("ring_dim", 1000, "ring_dim"),
    ("ring_dim", 512, "ring_dim"),
    ("modulus", 2**40, "modulus"),          # even
    ("modulus", 1, "modulus"),
    ("modulus", (1 << 63) + 1, "residue_bits"),
    ("packing", 3, "packing"),
    ("n_ciphertexts", 0, "n_ciphertexts"),
    ("n_values", 0, "n_values"),
    ("n_values", 2049, "n_values"),         # more than 2 ciphertexts of 1024 complex values hold
    ("n_values", 1024, "n_values"),         # fits one ciphertext: the second would be padding
    ("weight_bound", 0.0, "weight_bound"),
    ("weight_bound", float("nan"), "weight_bound"),
    ("weight_bound", float("inf"), "weight_bound"),
])
def test_encode_rejects_inconsistent_headers(field, value, needle):
    h = _header(**{field: value})
    bits = max(1, h["modulus"].bit_length())
    n = 2 * h["ring_dim"] * max(h["n_ciphertexts"], 0)
    with pytest.raises(fs.InvalidUpdate, match=needle):
        native.encode_update(h, bytes((n * bits + 7) // 8))


def test_encode_rejects_wrong_payload_length():
    h = _header()
    n = (2 * 1024 * 2 * 59 + 7) // 8
    with pytest.raises(ValueError, match="payload"):
        native.encode_update(h, bytes(n - 1))
    with pytest.raises(ValueError, match="fingerprint|context_fp|32 bytes"):
        native.encode_update(_header(context_fp=bytes(31)), bytes(n))


def test_checksum64_is_sensitive():
    rng = np.random.default_rng(3)
    for size in [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 1000]:
        data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        c = native.checksum64(bytes(data))
        assert c == native.checksum64(bytes(data))  # deterministic
        assert 0 <= c < 2**64
        for i in range(size):
            for bit in (0, 7):
                data[i] ^= 1 << bit
                assert native.checksum64(bytes(data)) != c, (size, i, bit)
                data[i] ^= 1 << bit
    # length is hashed: zero runs of different lengths differ
    assert len({native.checksum64(bytes(n)) for n in range(80)}) == 80
