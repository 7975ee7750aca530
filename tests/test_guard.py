"""Authenticated updates and shares, and what a key holder refuses to decrypt
(fedshield.trust.guard): edits in transit, relabelled headers, a single update presented as an
aggregate, a second aggregate of a round, too few parties; and the decryption budget."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import fedshield as fs
from fedshield import native
from fedshield.config import RunConfig
from fedshield.trust.guard import AggregateGuard, Provenance, sign_share
from fedshield.fl.messages import SiteInfo, TrainReply
from fedshield.fl.server import Server
from fedshield.he import threshold as th
from fedshield.he.budget import DecryptionBudget
from fedshield.he.frames import frame, unframe
from fedshield.trust.identity import Identity
from fedshield.he.partial import PARTIAL_MAGIC

from conftest import make_state
from signing import IDENTITIES, identity_hex, signed

ROUND, BOUND = 3, 8.0


def reseal(data: bytes) -> bytes:
    """The update with its checksum recomputed, as an attacker on the path would."""
    return data[:-8] + native.checksum64(data[:-8]).to_bytes(8, "little")


@pytest.fixture(scope="module")
def federation():
    """3 threshold parties (one key share each), their updates of round ROUND, signed."""
    parties, server_ctx = fs.keygen_threshold(th.THRESHOLD_PARAMS, 3)
    states = [make_state(500 + i) for i in range(3)]
    layout = fs.Layout.from_state_dict(states[0])
    updates = [fs.encrypt_update(p, s, layout, weight=2.0 + i, round=ROUND, weight_bound=BOUND)
               .to_bytes() for i, (p, s) in enumerate(zip(parties, states))]
    return parties, server_ctx, layout, updates


def make_server(server_ctx, n=3, threshold=0) -> Server:
    server = Server(RunConfig.from_flat(clients=n, keys="threshold", engine="flower",
                                        threshold=threshold),
                    server_ctx, engine="flower")
    server.enrol([(p, SiteInfo(party=p, name=f"s{p}", data="d", train_examples=8,
                               eval_examples=1, eval_loss=1.0,
                               context_fp=server_ctx.fingerprint.hex(),
                               identity=identity_hex(p))) for p in range(n)])
    for r in range(1, ROUND):
        server.plan(r)
        server.fail("skipped")
    return server


def screened(server, plan, updates, signatures=None):
    replies = [(p, TrainReply(party=p, round=plan.round, train_loss=1.0, kept_fraction=1.0,
                              update=u, signature=(signatures or {}).get(p, signed(p, u))))
               for p, u in enumerate(updates)]
    return server.screen_updates(plan, replies)


def guard_for(server, verify=False, min_parties=2) -> AggregateGuard:
    return AggregateGuard({p: IDENTITIES[p].public for p in range(3)}, server.identity.public,
                          min_parties, verify=verify)


# -- the server's screen ------------------------------------------------------------------------
def test_signed_updates_pass_and_relabelled_ones_do_not(federation):
    parties, server_ctx, layout, updates = federation
    server = make_server(server_ctx)
    plan = server.plan(ROUND)
    assert [n for n, _ in screened(server, plan, updates)] == [0, 1, 2]
    # round 3 relabelled round 4 (header edited, checksum recomputed)
    server = make_server(server_ctx)
    for r in (ROUND,):
        server.plan(r)
        server.fail("skipped")
    plan4 = server.plan(ROUND + 1)
    relabelled = [reseal(u[:112] + struct.pack("<Q", ROUND + 1) + u[120:]) for u in updates]
    originals = {p: signed(p, u) for p, u in enumerate(updates)}  # what the parties signed
    assert screened(server, plan4, relabelled, originals) == []
    reasons = [e["reason"] for e in server.record.events if e["round"] == ROUND + 1]
    assert len(reasons) == 3 and all("unauthenticated update" in r for r in reasons), reasons
    # a record from another party, or none at all
    server = make_server(server_ctx)
    plan = server.plan(ROUND)
    kept = screened(server, plan, updates, {0: signed(1, updates[0]), 1: b""})
    assert [n for n, _ in kept] == [2]


def test_hundreds_of_edits_in_transit_are_all_refused(federation):
    """Random byte edits of updates, checksum recomputed: none is ever aggregated, and
    nothing but an exclusion with its reason comes out."""
    parties, server_ctx, layout, updates = federation
    rng = np.random.default_rng(7)
    accepted = 0
    for trial in range(300):
        blob = bytearray(updates[trial % 3])
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(blob) - 8))
            blob[at] ^= int(rng.integers(1, 256))
        blob = reseal(bytes(blob))
        server = make_server(server_ctx)
        plan = server.plan(ROUND)
        others = [u if i != trial % 3 else blob for i, u in enumerate(updates)]
        sigs = {trial % 3: signed(trial % 3, updates[trial % 3])}  # the record of the original
        kept = screened(server, plan, others, sigs)
        accepted += any(n == trial % 3 for n, _ in kept)
    assert accepted == 0


# -- the key holder's guard ---------------------------------------------------------------------
def test_the_guard_admits_a_real_aggregate_once_per_round(federation):
    parties, server_ctx, layout, updates = federation
    server = make_server(server_ctx)
    plan = server.plan(ROUND)
    agg = server.aggregate(plan, screened(server, plan, updates))
    guard = guard_for(server)
    assert guard.check_aggregate(parties[0], agg, server.provenance) == [0, 1, 2]
    assert guard.check_aggregate(parties[0], agg, server.provenance) == [0, 1, 2]  # same again
    # another aggregate of the same round (two of the three updates): its difference with the
    # first would be the third party's update
    server2 = make_server(server_ctx, threshold=2)
    server2.identity = server.identity            # the same server, asking a second time
    plan2 = server2.plan(ROUND)
    two = server2.aggregate(plan2, screened(server2, plan2, updates[:2]))
    AggregateGuard(guard.roster, server.identity.public, 2).check_aggregate(
        parties[0], two, server2.provenance)      # fine on its own
    low = AggregateGuard(guard.roster, server.identity.public, 2)
    low.check_aggregate(parties[0], agg, server.provenance)
    with pytest.raises(fs.DecryptionRefused, match="another aggregate of round 3"):
        low.check_aggregate(parties[0], two, server2.provenance)
    with pytest.raises(fs.DecryptionRefused, match="needs 3"):
        AggregateGuard(guard.roster, server2.identity.public, 3).check_aggregate(
            parties[0], two, server2.provenance)
    with pytest.raises(fs.DecryptionRefused, match="without the signed records"):
        guard.check_aggregate(parties[0], agg, None)


def test_a_single_update_presented_as_an_aggregate_is_refused(federation):
    parties, server_ctx, layout, updates = federation
    server = make_server(server_ctx)
    plan = server.plan(ROUND)
    agg = server.aggregate(plan, screened(server, plan, updates))
    # a relay swaps in party 0's update relabelled as an aggregate of 3 (kind, n_summed)
    one = updates[0]
    fake = fs.EncryptedUpdate.from_bytes(reseal(one[:10] + struct.pack("<HI", 2, 3) + one[16:]))
    assert fake.is_aggregate and fake.n_summed == 3
    with pytest.raises(fs.AuthenticationError, match="aggregate"):
        guard_for(server).check_aggregate(parties[1], fake, server.provenance)
    # the server itself could sign it: only a verifying key holder catches that
    forged = Provenance.make(server.identity, fake, [signed(p, u) for p, u in enumerate(updates)],
                             updates)
    guard_for(server).check_aggregate(parties[1], fake, forged)  # documented limit
    with pytest.raises(fs.DecryptionRefused, match="not the sum of the signed updates"):
        guard_for(server, verify=True).check_aggregate(parties[1], fake, forged)
    # verify: the real aggregate with its updates passes
    real = Provenance.make(server.identity, agg, [signed(p, u) for p, u in enumerate(updates)],
                           updates)
    assert guard_for(server, verify=True).check_aggregate(parties[1], agg, real) == [0, 1, 2]
    with pytest.raises(fs.DecryptionRefused, match="must come with the aggregate"):
        guard_for(server, verify=True).check_aggregate(parties[1], agg, server.provenance)


def test_edited_partial_decryptions_are_refused_by_server_and_parties(federation):
    """Hundreds of random edits of partial decryptions (frame digest recomputed): the server's
    screen names a reason for every one, and a key holder's guard refuses every one."""
    parties, server_ctx, layout, updates = federation
    server = make_server(server_ctx)
    plan = server.plan(ROUND)
    agg = server.aggregate(plan, screened(server, plan, updates))
    share = fs.partial_decrypt(parties[1], agg)
    record = sign_share(IDENTITIES[1], 1, ROUND, share)
    guard = guard_for(server)
    assert server.share_problem((share, record), 1, agg, [0, 1, 2]) is None
    guard.check_shares(agg, [share], [record])
    meta, parts = unframe(share, PARTIAL_MAGIC, "share", fs.InvalidUpdate)
    rng = np.random.default_rng(3)
    silent = 0
    for trial in range(300):
        new_parts = [bytearray(p) for p in parts]
        target = new_parts[int(rng.integers(0, len(new_parts)))]
        at = int(rng.integers(0, len(target)))
        target[at] ^= int(rng.integers(1, 256))
        edited = frame(PARTIAL_MAGIC, meta, [bytes(p) for p in new_parts])
        assert server.share_problem((edited, record), 1, agg, [0, 1, 2]) is not None
        try:
            guard.check_shares(agg, [edited], [record])
            silent += 1
        except fs.FedShieldError:
            pass
    assert silent == 0
    # a share relabelled to another party, or signed for another round
    with pytest.raises(fs.AuthenticationError):
        guard.check_shares(agg, [share], [sign_share(IDENTITIES[2], 1, ROUND, share)])
    with pytest.raises(fs.AuthenticationError, match="round"):
        guard.check_shares(agg, [share], [sign_share(IDENTITIES[1], 1, ROUND + 1, share)])


