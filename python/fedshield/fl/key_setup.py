"""Key set-up with no dealer: each party makes its key material on its own node; the server
relays messages it can neither read nor forge.

Transport-agnostic, like the Server: :class:`KeySetup` (the server's half) sends operations to
the parties through ``ask(op, requests)`` and :meth:`KeyHolder.handle` (a party's half) answers
them; a request and a reply are ``(fields, sections)``: scalars and lists of scalars, and byte
strings. The local engine calls ``handle`` in-process; the Flower engine carries the same pairs
in messages to each site worker. Each ``ask`` is one message step (all parties at once);
:attr:`KeySetupResult.message_steps` counts them.

Threshold keys, key epoch ``e``: three message steps for any n, and a commit that rides on
the first round's train request (signatures: each party's
identity key, fedshield.trust.identity, with ``round`` = the epoch). Collective key generation
(fedshield.he.threshold): every party expands the same uniform ``a`` from a public seed (a hash
of the parameters, n, t, the roster and the epoch), makes its own key share s_i and
b_i = -a * s_i + e_i; the joint public key is (sum_i b_i, a).

1. ``keys.begin``: every party gets the roster (party -> public identity, exchanged at
   enrolment), the parameters, n, t and the run's settings, and checks them against its
   pinned federation. It makes s_i and b_i, and answers with a signed commitment to b_i
   (SHA-256) and (t-of-n) Shamir shares of s_i, each sealed to its one recipient (X25519 +
   ChaCha20-Poly1305, signed by the dealer).
2. ``keys.reveal``: every party gets all n signed commitments and the shares sealed to it. It
   checks every signature, opens its shares, and only then reveals its b_i (signed), with its
   key-check probes (signed): a partial decryption of (0, a) with its own key share and, for
   each present set of :func:`check_subsets` that it is in, with the key it would decrypt
   with in that set (fedshield.he.partial.key_probes). The server screens every b_i natively
   (size, the same moduli for everyone, the epoch's seed, residues below their moduli) and
   checks it against the commitment its party signed before anyone had revealed one.
3. ``keys.join``: every party gets every signed b_i, checks each against its commitment, sums
   them natively into the joint public key and rebuilds it on its own crypto context. Party 0
   sends the public context (signed), every party its context's fingerprint: the server never
   builds a context itself, so it needs no openfhe. The server checks natively that party 0's
   public key is (sum b_i, a), then runs the joint test decryptions: the joint public key is
   an encryption of zero under the joint secret, so probe_i + b_i is small iff party i holds
   the key share its b_i was made with, and the probes of one present set plus sum b_i are
   small iff that set's keys sum to the joint secret (every dealt share used, each by a
   passing set or not). What the failing sets used and no passing one did names the party
   (:func:`suspects`): a party whose key share does not match its b_i, or a dealer whose
   share to a recipient is inconsistent. The set-up stops with fs.KeySetupError naming it.
4. The commit rides on each party's next train request (fedshield.fl.protocol.KeyCommit:
   the epoch and the public context's fingerprint; no message step of its own): the party
   checks both against the key it made, writes its context (its key share, mode 0600) to its
   own key file, starts a decryption budget for the new key (the probes count against it),
   takes the key, and replies with its fingerprint before it applies or trains anything. It
   refuses to apply or train while a key it made is not committed. The server keeps the
   public context; a party that commits another context, or refuses, fails the set-up
   (:meth:`KeySetup.check_commit`); one that did not answer gets the commit again.

The rogue key: a party that saw the others' b_i before choosing its own could pick
b = -sum_others b_j - a * s' + e, a joint key of which it alone knows the secret s'. No b_i is
revealed before every party has received all n signed commitments (step 2 refuses fewer), and
every party (and the server) refuses a revealed b_i that is not the one committed to, naming
its party. A new epoch makes a new seed, hence a new a and fresh key shares: nothing revealed
in one epoch helps in another.

Shared keys (the paper's mode), two steps and the commit: at ``keys.begin`` party 0 also makes the key pair
and seals its residues to every other party; ``keys.shared-take``: every other party rebuilds
the client context on its own crypto context, keeps it only if its fingerprint is that of the
public context party 0 signed and its secret key decrypts that public key to zero
(fedshield.he.keys.check_key_pair: a local test decryption, so a party holding another key than
party 0's is named at once), and answers with the fingerprint; then the commit.

No party hands another machine's bytes to OpenFHE: each makes its crypto context from the
parameters of ``keys.begin``, and b_i, the joint public key and the shared key travel as
residues (docs/WIRE.md, "Key set-up messages") that are checked natively and rebuilt on the
receiver's own key template. The server never loads openfhe.

Blame falls on the sender. A party that refuses a message another party signed or sealed
(malformed, for other parameters, moduli or seed, residues out of range, not what its sender
committed to) raises fs.KeyMessageRefused naming that sender (across Flower:
:func:`refusal_fields` in the site worker's reply), and :class:`KeySetup` fails naming the
sender, not the party that refused. A signature that does not verify at a party means the
relay altered the message: the party says so and nobody is blamed.

Nothing here writes key material anywhere but the party's own key file.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from ..base.errors import (AuthenticationError, FedShieldError, KeyMaterialError,
                           KeyMessageRefused, KeySetupError, ParameterError)
from ..he import CKKSParams, Context, keygen_shared, load_context
from ..he import threshold as th
from ..he.budget import DecryptionBudget
from ..he.frames import DIGEST, frame, unframe
from ..he.keys import check_head, check_size, open_shared_key_material, shared_key_material
from ..he.partial import key_probes, probes_match
from ..he.wipe import wipe
from ..trust.federation import Federation, RunSettings
from ..trust.identity import Identity, PublicIdentity, sign_blob, verify_blob
from .protocol import KeyCommit

log = logging.getLogger("fedshield")

Request = tuple[dict, list]
Ask = Callable[[str, Mapping[int, Request]], Mapping[int, object]]

PROBES_MAGIC = b"FSHLDKPR"     # a party's key-check probes (public)
PROBES_VERSION = 1
COMMITMENT_BYTES = 32
_SHARE_AAD = b"fedshield-key-share-v2"
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
    each party's own share once its probe matched its b_i)."""
    cleared = set(known_good).union(*[used_material(s, n, t) for s, ok in results.items() if ok])
    failing = set().union(*[used_material(s, n, t) for s, ok in results.items() if not ok])
    return failing - cleared


