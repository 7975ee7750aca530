"""Key set-up with no dealer (fedshield.fl.key_setup): every party makes its key material
itself, a relay can neither read nor forge what passes through it, and a party whose key share
or Shamir dealing is inconsistent is named before round 1."""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import ConfigRecord, Error, Message, RecordDict

import fedshield as fs
from fedshield.trust.federation import RunSettings
from fedshield.fl import key_setup
from fedshield.fl.key_setup import (KeyHolder, KeySetup, check_subsets, describe,
                                    suspects, used_material)
from fedshield.engines.flower import client_app
from fedshield.engines.flower.records import FIELDS, put_blobs
from fedshield.engines.flower.site_worker import SiteWorker, error_reply
from fedshield.engines.flower.transport import GridTransport
from fedshield.fl.protocol import KeyCommit
from fedshield.fl.rounds import RoundDriver
from fedshield.he import keys
from fedshield.he import threshold as th
from fedshield.he.budget import DecryptionBudget
from fedshield.he.flooding import roots_of
from fedshield.trust.identity import Identity

from conftest import make_state, weighted_average
from federation_fixtures import answer, commit_all, pinned_federation
from key_scan import assert_key_material_only_in_own_node, key_windows

THRESHOLD = fs.CKKSParams.for_precision(keys="threshold")


class Federation:
    """n in-process parties, each with its own directory, and the server's key set-up; the
    relay can be replaced to tamper with what it carries."""

    def __init__(self, tmp_path, n: int, mode: str = "threshold", t: int | None = None,
                 params=None, *, pinned: bool = True) -> None:
        self.n, self.mode, self.t = n, mode, t or n
        self.params = params or (THRESHOLD if mode == "threshold" else fs.CKKSParams())
        self.server = Identity.generate()
        identities = [Identity.generate() for _ in range(n)]
        # what the sites signed out of band; pinned=False: they trust the server's roster
        self.pinned = pinned_federation(identities, self.server, mode, self.t, self.params)
        self.settings = RunSettings.of(self.params, False, self.pinned.floor.quorum)
        self.holders = [KeyHolder(i, identity, tmp_path / f"node-{i}" / "party.key",
                                  federation=self.pinned if pinned else None,
                                  trust_server_roster=not pinned)
                        for i, identity in enumerate(identities)]
        self.relay = None     # (op, party, fields, sections) -> (fields, sections)
        self.roster = {h.party_id: h.identity.public for h in self.holders}

    def ask(self, op, requests):
        return answer(self.holders, op, requests, self.relay)

    def run(self, epoch: int = 1):
        setup = KeySetup(self.params, self.mode, self.t, self.roster, self.server.public,
                         self.ask, settings=self.settings)
        result = setup.run(epoch)
        commit_all(setup, result, self.holders)
        return result


# -- which subsets, and who is to blame ---------------------------------------------------------
@pytest.mark.parametrize("n", range(2, 9))
def test_check_subsets_use_every_own_and_every_dealt_share(n):
    for t in range(n // 2 + 1, n + 1):
        subsets = check_subsets(n, t)
        assert subsets[0] == tuple(range(n))
        assert all(len(s) == t for s in subsets[1:]) and len(set(subsets)) == len(subsets)
        used = set().union(*[used_material(s, n, t) for s in subsets])
        assert {("own", i) for i in range(n)} <= used
        if t < n:
            assert {("dealt", j, i) for i in range(n) for j in range(n) if i != j} <= used


def test_suspects_point_at_one_dealing():
    n, t = 4, 3
    bad = ("dealt", 1, 2)
    results = {s: bad not in used_material(s, n, t) for s in check_subsets(n, t)}
    assert not all(results.values())
    named = suspects(results, n, t, {("own", p) for p in range(n)})
    # subsets of t without party 1 use its shares to several recipients at once: the dealer
    # is named, the recipient narrowed down as far as the subsets allow
    assert bad in named and {m[1] for m in named} == {1}
    assert "party 1 (the Shamir share it dealt to one of parties" in describe(named)


# -- the protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, n, t", [("threshold", 3, 2), ("threshold", 3, 3),
                                        ("threshold", 5, 3), ("shared", 3, 3)])
