"""Party identities (fedshield.trust.identity): Ed25519 signatures with domain separation, sealed
messages to one recipient, signed records of blobs, and the identity key file."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fedshield as fs
from fedshield.trust import identity as idm
from fedshield.trust.identity import Identity, PublicIdentity, sign_blob, verify_blob, verify_record

# Module-level identities: hypothesis tests cannot use function-scoped fixtures.
ALICE, BOB, CAROL = Identity.generate(), Identity.generate(), Identity.generate()
AAD = b"key-share|context 0123|epoch 1|from 0|to 1"
SECRET = bytes(range(40))
SEALED = BOB.public.seal(SECRET, ALICE, AAD)            # Alice -> Bob
BLOB = os.urandom(300)
RECORD = sign_blob(ALICE, "update", 2, 5, BLOB)           # party 2's update of round 5
EDIT_SETTINGS = settings(max_examples=400, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


def _edits():
    """A few random edits: flip a bit, set a byte, insert, delete, truncate or extend."""
    edit = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]),
                     st.integers(0, 2**31), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4)


def _bit_flips(blob: bytes):
    """``blob`` with each one of its bits flipped in turn."""
    for bit in range(8 * len(blob)):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield bytes(flipped)


def _apply(blob: bytes, edits) -> bytes:
    out = bytearray(blob)
    for op, where, value in edits:
        at = where % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[at % len(out)] = value
        elif op == "insert":
            out[at:at] = bytes([value])
        elif op == "delete" and out:
            del out[at % len(out)]
        elif op == "truncate":
            del out[at:]
        elif op == "extend":
            out += bytes([value]) * (1 + where % 64)
    return bytes(out)


# -- errors -----------------------------------------------------------------------------------
def test_new_errors_are_exported_fedshield_errors():
    assert issubclass(fs.AuthenticationError, fs.FedShieldError)
    assert issubclass(fs.AuthenticationError, ValueError)
    assert issubclass(fs.KeySetupError, fs.FedShieldError)
    assert issubclass(fs.DecryptionBudgetExceeded, fs.FedShieldError)
    assert {"AuthenticationError", "KeySetupError", "DecryptionBudgetExceeded"} <= set(fs.__all__)
    assert "DecryptionBudget" in fs.he.__all__
    assert {"Identity", "PublicIdentity"} <= set(idm.__all__)


# -- public identities ------------------------------------------------------------------------
def test_public_identity_round_trips_and_is_hashable():
    pub = ALICE.public
    data = pub.to_bytes()
    assert len(data) == 74 and data[:8] == b"FSHLDPID"
    again = PublicIdentity.from_bytes(bytearray(data))
    assert again == pub and hash(again) == hash(pub)
    assert len({pub, again, BOB.public}) == 2
    assert len(pub.signing_key) == len(pub.exchange_key) == 32
    with pytest.raises(Exception):   # frozen
        pub.signing_key = BOB.public.signing_key


@pytest.mark.parametrize("edit, why", [
    (lambda d: d[:-1], "74"), (lambda d: d + b"\0", "74"), (lambda d: b"", "74"),
    (lambda d: b"X" + d[1:], "bad magic"),
    (lambda d: d[:8] + struct.pack("<H", 2) + d[10:], "version 2"),
])
def test_public_identity_from_bytes_is_strict(edit, why):
    with pytest.raises(fs.KeyMaterialError, match=why):
        PublicIdentity.from_bytes(edit(ALICE.public.to_bytes()))


def test_public_identity_refuses_keys_of_the_wrong_size():
    with pytest.raises(fs.KeyMaterialError, match="signing_key must be 32 bytes, got 31"):
        PublicIdentity(b"\1" * 31, b"\2" * 32)
    with pytest.raises(fs.KeyMaterialError, match="exchange_key"):
        PublicIdentity(b"\1" * 32, "two" * 11)
    with pytest.raises(TypeError):
        PublicIdentity.from_bytes("FSHLDPID")


def test_fingerprint_is_five_groups_of_the_public_digest():
    fp = ALICE.public.fingerprint()
    assert re.fullmatch(r"([0-9a-f]{8} ){4}[0-9a-f]{8}", fp), fp
    assert fp.replace(" ", "") == hashlib.sha256(ALICE.public.to_bytes()).hexdigest()[:40]
    assert fp != BOB.public.fingerprint()
    # either key changes it
    assert PublicIdentity(ALICE.public.signing_key, BOB.public.exchange_key).fingerprint() != fp
    assert PublicIdentity(BOB.public.signing_key, ALICE.public.exchange_key).fingerprint() != fp
    assert fp in repr(ALICE)


# -- signatures -------------------------------------------------------------------------------
def test_signature_is_ed25519_over_the_documented_frame():
    message = b"the manifest"
    sig = ALICE.sign("manifest", message)
    assert len(sig) == 64
    framed = b"fedshield-sig-v1\0" + struct.pack("<H", 8) + b"manifest" + message
    Ed25519PublicKey.from_public_bytes(ALICE.public.signing_key).verify(sig, framed)
    ALICE.public.verify("manifest", memoryview(message), sig)


@pytest.mark.parametrize("domain, message, signer, check", [
    ("share", b"payload", ALICE, ALICE),      # signed as an update, presented as a share
    ("update", b"payloaD", ALICE, ALICE),     # message edited
    ("update", b"payload", BOB, ALICE),       # signed by Bob, claimed to be Alice's
    ("update", b"payload", ALICE, BOB),       # Alice's, checked against Bob's key
])
def test_a_signature_verifies_only_for_its_domain_message_and_key(domain, message, signer, check):
    sig = signer.sign("update", b"payload")
    signer.public.verify("update", b"payload", sig)   # the control
    with pytest.raises(fs.AuthenticationError, match="does not verify"):
        check.public.verify(domain, message, sig)


def test_edited_and_wrong_size_signatures_are_refused():
    sig = ALICE.sign("update", b"m")
    for i in range(64):
        flipped = bytearray(sig)
        flipped[i] ^= 0x80 if i % 2 else 0x01
        with pytest.raises(fs.AuthenticationError):
            ALICE.public.verify("update", b"m", bytes(flipped))
    for bad in (sig[:-1], sig + b"\0", b""):
        with pytest.raises(fs.AuthenticationError, match=f"{len(bad)} bytes, expected 64"):
            ALICE.public.verify("update", b"m", bad)


@pytest.mark.parametrize("domain", ["", "Update", "a:b", "fedshield:sealed",
                                    "fedshield:record:update", "x" * 65, " update", 3, None])
def test_domains_are_plain_words_and_internal_ones_cannot_be_signed(domain):
    with pytest.raises(fs.ParameterError, match="signature domain"):
        ALICE.sign(domain, b"m")
    with pytest.raises(fs.ParameterError, match="signature domain"):
        ALICE.public.verify(domain, b"m", b"\0" * 64)


# -- the identity key file --------------------------------------------------------------------
def test_key_file_round_trips_with_mode_0600(tmp_path):
    path = tmp_path / "identity.key"
    old_umask = os.umask(0)   # the file must be 0600 whatever the umask
    try:
        ALICE.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 106 and path.read_bytes()[:8] == b"FSHLDIDK"
    loaded = Identity.load(str(path))
    assert loaded.public == ALICE.public
    ALICE.public.verify("update", b"m", loaded.sign("update", b"m"))
    assert loaded.open_sealed(ALICE.public.seal(b"x", BOB, AAD), BOB.public, AAD) == b"x"
    assert [p.name for p in tmp_path.iterdir()] == ["identity.key"]   # no temp file left


def test_saving_over_an_identity_needs_overwrite(tmp_path):
    path = tmp_path / "identity.key"
    ALICE.save(path)
    with pytest.raises(fs.KeyMaterialError, match=f"{re.escape(str(path))}.*already exists"):
        BOB.save(path)
    assert Identity.load(path).public == ALICE.public
    BOB.save(path, overwrite=True)
    assert Identity.load(path).public == BOB.public


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o700, 0o666])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "identity.key"
    ALICE.save(path)
    os.chmod(path, mode)
    with pytest.raises(fs.KeyMaterialError, match=f"{re.escape(str(path))}.*mode {mode:04o}"):
        Identity.load(path)
    os.chmod(path, 0o400)   # narrower than 0600 is fine
    assert Identity.load(path).public == ALICE.public


@pytest.mark.parametrize("edit, why", [
    (lambda d: d[:-1], "105 bytes"),
    (lambda d: d + b"\0", "107 bytes"),
    (lambda d: b"", "0 bytes"),
    (lambda d: b"FSHLDIDX" + d[8:], "bad magic"),
    (lambda d: d[:8] + struct.pack("<H", 2) + d[10:], "format version 2"),
    (lambda d: d[:20] + bytes([d[20] ^ 4]) + d[21:], "corrupted"),     # a private key bit
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "corrupted"),               # the digest
])
def test_malformed_key_files_are_refused_naming_the_path(tmp_path, edit, why):
    path = tmp_path / "identity.key"
    ALICE.save(path)
    data = edit(path.read_bytes())
    os.chmod(path, 0o600)
    path.write_bytes(data)
    with pytest.raises(fs.KeyMaterialError, match=re.escape(str(path))) as err:
        Identity.load(path)
    assert why in str(err.value)


def test_missing_and_non_regular_key_files_are_refused(tmp_path):
    with pytest.raises(fs.KeyMaterialError, match="cannot read identity key file"):
        Identity.load(tmp_path / "absent.key")
    with pytest.raises(fs.KeyMaterialError, match="is not a regular file"):
        Identity.load(tmp_path)


# -- sealed messages --------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 200_000])
def test_seal_round_trips_and_hides_the_plaintext(size):
    plaintext = os.urandom(size)
    sealed = BOB.public.seal(plaintext, ALICE, AAD)
    assert len(sealed) == size + 8 + 2 + 32 + 12 + 16 + 64
    assert BOB.open_sealed(bytearray(sealed), ALICE.public, memoryview(AAD)) == plaintext
    if size >= 16:
        assert plaintext[:16] not in sealed
    assert BOB.public.seal(plaintext, ALICE, AAD) != sealed   # fresh ephemeral key and nonce


def test_only_the_recipient_opens_and_only_from_the_claimed_sender():
    with pytest.raises(fs.AuthenticationError, match="does not verify"):
        CAROL.open_sealed(SEALED, ALICE.public, AAD)                # another recipient
    with pytest.raises(fs.AuthenticationError, match="does not verify"):
        BOB.open_sealed(SEALED, CAROL.public, AAD)                  # another claimed sender
    with pytest.raises(fs.AuthenticationError, match="does not verify"):
        BOB.open_sealed(SEALED, ALICE.public, AAD + b"x")           # another purpose
    with pytest.raises(fs.AuthenticationError, match="does not verify"):
        BOB.open_sealed(SEALED, ALICE.public, b"")
    assert BOB.open_sealed(SEALED, ALICE.public, AAD) == SECRET     # the control


def signing_identity() -> tuple[Identity, Ed25519PrivateKey]:
    """An identity and its signing key, to sign what Identity.sign refuses (a forger's)."""
    signing = Ed25519PrivateKey.generate()
    return Identity(signing, X25519PrivateKey.generate()), signing


def framed_signature(signing: Ed25519PrivateKey, domain: str, message: bytes) -> bytes:
    """An Ed25519 signature framed as the module doc says: prefix, u16 len(domain), domain."""
    d = domain.encode("ascii")
    return signing.sign(idm.SIGNATURE_PREFIX + struct.pack("<H", len(d)) + d + message)


def test_a_relay_re_signing_a_sealed_message_as_its_own_is_refused():
    """Carol strips Alice's signature and signs the same body as hers: the signature verifies
    as Carol's, but the key was derived for Alice as sender, so Bob refuses it."""
    carol, signing = signing_identity()
    body = SEALED[:-64]
    binding = idm.seal_binding(carol.public, BOB.public, AAD)
    forged = body + framed_signature(signing, idm.SEALED_DOMAIN, binding + body)
    with pytest.raises(fs.AuthenticationError, match="does not decrypt"):
        BOB.open_sealed(forged, carol.public, AAD)
    # the control: the same framing over Alice's own binding is the signature she made
    alice, alice_signing = signing_identity()
    sealed = BOB.public.seal(SECRET, alice, AAD)
    binding = idm.seal_binding(alice.public, BOB.public, AAD)
    assert framed_signature(alice_signing, idm.SEALED_DOMAIN, binding + sealed[:-64]) \
        == sealed[-64:]


def test_a_sender_sealing_with_a_low_order_key_gets_an_authentication_error():
    """A signed message whose ephemeral key is the all-zero point (X25519 refuses it): an
    AuthenticationError, not cryptography's ValueError."""
    head = b"FSHLDSLD" + struct.pack("<H", 1) + bytes(32) + bytes(12)
    body = head + os.urandom(40 + 16)
    alice, signing = signing_identity()
    binding = idm.seal_binding(alice.public, BOB.public, AAD)
    signed = body + framed_signature(signing, idm.SEALED_DOMAIN, binding + body)
    with pytest.raises(fs.AuthenticationError, match="does not decrypt"):
        BOB.open_sealed(signed, alice.public, AAD)
    with pytest.raises(fs.KeyMaterialError, match="not a usable X25519"):
        PublicIdentity(BOB.public.signing_key, bytes(32)).seal(b"x", ALICE, AAD)


@pytest.mark.parametrize("sealed, why", [
    (SEALED[:133], "at least 134"), (b"", "at least 134"),
    (b"FSHLDSLX" + SEALED[8:], "bad magic"),
    (SEALED[:8] + struct.pack("<H", 2) + SEALED[10:], "version 2"),
])
def test_malformed_sealed_messages_are_refused(sealed, why):
    with pytest.raises(fs.AuthenticationError, match=why):
        BOB.open_sealed(sealed, ALICE.public, AAD)


def test_sealed_argument_types():
    with pytest.raises(TypeError):
        BOB.open_sealed(SEALED, ALICE, AAD)       # an Identity, not a PublicIdentity
    with pytest.raises(TypeError):
        BOB.public.seal(b"x", ALICE.public, AAD)  # the sender must hold its private key
    with pytest.raises(TypeError):
        BOB.open_sealed(SEALED.hex(), ALICE.public, AAD)


def test_every_single_bit_flip_of_a_sealed_message_is_refused():
    for flipped in _bit_flips(SEALED):
        with pytest.raises(fs.AuthenticationError):
            BOB.open_sealed(flipped, ALICE.public, AAD)


@EDIT_SETTINGS
@given(edits=_edits())
def test_every_random_edit_of_a_sealed_message_is_refused(edits):
    edited = _apply(SEALED, edits)
    assume(edited != SEALED)
    with pytest.raises(fs.AuthenticationError):
        BOB.open_sealed(edited, ALICE.public, AAD)


# -- signed records ---------------------------------------------------------------------------
def test_record_round_trip_and_layout():
    assert len(RECORD) == idm.RECORD_SIZE == 113
    assert RECORD[:5] == b"FSSR\1"
    assert struct.unpack_from("<IQ", RECORD, 5) == (2, 5)
    assert RECORD[17:49] == hashlib.sha256(BLOB).digest()
    verify_blob(ALICE.public, "update", RECORD, BLOB, party_id=2, round=5)
    verify_blob(ALICE.public, "update", bytearray(RECORD), memoryview(BLOB), party_id=2, round=5)
    assert verify_record(ALICE.public, "update", RECORD, party_id=2,
                         round=5) == hashlib.sha256(BLOB).digest()


def _relabel(record: bytes, party: int, round: int) -> bytes:
    return record[:5] + struct.pack("<IQ", party, round) + record[17:]


def test_relabelled_or_misattributed_records_name_what_mismatched():
    def refused(match, record=RECORD, blob=BLOB, public=ALICE.public, domain="update",
                party_id=2, round=5):
        with pytest.raises(fs.AuthenticationError, match=match):
            verify_blob(public, domain, record, blob, party_id=party_id, round=round)

    refused("names party 3, expected party 2", record=_relabel(RECORD, 3, 5))
    refused("names round 6, expected round 5", record=_relabel(RECORD, 2, 6))
    refused("names party 2, expected party 3", party_id=3)     # honest record, other sender
    refused("names round 5, expected round 4", round=4)        # replayed from round 5 into 4
    # relabelled consistently with the verifier's expectation: the signature catches it
    refused("signature does not verify", record=_relabel(RECORD, 3, 5), party_id=3)
    refused("signature does not verify", record=_relabel(RECORD, 2, 6), round=6)
    refused("signature does not verify", public=BOB.public)              # other party's key
    refused("signature does not verify", domain="share")    # an update presented as a share
    refused("SHA-256 digest differs", blob=BLOB[:-1] + bytes([BLOB[-1] ^ 1]))
    # an edited blob whose digest the relay also rewrote in the record
    edited = bytes([BLOB[0] ^ 1]) + BLOB[1:]   # always another blob
    recomputed = RECORD[:17] + hashlib.sha256(edited).digest() + RECORD[49:]
    refused("signature does not verify", record=recomputed, blob=edited)


@pytest.mark.parametrize("record, why", [
    (RECORD[:-1], "112 bytes, expected 113"), (RECORD + b"\0", "114 bytes"), (b"", "0 bytes"),
    (b"FSSX" + RECORD[4:], "not a fedshield signed record"),
    (RECORD[:4] + b"\2" + RECORD[5:], "version 2"),
])
def test_malformed_records_are_refused(record, why):
    with pytest.raises(fs.AuthenticationError, match=why):
        verify_blob(ALICE.public, "update", record, BLOB, party_id=2, round=5)


@pytest.mark.parametrize("kwargs", [
    {"party_id": -1}, {"party_id": 2**32}, {"party_id": True}, {"party_id": "2"},
    {"round": -1}, {"round": 2**64}, {"round": 5.0},
])
def test_record_party_and_round_must_be_unsigned_ints(kwargs):
    args = {"party_id": 2, "round": 5, **kwargs}
    with pytest.raises(fs.ParameterError):
        sign_blob(ALICE, "update", args["party_id"], args["round"], BLOB)
    with pytest.raises(fs.ParameterError):
        verify_blob(ALICE.public, "update", RECORD, BLOB, **args)


def test_record_extreme_party_and_round_round_trip():
    record = sign_blob(ALICE, "share", 2**32 - 1, 2**64 - 1, b"")
    verify_blob(ALICE.public, "share", record, b"", party_id=2**32 - 1, round=2**64 - 1)


def test_every_single_bit_flip_of_a_record_is_refused():
    for flipped in _bit_flips(RECORD):
        with pytest.raises(fs.AuthenticationError):
            verify_blob(ALICE.public, "update", flipped, BLOB, party_id=2, round=5)


@EDIT_SETTINGS
@given(edits=_edits())
def test_every_random_edit_of_a_record_is_refused(edits):
    edited = _apply(RECORD, edits)
    assume(edited != RECORD)
    with pytest.raises(fs.AuthenticationError):
        verify_blob(ALICE.public, "update", edited, BLOB, party_id=2, round=5)


@EDIT_SETTINGS
@given(edits=_edits())
def test_every_random_edit_of_a_signed_blob_is_refused(edits):
    edited = _apply(BLOB, edits)
    assume(edited != BLOB)
    with pytest.raises(fs.AuthenticationError, match="digest differs"):
        verify_blob(ALICE.public, "update", RECORD, edited, party_id=2, round=5)
