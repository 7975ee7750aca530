"""Key-holding contexts and their serialization.

A context owns every key. Its bytes leave the secret key out unless asked, and a context
without the secret key loads and aggregates without importing openfhe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from typing import Mapping, Optional, Union

import numpy as np

from .. import native
from ..base.atomic import write_atomic
from ..base.errors import InvalidUpdate, KeyMaterialError, ParameterError
from . import backend
from .flooding import roots_of
from .params import CKKSParams
from .wipe import wipe
from ..base.validate import is_int

_MAGIC = b"FSHLDCTX"
# Version 2: the fingerprint also covers the crypto_context section (version 1 left it out, so
# a relay could swap the OpenFHE parameters inside a file without changing its fingerprint).
CONTEXT_FORMAT_VERSION = 2
_DIGEST = 32
_KEY_SHARE = re.compile(r"key_share:(0|[1-9][0-9]{0,3})")  # canonical decimal party ids only
_SECTIONS = ("crypto_context", "public_key", "template", "secret_key")


def context_fingerprint(params: CKKSParams, modulus: int, public_key: bytes,
                        moduli: Optional[tuple] = None, crypto_context: bytes = b"") -> bytes:
    """Binds an update to its parameters, OpenFHE crypto context and public key: a foreign
    update cannot pass for ours, nor a context file whose crypto context was swapped."""
    h = hashlib.sha256(b"fedshield-context-v2")
    h.update(params.fingerprint())
    h.update(modulus.to_bytes(8, "little"))
    if moduli is not None and len(moduli) > 1:
        for q in moduli[1:]:
            h.update(int(q).to_bytes(8, "little"))
    h.update(hashlib.sha256(crypto_context).digest())
    h.update(hashlib.sha256(public_key).digest())
    return h.digest()


class Context:
    """CKKS material of one participant: parameters, public key, and maybe the secret key.

    Build one with :func:`fedshield.keygen_shared` or :func:`fedshield.load_context`.
    """

    def __init__(self, *, params: CKKSParams, modulus: int, crypto_context: bytes,
                 public_key: bytes, template: bytes, ct_layout: tuple,
                 secret_key: Optional[bytes] = None, role: str = "client",
                 live: Optional[dict] = None, party: Optional[tuple[int, int, int]] = None,
                 key_shares: Optional[Mapping[int, bytes]] = None,
                 moduli: Optional[tuple] = None) -> None:
        self.params = params
        self.modulus = int(modulus)
        # RNS tower moduli q_0..q_{T-1} (modulus is q_0; one tower without flooding)
        self.moduli = (self.modulus,) if moduli is None else tuple(int(q) for q in moduli)
        if self.moduli[0] != self.modulus or len(self.moduli) != params.n_towers:
            raise KeyMaterialError(
                f"{len(self.moduli)} tower moduli starting at {self.moduli[0]}: these "
                f"parameters need {params.n_towers} starting at the modulus {self.modulus}")
        # the headroom and the pre-scaling rest on it
        if math.prod(self.moduli) < 2 ** params.log_q_min:
            raise KeyMaterialError(
                f"tower moduli {self.moduli} multiply to less than 2**{params.log_q_min}, the "
                "modulus these parameters' headroom and pre-scaling assume")
        self.role = role
        self._crypto_context = crypto_context
        self._public_key = public_key
        # Key material in buffers this context owns, so close() can wipe them (best effort:
        # copies handed to OpenFHE, and OpenFHE's own key objects, are not ours to wipe).
        self._secret_key = None if secret_key is None else bytearray(secret_key)
        # threshold mode: (party_id, n_parties, threshold) and, for t-of-n, the Shamir shares of
        # the other parties' key shares this party received (sender id -> N uint64 residues)
        self._party = None if party is None else tuple(int(v) for v in party)
        self._key_shares = {int(j): bytearray(v) for j, v in (key_shares or {}).items()}
        if self._party is not None and secret_key is None:
            raise KeyMaterialError("a threshold party context needs its secret key share")
        self._template = template
        self._ct_layout = tuple(int(v) for v in ct_layout)
        self.fingerprint = context_fingerprint(params, self.modulus, public_key, self.moduli,
                                               crypto_context)
        # openfhe objects, built on first use (never on the server path)
        self._live = dict(live or {})
        self._closed = False

    @property
    def has_secret_key(self) -> bool:
        """True when this context alone can decrypt (never for a threshold party)."""
        return self._secret_key is not None and self._party is None

    @property
    def is_party(self) -> bool:
        """A threshold-mode party: holds one key share, decrypts only with the others."""
        return self._party is not None

    @property
    def party_id(self) -> Optional[int]:
        return None if self._party is None else self._party[0]

    @property
    def n_parties(self) -> Optional[int]:
        return None if self._party is None else self._party[1]

    @property
    def threshold(self) -> Optional[int]:
        """Shares needed to decrypt (n_parties in n-of-n mode); None outside threshold mode."""
        return None if self._party is None else self._party[2]

    @property
    def ciphertext_template(self) -> tuple[bytes, tuple]:
        """Serialized ciphertext with zeroed residues and where its residues sit."""
        return self._template, self._ct_layout

    @property
    def tower_roots(self) -> tuple[int, ...]:
        """Each tower's primitive 2N-th root of unity (what noise flooding's NTT needs)."""
        return self.cached("tower_roots",
                           lambda: roots_of(self._template, self.moduli, self.params.ring_dim))

    def public(self) -> "Context":
        """The same context without the secret key (what a server gets)."""
        return Context(params=self.params, modulus=self.modulus, moduli=self.moduli,
                       crypto_context=self._crypto_context, public_key=self._public_key,
                       template=self._template, ct_layout=self._ct_layout, role="server",
                       live={k: self._live[k] for k in ("crypto_context", "public_key")
                             if k in self._live})

    def __repr__(self) -> str:
        party = ("" if self._party is None else
                 f"party={self._party[0]}/{self._party[1]}, threshold={self._party[2]}, ")
        return (f"Context(role={self.role!r}, ring_dim={self.params.ring_dim}, {party}"
                f"has_secret_key={self.has_secret_key}, "
                f"fingerprint={self.fingerprint.hex()[:12]}...)")

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Wipes the key material this context holds.

        The secret key (share) and the Shamir shares of other parties' keys are zeroed in place
        and dropped, with every live OpenFHE object. Best effort: Python and OpenFHE may hold
        copies this cannot reach (bytes handed to OpenFHE's deserializer, its key objects).
        Afterwards anything that needs keys raises KeyMaterialError; closing again is harmless.
        """
        for value in self._live.values():
            if isinstance(value, np.ndarray) and value.flags.writeable:
                wipe(value)  # derived key residues (secret_residues) and friends
        self._live.clear()
        if self._secret_key is not None:
            wipe(self._secret_key)
            self._secret_key = None
        for share in self._key_shares.values():
            wipe(share)
        self._key_shares = {}
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise KeyMaterialError(f"this {self.role} context was closed (its key material is "
                                   "wiped): load the key file again")

    # -- the encryption layer's internal API (fedshield.he only) -------------------------------
    def cached(self, key, make):
        """A value derived from this context, made once by ``make()`` and kept with it."""
        self._check_open()
        if key not in self._live:
            self._live[key] = make()
        return self._live[key]

    def openfhe_objects(self, need_secret: bool = False):
        """(crypto_context, public_key, secret_key or None) as live openfhe objects (loads
        openfhe: key holders only, never the server path)."""
        self._check_open()
        if need_secret and self._secret_key is None:
            raise KeyMaterialError(
                f"this {self.role} context holds no secret key: it can encrypt and aggregate "
                "but not decrypt")
        if "crypto_context" not in self._live:
            cc = backend.load_crypto_context(self._crypto_context)
            if self._party is not None:
                backend.enable_multiparty(cc)
            self._live["crypto_context"] = cc
        if "public_key" not in self._live:
            self._live["public_key"] = backend.load_public_key(self._public_key)
        if need_secret and "secret_key" not in self._live:
            self._live["secret_key"] = backend.load_secret_key(bytes(self._secret_key))
        return (self._live["crypto_context"], self._live["public_key"],
                self._live.get("secret_key"))

    def secret_key_bytes(self) -> bytes:
        """A copy of the serialized secret key (or key share): for native key arithmetic inside
        fedshield.he, never to be written or sent anywhere."""
        self._check_open()
        if self._secret_key is None:
            raise KeyMaterialError(f"this {self.role} context holds no secret key")
        return bytes(self._secret_key)

    def public_key_bytes(self) -> bytes:
        """The (joint) public key, as OpenFHE serializes it."""
        return self._public_key

    def key_residues(self) -> list[tuple[int, np.ndarray]]:
        """(offset, residues) of each RNS tower of the serialized secret key (share)."""
        key = self.secret_key_bytes()
        n = self.params.ring_dim
        offsets = native.locate_key_residues(key, n, list(self.moduli))
        return [(off, np.frombuffer(key, dtype="<u8", count=n, offset=off)) for off in offsets]

    def key_share(self, sender: int) -> bytes | None:
        """t-of-n: the Shamir share of party ``sender``'s key share this party holds (a copy)."""
        self._check_open()
        share = self._key_shares.get(sender)
        return None if share is None else bytes(share)

    @property
    def key_share_senders(self) -> list[int]:
        return sorted(self._key_shares)

    def with_key_shares(self, shares: Mapping[int, bytes]) -> "Context":
        """The same party context holding these Shamir shares of the other parties' keys."""
        self._check_open()
        return Context(params=self.params, modulus=self.modulus, moduli=self.moduli,
                       crypto_context=self._crypto_context, public_key=self._public_key,
                       template=self._template, ct_layout=self._ct_layout,
                       secret_key=self._secret_key, role=self.role, live=self._live,
                       party=self._party, key_shares=shares)

    # -- serialization -------------------------------------------------------------------
    def to_bytes(self, include_secret: bool = False) -> bytes:
        """Serializes the context; the secret key only with ``include_secret=True``."""
        self._check_open()
        if include_secret and self._secret_key is None:
            raise KeyMaterialError("include_secret=True, but this context holds no secret key")
        sections = [("crypto_context", self._crypto_context), ("public_key", self._public_key),
                    ("template", self._template)]
        meta_party = {}
        if include_secret:
            sections.append(("secret_key", self._secret_key))
            sections += [(f"key_share:{j}", self._key_shares[j]) for j in sorted(self._key_shares)]
            meta_party["secret_fp"] = secret_fingerprint(self.fingerprint, self._secret_key).hex()
            if self._party is not None:
                meta_party["party"] = list(self._party)
        meta = {
            **meta_party,
            "params": json.loads(self.params.to_json()),
            "modulus": self.modulus,
            **({"moduli": list(self.moduli)} if len(self.moduli) > 1 else {}),
            "fingerprint": self.fingerprint.hex(),
            "role": self.role if include_secret else "server",
            "ct_layout": list(self._ct_layout),
            "sections": [[name, len(blob)] for name, blob in sections],
        }
        head = json.dumps(meta, sort_keys=True).encode()
        body = b"".join([_MAGIC, struct.pack("<HI", CONTEXT_FORMAT_VERSION, len(head)), head,
                         *(blob for _, blob in sections)])
        return body + hashlib.sha256(body).digest()

    def save(self, path: Union[str, os.PathLike], *, include_secret: Optional[bool] = None) -> None:
        """Writes the context to a new file of mode 0600 (atomically: temp file + rename).

        ``include_secret`` None saves whatever the context holds (a party's file carries its
        key share). The temp file is created with O_EXCL at mode 0600 (never widened by the
        umask later) and renamed over ``path``, so a reader never sees a half-written file.
        """
        if include_secret is None:
            include_secret = self._secret_key is not None
        data = self.to_bytes(include_secret=include_secret)
        write_atomic(path, data, mode=0o600)


