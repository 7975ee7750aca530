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

import copy
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
from fedshield import native
from fedshield.trust.federation import RunSettings
from fedshield.fl.key_setup import (KeyHolder, KeySetup, client_aad, epoch_seed, probes_match,
                                    refusal_fields, refusal_from, share_aad)
from fedshield.he import threshold as th
from fedshield.he.frames import CHECKSUMMED
from fedshield.trust.identity import Identity, sign_blob
from federation_fixtures import pinned_federation
from forgery import MUTATIONS, fuzz_settings, mutate, reseal_frame, reseal_sha256, seal_frame

# what fedshield run's key set-up uses (its Server sends each round's bound: max_weight=0)
THRESHOLD = fs.CKKSParams.for_precision(keys="threshold", max_weight=0)
SHARED = fs.CKKSParams.for_precision(max_weight=0)
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
    body = magic + struct.pack("<HI", version | CHECKSUMMED, len(head)) + head + \
        b"".join(sections)
    return seal_frame(body)


def forge(blob: bytes, how) -> bytes:
    """One forgery of a frame: ("bytes", ops) mutates anywhere and recomputes the digest,
    ("section", ops) mutates the byte sections only, ("field", key, value) replaces one head
    field."""
    if how[0] == "bytes":
        return reseal_frame(mutate(blob, how[1], head=400))
    magic, version, meta, sections = split_frame(blob)
    if how[0] == "section":
        joined = mutate(b"".join(sections), how[1], head=200)
        sections = [joined[:len(sections[0])], *([joined[len(sections[0]):]]
                                                 if len(sections) > 1 else [])]
        return build_frame(magic, version, meta, sections)
    _, key, value = how
    keys = sorted(meta) + ["sizes", "extra"]
    key = keys[key % len(keys)]
    if key == "sizes":
        return build_frame(magic, version, meta, sections, sizes=value)
    return build_frame(magic, version, {**meta, key: value}, sections)


def committed(seed: bytes, party: int, message: bytes) -> bytes:
    """The commitment a forger makes to the b_i its (forged) contribution carries: the sender
    commits to whatever it later reveals, so a forgery's commitment matches it."""
    try:
        sections = split_frame(message)[3]
        return th.commitment(seed, party, sections[0])
    except (ValueError, IndexError, KeyError, TypeError, struct.error, AttributeError):
        return bytes(32)


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
            taken: str, holder: KeyHolder | None = None):
    """Party ``party`` (or ``holder``) handles a forged ``op`` request: its reply if it takes
    it (event ``taken``), None if it refuses it as :func:`expect_blamed` requires."""
    try:
        reply = r.replay(op, party, fields, sections, holder)
    except BaseException as exc:
        expect_blamed(exc, sender)
        return None
    event(taken)
    return reply


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
            # an op replaces a holder's key material, never edits it: a shallow copy keeps it
            self.before[op, party] = copy.copy(h)
            self.requests[op, party] = (dict(fields), [bytes(s) for s in sections])
            try:
                out[party] = h.handle(op, fields, sections)
            except fs.FedShieldError as exc:
                out[party] = exc
            self.replies[op, party] = out[party]
        return out

    def replay(self, op: str, party: int, fields: dict, sections: list,
               holder: KeyHolder | None = None):
        """A copy of ``holder`` (by default the party's holder as it was before ``op``)
        handling a (forged) request; its reply."""
        h = copy.copy(self.before[op, party] if holder is None else holder)
        return h.handle(op, {"epoch": EPOCH, **fields}, sections)

    @property
    def seed(self) -> bytes:
        """The epoch's public seed of a."""
        return epoch_seed(self.params, self.n, self.t, self.roster, self.server, EPOCH)

    def join_request(self, party: int, sender: int, message: bytes) -> tuple[list, KeyHolder]:
        """Party ``party``'s keys.join sections with ``sender``'s contribution replaced by
        ``message`` (signed by the sender), and the party's holder ready to join them: it took,
        at keys.reveal, the sender's signed commitment to ``message`` (a forger commits to
        what it reveals)."""
        sections = list(self.requests["keys.join", party][1])
        sections[2 * sender] = message
        sections[2 * sender + 1] = self.sign(sender, "keygen", message)
        fields, reveal = self.requests["keys.reveal", party]
        reveal = list(reveal)
        reveal[2 * sender] = committed(self.seed, sender, message)
        reveal[2 * sender + 1] = self.sign(sender, "keygen-commit", reveal[2 * sender])
        holder = copy.copy(self.before["keys.reveal", party])
        holder.handle("keys.reveal", fields, reveal)
        return sections, holder

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
def test_fuzz_contribution(threshold_setup, how):
    """Party 0's b_i, forged and signed by party 0 (which also commits to it): the server's
    screening (with party 0's genuine probes) and party 1's keys.join (which adds it into the
    joint key) refuse it naming party 0, or take it; never a crash."""
    r = threshold_setup
    message, _, checks, _ = r.replies["keys.reveal", 0][1]
    bad = forge(message, how)
    try:
        r.setup.screen_contribution(0, bad, checks, committed(r.seed, 0, bad), r.seed)
        event("screened: passed")
    except BaseException as exc:
        expect_blamed(exc, 0)
    sections, holder = r.join_request(1, 0, bad)
    receive(r, "keys.join", 1, {}, sections, 0, "joined", holder)


