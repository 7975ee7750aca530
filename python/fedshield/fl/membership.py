"""Membership: who is in the run, who holds which global adapter, who is in the round.

The Server's roster of the federation: enrolment fixes the participants (transport node ->
party) and their identities, and each round's evaluate step says which global adapter every
party holds (a party that missed one is behind and catches up before it trains again). It
decides and remembers; the Server records each exclusion it returns.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..base.errors import FedShieldError
from ..trust.identity import PublicIdentity
from .messages import SiteInfo

log = logging.getLogger("fedshield")


def weight_bound_for(train_examples: Iterable[int]) -> float:
    """A public bound on every site's weight: the next power of two of the largest example
    count (it cancels out of sum(w*x)/sum(w); the error of the average grows with it)."""
    largest = max(train_examples)
    return float(2 ** math.ceil(math.log2(max(largest, 1))))


@dataclass(frozen=True)
class Rejection:
    """A node refused at enrolment; ``drop``: it had been admitted and leaves again."""

    node: int
    party: int
    reason: str
    drop: bool = False


class Membership:
    """The participants of one run. ``he``: sites enrol with identity keys; ``unit_weights``:
    every party weighs 1 (the ``paper`` algorithm), else its example count."""

    def __init__(self, n_sites: int, *, he: bool, unit_weights: bool) -> None:
        self.n_sites = n_sites
        self.he = he
        self.unit_weights = unit_weights
        self.participants: dict[int, int] = {}     # node -> party
        self.sites: dict[int, SiteInfo] = {}       # party -> what it enrolled with
        self.roster: dict[int, PublicIdentity] = {}  # party -> identity (HE: from enrolment)
        self.version = 0                           # last round whose aggregate was applied
        # party -> the round of the global adapter it holds, as far as the server knows (None:
        # it missed an aggregate; it is sent the current adapter before it trains again)
        self.party_versions: dict[int, int | None] = {}
        self.adapter_fps: dict[int, str] = {}      # party -> fingerprint of what it applied
        self.restored_roster: dict[int, PublicIdentity] | None = None  # a resumed run's
        self.resumed = False
        self.weight_bound: float | None = None
        self.num_lora_values = 0

    # -- lookups -------------------------------------------------------------------------------
    def node_of(self, party: int) -> int | None:
        return next((n for n, p in self.participants.items() if p == party), None)

    def drop(self, node: int | None) -> bool:
        """Removes a node from the rest of the run; False when it was not a participant."""
        return self.participants.pop(node, None) is not None

    # -- enrolment -----------------------------------------------------------------------------
    def enrol(self, joins: Iterable[tuple[int, SiteInfo]], versions: Mapping[int, int],
              fingerprints: Mapping[int, str], context_fp: str | None) -> list[Rejection]:
        """Admits the joins that may take part (``context_fp``: the federation's context, None
        before the key set-up) and sets the weight bound; returns the refused ones."""
        rejected: list[Rejection] = []
        admitted: list[tuple[int, SiteInfo]] = []
        for node, info in joins:
            reason = self._admit(node, info, versions, fingerprints, context_fp)
            if reason is None:
                admitted.append((node, info))
            else:
                rejected.append(Rejection(node, info.party, reason))
        sizes = Counter(info.num_lora_values for _, info in admitted)
        if sizes:
            self.num_lora_values, _ = sizes.most_common(1)[0]
            for node, info in admitted:
                if info.num_lora_values != self.num_lora_values:
                    rejected.append(Rejection(node, info.party, f"its LoRA state has "
                                              f"{info.num_lora_values} values, the others' "
                                              f"{self.num_lora_values}", drop=True))
                    del self.sites[info.party]
        if self.sites:
            # a bound far above the weights would cost precision (encrypt_update refuses it)
            self.weight_bound = weight_bound_for(
                [1] if self.unit_weights else [s.train_examples for s in self.sites.values()])
        return rejected

    def _admit(self, node: int, info: SiteInfo, versions: Mapping[int, int],
               fingerprints: Mapping[int, str], context_fp: str | None) -> str | None:
        """Why a join cannot take part (None: it is now a participant)."""
        identity = self._identity(info)
        if not 0 <= info.party < self.n_sites:
            return f"party id {info.party} not in [0, {self.n_sites})"
        if context_fp is not None and info.context_fp != context_fp:
            return "holds a key of another context"
        if info.party in self.sites:
            return f"party id {info.party} claimed twice"
        if isinstance(identity, str):
            return identity
        if self.restored_roster is not None and self.restored_roster.get(info.party) != identity:
            return f"not the identity party {info.party} had before the run was resumed"
        self.participants[node] = info.party
        self.sites[info.party] = info
        self.party_versions[info.party] = int(versions.get(info.party, 0))
        known = self.adapter_fps.get(info.party)
        if (known and self.party_versions[info.party] == self.version
                and fingerprints.get(info.party) != known):
            log.warning("party %d holds another adapter of round %d than it reported; it "
                        "catches up", info.party, self.version)
            self.party_versions[info.party] = None
        if identity is not None:
            self.roster[info.party] = identity
        return None

    def _identity(self, info: SiteInfo) -> PublicIdentity | str | None:
        """The site's public identity, None without HE, or why it cannot be used."""
        if not self.he:
            return None
        try:
            identity = PublicIdentity.from_bytes(bytes.fromhex(info.identity))
        except (ValueError, FedShieldError) as exc:
            return f"no usable identity key: {exc}"
        if identity in self.roster.values():
            return "the same identity key as another party"
        return identity

    # -- which global adapter each party holds -------------------------------------------------
    def behind(self) -> list[int]:
        """Participants whose global adapter is not the current one."""
        return sorted(p for p in self.participants.values()
                      if self.party_versions.get(p) != self.version)

    def catch_up_source(self) -> int | None:
        """The lowest participant that holds the current global adapter."""
        current = [p for p in self.participants.values()
                   if self.party_versions.get(p) == self.version]
        return min(current, default=None)

    def take_catch_up(self, party: int, source: int, fingerprint: str) -> str | None:
        """Records that ``party`` took ``source``'s adapter; why not, when what it took is
        not the adapter its source reported."""
        expected = self.adapter_fps.get(source)
        if expected and fingerprint != expected:
            return (f"took an adapter ({fingerprint[:12]}) that is not party {source}'s "
                    f"({expected[:12]})")
        self.party_versions[party] = self.version
        self.adapter_fps[party] = fingerprint or expected or ""
        return None

    def applied(self, party: int, version: int, fingerprint: str) -> None:
        self.party_versions[party] = version
        self.adapter_fps[party] = fingerprint

    def missed(self, party: int) -> None:
        """The party did not apply the round's aggregate: it is behind."""
        self.party_versions[party] = None

    # -- checkpoint ----------------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"version": self.version, "weight_bound": self.weight_bound,
                "num_lora_values": self.num_lora_values,
                "participants": sorted(self.participants.values()),
                "roster": {str(p): r.to_bytes().hex() for p, r in sorted(self.roster.items())},
                "party_versions": {str(p): v for p, v in sorted(self.party_versions.items())},
                # each party's global adapter as it reported it: one that comes back to a
                # resumed run holding another is behind, whatever round it claims
                "adapter_fps": {str(p): f for p, f in sorted(self.adapter_fps.items())}}

    def restore(self, state: dict, *, new_identities: bool = False) -> None:
        """A resumed run's: the parties come back from ``state`` (with the identities they
        had, unless ``new_identities``: a simulation that makes new ones in its process)."""
        self.version = int(state["version"])
        self.resumed = True
        self.restored_roster = None if new_identities else {
            int(p): PublicIdentity.from_bytes(bytes.fromhex(h))
            for p, h in state["roster"].items()}
        self.adapter_fps = {int(p): f for p, f in state.get("adapter_fps", {}).items()}
