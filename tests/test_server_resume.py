"""The Server's side of resume and catch-up (fedshield.fl.server), without Flower: which
parties are behind, who sends them the adapter, what a checkpoint holds, and that a resumed
server takes back only the parties it had."""

from __future__ import annotations

import json

import pytest

import fedshield as fs
from fedshield.config import RunConfig
from fedshield.fl.messages import EvalReply, SiteInfo
from fedshield.fl.record import RoundRecord
from fedshield.fl.server import Server

from signing import identity_hex


def info(p: int, identity: str | None = None) -> SiteInfo:
    return SiteInfo(party=p, name=f"site-{p}", data="d.jsonl", train_examples=8,
                    eval_examples=2, eval_loss=3.0 + p, context_fp="",
                    identity=identity or identity_hex(p))


def fresh_server(n: int = 3) -> Server:
    server = Server(RunConfig.from_flat(clients=n, engine="flower"), None, engine="flower")
    server.enrol([(100 + p, info(p)) for p in range(n)])
    return server


def finish(server: Server, r: int, applied: list[int], missing: dict[int, object] = ()):
    """Round r's evaluate step: ``applied`` parties report version r; ``missing`` maps a party
    to its error (or None: no reply at all)."""
    server.current = RoundRecord(round=r)
    server.record.rounds.append(server.current)
    evals = [(100 + p, EvalReply(party=p, version=r, eval_loss=1.0, eval_examples=2,
                                 adapter_fp=f"a{p}" * 32)) for p in applied]
    evals += [(100 + p, err) for p, err in dict(missing).items() if err is not None]
    return server.finish_round(evals)


def test_a_party_that_misses_an_aggregate_is_behind_not_dropped():
    server = fresh_server()
    assert server.behind() == []
    finish(server, 1, [0, 2], {1: fs.FedShieldError("crashed")})
    assert server.behind() == [1] and server.catch_up_source() == 0
    assert sorted(server.participants.values()) == [0, 1, 2]        # still a participant
    assert not any(e.get("dropped") for e in server.record.events)
    assert not server.caught_up(1, 0, before_round=2, fingerprint="f" * 64)  # not 0's adapter
    assert server.record.events[-1]["dropped"] and server.behind() == []
    server = fresh_server()
    finish(server, 1, [0, 2], {1: fs.FedShieldError("crashed")})
    assert server.caught_up(1, 0, before_round=2, fingerprint="a0" * 32)
    assert server.behind() == []
    assert server.record.to_dict()["catch_ups"] == [
        {"before_round": 2, "party": 1, "from": 0, "version": 1}]
    finish(server, 2, [0, 1], {2: None})                             # party 2: no reply
    assert server.behind() == [2]
    server.catch_up_failed(2, 3, "no reply")                          # then it leaves
    assert sorted(server.participants.values()) == [0, 1]
    assert server.record.events[-1]["dropped"] and server.behind() == []


def test_no_source_when_nobody_holds_the_current_adapter():
    server = fresh_server(2)
    finish(server, 1, [], {0: None, 1: None})
    assert server.behind() == [0, 1] and server.catch_up_source() is None


def test_checkpoint_and_restore_go_on_from_the_recorded_round():
    server = fresh_server()
    finish(server, 1, [0, 1, 2])
    state = json.loads(json.dumps(server.checkpoint()))              # what is on disk
    again = Server(RunConfig.from_flat(clients=3, engine="flower"), None, engine="flower")
    again.restore(state)
    assert again.version == 1 and [r.round for r in again.record.rounds] == [1]
    initial = again.record.initial_eval_loss
    # the same parties come back (site 1 one round behind); the recorded start is kept
    again.enrol([(200 + p, info(p)) for p in range(3)], versions={0: 1, 1: 0, 2: 1},
                fingerprints={0: "a0" * 32, 1: "", 2: "a2" * 32})
    assert sorted(again.participants.values()) == [0, 1, 2] and again.behind() == [1]
    assert state["participants"] == [0, 1, 2] and state["dropped"] == []
    # a party that claims the round but holds another adapter than it reported is behind
    other = Server(RunConfig.from_flat(clients=3, engine="flower"), None, engine="flower")
    other.restore(state)
    other.enrol([(200 + p, info(p)) for p in range(3)], versions={0: 1, 1: 1, 2: 1},
                fingerprints={0: "a0" * 32, 1: "a1" * 32, 2: "e" * 64})
    assert other.behind() == [2]
    assert again.record.initial_eval_loss == initial
    # another identity claiming a party of the run is refused
    third = Server(RunConfig.from_flat(clients=3, engine="flower"), None, engine="flower")
    third.restore(state)
    third.enrol([(300, info(0)), (301, info(1, identity=identity_hex(9))), (302, info(2))])
    assert sorted(third.participants.values()) == [0, 2]
    assert "not the identity party 1 had" in third.record.events[-1]["reason"]


def test_restore_refuses_an_unknown_state_format():
    server = Server(RunConfig.from_flat(clients=2, engine="flower"), None, engine="flower")
    with pytest.raises(fs.FedShieldError, match="format"):
        server.restore({"format": 99})