@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_commitment(threshold_setup, how):
    """Party 2's commitment (32 bytes), forged and signed by party 2, at party 1's keys.reveal:
    refused naming party 2, or taken (and then party 2's b_i is refused at keys.join)."""
    r = threshold_setup
    fields, sections = r.requests["keys.reveal", 1]
    sections = list(sections)
    bad = mutate(sections[4], ops_of(how), head=32)
    sections[4], sections[5] = bad, r.sign(2, "keygen-commit", bad)
    receive(r, "keys.reveal", 1, {"from": fields["from"]}, sections, 2, "revealed")


@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_key_shares(threshold_setup, how):
    """The Shamir share party 0 dealt party 1, forged and sealed by party 0: refused naming
    party 0 at party 1's keys.reveal, or accepted."""
    r = threshold_setup
    h1 = r.holders[1]
    fields, sections = r.requests["keys.reveal", 1]
    sections = list(sections)
    at = 2 * r.n + fields["from"].index(0)
    aad = share_aad(r.seed, EPOCH, 0, 1)
    share = h1.identity.open_sealed(sections[at], r.roster[0], aad)
    sections[at] = r.roster[1].seal(forge(share, how), r.holders[0].identity, aad)
    receive(r, "keys.reveal", 1, {"from": fields["from"]}, sections, 0, "accepted")


@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_key_check_probes(threshold_setup, how):
    """Party 1's key-check probes, forged and signed by party 1: the server's screening
    refuses them naming party 1, or reads them; a probe read (or any bytes) gives the joint
    test decryption a verdict, never a crash, and an edited probe never passes as party 1's
    own key."""
    r = threshold_setup
    message, _, checks, _ = r.replies["keys.reveal", 1][1]
    contribution = r.replies["keys.reveal", 1][1][0]
    b = split_frame(contribution)[3][0]
    bad = forge(checks, how)
    try:
        _, probes = r.setup.screen_contribution(1, message, bad,
                                                th.commitment(r.seed, 1, b), r.seed)
        event("screened: passed")
    except BaseException as exc:
        expect_blamed(exc, 1)
        probes = {tuple(range(r.n)): mutate(split_frame(checks)[3][0], ops_of(how))}
    own = probes[tuple(range(r.n))]
    verdict = probes_match(r.result.context, [own], b)
    genuine = split_frame(checks)[3][0]
    assert isinstance(verdict, bool) and (verdict or own != genuine)
    assert not verdict or own == genuine or how[0] == "field", "an edited probe passed"
    event(f"probe matches: {verdict}")


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
        aad = client_aad(fp, EPOCH, 1)
        material = r.holders[1].identity.open_sealed(sealed, r.roster[0], aad)
        sealed = r.roster[1].seal(forge(material, how), r.holders[0].identity, aad)
    taken = receive(r, "keys.shared-take", 1, {}, [public_ctx, record, sealed], 0, "taken")
    if taken is not None:  # the key it made and keeps is the signed public context's
        assert taken[0]["context-fp"] == fp.hex()


