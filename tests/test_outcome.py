"""How a run ends (issue 23): exit status per failure kind, one `fedshield: error:` line
that says what to do, the Flower app's declared run config, and the ServerApp's record of a
site that could not enrol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedshield.base.errors import KeySetupError, ParameterError, StorageError
from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.run.outcome import (EXIT_CODES, EXIT_ERROR, EXIT_FAILED, EXIT_KEYS, EXIT_SITE,
                                   EXIT_STORAGE, RunFailed, exit_code)


def test_each_failure_kind_has_its_documented_status():
    assert exit_code(ParameterError("x")) == EXIT_ERROR == 2
    assert exit_code(RunFailed("x", "site")) == EXIT_SITE == 3
    assert exit_code(KeySetupError("x")) == exit_code(RunFailed("x", "keys")) == EXIT_KEYS == 4
    assert exit_code(StorageError("x")) == EXIT_STORAGE == 5
    assert exit_code(RunFailed("x")) == EXIT_FAILED == 6
    assert EXIT_CODES["interrupted"] == 130
    assert str(RunFailed("a site failed", "site")).startswith("a site failed; run `fedshield "
                                                              "site check")
    assert str(RunFailed("killed", next_step="resume with X")) == "killed; resume with X"
    with pytest.raises(ValueError, match="failure kind 'nope'"):
        RunFailed("x", "nope")
    # the table in docs/RUNS.md lists every status
    runs = (Path(__file__).resolve().parents[1] / "docs" / "RUNS.md").read_text()
    for kind, code in EXIT_CODES.items():
        assert f"| {code} | `{kind}` |" in runs, kind


def test_a_run_failure_is_one_line_with_its_status(monkeypatch, capsys, tmp_path):
    from fedshield.engines.flower import launcher

    def failing(*args, **kwargs):
        raise RunFailed("the Flower run failed: 2 of 3 sites enrolled", "site")

    monkeypatch.setattr(launcher, "run_flower", failing)
    code = cli_main(["run", "--engine", "flower", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_SITE and len(lines) == 1, lines
    assert lines[0].startswith("fedshield: error: the Flower run failed") and \
        "fedshield site check --config SITE.toml" in lines[0]


def test_the_app_launcher_says_one_line_for_a_bad_threshold(tmp_path, capsys):
    from fedshield.engines.flower.launcher import main

    config = tmp_path / "run.toml"
    config.write_text("[data]\nclients = 3\n[keys]\nmode = \"threshold\"\nthreshold = 5\n")
    code = main(["app", "--config", str(config), "--server-context", str(tmp_path / "s.ctx"),
                 "--out", str(tmp_path / "out"), "--dir", str(tmp_path / "app")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedshield: error: "), lines
    assert "at most the number of sites (3)" in lines[0]


def test_every_documented_run_config_key_is_declared_so_flwr_accepts_it(tmp_path):
    """`flwr run --run-config 'resume-state="..."'` is refused unless the app declares the
    key; every key docs/DEPLOYMENT.md names as a run-config key is declared."""
    pytest.importorskip("flwr")
    from flwr.common.config import get_fused_config_from_dir

    from fedshield.engines.flower.launcher import FlowerApp, write_app

    write_app(tmp_path / "app", RunConfig.from_flat(engine="flower"), tmp_path / "s.ctx",
              tmp_path / "out", FlowerApp())
    fused = get_fused_config_from_dir(tmp_path / "app", {"resume-state": "/srv/state.json"})
    assert fused["resume-state"] == "/srv/state.json"
    docs = (Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md").read_text()
    table = docs.split("| run-config key |", 1)[1].split("\n\n", 1)[0]
    documented = [row.split("`")[1] for row in table.splitlines()[2:]]
    assert documented and set(documented) <= set(fused), (documented, sorted(fused))


REFUSAL = ("<class 'fedshield.engines.flower.site_ipc.WorkerRefused'>:<'SiteCheckFailed: "
           "the site failed its start-up checks (party 2 (c): site setting 'data': a "
           "configured column is missing)'>")


class _JoinGrid:
    """Three connected nodes; node 3's site failed its start-up checks (Flower's error)."""

    def __init__(self, fields_of):
        self.fields_of = fields_of

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None):
        from flwr.common import ConfigRecord, Error, Message, RecordDict

        from fedshield.engines.flower.records import FIELDS

        return [Message(Error(code=2, reason=REFUSAL), reply_to=m)
                if m.metadata.dst_node_id == 3 else
                Message(RecordDict({FIELDS: ConfigRecord(self.fields_of[m.metadata.dst_node_id])}),
                        reply_to=m) for m in messages]


def test_a_site_that_refuses_to_join_is_named_and_stops_the_run_at_once(server_ctx):
    """The server records which site refused and why (Flower's wrapping removed), and the
    ServerApp's failure says that the key set-up needs every site."""
    pytest.importorskip("flwr")
    from signing import identity_hex

    from fedshield.engines.flower.server_app import enrolment_failure
    from fedshield.engines.flower.transport import GridTransport
    from fedshield.fl.messages import SiteInfo
    from fedshield.fl.server import Server

    def fields(party):
        info = SiteInfo(party=party, name=f"site-{party}", data="d.jsonl", train_examples=8,
                        eval_examples=2, eval_loss=1.5, context_fp=server_ctx.fingerprint.hex(),
                        identity=identity_hex(party))
        return {**info.to_fields(), "version": 0}

    server = Server(RunConfig.from_flat(clients=3, engine="flower"), server_ctx,
                    engine="flower")
    transport = GridTransport(_JoinGrid({1: fields(0), 2: fields(1)}), server)
    assert transport.enroll(timeout=5) == {1: 0, 2: 1}
    (event,) = server.record.events
    assert event["node"] == 3 and event["reason"] == (
        "refused to join: SiteCheckFailed: the site failed its start-up checks (party 2 (c): "
        "site setting 'data': a configured column is missing)")
    text = enrolment_failure(server, 3, [2])
    assert text.startswith("1 site(s) refused to join, and the key set-up needs every site: "
                           "node 3: refused to join: SiteCheckFailed")
    silent = Server(RunConfig.from_flat(clients=3, engine="flower"), server_ctx,
                    engine="flower")
    assert enrolment_failure(silent, 3, [1, 2]) == (
        "1 of 3 sites enrolled (parties [1, 2] did not answer), and the key set-up needs "
        "every site")


def test_an_os_error_fedshield_did_not_wrap_is_still_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli_main(["split", "--sites", "2", "--out", str(blocker / "sites")]) == EXIT_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedshield: error: ") and \
        "a-file" in lines[0], lines
