"""A site checks itself before it enrols (issue 23): `fedshield site check` reports each
problem (one test per check), a worker that fails a check refuses to join with a typed error
that names only the setting and the check, and the launcher refuses a bad --site-data or
--model before it starts anything."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.fl.site_check import CHECKS, SiteCheckFailed, check_site
from fedshield.fl.site_config import SiteConfig
from fedshield.engines.flower.launcher import pin_federation, precheck, prepare_sites
from fedshield.run.outcome import EXIT_SITE
from fedshield.trust.identity import Identity

ROWS = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(8)]


def _site(tmp_path: Path, pinned: bool = True, **settings) -> Path:
    """A site that passes every check (its identity pinned as party 0 of a signed
    federation), with ``settings`` on top; returns its config file."""
    node = tmp_path / "node"
    node.mkdir(mode=0o700)
    (node / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    if pinned:
        other = tmp_path / "other"
        other.mkdir()
        pin_federation(RunConfig.from_flat(clients=2), [("a", node), ("b", other)], tmp_path)
    values = {"node_dir": str(node), "party_id": 0, "data": "data.jsonl",
              **({"federation": "federation.json"} if pinned else {}), **settings}
    return SiteConfig.from_dict(values).save(tmp_path / "site.toml")


def _check(config: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = cli_main(["site", "check", "--config", str(config), *extra])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines() + captured.err.strip().splitlines()


def test_a_site_that_passes_every_check(tmp_path, capsys):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with listener:
        code, lines = _check(_site(tmp_path), capsys, "--superlink", f"127.0.0.1:{port}")
    assert code == 0 and len(lines) == 1, lines
    assert "pass" in lines[0] and f"127.0.0.1:{port} answers" in lines[0]


def _write(path: Path, text: str = "", mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


# check -> (site settings, what to break after the site is made, a word of the detail)
PROBLEMS = {
    "missing": ({"data": "gone.jsonl"}, None, "gone.jsonl"),
    "columns": ({}, lambda node: _write(node / "data.jsonl", "".join(
        json.dumps({"instruction": r["instruction"]}) + "\n" for r in ROWS)), "'output'"),
    "content": ({}, lambda node: _write(node / "data.jsonl", ""), "holds no examples"),
    "model": ({"model": "/no/such/model"}, None, "/no/such/model"),
    "mode": ({}, lambda node: (node / "identity.key").chmod(0o644), "chmod 600"),
    "key": ({}, lambda node: _write(node / "identity.key", "not a key"), "identity.key"),
    "not-pinned": ({}, lambda node: (node / "identity.key").unlink()
                   or Identity.generate().save(node / "identity.key"), "fingerprint"),
    "federation": ({}, lambda node: _write(node / "federation.json", "{}"), "federation"),
    "directory": ({}, None, "data.jsonl"),
}


@pytest.mark.parametrize("check", sorted(PROBLEMS))
def test_each_problem_is_reported_and_fails_the_check(tmp_path, capsys, check):
    settings, damage, detail = PROBLEMS[check]
    config = _site(tmp_path, **settings)
    node = tmp_path / "node"
    if check == "directory":   # the node directory is a file
        config = SiteConfig.from_dict({"node_dir": str(node / "data.jsonl"), "party_id": 0,
                                       "data": str(node / "data.jsonl")}).save(config)
    elif damage is not None:
        damage(node)
    code, lines = _check(config, capsys)
    assert code == EXIT_SITE, lines
    assert len(lines) == 2 and CHECKS[check] in lines[0], lines
    assert detail is None or detail in lines[0], lines
    assert lines[1].startswith("fedshield: error: ") and "1 problem(s)" in lines[1]


def test_a_missing_identity_is_reported_when_a_federation_is_pinned(tmp_path, capsys):
    config = _site(tmp_path)
    (tmp_path / "node" / "identity.key").unlink()
    code, lines = _check(config, capsys)
    assert code == EXIT_SITE and "identity_file: the file does not exist" in lines[0], lines


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_data_file_is_reported(tmp_path, capsys):
    config = _site(tmp_path)
    (tmp_path / "node" / "data.jsonl").chmod(0)
    code, lines = _check(config, capsys)
    assert code == EXIT_SITE and CHECKS["unreadable"] in lines[0], lines


def test_an_unreachable_superlink_is_reported_in_bounded_time(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]   # closed once the block ends: nothing listens there
    start = time.monotonic()
    code, lines = _check(_site(tmp_path), capsys, "--superlink", f"127.0.0.1:{port}",
                         "--timeout", "2")
    assert time.monotonic() - start < 10
    assert code == EXIT_SITE and "superlink: the SuperLink does not answer" in lines[0], lines


def test_a_site_that_fails_a_check_refuses_to_join_naming_only_the_setting(tmp_path):
    """The worker still answers ping (its SuperNode reaches it), but join gets a typed error
    with the party, the setting and the check's fixed words, never a path or a column."""
    from fedshield.engines.flower import site_worker as sw

    config = _site(tmp_path, name="clinic")
    (tmp_path / "node" / "data.jsonl").write_text(json.dumps({"instruction": "x",
                                                              "secret_col": "y"}) + "\n")
    (tmp_path / "node" / "identity.key").unlink()
    site = SiteConfig.from_file(config)
    problems = check_site(site)
    assert [(p.setting, p.check) for p in problems] == [("data", "columns"),
                                                        ("identity_file", "missing")]
    worker = sw.SiteWorker(site, problems)
    # no new identity key that the federation file would not pin
    assert not (tmp_path / "node" / "identity.key").exists()
    assert worker.handle("ping", {}, []) == ({}, [])
    with pytest.raises(SiteCheckFailed) as info:
        worker.handle("join", {"resume": False, "run-config": "{}"}, [])
    reply = sw.error_reply(info.value)
    assert reply == {"ok": False, "error-type": "SiteCheckFailed",
                     "error": "the site failed its start-up checks",
                     "detail": "party 0 (clinic): site setting 'data': a configured column "
                               "is missing"}