def secret_fingerprint(context_fp: bytes, secret_key: bytes) -> bytes:
    """Binds a secret key to its context, so a key spliced in from another context is caught."""
    return hashlib.sha256(b"fedshield-secret-v1" + context_fp + secret_key).digest()


def load_context(source: Union[bytes, bytearray, memoryview, str, os.PathLike]) -> Context:
    """Loads a context from :meth:`Context.to_bytes` bytes or a file written by
    :meth:`Context.save`; raises KeyMaterialError if it is malformed, corrupted or foreign.

    Needs no openfhe: a public context loads and aggregates anywhere.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                blob = f.read()
        except OSError as exc:
            raise KeyMaterialError(f"cannot read key file {os.fspath(source)!r}: {exc}") from exc
    else:
        blob = bytes(source)
    fixed = len(_MAGIC) + 6
    if len(blob) < fixed + _DIGEST or blob[:len(_MAGIC)] != _MAGIC:
        raise KeyMaterialError("not a fedshield context (bad magic or too short)")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise KeyMaterialError("context bytes are corrupted (digest mismatch)")
    version, head_len = struct.unpack_from("<HI", blob, len(_MAGIC))
    if version == 1:
        raise KeyMaterialError(
            "context format version 1 is no longer loaded: its fingerprint does not cover the "
            "OpenFHE crypto context, so a relay could swap it unnoticed. Version 2 changes every "
            "context fingerprint (updates made under version 1 keys would not aggregate with new "
            "ones either): generate the keys again with this fedshield")
    if version != CONTEXT_FORMAT_VERSION:
        raise KeyMaterialError(f"context format version {version} is not supported "
                               f"(expected {CONTEXT_FORMAT_VERSION})")
    try:
        meta = json.loads(body[fixed:fixed + head_len])
        params = CKKSParams.from_dict(meta["params"])
        sections, at = {}, fixed + head_len
        for name, size in meta["sections"]:
            if not isinstance(name, str) or name in sections:
                # a second "secret_key" (or "template") section would silently replace the first
                raise ValueError(f"section name {name!r} is not a string or is repeated")
            # negative sizes would walk `at` backwards and still let the total add up
            if not (isinstance(size, int) and size >= 0):
                raise ValueError(f"section {name!r} has size {size!r}")
            sections[name] = body[at:at + size]
            at += size
        if at != len(body):
            raise ValueError("section sizes do not add up")
        key_shares = {}
        for name in sections:
            if name.startswith("key_share:"):
                # strict: "key_share:01" or "key_share: 1" would alias sender 1 under int()
                match = _KEY_SHARE.fullmatch(name)
                if match is None:
                    raise ValueError(f"section name {name!r} is not key_share:<party id> with a "
                                     "canonical decimal id")
                key_shares[int(match.group(1))] = sections[name]
            elif name not in _SECTIONS:
                raise ValueError(f"unknown section {name!r} (expected {', '.join(_SECTIONS)} "
                                 "or key_share:<party id>)")
        moduli = meta.get("moduli")
        if moduli is not None and not (isinstance(moduli, list) and 2 <= len(moduli) <= 8 and
                                       all(is_int(q)
                                           for q in moduli)):
            raise ValueError(f"moduli {moduli!r} is not a list of 2 to 8 ints")
        party = meta.get("party")
        if party is not None:
            party = _check_party(party, key_shares, params.ring_dim * params.n_towers)
        elif key_shares:
            raise ValueError("key shares in a context that is not a threshold party")
        secret_key = sections.get("secret_key")
        ctx = Context(params=params, modulus=int(meta["modulus"]),
                      crypto_context=sections["crypto_context"],
                      public_key=sections["public_key"], template=sections["template"],
                      ct_layout=tuple(meta["ct_layout"]), secret_key=secret_key,
                      role=str(meta["role"]), party=party, key_shares=key_shares,
                      moduli=None if moduli is None else tuple(moduli))
        _check_ciphertext_layout(ctx)
        # inside the try: a missing "fingerprint" key is a malformed context, not a KeyError
        fingerprint_ok = ctx.fingerprint.hex() == meta["fingerprint"]
        # every file with a secret key names it by its fingerprint (KeyError: malformed)
        secret_ok = (secret_key is None or
                     secret_fingerprint(ctx.fingerprint, secret_key).hex() == meta["secret_fp"])
    except (KeyError, ValueError, TypeError, ParameterError,
            OverflowError, RecursionError) as exc:  # int(inf), deeply nested JSON
        raise KeyMaterialError(f"malformed context: {exc}") from exc
    if not fingerprint_ok:
        raise KeyMaterialError("context fingerprint does not match its public key")
    if not secret_ok:
        raise KeyMaterialError("the secret key in this context file does not belong to its "
                               "public key (a key file assembled from another context?)")
    if secret_key is not None:
        _check_secret_key(ctx, secret_key)
    return ctx


def _check_party(party, key_shares: dict, n_residues: int) -> tuple[int, int, int]:
    if not (isinstance(party, list) and len(party) == 3 and
            all(is_int(v) for v in party)):
        raise ValueError(f"party {party!r} is not [party_id, n_parties, threshold]")
    party_id, n_parties, threshold = party
    if not (2 <= n_parties <= 1024 and 0 <= party_id < n_parties and
            n_parties // 2 < threshold <= n_parties):
        raise ValueError(f"party {party!r}: need 0 <= party_id < n_parties, "
                         "n_parties/2 < threshold <= n_parties")
    for sender, share in key_shares.items():
        if not (0 <= sender < n_parties and sender != party_id):
            raise ValueError(f"key share from party {sender}, not another party of {n_parties}")
        if len(share) != 8 * n_residues:
            raise ValueError(f"key share from party {sender} has {len(share)} bytes, "
                             f"expected {8 * n_residues}")
    return party_id, n_parties, threshold


def _check_secret_key(ctx: Context, secret_key: bytes) -> None:
    """The secret key must be one residue array of this context's ring (checked natively)."""
    try:
        native.locate_key_residues(secret_key, ctx.params.ring_dim, list(ctx.moduli))
    except InvalidUpdate as exc:
        raise KeyMaterialError(f"the secret key does not fit this context: {exc}") from exc
    bounds = np.repeat(np.array(ctx.moduli, dtype=np.uint64), ctx.params.ring_dim)
    for sender, share in ctx._key_shares.items():
        if not (np.frombuffer(share, dtype="<u8") < bounds).all():
            raise KeyMaterialError(f"key share from party {sender} has residues not below q")