def describe(material: Iterable[tuple]) -> str:
    """The parties behind suspect material, in words."""
    material = sorted(material)
    parts = [f"party {m[1]} (its key share does not match its b_i)"
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


def epoch_seed(params: CKKSParams, n: int, t: int, roster: Mapping[int, PublicIdentity],
               server: PublicIdentity, epoch: int) -> bytes:
    """The public seed of key epoch ``epoch``'s common a (fedshield.he.threshold.keygen_seed
    over the roster's and the server's identities): what keys.begin carries determines it."""
    return th.keygen_seed(params, n, t, [roster[p].to_bytes() for p in range(n)]
                          + [server.to_bytes()], epoch)


def roster_fields(roster: Mapping[int, PublicIdentity]) -> list[str]:
    return [roster[p].to_bytes().hex() for p in range(len(roster))]


def roster_from(hexes) -> dict[int, PublicIdentity]:
    if not isinstance(hexes, (list, tuple)) or not all(isinstance(h, str) for h in hexes):
        raise KeySetupError(f"malformed roster: {hexes!r:.80}")
    try:
        return {p: PublicIdentity.from_bytes(bytes.fromhex(h)) for p, h in enumerate(hexes)}
    except (ValueError, FedShieldError) as exc:
        raise KeySetupError(f"malformed roster: {exc}") from exc


def share_aad(seed: bytes, epoch: int, sender: int, recipient: int) -> bytes:
    """The associated data a Shamir share of a key share is sealed under (docs/WIRE.md)."""
    return (_SHARE_AAD + seed + epoch.to_bytes(8, "little") + sender.to_bytes(4, "little")
            + recipient.to_bytes(4, "little"))


def client_aad(public_fp: bytes, epoch: int, recipient: int) -> bytes:
    """The associated data the shared key is sealed under, to each client (docs/WIRE.md)."""
    return _CLIENT_AAD + public_fp + epoch.to_bytes(8, "little") + recipient.to_bytes(4, "little")


# -- the key-check probes on the wire ------------------------------------------------------------
def probe_sets(party: int, n: int, t: int) -> list[tuple[int, ...]]:
    """The present sets a party sends probes for: those of :func:`check_subsets` it is in
    (the first is everyone: its own key share alone)."""
    return [s for s in check_subsets(n, t) if party in s]


def probes_message(seed: bytes, party: int, n: int, t: int, moduli, probes: list) -> bytes:
    """A party's probes, one per present set of :func:`probe_sets` (public; sign it)."""
    meta = {"party": party, "n_parties": n, "threshold": t, "seed": seed.hex(),
            "moduli": [int(q) for q in moduli],
            "present": [list(s) for s in probe_sets(party, n, t)]}
    return frame(PROBES_MAGIC, meta, [bytes(p) for p in probes], version=PROBES_VERSION)


def read_probes(message, params: CKKSParams, n: int, t: int, seed: bytes, party: int,
                moduli) -> dict[tuple[int, ...], bytes]:
    """Party ``party``'s probes checked natively against the federation (exact head, exact
    sizes for ``moduli``, every residue below its modulus): present set -> packed probe.
    KeyMaterialError for anything else (no openfhe: the server reads them)."""
    what = "key-check probes"
    sets = probe_sets(party, n, t)
    moduli = [int(q) for q in moduli]
    size = th.packed_size(params.ring_dim, moduli, what)
    check_size(message, len(PROBES_MAGIC) + 6 + (1 << 16) + len(sets) * (size + 64) + DIGEST,
               what)
    meta, sections = unframe(message, PROBES_MAGIC, what, KeyMaterialError,
                             version=PROBES_VERSION)
    want = {"party": party, "n_parties": n, "threshold": t, "seed": seed.hex(),
            "moduli": moduli, "present": [list(s) for s in sets],
            "sizes": [size] * len(sets)}
    check_head(meta, want, set(), what)
    for probe in sections:
        th.check_packed(probe, params.ring_dim, moduli, what)
    return dict(zip(sets, sections))


def _sections(sections: list, count: int, op: str, party: int) -> list:
    if len(sections) != count:
        raise KeySetupError(f"party {party}: {op} request with {len(sections)} sections, "
                            f"expected {count}")
    return list(sections)


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
        self._seed = b""                            # the epoch's public seed of a
        self._commitments: Optional[list[bytes]] = None  # every party's, once all are in
        self._revealed = b""                        # its own contribution message
        self._ctx: Optional[Context] = None        # made this epoch, not yet committed
        self._check_decryptions = 0                 # charged to the new key's budget at commit
        self.committed: Optional[Context] = None    # the context of the last committed epoch
        self.committed_epoch: Optional[int] = None

    def __repr__(self) -> str:
        return f"KeyHolder(party {self.party_id}, epoch {self.epoch})"

    @property
    def awaiting_commit(self) -> bool:
        """A key set-up began an epoch that this party has not committed: until it does, it
        applies and trains nothing (its next train request must carry the commit)."""
        return self.epoch is not None and self.epoch != self.committed_epoch

    @property
    def budget_file(self) -> Path:
        return self.key_file.with_name(self.key_file.name + ".budget")

    def handle(self, op: str, fields: Mapping, sections: list) -> Request:
        """Answers one key set-up operation (see the module docstring)."""
        ops = {"keys.begin": self._begin, "keys.reveal": self._reveal, "keys.join": self._join,
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
        self._commitments = None
        self._check_decryptions = 0
        self._seed = epoch_seed(params, n, t, roster, server, epoch)
        log.info("key set-up, epoch %d: party %d, %s keys; identity fingerprints (compare them "
                 "out of band): parties %s, server %s", epoch, self.party_id, self._mode,
                 {p: r.fingerprint() for p, r in roster.items()}, server.fingerprint())
        return self._make()

    def _make(self) -> Request:
        """This epoch's own key material, made at keys.begin once the roster is accepted:
        threshold keys: the key share, the commitment to b_i (signed) and the Shamir shares
        sealed to their recipients; shared keys: party 0's key pair, sealed to every other
        party."""
        if self._mode == "shared":
            return self._shared_make() if self.party_id == 0 else ({}, [])
        self._state = th.start_keygen(self._params, self._n, self._t, self.party_id,
                                      self._seed)
        commitment = self._state.commitment
        dealt = th.deal_key_shares(self._state)
        to = sorted(dealt)
        sealed = [self.roster[r].seal(dealt[r], self.identity,
                                      share_aad(self._seed, self.epoch, self.party_id, r))
                  for r in to]
        return {"to": to}, [commitment, self._sign("keygen-commit", commitment), *sealed]

    # -- threshold keys ---------------------------------------------------------------------------
    def _require_state(self) -> th.KeygenState:
        if self._state is None:
            raise KeySetupError(f"party {self.party_id} made no key share in epoch {self.epoch}")
        return self._state

    def _reveal(self, fields: Mapping, sections: list) -> Request:
        """Every party's signed commitment (all n, before anything is revealed) and the shares
        sealed to this party -> this party's b_i and its probes, signed."""
        state = self._require_state()
        if self._commitments is not None:
            raise KeySetupError(f"party {self.party_id} has revealed its key contribution of "
                                f"epoch {self.epoch} already")
        n = self._n
        if len(sections) < 2 * n:
            raise KeySetupError(f"party {self.party_id}: keys.reveal needs the commitments of "
                                f"all {n} parties")
        commitments = []
        for party in range(n):
            blob, record = bytes(sections[2 * party]), bytes(sections[2 * party + 1])
            self._verify("keygen-commit", record, blob, party)
            with self._from(party, "commitment"):
                if len(blob) != COMMITMENT_BYTES:
                    raise KeyMaterialError(f"a commitment of {len(blob)} bytes, expected "
                                           f"{COMMITMENT_BYTES}")
            commitments.append(blob)
        if commitments[self.party_id] != state.commitment:
            raise KeySetupError(f"party {self.party_id}: the commitment relayed as its own is "
                                "not the one it made")
        senders, sealed = fields.get("from"), sections[2 * n:]
        want = [] if self._t == n else [p for p in range(n) if p != self.party_id]
        if senders != want or len(sealed) != len(want):
            raise KeySetupError(f"party {self.party_id}: key shares from {senders!r:.80}, "
                                f"expected one from each of {want}")
        for sender, blob in zip(senders, sealed):
            opened = self._open(blob, sender, share_aad(self._seed, self.epoch, sender,
                                                         self.party_id))
            try:
                with self._from(sender, "key share"):
                    state = th.accept_key_shares(state, [opened], sender=sender)
            finally:
                wipe(bytearray(opened))
        self._state, self._commitments = state, commitments
        probes = key_probes(state.own_context, probe_sets(self.party_id, n, self._t))
        self._check_decryptions += len(probes)
        message = th.contribution_message(state)
        self._revealed = message
        checks = probes_message(self._seed, self.party_id, n, self._t, state.moduli, probes)
        return {}, [message, self._sign("keygen", message), checks,
                    self._sign("keygen-probe", checks)]

    def _join(self, fields: Mapping, sections: list) -> Request:
        """Every party's signed b_i -> the joint key (each b_i checked against the commitment
        its party signed before any was revealed); party 0 also sends the public context."""
        state = self._require_state()
        if self._commitments is None:
            raise KeySetupError(f"party {self.party_id} has not seen every commitment of epoch "
                                f"{self.epoch}: it joins no key")
        n = self._n
        _sections(sections, 2 * n, "keys.join", self.party_id)
        contributions = []
        for party in range(n):
            message, record = bytes(sections[2 * party]), bytes(sections[2 * party + 1])
            self._verify("keygen", record, message, party)
            if party == self.party_id:  # its own, as it revealed it
                if message != self._revealed:
                    raise KeySetupError(f"party {self.party_id}: the contribution relayed as "
                                        "its own is not the one it revealed")
                contributions.append(state.contribution)
                continue
            with self._from(party, "key contribution"):
                got = th.read_contribution(message, state.params, n, self._t, self._seed,
                                           state.moduli)
                if got.sender != party:
                    raise KeyMaterialError(f"a contribution that names party {got.sender}")
                if th.commitment(self._seed, party, got.packed) != self._commitments[party]:
                    raise KeyMaterialError("its b_i is not the one it committed to before the "
                                           "others were revealed (a rogue key?)")
            contributions.append(got.packed)
        try:
            ctx = th.finish_keygen(state, contributions)
        except KeyMaterialError as exc:
            raise KeySetupError(f"party {self.party_id}: {exc}", culprit=self.party_id) from exc
        self._state = None
        self._ctx = ctx
        # the server never builds a context itself (it does not load openfhe): party 0 sends
        # the public one, and every party the fingerprint of its own, which must agree
        public = []
        if self.party_id == 0:
            blob = ctx.public().to_bytes()
            public = [blob, self._sign("public-context", blob)]
        return {"context-fp": ctx.fingerprint.hex()}, public

    def _require_ctx(self) -> Context:
        if self._ctx is None:
            raise KeySetupError(f"party {self.party_id} holds no key of epoch {self.epoch}")
        return self._ctx

    # -- shared keys ------------------------------------------------------------------------------
    def _shared_make(self) -> Request:
        ctx = keygen_shared(self._params).client_context()
        self._ctx = ctx
        # residues only: the recipients rebuild the key on crypto contexts of their own
        secret = bytearray(shared_key_material(ctx))
        public = ctx.public().to_bytes()
        to = [p for p in range(self._n) if p != 0]
        try:
            sealed = [self.roster[r].seal(secret, self.identity,
                                          client_aad(ctx.fingerprint, self.epoch, r))
                      for r in to]
        finally:
            wipe(secret)
        return {"to": to}, [public, self._sign("public-context", public), *sealed]

    def _shared_take(self, fields: Mapping, sections: list) -> Request:
        if self.party_id == 0:
            raise KeySetupError("party 0 made the shared key: it takes none")
        public, record, sealed = _sections(sections, 3, "keys.shared-take", self.party_id)
        self._verify("public-context", record, public, 0)
        with self._from(0, "public context"):
            # parsed natively, no openfhe: only its fingerprint is used
            public_ctx = load_context(public)
            if public_ctx.has_secret_key or public_ctx.params != self._params.for_keys("shared"):
                raise KeyMaterialError("the public context holds a secret key or other "
                                       "parameters than this party's")
        secret = bytearray(self._open(sealed, 0, client_aad(public_ctx.fingerprint, self.epoch,
                                                              self.party_id)))
        try:
            with self._from(0, "shared key"):
                # rebuilt here, and its secret key checked against its public key
                ctx = open_shared_key_material(secret, self._params.for_keys("shared"))
                if ctx.fingerprint != public_ctx.fingerprint:
                    raise KeyMaterialError("the sealed key is not the signed public context's")
        finally:
            wipe(secret)
        self._ctx = ctx
        return {"context-fp": ctx.fingerprint.hex()}, []

    def commit(self, commit: KeyCommit) -> str:
        """The key set-up's last step (it rides on the party's next train request): writes the
        key this party made in ``commit.epoch`` to its key file and starts its decryption
        budget; returns its fingerprint (hex). Committing the committed epoch again (a reply
        the server did not get) only returns it."""
        if commit.epoch == self.committed_epoch and self.committed is not None \
                and commit.context_fp == self.committed.fingerprint.hex():
            return commit.context_fp
        self._expect_epoch({"epoch": commit.epoch})
        ctx = self._require_ctx()
        if commit.context_fp != ctx.fingerprint.hex():
            raise KeySetupError(f"party {self.party_id}: the server commits context "
                                f"{commit.context_fp[:12]}..., this party made "
                                f"{ctx.fingerprint.hex()[:12]}...")
        self.key_file.parent.mkdir(parents=True, exist_ok=True)
        ctx.save(self.key_file)
        budget = DecryptionBudget(self.budget_file, 2 ** ctx.params.flood_log_queries)
        if budget.context_fp != ctx.fingerprint:
            budget.reset_for(ctx.fingerprint)
        if self._check_decryptions:  # the key check's decryptions count for the new key
            budget.charge(ctx.fingerprint, self._check_decryptions)
        self._ctx = None
        self.committed, self.committed_epoch = ctx, self.epoch
        log.info("key set-up, epoch %d: party %d wrote its key to %s", self.epoch,
                 self.party_id, self.key_file)
        return ctx.fingerprint.hex()


# -- the server's half -------------------------------------------------------------------------
@dataclass
class KeySetupResult:
    context: Context               # the public context of the new epoch
    epoch: int
    subsets_checked: int
    seconds: float
    message_steps: int             # the rounds of messages it took (each to all parties at once)

    @property
    def commit(self) -> KeyCommit:
        """Its last step, which rides on every party's next train request."""
        return KeyCommit(epoch=self.epoch, context_fp=self.context.fingerprint.hex())


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
        self.steps = 0
        if sorted(self.roster) != list(range(self.n)):
            raise KeySetupError(f"the roster must name parties 0..n-1, got {sorted(roster)}")

    def _all(self, op: str, requests: Mapping[int, Request]) -> dict[int, Request]:
        self.steps += 1
        replies = self.ask(op, requests)
        return {party: self._answer(op, party, replies.get(party)) for party in requests}

    def _answer(self, op: str, party: int, reply):
        """A party's reply to ``op``, or the KeySetupError that names who failed it."""
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
        return reply

    def check_commit(self, result: KeySetupResult, party: int, reply) -> None:
        """A party's answer to the commit of ``result`` (the fingerprint it committed, or the
        exception it refused with), checked as the set-up's other steps are: KeySetupError
        naming who failed it unless it committed the public context."""
        committed = self._answer("the commit", party, reply)
        if committed != result.context.fingerprint.hex():
            raise KeySetupError(f"party {party} committed another context", culprit=party)

    def _verified(self, domain: str, party: int, blob, record, epoch: int) -> None:
        try:
            verify_blob(self.roster[party], domain, record, blob, party_id=party, round=epoch)
        except FedShieldError as exc:
            raise KeySetupError(f"party {party}'s {domain} message: {exc}",
                                culprit=party) from exc

    def run(self, epoch: int) -> KeySetupResult:
        """Sets up and checks the keys of ``epoch``; KeySetupError naming the party if not.
        Each party then commits them with its next train request (``result.commit``, checked
        by :meth:`check_commit`)."""
        start = time.perf_counter()
        self.steps = 0
        begin = {"epoch": epoch, "mode": self.mode, "params": self.params.to_json(),
                 "n": self.n, "t": self.t, "roster": roster_fields(self.roster),
                 "server": self.server.to_bytes().hex(),
                 "settings": self.settings.to_json()}
        made = self._all("keys.begin", {p: (begin, []) for p in range(self.n)})
        e = {"epoch": epoch}
        if self.mode == "threshold":
            public, checked = self._threshold(made, e, epoch)
        else:
            public, checked = self._shared(made, e, epoch), 1
        seconds = time.perf_counter() - start
        log.info("key set-up, epoch %d: %s keys of %d parties (t=%d) set up and checked over "
                 "%d present sets in %d message steps, %.1f s; context %s...", epoch,
                 self.mode, self.n, self.t, checked, self.steps, seconds,
                 public.fingerprint.hex()[:12])
        return KeySetupResult(public, epoch, checked, seconds, self.steps)

    # -- threshold keys ---------------------------------------------------------------------------
    def _threshold(self, made: dict, e: dict, epoch: int) -> tuple[Context, int]:
        n, t = self.n, self.t
        seed = epoch_seed(self.params, n, t, self.roster, self.server, epoch)
        commitments: list[bytes] = []
        inbox: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(n)}
        for party in range(n):
            fields, out = made[party]
            if len(out) < 2:
                raise KeySetupError(f"party {party} sent no commitment", culprit=party)
            blob, record = bytes(out[0]), bytes(out[1])
            self._verified("keygen-commit", party, blob, record, epoch)
            if len(blob) != COMMITMENT_BYTES:
                raise KeySetupError(f"party {party}'s commitment is {len(blob)} bytes",
                                    culprit=party)
            commitments += [blob, record]
            to, sealed = fields.get("to"), out[2:]
            want = [] if t == n else [r for r in range(n) if r != party]
            if to != want or len(sealed) != len(want):
                raise KeySetupError(f"party {party} dealt key shares to {to!r:.80}, expected "
                                    f"{want}", culprit=party)
            for recipient, box in zip(to, sealed):
                inbox[recipient].append((party, bytes(box)))
        # nobody reveals b_i before every commitment is in: a rogue key needs the others' b_j
        revealed = self._all("keys.reveal", {
            p: ({**e, "from": [s for s, _ in inbox[p]]}, commitments + [b for _, b in inbox[p]])
            for p in range(n)})
        signed: list[bytes] = []
        contributions: list[bytes] = []
        probes: dict[int, dict] = {}
        claimed: list[tuple] = []
        for party in range(n):
            out = revealed[party][1]
            if len(out) != 4:
                raise KeySetupError(f"party {party}'s key contribution is malformed",
                                    culprit=party)
            message, record, checks, check_record = map(bytes, out)
            self._verified("keygen", party, message, record, epoch)
            self._verified("keygen-probe", party, checks, check_record, epoch)
            got, probes[party] = self.screen_contribution(party, message, checks,
                                                          commitments[2 * party], seed)
            contributions.append(got.packed)
            claimed.append(got.moduli)
            signed += [message, record]
        # moduli are checked by every party against its own crypto context at keys.join (a
        # party refuses another's for other moduli, naming it), then against the public context
        joined = self._all("keys.join", {p: (e, signed) for p in range(n)})
        fields, head = joined[0]
        if len(head) != 2:
            raise KeySetupError("party 0 sent no public context", culprit=0)
        public = self.screen_public_context(0, bytes(head[0]), bytes(head[1]), epoch)
        for party, moduli in enumerate(claimed):
            if moduli != public.moduli:
                raise KeySetupError(f"party {party}'s contribution is for other tower moduli "
                                    "than the public context's", culprit=party)
        try:
            th.check_joint_key(public, contributions, seed)
        except FedShieldError as exc:
            raise KeyMessageRefused(f"party 0's public context is not the joint key: {exc}",
                                    sender=0) from exc
        for party, (fields, _) in joined.items():
            if fields.get("context-fp") != public.fingerprint.hex():
                raise KeySetupError(f"party {party} joined another key than the sum of the "
                                    "contributions", culprit=party)
        return public, self._check(public, contributions, probes, epoch)

    def screen_contribution(self, party: int, message: bytes, checks: bytes,
                            commitment: bytes, seed: bytes) -> tuple[th.Contribution, dict]:
        """Party ``party``'s b_i and probes as the server screens them before relaying
        anything (natively, no openfhe): this epoch's seed (so the common a), exact sizes,
        residues below the moduli it claims, the b_i it committed to. KeyMessageRefused
        naming ``party`` otherwise."""
        params = th.resolve(self.params, self.n)
        try:
            got = th.read_contribution(message, params, self.n, self.t, seed)
            if got.sender != party:
                raise KeyMaterialError(f"the contribution names party {got.sender}")
            if th.commitment(seed, party, got.packed) != commitment:
                raise KeyMaterialError("its b_i is not the one it committed to before the "
                                       "others were revealed (a rogue key?)")
            probes = read_probes(checks, params, self.n, self.t, seed, party, got.moduli)
        except FedShieldError as exc:
            raise KeyMessageRefused(f"party {party}'s key contribution is refused: {exc}",
                                    sender=party) from exc
        return got, probes

    def _check(self, public: Context, contributions: list[bytes], probes: dict,
               epoch: int) -> int:
        """The joint test decryptions, natively: the joint public key decrypts to zero with
        each party's own key share against its b_i, and with the keys of each present set of
        :func:`check_subsets` against the joint b."""
        n, t = self.n, self.t
        liars = [p for p in range(n)
                 if not probes_match(public, [probes[p][tuple(range(n))]], contributions[p])]
        if liars:
            raise KeySetupError(f"key set-up, epoch {epoch}: {describe(('own', p) for p in liars)}",
                                culprit=liars[0] if len(liars) == 1 else None)
        b = th.joint_b(contributions, public.params.ring_dim, public.moduli)
        subsets = check_subsets(n, t)
        results = {s: probes_match(public, [probes[p][s] for p in s], b) for s in subsets}
        if not all(results.values()):
            failing = [s for s, ok in results.items() if not ok]
            named = suspects(results, n, t, {("own", p) for p in range(n)})
            who = describe(named) if named else f"the parties of {failing}"
            dealers = {m[1] for m in named}
            raise KeySetupError(f"key set-up, epoch {epoch}: the joint test decryption failed "
                                f"with present sets {failing}: {who}",
                                culprit=dealers.pop() if len(dealers) == 1 else None)
        return len(subsets)

    # -- shared keys ------------------------------------------------------------------------------
    def _shared(self, made: dict, e: dict, epoch: int) -> Context:
        fields, out = made[0]
        to = fields.get("to")
        if to != list(range(1, self.n)) or len(out) != 2 + len(to):
            raise KeySetupError("party 0's shared key message is malformed", culprit=0)
        public_bytes, record = bytes(out[0]), bytes(out[1])
        public = self.screen_public_context(0, public_bytes, record, epoch)
        taken = self._all("keys.shared-take", {r: (e, [public_bytes, record, bytes(blob)])
                                               for r, blob in zip(to, out[2:])})
        for party, (got, _) in taken.items():
            if got.get("context-fp") != public.fingerprint.hex():
                raise KeySetupError(f"party {party} took another key than party 0's",
                                    culprit=party)
        return public

    def screen_public_context(self, party: int, blob: bytes, record: bytes, epoch: int) -> Context:
        """The public context a party signed: loaded without openfhe, and holding no secret."""
        self._verified("public-context", party, blob, record, epoch)
        try:
            public = load_context(blob)
        except FedShieldError as exc:
            raise KeyMessageRefused(f"party {party}'s public context does not load: {exc}",
                                    sender=party) from exc
        if public.has_secret_key or public.is_party or public.params != self.params:
            raise KeyMessageRefused(f"party {party} sent secret key material or other "
                                    "parameters as the public context", sender=party)
        return public


__all__ = ["COMMITMENT_BYTES", "KeyCommit", "KeyHolder", "KeySetup", "KeySetupResult", "check_subsets",
           "client_aad", "epoch_seed", "probe_sets", "probes_message", "read_probes",
           "share_aad", "suspects", "used_material"]
