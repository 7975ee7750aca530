"""Key set-up with no dealer: each party makes its key material on its own node; the server
relays messages it can neither read nor forge.

Transport-agnostic, like the Server: :class:`KeySetup` (the server's half) sends operations to
the parties through ``ask(op, requests)`` and :meth:`KeyHolder.handle` (a party's half) answers
them; a request and a reply are ``(fields, sections)``: scalars and lists of scalars, and byte
strings. The local engine calls ``handle`` in-process; the Flower engine carries the same pairs
in messages to each site worker.

Threshold keys, key epoch ``e`` (signatures: each party's identity key, fedshield.trust.identity,
with ``round`` = the epoch):

1. ``keys.begin``: every party gets the roster (party -> public identity, exchanged at
   enrolment), the parameters, n and t, and checks that its own entry is its own key.
2. ``keys.step``: OpenFHE's multiparty key generation chain. Party 0 starts it; party i extends
   party i-1's message once that party's signature verifies, and signs its own. The server
   screens each step (well-formed, the sender's, extending the previous step's chain, moduli
   and a) before relaying it.
3. ``keys.finish``: every party gets the last message, checks the last party's signature and
   that its own step is in the chain, and (t-of-n) deals Shamir shares of its key share, each
   sealed to its one recipient (X25519 + ChaCha20-Poly1305, signed by the dealer). Party 0
   also sends the public context (signed), every party its context's fingerprint: the server
   never builds a context itself, so it needs no openfhe.
4. ``keys.shares``: every party opens the sealed shares addressed to it.
5. ``keys.check-*``: joint test decryptions of a public test vector. Every party encrypts it
   under the joint key (signed); the server sums the n updates; for each subset of a family that
   uses every party's own share and every dealt share (:func:`check_subsets`) its members
   decrypt partially (signed), and every party fuses every subset and reports which ones give
   the test vector back. What the failing subsets used and no passing one did names the party
   (:func:`suspects`): a party whose own share does not match its chain step, or a dealer whose
   share to a recipient is inconsistent. The set-up stops with fs.KeySetupError naming it.
6. ``keys.commit``: every party writes its context (its key share, mode 0600) to its own key
   file and starts a decryption budget for the new key; the server keeps the public context.

Shared keys (the paper's mode): party 0 makes the key pair and seals its residues to every
other party (``keys.shared-make`` / ``keys.shared-take``), which rebuilds the client context on
its own crypto context and keeps it only if its fingerprint is that of the public context party
0 signed; the server gets the public context.

No party hands another machine's bytes to OpenFHE: each makes its crypto context from the
parameters of ``keys.begin``, and chain steps, the joint public key and the shared key travel
as residues (docs/WIRE.md, "Key set-up messages") that are checked natively and rebuilt on the
receiver's own key template. The server never loads openfhe.

Blame falls on the sender. A party that refuses a message another party signed or sealed
(malformed, for other parameters or moduli, residues out of range, not its step of the chain)
raises fs.KeyMessageRefused naming that sender (across Flower: :func:`refusal_fields` in the
site worker's reply), and :class:`KeySetup` fails naming the sender, not the party that refused.
A signature that does not verify at a party means the relay altered the message: the party
says so and nobody is blamed.

Nothing here writes key material anywhere but the party's own key file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from ..base.errors import (AuthenticationError, FedShieldError, IncompatibleUpdate, InvalidUpdate,
                      KeyMaterialError, KeyMessageRefused, KeySetupError, ParameterError)
from ..he import (CKKSParams, Context, EncryptedUpdate, Layout, PartialDecryption, aggregate,
                  combine_partials, decrypt_update, encrypt_update, keygen_shared, load_context,
                  partial_decrypt)
from ..he import threshold as th
from ..he.budget import DecryptionBudget
from ..trust.identity import Identity, PublicIdentity, sign_blob, verify_blob
from ..he.keys import open_shared_key_material, shared_key_material
from ..he.wipe import wipe
from ..trust.federation import Federation, RunSettings

log = logging.getLogger("fedshield")

Request = tuple[dict, list]
Ask = Callable[[str, Mapping[int, Request]], Mapping[int, object]]

KEYCHECK_VALUES = 64           # the public test vector's length (one ciphertext)
KEYCHECK_TOLERANCE = 1e-4      # a wrong key decrypts to noise of thousands; right, to ~1e-7
_SHARE_AAD = b"fedshield-key-share-v1"
_CLIENT_AAD = b"fedshield-shared-key-v1"
NOT_PINNED = ("this site has no pinned federation file, so it would take the server's word for "
              "who the other parties are (a malicious server could enrol identities of its "
              "own): give the site its co-signed federation file (`fedshield federation`), or, "
              "for simulations only, opt in with insecure_trust_server_roster")


# -- what both halves compute the same way -----------------------------------------------------
def check_subsets(n: int, t: int) -> list[tuple[int, ...]]:
    """Sets of present parties whose test decryptions together use every party's own key
    share (all n present: nobody covers anyone) and, t-of-n, every share a dealer j gave a
    recipient i (a subset of t without j, with i: all of them cover for every absent party)."""
    subsets = [tuple(range(n))]
    if t == n:
        return subsets
    for absent in range(n):
        others = [i for i in range(n) if i != absent]
        for start in range(0, len(others), t):
            chunk = others[start:start + t]
            if len(chunk) < t:
                chunk = others[-t:]
            subset = tuple(sorted(chunk))
            if subset not in subsets:
                subsets.append(subset)
    return subsets


def used_material(subset: Iterable[int], n: int, t: int) -> set[tuple]:
    """What a decryption with ``subset`` present relies on: ("own", i) for every present i,
    ("dealt", j, i) for every absent j and every i among the t smallest present ids."""
    present = sorted(subset)
    cover = present[:t]
    absent = [j for j in range(n) if j not in present]
    return ({("own", i) for i in present}
            | {("dealt", j, i) for j in absent for i in cover})


def suspects(results: Mapping[tuple[int, ...], bool], n: int, t: int,
             known_good: Iterable[tuple] = ()) -> set[tuple]:
    """The material used by failing subsets and by no passing one (nor in ``known_good``:
    each party's own share once its probe matched its chain step)."""
    cleared = set(known_good).union(*[used_material(s, n, t) for s, ok in results.items() if ok])
    failing = set().union(*[used_material(s, n, t) for s, ok in results.items() if not ok])
    return failing - cleared


def describe(material: Iterable[tuple]) -> str:
    """The parties behind suspect material, in words."""
    material = sorted(material)
    parts = [f"party {m[1]} (its key share does not match its step of the chain)"
             for m in material if m[0] == "own"]
    dealt: dict[int, list[int]] = {}
    for m in material:
        if m[0] == "dealt":
            dealt.setdefault(m[1], []).append(m[2])
    for dealer, recipients in sorted(dealt.items()):
        to = (f"party {recipients[0]}" if len(recipients) == 1
              else f"one of parties {recipients}")
        parts.append(f"party {dealer} (the Shamir share it dealt to {to} is inconsistent, or "
                     "its recipient altered it)")
    return "; ".join(parts)


def keycheck_values(context_fp: bytes) -> np.ndarray:
    """The public test vector of a key epoch: uniform in [-1, 1), derived from the joint
    context's fingerprint (every party and the server compute the same one)."""
    seed = int.from_bytes(hashlib.sha256(b"fedshield-keycheck-v1" + context_fp).digest()[:8],
                          "little")
    return np.random.default_rng(seed).uniform(-1.0, 1.0, KEYCHECK_VALUES).astype(np.float32)


KEYCHECK_LAYOUT = Layout.from_state_dict({"keycheck": np.zeros(KEYCHECK_VALUES, np.float32)})


def roster_fields(roster: Mapping[int, PublicIdentity]) -> list[str]:
    return [roster[p].to_bytes().hex() for p in range(len(roster))]


def roster_from(hexes) -> dict[int, PublicIdentity]:
    if not isinstance(hexes, (list, tuple)) or not all(isinstance(h, str) for h in hexes):
        raise KeySetupError(f"malformed roster: {hexes!r:.80}")
    try:
        return {p: PublicIdentity.from_bytes(bytes.fromhex(h)) for p, h in enumerate(hexes)}
    except (ValueError, FedShieldError) as exc:
        raise KeySetupError(f"malformed roster: {exc}") from exc


def _share_aad(context_fp: bytes, epoch: int, sender: int, recipient: int) -> bytes:
    return (_SHARE_AAD + context_fp + epoch.to_bytes(8, "little") + sender.to_bytes(4, "little")
            + recipient.to_bytes(4, "little"))


def _client_aad(public_fp: bytes, epoch: int, recipient: int) -> bytes:
    return _CLIENT_AAD + public_fp + epoch.to_bytes(8, "little") + recipient.to_bytes(4, "little")


def _sections(sections: list, count: int, op: str, party: int) -> list:
    if len(sections) != count:
        raise KeySetupError(f"party {party}: {op} request with {len(sections)} sections, "
                            f"expected {count}")
    return list(sections)


def _party_ids(value, n: int, what: str, party: int) -> tuple[int, ...]:
    """A server-given list of distinct party ids in increasing order."""
    if not (isinstance(value, (list, tuple)) and
            all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < n for p in value)
            and list(value) == sorted(set(value)) and value):
        raise KeySetupError(f"party {party}: malformed {what} {value!r:.80} (ids in [0, {n}))")
    return tuple(value)


