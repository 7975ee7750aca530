"""A federation file as the sites would make it out of band: every member's identity added in
party order, then signed by every member and the server (fedshield.trust.federation)."""

from __future__ import annotations

import fedshield as fs
from fedshield.trust.federation import Federation, Floor, RunSettings
from fedshield.fl.key_setup import KeyHolder, KeySetup
from fedshield.trust.identity import Identity


def pinned_federation(identities, server, mode: str, t: int, params, *,
                      floor: Floor | None = None, name: str = "test-federation") -> Federation:
    n = len(identities)
    floor = floor or Floor(verify_aggregates=False, quorum=min(2, n), min_parties=min(2, n),
                           flood_bits=params.flood_bits,
                           decryption_budget=params.flood_log_queries)
    fed = Federation.create(name, mode, n, t if mode == "threshold" else n, params, floor,
                            "server", server.public)
    for i, identity in enumerate(identities):
        fed = fed.with_member(f"site-{i}", identity.public)
    for identity in [*identities, server]:
        fed = fed.signed_by(identity)
    return fed


def answer(holders, op, requests, relay=None) -> dict:
    """Each key holder's reply to ``op`` (its error, if it refuses), as the key set-up's
    ``ask`` expects; ``relay(op, party, fields, sections)`` may alter what it carries."""
    out = {}
    for party, (fields, sections) in requests.items():
        if relay is not None:
            fields, sections = relay(op, party, dict(fields), list(sections))
        try:
            out[party] = holders[party].handle(op, fields, sections)
        except fs.FedShieldError as exc:
            out[party] = exc
    return out


def commit_all(setup: KeySetup, result, holders) -> None:
    """Every key holder commits the set-up's keys (the commit a party's next train request
    carries), each answer checked as the round driver checks it."""
    for holder in holders:
        try:
            reply = holder.commit(result.commit)
        except fs.FedShieldError as exc:
            reply = exc
        setup.check_commit(result, holder.party_id, reply)


class Sites:
    """n in-process key holders that pinned ``fed`` (or trust the server's roster), and a
    server whose key set-up may lie about the roster: ``roster`` is what the server sends,
    ``impostors`` the key holders it runs itself for identities it made."""

    def __init__(self, tmp_path, fed: Federation | None, identities, server, params, mode,
                 t: int, *, settings=None) -> None:
        self.tmp_path, self.server, self.params, self.mode, self.t = (tmp_path, server, params,
                                                                      mode, t)
        self.holders = {i: KeyHolder(i, identity, tmp_path / f"node-{i}" / "party.key",
                                     federation=fed, trust_server_roster=fed is None)
                        for i, identity in enumerate(identities)}
        self.roster = {i: identity.public for i, identity in enumerate(identities)}
        self.settings = settings or RunSettings.of(params, False, 2)

    def impersonate(self, party: int) -> None:
        """The server enrols an identity of its own as ``party`` and answers for it."""
        fake = Identity.generate()
        self.roster[party] = fake.public
        self.holders[party] = KeyHolder(party, fake, self.tmp_path / f"server-made-{party}.key",
                                        trust_server_roster=True)

    def ask(self, op, requests):
        return answer(self.holders, op, requests)

    def run(self, epoch: int = 1):
        setup = KeySetup(self.params, self.mode, self.t, self.roster, self.server.public,
                         self.ask, settings=self.settings)
        result = setup.run(epoch)
        commit_all(setup, result, self.holders.values())
        return result