def _run_flower_cli(tmp_path: Path, capsys, *argv: str) -> tuple[int, str, float]:
    start = time.monotonic()
    code = cli_main(["run", "--engine", "flower", "--out", str(tmp_path / "out"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedshield: error: "), lines
    return code, lines[0], time.monotonic() - start


def test_the_launcher_refuses_a_bad_site_file_or_model_before_it_starts(tmp_path, capsys):
    """Acceptance (issue 23): a site file without its output column, a missing file, a
    missing model: non-zero at once, one line naming the file and the column; nothing ran."""
    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad = tmp_path / "b.csv"
    bad.write_text("instruction,input\n" + "".join(f"q{i},x\n" for i in range(8)))
    code, line, seconds = _run_flower_cli(tmp_path, capsys, "--site-data", str(good),
                                          "--site-data", str(bad))
    assert code != 0 and seconds < 60
    assert str(bad) in line and "missing column(s) 'output'" in line, line
    code, line, _ = _run_flower_cli(tmp_path, capsys, "--site-data", str(good),
                                    "--site-data", str(tmp_path / "gone.jsonl"))
    assert code != 0 and "gone.jsonl" in line and CHECKS["missing"] in line, line
    code, line, _ = _run_flower_cli(tmp_path, capsys, "--model", "no-such-model")
    assert code != 0 and "--model 'no-such-model'" in line and CHECKS["model"] in line, line
    assert not (tmp_path / "out" / "flower").exists()


def test_the_launcher_resolves_a_relative_model_and_site_files_against_its_own_dir(
        tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    for name in ("a.jsonl", "models/b.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(tmp_path / "models")
    cfg = precheck(RunConfig.from_flat(model="./m", site_data=["../a.jsonl", "b.jsonl"],
                                       engine="flower"))
    assert cfg.model.name == str(tmp_path / "models" / "m")
    assert list(cfg.data.site_data) == [str(tmp_path / "a.jsonl"),
                                        str(tmp_path / "models" / "b.jsonl")]
    # the sites' configs name it as given here, not inside their own node directories
    sites, _ = prepare_sites(cfg, tmp_path / "work", tmp_path / "out")
    assert {SiteConfig.from_file(s.config).model for s in sites} == {cfg.model.name}
    for s in sites:   # each worker runs in its node directory: its model check passes there
        monkeypatch.chdir(s.config.parent)
        assert [p.setting for p in check_site(SiteConfig.from_file(s.config))] == []


def test_a_worker_keeps_its_files_in_its_node_directory_wherever_it_starts(tmp_path,
                                                                           monkeypatch):
    """A site config with a relative node_dir: the worker's files (global/, key, identity,
    token, log, socket, out/) are under that directory, next to the config, not in the
    directory the worker (or its SuperNode) was started from."""
    from fedshield.engines.flower import site_worker as sw

    (tmp_path / "site").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = SiteConfig.from_dict({"node_dir": "node", "party_id": 0, "data": "d.jsonl"}
                                  ).save(tmp_path / "site" / "site.toml")
    monkeypatch.chdir(tmp_path / "elsewhere")
    site = SiteConfig.from_file(config)
    node = tmp_path / "site" / "node"
    worker = sw.SiteWorker(site, check_site(site))   # d.jsonl is missing: a problem
    assert worker.store.directory == node / "global"
    for setting in ("key_file", "identity_file", "token_file", "log_file", "socket", "out_dir"):
        assert site.path(setting).parent == node, setting
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.slow
def test_a_flower_run_stops_at_enrolment_when_a_site_fails_its_checks(tmp_path):
    """A real deployment whose site 1 names a model it does not have (as a site's own config
    may, where the launcher cannot check it): its worker refuses to join, and the run stops
    right after enrolment with status 3's kind, naming the site and the check, never the
    path."""
    pytest.importorskip("flwr")
    from fedshield.engines.flower.launcher import run_flower
    from fedshield.run.outcome import RunFailed

    cfg = RunConfig.from_flat(clients=2, rounds=2, local_steps=2, examples_per_client=16,
                              round_timeout=240.0, engine="flower", out=str(tmp_path / "run"))
    start = time.monotonic()
    with pytest.raises(RunFailed) as info:
        run_flower(cfg, site_settings=[{}, {"model": "/srv/secret-model"}])
    seconds = time.monotonic() - start
    assert info.value.kind == "site"
    text = str(info.value)
    assert "1 site(s) refused to join" in text, text
    assert "SiteCheckFailed" in text and "site setting 'model'" in text, text
    assert "secret-model" not in text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["failure_kind"] == "site" and metrics["rounds"] == []
    assert "site setting 'model'" in metrics["failure"]
    assert seconds < 120, seconds
