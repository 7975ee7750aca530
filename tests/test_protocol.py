"""The round protocol (fedshield.fl.protocol) and its driver (fedshield.fl.rounds): each
request and reply survives its wire form, a malformed one is refused naming what is wrong, and
a round takes one message step (the run's last aggregate one more)."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield.config import RunConfig
from fedshield.fl.messages import EvalReply, InvalidMessage, RoundPlan, ShareReply, SiteInfo, \
    TrainReply
from fedshield.fl.protocol import (Aggregate, CatchUp, CatchUpReply, CatchUpRequest,
                                   KeyCommit, ShareRequest, TrainRequest, TrainResult, reply_to_wire,
                                   request_from_wire)
from fedshield.fl.rounds import RoundDriver
from fedshield.fl.server import Server

PLAN = RoundPlan(round=3, lr=0.01, prune="global", prune_ratio=0.2, weight_bound=16.0,
                 base_version=2)
PREVIOUS = RoundPlan(round=2, lr=0.02, prune="global", prune_ratio=0.1, weight_bound=16.0,
                     base_version=1)


def _round_trip(request):
    fields, blobs = request.to_wire()
    return request_from_wire(request.op, fields, blobs)


def test_requests_survive_their_wire_form():
    full = TrainRequest(PLAN, Aggregate(PREVIOUS, blob=b"agg", shares=((0, b"s0", b"r0"),
                                                                       (2, b"s2", b"r2")),
                                        provenance=(b"manifest", b"record"), save_adapter=True),
                        CatchUp(version=1, source=0, sealed=b"sealed"),
                        KeyCommit(epoch=2, context_fp="0a" * 32))
    assert _round_trip(full) == full
    for request in (TrainRequest(PLAN), TrainRequest(None, Aggregate(PREVIOUS, blob=b"a")),
                    ShareRequest(round=2, present=(0, 2), aggregate=b"agg",
                                 provenance=(b"m", b"r")),
                    CatchUpRequest(version=2, to=(1, 3))):
        assert _round_trip(request) == request


def test_replies_survive_their_wire_form_and_the_metrics_policy():
    update = TrainReply(party=1, round=3, train_loss=0.5, kept_fraction=0.8,
                        seconds={"train": 1.0}, update=b"u", signature=b"sig",
                        metrics={"acc": 0.9})
    evaluation = EvalReply(party=1, version=2, eval_loss=0.7, eval_examples=4,
                           seconds_decrypt=0.1, budget_left=9, adapter_fp="ab")
    result = TrainResult(evaluation=evaluation, update=update, caught_up="cd")
    assert TrainResult.from_wire(*result.to_wire()) == result
    # a policy keeps its fields out of each part
    keep = lambda part: {k: v for k, v in part.items() if k not in ("train-loss", "eval-loss")}
    got = TrainResult.from_wire(*reply_to_wire(result, keep))
    assert got.update.train_loss is None and got.evaluation.eval_loss is None
    assert got.evaluation.budget_left == 9 and got.update.update == b"u"
    applied_only = TrainResult(evaluation=evaluation, train_error="TrainFnError: failed")
    assert TrainResult.from_wire(*applied_only.to_wire()) == applied_only
    committed = TrainResult(update=update, committed="0a" * 32)
    assert TrainResult.from_wire(*committed.to_wire()) == committed
    refused = TrainResult(commit_refused="KeySetupError: the key set-up failed at this site")
    assert TrainResult.from_wire(*refused.to_wire()) == refused
    share = ShareReply(share=b"s", seconds=0.2, signature=b"r")
    assert ShareRequest.reply_from_wire(*reply_to_wire(share)) == share
    request = CatchUpRequest(version=2, to=(1, 3))
    sealed = CatchUpReply(sealed={1: b"a", 3: b"b"})
    assert request.reply_from_wire(*sealed.to_wire()) == sealed


@pytest.mark.parametrize("op, fields, blobs, match", [
    ("train", {**PLAN.to_fields(), "train-fn": "os:system"}, [], "unknown fields"),
    ("train", {**PLAN.to_fields(), "round": "3"}, [], "round='3'"),
    ("train", {**PLAN.to_fields(), "lr": float("nan")}, [], "lr=nan"),
    ("train", {"apply.round": 2}, [b"agg"], "missing field"),
    ("train", {**{f"apply.{k}": v for k, v in PREVIOUS.to_fields().items()},
               "apply.shares": [0, 1], "apply.save-adapter": False}, [b"agg", b"s0"],
     "2 shares"),
    ("train", {**{f"apply.{k}": v for k, v in PREVIOUS.to_fields().items()},
               "apply.shares": [0, 0], "apply.save-adapter": False}, [b"a"] * 5, "twice"),
    ("train", PLAN.to_fields(), [b"stray"], "no aggregate"),
    ("train", {}, [], "neither a plan nor an aggregate"),
    ("train", {"catchup.version": 1, "catchup.from": 0}, [], "sealed adapter"),
    ("train", {**PLAN.to_fields(), "commit.epoch": 1}, [], "missing field 'commit.context-fp'"),
    ("train", {**PLAN.to_fields(), "commit.epoch": 0, "commit.context-fp": "ab"}, [],
     "commit.epoch=0"),
    ("train", {**PLAN.to_fields(), "commit.epoch": 1, "commit.context-fp": "../x"}, [],
     "not a hex fingerprint"),
    ("share", {"round": 2, "present": [0]}, [], "the aggregate"),
    ("share", {"round": 2, "present": [0], "out": 1}, [b"a"], "unknown fields"),
    ("catchup", {"version": 1, "to": [True]}, [], "list of ints"),
    ("evaluate", {}, [], "unknown round request"),
])
def test_malformed_requests_are_refused_naming_what_is_wrong(op, fields, blobs, match):
    with pytest.raises(InvalidMessage, match=match):
        request_from_wire(op, fields, blobs)


def test_malformed_replies_are_refused():
    fields, blobs = TrainResult(update=TrainReply(party=0, round=1, train_loss=1.0,
                                                  kept_fraction=1.0, update=b"u",
                                                  signature=b"s")).to_wire()
    with pytest.raises(InvalidMessage, match="signed record"):
        TrainResult.from_wire(fields, blobs[:1])
    with pytest.raises(InvalidMessage, match="eval-loss"):
        TrainResult.from_wire({"eval.party": 0, "eval.version": 1, "eval.eval-examples": 1,
                               "eval.eval-loss": float("inf")}, [])
    with pytest.raises(InvalidMessage, match="one sealed adapter for each"):
        CatchUpRequest(version=1, to=(1, 2)).reply_from_wire({}, [b"x"])


class _Sites:
    """A plaintext federation as a transport: each site's update is its party id + the
    round; it applies what it is sent and reports a loss that falls with the rounds."""

    def __init__(self, n):
        self.version = dict.fromkeys(range(n), 0)
        self.steps = []

    def send(self, requests):
        self.steps.append(sorted(requests))
        out = []
        for node, request in requests.items():
            evaluation = update = None
            if request.apply is not None:
                self.version[node] = request.apply.plan.round
                evaluation = EvalReply(party=node, version=request.apply.plan.round,
                                       eval_loss=1.0 / request.apply.plan.round,
                                       eval_examples=2)
            if request.plan is not None:
                assert request.plan.base_version == self.version[node]
                update = TrainReply(party=node, round=request.plan.round, train_loss=1.0,
                                    kept_fraction=1.0, weight=1.0,
                                    values={"w": np.full(2, node + request.plan.round,
                                                         np.float32)})
            out.append((node, TrainResult(evaluation=evaluation, update=update)))
        return out


def test_one_message_step_per_round_and_one_for_the_last_aggregate():
    cfg = RunConfig.from_flat(clients=3, rounds=3, he=False)
    server = Server(cfg, None, engine="local")
    server.enrol([(p, SiteInfo(party=p, name=f"s{p}", data="d", train_examples=4,
                               eval_examples=2, eval_loss=2.0)) for p in range(3)])
    sites = _Sites(3)
    closed = []
    driver = RoundDriver(server, sites.send, on_round=lambda entry: closed.append(entry.round))
    for r in (1, 2, 3):
        driver.run_round(r, last=r == 3)
    assert driver.steps == {"1": 1, "2": 1, "3": 1, "final": 1}
    assert server.record.message_steps == driver.steps
    assert sites.steps == [[0, 1, 2]] * 4
    assert closed == [1, 2, 3] and set(sites.version.values()) == {3}
    rounds = server.record.rounds
    assert [r.status for r in rounds] == ["ok"] * 3
    assert [r.eval_loss for r in rounds] == pytest.approx([1.0, 0.5, 1 / 3])
    # without pipelining (the local engine) each aggregate is applied in a step of its own
    server = Server(cfg, None, engine="local")
    server.enrol([(p, SiteInfo(party=p, name=f"s{p}", data="d", train_examples=4,
                               eval_examples=2, eval_loss=2.0)) for p in range(3)])
    driver = RoundDriver(server, _Sites(3).send, pipeline=False)
    for r in (1, 2):
        driver.run_round(r)
        assert server.record.rounds[-1].status == "ok" and server.version == r
    assert driver.steps == {"1": 2, "2": 2}
