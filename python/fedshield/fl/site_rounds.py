"""A site's half of the round protocol (fedshield.fl.protocol): one handler for both engines.

The local engine calls :meth:`SiteRounds.handle` with the request objects; the Flower engine's
site worker parses each relayed request and calls the same method, so both engines run the
same site-side steps in the same order: commit the key set-up's new key, take a catch-up,
apply the previous aggregate, evaluate it, then train, prune, encrypt and sign.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from ..base.errors import FedShieldError, KeySetupError
from ..he import EncryptedUpdate
from ..trust.guard import Provenance
from .adapter_store import AdapterStore, adapter_fingerprint, pack_adapter, unpack_adapter
from .messages import RoundPlan, ShareReply
from .protocol import (Aggregate, CatchUp, CatchUpReply, CatchUpRequest, KeyCommit,
                       ShareRequest, TrainRequest, TrainResult)
from .site import Site

log = logging.getLogger("fedshield")


class OutOfStep(FedShieldError):
    """This party's global adapter is not the one the server's request builds on."""


def catch_up_aad(sender: int, recipient: int, version: int) -> bytes:
    """What a sealed catch-up adapter is bound to: its round, its sender and its recipient."""
    return f"fedshield-catchup|round {version}|from {sender}|to {recipient}".encode()


def error_text(exc: BaseException) -> str:
    """How a training failure after a successful apply is told (the local engine's)."""
    return f"{type(exc).__name__}: {exc}"


class SiteRounds:
    """Answers the round requests for ``site``. ``store`` keeps the global adapters the site
    applied (a restarted worker goes on from them, and steps back one round when the server
    redoes a round); ``adapter_dir`` is where the site writes the run's adapter when asked;
    ``describe`` turns a training failure that follows a successful apply into the text that
    leaves the site."""

    def __init__(self, site: Site, *, store: AdapterStore | None = None,
                 adapter_dir: Path | None = None,
                 describe: Callable[[BaseException], str] = error_text) -> None:
        self.site = site
        self.store = store
        self.adapter_dir = adapter_dir
        self.describe = describe
        # the aggregate this site last partially decrypted: the round's fusion reuses it (its
        # parse and its digest) when the result carries the same bytes
        self._partially_decrypted: EncryptedUpdate | None = None

    def handle(self, request):
        if isinstance(request, TrainRequest):
            return self.train(request)
        if isinstance(request, ShareRequest):
            return self.share(request)
        if isinstance(request, CatchUpRequest):
            return self.seal_adapter(request)
        raise FedShieldError(f"not a round request: {type(request).__name__}")

    # -- train: catch up, apply, evaluate, train ------------------------------------------------
    def train(self, request: TrainRequest) -> TrainResult:
        site = self.site
        committed = None
        if request.commit is not None:
            try:
                committed = self.commit(request.commit)
            except FedShieldError as exc:   # the set-up fails naming this party
                log.warning("party %d refused the commit of key epoch %d: %s", site.party_id,
                            request.commit.epoch, exc)
                return TrainResult(commit_refused=self.describe(exc))
        elif site.keys is not None and site.keys.awaiting_commit:
            raise KeySetupError(f"party {site.party_id}: the keys of epoch {site.keys.epoch} "
                                "are set up but not committed: it applies and trains nothing "
                                "under them before their commit")
        caught_up = None
        if request.catch_up is not None:
            caught_up = self.take_adapter(request.catch_up)
        evaluation = None
        if request.apply is not None:
            seconds = self.apply(request.apply)
            evaluation = site.eval_reply(seconds)
            if request.apply.save_adapter and self.adapter_dir is not None:
                site.save_adapter(self.adapter_dir)   # into the site's own out_dir
                log.info("party %d wrote %s/adapter", site.party_id, self.adapter_dir)
        if request.plan is None:
            return TrainResult(evaluation=evaluation, caught_up=caught_up, committed=committed)
        try:
            self.step_back_to(request.plan)
            update = site.train_round(request.plan)
        except Exception as exc:
            if evaluation is None and committed is None:
                raise
            # it applied the aggregate or committed the keys: that counts, though it cannot
            # train this round
            log.exception("party %d could not train round %d", site.party_id,
                          request.plan.round)
            return TrainResult(evaluation=evaluation, train_error=self.describe(exc),
                               caught_up=caught_up, committed=committed)
        return TrainResult(evaluation=evaluation, update=update, caught_up=caught_up,
                           committed=committed)

    def commit(self, commit: KeyCommit) -> str:
        """The key set-up's last step: this party writes the key it made and takes it (guarded
        as the set-up agreed); returns the key's fingerprint."""
        site = self.site
        if site.keys is None:
            raise KeySetupError(f"party {site.party_id}: a commit of key epoch {commit.epoch}, "
                                "but it took part in no key set-up")
        fingerprint = site.keys.commit(commit)
        site.take_committed_keys()
        return fingerprint

    def apply(self, result: Aggregate) -> float:
        """Decrypts (threshold keys: fuses the shares) and applies a round's result; returns
        the seconds spent decrypting."""
        site, party, plan = self.site, self.site.party, result.plan
        if party.version != plan.base_version:
            raise OutOfStep(f"party {site.party_id} holds the adapter of round {party.version}, "
                            f"the aggregate of round {plan.round} applies to round "
                            f"{plan.base_version}")
        if result.average is not None:      # the plaintext baseline
            seconds = site.apply(plan, average=result.average)
        else:
            kept, self._partially_decrypted = self._partially_decrypted, None
            agg = (kept if kept is not None and kept.to_bytes() == result.blob
                   else EncryptedUpdate.from_bytes(result.blob))
            if agg.round != plan.round or not agg.is_aggregate:
                raise OutOfStep(f"expected the aggregate of round {plan.round}, got round "
                                f"{agg.round}")
            if site.cfg.keys.mode == "threshold":
                seconds = site.apply(plan, agg=agg, shares=[s for _, s, _ in result.shares],
                                     share_records=[r for _, _, r in result.shares])
            else:
                seconds = site.apply(plan, agg=agg,
                                     provenance=Provenance.from_blobs(result.provenance))
        if self.store is not None:
            self.store.save(party.version, party.global_state)
        return seconds

    def step_back_to(self, plan: RoundPlan) -> None:
        """A server that was stopped after this party applied round r's aggregate, but before
        it recorded round r, redoes round r from r - 1: step back to it if it is kept here."""
        party = self.site.party
        if not self.step_back(plan.base_version, f"the server redoes round {plan.round}"):
            raise OutOfStep(f"party {self.site.party_id} holds the adapter of round "
                            f"{party.version}, the server builds round {plan.round} on "
                            f"round {plan.base_version}")

    def step_back(self, version: int, why: str) -> bool:
        """Goes back to the kept adapter of round ``version`` when this party holds a later
        one (a resumed server recorded fewer rounds than the party applied: with one step per
        round a site applies round r's aggregate before the server can record round r).
        True when it then holds round ``version``'s; False when it holds an earlier one, or
        a later one and round ``version``'s is not kept."""
        site, party = self.site, self.site.party
        if party.version <= version:
            return party.version == version
        state = self.store.at(version) if self.store is not None else None
        if state is None:
            return False
        log.info("party %d steps back from round %d to round %d (%s)", site.party_id,
                 party.version, version, why)
        party.set_global(state, version)
        return True

    # -- threshold keys -------------------------------------------------------------------------
    def share(self, request: ShareRequest) -> ShareReply:
        start = time.perf_counter()
        agg = self._partially_decrypted = EncryptedUpdate.from_bytes(request.aggregate)
        if agg.round != request.round:
            raise OutOfStep(f"asked to decrypt round {agg.round}'s aggregate in round "
                            f"{request.round}")
        share, record = self.site.partial_decrypt(
            agg, list(request.present), provenance=Provenance.from_blobs(request.provenance))
        return ShareReply(share=share, seconds=time.perf_counter() - start, signature=record)

    # -- catch-up -------------------------------------------------------------------------------
    def seal_adapter(self, request: CatchUpRequest) -> CatchUpReply:
        """This party's global adapter of round ``version``, sealed to each party of ``to``
        and signed."""
        site = self.site
        party, keys = site.party, site.keys
        if party.version != request.version:
            raise OutOfStep(f"party {site.party_id} holds round {party.version}, not round "
                            f"{request.version}")
        if keys is None or not all(p in keys.roster for p in request.to):
            raise KeySetupError(f"catchup to {list(request.to)}: not all are in the key roster")
        blob = pack_adapter(request.version, party.global_state)
        return CatchUpReply(sealed={p: keys.roster[p].seal(
            blob, site.identity, catch_up_aad(site.party_id, p, request.version))
            for p in request.to})

    def take_adapter(self, catch_up: CatchUp) -> str:
        """The adapter sealed to this party by ``catch_up.source``; returns its fingerprint."""
        site = self.site
        party, keys = site.party, site.keys
        sender, version = catch_up.source, catch_up.version
        if keys is None or sender not in keys.roster:
            raise KeySetupError(f"catch-up from party {sender}: not in the key roster")
        blob = site.identity.open_sealed(catch_up.sealed, keys.roster[sender],
                                         catch_up_aad(sender, site.party_id, version))
        got, state = unpack_adapter(blob, f"party {sender}'s adapter")
        if got != version or sorted(state) != sorted(party.global_state):
            raise OutOfStep(f"party {sender} sent the adapter of round {got} with "
                            f"{len(state)} tensors; expected round {version}")
        party.set_global(state, version)
        if self.store is not None:
            self.store.save(version, state)
        log.info("party %d caught up with round %d from party %d", site.party_id, version,
                 sender)
        return adapter_fingerprint(state)