def test_protocol_makes_working_keys_on_each_node(tmp_path, mode, n, t):
    fed = Federation(tmp_path, n, mode, t)
    result = fed.run()
    public = result.context
    assert not public.has_secret_key and not public.is_party
    ctxs = []
    for h in fed.holders:
        path = h.key_file
        assert path.parent == tmp_path / f"node-{h.party_id}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        ctx = fs.load_context(path)
        assert ctx.fingerprint == public.fingerprint
        assert ctx.is_party == (mode == "threshold")
        budget = DecryptionBudget(h.budget_file, 2 ** ctx.params.flood_log_queries)
        assert budget.context_fp == public.fingerprint
        # threshold keys: the key check's probes are partial decryptions, and count
        assert (budget.decrypted >= 1) == (mode == "threshold")
        ctxs.append(ctx)
    # collective key generation: three message steps for any n; shared keys: two (the commit
    # rides on the first train request)
    assert result.message_steps == (3 if mode == "threshold" else 2)
    # a round with the keys: every party's update, the sum decrypted
    states = [make_state(900 + i) for i in range(n)]
    layout = fs.Layout.from_state_dict(states[0])
    agg = fs.aggregate(public, [fs.encrypt_update(c, s, layout, weight=3.0, weight_bound=4.0)
                                for c, s in zip(ctxs, states)])
    if mode == "threshold":
        present = list(range(t))
        out = fs.combine_partials(agg, [fs.partial_decrypt(c, agg, present)
                                        for c in ctxs[:t]], layout, ctx=ctxs[0])
    else:
        out = fs.decrypt_update(ctxs[1], agg, layout)
    want = weighted_average(states, [3.0] * n)
    assert max(float(np.abs(out[k].double().numpy() - want[k]).max()) for k in want) <= 1e-6


def test_no_key_share_outside_its_node(tmp_path):
    fed = Federation(tmp_path, 3, "threshold", 2)
    fed.run()
    key_files = {h.party_id: h.key_file for h in fed.holders}
    assert all(len(key_windows(f)) == 3 for f in key_files.values())   # own + 2 dealt to it
    assert assert_key_material_only_in_own_node(tmp_path, key_files) >= 3


def test_a_bad_shamir_dealing_is_caught_and_named(tmp_path, monkeypatch):
    fed = Federation(tmp_path, 3, "threshold", 2)
    real = th.deal_key_shares

    def bad_dealer(state):
        dealt = real(state)
        if state.party_id == 1:  # party 1 gives party 2 a share of another secret
            meta, sections = th.unframe(dealt[2], th.KEY_SHARE_MAGIC, "share",
                                        fs.KeyMaterialError, version=th.KEY_SHARE_VERSION)
            share = np.frombuffer(sections[0], dtype="<u8").copy()
            share[:16] = (share[:16] + np.uint64(12345)) % np.uint64(state.moduli[0])
            dealt[2] = th.frame(th.KEY_SHARE_MAGIC, meta, [share.tobytes()],
                                version=th.KEY_SHARE_VERSION)
        return dealt

    monkeypatch.setattr(th, "deal_key_shares", bad_dealer)
    with pytest.raises(fs.KeySetupError, match=r"party 1 \(the Shamir share it dealt to") as err:
        fed.run()
    assert err.value.culprit == 1


def test_a_party_whose_key_share_is_not_its_contributions_is_named(tmp_path, monkeypatch):
    """Party 1 adds one b_i to the joint key (and commits to it) but decrypts with the key
    share of another: its own probe does not decrypt the joint key's a against its b_i."""
    fed = Federation(tmp_path, 3, "threshold", 2)
    real = th.start_keygen

    def lying_start(params, n, t, party_id, seed):
        kept = real(params, n, t, party_id, seed)   # the key share it will decrypt with
        if party_id == 1:
            kept.contribution = real(params, n, t, party_id, seed).contribution  # the b shown
        return kept

    monkeypatch.setattr(th, "start_keygen", lying_start)
    with pytest.raises(fs.KeySetupError, match=r"party 1 \(its key share does not match its "
                       r"b_i\)") as err:
        fed.run()
    assert err.value.culprit == 1