@fuzz_settings(FUZZ)
@given(how=FORGERY)
def test_fuzz_what_the_server_reads(threshold_setup, how):
    """The server's own reading of key set-up replies, without openfhe: party 0's public
    context (refused naming party 0, or loaded), and its check against the contributions."""
    r = threshold_setup
    fields, sections = r.replies["keys.join", 0]
    blob = sections[0]
    bad = reseal_sha256(mutate(blob, ops_of(how), head=2000))
    contributions = [split_frame(r.replies["keys.reveal", p][1][0])[3][0] for p in range(r.n)]
    try:
        public = r.setup.screen_public_context(0, bad, r.sign(0, "public-context", bad), EPOCH)
        th.check_joint_key(public, contributions, r.seed)
        event("public context loaded and checked")
    except BaseException as exc:
        expect_blamed(exc, 0)


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
        need = native.key_polys_bytes(ring_dim, moduli, elements)
        data = (data * (need // len(data) + 1))[:need]
    out = None
    try:
        out = native.decode_key_polys(data, ring_dim, moduli, elements)
    except fs.InvalidUpdate as exc:
        event("refused: " + "".join(c for c in str(exc).split(":")[1] if not c.isdigit())[:32])
    else:
        assert out.size == elements * len(moduli) * ring_dim
        assert all((out[k * ring_dim:(k + 1) * ring_dim] < moduli[k % len(moduli)]).all()
                   for k in range(elements * len(moduli)))
        event("decoded")
        # packed again: the same bytes; summed with itself: twice the residues mod q
        assert bytes(native.pack_key_polys(out, ring_dim, moduli, elements)) == data
        total = native.decode_key_polys(
            native.sum_key_polys([data, data], ring_dim, moduli, elements), ring_dim, moduli,
            elements)
        q = np.repeat(np.array(moduli, dtype=object), ring_dim)
        q = np.tile(q, elements)
        assert np.array_equal(total.astype(object), (2 * out.astype(object)) % q)
    if out is None:   # what decode refuses, summing refuses too
        with pytest.raises(fs.InvalidUpdate):
            native.sum_key_polys([data, data], ring_dim, moduli, elements)
    # a template of length words and zeroed arrays, as a serialized key lays them out
    offsets = range(8, 8 + (8 * ring_dim + 8) * elements * len(moduli), 8 * ring_dim + 8)
    template = bytearray(8 + (8 * ring_dim + 8) * elements * len(moduli) + 64)
    for off in offsets:
        template[off - 8:off] = (ring_dim % 2**64).to_bytes(8, "little")
    template = bytes(template)
    layout = (ring_dim, *moduli, *offsets, len(template))
    try:
        key = native.rebuild_key(data, template, layout, elements)
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
    from fedshield.he import backend, keys, threshold as th
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
    contribution = r.replies["keys.reveal", 0][1][0]
    _, _, meta, (packed,) = split_frame(contribution)
    # what party 1's OpenFHE may parse: a public key of its own template, residues written in
    local1 = keys.local_crypto(th.resolve(r.params, 3))
    template, layout = local1.templates[keys.PUBLIC]
    n, towers = layout[0], (len(layout) - 2) // 3

    def own(blob):
        if len(blob) != len(template):
            return False
        blob = bytearray(blob)
        for off in layout[1 + towers:-1]:
            blob[off:off + 8 * n] = bytes(8 * n)
        return bytes(blob) == template

    # party 0's first chain step as release 1 framed it: OpenFHE's crypto context, then its
    # public key
    cc_bytes = backend.serialize(local1.cc)
    pk = backend.serialize(local1.cc.KeyGen().publicKey)
    old_meta = {"params": meta["params"], "n_parties": 3, "threshold": 2,
                "modulus": meta["moduli"][0], "chain": ["0" * 64]}
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
                    bad = build_frame(th.KEYGEN_MAGIC, th.KEYGEN_VERSION, meta,
                                      [bytes(edited)])
                sections, holder = r.join_request(1, 0, bad)
                seen.clear()  # what party 1's keys.join deserializes
                try:
                    r.replay("keys.join", 1, {}, sections, holder)
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
    step killed party 1 (SIGSEGV, SIGABRT, SIGFPE). A message in that old layout, so edited
    and framed as version 1, in party 0's place at keys.join is now refused with a
    FedShieldError naming party 0 before OpenFHE sees any of it; the same offsets edited in
    party 0's b_i (committed to, as a forger would) give a refusal or a joint key, and OpenFHE
    only ever deserializes keys of party 1's own template. In a child process: a crash fails
    the test instead of killing pytest."""
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


@pytest.mark.parametrize("committed_to_it", [True, False])
def test_an_edited_but_well_formed_contribution_fails_the_set_up_naming_its_sender(
        tmp_path, monkeypatch, committed_to_it):
    """The edit at byte 99 of party 0's b_i keeps every residue below q: the contribution is
    well-formed and the others would add it in, but party 0's key share no longer matches it.
    If party 0 committed to the edited b_i, the joint test decryption names it; if it
    committed to its genuine one, the server refuses the edited one against that commitment
    and names it. Never party 1 or 2, which took it."""
    def edit(state):
        edited = bytearray(state.contribution)
        edited[99] ^= 0x01
        state.contribution = bytes(edited)
        return state

    if committed_to_it:   # edited before its commitment is made
        real_start = th.start_keygen
        monkeypatch.setattr(th, "start_keygen", lambda params, n, t, party, seed: (
            edit if party == 0 else (lambda s: s))(real_start(params, n, t, party, seed)))
    else:                 # edited after it committed to the genuine b_i
        real_message = th.contribution_message
        monkeypatch.setattr(th, "contribution_message", lambda state: real_message(
            edit(state) if state.party_id == 0 else state))
    want = (r"party 0 \(its key share does not match its b_i\)" if committed_to_it
            else r"party 0's key contribution is refused: .*not the one it committed to")
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
    refused = fs.KeyMessageRefused("party 2 refused the key contribution that party 1 "
                                   "signed: bad", sender=1)

    def answered_by_party_2(reply) -> KeySetup:
        """A set-up whose parties 0 and 1 answer keys.begin and party 2 with ``reply``."""
        return r.key_setup(lambda op, requests: {p: reply if p == 2 else ({}, [])
                                                 for p in requests})

    for reply in (refused, (refusal_fields(refused), [])):
        with pytest.raises(fs.KeyMessageRefused, match="party 1 sent a bad key set-up") as err:
            answered_by_party_2(reply).run(EPOCH)
        assert err.value.sender == 1 and err.value.culprit == 1
    for sender in (2, 7):
        fields = {**refusal_fields(refused), "sender": sender}
        with pytest.raises(fs.KeySetupError, match="party 2 failed keys.begin") as err:
            answered_by_party_2((fields, [])).run(EPOCH)
        assert err.value.culprit == 2
    with pytest.raises(fs.KeySetupError, match="not a party id"):
        refusal_from({**refusal_fields(refused), "sender": "1"})
    assert refusal_from({"context-fp": "ab"}) is None


def test_a_bad_signature_at_a_receiver_blames_the_relay_not_the_sender(threshold_setup):
    r = threshold_setup
    sections = list(r.requests["keys.join", 1][1])
    tampered = bytearray(sections[0])
    tampered[-40] ^= 1
    sections[0] = bytes(tampered)   # party 0's signature no longer verifies
    with pytest.raises(fs.KeySetupError, match="the relay altered it") as err:
        r.replay("keys.join", 1, {}, sections)
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
    contribution = r.replies["keys.reveal", 0][1][0]
    magic, version, meta, (packed,) = split_frame(contribution)
    hostile = []
    for field, value in (("sizes", [2**40]), ("sizes", [2**62, 2**62]), ("ring_dim", 2**40),
                         ("moduli", [3] * 10**5), ("seed", "0" * 10**6),
                         ("n_parties", 2**60), ("moduli", [2**61 - 1] * 3)):
        hostile.append(build_frame(magic, version, meta, [packed], sizes=value)
                       if field == "sizes" else build_frame(magic, version, {**meta, field: value},
                                                            [packed]))
    # a head that claims 4 GB, and a message far longer than the parameters allow
    hostile.append(magic + struct.pack("<HI", version, 2**32 - 1) + b"{}" + bytes(32))
    hostile.append(build_frame(magic, version, meta, [packed + bytes(64 << 20)]))
    requests = [r.join_request(1, 0, bad) for bad in hostile]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = []
    for sections, holder in requests * 5:
        try:
            r.replay("keys.join", 1, {}, sections, holder)
            refused.append("joined")
        except fs.FedShieldError as exc:
            refused.append(type(exc).__name__)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_kb": grown, "refused": refused}))
""")


def test_declared_sizes_cannot_make_a_receiver_allocate(tmp_path):
    """Heads that declare huge sections, ring dimensions, towers or seeds, a 4 GB head length,
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