def _check_ciphertext_layout(ctx: Context) -> None:
    """The template layout must describe this context's ciphertexts: the native code copies
    residues through these offsets (it re-checks the bounds itself too)."""
    layout = ctx._ct_layout
    n, towers = ctx.params.ring_dim, len(ctx.moduli)
    if len(layout) != 2 + 3 * towers:
        raise ValueError(f"ct_layout has {len(layout)} fields, expected {2 + 3 * towers} "
                         f"({towers} tower(s))")
    ring_dim, moduli, offsets, total = (layout[0], tuple(layout[1:1 + towers]),
                                        layout[1 + towers:-1], layout[-1])
    if ring_dim != n or moduli != ctx.moduli or total != len(ctx._template):
        raise ValueError(f"ct_layout {layout[:1 + towers]}... does not match ring_dim {n}, "
                         f"the moduli or the {len(ctx._template)}-byte template")
    at = 8
    for off in offsets:
        if not at <= off or off + 8 * n > total:
            raise ValueError(f"ct_layout offsets {offsets} do not fit the template")
        at = off + 8 * n + 8
    for q in ctx.moduli:  # what the wire format takes
        if not (3 <= q < 2**62 and q % 2 == 1):
            raise ValueError(f"modulus {q} is not an odd modulus in [3, 2**62)")
    if len(set(ctx.moduli)) != towers:
        raise ValueError(f"tower moduli {ctx.moduli} are not distinct")