def test_a_rogue_key_is_refused_by_its_commitment(tmp_path, monkeypatch):
    """The last party waits for the others' b_i and reveals a b chosen from them (the attack
    reveals -sum(others) - a * s' + e, so that the joint key is its own alone; here the sum of
    theirs and its own, which is as far from its commitment): not the b_i it committed to
    before seeing them, so the server refuses it, names it, and no key is written."""
    fed = Federation(tmp_path, 3, "threshold")
    real = th.contribution_message
    shown = {}

    def rogue(state):
        shown[state.party_id] = state.contribution
        if state.party_id == 2:
            state.contribution = th.joint_b([shown[0], shown[1], state.contribution],
                                            state.params.ring_dim, state.moduli)
        return real(state)

    monkeypatch.setattr(th, "contribution_message", rogue)
    with pytest.raises(fs.KeySetupError, match=r"party 2's key contribution is refused: .*"
                       r"not the one it committed to") as err:
        fed.run()
    assert err.value.culprit == 2
    assert not any(h.key_file.exists() for h in fed.holders)


@pytest.mark.parametrize("op", ["keys.reveal", "keys.join", "keys.shared-take"])
def test_a_relay_cannot_alter_what_it_carries(tmp_path, op):
    mode = "shared" if op == "keys.shared-take" else "threshold"
    fed = Federation(tmp_path, 3, mode, 2)
    hits = []

    def relay(this_op, party, fields, sections):
        if this_op == op and sections:
            blob = bytearray(sections[0])
            blob[len(blob) // 2] ^= 1
            sections[0] = bytes(blob)
            hits.append(party)
        return fields, sections

    fed.relay = relay
    with pytest.raises(fs.KeySetupError, match="does not verify|SHA-256|signature|sum|sealed"):
        fed.run()
    assert hits


def test_a_substituted_roster_entry_is_refused(tmp_path):
    # even a site that trusts the server's roster checks its own entry
    fed = Federation(tmp_path, 3, "threshold", pinned=False)
    fed.roster[2] = Identity.generate().public  # the relay's own key in party 2's place
    with pytest.raises(fs.KeySetupError, match="party 2 failed keys.begin: .*not this node's own"):
        fed.run()


def test_epochs_only_move_forward_and_rotation_replaces_the_key(tmp_path):
    fed = Federation(tmp_path, 2, "shared")
    first = fed.run(epoch=1).context
    with pytest.raises(fs.KeySetupError, match="epoch 1 is not after 1"):
        fed.run(epoch=1)
    second = fed.run(epoch=2).context
    assert second.fingerprint != first.fingerprint
    assert fs.load_context(fed.holders[0].key_file).fingerprint == second.fingerprint
    budget = DecryptionBudget(fed.holders[0].budget_file, 2 ** 20)
    assert budget.context_fp == second.fingerprint


def test_the_commit_is_checked_and_a_refusal_names_the_party(tmp_path):
    """The set-up's last step rides on each party's next train request: until then no key is
    written; a commit of another context or epoch is refused, and the set-up fails naming the
    party that refused it or committed another key."""
    fed = Federation(tmp_path, 2, "shared")
    setup = KeySetup(fed.params, fed.mode, fed.t, fed.roster, fed.server.public, fed.ask,
                     settings=fed.settings)
    result = setup.run(1)
    fp = result.context.fingerprint.hex()
    assert result.commit == KeyCommit(epoch=1, context_fp=fp)
    assert all(h.awaiting_commit and not h.key_file.exists() for h in fed.holders)
    with pytest.raises(fs.KeySetupError, match="party 0: the server commits context abab"):
        fed.holders[0].commit(KeyCommit(epoch=1, context_fp="ab" * 32))
    with pytest.raises(fs.KeySetupError, match="party 1: key set-up message for epoch 2"):
        fed.holders[1].commit(KeyCommit(epoch=2, context_fp=fp))
    with pytest.raises(fs.KeySetupError) as refusal:
        fed.holders[1].commit(KeyCommit(epoch=1, context_fp="ab" * 32))
    with pytest.raises(fs.KeySetupError, match="party 1 failed the commit: party 1: the "
                       "server commits context"):
        setup.check_commit(result, 1, refusal.value)
    with pytest.raises(fs.KeySetupError, match="party 0 committed another context") as other:
        setup.check_commit(result, 0, "ab" * 32)
    assert other.value.culprit == 0
    with pytest.raises(fs.KeySetupError, match="party 1 did not answer the commit"):
        setup.check_commit(result, 1, None)
    assert all(h.awaiting_commit for h in fed.holders)
    commit_all(setup, result, fed.holders)
    assert not any(h.awaiting_commit for h in fed.holders)
    assert fs.load_context(fed.holders[1].key_file).fingerprint.hex() == fp
    assert fed.holders[1].commit(result.commit) == fp     # again (a lost reply): the same key


def test_the_commit_rides_on_the_first_train_request_and_again_after_a_lost_reply(tmp_path):
    """In an engine: before its commit a site applies and trains nothing under the new keys;
    the commit rides on round 1's train request (the key set-up costs shared keys two steps),
    and a party whose reply was lost gets it again with its next request."""
    from fedshield.config import RunConfig
    from fedshield.engines.local import LocalEngine
    from fedshield.fl.protocol import TrainRequest

    cfg = RunConfig.from_flat(clients=3, rounds=2, local_steps=1, examples_per_client=16,
                              lora_r=2, samples=0, min_clients=1, out=str(tmp_path))
    engine = LocalEngine(cfg, show_progress=False)
    carried = []

    def send(requests):
        trains = {n: r for n, r in requests.items() if isinstance(r, TrainRequest)}
        out = engine.send(requests)
        if trains:
            carried.append({n: r.commit is not None for n, r in trains.items()})
            if len(carried) == 1:   # party 2's first reply is lost on the way
                out = [(n, x) for n, x in out if n != 2]
        return out

    driver = RoundDriver(engine.server, send, pipeline=False)
    driver.set_up_keys(before_round=1)
    with pytest.raises(fs.KeySetupError, match="party 0: the keys of epoch 1 are set up but "
                       "not committed"):
        engine.rounds[0].handle(TrainRequest(engine.server.plan_for(1)))
    for r in (1, 2):
        driver.run_round(r)
    assert carried == [{0: True, 1: True, 2: True}, {0: False, 1: False, 2: True},
                       {0: False, 1: False, 2: False}, {0: False, 1: False, 2: False}]
    assert driver.steps == {"keys": 2, "1": 2, "2": 2}
    rounds = engine.server.record.rounds
    assert [r.status for r in rounds] == ["ok", "ok"]
    assert [r.clients for r in rounds] == [[0, 1], [0, 1, 2]]
    fps = {fs.load_context(s.keys.key_file).fingerprint for s in engine.sites}
    assert fps == {engine.server.ctx.fingerprint}


def test_every_check_subset_pair_is_listed_once():
    for n, t in itertools.product(range(3, 7), repeat=2):
        if n // 2 < t <= n:
            assert len(check_subsets(n, t)) <= 1 + n * -(-(n - 1) // t)


# -- blame: a refused message names its sender, in both engines -------------------------------
def _contribution_for_other_moduli(real):
    """Party 0's contribution claiming moduli of its own choosing (odd, below 2**62, above
    every residue): well-formed, so the server's screening relays it; party 1's own crypto
    context has other moduli and refuses it."""
    def contribution(state):
        message = real(state)
        if state.party_id:
            return message
        meta, sections = th.unframe(message, th.KEYGEN_MAGIC, "contribution",
                                    fs.KeyMaterialError, version=th.KEYGEN_VERSION)
        meta.pop("sizes")
        meta["moduli"] = [q + 2 for q in meta["moduli"]]
        return th.frame(th.KEYGEN_MAGIC, meta, sections, version=th.KEYGEN_VERSION)
    return contribution


class _SiteWorkers:
    """Flower's Grid as far as the key set-up uses it: each message goes through the
    ClientApp's relay to its node's SiteWorker (fedshield.engines.flower.site_worker), and the reply
    comes back as a Flower Message, as in a deployment."""

    def __init__(self, holders) -> None:
        self.workers = {}
        for h in holders:  # a joined worker as far as key requests need one
            worker = SiteWorker.__new__(SiteWorker)
            worker.site = SimpleNamespace(keys=h, party=None, party_id=h.party_id)
            worker.cfg = SimpleNamespace(metrics="all")
            worker.problems = []   # passed its start-up checks
            self.workers[100 + h.party_id] = worker

    def send_and_receive(self, messages, timeout):
        replies = []
        for msg in messages:
            op, fields, blobs = client_app.request_of(msg)
            try:
                out, sections = self.workers[msg.metadata.dst_node_id].handle(op, fields, blobs)
                content = RecordDict()
                count = put_blobs(content, sections)
                content[FIELDS] = ConfigRecord({**out, "blobs": count})
                replies.append(Message(content, reply_to=msg))
            except fs.FedShieldError as exc:  # the worker's error reply, raised by the ClientApp
                reply = error_reply(exc)
                replies.append(Message(Error(0, f"{reply['error-type']}: {reply['error']}"),
                                       reply_to=msg))
        return replies


@pytest.mark.parametrize("engine", ["local", "flower"])
def test_a_refused_contribution_names_its_sender_not_its_receiver(tmp_path, monkeypatch, engine):
    """Party 0 sends a contribution for other moduli. Party 1 refuses it (KeyMessageRefused,
    sender 0); the set-up fails naming party 0, in the local engine (the exception in-process)
    and through Flower (the site worker's reply fields, the ClientApp's reply, the Grid
    transport)."""
    monkeypatch.setattr(th, "contribution_message",
                        _contribution_for_other_moduli(th.contribution_message))
    real_probes = key_setup.probes_message   # its probes claim the same moduli

    def probes(seed, party, n, t, moduli, made):
        return real_probes(seed, party, n, t, [q + 2 for q in moduli] if party == 0 else moduli,
                           made)
    monkeypatch.setattr(key_setup, "probes_message", probes)
    fed = Federation(tmp_path, 3, "threshold", 2)
    if engine == "flower":
        server = SimpleNamespace(
            node_of=lambda p: 100 + p, participants={100 + p: p for p in range(3)},
            record=SimpleNamespace(extra={}),
            cfg=SimpleNamespace(he=SimpleNamespace(enabled=True),
                                engine=SimpleNamespace(round_timeout=60)))
        transport = GridTransport(_SiteWorkers(fed.holders), server, chunk_bytes=1 << 20)
        fed.ask = RoundDriver(server, transport.send).key_ask()
    with pytest.raises(fs.KeyMessageRefused, match=r"party 0 sent a bad key set-up message "
                       r"\(keys.join\): party 1 refused the key contribution that party 0 "
                       r"signed: .*tower moduli") as err:
        fed.run()
    assert err.value.sender == 0 and err.value.culprit == 0


# -- every party's own crypto context ----------------------------------------------------------
CONTEXTS_CHILD = textwrap.dedent("""
    import json, sys
    import fedshield as fs
    from fedshield.he import keys
    sys.path.insert(0, sys.argv[1])
    from test_key_setup import PARAM_SETS, summary
    material = bytes.fromhex(sys.stdin.read())
    # made in the reverse order of the parent's: what the process made before does not matter
    out = {name: summary(keys.local_crypto(PARAM_SETS[name]))
           for name in reversed(list(PARAM_SETS))}
    ctx = keys.open_shared_key_material(material, PARAM_SETS["shared"])
    out["shared key"] = [ctx.fingerprint.hex(), ctx.public_key_bytes().hex()[:0]]
    print(json.dumps(out))
""")

PARAM_SETS = {"shared": fs.CKKSParams(), "threshold": THRESHOLD,
              "flooding": fs.CKKSParams.for_precision(keys="threshold", flood_bits=30)}


def summary(local) -> dict:
    """What two parties' own contexts of the same parameters must agree on."""
    pk = local.cc.KeyGen().publicKey
    template, _, moduli = keys.ciphertext_template(local.cc, pk, local.params)
    return {"crypto_context": local.cc_bytes.hex(), "moduli": [str(q) for q in local.moduli],
            "roots": [str(r) for r in roots_of(template, moduli, local.params.ring_dim)],
            "key templates": {e: [local.templates[e][0].hex(), list(local.templates[e][1])]
                              for e in (keys.PUBLIC, keys.SECRET)}}


def test_two_parties_build_the_same_crypto_context_from_the_same_parameters():
    """Key set-up relies on this: every party (and a shared-key recipient) makes its crypto
    context itself from the parameters; another process, which made them in another order,
    gets the same moduli, roots of unity, serialized crypto context and key templates, and
    the shared key rebuilt there has party 0's fingerprint."""
    here = {name: summary(keys.local_crypto(p)) for name, p in PARAM_SETS.items()}
    shared = fs.keygen_shared(PARAM_SETS["shared"]).client_context()
    material = keys.shared_key_material(shared)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, "-c", CONTEXTS_CHILD, os.path.dirname(__file__)],
                          input=material.hex(), capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in PARAM_SETS:
        for key in here[name]:
            assert json.loads(json.dumps(here[name][key])) == there[name][key], (name, key)
    assert len(here["flooding"]["moduli"]) == PARAM_SETS["flooding"].n_towers >= 2
    assert there["shared key"][0] == shared.fingerprint.hex()
