"""Encrypted weighted FedAvg end to end, the server's (missing) key material, and the contexts."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import native
from conftest import ELEMENTS, RING_DIM, make_mask, make_state, weighted_average
from forgery import build_context, split_context

ATOL = 1e-6


def test_openfhe_wheel_imports():
    """CI has the openfhe wheel: its absence is a failure, never a skip."""
    import openfhe  # noqa: F401, PLC0415

    from fedshield.he import backend  # noqa: PLC0415

    assert backend.openfhe() is openfhe


def assert_close(out: dict[str, torch.Tensor], ref: dict[str, np.ndarray], atol: float = ATOL):
    assert set(out) == set(ref)
    for name, t in out.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == ref[name].shape, name
        np.testing.assert_allclose(t.double().numpy(), ref[name], atol=atol, rtol=0,
                                   err_msg=name)


def weight_bound_for(weights) -> float:
    """What a round does: the public power of two at or above every client's weight."""
    return float(2 ** math.ceil(math.log2(max(weights))))


@pytest.fixture(scope="module")
def loaded(client_ctx, server_ctx):
    """The contexts after a serialize -> load round trip (as deployed)."""
    client = fs.load_context(client_ctx.to_bytes(include_secret=True))
    server = fs.load_context(server_ctx.to_bytes())
    assert client.has_secret_key and client.role == "client"
    assert not server.has_secret_key and server.role == "server"
    assert client.fingerprint == server.fingerprint == client_ctx.fingerprint
    return client, server


# -- weighted FedAvg ---------------------------------------------------------------------------

WEIGHT_SETS = {
    1: [37.0],
    2: [120.0, 9.0],
    5: [37.0, 120.0, 64.0, 255.0, 9.0],
}


@pytest.mark.parametrize("n_clients", [1, 2, 5])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_weighted_fedavg_matches_plaintext(loaded, n_clients, masked):
    client, server = loaded
    weights = WEIGHT_SETS[n_clients]
    wb = weight_bound_for(weights)
    states = [make_state(100 + i) for i in range(n_clients)]
    layout = fs.Layout.from_state_dict(states[0])
    mask = make_mask(7, states[0], keep=0.3) if masked else None
    wire = [fs.encrypt_update(client, s, layout, weight=w, mask=mask, round=3,
                              weight_bound=wb).to_bytes() for s, w in zip(states, weights)]
    n_kept = layout.numel if mask is None else int(sum(m.sum() for m in mask.values()))
    assert all(fs.EncryptedUpdate.from_bytes(b).n_values == n_kept + 1 for b in wire)

    ups = [fs.EncryptedUpdate.from_bytes(b) for b in wire]
    agg = fs.aggregate(server, ups)
    assert agg.is_aggregate and agg.n_summed == n_clients and agg.round == 3
    # over the wire again
    agg = fs.EncryptedUpdate.from_bytes(agg.to_bytes())
    out = fs.decrypt_update(client, agg, layout, mask=mask)
    ref = weighted_average(states, weights, mask)
    assert_close(out, ref)
    if mask is not None:
        for name, m in mask.items():
            assert (out[name][~m] == 0).all(), name  # exact zeros where pruned
            assert (out[name][m] != 0).all(), name
    # raw bytes aggregate to the very same bytes
    assert fs.aggregate(server, wire).to_bytes() == agg.to_bytes()