def _check_update(ctx: Context, blob) -> bytes:
    """A party's key-check update: one client update of one ciphertext under ``ctx``."""
    upd = EncryptedUpdate.from_bytes(blob)
    if upd.is_aggregate or upd.n_ciphertexts != 1 or upd.round != 0:
        raise IncompatibleUpdate(f"not a key-check update ({upd!r:.120})")
    if upd.header["context_fp"] != ctx.fingerprint:
        raise IncompatibleUpdate("a key-check update made under another context")
    return bytes(blob)


# -- refusals that name their sender, across transports ---------------------------------------
REFUSED = "refused-by-sender"   # reply field: a party refused a message another party signed


def refusal_fields(exc: KeyMessageRefused) -> dict:
    """A refusal as reply fields (a transport that carries errors as text keeps the sender
    this way): the error type, the sender's id and a bounded message."""
    return {REFUSED: type(exc).__name__, "sender": int(exc.sender), "reason": str(exc)[:400]}


def refusal_from(fields: Mapping) -> Optional[KeyMessageRefused]:
    """The KeyMessageRefused of :func:`refusal_fields`, or None for an ordinary reply."""
    if REFUSED not in fields:
        return None
    sender = fields.get("sender")
    if not (isinstance(sender, int) and not isinstance(sender, bool) and sender >= 0):
        raise KeySetupError(f"a refusal naming sender {sender!r:.40}, not a party id")
    return KeyMessageRefused(str(fields.get("reason", ""))[:400], sender=sender)


