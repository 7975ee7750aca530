"""The federation file: who is in the federation and the least security every site accepts,
decided by the sites, co-signed by every member and pinned by each site.

A malicious server must not choose the roster (server-made identities would read a site's
update) nor the security settings. So the roster, the server's identity, the key mode, n, t,
the CKKS parameters and a *security floor* are written down out of band
(``fedshield federation init | add | sign | show``), every member and the server sign the
whole body, and each site keeps the file in its own config. A site's key holder refuses a key
set-up whose roster, server, parameters or settings differ from it
(:meth:`Federation.check_key_setup`), and its guard holds the floor whatever a run config asks
(:meth:`Floor.guard_settings`).

File format (JSON, UTF-8)::

    {"format": "fedshield-federation-v1",
     "body": {"name", "keys", "n", "t", "params": {CKKSParams}, "floor": {Floor},
              "server": {"name", "identity": hex}, "members": [{"name", "identity": hex}, ...]},
     "signatures": {"server" | "<party id>": hex Ed25519 signature}}

A member's party id is its index in ``members``. Each signature is over the body's canonical
JSON (sorted keys, no spaces) in the signature domain ``federation`` with the signer's identity
key (fedshield.trust.identity), so a file edited after signing no longer verifies; changing the
body drops every signature.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping, Optional

from ..base.atomic import write_atomic
from ..config import RunConfig
from ..base.errors import AuthenticationError, FederationError, FedShieldError, KeySetupError
from ..he import CKKSParams
from .identity import Identity, PublicIdentity
from .quorum import min_updates_for
from ..base.validate import is_int

log = logging.getLogger("fedshield")

FORMAT = "fedshield-federation-v1"
DOMAIN = "federation"
SERVER = "server"           # the server's key in "signatures"
MAX_FILE = 1 << 20          # a federation file is small: 1 MiB is thousands of members
MAX_MEMBERS = 1024
_NAME_MAX = 100


def _int(value, name: str, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise FederationError(f"{name}={value!r} must be an int in [{low}, {high}]")
    return value


def _name(value, what: str) -> str:
    if not (isinstance(value, str) and 0 < len(value) <= _NAME_MAX and value.isprintable()):
        raise FederationError(f"{what} name {value!r} must be 1-{_NAME_MAX} printable "
                              "characters")
    return value


@dataclass(frozen=True)
class Floor:
    """The least security every site of the federation accepts, whatever a run config asks."""

    verify_aggregates: bool = field(default=True, metadata={
        "help": "key holders recompute every aggregate from the signed updates before "
                "decrypting (a malicious server cannot present one update as a sum)"})
    quorum: int = field(default=2, metadata={
        "help": "fewest updates a round may aggregate (the run's quorum may be higher)"})
    min_parties: int = field(default=2, metadata={
        "help": "fewest distinct parties whose updates an aggregate must sum before any key "
                "holder decrypts it"})
    flood_bits: int = field(default=0, metadata={
        "help": "least statistical security (bits) of the noise flooding every decryption "
                "that leaves a key holder (0: none required)"})
    decryption_budget: int = field(default=20, metadata={
        "help": "most log2 ciphertexts one key may decrypt before the keys must be rotated"})

    def __post_init__(self) -> None:
        if not isinstance(self.verify_aggregates, bool):
            raise FederationError(f"floor verify_aggregates={self.verify_aggregates!r} must be "
                                  "true or false")
        _int(self.quorum, "floor quorum", 1, MAX_MEMBERS)
        _int(self.min_parties, "floor min_parties", 1, MAX_MEMBERS)
        _int(self.flood_bits, "floor flood_bits", 0, 128)
        _int(self.decryption_budget, "floor decryption_budget", 0, 40)

    @classmethod
    def from_dict(cls, data) -> "Floor":
        if not isinstance(data, Mapping):
            raise FederationError(f"the floor must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FederationError(f"unknown floor settings {unknown}; known: {sorted(known)}")
        missing = sorted(known - set(data))
        if missing:
            raise FederationError(f"the floor lacks {missing}")
        return cls(**data)

    def check_settings(self, settings: "RunSettings") -> None:
        """KeySetupError naming every setting of the run that is below this floor."""
        low = []
        if self.verify_aggregates and not settings.verify_aggregates:
            low.append("verify_aggregates=false (the floor requires true)")
        if settings.quorum < self.quorum:
            low.append(f"quorum={settings.quorum} (the floor is {self.quorum})")
        if settings.quorum < self.min_parties:
            low.append(f"quorum={settings.quorum} is below min_parties={self.min_parties}, the "
                       "fewest parties per aggregate this site decrypts")
        if settings.flood_bits < self.flood_bits:
            low.append(f"flood_bits={settings.flood_bits} (the floor is {self.flood_bits})")
        if settings.decryption_budget > self.decryption_budget:
            low.append(f"decryption_budget={settings.decryption_budget} (the floor allows at "
                       f"most {self.decryption_budget})")
        if low:
            raise KeySetupError("the run's settings are below this site's pinned security "
                                "floor: " + "; ".join(low))

    def guard_settings(self, settings: "RunSettings") -> tuple[int, bool]:
        """(fewest parties per aggregate, verify) of a key holder's guard: the run's, raised to
        the floor."""
        return (max(settings.quorum, self.quorum, self.min_parties),
                settings.verify_aggregates or self.verify_aggregates)


@dataclass(frozen=True)
class RunSettings:
    """What a run asks of the key holders (the server sends it with the key set-up)."""

    verify_aggregates: bool
    quorum: int
    flood_bits: int
    decryption_budget: int

    @classmethod
    def of(cls, params: CKKSParams, verify: bool, quorum: int) -> "RunSettings":
        return cls(bool(verify), int(quorum), int(params.flood_bits),
                   int(params.flood_log_queries))

    def to_json(self) -> str:
        """As a key set-up field (transports carry scalars and strings)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "RunSettings":
        try:
            settings = cls(**json.loads(str(text)))
        except (TypeError, ValueError, RecursionError) as exc:
            raise KeySetupError(f"malformed run settings in the key set-up: {exc}") from None
        if not isinstance(settings.verify_aggregates, bool) or not all(
                is_int(v)
                for v in (settings.quorum, settings.flood_bits, settings.decryption_budget)):
            raise KeySetupError("malformed run settings in the key set-up")
        return settings