# -- the decryption budget ------------------------------------------------------------------------
def test_the_budget_refuses_beyond_its_limit(tmp_path, client_ctx, server_ctx):
    from rank_site import tiny_peft

    budget = DecryptionBudget(tmp_path / "key.budget", 2)
    party = fs.Party(client_ctx, tiny_peft(), budget=budget)
    upd = party.encrypt_update(weight=1.0, round=1, weight_bound=1.0)
    agg = fs.aggregate(server_ctx, [upd])
    party.decrypt(agg)                     # 1 ciphertext of 2
    party.decrypt(agg)
    assert budget.remaining == 0
    with pytest.raises(fs.DecryptionBudgetExceeded, match="rotate"):
        party.decrypt(agg)


def test_rotation_continues_the_run(tmp_path):
    """A decryption budget that one round nearly spends: the server starts a new key epoch
    before every round that would exceed it, and the run goes on from the same global
    adapter."""
    from fedshield.engines.local import LocalEngine

    # 2**0 ciphertexts per key: one round's aggregate (shared-key set-up decrypts nothing
    # that leaves a site, so it spends none of it)
    cfg = RunConfig.from_flat(clients=2, rounds=3, examples_per_client=16, local_steps=2,
                              batch_size=4, lora_r=4, decryption_budget=0, out=str(tmp_path))
    engine = LocalEngine(cfg, show_progress=False)
    metrics = engine.run()
    epochs = metrics["key_epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    # shared keys: two steps each; the commit rides on the next train request
    assert [e["message_steps"] for e in epochs] == [2, 2, 2]
    assert [e["before_round"] for e in epochs] == [1, 2, 3]
    assert len({e["context_fp"] for e in epochs}) == 3
    assert [r["status"] for r in metrics["rounds"]] == ["ok"] * 3
    assert metrics["rounds"][-1]["eval_loss"] < metrics["initial_eval_loss"]


def test_a_budget_too_small_for_one_round_fails_the_round(tmp_path):
    from fedshield.engines.local import LocalEngine

    cfg = RunConfig.from_flat(clients=2, rounds=1, examples_per_client=16, local_steps=2,
                              batch_size=4, lora_r=16, decryption_budget=1, out=str(tmp_path))
    with pytest.raises(fs.DecryptionBudgetExceeded, match="rotate"):
        LocalEngine(cfg, show_progress=False).run()


def test_identities_of_the_enrolled_sites_are_recorded(tmp_path):
    from fedshield.engines.local import LocalEngine

    cfg = RunConfig.from_flat(clients=2, rounds=1, examples_per_client=16, local_steps=1,
                              batch_size=4, lora_r=2, out=str(tmp_path))
    engine = LocalEngine(cfg, show_progress=False)
    metrics = engine.run()
    assert sorted(metrics["identities"]) == ["0", "1"]
    assert metrics["server_identity"] == engine.server.identity.public.fingerprint()
    assert metrics["identities"]["0"] == engine.sites[0].identity.public.fingerprint()
    assert isinstance(Identity.generate().public.fingerprint(), str)