# -- a party's half ---------------------------------------------------------------------------
class KeyHolder:
    """A party's side of the key set-up: its identity, its in-progress key material and,
    once committed, its context (written to ``key_file``, mode 0600) and decryption budget
    (``key_file`` + ".budget")."""

    def __init__(self, party_id: int, identity: Identity, key_file: str | Path, *,
                 federation: Optional[Federation] = None,
                 trust_server_roster: bool = False) -> None:
        if not isinstance(identity, Identity):
            raise TypeError(f"expected an Identity, got {type(identity).__name__}")
        if federation is None and trust_server_roster is not True:
            raise KeySetupError(NOT_PINNED)
        if federation is not None:
            if not isinstance(federation, Federation):
                raise TypeError(f"expected a Federation, got {type(federation).__name__}")
            federation.check_pinnable()
        self.party_id = int(party_id)
        self.identity = identity
        self.key_file = Path(key_file)
        self.federation = federation
        # (fewest parties per aggregate, verify): the run's settings, raised to the floor
        self.guard_settings: tuple[int, bool] = (2, True)
        self.roster: dict[int, PublicIdentity] = {}
        self.server: Optional[PublicIdentity] = None   # signs each aggregate's provenance
        self.epoch: Optional[int] = None
        self._mode = ""
        self._params: Optional[CKKSParams] = None
        self._n = self._t = 0
        self._state: Optional[th.KeygenState] = None
        self._ctx: Optional[Context] = None        # made this epoch, not yet committed
        self._check_decryptions = 0                 # charged to the new key's budget at commit
        self.committed: Optional[Context] = None    # the context of the last committed epoch

    def __repr__(self) -> str:
        return f"KeyHolder(party {self.party_id}, epoch {self.epoch})"

    @property
    def budget_file(self) -> Path:
        return self.key_file.with_name(self.key_file.name + ".budget")

    def handle(self, op: str, fields: Mapping, sections: list) -> Request:
        """Answers one key set-up operation (see the module docstring)."""
        ops = {"keys.begin": self._begin, "keys.step": self._step, "keys.finish": self._finish,
               "keys.shares": self._take_shares, "keys.check-own": self._check_own,
               "keys.check-update": self._check_update,
               "keys.check-share": self._check_share, "keys.check-verdict": self._verdict,
               "keys.commit": self._commit, "keys.shared-make": self._shared_make,
               "keys.shared-take": self._shared_take}
        if op not in ops:
            raise ParameterError(f"unknown key set-up operation {op!r}")
        if op != "keys.begin":
            self._expect_epoch(fields)
        try:
            return ops[op](fields, sections)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            if isinstance(exc, FedShieldError):
                raise
            # the request's own fields and sections, which the server (the relay) assembles
            log.debug("key set-up: party %d, malformed %s request", self.party_id, op,
                      exc_info=True)
            raise KeySetupError(f"party {self.party_id}: malformed {op} request from the server "
                                f"({type(exc).__name__})") from exc

    def _expect_epoch(self, fields: Mapping) -> None:
        if self.epoch is None or fields.get("epoch") != self.epoch:
            raise KeySetupError(f"party {self.party_id}: key set-up message for epoch "
                                f"{fields.get('epoch')!r}, this party is in epoch {self.epoch}")

    def _sign(self, domain: str, blob: bytes) -> bytes:
        return sign_blob(self.identity, domain, self.party_id, self.epoch, blob)

    def _verify(self, domain: str, record: bytes, blob: bytes, party: int) -> None:
        """The signature of ``party`` on ``blob``. The server verified it before relaying it:
        a signature that fails here means the relay altered the message, not that its sender
        is to blame."""
        try:
            verify_blob(self.roster[party], domain, record, blob, party_id=party,
                        round=self.epoch)
        except AuthenticationError as exc:
            raise KeySetupError(f"party {self.party_id}: party {party}'s {domain} message does "
                                f"not verify: the relay altered it ({exc})") from exc

    def _open(self, sealed, sender: int, aad: bytes) -> bytes:
        """A message ``sender`` sealed to this party; one that does not open was altered on the
        way (the relay cannot tell a sealed message from another), not blamed on ``sender``."""
        try:
            return self.identity.open_sealed(sealed, self.roster[sender], aad)
        except AuthenticationError as exc:
            raise KeySetupError(f"party {self.party_id}: the message party {sender} sealed to it "
                                f"does not open: altered on the way ({exc})") from exc

    @contextmanager
    def _from(self, sender: int, what: str):
        """Refusals of a message ``sender`` signed (or sealed) are KeyMessageRefused naming the
        sender: the set-up fails by its doing, not this party's."""
        try:
            yield
        except KeySetupError:
            raise
        except FedShieldError as exc:
            raise KeyMessageRefused(f"party {self.party_id} refused the {what} that party "
                                    f"{sender} signed: {exc}", sender=sender) from exc

    def _begin(self, fields: Mapping, sections: list) -> Request:
        """Takes a key epoch's roster, parameters and settings: with a pinned federation only
        exactly its own (and the run's settings at or above its floor)."""
        roster = roster_from(fields.get("roster"))
        settings = RunSettings.from_json(fields.get("settings"))
        try:
            params = CKKSParams.from_dict(json.loads(str(fields["params"])))
            n, t, mode = int(fields["n"]), int(fields["t"]), str(fields["mode"])
        except (KeyError, TypeError, ValueError, FedShieldError) as exc:
            raise KeySetupError(f"party {self.party_id}: malformed key set-up request "
                                f"({type(exc).__name__})") from None
        if not fields.get("server"):
            raise KeySetupError(f"party {self.party_id}: the key set-up names no server identity")
        server = roster_from([fields.get("server")])[0]
        if self.federation is not None:
            self.federation.check_key_setup(self.party_id, self.identity.public, mode=mode,
                                            n=n, t=t, params=params, roster=roster,
                                            server=server, settings=settings)
        else:
            log.warning("key set-up: party %d TRUSTS THE SERVER'S ROSTER (no pinned federation "
                        "file): a malicious server could enrol identities of its own",
                        self.party_id)
        if roster.get(self.party_id) != self.identity.public:
            raise KeySetupError(f"party {self.party_id}: the roster's identity for this party "
                                "is not this node's own (a relay substituted it?)")
        epoch = fields.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or (
                self.epoch is not None and epoch <= self.epoch):
            raise KeySetupError(f"party {self.party_id}: key epoch {epoch!r} is not after "
                                f"{self.epoch}")
        if len(roster) != n:
            raise KeySetupError(f"the roster names {len(roster)} parties, n = {n}")
        self._params, self._mode, self._n, self._t = params, mode, n, t
        self.roster, self.server, self.epoch = roster, server, epoch
        self.guard_settings = (self.federation.floor.guard_settings(settings)
                               if self.federation is not None
                               else (settings.quorum, settings.verify_aggregates))
        self._state = self._ctx = None
        self._check_decryptions = 0
        log.info("key set-up, epoch %d: party %d, %s keys; identity fingerprints (compare them "
                 "out of band): parties %s, server %s", epoch, self.party_id, self._mode,
                 {p: r.fingerprint() for p, r in roster.items()}, server.fingerprint())
        return {}, []

    # -- threshold chain ------------------------------------------------------------------------
    def _step(self, fields: Mapping, sections: list) -> Request:
        if self.party_id == 0:
            self._state, message = th.start_keygen(self._params, self._n, self._t)
        else:
            message, record = _sections(sections, 2, "keys.step", self.party_id)
            sender = self.party_id - 1
            self._verify("keygen", record, message, sender)
            with self._from(sender, "key generation step"):
                self._state, message = th.join_keygen(message, self.party_id, self._params,
                                                      self._n, self._t)
        return {}, [message, self._sign("keygen", message)]

    def _finish(self, fields: Mapping, sections: list) -> Request:
        message, record = _sections(sections, 2, "keys.finish", self.party_id)
        self._verify("keygen", record, message, self._n - 1)
        if self._state is None:
            raise KeySetupError(f"party {self.party_id} took no step of this epoch's chain")
        with self._from(self._n - 1, "joint public key"):
            th.read_keygen_message(message, self._state.params, self._n, self._t,
                                   self._state.moduli)
        try:
            ctx = th.finish_keygen(self._state, message)
        except KeyMaterialError as exc:
            # the server checked that every step of the chain is the one its party signed:
            # a well-formed joint key without this party's own step is this party's failure
            raise KeySetupError(f"party {self.party_id}: {exc}", culprit=self.party_id) from exc
        self._state = None
        self._ctx = ctx
        dealt = th.deal_key_shares(ctx)
        to = sorted(dealt)
        sealed = [self.roster[r].seal(dealt[r], self.identity,
                                      _share_aad(ctx.fingerprint, self.epoch, self.party_id, r))
                  for r in to]
        # the server never builds a context itself (it does not load openfhe): party 0 sends
        # the public one, and every party the fingerprint of its own, which must agree
        public = []
        if self.party_id == 0:
            blob = ctx.public().to_bytes()
            public = [blob, self._sign("public-context", blob)]
        return {"to": to, "context-fp": ctx.fingerprint.hex()}, public + sealed

    def _take_shares(self, fields: Mapping, sections: list) -> Request:
        senders = fields.get("from")
        if not (isinstance(senders, list) and len(senders) == len(sections)):
            raise KeySetupError(f"party {self.party_id}: malformed key shares message")
        ctx = self._require_ctx()
        if not all(isinstance(s, int) and not isinstance(s, bool) and s in self.roster
                   for s in senders):
            raise KeySetupError(f"party {self.party_id}: key shares from {senders!r:.80}, not "
                                "parties of the roster")
        for sender, blob in zip(senders, sections):
            opened = self._open(blob, sender, _share_aad(ctx.fingerprint, self.epoch, sender,
                                                         self.party_id))
            try:
                with self._from(sender, "key share"):
                    ctx = th.accept_key_shares(ctx, [opened], sender=sender)
            finally:
                wipe(bytearray(opened))
        self._ctx = ctx
        return {}, []

    def _require_ctx(self) -> Context:
        if self._ctx is None:
            raise KeySetupError(f"party {self.party_id} holds no key of epoch {self.epoch}")
        return self._ctx

    # -- shared keys ------------------------------------------------------------------------------
    def _shared_make(self, fields: Mapping, sections: list) -> Request:
        if self.party_id != 0:
            raise KeySetupError(f"party {self.party_id} asked to make the shared key (party 0 "
                                "does)")
        ctx = keygen_shared(self._params).client_context()
        self._ctx = ctx
        # residues only: the recipients rebuild the key on crypto contexts of their own
        secret = bytearray(shared_key_material(ctx))
        public = ctx.public().to_bytes()
        to = [p for p in range(self._n) if p != 0]
        try:
            sealed = [self.roster[r].seal(secret, self.identity,
                                          _client_aad(ctx.fingerprint, self.epoch, r))
                      for r in to]
        finally:
            wipe(secret)
        return {"to": to}, [public, self._sign("public-context", public), *sealed]

    def _shared_take(self, fields: Mapping, sections: list) -> Request:
        public, record, sealed = _sections(sections, 3, "keys.shared-take", self.party_id)
        self._verify("public-context", record, public, 0)
        with self._from(0, "public context"):
            # parsed natively, no openfhe: only its fingerprint is used
            public_ctx = load_context(public)
            if public_ctx.has_secret_key or public_ctx.params != self._params.for_keys("shared"):
                raise KeyMaterialError("the public context holds a secret key or other "
                                       "parameters than this party's")
        secret = bytearray(self._open(sealed, 0, _client_aad(public_ctx.fingerprint, self.epoch,
                                                              self.party_id)))
        try:
            with self._from(0, "shared key"):
                ctx = open_shared_key_material(secret, self._params.for_keys("shared"))
                if ctx.fingerprint != public_ctx.fingerprint:
                    raise KeyMaterialError("the sealed key is not the signed public context's")
        finally:
            wipe(secret)
        self._ctx = ctx
        return {}, []

    # -- the joint test decryptions -----------------------------------------------------------------
    def _check_own(self, fields: Mapping, sections: list) -> Request:
        """The probe of this party's own key share (threshold.own_key_probe), signed."""
        probe = th.own_key_probe(self._require_ctx())
        self._check_decryptions += 1
        return {}, [probe, self._sign("keycheck-own", probe)]

    def _check_update(self, fields: Mapping, sections: list) -> Request:
        ctx = self._require_ctx()
        upd = encrypt_update(ctx, {"keycheck": keycheck_values(ctx.fingerprint)},
                             KEYCHECK_LAYOUT, weight=1.0, weight_bound=1.0, round=0).to_bytes()
        return {}, [upd, self._sign("keycheck", upd)]

    def _check_aggregate(self, sections: list) -> EncryptedUpdate:
        """The test aggregate, once every party's signed test update in the manifest checks
        and the aggregate is their sum (recomputed here: it is one small ciphertext)."""
        ctx = self._require_ctx()
        if len(sections) != 1 + 2 * self._n:
            raise KeySetupError("the key-check aggregate must come with every party's signed "
                                "test update")
        agg_bytes, *signed = sections
        updates = []
        for party in range(self._n):
            upd, record = signed[2 * party], signed[2 * party + 1]
            self._verify("keycheck", record, upd, party)
            with self._from(party, "key-check update"):
                updates.append(_check_update(ctx, upd))
        agg = aggregate(ctx.public(), updates, round=0, weight_bound=1.0)
        if agg.to_bytes() != bytes(agg_bytes):
            raise KeySetupError("the key-check aggregate is not the sum of the signed test "
                                "updates")
        return agg

    def _check_share(self, fields: Mapping, sections: list) -> Request:
        ctx = self._require_ctx()
        present = _party_ids(fields.get("present"), self._n, "present", self.party_id)
        agg = self._check_aggregate(sections)
        share = partial_decrypt(ctx, agg, list(present))
        self._check_decryptions += agg.n_ciphertexts
        return {}, [share, self._sign("keycheck-share", share)]

    def _verdict(self, fields: Mapping, sections: list) -> Request:
        """For each subset: do its members' shares fuse to the test vector?"""
        ctx = self._require_ctx()
        try:
            subsets = json.loads(str(fields["subsets"]))
        except RecursionError as exc:
            raise KeySetupError(f"party {self.party_id}: malformed key-check subsets") from exc
        if not isinstance(subsets, list):
            raise KeySetupError(f"party {self.party_id}: malformed key-check subsets")
        subsets = [_party_ids(s, self._n, "subset", self.party_id) for s in subsets]
        shares = 2 * sum(map(len, subsets)) if self._mode == "threshold" else 0
        if len(sections) != 1 + 2 * self._n + shares:
            raise KeySetupError(f"party {self.party_id}: the key-check verdict request holds "
                                f"{len(sections)} sections")
        n_agg = 1 + 2 * self._n
        agg = self._check_aggregate(sections[:n_agg])
        rest = sections[n_agg:]
        want = keycheck_values(ctx.fingerprint).astype(np.float64)
        ok, errors, at = [], [], 0
        for subset in subsets:
            shares = []
            for party in (subset if self._mode == "threshold" else ()):
                share, record = rest[at], rest[at + 1]
                at += 2
                self._verify("keycheck-share", record, share, party)
                with self._from(party, "key-check share"):
                    parsed = PartialDecryption.from_bytes(share)
                    parsed.check_for(ctx, agg)
                    if parsed.party_id != party or parsed.present != list(subset):
                        raise InvalidUpdate(f"a share of party {parsed.party_id} for present "
                                            f"{parsed.present}, expected party {party}'s for "
                                            f"{list(subset)}")
                shares.append(share)
            try:
                if self._mode == "threshold":
                    got = combine_partials(agg, shares, KEYCHECK_LAYOUT, ctx=ctx,
                                           tolerance=1.0)["keycheck"]
                else:  # one key everywhere: this party decrypts the sum itself
                    got = decrypt_update(ctx, agg, KEYCHECK_LAYOUT, tolerance=1.0)["keycheck"]
                    self._check_decryptions += agg.n_ciphertexts
                err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))
            except FedShieldError as exc:
                err = float("inf")
                log.warning("key check, epoch %d, present %s: %s", self.epoch, subset, exc)
            ok.append(bool(err <= KEYCHECK_TOLERANCE))
            errors.append(err if np.isfinite(err) else -1.0)
        return {"ok": ok, "errors": errors}, []

    def _commit(self, fields: Mapping, sections: list) -> Request:
        ctx = self._require_ctx()
        if fields.get("context-fp") != ctx.fingerprint.hex():
            raise KeySetupError(f"party {self.party_id}: the server commits context "
                                f"{str(fields.get('context-fp'))[:12]}..., this party made "
                                f"{ctx.fingerprint.hex()[:12]}...")
        self.key_file.parent.mkdir(parents=True, exist_ok=True)
        ctx.save(self.key_file)
        budget = DecryptionBudget(self.budget_file, 2 ** ctx.params.flood_log_queries)
        if budget.context_fp != ctx.fingerprint:
            budget.reset_for(ctx.fingerprint)
        if self._check_decryptions:  # the key check's decryptions count for the new key
            budget.charge(ctx.fingerprint, self._check_decryptions)
        self._ctx = None
        self.committed = ctx
        log.info("key set-up, epoch %d: party %d wrote its key to %s", self.epoch,
                 self.party_id, self.key_file)
        return {"context-fp": ctx.fingerprint.hex()}, []


