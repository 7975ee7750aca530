"""The server's side of the round protocol (fedshield.fl.protocol), over any transport.

A transport is one function, ``send({node: request}) -> [(node, reply or exception), ...]``:
one message step. The local engine's calls each site's handler in-process; the Flower engine's
goes through the Grid. :class:`RoundDriver` runs the rounds through it with the Server:

- shared keys: ONE step per round. The train request of round r carries round r - 1's
  aggregate; each site applies and evaluates it, then trains r, and replies with both.
- threshold keys: two steps per round, the share request for round r - 1's aggregate, then the
  train request carrying it and the shares.
- the run's last aggregate goes out in one more step (apply and evaluate only); so does a
  pending aggregate when the keys are to be rotated (it is decrypted under the old keys).
- a party that missed an aggregate takes the current adapter with its next train request,
  sealed to it by a party that holds it (one more step, to that party, in that round).
- a key set-up's last step, the commit, rides on each party's next train request (until the
  party answers it): the set-up costs no step of its own for it.

With ``pipeline=False`` every round's aggregate is applied in a step of its own (the local
engine: there a step costs nothing, and each round is recorded before the next starts); the
site-side steps, and so the results, are the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

from ..base.errors import FedShieldError, KeySetupError
from ..trust.federation import run_settings
from .key_setup import KeySetup, KeySetupResult
from .messages import InvalidMessage, RoundPlan, ShareReply
from .protocol import (Aggregate, CatchUp, CatchUpReply, CatchUpRequest, KeyCommit,
                       RelayedRequest, ShareRequest, TrainRequest, TrainResult)
from .record import RoundRecord
from .server import Server

log = logging.getLogger("fedshield")

Send = Callable[[Mapping[int, object]], list]


@dataclass
class Pending:
    """A round's result that the sites have not applied yet."""

    plan: RoundPlan
    result: object                  # the aggregate EncryptedUpdate, or a plaintext average
    present: list[int]              # the parties that contributed (threshold: that decrypt)
    shares: dict = field(default_factory=dict)     # threshold: party -> (share, record)
    provenance: tuple = ()


