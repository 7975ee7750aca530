"""Fuzz targets of the key set-up (issue 19, item 2): every message a party receives from
another party, and every sealed key material, mutated and re-signed as the malicious sender
would sign it, run through the real receiving code (KeyHolder.handle, and the server's own
screening).

What must hold, case after case: a refusal is a fs.FedShieldError subclass, and a refusal of
what a party signed is KeyMessageRefused naming that party (never the receiver); no crash (the
receiver's OpenFHE only ever parses a key of its own context with validated residues written
in); memory bounded by the parameters. Case counts are small in `make test`;
FEDSHIELD_FUZZ_EXAMPLES=N runs every target N times (`make asan-test` runs them under
AddressSanitizer/UBSan).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import fedshield as fs
from fedshield import _native
from fedshield.trust.federation import RunSettings
from fedshield.fl.key_setup import (KeyHolder, KeySetup, _client_aad, _share_aad,
                                    refusal_fields, refusal_from)
from fedshield.he import threshold as th
from fedshield.trust.identity import Identity, sign_blob
from federation_fixtures import pinned_federation
from forgery import MUTATIONS, fuzz_settings, mutate, reseal_sha256

THRESHOLD = fs.CKKSParams.for_precision(keys="threshold")
SHARED = fs.CKKSParams()
EPOCH = 1
FUZZ = 25   # cases per target in `make test` (a few seconds each)

# JSON values a forged head field may take
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)


# -- framing as a forger writes it ----------------------------------------------------------------
def split_frame(blob: bytes) -> tuple[bytes, int, dict, list[bytes]]:
    """(magic, version, head, sections) of a frame of fedshield.he.frames."""
    version, head_len = struct.unpack_from("<HI", blob, 8)
    meta = json.loads(blob[14:14 + head_len])
    at, sections = 14 + head_len, []
    for size in meta.pop("sizes"):
        sections.append(blob[at:at + size])
        at += size
    return blob[:8], version, meta, sections


def build_frame(magic: bytes, version: int, meta: dict, sections: list[bytes],
                sizes=None) -> bytes:
    """A frame with a valid digest (what anyone relaying or sending one can make)."""
    head = json.dumps({**meta, "sizes": [len(s) for s in sections] if sizes is None else sizes},
                      sort_keys=True).encode()
    body = magic + struct.pack("<HI", version, len(head)) + head + b"".join(sections)
    return body + hashlib.sha256(body).digest()


def forge(blob: bytes, how, restep: bool = False) -> bytes:
    """One forgery of a frame: ("bytes", ops) mutates anywhere and recomputes the digest,
    ("section", ops) mutates the byte sections only, ("field", key, value) replaces one head
    field. ``restep``: a chain step's last digest is recomputed to match its edited key (the
    sender of a chain step signs whatever it sends)."""
    if how[0] == "bytes":
        return reseal_sha256(mutate(blob, how[1], head=400))
    magic, version, meta, sections = split_frame(blob)
    if how[0] == "section":
        joined = mutate(b"".join(sections), how[1], head=200)
        sections = [joined[:len(sections[0])], *([joined[len(sections[0]):]]
                                                 if len(sections) > 1 else [])]
        if restep and isinstance(meta.get("chain"), list):
            meta["chain"][-1] = th.step_digest(sections[0])
        return build_frame(magic, version, meta, sections)
    _, key, value = how
    keys = sorted(meta) + ["sizes", "extra"]
    key = keys[key % len(keys)]
    if key == "sizes":
        return build_frame(magic, version, meta, sections, sizes=value)
    return build_frame(magic, version, {**meta, key: value}, sections)


FORGERY = st.one_of(st.tuples(st.just("bytes"), MUTATIONS),
                    st.tuples(st.just("section"), MUTATIONS),
                    st.tuples(st.just("field"), st.integers(0, 20), JSON))


def ops_of(how) -> list:
    """Byte edits of a forgery (a field forgery becomes one flipped byte of its head)."""
    return how[1] if how[0] != "field" else [("flip", 2 * how[1], 1)]


def expect_blamed(exc: BaseException, sender: int) -> None:
    """A refusal of what ``sender`` signed: a FedShieldError, and if it names a culprit,
    KeyMessageRefused naming ``sender``."""
    assert isinstance(exc, fs.FedShieldError), f"{type(exc).__name__}: {exc}"
    if isinstance(exc, fs.KeySetupError) and exc.culprit is not None:
        assert isinstance(exc, fs.KeyMessageRefused) and exc.sender == sender, exc
    event(f"refused: {type(exc).__name__}")


def receive(r, op: str, party: int, fields: dict, sections: list, sender: int,
            taken: str) -> bool:
    """Party ``party`` handles a forged ``op`` request: True if it takes it (event ``taken``),
    False if it refuses it as :func:`expect_blamed` requires."""
    try:
        r.replay(op, party, fields, sections)
    except BaseException as exc:
        expect_blamed(exc, sender)
        return False
    event(taken)
    return True


# -- one recorded key set-up: every message and each party's state before each operation ------
class Recorded:
    """A real key set-up of n in-process parties; records every request and reply, and each
    holder's in-progress key material before each operation (to replay a forged message)."""

    def __init__(self, tmp: Path, mode: str, n: int = 3, t: int = 2) -> None:
        self.mode, self.n, self.t = mode, n, (t if mode == "threshold" else n)
        self.params = THRESHOLD if mode == "threshold" else SHARED
        identities = [Identity.generate() for _ in range(n)]
        server = Identity.generate()
        pinned = pinned_federation(identities, server, mode, self.t, self.params)
        self.holders = [KeyHolder(i, identity, tmp / f"{mode}-{i}" / "party.key",
                                  federation=pinned)
                        for i, identity in enumerate(identities)]
        self.roster = {h.party_id: h.identity.public for h in self.holders}
        self.requests: dict = {}
        self.replies: dict = {}
        self.before: dict = {}
        self.server, self.settings = server.public, RunSettings.of(self.params, False,
                                                                    pinned.floor.quorum)
        self.setup = self.key_setup(self.ask)
        self.result = self.setup.run(EPOCH)

    def key_setup(self, ask) -> KeySetup:
        """The server's half of this federation's key set-up, asking through ``ask``."""
        return KeySetup(self.params, self.mode, self.t, self.roster, self.server, ask,
                        settings=self.settings)

    def ask(self, op, requests):
        out = {}
        for party, (fields, sections) in requests.items():
            h = self.holders[party]
            self.before[op, party] = (h._state, h._ctx)
            self.requests[op, party] = (dict(fields), [bytes(s) for s in sections])
            try:
                out[party] = h.handle(op, fields, sections)
            except fs.FedShieldError as exc:
                out[party] = exc
            self.replies[op, party] = out[party]
        return out

    def replay(self, op: str, party: int, fields: dict, sections: list):
        """The holder as it was before ``op``, handling a (forged) request."""
        h = self.holders[party]
        h._state, h._ctx = self.before[op, party]
        return h.handle(op, {"epoch": EPOCH, **fields}, sections)

    def sign(self, party: int, domain: str, blob: bytes) -> bytes:
        return sign_blob(self.holders[party].identity, domain, party, EPOCH, blob)