# -- the server's half -------------------------------------------------------------------------
@dataclass
class KeySetupResult:
    context: Context               # the public context of the new epoch
    epoch: int
    subsets_checked: int
    seconds: float


class KeySetup:
    """The server's side: relays, verifies what it relays, names a party that fails."""

    def __init__(self, params: CKKSParams, mode: str, threshold: int,
                 roster: Mapping[int, PublicIdentity], server: PublicIdentity, ask: Ask, *,
                 settings: RunSettings) -> None:
        if mode not in ("shared", "threshold"):
            raise ParameterError(f"key mode {mode!r} is not 'shared' or 'threshold'")
        self.params, self.mode, self.roster, self.ask = params, mode, dict(roster), ask
        self.settings = settings
        self.server = server
        self.n = len(self.roster)
        self.t = threshold if mode == "threshold" else self.n
        if sorted(self.roster) != list(range(self.n)):
            raise KeySetupError(f"the roster must name parties 0..n-1, got {sorted(roster)}")

    def _one(self, op: str, party: int, fields: dict, sections: list) -> Request:
        return self._all(op, {party: (fields, sections)})[party]

    def _all(self, op: str, requests: Mapping[int, Request]) -> dict[int, Request]:
        replies = self.ask(op, requests)
        out = {}
        for party in requests:
            reply = replies.get(party)
            if reply is None:
                raise KeySetupError(f"party {party} did not answer {op} (key set-up needs "
                                    "every party)", culprit=party)
            if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], Mapping):
                try:  # a refusal that crossed a transport as reply fields (the site worker's)
                    reply = refusal_from(reply[0]) or reply
                except KeySetupError as exc:
                    raise KeySetupError(f"party {party} failed {op}: {exc}",
                                        culprit=party) from exc
            if isinstance(reply, KeyMessageRefused) and 0 <= reply.sender < self.n \
                    and reply.sender != party:
                # the party that signed what was refused failed the set-up, not its receiver
                raise KeyMessageRefused(f"party {reply.sender} sent a bad key set-up message "
                                        f"({op}): {reply}", sender=reply.sender)
            if isinstance(reply, BaseException):
                # a party may blame itself, or nobody (the relay altered what it got); another
                # party only through KeyMessageRefused, above
                plain = isinstance(reply, KeySetupError) and not isinstance(reply,
                                                                             KeyMessageRefused)
                culprit = None if plain and reply.culprit != party else party
                raise KeySetupError(f"party {party} failed {op}: {reply}", culprit=culprit)
            out[party] = reply
        return out

    def _verified(self, domain: str, party: int, blob, record, epoch: int) -> None:
        try:
            verify_blob(self.roster[party], domain, record, blob, party_id=party, round=epoch)
        except FedShieldError as exc:
            raise KeySetupError(f"party {party}'s {domain} message: {exc}",
                                culprit=party) from exc

    def run(self, epoch: int) -> KeySetupResult:
        """Sets up and checks the keys of ``epoch``; KeySetupError naming the party if not."""
        start = time.perf_counter()
        begin = {"epoch": epoch, "mode": self.mode, "params": self.params.to_json(),
                 "n": self.n, "t": self.t, "roster": roster_fields(self.roster),
                 "server": self.server.to_bytes().hex(),
                 "settings": self.settings.to_json()}
        self._all("keys.begin", {p: (begin, []) for p in range(self.n)})
        e = {"epoch": epoch}
        if self.mode == "threshold":
            public = self._threshold(e, epoch)
        else:
            public = self._shared(e, epoch)
        checked = self._check(e, epoch, public)
        commit = {**e, "context-fp": public.fingerprint.hex()}
        replies = self._all("keys.commit", {p: (commit, []) for p in range(self.n)})
        for party, (fields, _) in replies.items():
            if fields.get("context-fp") != public.fingerprint.hex():
                raise KeySetupError(f"party {party} committed another context")
        seconds = time.perf_counter() - start
        log.info("key set-up, epoch %d: %s keys of %d parties (t=%d) set up and checked over "
                 "%d subsets in %.1f s; context %s...", epoch, self.mode, self.n, self.t,
                 checked, seconds, public.fingerprint.hex()[:12])
        return KeySetupResult(public, epoch, checked, seconds)

    def _screen_step(self, party: int, message: bytes) -> th.KeygenMessage:
        """A chain step checked before it is relayed (natively, no openfhe): well-formed for
        this federation, party ``party``'s, extending the previous step's chain with the same
        moduli and the same a. KeyMessageRefused naming ``party`` otherwise."""
        try:
            step = th.read_keygen_message(message, th.resolve(self.params, self.n), self.n,
                                          self.t)
            if step.sender != party:
                raise KeyMaterialError(f"the step names party {step.sender}")
            if party:
                before = self._steps[-1]
                if step.chain[:-1] != before.chain or step.moduli != before.moduli:
                    raise KeyMaterialError("its chain or moduli do not extend the previous "
                                           "step's")
                if step.a_bytes() != before.a_bytes():
                    raise KeyMaterialError("its public key's a is not the previous step's")
        except FedShieldError as exc:
            raise KeyMessageRefused(f"party {party}'s key generation step is malformed: {exc}",
                                    sender=party) from exc
        return step

    def _threshold(self, e: dict, epoch: int) -> Context:
        message, record = b"", b""
        self._steps: list[th.KeygenMessage] = []
        for party in range(self.n):
            _, out = self._one("keys.step", party, e, [] if party == 0 else [message, record])
            if len(out) != 2:
                raise KeySetupError(f"party {party}'s key generation step is malformed",
                                    culprit=party)
            message, record = bytes(out[0]), bytes(out[1])
            self._verified("keygen", party, message, record, epoch)
            self._steps.append(self._screen_step(party, message))
        dealt = self._all("keys.finish", {p: (e, [message, record]) for p in range(self.n)})
        head = list(dealt[0][1][:2])
        if len(head) != 2:
            raise KeySetupError("party 0 sent no public context")
        public = self._public_context(0, bytes(head[0]), bytes(head[1]), epoch)
        if public.moduli != self._steps[-1].moduli:
            raise KeySetupError("party 0's public context has other moduli than the chain",
                                culprit=0)
        dealt[0] = (dealt[0][0], dealt[0][1][2:])
        inbox: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(self.n)}
        for sender, (fields, sealed) in dealt.items():
            if fields.get("context-fp") != public.fingerprint.hex():
                raise KeySetupError(f"party {sender} finished the key generation chain with "
                                    "another joint key than party 0")
            to = fields.get("to")
            want = [] if self.t == self.n else [r for r in range(self.n) if r != sender]
            if to != want or len(sealed) != len(want):
                raise KeySetupError(f"party {sender} dealt key shares to {to}, expected {want}")
            for recipient, blob in zip(to, sealed):
                inbox[recipient].append((sender, bytes(blob)))
        if self.t < self.n:
            self._all("keys.shares", {p: ({**e, "from": [s for s, _ in inbox[p]]},
                                          [b for _, b in inbox[p]]) for p in range(self.n)})
        return public

    def _shared(self, e: dict, epoch: int) -> Context:
        fields, out = self._one("keys.shared-make", 0, e, [])
        to = fields.get("to")
        if to != list(range(1, self.n)) or len(out) != 2 + len(to):
            raise KeySetupError("party 0's shared key message is malformed")
        public_bytes, record = bytes(out[0]), bytes(out[1])
        public = self._public_context(0, public_bytes, record, epoch)
        self._all("keys.shared-take", {r: (e, [public_bytes, record, bytes(blob)])
                                       for r, blob in zip(to, out[2:])})
        return public

    def _public_context(self, party: int, blob: bytes, record: bytes, epoch: int) -> Context:
        """The public context a party signed: loaded without openfhe, and holding no secret."""
        self._verified("public-context", party, blob, record, epoch)
        try:
            public = load_context(blob)
        except FedShieldError as exc:
            raise KeySetupError(f"party {party}'s public context does not load: {exc}") from exc
        if public.has_secret_key or public.is_party or public.params != self.params:
            raise KeySetupError(f"party {party} sent secret key material or other parameters "
                                "as the public context")
        return public

    def _check_own_keys(self, e: dict, epoch: int, public: Context) -> None:
        """Every party decrypts with the key share its step of the chain committed to."""
        probes = self._all("keys.check-own", {p: (e, []) for p in range(self.n)})
        liars = []
        for party in range(self.n):
            out = probes[party][1]
            if len(out) != 2:
                raise KeySetupError(f"party {party}'s key probe is malformed")
            self._verified("keycheck-own", party, bytes(out[0]), bytes(out[1]), epoch)
            contribution = th.step_contribution(self._steps[party - 1] if party else None,
                                                self._steps[party])
            if not th.own_key_matches(public, contribution, bytes(out[0])):
                liars.append(party)
        if liars:
            raise KeySetupError(f"key set-up, epoch {epoch}: {describe(('own', p) for p in liars)}",
                                culprit=liars[0] if len(liars) == 1 else None)

    def _check(self, e: dict, epoch: int, public: Context) -> int:
        """The joint test decryptions (threshold keys: each party's own key share first,
        then every dealt share); shared keys: every party decrypts the sum of every party's
        test update (the same key everywhere)."""
        if self.mode == "threshold":
            self._check_own_keys(e, epoch, public)
        ups = self._all("keys.check-update", {p: (e, []) for p in range(self.n)})
        signed: list[bytes] = []
        for party in range(self.n):
            _, out = ups[party]
            if len(out) != 2:
                raise KeySetupError(f"party {party}'s key-check update is malformed")
            self._verified("keycheck", party, bytes(out[0]), bytes(out[1]), epoch)
            signed += [bytes(out[0]), bytes(out[1])]
        try:
            agg = aggregate(public, signed[0::2], round=0, weight_bound=1.0)
        except FedShieldError as exc:
            raise KeySetupError(f"the key-check updates do not sum: {exc}") from exc
        head = [agg.to_bytes(), *signed]
        # shared keys: one subset, no shares (every party decrypts the sum with its own key)
        subsets = check_subsets(self.n, self.t) if self.mode == "threshold" else \
            [tuple(range(self.n))]
        shares_by_subset = {s: [] for s in subsets}
        if self.mode == "threshold":
            for subset in subsets:
                got = self._all("keys.check-share", {p: ({**e, "present": list(subset)}, head)
                                                     for p in subset})
                for party in subset:
                    share, record = got[party][1]
                    self._verified("keycheck-share", party, bytes(share), bytes(record), epoch)
                shares_by_subset[subset] = [b for p in subset for b in map(bytes, got[p][1])]
        tail = [b for s in subsets for b in shares_by_subset[s]]
        verdicts = self._all("keys.check-verdict",
                             {p: ({**e, "subsets": json.dumps([list(s) for s in subsets])},
                                  head + tail) for p in range(self.n)})
        if self.mode == "shared":
            wrong = [p for p, v in verdicts.items() if not _vote(v, 0, p)]
            if wrong:
                raise KeySetupError(f"key set-up, epoch {epoch}: parties {wrong} do not decrypt "
                                    "the key-check sum: they hold another key than party 0's")
            return 1
        results = {}
        for i, subset in enumerate(subsets):
            votes = [_vote(v, i, p) for p, v in verdicts.items()]
            results[subset] = sum(votes) * 2 > len(votes)
        if not all(results.values()):
            failing = [s for s, ok in results.items() if not ok]
            named = suspects(results, self.n, self.t, {("own", p) for p in range(self.n)})
            who = describe(named) if named else f"the parties of {failing}"
            raise KeySetupError(f"key set-up, epoch {epoch}: the joint test decryption failed "
                                f"with present sets {failing}: {who}")
        return len(subsets)


def _vote(reply: Request, index: int, party: int) -> bool:
    ok = reply[0].get("ok")
    if not (isinstance(ok, list) and index < len(ok) and isinstance(ok[index], bool)):
        raise KeySetupError(f"party {party}'s key-check verdict is malformed")
    return ok[index]


__all__ = ["KEYCHECK_VALUES", "KeyHolder", "KeySetup", "KeySetupResult", "check_subsets",
           "keycheck_values", "suspects", "used_material"]