class RoundDriver:
    """Runs a run's rounds with ``server`` through ``send`` (see the module docstring).

    ``on_round(entry)`` is called whenever a round's record closes (ok or failed);
    ``on_keys(context)`` after each key epoch; ``decrypting(contributors)`` picks the parties
    asked for partial decryptions (the local engine's simulated dropouts)."""

    def __init__(self, server: Server, send: Send, *, pipeline: bool = True,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 on_keys: Callable[[object], None] | None = None,
                 decrypting: Callable[[list[int]], list[int]] | None = None) -> None:
        self.server = server
        self._send = send
        self.pipeline = pipeline
        self.on_round = on_round
        self.on_keys = on_keys
        self.decrypting = decrypting or (lambda parties: parties)
        self.pending: Pending | None = None
        self.last_result = None        # the last round's aggregate (or plaintext average)
        self.steps: dict[str, int] = {}
        # the last key set-up, and the parties that have not answered its commit yet
        self.key_setup: tuple[KeySetup, KeySetupResult] | None = None
        self.commits: dict[int, KeyCommit] = {}

    # -- message steps --------------------------------------------------------------------------
    def step(self, label: str, requests: Mapping[int, object]) -> list:
        """One message step (counted under ``label`` in metrics.json's message_steps)."""
        if not requests:
            return []
        self.steps[label] = self.steps.get(label, 0) + 1
        self.server.record.message_steps = dict(self.steps)
        return self._send(dict(requests))

    def _by_party(self, replies: Iterable) -> dict[int, object]:
        """The replies of participants, by party (the first one of each)."""
        out: dict[int, object] = {}
        for node, reply in replies:
            party = self.server.participants.get(node)
            if party is not None and party not in out:
                out[party] = reply
        return out

    # -- keys -----------------------------------------------------------------------------------
    def key_ask(self):
        """The key set-up's ``ask(op, {party: (fields, blobs)})`` over this transport."""
        def ask(op: str, requests) -> dict[int, object]:
            messages = {}
            for party, (fields, blobs) in requests.items():
                node = self.server.node_of(party)
                if node is not None:
                    messages[node] = RelayedRequest(op, dict(fields), tuple(blobs))
            replies = self._by_party(self.step("keys", messages))
            return {p: r for p, r in replies.items() if p in requests}
        return ask

    def set_up_keys(self, before_round: int) -> None:
        """A key epoch by the protocol (fedshield.fl.key_setup): the first one, or a rotation
        when a key's decryption budget runs low. Its commit rides on each party's next train
        request. A party that fails it stops the run (KeySetupError naming the party)."""
        server = self.server
        cfg = server.cfg
        epoch = server.epoch + 1
        setup = KeySetup(cfg.ckks_params(), cfg.keys.mode, cfg.keys.threshold or cfg.n_sites,
                         server.roster, server.identity.public, self.key_ask(),
                         settings=run_settings(cfg))
        result = setup.run(epoch)
        server.key_epoch_done(epoch, result.context, before_round, result.seconds,
                              result.subsets_checked, result.message_steps)
        self.key_setup = (setup, result)
        self.commits = dict.fromkeys(server.participants.values(), result.commit)
        if self.on_keys is not None:
            self.on_keys(result.context)

    def _train_request(self, party: int, plan: RoundPlan | None, apply: Aggregate | None,
                       catch_up: CatchUp | None) -> TrainRequest:
        return TrainRequest(plan, apply, catch_up, self.commits.get(party))

    def _check_commits(self, replies: Mapping[int, object]) -> None:
        """The parties' answers to the commit their train requests carried: one that refused
        it, or committed another key, fails the key set-up; one that did not answer (its
        reply lost, or it failed before its worker saw the request) gets it again."""
        if not self.commits:
            return
        setup, result = self.key_setup
        for party in list(self.commits):
            reply = replies.get(party)
            if party not in self.server.participants.values():
                del self.commits[party]
            elif isinstance(reply, TrainResult):
                answer = reply.committed
                if reply.commit_refused is not None or answer is None:
                    answer = KeySetupError(reply.commit_refused or "its train reply confirms "
                                           "no commit", culprit=party)
                setup.check_commit(result, party, answer)
                del self.commits[party]

    def _budget_short(self) -> bool:
        """Whether the keys might not decrypt the pending aggregate and one round more: then
        it is applied on its own before the next round (a key epoch may follow)."""
        server = self.server
        if server.ctx is None or self.pending is None:
            return False
        return server.keys.short_of(2, server.current.n_ciphertexts)

    # -- catch-up -------------------------------------------------------------------------------
    def catch_up(self, before_round: int, label: str) -> dict[int, CatchUp]:
        """Parties behind the adapter the next aggregate builds on get it from one that holds
        it, sealed to them; what they take rides on their train request."""
        server = self.server
        behind = server.behind()
        if not behind:
            return {}
        source = server.catch_up_source()
        if source is None:
            for party in behind:
                server.catch_up_failed(party, before_round, "no participant holds the global "
                                       f"adapter of round {server.version}")
            return {}
        request = CatchUpRequest(version=server.version, to=tuple(behind))
        answer = self._by_party(self.step(label, {server.node_of(source): request})).get(source)
        if not isinstance(answer, CatchUpReply) or sorted(answer.sealed) != behind:
            for party in behind:
                server.catch_up_failed(party, before_round, f"party {source} did not send the "
                                       f"adapter of round {server.version}: {answer}")
            return {}
        return {p: CatchUp(version=server.version, source=source, sealed=answer.sealed[p])
                for p in behind}

    def _caught_up(self, catch_ups: dict[int, CatchUp], replies: dict[int, object],
                   before_round: int) -> None:
        server = self.server
        for party, catch_up in catch_ups.items():
            got = replies.get(party)
            if isinstance(got, TrainResult) and got.caught_up is not None:
                server.caught_up(party, catch_up.source, before_round, got.caught_up)
            else:
                server.catch_up_failed(party, before_round, "could not take the global "
                                       f"adapter of round {catch_up.version}: "
                                       f"{got if got is not None else 'no reply'}")

    # -- the result every site applies ----------------------------------------------------------
    def _aggregate(self, pending: Pending, writer: int | None = None) -> dict[int, Aggregate]:
        """What each participant gets to apply (``writer`` also writes the run's adapter)."""
        encrypted = self.server.ctx is not None
        shares = tuple((p, *pending.shares[p]) for p in sorted(pending.shares))
        common = Aggregate(plan=pending.plan,
                           blob=pending.result.to_bytes() if encrypted else None,
                           average=None if encrypted else pending.result,
                           shares=shares, provenance=pending.provenance)
        return {p: replace(common, save_adapter=p == writer)
                for p in self.server.participants.values()}

    def flush(self, label: str, *, final: bool = False) -> RoundRecord | None:
        """Applies the pending aggregate on its own (apply and evaluate only)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        server = self.server
        after = pending.plan.round + 1
        catch_ups = self.catch_up(after, label)   # who missed an aggregate takes it first
        writer = min(pending.present) if final else None
        applies = self._aggregate(pending, writer)
        requests = {server.node_of(p): self._train_request(p, None, a, catch_ups.get(p))
                    for p, a in applies.items()}
        replies = self.step(label, requests)
        by_party = self._by_party(replies)
        self._check_commits(by_party)
        self._caught_up(catch_ups, by_party, after)
        if writer is not None and not isinstance(by_party.get(writer), TrainResult):
            log.error("party %d was to write the adapter and did not reply", writer)
        return self._finish(self._of_participants(replies, requests))

    def _of_participants(self, replies: list, requests: Mapping) -> list:
        """The replies without those of parties that left the run in this step (a failed
        catch-up): theirs count for nothing. A reply from a node never asked is kept (the
        Server records it)."""
        return [(n, x) for n, x in replies if n in self.server.participants or n not in requests]

    def _finish(self, replies: list) -> RoundRecord:
        evals = []
        for node, reply in replies:
            if isinstance(reply, TrainResult):
                reply = reply.evaluation or InvalidMessage("no evaluation of the aggregate")
            evals.append((node, reply))
        entry = self.server.finish_round(evals)
        self._round_done(entry)
        return entry

    def _round_done(self, entry: RoundRecord) -> None:
        if self.on_round is not None:
            self.on_round(entry)

    # -- one round ------------------------------------------------------------------------------
    def run_round(self, r: int, *, last: bool = False) -> None:
        """Round ``r`` (its aggregate is applied with round r + 1's train request, or at once
        without ``pipeline`` or when ``last``)."""
        server, label = self.server, str(r)
        if self.pending is not None and (not self.pipeline or self._budget_short()
                                         or server.needs_new_keys()):
            self.flush(label)   # under the keys it was made for, before any new ones
        if server.needs_new_keys():   # the first key epoch, or a rotation (budget)
            self.set_up_keys(before_round=r)
        catch_ups = self.catch_up(r, label)
        pending = self.pending
        # with nothing pending the round's record opens now (its wall time is the round's);
        # else once the previous round is closed, with the plan sent now
        plan = (server.plan(r) if pending is None
                else server.plan_for(r, base_version=pending.plan.round))
        applies = self._aggregate(pending) if pending is not None else {}
        requests = {server.node_of(p): self._train_request(p, plan, applies.get(p),
                                                           catch_ups.get(p))
                    for p in sorted(server.participants.values())}
        replies = self.step(label, requests)
        by_party = self._by_party(replies)
        self._check_commits(by_party)
        self._caught_up(catch_ups, by_party, r)
        replies = self._of_participants(replies, requests)
        if pending is not None:
            self.pending = None
            self._finish(replies)
            opened = server.plan(r)
            if opened != plan:
                raise FedShieldError(f"round {r}: the plan sent ({plan}) is not the server's "
                                     f"({opened})")
        updates = []
        for node, reply in replies:
            if isinstance(reply, TrainResult):
                reply = reply.update or InvalidMessage(reply.train_error or "no update")
            updates.append((node, reply))
        accepted = server.screen_updates(plan, updates)
        result = server.aggregate(plan, accepted)
        if result is None:
            return self._round_done(server.current)
        present = sorted(reply.party for _, reply in accepted)
        shares = {}
        if server.ctx is not None and server.cfg.keys.mode == "threshold":
            collected = server.collect_shares(result, self.decrypting(present),
                                              self._ask_shares(result, label))
            if collected is None:
                return self._round_done(server.current)
            present, got = collected
            shares = {p: (got[p], server.share_records[p]) for p in present}
        self.last_result = result
        provenance = tuple(server.provenance.to_blobs()) if server.ctx is not None else ()
        self.pending = Pending(plan, result, present, shares, provenance)
        if last:
            self.flush("final", final=True)
        elif not self.pipeline:
            self.flush(label)

    def _ask_shares(self, agg, label: str):
        """The transport of Server.collect_shares: one share request per present party, with
        the aggregate and its provenance (verify_aggregates: its signed updates too)."""
        server = self.server

        def ask(present: list[int]) -> dict[int, object]:
            request = ShareRequest(round=agg.round, present=tuple(present),
                                   aggregate=agg.to_bytes(),
                                   provenance=tuple(server.provenance.to_blobs()))
            replies = self.step(label, {server.node_of(p): request for p in present})
            answers: dict[int, object] = {}
            seconds = []
            for node, reply in replies:
                party = server.participants.get(node)
                if party not in present or party in answers:
                    server.exclude(agg.round, "share", node, "unexpected share reply")
                    continue
                if isinstance(reply, ShareReply):
                    answers[party] = (reply.share, reply.signature)
                    seconds.append(reply.seconds)
                else:
                    answers[party] = reply
            server.current.seconds["decrypt"] += max(seconds, default=0.0)
            return answers
        return ask
