"""The sites decide who is in the federation (fedshield.trust.federation): a co-signed federation
file that every site pins, a key set-up that refuses any roster, parameter or setting that
differs from it, and a floor no run config can lower."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import fedshield as fs
from fedshield.cli.commands import main as cli_main
from fedshield.config import RunConfig
from fedshield.trust.federation import Federation, Floor, RunSettings, load_pinned
from fedshield.fl.key_setup import KeyHolder
from fedshield.trust.identity import Identity
from fedshield.engines.local import LocalEngine

from federation_fixtures import Sites, pinned_federation

THRESHOLD = fs.CKKSParams.for_precision(keys="threshold")
SHARED = fs.CKKSParams()


def _parties(n):
    return [Identity.generate() for _ in range(n)], Identity.generate()


# -- the file ------------------------------------------------------------------------------------
def test_the_ceremony_on_the_command_line_makes_a_pinnable_file(tmp_path, capsys):
    keys = {who: tmp_path / f"{who}.key" for who in ("server", "a", "b", "c")}
    for key in keys.values():
        assert cli_main(["federation", "identity", str(key)]) == 0
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fed_file = str(tmp_path / "federation.json")
    assert cli_main(["federation", "init", fed_file, "--server", f"{keys['server']}.pub",
                     "--keys", "threshold", "--clients", "3", "--threshold", "2",
                     "--name", "hospitals"]) == 0
    for who in "abc":
        assert cli_main(["federation", "add", fed_file, "--name", f"hospital-{who}",
                         "--identity", f"{keys[who]}.pub"]) == 0
    assert cli_main(["federation", "show", fed_file, "--check"]) == 1   # nobody signed yet
    for who in ("a", "b", "server", "c"):
        assert cli_main(["federation", "sign", fed_file, "--identity", str(keys[who])]) == 0
    capsys.readouterr()
    assert cli_main(["federation", "show", fed_file, "--check"]) == 0
    shown = capsys.readouterr().out
    assert "complete" in shown and "NOT SIGNED" not in shown
    fed = load_pinned(fed_file)
    assert (fed.name, fed.keys, fed.n, fed.t) == ("hospitals", "threshold", 3, 2)
    assert fed.roster == {p: Identity.load(keys[w]).public for p, w in enumerate("abc")}
    assert fed.params == RunConfig.from_flat(keys="threshold", clients=3,
                                             threshold=2).ckks_params()
    # secure by default: the floor verifies aggregates unless told not to
    assert fed.floor.verify_aggregates is True and fed.floor.flood_bits == 30


def test_a_federation_below_its_own_floor_is_refused():
    _, server = _parties(0)
    with pytest.raises(fs.FederationError, match="below the federation's own floor"):
        Federation.create("x", "threshold", 3, 2, THRESHOLD, Floor(flood_bits=30), "server",
                          server.public)


def test_init_takes_floor_settings_and_refuses_bad_ones(tmp_path, capsys):
    Identity.generate().save(tmp_path / "s.key")
    cli_main(["federation", "identity", str(tmp_path / "s.key")])
    f = str(tmp_path / "f.json")
    assert cli_main(["federation", "init", f, "--server", f"{tmp_path}/s.key.pub",
                     "--clients", "4", "--no-verify-aggregates", "--floor-quorum", "3",
                     "--floor-min-parties", "3"]) == 0
    floor = Federation.load(f).floor
    assert (floor.verify_aggregates, floor.quorum, floor.min_parties) == (False, 3, 3)
    assert cli_main(["federation", "init", f, "--server", f"{tmp_path}/s.key.pub"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["federation", "init", f, "--overwrite", "--server", f"{tmp_path}/s.key.pub",
                     "--clients", "3", "--floor-quorum", "5"]) == 2
    assert "quorum=5 and min_parties" in capsys.readouterr().err
    (tmp_path / "bad.pub").write_text("not hex")
    assert cli_main(["federation", "init", f, "--overwrite", "--server",
                     str(tmp_path / "bad.pub")]) == 2
    assert "is not a public identity file" in capsys.readouterr().err


def test_a_file_changed_after_signing_is_not_pinnable(tmp_path):
    ids, server = _parties(3)
    fed = pinned_federation(ids, server, "threshold", 2, THRESHOLD)
    path = tmp_path / "f.json"
    fed.save(path)
    load_pinned(path)
    edits = {
        "floor lowered": lambda b: b["floor"].update(verify_aggregates=False, quorum=1),
        "member swapped": lambda b: b["members"][1].update(
            identity=Identity.generate().public.to_bytes().hex()),
        "threshold": lambda b: b.update(t=3),
        "parameters": lambda b: b["params"].update(scale_bits=40),
        "server": lambda b: b["server"].update(
            identity=Identity.generate().public.to_bytes().hex()),
    }
    for what, edit in edits.items():
        data = json.loads(path.read_text())
        edit(data["body"])
        (tmp_path / "edited.json").write_text(json.dumps(data))
        with pytest.raises(fs.FederationError, match="lacks valid signatures"):
            load_pinned(tmp_path / "edited.json")
    # adding a member drops every signature; an outsider cannot sign; nor can anyone sign an
    # incomplete file
    partial = Federation.create("x", "shared", 2, 2, SHARED, Floor(), "server", server.public)
    partial = partial.with_member("a", ids[0].public)
    with pytest.raises(fs.FederationError, match="1 of its 2 members"):
        partial.signed_by(ids[0])
    full = partial.with_member("b", ids[1].public).signed_by(ids[0])
    with pytest.raises(fs.FederationError, match="neither a member nor the server"):
        full.signed_by(ids[2])
    with pytest.raises(fs.FederationError, match="already has its 2 members"):
        full.with_member("c", ids[2].public)
    with pytest.raises(fs.FederationError, match="identity of another member"):
        partial.with_member("again", ids[0].public)


def test_malformed_federation_files_are_federation_errors(tmp_path):
    ids, server = _parties(2)
    text = pinned_federation(ids, server, "shared", 2, SHARED).to_json()
    path = tmp_path / "f.json"
    for bad in ["", "[]", "{}", '{"format": "fedshield-federation-v1"}', "\x00" * 10,
                text.replace('"keys": "shared"', '"keys": "both"'),
                text.replace('"n": 2', '"n": 0'), text.replace('"n": 2', '"n": true'),
                text.replace('"name": "site-0"', '"name": ""')]:
        path.write_text(bad)
        with pytest.raises(fs.FederationError):
            load_pinned(path)
    rng = random.Random(7)
    raw = text.encode()
    refused = 0
    for _ in range(300):   # random byte edits: a typed refusal or still the signed file
        data = bytearray(raw)
        data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            fed = load_pinned(path)
        except fs.FederationError:
            refused += 1
            continue
        assert fed.body_bytes() == Federation.from_json(text).body_bytes()
    assert refused > 250   # only edits of insignificant bytes (e.g. whitespace) pass
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(fs.FederationError, match="over"):
        load_pinned(path)


# -- what a site's key holder refuses -----------------------------------------------------------
def test_a_site_without_a_pinned_federation_refuses_to_join(tmp_path):
    with pytest.raises(fs.KeySetupError, match="no pinned federation file"):
        KeyHolder(0, Identity.generate(), tmp_path / "k")
    with pytest.raises(fs.KeySetupError, match="no pinned federation file"):
        KeyHolder(0, Identity.generate(), tmp_path / "k", trust_server_roster=1)
    ids, server = _parties(2)
    unsigned = pinned_federation(ids, server, "shared", 2, SHARED)
    unsigned = replace(unsigned, signatures={})
    with pytest.raises(fs.FederationError, match="lacks valid signatures"):
        KeyHolder(0, ids[0], tmp_path / "k", federation=unsigned)
    KeyHolder(0, ids[0], tmp_path / "k", trust_server_roster=True)   # the explicit opt-in


@pytest.mark.parametrize("mode,params,t", [("shared", SHARED, 3), ("threshold", THRESHOLD, 3)])
def test_a_server_made_roster_is_refused_before_any_key_exists(tmp_path, mode, params, t):
    """The audit's attack: one honest site, the other roster slots filled with identities the
    server made. The pinned site refuses at keys.begin; no key is made, nothing decrypts."""
    ids, server = _parties(3)
    fed = pinned_federation(ids, server, mode, t, params)
    sites = Sites(tmp_path, fed, ids, server, params, mode, t)
    sites.impersonate(1)
    sites.impersonate(2)
    with pytest.raises(fs.KeySetupError, match="party 0 failed keys.begin: .*differs from the "
                                               r"pinned federation.*parties \[1, 2\]"):
        sites.run()
    assert not (tmp_path / "node-0").exists()   # no key file, no budget: nothing to decrypt
    assert sites.holders[0].committed is None and sites.holders[0].epoch is None


def test_the_same_attack_works_on_a_site_that_trusts_the_server(tmp_path):
    """What the pin prevents (shared keys): a site that trusts the server's roster seals its
    key to a server-made identity, which then holds the key every update is encrypted with."""
    ids, server = _parties(2)
    sites = Sites(tmp_path, None, ids, server, SHARED, "shared", 2)
    sites.impersonate(1)
    result = sites.run()
    stolen = sites.holders[1].committed
    assert stolen is not None and stolen.has_secret_key
    assert stolen.fingerprint == result.context.fingerprint


@pytest.mark.parametrize("setting,change,named", [
    ("verify", dict(verify_aggregates=False), "verify_aggregates=false"),
    ("quorum", dict(quorum=2), "quorum=2"),
    ("flooding", dict(flood_bits=0), "flood_bits=0"),
    ("budget", dict(decryption_budget=30), "decryption_budget=30"),
])
def test_a_run_below_the_floor_is_refused_naming_the_setting(tmp_path, setting, change, named):
    ids, server = _parties(3)
    floor = Floor(verify_aggregates=True, quorum=3, min_parties=3, flood_bits=30,
                  decryption_budget=20)
    flooded = fs.CKKSParams.for_precision(keys="threshold", n_parties=3, flood_bits=30)
    fed = pinned_federation(ids, server, "threshold", 3, flooded, floor=floor)
    settings = replace(RunSettings.of(flooded, True, 3), **change)
    sites = Sites(tmp_path, fed, ids, server, flooded, "threshold", 3, settings=settings)
    with pytest.raises(fs.KeySetupError, match=f"below this site's pinned security floor: "
                                               f".*{named}"):
        sites.run()


def test_parameters_differing_from_the_pinned_ones_are_named(tmp_path):
    ids, server = _parties(2)
    fed = pinned_federation(ids, server, "shared", 2, SHARED)
    other = replace(SHARED, scale_bits=SHARED.scale_bits - 2)
    sites = Sites(tmp_path, fed, ids, server, other, "shared", 2)
    with pytest.raises(fs.KeySetupError, match=rf"parameters scale_bits={other.scale_bits} "
                                               rf"\(pinned: {SHARED.scale_bits}\)$"):
        sites.run()
    sites = Sites(tmp_path, fed, ids, Identity.generate(), SHARED, "shared", 2)
    with pytest.raises(fs.KeySetupError, match="the server's identity .* \\(pinned: "):
        sites.run()


def test_the_guard_takes_the_higher_of_the_run_and_the_floor(tmp_path):
    ids, server = _parties(3)
    floor = Floor(verify_aggregates=True, quorum=2, min_parties=3, flood_bits=0,
                  decryption_budget=20)
    fed = pinned_federation(ids, server, "shared", 3, SHARED, floor=floor)
    sites = Sites(tmp_path, fed, ids, server, SHARED, "shared", 3,
                  settings=RunSettings.of(SHARED, True, 3))
    sites.run()
    assert all(h.guard_settings == (3, True) for h in sites.holders.values())
    assert floor.guard_settings(RunSettings.of(SHARED, True, 2)) == (3, True)


# -- the local engine goes through the same path --------------------------------------------
@pytest.mark.parametrize("keys", ["shared", "threshold"])
def test_the_local_engine_pins_its_sites_federation(tmp_path, keys):
    cfg = RunConfig.from_flat(clients=3, rounds=1, examples_per_client=8, local_steps=1,
                              batch_size=4, lora_r=2, keys=keys, verify_aggregates=True,
                              out=str(tmp_path))
    engine = LocalEngine(cfg, show_progress=False)
    honest = dict(engine.server.roster)
    engine.server.roster[2] = Identity.generate().public   # a server-made identity
    with pytest.raises(fs.KeySetupError, match="pinned federation"):
        engine.run_round(1)
    assert all(site.party.ctx is None for site in engine.sites)   # no key, no decryption
    fed = engine.federation
    fed.check_pinnable()
    assert fed.roster == honest and fed.params == cfg.ckks_params()
    assert fed.floor.verify_aggregates and Federation.from_json(fed.to_json()) == fed


def test_the_deployment_ceremony_as_written_pins_a_federation(tmp_path):
    """docs/DEPLOYMENT.md's federation ceremony, run as written: a file every site can pin."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md").read_text()
    block = doc.split("<!-- run: federation ceremony", 1)[1].split("```bash\n", 1)[1]
    block = block.split("```", 1)[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fed = load_pinned(tmp_path / "federation.json")
    assert [m.name for m in fed.members] == ["site-a", "site-b", "site-c"]
    assert fed.roster[1] == Identity.load(tmp_path / "site-b" / "identity.key").public
    assert (fed.keys, fed.n, fed.t, fed.floor.verify_aggregates) == ("threshold", 3, 2, True)