def test_round_weight_bound_with_example_counts(client_ctx, server_ctx):
    """Example counts as weights with the round's bound (the next power of two of the
    largest); without a bound every update takes the context's default bound (2**20), and
    they sum just as well."""
    weights = [1500.0, 4000.0, 65536.0]
    states = [make_state(200 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    ups = [fs.encrypt_update(client_ctx, s, layout, weight=w, weight_bound=65536.0)
           for s, w in zip(states, weights)]
    out = fs.decrypt_update(client_ctx, fs.aggregate(server_ctx, ups), layout)
    assert_close(out, weighted_average(states, weights))
    alone = [fs.encrypt_update(client_ctx, s, layout, weight=w) for s, w in zip(states, weights)]
    assert [u.header["weight_bound"] for u in alone] == [2.0 ** 20] * 3
    out = fs.decrypt_update(client_ctx, fs.aggregate(server_ctx, alone), layout)
    assert_close(out, weighted_average(states, weights))


@pytest.mark.parametrize("weight_bound", [1.0, 2.0**8, 2.0**16])
def test_precision_budget(client_ctx, server_ctx, weight_bound):
    """CKKS noise is absolute in the pre-weighted domain, so the error of the average grows
    as weight_bound / sum(w): an average that could miss the tolerance is refused, never
    returned (the Server picks the next power of two of the largest weight)."""
    states = [make_state(300 + i) for i in range(2)]
    layout = fs.Layout.from_state_dict(states[0])
    ups = [fs.encrypt_update(client_ctx, s, layout, weight=1.0, weight_bound=weight_bound)
           for s in states]
    agg = fs.aggregate(server_ctx, ups)
    ref = weighted_average(states, [1.0, 1.0])
    bound = client_ctx.params.average_error_bound(2, 2.0 / weight_bound)
    if bound > fs.DEFAULT_TOLERANCE:
        with pytest.raises(fs.PrecisionError, match="weight bound"):
            fs.decrypt_update(client_ctx, agg, layout)
    # the check reads the weight sum from the decrypted weight slot: a hair off the exact one
    out = fs.decrypt_update(client_ctx, agg, layout, tolerance=max(bound * 1.01, 1e-6))
    err = max(float(np.abs(out[n].double().numpy() - ref[n]).max()) for n in ref)
    assert err <= bound + 1.2e-7, err  # + float32 rounding


@pytest.mark.parametrize("weights", [(5.0, 1.0, 4.0), (1.0, 1e6, 3.0), (1e6, 7e5, 1e6)])
def test_any_weights_within_tolerance(client_ctx, server_ctx, weights):
    """Weights from 1 to 10^6 with the round's bound: <= 1e-6 from the plaintext average."""
    states = [make_state(330 + i, low=-1.0, high=1.0) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    bound = float(2 ** math.ceil(math.log2(max(weights))))
    ups = [fs.encrypt_update(client_ctx, s, layout, weight=w, weight_bound=bound, round=4)
           for s, w in zip(states, weights)]
    agg = fs.EncryptedUpdate.from_bytes(fs.aggregate(server_ctx, ups).to_bytes())
    out = fs.decrypt_update(client_ctx, agg, layout)
    ref = weighted_average(states, list(weights))
    err = max(float(np.abs(out[n].double().numpy() - ref[n]).max()) for n in ref)
    assert err <= 1e-6, err


def test_parameters_that_cannot_reach_the_tolerance_are_refused(client_ctx, small_state,
                                                                small_layout):
    with pytest.raises(fs.ParameterError, match="tolerance=1e-09"):
        fs.encrypt_update(client_ctx, small_state, small_layout, tolerance=1e-9)
    with pytest.raises(fs.ParameterError, match="tolerance=0"):
        fs.encrypt_update(client_ctx, small_state, small_layout, tolerance=0)


def test_order_and_hierarchy_do_not_matter(client_ctx, server_ctx, small_layout):
    states = [make_state(400 + i) for i in range(4)]
    ups = [fs.encrypt_update(client_ctx, s, small_layout, weight=w, weight_bound=8.0)
           for s, w in zip(states, [1.0, 2.0, 3.0, 8.0])]
    flat = fs.aggregate(server_ctx, ups).to_bytes()
    assert fs.aggregate(server_ctx, ups[::-1]).to_bytes() == flat
    left = fs.aggregate(server_ctx, ups[:2])
    right = fs.aggregate(server_ctx, ups[2:])
    tree = fs.aggregate(server_ctx, [left, right], allow_partial_aggregates=True)
    assert tree.n_summed == 4
    assert tree.to_bytes() == flat
    assert fs.aggregate(server_ctx, [left, ups[2], ups[3]], allow_partial_aggregates=True).to_bytes() == flat
    out = fs.decrypt_update(client_ctx, tree, small_layout)
    assert_close(out, weighted_average(states, [1.0, 2.0, 3.0, 8.0]))


def test_aggregate_consumes_lazily(client_ctx, server_ctx, small_layout):
    states = [make_state(500 + i) for i in range(4)]
    weights = [1.0, 2.0, 3.0, 4.0]
    wire = [fs.encrypt_update(client_ctx, s, small_layout, weight=w, weight_bound=4.0).to_bytes()
            for s, w in zip(states, weights)]

    class Blob(bytearray):  # weak-referenceable bytes
        pass

    pulled: list[int] = []
    refs: list[weakref.ref] = []

    def updates():
        for i, data in enumerate(wire):
            # every update but the one being folded is already released: memory stays flat
            for j, r in enumerate(refs[:-1]):
                assert r() is None, f"update {j} still alive when update {i} is pulled"
            pulled.append(i)
            blob = Blob(data)
            refs.append(weakref.ref(blob))
            yield blob
            del blob

    gen = updates()
    agg = fs.aggregate(server_ctx, gen)
    assert pulled == [0, 1, 2, 3]
    assert_close(fs.decrypt_update(client_ctx, agg, small_layout),
                 weighted_average(states, weights))

    # the first bad update stops the pull: nothing after it was read
    pulled.clear()
    refs.clear()
    wire[1] = wire[1][:-1]
    with pytest.raises(fs.InvalidUpdate):
        fs.aggregate(server_ctx, updates())
    assert pulled == [0, 1]


def test_empty_round_raises(server_ctx):
    with pytest.raises(fs.FedShieldError, match="no valid update"):
        fs.aggregate(server_ctx, iter(()))
    with pytest.raises(fs.FedShieldError, match="no valid update"):
        fs.aggregate(server_ctx, [b"junk"], on_reject=lambda i, e: None)
    with pytest.raises(TypeError):
        fs.aggregate(server_ctx.to_bytes(), [])  # type: ignore[arg-type]


# -- incompatible updates ------------------------------------------------------------------------

def test_incompatible_updates(client_ctx, server_ctx, foreign_keys, small_state, small_layout):
    def enc(state=small_state, layout=small_layout, ctx=client_ctx, **kw):
        kw.setdefault("weight_bound", 4.0)
        return fs.encrypt_update(ctx, state, layout, weight=kw.pop("weight", 1.0), **kw)

    base = enc(round=2)
    mask_a = make_mask(1, small_state)
    mask_b = make_mask(2, small_state)
    other_shapes = make_state(9, {"x.lora_A.weight": (4, 32)})
    cases = {
        "layout": enc(state=other_shapes, layout=fs.Layout.from_state_dict(other_shapes),
                      round=2),
        "round": enc(round=3),
        "mask": enc(round=2, mask=mask_a),
        "weight_bound": enc(round=2, weight_bound=8.0),
        "context": enc(round=2, ctx=foreign_keys.client_context()),
    }
    for what, upd in cases.items():
        with pytest.raises(fs.IncompatibleUpdate, match=what.split("_")[0]):
            fs.aggregate(server_ctx, [base, upd])
    # different masks with the same number of kept values: still incompatible
    same_count = {n: m.flatten()[torch.randperm(m.numel(), generator=torch.Generator()
                                                .manual_seed(0))].reshape(m.shape)
                  for n, m in mask_a.items()}
    assert any((same_count[n] != mask_a[n]).any() for n in mask_a)
    with pytest.raises(fs.IncompatibleUpdate, match="mask"):
        fs.aggregate(server_ctx, [enc(round=2, mask=mask_a), enc(round=2, mask=same_count)])
    with pytest.raises(fs.IncompatibleUpdate, match="mask"):
        fs.aggregate(server_ctx, [enc(round=2, mask=mask_a), enc(round=2, mask=mask_b)])
    # a foreign update alone is refused by this server (first update included)
    with pytest.raises(fs.IncompatibleUpdate, match="context"):
        fs.aggregate(server_ctx, [cases["context"]])
    # and the foreign server refuses ours
    with pytest.raises(fs.IncompatibleUpdate, match="context"):
        fs.aggregate(foreign_keys.server_context(), [base])


def test_decrypt_checks_what_it_decrypts(client_ctx, foreign_keys, small_state, small_layout):
    mask = make_mask(3, small_state)
    masked = fs.encrypt_update(client_ctx, small_state, small_layout, mask=mask, weight_bound=1.0)
    dense = fs.encrypt_update(client_ctx, small_state, small_layout, weight_bound=1.0)
    with pytest.raises(fs.IncompatibleUpdate, match="mask"):
        fs.decrypt_update(client_ctx, masked, small_layout)  # mask missing
    with pytest.raises(fs.IncompatibleUpdate, match="mask"):
        fs.decrypt_update(client_ctx, masked, small_layout, mask=make_mask(4, small_state))
    with pytest.raises(fs.IncompatibleUpdate, match="mask"):
        fs.decrypt_update(client_ctx, dense, small_layout, mask=mask)
    other = make_state(5, {"y": (3, 3)})
    with pytest.raises(fs.IncompatibleUpdate, match="layout"):
        fs.decrypt_update(client_ctx, dense, fs.Layout.from_state_dict(other))
    with pytest.raises(fs.IncompatibleUpdate, match="context"):
        fs.decrypt_update(foreign_keys.client_context(), dense, small_layout)
    out = fs.decrypt_update(client_ctx, masked, small_layout, mask=mask)
    assert_close(out, weighted_average([small_state], [1.0], mask))


# -- the server holds no secret key ----------------------------------------------------------------

def test_server_context_cannot_decrypt(server_ctx, loaded, small_update, small_layout):
    _, loaded_server = loaded
    for ctx in (server_ctx, loaded_server):
        assert ctx.has_secret_key is False
        with pytest.raises(fs.KeyMaterialError):
            fs.decrypt_update(ctx, small_update, small_layout)
        with pytest.raises(fs.KeyMaterialError):
            ctx.openfhe_objects(need_secret=True)
        with pytest.raises(fs.KeyMaterialError):
            ctx.to_bytes(include_secret=True)


def _secret_windows(secret: bytes) -> list[bytes]:
    """64-byte windows from the key material at the end of the serialized secret key (its
    front is cereal framing shared with the public key)."""
    key_part = secret[-RING_DIM * 8:]
    step = len(key_part) // 16
    return [key_part[i * step:i * step + 64] for i in range(16)] + [secret[-64:]]


def test_serialized_contexts_do_not_leak_the_secret_key(client_ctx, server_ctx, loaded):
    secret = client_ctx.secret_key_bytes()
    assert isinstance(secret, bytes) and len(secret) > RING_DIM * 8
    windows = _secret_windows(secret)
    public_material = client_ctx.public_key_bytes() + client_ctx.public().to_bytes()
    assert not any(w in public_material for w in windows)  # the windows are secret-only
    with_secret = client_ctx.to_bytes(include_secret=True)
    assert all(w in with_secret for w in windows)  # control: the search does find them
    _, loaded_server = loaded
    for blob in (server_ctx.to_bytes(), client_ctx.to_bytes(), loaded_server.to_bytes(),
                 client_ctx.public().to_bytes()):
        assert not any(w in blob for w in windows)
        ctx = fs.load_context(blob)
        assert not ctx.has_secret_key and ctx.role == "server"


# -- load_context on hostile bytes ---------------------------------------------------------------

def test_load_context_rebuild_helper_is_faithful(server_ctx):
    blob = server_ctx.to_bytes()
    assert build_context(*split_context(blob)) == blob


@pytest.mark.parametrize("mutate", [
    lambda b: b"",
    lambda b: b"garbage",
    lambda b: bytes(range(256)) * 40,
    lambda b: b[:-1],
    lambda b: b[:100],
    lambda b: b[:len(b) // 2],
    lambda b: b[:40],
    lambda b: b + b"\0",
    lambda b: b"FSHLDCTY" + b[8:],
    lambda b: b[:500] + bytes([b[500] ^ 1]) + b[501:],
    lambda b: b[:-5] + bytes([b[-5] ^ 0x80]) + b[-4:],
], ids=["empty", "garbage", "random", "minus1", "head100", "half", "head40", "plus1",
        "magic", "flip500", "flip_digest"])
def test_load_context_rejects_corrupted(server_ctx, client_ctx, mutate):
    for blob in (server_ctx.to_bytes(), client_ctx.to_bytes(include_secret=True)):
        with pytest.raises(fs.KeyMaterialError):
            fs.load_context(mutate(blob))


def _forgeries(blob: bytes, foreign_pk: bytes):
    """Well-sealed (digest recomputed) but malformed contexts."""
    meta, secs = split_context(blob)

    def m(**kw):
        d = json.loads(json.dumps(meta))
        for k, v in kw.items():
            if v is ...:
                d.pop(k)
            else:
                d[k] = v
        return d

    yield "version", build_context(meta, secs, version=3)
    yield "version_1", build_context(meta, secs, version=1)
    yield "json", build_context(meta, secs, raw_head=b"{not json")
    yield "json_list", build_context(meta, secs, raw_head=b"[1, 2]")
    yield "nested", build_context(meta, secs, raw_head=b"[" * 100000 + b"]" * 100000)
    yield "utf8", build_context(meta, secs, raw_head=b"\xff\xfe")
    for key in ("params", "sections", "modulus", "ct_layout", "role", "fingerprint"):
        yield f"no_{key}", build_context(m(**{key: ...}), secs)
    yield "params_bad", build_context(m(params={**meta["params"], "ring_dim": 2048}), secs)
    yield "params_unknown", build_context(m(params={**meta["params"], "x": 1}), secs)
    yield "params_type", build_context(m(params=[1, 2]), secs)
    yield "modulus_str", build_context(m(modulus="abc"), secs)
    yield "modulus_inf", build_context(m(modulus=float("inf")), secs)  # JSON "Infinity"
    yield "modulus_other", build_context(m(modulus=meta["modulus"] - 2), secs)
    yield "fingerprint", build_context(m(fingerprint="00" * 32), secs)
    sizes = [s for _, s in meta["sections"]]
    yield "sizes", build_context(m(sections=[[n, s + 1] for n, s in meta["sections"]]), secs)
    yield "negative", build_context(m(sections=[[meta["sections"][0][0], -5]] + [
        [meta["sections"][0][0] + "x", sizes[0] + 5]] + meta["sections"][1:]), secs)
    idx_t = [n for n, _ in meta["sections"]].index("template")
    yield "duplicate_section", build_context(
        m(sections=meta["sections"] + [meta["sections"][idx_t]]), secs + [secs[idx_t]])
    yield "name_not_str", build_context(
        m(sections=[[7, meta["sections"][0][1]]] + meta["sections"][1:]), secs)
    yield "no_template", build_context(
        m(sections=[x for x in meta["sections"] if x[0] != "template"]),
        [s for (n, _), s in zip(meta["sections"], secs) if n != "template"])
    lay = meta["ct_layout"]
    for name, bad in [("c0_far", [lay[0], lay[1], 10**9, lay[3], lay[4]]),
                      ("c1_far", [lay[0], lay[1], lay[2], lay[4] - 8, lay[4]]),
                      ("overlap", [lay[0], lay[1], lay[2], lay[2] + 8, lay[4]]),
                      ("c0_zero", [lay[0], lay[1], 0, lay[3], lay[4]]),
                      ("ring", [lay[0] * 2, lay[1], lay[2], lay[3], lay[4]]),
                      ("total", [lay[0], lay[1], lay[2], lay[3], lay[4] + 1]),
                      ("short", lay[:4]),
                      ("negative", [lay[0], lay[1], -8, lay[3], lay[4]])]:
        yield f"ct_layout_{name}", build_context(m(ct_layout=bad), secs)
    # the public key of another federation, fingerprint left as it was
    idx = [n for n, _ in meta["sections"]].index("public_key")
    swapped = list(secs)
    swapped[idx] = foreign_pk
    yield "foreign_pk", build_context(m(sections=[[n, len(s)] for (n, _), s in
                                           zip(meta["sections"], swapped)]), swapped)


def test_load_context_rejects_forged(server_ctx, foreign_keys):
    foreign_pk = foreign_keys.server_context().public_key_bytes()
    names = []
    for name, blob in _forgeries(server_ctx.to_bytes(), foreign_pk):
        names.append(name)
        with pytest.raises(fs.KeyMaterialError):
            fs.load_context(blob)
            pytest.fail(f"forgery {name!r} loaded")
    assert len(names) > 25


def test_a_forged_template_is_a_key_material_error(client_ctx, small_state, small_layout):
    """A context file forged with recomputed checksums carries a template whose tower
    parameters (the roots of unity native decryption reads from it) are gone: decryption names
    the context, not a raw error."""
    upd = fs.encrypt_update(client_ctx, small_state, small_layout, weight=1.0)
    template, layout = client_ctx.ciphertext_template
    meta, secs = split_context(client_ctx.to_bytes(include_secret=True))
    at = [i for i, s in enumerate(secs) if s == template]
    assert len(at) == 1  # the file carries the template as one section
    forged = bytearray(template)
    forged[: layout[2] - 16] = b"\xff" * (layout[2] - 16)  # the header before c0's residues
    secs[at[0]] = bytes(forged)
    with pytest.raises(fs.KeyMaterialError, match="template"):
        ctx = fs.load_context(build_context(meta, secs))
        fs.decrypt_update(ctx, upd, small_layout, workers=1)


def test_a_key_file_must_name_its_secret_key(client_ctx):
    meta, secs = split_context(client_ctx.to_bytes(include_secret=True))
    assert "secret_fp" in meta
    del meta["secret_fp"]
    with pytest.raises(fs.KeyMaterialError, match="secret_fp"):
        fs.load_context(build_context(meta, secs))


def test_native_codec_refuses_out_of_bounds_layouts(client_ctx, small_update):
    from fedshield.he.seeded import expand_sum

    template, layout = client_ctx.ciphertext_template
    data = small_update.to_bytes()
    with pytest.raises(fs.InvalidUpdate, match="expanded c1"):
        native.decode_ciphertexts(data, template, layout, 1)  # a seeded update without c1
    c1 = expand_sum(small_update.seeds, client_ctx.fingerprint, small_update.round, 1,
                    client_ctx.moduli, RING_DIM)
    with pytest.raises(fs.InvalidUpdate, match="expanded c1"):
        native.decode_ciphertexts(data, template, layout, 1, c1[:-1].copy())
    ok = native.decode_ciphertexts(data, template, layout, 1, c1)
    assert len(ok) == 1 and len(ok[0]) == len(template)
    n, q, c0, c1_off, total = layout
    for bad in [(n, q, 10**12, c1_off, total), (n, q, c0, total - 8, total),
                (n, q, 0, c1_off, total), (n, q, c0, c0 + 8, total), (n, q, c0, 2**64 - 1, total)]:
        with pytest.raises(fs.InvalidUpdate, match="layout"):
            native.decode_ciphertexts(data, template, bad, 1, c1)
    with pytest.raises(fs.InvalidUpdate):
        native.encode_ciphertexts(small_update.header, ok, (n, q, 10**12, c1_off, total), 1,
                                   small_update.seeds[0])


# -- headroom -----------------------------------------------------------------------------------

def test_headroom_errors(client_ctx, small_state, small_layout):
    bound = client_ctx.params.value_bound  # 1.0 at the defaults: |values| <= 1, 64 clients
    assert bound == 1.0
    state = {k: v.clone() for k, v in small_state.items()}
    name = small_layout.names[1]
    state[name].view(-1)[7] = bound  # |w/wb * x| == bound: allowed
    fs.encrypt_update(client_ctx, state, small_layout, weight=8.0, weight_bound=8.0)
    state[name].view(-1)[7] = -bound * 1.001
    with pytest.raises(fs.HeadroomError, match=name):
        fs.encrypt_update(client_ctx, state, small_layout, weight=8.0, weight_bound=8.0)
    # the same value passes when the weight shrinks it under the bound
    fs.encrypt_update(client_ctx, state, small_layout, weight=4.0, weight_bound=8.0)
    state[name].view(-1)[7] = float("inf")
    with pytest.raises(fs.HeadroomError, match="not finite"):
        fs.encrypt_update(client_ctx, state, small_layout, weight=1.0, weight_bound=8.0)


@pytest.mark.parametrize("weight,weight_bound", [
    (0.0, 8.0), (-1.0, 8.0), (9.0, 8.0), (float("nan"), 8.0), (float("inf"), 8.0),
    (2.0 ** 16 * 2, 2.0 ** 16),
    (1.0, 0.0), (1.0, -4.0), (1.0, float("inf")), (1.0, float("nan")),
])
def test_bad_weights_raise_parameter_error(client_ctx, small_state, small_layout, weight,
                                           weight_bound):
    with pytest.raises(fs.ParameterError) as info:
        fs.encrypt_update(client_ctx, small_state, small_layout, weight=weight,
                          weight_bound=weight_bound)
    assert type(info.value) is fs.ParameterError  # a bad argument, not a headroom overflow


def test_bad_round_raises_parameter_error(client_ctx, small_state, small_layout):
    for r in (-1, 1.5, "1"):
        with pytest.raises(fs.ParameterError):
            fs.encrypt_update(client_ctx, small_state, small_layout, round=r)  # type: ignore


@pytest.fixture(scope="module")
def two_client_keys():
    # explicit sizes: CKKSParams(max_clients=2) alone is a request, resolved to a smaller modulus
    return fs.keygen_shared(fs.CKKSParams(ring_dim=4096, first_mod_bits=42, scale_bits=34,
                                          max_clients=2))


def test_too_many_clients(two_client_keys, small_state, small_layout):
    client = two_client_keys.client_context()
    server = two_client_keys.server_context()
    assert client.params.value_bound == 32.0  # 2**6 of headroom shared by 2 clients
    ups = [fs.encrypt_update(client, make_state(600 + i), small_layout, weight=1.0,
                             weight_bound=1.0) for i in range(3)]
    with pytest.raises(fs.HeadroomError, match="max_clients 2"):
        fs.aggregate(server, ups)
    two = fs.aggregate(server, ups[:2])
    with pytest.raises(fs.HeadroomError, match="max_clients"):
        fs.aggregate(server, [two, ups[2]], allow_partial_aggregates=True)
    with pytest.raises(fs.HeadroomError, match="max_clients"):
        fs.aggregate(server, [ups[2], two], allow_partial_aggregates=True)
    with pytest.raises(fs.HeadroomError, match="max_clients"):
        fs.aggregate(server, [two, two], allow_partial_aggregates=True)
    # skipped with on_reject, the first two still make a valid aggregate
    rejected = []
    agg = fs.aggregate(server, ups, on_reject=lambda i, e: rejected.append((i, type(e))))
    assert rejected == [(2, fs.HeadroomError)]
    assert agg.to_bytes() == two.to_bytes()


def test_values_at_the_headroom_bound_decrypt(two_client_keys):
    """max_clients updates at exactly value_bound sum to total_bound and must not wrap."""
    client = two_client_keys.client_context()
    server = two_client_keys.server_context()
    b = client.params.value_bound
    rng = np.random.default_rng(9)
    n = 2 * RING_DIM - 1  # two full ciphertexts
    signs = rng.choice([-1.0, 1.0], size=n).astype(np.float32)
    states = [{"all_max": torch.full((RING_DIM - 1,), b, dtype=torch.float32),
               "signs": torch.from_numpy(signs[:RING_DIM].copy() * b)},
              {"all_max": torch.full((RING_DIM - 1,), b, dtype=torch.float32),
               "signs": torch.from_numpy(signs[:RING_DIM].copy() * b)}]
    layout = fs.Layout.from_state_dict(states[0])
    ups = [fs.encrypt_update(client, s, layout, weight=1.0, weight_bound=1.0) for s in states]
    out = fs.decrypt_update(client, fs.aggregate(server, ups), layout)
    assert_close(out, weighted_average(states, [1.0, 1.0]), atol=1e-6 * b)


# -- aggregation in a process where openfhe cannot be imported ------------------------------------

CHILD = textwrap.dedent("""
    import importlib.abc, sys

    attempts = []

    class BlockOpenFHE(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "openfhe" or name.startswith("openfhe."):
                attempts.append(name)
                raise ImportError("openfhe is blocked in this process")
            return None

    sys.meta_path.insert(0, BlockOpenFHE())
    try:
        import openfhe  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")
    attempts.clear()

    import fedshield as fs

    ctx_path, out_path, *update_paths = sys.argv[1:]
    with open(ctx_path, "rb") as f:
        server = fs.load_context(f.read())
    assert not server.has_secret_key

    def updates():
        for p in update_paths:
            with open(p, "rb") as f:
                yield f.read()

    agg = fs.aggregate(server, updates())
    with open(out_path, "wb") as f:
        f.write(agg.to_bytes())
    assert "openfhe" not in sys.modules, "openfhe was imported"
    assert not attempts, f"fedshield tried to import {attempts}"
    # the client side says clearly why it cannot work here
    try:
        fs.keygen_shared()
    except fs.UnsupportedPlatform as exc:
        assert "3.10" in str(exc), str(exc)
    else:
        raise SystemExit("keygen worked without openfhe")
    print("CHILD-OK", agg.n_summed)
""")


def test_aggregate_without_openfhe(tmp_path, client_ctx, server_ctx):
    weights = [3.0, 1.0, 4.0]
    states = [make_state(700 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    ctx_path = tmp_path / "server.ctx"
    ctx_path.write_bytes(server_ctx.to_bytes())
    paths = []
    for i, (s, w) in enumerate(zip(states, weights)):
        p = tmp_path / f"update{i}.bin"
        p.write_bytes(fs.encrypt_update(client_ctx, s, layout, weight=w, round=5,
                                        weight_bound=4.0).to_bytes())
        paths.append(str(p))
    out_path = tmp_path / "aggregate.bin"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ctx_path), str(out_path), *paths],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CHILD-OK 3" in proc.stdout
    agg = fs.EncryptedUpdate.from_bytes(out_path.read_bytes())
    assert agg.n_summed == 3 and agg.round == 5
    out = fs.decrypt_update(client_ctx, agg, layout)
    assert_close(out, weighted_average(states, weights))


# -- a client that loads its context from a file (a fresh process, as deployed) -----------------

CLIENT_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    import fedshield as fs

    ctx_path, state_path, agg_path, out_path, avg_path = sys.argv[1:]
    with open(ctx_path, "rb") as f:
        client = fs.load_context(f.read())
    assert client.has_secret_key
    state = {k: torch.from_numpy(v) for k, v in np.load(state_path).items()}
    layout = fs.Layout.from_state_dict(state)
    upd = fs.encrypt_update(client, state, layout, weight=2.0, round=4, weight_bound=4.0)
    with open(out_path, "wb") as f:
        f.write(upd.to_bytes())
    with open(agg_path, "rb") as f:
        agg = fs.EncryptedUpdate.from_bytes(f.read())
    avg = fs.decrypt_update(client, agg, layout)
    np.savez(avg_path, **{k: v.numpy() for k, v in avg.items()})
    print("CLIENT-OK")
""")


def test_client_context_loaded_in_a_fresh_process(tmp_path, client_ctx, server_ctx):
    """Regression: a context loaded from bytes makes ciphertexts whose OpenFHE serialization is
    144 bytes longer than the keygen template; encrypting with it used to fail."""
    states = [make_state(800), make_state(801)]
    layout = fs.Layout.from_state_dict(states[0])
    (tmp_path / "client.ctx").write_bytes(client_ctx.to_bytes(include_secret=True))
    np.savez(tmp_path / "state.npz", **{k: v.numpy() for k, v in states[1].items()})
    mine = fs.encrypt_update(client_ctx, states[0], layout, weight=3.0, round=4, weight_bound=4.0)
    (tmp_path / "agg_in.bin").write_bytes(fs.aggregate(server_ctx, [mine]).to_bytes())
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_CHILD, str(tmp_path / "client.ctx"),
         str(tmp_path / "state.npz"), str(tmp_path / "agg_in.bin"), str(tmp_path / "theirs.bin"),
         str(tmp_path / "avg.npz")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the child decrypted our aggregate
    avg = np.load(tmp_path / "avg.npz")
    for name in states[0]:
        np.testing.assert_allclose(avg[name], states[0][name].numpy(), atol=ATOL, rtol=0)
    # and its update aggregates with ours
    theirs = fs.EncryptedUpdate.from_bytes((tmp_path / "theirs.bin").read_bytes())
    agg = fs.aggregate(server_ctx, [mine, theirs])
    assert_close(fs.decrypt_update(client_ctx, agg, layout),
                 weighted_average(states, [3.0, 2.0]))


def test_loaded_and_original_contexts_interoperate(loaded, client_ctx, server_ctx):
    client, server = loaded
    states = [make_state(900), make_state(901)]
    layout = fs.Layout.from_state_dict(states[0])
    a = fs.encrypt_update(client_ctx, states[0], layout, weight=1.0, weight_bound=2.0)
    b = fs.encrypt_update(client, states[1], layout, weight=2.0, weight_bound=2.0)
    assert len(a.to_bytes()) == len(b.to_bytes())  # the wire carries residues only
    ref = weighted_average(states, [1.0, 2.0])
    for srv in (server_ctx, server):
        agg = fs.aggregate(srv, [a, b])
        for dec in (client_ctx, client):
            assert_close(fs.decrypt_update(dec, agg, layout), ref)


# -- other parameters, odd tensors -------------------------------------------------------------

@pytest.mark.parametrize("params", [
    fs.CKKSParams(packing="real"),
    fs.CKKSParams(ring_dim=8192),
    fs.CKKSParams(ring_dim=8192, packing="real", max_clients=8),
], ids=["16384-real", "8192-complex", "8192-real"])
def test_other_parameters_end_to_end(params):
    keys = fs.keygen_shared(params)
    client = fs.load_context(keys.client_context().to_bytes(include_secret=True))
    server = fs.load_context(keys.server_context().to_bytes())
    per_ct = params.values_per_ciphertext
    # one value more than a ciphertext holds (with the weight): two ciphertexts
    states = [make_state(1000 + i, {"a": (per_ct,), "b": (3, 5)}) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    weights = [1.0, 3.0, 2.0]
    mask = make_mask(11, states[0], keep=0.6)
    for m in (None, mask):
        ups = [fs.encrypt_update(client, s, layout, weight=w, mask=m, weight_bound=4.0,
                                 threads=t).to_bytes()
               for s, w, t in zip(states, weights, [0, 1, 2])]
        n_kept = layout.numel if m is None else int(sum(x.sum() for x in m.values()))
        upd = fs.EncryptedUpdate.from_bytes(ups[0])
        assert upd.n_ciphertexts == math.ceil((n_kept + 1) / per_ct)
        assert upd.header["packing"] == (1 if params.packing == "complex" else 2)
        agg = fs.aggregate(server, ups, threads=1)
        assert fs.aggregate(server, ups, threads=3).to_bytes() == agg.to_bytes()
        out = fs.decrypt_update(client, agg, layout, mask=m, threads=2)
        assert_close(out, weighted_average(states, weights, m))


def test_odd_tensors_end_to_end(client_ctx, server_ctx):
    base = make_state(1100, {"t": (9, 5), "h": (33,), "d": (4, 4), "s": ()})
    state = {
        "t": base["t"].t(),                      # non-contiguous
        "h": base["h"].to(torch.bfloat16),       # not float32
        "d": base["d"].double(),
        "s": base["s"],                           # 0-dim
    }
    layout = fs.Layout.from_state_dict(state)
    # insertion order does not matter: names are sorted
    assert fs.Layout.from_state_dict(dict(reversed(list(state.items())))) == layout
    assert layout.names == sorted(state)
    upd = fs.encrypt_update(client_ctx, state, layout, weight=1.0, weight_bound=1.0)
    out = fs.decrypt_update(client_ctx, fs.aggregate(server_ctx, [upd]), layout)
    ref = {k: v.float().double().numpy() for k, v in state.items()}
    assert_close(out, ref)
    assert out["s"].shape == () and out["t"].shape == (5, 9)


def test_decrypt_rejects_a_forged_value_count(client_ctx, small_update, small_layout):
    data = bytearray(small_update.to_bytes())
    struct.pack_into("<Q", data, 120, 10)  # n_values: 10 instead of 496 (still one ciphertext)
    body = bytes(data[:-8])
    forged = fs.EncryptedUpdate.from_bytes(body + struct.pack("<Q", native.checksum64(body)))
    with pytest.raises(fs.InvalidUpdate, match="values"):
        fs.decrypt_update(client_ctx, forged, small_layout)


def test_locate_residues(client_ctx):
    template, layout = client_ctx.ciphertext_template
    n, q = client_ctx.params.ring_dim, client_ctx.modulus
    assert native.locate_residues(template, n, q) == tuple(layout)
    with pytest.raises(fs.InvalidUpdate, match="found 0"):
        native.locate_residues(bytes(4096), n, q)
    with pytest.raises(fs.InvalidUpdate, match="found 1"):
        native.locate_residues(template[:layout[3]], n, q)
    # a length word whose byte count overflows 64 bits must not send the scan out of bounds
    huge = 2**61
    crafted = struct.pack("<Q", huge) + bytes(64)
    with pytest.raises(fs.InvalidUpdate):
        native.locate_residues(crafted, huge, q)
    with pytest.raises(fs.InvalidUpdate):
        native.locate_residues(template, 0, q)


def test_hostile_first_update_cannot_take_over_the_round(client_ctx, server_ctx, small_layout):
    """The server states the round, layout and weight bound; a forged first reply is rejected."""
    from fedshield import native

    honest = [fs.encrypt_update(client_ctx, make_state(700 + i), small_layout, weight=1.0 + i,
                                weight_bound=4.0, round=3) for i in range(2)]
    evil = bytearray(honest[0].to_bytes())
    evil[112:120] = (7).to_bytes(8, "little")  # round 7
    body = len(evil) - 8
    evil[body:] = native.checksum64(bytes(evil[:body])).to_bytes(8, "little")
    rejected = []
    agg = fs.aggregate(server_ctx, [bytes(evil), *honest], round=3, layout=small_layout,
                       weight_bound=4.0, on_reject=lambda i, e: rejected.append((i, type(e))))
    assert rejected == [(0, fs.IncompatibleUpdate)] and agg.n_summed == 2
    # Unstated, the forged first update would have fixed round 7 for everyone.
    with pytest.raises(fs.IncompatibleUpdate, match="round 3"):
        fs.aggregate(server_ctx, [bytes(evil), *honest])
    # A client posing as an aggregate of 64 (with 63 made-up seeds) is refused by default.
    fake = bytearray(honest[0].to_bytes()[:body]) + bytes(range(63)) * 32
    fake[10:12] = (2).to_bytes(2, "little")
    fake[12:16] = (64).to_bytes(4, "little")
    fake += native.checksum64(bytes(fake)).to_bytes(8, "little")
    assert fs.EncryptedUpdate.from_bytes(bytes(fake)).n_summed == 64  # well-formed
    with pytest.raises(fs.IncompatibleUpdate, match="aggregate"):
        fs.aggregate(server_ctx, [bytes(fake), *honest])
    with pytest.raises(fs.IncompatibleUpdate, match="layout"):
        fs.aggregate(server_ctx, honest, layout=fs.Layout.from_state_dict({"x": torch.ones(2)}))
    with pytest.raises(fs.IncompatibleUpdate, match="weight_bound"):
        fs.aggregate(server_ctx, honest, weight_bound=8.0)


def test_forged_packing_byte_is_rejected(client_ctx, server_ctx, small_layout):
    from fedshield import native

    ups = [fs.encrypt_update(client_ctx, make_state(710 + i), small_layout) for i in range(2)]
    forged = bytearray(ups[0].to_bytes())
    forged[145] = 2  # "real" packing on a complex-packing context
    body = len(forged) - 8
    forged[body:] = native.checksum64(bytes(forged[:body])).to_bytes(8, "little")
    with pytest.raises(fs.IncompatibleUpdate, match="packing"):
        fs.aggregate(server_ctx, [bytes(forged), ups[1]])
    with pytest.raises(fs.IncompatibleUpdate, match="packing"):
        fs.decrypt_update(client_ctx, fs.EncryptedUpdate.from_bytes(bytes(forged)), small_layout)


def test_aggregator_refuses_concurrent_use(client_ctx, server_ctx):
    """Issue 15, item 4: two threads sharing one native Aggregator (it releases the GIL while it
    adds) gave 12 wrong sums in 30 and a heap-use-after-free under ASan. Now a call made while
    another runs raises ConcurrentUseError and changes nothing: whatever the interleaving, the
    result is exactly the sum of the updates that were accepted."""
    import threading

    state = make_state(5, {"w": (40_000,)})  # several ciphertexts: each add takes a while
    layout = fs.Layout.from_state_dict(state)
    ups = [fs.encrypt_update(client_ctx, make_state(70 + i, {"w": (40_000,)}), layout,
                             weight=1.0 + i, round=1, weight_bound=8.0).to_bytes()
           for i in range(8)]  # distinct updates: the aggregator refuses a seed it has summed

    def new():
        return native.Aggregator(server_ctx.fingerprint, server_ctx.modulus, RING_DIM, 64, 1,
                                  elements=ELEMENTS)

    refused = 0
    # at least 30 trials, and on until the two threads overlapped once (a faster add makes
    # an overlap rarer; 500 trials bound the wait)
    for trial in range(500):
        if trial >= 30 and refused:
            break
        agg, accepted, errors = new(), [], []
        lock = threading.Lock()
        start = threading.Barrier(2)

        def worker(mine):
            start.wait()
            for i in mine:
                try:
                    agg.add(ups[i])
                except fs.ConcurrentUseError as exc:
                    with lock:
                        errors.append(exc)
                    continue
                with lock:
                    accepted.append(i)

        threads = [threading.Thread(target=worker, args=(ids,)) for ids in ([0, 1, 2, 3],
                                                                             [4, 5, 6, 7])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused += len(errors)
        assert len(accepted) + len(errors) == 8
        assert all("not thread-safe" in str(e) for e in errors)
        reference = new()
        for i in accepted:
            reference.add(ups[i])
        assert agg.count == len(accepted)
        assert agg.result() == reference.result(), f"trial {trial}: wrong sum"
    # two threads adding 4 updates each overlapped at some point: the guard ran
    assert refused > 0
    assert issubclass(fs.ConcurrentUseError, fs.FedShieldError)


def test_the_fingerprint_covers_the_crypto_context(server_ctx, client_ctx):
    """Issue 15, item 5: the crypto_context section was outside the fingerprint, so a relay could
    swap OpenFHE's parameters inside a context file (digest recomputed) and it still loaded
    under the same fingerprint. Format version 2 covers it; version 1 files are refused with a
    message naming the version."""
    for blob in (server_ctx.to_bytes(), client_ctx.to_bytes(include_secret=True)):
        meta, secs = split_context(blob)
        idx = [n for n, _ in meta["sections"]].index("crypto_context")
        for at in (0, len(secs[idx]) // 2, len(secs[idx]) - 1):
            swapped = list(secs)
            swapped[idx] = secs[idx][:at] + bytes([secs[idx][at] ^ 1]) + secs[idx][at + 1:]
            with pytest.raises(fs.KeyMaterialError, match="fingerprint does not match"):
                fs.load_context(build_context(meta, swapped))
        with pytest.raises(fs.KeyMaterialError, match="version 1 is no longer loaded"):
            fs.load_context(build_context(meta, secs, version=1))
        assert fs.load_context(build_context(meta, secs)).fingerprint == server_ctx.fingerprint


def test_close_wipes_key_material(client_ctx, small_state, small_layout, wipes):
    """Issue 15, item 5: Context.close() (and `with`) zeroes the secret key the context holds
    and the key residues derived from it, drops its OpenFHE objects, and refuses key operations
    afterwards; the public material (fingerprint, public()) stays usable."""
    ctx = fs.load_context(client_ctx.to_bytes(include_secret=True))
    upd = fs.encrypt_update(ctx, small_state, small_layout, weight=1.0)
    fs.decrypt_update(ctx, upd, small_layout)  # derives (and keeps) the key's residues
    held = ctx.secret_key_bytes()
    residues = np.concatenate([r for _, r in ctx.key_residues()]).tobytes()
    assert any(held) and any(residues)
    with ctx as same:
        assert same is ctx
    assert ctx.closed and not ctx.has_secret_key
    # the buffers that held them are zeroed in place, not merely dropped
    assert wipes.zeroed(held) and wipes.zeroed(residues)
    for call in (lambda: fs.decrypt_update(ctx, upd, small_layout),
                 lambda: fs.encrypt_update(ctx, small_state, small_layout, weight=1.0),
                 lambda: ctx.to_bytes(include_secret=True), ctx.secret_key_bytes):
        with pytest.raises(fs.KeyMaterialError, match="closed|no secret key"):
            call()
    ctx.close()  # twice: harmless
    assert ctx.public().fingerprint == client_ctx.fingerprint
    # the original context is untouched: closing one loaded copy wipes only that copy
    fs.decrypt_update(client_ctx, upd, small_layout)