@pytest.fixture(scope="module")
def threshold_setup(tmp_path_factory) -> Recorded:
    return Recorded(tmp_path_factory.mktemp("keys"), "threshold")


@pytest.fixture(scope="module")
def shared_setup(tmp_path_factory) -> Recorded:
    return Recorded(tmp_path_factory.mktemp("keys"), "shared")


# -- the targets: one per message type ---------------------------------------------------------
@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_chain_step(threshold_setup, how):
    """Party 0's chain step, forged and signed by party 0: the server's screening and party 1
    (which builds on it) refuse it naming party 0, or take it; never a crash."""
    r = threshold_setup
    message = r.replies["keys.step", 0][1][0]
    bad = forge(message, how, restep=True)
    screen = r.key_setup(r.ask)
    screen._steps = []
    try:
        screen._screen_step(0, bad)
        event("screened: passed")
    except BaseException as exc:
        expect_blamed(exc, 0)
    receive(r, "keys.step", 1, {}, [bad, r.sign(0, "keygen", bad)], 0, "joined")


@fuzz_settings(FUZZ)
@given(how=FORGERY, party=st.integers(0, 1))
def test_fuzz_joint_public_key(threshold_setup, how, party):
    """The last chain step (the joint public key), forged and signed by the last party, at
    the other parties' keys.finish: refused naming the last party, or a context."""
    r = threshold_setup
    last = r.n - 1
    message = r.requests["keys.finish", party][1][0]
    bad = forge(message, how, restep=True)
    receive(r, "keys.finish", party, {}, [bad, r.sign(last, "keygen", bad)], last, "finished")


