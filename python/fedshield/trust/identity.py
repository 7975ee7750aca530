"""A party's long-term identity, made on its own node: an Ed25519 signing key and an X25519
key-agreement key; and what the party signs and seals with them.

- :meth:`Identity.sign` / :meth:`PublicIdentity.verify`: Ed25519 over
  ``b"fedshield-sig-v1\\0" || u16 len(domain) || domain || message``. The domain ("update",
  "share", "keygen", "manifest", ...) separates uses: a signature made for one domain never
  verifies for another. Domains holding ':' are this module's own (sealed messages, signed
  records); ``sign`` refuses them, so no caller can be made to sign one of those by accident.
- :meth:`PublicIdentity.seal` / :meth:`Identity.open_sealed`: a message encrypted to one
  recipient and signed by its sender (dealt key shares): an ephemeral X25519 key agreement with
  the recipient's exchange key, HKDF-SHA256 bound to both parties' identities, the ephemeral
  key and the caller's ``aad``, ChaCha20-Poly1305, then the sender's signature over all of it
  (in the domain ``SEALED_DOMAIN``, after the binding of both identities and the ``aad``).
  ``aad`` should name what the message is for (context, key epoch, sender, recipient): a sealed
  message verifies again wherever the same ``aad`` is expected, so that is where replays stop.
- :func:`sign_blob` / :func:`verify_blob` / :func:`verify_record`: a 113-byte record that binds
  a party id, a round and the SHA-256 of a blob (an update, a partial decryption) under the
  party's signature, so a relay can neither edit the blob nor relabel its party or round.

Only the ``cryptography`` package's primitives are used; nothing here is hand-written crypto.
Every verification failure raises :class:`~fedshield.base.errors.AuthenticationError`, never a
``cryptography`` exception. Formats (integers little-endian):

  identity key file  b"FSHLDIDK", u16 version 1, Ed25519 private key (32), X25519 private key
                     (32), SHA-256 of the preceding bytes (32); 106 bytes, mode 0600
  public identity    b"FSHLDPID", u16 version 1, Ed25519 public key (32), X25519 public key
                     (32); 74 bytes
  sealed message     b"FSHLDSLD", u16 version 1, ephemeral X25519 public key (32), nonce (12),
                     ChaCha20-Poly1305 ciphertext (plaintext + 16), Ed25519 signature (64)
  signed record      b"FSSR", u8 version 1, u32 party id, u64 round, SHA-256 of the blob (32),
                     Ed25519 signature (64); 113 bytes
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Union

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..base.atomic import write_atomic
from ..base.errors import AuthenticationError, KeyMaterialError, ParameterError
from ..base.validate import is_int

Bytes = Union[bytes, bytearray, memoryview]

KEY_SIZE = 32          # Ed25519 and X25519 keys, public and private
SIGNATURE_SIZE = 64    # Ed25519
DIGEST_SIZE = 32       # SHA-256
NONCE_SIZE = 12        # ChaCha20-Poly1305
TAG_SIZE = 16

SIGNATURE_PREFIX = b"fedshield-sig-v1\0"
# Caller domains: lower-case words; ':' is kept for this module's own domains.
_DOMAIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SEALED_DOMAIN = "fedshield:sealed"   # what a sealed message's sender signs in
_RECORD_DOMAIN = "fedshield:record:"

_ID_MAGIC, _ID_VERSION = b"FSHLDIDK", 1
_ID_BODY = len(_ID_MAGIC) + 2 + 2 * KEY_SIZE
_ID_SIZE = _ID_BODY + DIGEST_SIZE

_PUB_MAGIC, _PUB_VERSION = b"FSHLDPID", 1
_PUB_SIZE = len(_PUB_MAGIC) + 2 + 2 * KEY_SIZE

_SEAL_MAGIC, _SEAL_VERSION = b"FSHLDSLD", 1
_SEAL_HEAD = len(_SEAL_MAGIC) + 2 + KEY_SIZE + NONCE_SIZE
_SEAL_MIN = _SEAL_HEAD + TAG_SIZE + SIGNATURE_SIZE
_SEAL_KDF_SALT = b"fedshield-seal-v1"

_RECORD_MAGIC, _RECORD_VERSION = b"FSSR", 1
_RECORD_HEAD = struct.Struct("<4sBIQ32s")
RECORD_SIZE = _RECORD_HEAD.size + SIGNATURE_SIZE   # 113
MAX_PARTY_ID = 2**32 - 1
MAX_ROUND = 2**64 - 1


def _as_bytes(value, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(value).__name__}")
    return value if isinstance(value, bytes) else bytes(value)


def _check_domain(domain) -> str:
    if not (isinstance(domain, str) and _DOMAIN.fullmatch(domain)):
        raise ParameterError(f"signature domain {domain!r} must be 1-64 characters of a-z, 0-9, "
                             "'.', '_', '-' (starting with a letter or digit)")
    return domain


def _framed(domain: str, message: bytes) -> bytes:
    """What Ed25519 signs: the prefix, the length-prefixed domain, the message."""
    d = domain.encode("ascii")
    return b"".join([SIGNATURE_PREFIX, struct.pack("<H", len(d)), d, message])


def _uint(value, name: str, high: int) -> int:
    if not (is_int(value) and 0 <= value <= high):
        raise ParameterError(f"{name}={value!r} must be an int in [0, {high}]")
    return value


# -- public identity --------------------------------------------------------------------------
def _check_head(data: bytes, magic: bytes, size: int, version: int, what: str) -> int:
    """Where the body of ``data`` starts, once its size, magic and format version are those of
    ``what``; KeyMaterialError naming what differs otherwise."""
    if len(data) != size or data[:len(magic)] != magic:
        raise KeyMaterialError(f"not {what}: {len(data)} bytes (expected {size}) or bad magic")
    (got,) = struct.unpack_from("<H", data, len(magic))
    if got != version:
        raise KeyMaterialError(f"not {what}: format version {got} is not supported (expected "
                               f"{version})")
    return len(magic) + 2


@dataclass(frozen=True)
class PublicIdentity:
    """What a party publishes at enrolment: its Ed25519 and X25519 public keys (32 bytes each).

    Compare :meth:`fingerprint` out of band (phone, a signed e-mail) before trusting it.
    """

    signing_key: bytes
    exchange_key: bytes

    def __post_init__(self) -> None:
        for name in ("signing_key", "exchange_key"):
            value = getattr(self, name)
            if not (isinstance(value, (bytes, bytearray, memoryview))
                    and len(value) == KEY_SIZE):
                raise KeyMaterialError(f"PublicIdentity.{name} must be {KEY_SIZE} bytes, got "
                                       f"{len(value) if hasattr(value, '__len__') else value!r}")
            object.__setattr__(self, name, bytes(value))  # hashable, immutable

    def to_bytes(self) -> bytes:
        return b"".join([_PUB_MAGIC, struct.pack("<H", _PUB_VERSION), self.signing_key,
                         self.exchange_key])

    @classmethod
    def from_bytes(cls, data: Bytes) -> "PublicIdentity":
        """Strict: exactly :meth:`to_bytes`'s 74 bytes, else KeyMaterialError."""
        data = _as_bytes(data, "public identity")
        at = _check_head(data, _PUB_MAGIC, _PUB_SIZE, _PUB_VERSION, "a fedshield public identity")
        return cls(data[at:at + KEY_SIZE], data[at + KEY_SIZE:])

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes`: what key derivations and signatures bind."""
        return hashlib.sha256(self.to_bytes()).digest()

    def fingerprint(self) -> str:
        """The first 20 bytes of :meth:`digest` as 5 groups of 8 hex digits, for reading aloud
        or comparing by eye."""
        h = self.digest()[:20].hex()
        return " ".join(h[i:i + 8] for i in range(0, 40, 8))

    def verify(self, domain: str, message: Bytes, signature: Bytes) -> None:
        """None if ``signature`` is this party's over ``message`` in ``domain``; otherwise
        AuthenticationError (tampered, made for another domain, or by another party)."""
        self._verify_framed(_check_domain(domain), _as_bytes(message, "message"), signature)

    def _verify_framed(self, domain: str, message: bytes, signature) -> None:
        signature = _as_bytes(signature, "signature")
        if len(signature) != SIGNATURE_SIZE:
            raise AuthenticationError(f"signature ({domain!r}) is {len(signature)} bytes, "
                                      f"expected {SIGNATURE_SIZE}")
        try:
            key = Ed25519PublicKey.from_public_bytes(self.signing_key)
            key.verify(signature, _framed(domain, message))
        except (InvalidSignature, ValueError) as exc:
            raise AuthenticationError(
                f"signature ({domain!r}) does not verify with the key of {self.fingerprint()}: "
                "tampered, made for another domain, or by another party") from exc

    def seal(self, plaintext: Bytes, sender: "Identity", aad: Bytes) -> bytes:
        """``plaintext`` encrypted to this party alone and signed by ``sender``; only
        :meth:`Identity.open_sealed` of this party, given ``sender``'s public identity and
        the same ``aad``, returns it."""
        if not isinstance(sender, Identity):
            raise TypeError(f"sender: expected an Identity, got {type(sender).__name__}")
        plaintext, aad = _as_bytes(plaintext, "plaintext"), _as_bytes(aad, "aad")
        ephemeral = X25519PrivateKey.generate()   # fresh per message: no key is ever reused
        ephemeral_public = ephemeral.public_key().public_bytes_raw()
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(self.exchange_key))
        except ValueError as exc:   # a low-order point: the agreement would be all zeros
            raise KeyMaterialError(f"the exchange key of {self.fingerprint()} is not a usable "
                                   "X25519 public key") from exc
        nonce = os.urandom(NONCE_SIZE)
        head = b"".join([_SEAL_MAGIC, struct.pack("<H", _SEAL_VERSION), ephemeral_public, nonce])
        binding = seal_binding(sender.public, self, aad)
        key = _seal_key(shared, binding, ephemeral_public)
        body = head + ChaCha20Poly1305(key).encrypt(nonce, plaintext, head + binding + aad)
        return body + sender._sign_framed(SEALED_DOMAIN, binding + body)


def seal_binding(sender: PublicIdentity, recipient: PublicIdentity, aad: bytes) -> bytes:
    """Who sealed, for whom, with what aad: bound into the key, the AEAD and the signature."""
    return sender.digest() + recipient.digest() + hashlib.sha256(aad).digest()


def _seal_key(shared: bytes, binding: bytes, ephemeral_public: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SEAL_KDF_SALT,
                info=binding + ephemeral_public)
    return hkdf.derive(shared)


# -- identity (private) -----------------------------------------------------------------------
class Identity:
    """A party's long-term key pair. Make it on the party's node (:meth:`generate`), keep it
    there (:meth:`save`, :meth:`load`), publish only :attr:`public`."""

    __slots__ = ("_signing", "_exchange", "public")

    def __init__(self, signing: Ed25519PrivateKey, exchange: X25519PrivateKey) -> None:
        if not (isinstance(signing, Ed25519PrivateKey)
                and isinstance(exchange, X25519PrivateKey)):
            raise TypeError("Identity needs an Ed25519PrivateKey and an X25519PrivateKey "
                            "(use Identity.generate() or Identity.load(path))")
        self._signing = signing
        self._exchange = exchange
        self.public = PublicIdentity(signing.public_key().public_bytes_raw(),
                                     exchange.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.public.fingerprint()!r})"

    # - file -
    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
        """Writes the private keys to ``path`` (mode 0600, atomically). An existing file is
        replaced only with ``overwrite=True``: a lost identity means re-enrolling the party.

        The existence check guards against an operator's mistake, not against a concurrent
        writer: both would be the party's own processes.
        """
        path = os.fspath(path)
        if not overwrite and os.path.lexists(path):
            raise KeyMaterialError(f"identity key file {path!r} already exists; pass "
                                   "overwrite=True to replace it (peers will then see a new "
                                   "fingerprint)")
        body = b"".join([_ID_MAGIC, struct.pack("<H", _ID_VERSION),
                         self._signing.private_bytes_raw(), self._exchange.private_bytes_raw()])
        write_atomic(path, body + hashlib.sha256(body).digest(), mode=0o600)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Identity":
        """Reads a file :meth:`save` wrote; KeyMaterialError, naming ``path``, if it cannot be
        read, is readable by others than its owner, or is not exactly such a file."""
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise KeyMaterialError(f"cannot read identity key file {path!r}: {exc}") from exc
        try:
            st = os.fstat(fd)   # the file opened, not whatever the path names by now
            if not stat.S_ISREG(st.st_mode):
                raise KeyMaterialError(f"identity key file {path!r} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & ~0o600:
                raise KeyMaterialError(f"identity key file {path!r} has mode {mode:04o}, wider "
                                       f"than 0600: run `chmod 600 {path}` if nobody else "
                                       "could have read it, otherwise make a new identity")
            data = b""
            while len(data) <= _ID_SIZE:   # one byte more than a key file: too long is refused
                chunk = os.read(fd, _ID_SIZE + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        at = _check_head(data, _ID_MAGIC, _ID_SIZE, _ID_VERSION,
                         f"{path!r}: a fedshield identity key file")
        body = data[:_ID_BODY]
        if hashlib.sha256(body).digest() != data[_ID_BODY:]:
            raise KeyMaterialError(f"identity key file {path!r} is corrupted (digest mismatch)")
        return cls(Ed25519PrivateKey.from_private_bytes(body[at:at + KEY_SIZE]),
                   X25519PrivateKey.from_private_bytes(body[at + KEY_SIZE:]))

    # - signing -
    def sign(self, domain: str, message: Bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``message`` in ``domain`` (see the module doc)."""
        return self._sign_framed(_check_domain(domain), _as_bytes(message, "message"))

    def _sign_framed(self, domain: str, message: bytes) -> bytes:
        return self._signing.sign(_framed(domain, message))

    # - sealed messages -
    def open_sealed(self, sealed: Bytes, sender: PublicIdentity, aad: Bytes) -> bytes:
        """The plaintext of a message ``sender`` sealed to this party with ``aad``; otherwise
        AuthenticationError (tampered, another sender or recipient, another aad)."""
        if not isinstance(sender, PublicIdentity):
            raise TypeError(f"sender: expected a PublicIdentity, got {type(sender).__name__}")
        sealed, aad = _as_bytes(sealed, "sealed message"), _as_bytes(aad, "aad")
        if len(sealed) < _SEAL_MIN or sealed[:len(_SEAL_MAGIC)] != _SEAL_MAGIC:
            raise AuthenticationError(f"not a fedshield sealed message ({len(sealed)} bytes, "
                                      f"at least {_SEAL_MIN}, or bad magic)")
        (version,) = struct.unpack_from("<H", sealed, len(_SEAL_MAGIC))
        if version != _SEAL_VERSION:
            raise AuthenticationError(f"sealed message format version {version} is not "
                                      f"supported (expected {_SEAL_VERSION})")
        body, signature = sealed[:-SIGNATURE_SIZE], sealed[-SIGNATURE_SIZE:]
        binding = seal_binding(sender, self.public, aad)
        try:
            sender._verify_framed(SEALED_DOMAIN, binding + body, signature)
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"sealed message does not verify as sealed by {sender.fingerprint()} for "
                f"{self.public.fingerprint()} with this aad: tampered, from another sender, "
                "for another recipient, or for another purpose") from exc
        at = len(_SEAL_MAGIC) + 2
        ephemeral_public = body[at:at + KEY_SIZE]
        nonce = body[at + KEY_SIZE:_SEAL_HEAD]
        try:
            shared = self._exchange.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
            key = _seal_key(shared, binding, ephemeral_public)
            return ChaCha20Poly1305(key).decrypt(nonce, body[_SEAL_HEAD:],
                                                 body[:_SEAL_HEAD] + binding + aad)
        except (InvalidTag, ValueError) as exc:
            # signed by the sender, yet not sealed the way seal() does: the sender is at fault
            raise AuthenticationError(f"sealed message signed by {sender.fingerprint()} does "
                                      "not decrypt (the sender did not seal it properly)"
                                      ) from exc


# -- signed records -----------------------------------------------------------------------------
def sign_blob(identity: Identity, domain: str, party_id: int, round: int, blob: Bytes) -> bytes:
    """A 113-byte record: ``identity`` signs, in ``domain``, that ``blob`` (by its SHA-256) is
    party ``party_id``'s message of round ``round``. Send it beside the blob."""
    if not isinstance(identity, Identity):
        raise TypeError(f"identity: expected an Identity, got {type(identity).__name__}")
    domain = _check_domain(domain)
    head = _RECORD_HEAD.pack(_RECORD_MAGIC, _RECORD_VERSION,
                             _uint(party_id, "party_id", MAX_PARTY_ID),
                             _uint(round, "round", MAX_ROUND),
                             hashlib.sha256(_as_bytes_view(blob, "blob")).digest())
    return head + identity._sign_framed(_RECORD_DOMAIN + domain, head)


def record_signer(record: Bytes) -> tuple[int, int]:
    """(party id, round) a record claims, unverified: which roster entry and round to verify
    it against. AuthenticationError for anything that is not a record."""
    _, party, round_, _ = _unpack_record(record, "signed record")
    return party, round_


def _unpack_record(record: Bytes, label: str) -> tuple[bytes, int, int, bytes]:
    """(bytes, party, round, digest) of a record whose size, magic and version are right;
    AuthenticationError naming ``label`` otherwise. Nothing here is verified yet."""
    record = _as_bytes(record, "signed record")
    if len(record) != RECORD_SIZE:
        raise AuthenticationError(f"{label} is {len(record)} bytes, expected {RECORD_SIZE}")
    magic, version, party, round_, digest = _RECORD_HEAD.unpack_from(record)
    if magic != _RECORD_MAGIC or version != _RECORD_VERSION:
        raise AuthenticationError(f"not a fedshield signed record (magic {magic!r}, version "
                                  f"{version}; expected {_RECORD_MAGIC!r}, {_RECORD_VERSION})")
    return record, party, round_, digest


def verify_record(public: PublicIdentity, domain: str, record: Bytes, *, party_id: int,
                  round: int) -> bytes:
    """The SHA-256 a record signs, once its party and round are the expected ones and its
    signature is ``public``'s in ``domain``; AuthenticationError naming what mismatched.

    For a party that holds the record but not the blob (e.g. the digests an aggregate claims
    to sum); :func:`verify_blob` also checks the blob.
    """
    if not isinstance(public, PublicIdentity):
        raise TypeError(f"public: expected a PublicIdentity, got {type(public).__name__}")
    domain = _check_domain(domain)
    party_id = _uint(party_id, "party_id", MAX_PARTY_ID)
    round = _uint(round, "round", MAX_ROUND)
    record, signed_party, signed_round, digest = _unpack_record(
        record, f"signed record ({domain!r})")
    if signed_party != party_id:
        raise AuthenticationError(f"signed record ({domain!r}) names party {signed_party}, "
                                  f"expected party {party_id}")
    if signed_round != round:
        raise AuthenticationError(f"signed record ({domain!r}) of party {party_id} names round "
                                  f"{signed_round}, expected round {round}")
    try:
        public._verify_framed(_RECORD_DOMAIN + domain, record[:_RECORD_HEAD.size],
                              record[_RECORD_HEAD.size:])
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"signed record ({domain!r}) of party {party_id}, round {round}: the signature does "
            f"not verify with the key of {public.fingerprint()} (edited, made for another "
            "domain, or signed by another party)") from exc
    return digest


def verify_blob(public: PublicIdentity, domain: str, record: Bytes, blob: Bytes, *,
                party_id: int, round: int) -> None:
    """None if ``record`` is ``public``'s signature, in ``domain``, that ``blob`` is party
    ``party_id``'s message of round ``round``; AuthenticationError naming what mismatched
    (party, round, signature or digest) otherwise."""
    digest = verify_record(public, domain, record, party_id=party_id, round=round)
    if hashlib.sha256(_as_bytes_view(blob, "blob")).digest() != digest:
        raise AuthenticationError(f"{domain!r} blob of party {party_id}, round {round}: its "
                                  "SHA-256 digest differs from the signed one (the blob was "
                                  "edited or is another message)")


def _as_bytes_view(value, what: str):
    """Bytes-like ``value`` as is (no copy of a 72 MB update just to hash it)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected bytes, got {type(value).__name__}")
    return value


__all__ = ["Identity", "PublicIdentity", "RECORD_SIZE", "SEALED_DOMAIN", "SIGNATURE_PREFIX",
           "record_signer", "seal_binding", "sign_blob", "verify_blob", "verify_record"]