@dataclass(frozen=True)
class Member:
    name: str
    identity: PublicIdentity

    def to_dict(self) -> dict:
        return {"name": self.name, "identity": self.identity.to_bytes().hex()}

    @classmethod
    def from_dict(cls, data, what: str) -> "Member":
        if not isinstance(data, Mapping) or set(data) != {"name", "identity"}:
            raise FederationError(f"{what} must be an object with name and identity")
        try:
            identity = PublicIdentity.from_bytes(bytes.fromhex(str(data["identity"])))
        except (ValueError, FedShieldError) as exc:
            raise FederationError(f"{what}'s identity is not a public identity: {exc}") from None
        return cls(_name(data["name"], what), identity)


@dataclass(frozen=True)
class Federation:
    """A federation file's content (module docstring). Frozen: every change is a new one."""

    name: str
    keys: str
    n: int
    t: int
    params: CKKSParams
    floor: Floor
    server: Member
    members: tuple[Member, ...] = ()
    signatures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _name(self.name, "the federation's")
        if self.keys not in ("shared", "threshold"):
            raise FederationError(f"keys={self.keys!r} must be 'shared' or 'threshold'")
        _int(self.n, "n", 2 if self.keys == "threshold" else 1, MAX_MEMBERS)
        if self.keys == "threshold":
            if not self.n // 2 < _int(self.t, "t", 1, self.n) <= self.n:
                raise FederationError(f"t={self.t} must be more than half of the {self.n} "
                                      f"members and at most {self.n}")
        elif self.t != self.n:
            raise FederationError(f"shared keys: t={self.t} must equal n={self.n}")
        if not isinstance(self.params, CKKSParams):
            raise FederationError("params must be a CKKSParams")
        if self.floor.quorum > self.n or self.floor.min_parties > self.n:
            raise FederationError(f"the floor's quorum={self.floor.quorum} and min_parties="
                                  f"{self.floor.min_parties} must be at most n={self.n}")
        if (self.params.flood_bits < self.floor.flood_bits
                or self.params.flood_log_queries > self.floor.decryption_budget):
            raise FederationError(
                f"the pinned parameters (flood_bits={self.params.flood_bits}, decryption budget "
                f"2^{self.params.flood_log_queries}) are below the federation's own floor "
                f"(flood_bits={self.floor.flood_bits}, budget at most "
                f"2^{self.floor.decryption_budget})")
        if len(self.members) > self.n:
            raise FederationError(f"{len(self.members)} members, n={self.n}")
        seen = {self.server.identity}
        for party, member in enumerate(self.members):
            if member.identity in seen:
                raise FederationError(f"member {party} ({member.name!r}) has the identity of "
                                      "another member or of the server")
            seen.add(member.identity)
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "signatures", dict(self.signatures))

    # -- making one ------------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, keys: str, n: int, t: int, params: CKKSParams, floor: Floor,
               server_name: str, server: PublicIdentity) -> "Federation":
        return cls(name, keys, n, t, params, floor, Member(server_name, server))

    def with_member(self, name: str, identity: PublicIdentity) -> "Federation":
        """This federation with one more member (the next party id); signatures are dropped,
        since they signed another body."""
        if len(self.members) >= self.n:
            raise FederationError(f"the federation already has its {self.n} members")
        if self.signatures:
            log.warning("federation %s: adding %r drops the %d signatures made so far",
                        self.name, name, len(self.signatures))
        return replace(self, members=self.members + (Member(_name(name, "the member's"),
                                                            identity),), signatures={})

    def signed_by(self, identity: Identity) -> "Federation":
        """This federation with ``identity``'s signature (a member's or the server's)."""
        if len(self.members) != self.n:
            raise FederationError(f"the federation has {len(self.members)} of its {self.n} "
                                  "members: add them all before signing")
        role = self.role_of(identity.public)
        if role is None:
            raise FederationError(f"identity {identity.public.fingerprint()} is neither a "
                                  "member nor the server of this federation")
        return replace(self, signatures={**self.signatures,
                                         role: identity.sign(DOMAIN, self.body_bytes()).hex()})

    # -- reading it ------------------------------------------------------------------------------
    def role_of(self, identity: PublicIdentity) -> Optional[str]:
        """"server", a party id as a string, or None."""
        if identity == self.server.identity:
            return SERVER
        for party, member in enumerate(self.members):
            if member.identity == identity:
                return str(party)
        return None

    @property
    def roster(self) -> dict[int, PublicIdentity]:
        return {p: m.identity for p, m in enumerate(self.members)}

    def body(self) -> dict:
        return {"name": self.name, "keys": self.keys, "n": self.n, "t": self.t,
                "params": json.loads(self.params.to_json()), "floor": asdict(self.floor),
                "server": self.server.to_dict(),
                "members": [m.to_dict() for m in self.members]}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def signers(self) -> dict[str, bool]:
        """Each role (the server, then every party id) -> whether its valid signature is here."""
        body = self.body_bytes()
        out = {}
        for role, member in [(SERVER, self.server)] + [(str(p), m)
                                                       for p, m in enumerate(self.members)]:
            sig = self.signatures.get(role)
            try:
                member.identity.verify(DOMAIN, body, bytes.fromhex(str(sig)))
                out[role] = True
            except (TypeError, ValueError, AuthenticationError):
                out[role] = False
        return out

    def check_pinnable(self) -> None:
        """FederationError unless every member is there and every member and the server signed
        this very body: only such a file may be pinned."""
        if len(self.members) != self.n:
            raise FederationError(f"federation {self.name!r} has {len(self.members)} of its "
                                  f"{self.n} members")
        missing = [("the server" if r == SERVER else f"party {r} ({self.members[int(r)].name})")
                   for r, ok in self.signers().items() if not ok]
        if missing:
            raise FederationError(f"federation {self.name!r} lacks valid signatures of "
                                  f"{', '.join(missing)}: each must `fedshield federation sign` "
                                  "this file")
        stray = sorted(set(self.signatures) - {SERVER, *map(str, range(self.n))})
        if stray:
            raise FederationError(f"federation {self.name!r} holds signatures of unknown "
                                  f"signers {stray}")

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.body_bytes()).hexdigest()[:40]
        return " ".join(h[i:i + 8] for i in range(0, 40, 8))

    # -- what a site's key holder checks ---------------------------------------------------------
    def check_key_setup(self, party_id: int, own: PublicIdentity, *, mode: str, n: int, t: int,
                        params: CKKSParams, roster: Mapping[int, PublicIdentity],
                        server: PublicIdentity, settings: RunSettings) -> None:
        """KeySetupError naming whatever a key set-up asks that differs from this pinned
        federation, or lowers its floor."""
        where = f"party {party_id}"
        if self.role_of(own) != str(party_id):
            raise KeySetupError(f"{where}: this site's identity is not party {party_id} of the "
                                f"pinned federation {self.name!r}")
        differ = []
        if mode != self.keys:
            differ.append(f"keys={mode!r} (pinned: {self.keys!r})")
        if (n, t) != (self.n, self.t):
            differ.append(f"n={n}, t={t} (pinned: n={self.n}, t={self.t})")
        if params != self.params:
            # only what parameters compare on (not the request that led to them)
            names = [f.name for f in fields(params)
                     if f.compare and getattr(params, f.name) != getattr(self.params, f.name)]
            mine, theirs = asdict(self.params), asdict(params)
            differ.append("parameters " + ", ".join(f"{k}={theirs.get(k)!r} (pinned: "
                                                    f"{mine[k]!r})" for k in names))
        if server != self.server.identity:
            differ.append(f"the server's identity {server.fingerprint()} (pinned: "
                          f"{self.server.identity.fingerprint()})")
        pinned = self.roster
        wrong = sorted(p for p in set(pinned) | set(roster) if roster.get(p) != pinned.get(p))
        if wrong:
            differ.append(f"the roster's identities of parties {wrong} (not the pinned members)")
        if differ:
            raise KeySetupError(f"{where} refuses the key set-up: it differs from the pinned "
                                f"federation {self.name!r}: " + "; ".join(differ))
        self.floor.check_settings(settings)

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "body": self.body(),
                           "signatures": dict(sorted(self.signatures.items()))}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "federation file") -> "Federation":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise FederationError(f"{source} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FederationError(f"{source} is not a {FORMAT} file")
        body, sigs = data.get("body"), data.get("signatures", {})
        if not isinstance(body, dict) or not isinstance(sigs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in sigs.items()):
            raise FederationError(f"{source}: body and signatures must be objects")
        known = {"name", "keys", "n", "t", "params", "floor", "server", "members"}
        if set(body) != known:
            raise FederationError(f"{source}: the body must hold exactly {sorted(known)}")
        members = body["members"]
        if not isinstance(members, list) or len(members) > MAX_MEMBERS:
            raise FederationError(f"{source}: members must be a list of at most "
                                  f"{MAX_MEMBERS}")
        try:
            params = CKKSParams.from_dict(body["params"])
        except (FedShieldError, TypeError, KeyError, ValueError) as exc:
            raise FederationError(f"{source}: its params are not CKKS parameters: {exc}"
                                  ) from None
        try:
            fed = cls(body["name"], body["keys"], body["n"], body["t"], params,
                      Floor.from_dict(body["floor"]),
                      Member.from_dict(body["server"], "the server"),
                      tuple(Member.from_dict(m, f"member {i}") for i, m in enumerate(members)),
                      sigs)
        except TypeError as exc:
            raise FederationError(f"{source}: {exc}") from None
        return fed   # its signatures cover the canonical body: any edit that matters shows

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Federation":
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_FILE + 1)
        except OSError as exc:
            raise FederationError(f"cannot read federation file {path}: "
                                  f"{exc.strerror or exc}") from None
        if len(raw) > MAX_FILE:
            raise FederationError(f"federation file {path} is over {MAX_FILE} bytes")
        return cls.from_json(raw.decode("utf-8", errors="replace"), f"federation file {path}")

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.to_json().encode(), mode=0o644)


