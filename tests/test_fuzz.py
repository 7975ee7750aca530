"""Fuzz targets: every parser that takes bytes from outside, fed mutated valid messages.

Each target accepts nothing but fs.FedShieldError subclasses (or a result that matches the
unmutated input's), never a crash. Case counts are small in `make test`;
FEDSHIELD_FUZZ_EXAMPLES=N runs every hypothesis target N times (docs/FUZZING.md, "Fuzzing and
sanitizers"); `make asan-test` runs them under AddressSanitizer/UBSan.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import fedshield as fs
from conftest import make_state, weighted_average
from forgery import (MUTATIONS, fuzz_settings, mutate, reseal_frame, reseal_sha256,
                     reseal_update)

# -- partial decryptions: the exact failure of issue 15 (a crash inside OpenFHE) ---------------

SHARE_FUZZ_CHILD = textwrap.dedent("""
    import json, random, sys
    import numpy as np
    import fedshield as fs
    from fedshield.he.frames import unframe
    from fedshield.he.partial import PARTIAL_MAGIC
    from conftest import make_state, weighted_average
    from forgery import mutate, random_mutations, reseal_frame

    cases, out = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(15)
    stats = {"cases": 0, "rejected": {}, "same": 0, "wrong": [], "other": [],
             "residue_edits": 0, "residue_edits_rejected": 0}
    for params, n_cases in ((fs.CKKSParams.for_precision(keys="threshold"), cases - cases // 3),
                            (fs.CKKSParams.for_precision(keys="threshold", flood_bits=30),
                             cases // 3)):
        parties, server = fs.keygen_threshold(params, 3)
        states = [make_state(150 + i) for i in range(3)]
        layout = fs.Layout.from_state_dict(states[0])
        weights = [3.0, 1.0, 2.0]
        agg = fs.aggregate(server, [fs.encrypt_update(p, s, layout, weight=w, weight_bound=4.0)
                                    for p, s, w in zip(parties, states, weights)])
        ref = weighted_average(states, weights)
        shares = [fs.partial_decrypt(p, agg) for p in parties]
        sections = [unframe(s, PARTIAL_MAGIC, "share", fs.InvalidUpdate)[1] for s in shares]
        combiner = parties[0]
        for case in range(n_cases):
            k = rng.randrange(3)
            # two in three keep the size: one to four changed bytes, as in the crashes; half
            # of the edits in the first 3000 bytes, where OpenFHE's own header used to travel
            # (there the old format crashed the fusing process)
            ops = random_mutations(rng, in_place=case % 3 != 0)
            bad = reseal_frame(mutate(shares[k], ops, head=3000))
            if bad == shares[k]:
                continue
            try:
                touched = unframe(bad, PARTIAL_MAGIC, "share", fs.InvalidUpdate)[1] != sections[k]
            except fs.InvalidUpdate:
                touched = False
            stats["cases"] += 1
            stats["residue_edits"] += touched
            given = list(shares)
            given[k] = bad
            try:
                got = fs.combine_partials(agg, given, layout, ctx=combiner)
            except fs.FedShieldError as exc:
                name = type(exc).__name__
                stats["rejected"][name] = stats["rejected"].get(name, 0) + 1
                stats["residue_edits_rejected"] += touched
                continue
            except BaseException as exc:  # anything but a FedShieldError is a failure
                stats["other"].append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            err = max(float(np.abs(got[n].double().numpy() - r).max()) for n, r in ref.items())
            if err <= 2e-6:
                stats["same"] += 1
            else:
                stats["wrong"].append({"share": k, "error": err, "residues": touched})
    json.dump(stats, open(out, "w"))
    print("CHILD-OK")
""")


def test_tampered_partial_decryptions_never_crash_the_key_holder(tmp_path):
    """Issue 15, item 1: one changed byte in a share's OpenFHE part crashed the fusing process
    (SIGSEGV in PrecomputeCRTTables, heap corruption, std::terminate), 7 times in 1,286. Now
    hundreds of random edits, the frame digest recomputed as any relay can, run in a child
    process: it must exit normally; every share is rejected with a FedShieldError or fuses
    to the right average, and no edit of the residues ever passes."""
    out = tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", SHARE_FUZZ_CHILD, "450", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, (
        f"the fusing process died (exit {proc.returncode}): {proc.stderr[-3000:]}")
    stats = json.loads(out.read_text())
    print("share fuzz:", stats)
    assert stats["cases"] >= 400
    assert stats["other"] == [], stats["other"][:5]
    assert stats["wrong"] == [], stats["wrong"][:5]
    # the edits reached the residues (past framing, into OpenFHE's fusion) and all failed there
    assert stats["residue_edits"] >= 100
    assert stats["residue_edits_rejected"] == stats["residue_edits"]


# -- hypothesis targets: one per parser of outside bytes ---------------------------------------
# Each runs fuzz_settings(n) cases: n in `make test`, FEDSHIELD_FUZZ_EXAMPLES when set.

class ThresholdRound:
    """A 3-party threshold round: updates, their aggregate, every party's share, the
    reference average."""

    def __init__(self) -> None:
        self.parties, self.server = fs.keygen_threshold(
            fs.CKKSParams.for_precision(keys="threshold"), 3)
        self.states = [make_state(170 + i) for i in range(3)]
        self.layout = fs.Layout.from_state_dict(self.states[0])
        weights = [3.0, 1.0, 2.0]
        self.updates = [fs.encrypt_update(p, s, self.layout, weight=w, round=4, weight_bound=4.0)
                        for p, s, w in zip(self.parties, self.states, weights)]
        self.agg = fs.aggregate(self.server, self.updates)
        self.shares = [fs.partial_decrypt(p, self.agg) for p in self.parties]
        self.reference = weighted_average(self.states, weights)

    def matches(self, out: dict) -> bool:
        return all(np.abs(out[n].double().numpy() - r).max() <= 2e-6
                   for n, r in self.reference.items())


@pytest.fixture(scope="module")
def threshold_round() -> ThresholdRound:
    return ThresholdRound()


@pytest.fixture(scope="module")
def shared_round(client_ctx, server_ctx, small_state, small_layout):
    """A shared-key aggregate of two updates and its reference average."""
    states = [small_state, make_state(171)]
    agg = fs.aggregate(server_ctx, [
        fs.encrypt_update(client_ctx, s, small_layout, weight=w, weight_bound=4.0, round=7)
        for s, w in zip(states, (3.0, 1.0))])
    return agg, weighted_average(states, [3.0, 1.0])


def _max_error(out: dict, reference: dict) -> float:
    return max(float(np.abs(out[n].double().numpy() - r).max()) for n, r in reference.items())


@fuzz_settings(60)
@given(ops=MUTATIONS, reseal=st.booleans())
def test_fuzz_aggregates_at_the_key_holders(threshold_round, shared_round, client_ctx,
                                            small_layout, ops, reseal):
    """Aggregate bytes from the server, mutated (checksum recomputed or not), at threshold
    parties (partial_decrypt by each, then the fusion) and at a shared-key client
    (decrypt_update): a FedShieldError or the right average, never a crash (OpenFHE only sees
    bytes rebuilt from the party's template) and never a wrong average; changed bytes under
    the original checksum are always refused."""
    r = threshold_round
    shared_agg, shared_ref = shared_round

    def threshold_average(agg):
        shares = [fs.partial_decrypt(p, agg) for p in r.parties]
        return fs.combine_partials(agg, shares, r.layout, ctx=r.parties[1])

    for blob, decrypt, reference in (
            (r.agg.to_bytes(), threshold_average, r.reference),
            (shared_agg.to_bytes(), lambda a: fs.decrypt_update(client_ctx, a, small_layout),
             shared_ref)):
        bad = mutate(blob, ops)
        if reseal:
            bad = reseal_update(bad)
        try:
            out = decrypt(fs.EncryptedUpdate.from_bytes(bad))
        except fs.FedShieldError as exc:
            assert bad != blob, f"the untouched aggregate was refused: {exc}"
            event(f"rejected: {type(exc).__name__}")
            continue
        assert reseal or bad == blob, "changed bytes passed the original checksum"
        err = _max_error(out, reference)
        assert err <= 2e-6, f"a mutated aggregate decrypted to a wrong average (error {err:.3g})"
        event("decrypted: the right average" + (" (unchanged)" if bad == blob else ""))


@fuzz_settings(60)
@given(ops=MUTATIONS, which=st.integers(0, 2), head=st.sampled_from([400, 3000, 10**9]))
def test_fuzz_partial_decryptions(threshold_round, ops, which, head):
    """A share mutated anywhere, frame digest recomputed: rejected with a FedShieldError, or it
    fuses to the right average; never a crash and never a wrong average."""
    r = threshold_round
    bad = reseal_frame(mutate(r.shares[which], ops, head=head))
    shares = list(r.shares)
    shares[which] = bad
    try:
        out = fs.combine_partials(r.agg, shares, r.layout, ctx=r.parties[0])
    except fs.FedShieldError as exc:
        event(f"rejected: {type(exc).__name__}"
              + (" (fused out of range)" if "beyond" in str(exc) else ""))
        return
    event("fused")
    assert r.matches(out), "a mutated share fused into a wrong average"


@fuzz_settings(60)
@given(ops=MUTATIONS, reseal=st.booleans(), which=st.sampled_from(["server", "party"]))
def test_fuzz_contexts(threshold_round, server_ctx, small_update, ops, reseal, which):
    """Context files mutated (digest recomputed or not): load_context raises KeyMaterialError
    or loads; a loaded one aggregates natively (the server path) or refuses the update."""
    blob = (server_ctx.to_bytes() if which == "server"
            else threshold_round.parties[2].to_bytes(include_secret=True))
    bad = mutate(blob, ops, head=2000)
    if reseal:
        bad = reseal_sha256(bad)
    try:
        ctx = fs.load_context(bad)
    except fs.KeyMaterialError:
        event("rejected by load_context")
        return
    try:
        fs.aggregate(ctx, [small_update])
        event("loaded and aggregated")
    except fs.FedShieldError as exc:
        event(f"loaded, update refused: {type(exc).__name__}")


JSON_LEAF = (st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats()
             | st.text(max_size=8))
JSON_VALUE = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=4)
                          | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10)


@fuzz_settings(100)
@given(edits=st.dictionaries(st.sampled_from(["stype", "nbytes", "chunks", "sha256", "extra"]),
                             JSON_LEAF, max_size=3),
       arrays=st.lists(st.tuples(st.sampled_from(["000000", "000001", "000002", "x", "1"]),
                                 st.binary(max_size=40),
                                 st.sampled_from(["fedshield.update.v1", "numpy.ndarray"]),
                                 st.sampled_from(["uint8", "float32"])), max_size=4),
       drop=st.booleans())
def test_fuzz_flower_records(edits, arrays, drop):
    """Payload records with hostile metadata (any JSON scalar: huge counts, NaN, bools, strings)
    and hostile chunks (names, sizes, stypes, dtypes): get_payload returns the exact payload or
    raises InvalidUpdate, without allocating for a count that did not arrive."""
    flwr = pytest.importorskip("flwr")
    from fedshield.engines.flower import records

    content = flwr.common.RecordDict()
    blob = bytes(range(100))
    records.put_payload(content, "p", blob, records.STYPE_UPDATE, chunk_bytes=40)
    meta, record = content.config_records["p.meta"], content.array_records["p"]
    for key, value in edits.items():
        if value is None:
            meta.pop(key, None)
        else:
            try:
                meta[key] = value
            except (TypeError, ValueError):  # a type a ConfigRecord does not hold
                continue
    if drop and len(record):
        del record[sorted(record.keys())[0]]
    for name, data, stype, dtype in arrays:
        record[name] = flwr.common.Array(dtype=dtype, shape=(len(data),), stype=stype, data=data)
    try:
        got = records.get_payload(content, "p", records.STYPE_UPDATE)
    except fs.InvalidUpdate:
        event("rejected")
        return
    event("accepted")
    assert got == blob


# Valid fields of every round message at once; each case overrides or drops some of them.
VALID_FIELDS = {"party": 1, "round": 2, "train-loss": 1.5, "kept": 0.5, "seconds-train": 1.0,
                "seconds-prune": 0.1, "seconds-encrypt": 0.2, "update-norm": 3.0,
                "version": 2, "eval-loss": 1.25, "eval-examples": 10, "seconds-decrypt": 0.3,
                "name": "site-1", "data": "d.jsonl", "train-examples": 40, "context-fp": "ab",
                "num-lora-values": 1000, "lr": 0.01, "prune": "local", "prune-ratio": 0.2,
                "weight-bound": 64.0, "base-version": 1, "seconds": 0.4}
HOSTILE = (JSON_VALUE | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 2**63, -1,
                                         True, False, 1e308, 5e-324, "1.0", [], {}]))


@fuzz_settings(200)
@given(changes=st.dictionaries(st.sampled_from(sorted(VALID_FIELDS)),
                               st.none() | HOSTILE, min_size=1, max_size=4))
def test_fuzz_round_messages(changes):
    """The typed messages every reply becomes (fedshield.fl.messages), from valid fields with
    some replaced by hostile values (NaN, inf, huge, wrong types, nested) or dropped: the
    message with finite numbers in range, or InvalidMessage."""
    from fedshield.fl.messages import (EvalReply, InvalidMessage, RoundPlan, ShareReply,
                                       SiteInfo, TrainReply)

    fields = {k: v for k, v in {**VALID_FIELDS, **changes}.items()
              if not (k in changes and changes[k] is None)}
    for parse in (lambda f: TrainReply.from_fields(f, b"u"), EvalReply.from_fields,
                  SiteInfo.from_fields, RoundPlan.from_fields,
                  lambda f: ShareReply.from_fields(f, b"s", signature=b"r")):
        try:
            message = parse(fields)
        except InvalidMessage:
            event(f"refused: {parse(VALID_FIELDS).__class__.__name__}")
            continue
        event(f"parsed: {type(message).__name__}")
        numbers = [v for v in vars(message).values() if isinstance(v, float)]
        numbers += list(getattr(message, "seconds", None).values()) \
            if isinstance(getattr(message, "seconds", None), dict) else []
        assert all(math.isfinite(v) for v in numbers), message


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    from fedshield.run.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(out, round_idx=2, state={"w": torch.arange(64, dtype=torch.float32)},
                    metrics={"rounds": [{"round": 1}, {"round": 2}]}, config={"x": 1})
    ckpt = out / "checkpoint"
    index = (ckpt / "checkpoint.json").read_bytes()
    state_name = json.loads(index)["state_file"]
    return out, index, state_name, (ckpt / state_name).read_bytes()


@fuzz_settings(100)
@given(ops=MUTATIONS, target=st.sampled_from(["index", "state"]))
def test_fuzz_checkpoints(checkpoint_files, ops, target):
    """A checkpoint's index (JSON) or state file (safetensors) mutated on disk: --resume loads
    it or raises ParameterError naming the checkpoint, never anything else."""
    from fedshield.run.checkpoint import capture_rng, load_checkpoint, restore_rng

    out, index, state_name, state = checkpoint_files
    ckpt = out / "checkpoint"
    (ckpt / "checkpoint.json").write_bytes(mutate(index, ops, head=200)
                                           if target == "index" else index)
    (ckpt / state_name).write_bytes(mutate(state, ops, head=200) if target == "state"
                                    else state)
    try:
        loaded = load_checkpoint(out)
    except fs.ParameterError as exc:
        assert str(out) in str(exc)
        event("rejected")
        return
    assert isinstance(loaded["round"], int) and isinstance(loaded["state"], dict)
    saved = capture_rng()
    try:  # what --resume does next with it
        restore_rng(*loaded["rng"])
        event("loaded and restored")
    except fs.ParameterError:
        event("loaded, RNG states refused")
    finally:
        restore_rng(*saved)


@pytest.fixture(scope="module")
def dealt_key_share():
    from fedshield.he import threshold as th

    # collective key generation of 2-of-3 keys: party 0's share to party 1, which holds none
    federation = (fs.CKKSParams.for_precision(keys="threshold"), 3, 2)
    seed = bytes(range(32))
    states = [th.start_keygen(*federation, i, seed) for i in (0, 1)]
    return states[1], th.deal_key_shares(states[0])[1]


@fuzz_settings(60)
@given(ops=MUTATIONS)
def test_fuzz_key_share_messages(dealt_key_share, ops):
    """Shamir key-share messages (t-of-n keygen) mutated, digest recomputed: KeyMaterialError,
    or accepted exactly as framed: from party 0 to this party of this key epoch and federation,
    the share held is the bytes the message carried (an edit of the residues themselves is
    not detectable here: the key set-up's joint test decryptions name the sender), and the
    party's own state is left as it was."""
    from fedshield.he import threshold as th
    from fedshield.he.frames import unframe

    state, message = dealt_key_share
    genuine_meta, _ = unframe(message, th.KEY_SHARE_MAGIC, "share", fs.KeyMaterialError,
                              version=th.KEY_SHARE_VERSION)
    bad = reseal_frame(mutate(message, ops, head=300))
    try:
        accepted = th.accept_key_shares(state, [bad]).own_context
    except fs.KeyMaterialError:
        assert bad != message, "the genuine key share was refused"
        event("rejected")
        return
    meta, sections = unframe(bad, th.KEY_SHARE_MAGIC, "share", fs.KeyMaterialError,
                             version=th.KEY_SHARE_VERSION)
    assert {k: meta[k] for k in genuine_meta} == genuine_meta, meta
    assert accepted.key_share_senders == [0] and state.own_context.key_share_senders == []
    assert accepted.key_share(0) == sections[0]
    event("accepted unchanged" if bad == message else "accepted: residues edited")