@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_key_shares(threshold_setup, how):
    """The Shamir share party 0 dealt party 1, forged and sealed by party 0: refused naming
    party 0, or accepted."""
    r = threshold_setup
    h1 = r.holders[1]
    fields, sections = r.requests["keys.shares", 1]
    at = fields["from"].index(0)
    ctx = r.before["keys.shares", 1][1]
    aad = _share_aad(ctx.fingerprint, EPOCH, 0, 1)
    share = h1.identity.open_sealed(sections[at], r.roster[0], aad)
    bad = forge(share, how)
    sealed = r.roster[1].seal(bad, r.holders[0].identity, aad)
    receive(r, "keys.shares", 1, {"from": [0]}, [sealed], 0, "accepted")


@fuzz_settings(FUZZ)
@given(how=FORGERY, public=st.booleans())
def test_fuzz_shared_key_material(shared_setup, how, public):
    """Shared keys: the key material party 0 seals to party 1, or the public context it signs,
    forged by party 0: refused naming party 0, or a client context whose fingerprint is the
    signed public context's."""
    r = shared_setup
    public_ctx, record, sealed = r.requests["keys.shared-take", 1][1]
    fp = fs.load_context(public_ctx).fingerprint
    if public:
        public_ctx = reseal_sha256(mutate(public_ctx, ops_of(how), head=2000))
        record = r.sign(0, "public-context", public_ctx)
        try:
            fp = fs.load_context(public_ctx).fingerprint
        except fs.KeyMaterialError:
            pass
    else:
        aad = _client_aad(fp, EPOCH, 1)
        material = r.holders[1].identity.open_sealed(sealed, r.roster[0], aad)
        sealed = r.roster[1].seal(forge(material, how), r.holders[0].identity, aad)
    if receive(r, "keys.shared-take", 1, {}, [public_ctx, record, sealed], 0, "taken"):
        assert r.holders[1]._ctx.fingerprint == fp


@fuzz_settings(FUZZ)
@given(how=FORGERY, which=st.sampled_from(["update", "share", "present", "subsets"]))
def test_fuzz_key_check_messages(threshold_setup, how, which):
    """The key check: party 2's signed test update (at keys.check-share), party 1's signed
    test share (at keys.check-verdict), and the server's fields (present, subsets), forged:
    refusals are FedShieldErrors, and name party 2 or 1 when they blame anyone."""
    r = threshold_setup
    subset = (0, 1, 2)
    if which in ("update", "present"):
        fields, sections = r.requests["keys.check-share", 0]
        fields, sections = dict(fields), list(sections)
        sender = 2
        if which == "update":
            bad = mutate(sections[5], ops_of(how), head=300)
            sections[5], sections[6] = bad, r.sign(2, "keycheck", bad)
        else:
            fields["present"] = how[2] if how[0] == "field" else list(subset)[:len(how[1])]
        op = "keys.check-share"
    else:
        fields, sections = r.requests["keys.check-verdict", 0]
        fields, sections = dict(fields), list(sections)
        sender = 1
        if which == "share":
            at = 1 + 2 * r.n + 2   # the first subset's shares: party 0's, then party 1's
            bad = forge(sections[at], how)
            sections[at], sections[at + 1] = bad, r.sign(1, "keycheck-share", bad)
        else:
            fields["subsets"] = json.dumps(how[2] if how[0] == "field" else [[0, 1, 2]] * 3)
        op = "keys.check-verdict"
    fields.pop("epoch", None)
    receive(r, op, 0, fields, sections, sender, "answered")


@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_what_the_server_reads(threshold_setup, how):
    """The server's own reading of key set-up replies, without openfhe: party 0's public
    context (refused naming party 0, or loaded) and each party's key probe (a verdict, never
    a crash)."""
    r = threshold_setup
    fields, sections = r.replies["keys.finish", 0]
    blob = sections[0]
    bad = reseal_sha256(mutate(blob, ops_of(how), head=2000))
    try:
        r.setup._public_context(0, bad, r.sign(0, "public-context", bad), EPOCH)
        event("public context loaded")
    except BaseException as exc:
        expect_blamed(exc, 0)
    probe = r.replies["keys.check-own", 1][1][0]
    bad_probe = mutate(probe, ops_of(how))
    contribution = th.step_contribution(r.setup._steps[0], r.setup._steps[1])
    verdict = th.own_key_matches(r.result.context, contribution, bad_probe)
    assert isinstance(verdict, bool) and (verdict or bad_probe != probe)
    event(f"probe matches: {verdict}")