def run_settings(cfg: RunConfig) -> RunSettings:
    """What a run's server asks of the key holders."""
    return RunSettings.of(cfg.ckks_params(), cfg.keys.verify, min_updates_for(cfg))


def floor_of(cfg: RunConfig) -> Floor:
    """The floor that a run's own settings meet exactly (a federation made for that run)."""
    settings = run_settings(cfg)
    return Floor(verify_aggregates=settings.verify_aggregates, quorum=settings.quorum,
                 min_parties=settings.quorum, flood_bits=settings.flood_bits,
                 decryption_budget=settings.decryption_budget)


def federation_for_run(cfg: RunConfig, server: PublicIdentity, *, name: str = "fedshield-run",
                       floor: Optional[Floor] = None) -> Federation:
    """An unsigned federation with no members yet whose keys, n, t, parameters and floor are
    those of ``cfg`` (``floor``: a stricter one)."""
    n = cfg.n_sites
    return Federation.create(name, cfg.keys.mode, n, cfg.keys.threshold or n
                             if cfg.keys.mode == "threshold" else n, cfg.ckks_params(),
                             floor or floor_of(cfg), "server", server)


def load_pinned(path: str | os.PathLike) -> Federation:
    """A site's pinned federation: loaded, complete and signed by every member and the server."""
    fed = Federation.load(path)
    fed.check_pinnable()
    return fed


__all__ = ["DOMAIN", "FORMAT", "Federation", "Floor", "Member", "RunSettings",
           "federation_for_run", "floor_of", "load_pinned", "run_settings"]