NATIVE_CASES = st.one_of(
    # anything at all
    st.tuples(st.binary(max_size=3000), st.integers(0, 3),
              st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=9),
              st.sampled_from([0, 7, 8, 16, 1024, 2**17, 2**17 + 8]), st.just(False)),
    # bytes of exactly the size valid arguments imply (moduli near powers of two, so that
    # random residues are mostly below them)
    st.tuples(st.binary(min_size=1, max_size=600), st.integers(1, 2),
              st.lists(st.sampled_from([97, 2**20 - 3, 2**40 - 87, 2**61 - 1]), min_size=1,
                       max_size=3, unique=True),
              st.sampled_from([8, 16, 1024]), st.just(True)))


@fuzz_settings(FUZZ)
@given(case=NATIVE_CASES)
def test_fuzz_native_key_codec(case):
    """The native codec on any bytes, moduli, ring dimension and polynomial count, and on
    bytes of the exact size: a result of that size with every residue below its modulus, or
    InvalidUpdate; the same bytes written into a template through its layout (or a hostile
    one): a key of the template's size, or InvalidUpdate or ValueError."""
    data, elements, moduli, ring_dim, exact = case
    if exact:
        need = _native.key_polys_bytes(ring_dim, moduli, elements)
        data = (data * (need // len(data) + 1))[:need]
    out = None
    try:
        out = _native.decode_key_polys(data, ring_dim, moduli, elements)
    except fs.InvalidUpdate as exc:
        event("refused: " + "".join(c for c in str(exc).split(":")[1] if not c.isdigit())[:32])
    else:
        assert out.size == elements * len(moduli) * ring_dim
        assert all((out[k * ring_dim:(k + 1) * ring_dim] < moduli[k % len(moduli)]).all()
                   for k in range(elements * len(moduli)))
        event("decoded")
    # a template of length words and zeroed arrays, as a serialized key lays them out
    offsets = range(8, 8 + (8 * ring_dim + 8) * elements * len(moduli), 8 * ring_dim + 8)
    template = bytearray(8 + (8 * ring_dim + 8) * elements * len(moduli) + 64)
    for off in offsets:
        template[off - 8:off] = (ring_dim % 2**64).to_bytes(8, "little")
    template = bytes(template)
    layout = (ring_dim, *moduli, *offsets, len(template))
    try:
        key = _native.rebuild_key(data, template, layout, elements)
        assert len(key) == len(template) and out is not None
        got = [np.frombuffer(bytes(key), dtype="<u8", count=ring_dim, offset=off)
               for off in offsets]
        assert np.array_equal(np.concatenate(got), out)   # the residues decode_key_polys read
        event("rebuilt")
    except (fs.InvalidUpdate, ValueError, TypeError) as exc:
        event(f"rebuild refused: {type(exc).__name__}")


# -- the audit's exact edits: bytes 4, 98 and 99 of the first chain step's crypto context ------
REGRESSION_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import fedshield as fs
    from fedshield.he import backend, threshold as th
    from fedshield.he.frames import frame
    sys.path.insert(0, sys.argv[2])
    from test_fuzz_key_setup import Recorded, split_frame, build_frame, EPOCH

    o = backend.openfhe()
    seen = []
    for name in ("DeserializeCryptoContextString", "DeserializePublicKeyString",
                 "DeserializePrivateKeyString", "DeserializeCiphertextString"):
        def spy(blob, fmt, _real=getattr(o, name), _name=name):
            seen.append((_name, bytes(blob)))
            return _real(blob, fmt)
        setattr(o, name, spy)
    r = Recorded(Path(sys.argv[1]), "threshold")
    step, _ = r.replies["keys.step", 0][1]
    _, _, meta, (packed,) = split_frame(step)
    local0 = r.before["keys.finish", 0][0]._live["local"]
    # what party 1's OpenFHE may parse: a public key of its own template, residues written in
    template, layout = r.before["keys.finish", 1][0]._live["local"]._templates[2]
    n, towers = layout[0], (len(layout) - 2) // 3

    def own(blob):
        if len(blob) != len(template):
            return False
        blob = bytearray(blob)
        for off in layout[1 + towers:-1]:
            blob[off:off + 8 * n] = bytes(8 * n)
        return bytes(blob) == template

    # party 0's step as release 1 framed it: OpenFHE's crypto context, then its public key
    cc_bytes = backend.serialize(local0.cc)
    pk = backend.serialize(local0.cc.KeyGen().publicKey)
    old_meta = {"params": meta["params"], "n_parties": 3, "threshold": 2,
                "modulus": meta["moduli"][0], "chain": meta["chain"]}
    results = []
    for at in (4, 98, 99):
        for value in (0x00, 0xFF, cc_bytes[at] ^ 0x01, cc_bytes[at] ^ 0x80):
            for layout_name in ("old", "new"):
                if layout_name == "old":
                    cc = bytearray(cc_bytes)
                    cc[at] = value
                    bad = frame(th.KEYGEN_MAGIC, old_meta, [bytes(cc), pk], version=1)
                else:
                    edited = bytearray(packed)
                    edited[at] = value
                    chain = meta["chain"][:-1] + [th.step_digest(edited)]
                    bad = build_frame(th.KEYGEN_MAGIC, th.KEYGEN_VERSION,
                                      {**meta, "chain": chain}, [bytes(edited)])
                seen.clear()
                try:
                    r.replay("keys.step", 1, {}, [bad, r.sign(0, "keygen", bad)])
                    outcome = "joined"
                except fs.FedShieldError as exc:
                    outcome = f"{type(exc).__name__}:{getattr(exc, 'sender', None)}:{exc}"
                results.append({"at": at, "value": value, "layout": layout_name,
                                "outcome": outcome[:300],
                                "deserialized": [name for name, _ in seen],
                                "foreign": [name for name, blob in seen if not own(blob)]})
    print(json.dumps(results))
""")


def test_the_audits_edits_of_the_first_chain_step_are_refused(tmp_path):
    """Issue 19: one edited byte (4, 98 or 99) of the crypto-context section of party 0's chain
    step killed party 1 (SIGSEGV, SIGABRT, SIGFPE). A step in that old layout, so edited and
    framed as version 1, is now refused with a FedShieldError naming party 0 before OpenFHE
    sees any of it; the same offsets edited in the new step's residues give a refusal or a
    well-formed step, and OpenFHE only ever deserializes keys of party 1's own template. In a
    child process: a crash fails the test instead of killing pytest."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", REGRESSION_CHILD, str(tmp_path),
                           str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"party 1 died (exit {proc.returncode}): {proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 24
    for case in results:
        assert case["foreign"] == [], case
        if case["layout"] == "old":
            assert case["outcome"].startswith("KeyMessageRefused:0:"), case
            assert "version 1 is not supported" in case["outcome"], case
            assert case["deserialized"] == [], case
        else:
            assert case["outcome"] == "joined" or case["outcome"].startswith(
                "KeyMessageRefused:0:"), case
            # only the rebuilt key of party 1's own template reaches OpenFHE
            assert set(case["deserialized"]) <= {"DeserializePublicKeyString"}, case


@pytest.mark.parametrize("claims_it", [True, False])
def test_an_edited_but_well_formed_step_fails_the_set_up_naming_its_sender(tmp_path,
                                                                           monkeypatch,
                                                                           claims_it):
    """The new layout's edit at byte 99 keeps every residue below q: the step is well-formed
    and party 1 builds on it, but party 0's key share no longer matches what its step shows.
    If party 0 claims the edited step as its own, the key check names it; if not, it finds
    its own step missing from the joint key (which the server checked step by step) and is
    named itself. Never party 1, which built on the edit, nor party 2, which signed the end."""
    real = th.start_keygen

    def edited_start(*args):
        state, message = real(*args)
        magic, version, meta, (packed,) = split_frame(message)
        edited = bytearray(packed)
        edited[99] ^= 0x01
        meta["chain"] = [th.step_digest(edited)]
        if claims_it:
            state._step_digest = meta["chain"][0]
        return state, build_frame(magic, version, meta, [bytes(edited)])

    monkeypatch.setattr(th, "start_keygen", edited_start)
    want = (r"party 0 \(its key share does not match" if claims_it
            else r"party 0 failed keys.finish: party 0: party 0's key share is not part")
    with pytest.raises(fs.KeySetupError, match=want) as err:
        Recorded(tmp_path / "fed", "threshold")
    assert err.value.culprit == 0


# -- blame across the engines ----------------------------------------------------------------------
def test_a_refusal_names_its_sender_in_process_and_through_reply_fields(threshold_setup):
    """A refusal raised in-process (the local engine) and one carried as reply fields (the
    site worker's reply through Flower) both make KeySetup name the sender, not the party
    that refused; a forged refusal that names the refusing party itself, or no party, blames
    the refusing party."""
    r = threshold_setup
    refused = fs.KeyMessageRefused("party 2 refused the key generation step that party 1 "
                                   "signed: bad", sender=1)
    for reply in (refused, (refusal_fields(refused), [])):
        setup = r.key_setup(lambda op, requests: {2: reply})
        with pytest.raises(fs.KeyMessageRefused, match="party 1 sent a bad key set-up") as err:
            setup._all("keys.step", {2: ({}, [])})
        assert err.value.sender == 1 and err.value.culprit == 1
    for sender in (2, 7):
        fields = {**refusal_fields(refused), "sender": sender}
        setup = r.key_setup(lambda op, requests: {2: (fields, [])})
        with pytest.raises(fs.KeySetupError, match="party 2 failed keys.step") as err:
            setup._all("keys.step", {2: ({}, [])})
        assert err.value.culprit == 2
    with pytest.raises(fs.KeySetupError, match="not a party id"):
        refusal_from({**refusal_fields(refused), "sender": "1"})
    assert refusal_from({"context-fp": "ab"}) is None


def test_a_bad_signature_at_a_receiver_blames_the_relay_not_the_sender(threshold_setup):
    r = threshold_setup
    message, record = r.replies["keys.step", 0][1]
    tampered = bytearray(message)
    tampered[-40] ^= 1
    with pytest.raises(fs.KeySetupError, match="the relay altered it") as err:
        r.replay("keys.step", 1, {}, [bytes(tampered), record])
    assert not isinstance(err.value, fs.KeyMessageRefused) and err.value.culprit is None


# -- memory: declared sizes cannot make a receiver allocate ------------------------------------
MEMORY_CHILD = textwrap.dedent("""
    import json, resource, struct, sys, hashlib
    from pathlib import Path
    import fedshield as fs
    sys.path.insert(0, sys.argv[2])
    from test_fuzz_key_setup import Recorded, split_frame, build_frame, EPOCH
    from fedshield.he import threshold as th, keys
    from fedshield.he.frames import frame

    r = Recorded(Path(sys.argv[1]), "threshold")
    step = r.replies["keys.step", 0][1][0]
    magic, version, meta, (packed,) = split_frame(step)
    hostile = []
    for field, value in (("sizes", [2**40]), ("sizes", [2**62, 2**62]), ("ring_dim", 2**40),
                         ("moduli", [3] * 10**5), ("chain", ["0" * 64] * 10**5),
                         ("n_parties", 2**60), ("moduli", [2**61 - 1] * 3)):
        hostile.append(build_frame(magic, version, meta, [packed], sizes=value)
                       if field == "sizes" else build_frame(magic, version, {**meta, field: value},
                                                            [packed]))
    # a head that claims 4 GB, and a message far longer than the parameters allow
    hostile.append(magic + struct.pack("<HI", version, 2**32 - 1) + b"{}" + bytes(32))
    hostile.append(build_frame(magic, version, meta, [packed + bytes(64 << 20)]))
    signed = [(bad, r.sign(0, "keygen", bad)) for bad in hostile]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = []
    for bad, record in signed * 5:
        try:
            r.replay("keys.step", 1, {}, [bad, record])
            refused.append("joined")
        except fs.FedShieldError as exc:
            refused.append(type(exc).__name__)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_kb": grown, "refused": refused}))
""")


def test_declared_sizes_cannot_make_a_receiver_allocate(tmp_path):
    """Heads that declare huge sections, ring dimensions, towers or chains, a 4 GB head length,
    and a message 64 MB longer than the parameters allow: all refused naming party 0, and the
    receiving process's peak memory grows by less than 32 MB over what holding the messages
    took (the parameters imply 400 KB of key material; the audit saw OpenFHE take 6 GB)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path),
                           str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["refused"]) == {"KeyMessageRefused"}, got["refused"]
    assert got["grown_kb"] < 32 * 1024, got
