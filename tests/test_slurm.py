"""examples/slurm submitted for real: a one-node Slurm cluster of its own (slurmctld and slurmd
from Debian's slurm-wlm, munge), one SuperLink job and two site jobs, each site naming only its
own files; the run finishes and every job ends by itself. Slow; skipped where slurm-wlm is not
installed or the test is not root (slurmd runs jobs as their users)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedshield.config import RunConfig
from fedshield.fl.site_config import SiteConfig

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in TOOLS),
                       reason="slurm-wlm is not installed (apt-get install slurm-wlm)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private slurmd must run as root"),
]


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@pytest.fixture
def slurm(tmp_path):
    """A private one-node cluster; yields the environment its commands need."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)
    base = tmp_path / "slurm"
    for d in ("state", "spool"):
        (base / d).mkdir(parents=True)
    ctld, slurmd = _ports(2)
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text(f"""ClusterName=fedshield-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldPort={ctld}
SlurmdPort={slurmd}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
NodeName={host} CPUs=8 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = [subprocess.Popen([_sbin(d), "-D", "-f", str(conf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for d in ("slurmctld", "slurmd")]
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,
                                           capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (base / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


def _sbatch(env: dict, script: Path, cwd: Path, **exports) -> str:
    exports = {k: str(v) for k, v in exports.items()}   # --export=ALL: the job gets them
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--export=ALL",
                          f"--chdir={cwd}", str(script)], env={**env, **exports},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def test_superlink_and_site_jobs(tmp_path, slurm):
    from test_runner import sites_of_sizes

    files = sites_of_sizes(tmp_path / "given", [24, 24])
    cfg = RunConfig.from_flat(site_data=[str(f) for f in files], rounds=1, local_steps=2,
                              samples=0, prune="off", engine="flower", round_timeout=600.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(cfg.to_dict()))
    keys = tmp_path / "keys"  # each site's own: the key set-up writes its key there
    fleet, control, appio = _ports(3)
    common = dict(FEDSHIELD_INSECURE="1", FEDSHIELD_PYTHON=sys.executable,
                  FEDSHIELD_RUN=str(run), FEDSHIELD_WAIT="10")
    jobs = [_sbatch(slurm, SLURM / "superlink.sbatch", tmp_path, **common,
                    FEDSHIELD_CONFIG=str(run / "run.json"), FEDSHIELD_FLEET_PORT=fleet,
                    FEDSHIELD_CONTROL_PORT=control, FEDSHIELD_APPIO_PORT=appio)]
    for i, f in enumerate(files):   # each site's own config; these jobs test the scheduling
        site = SiteConfig.from_dict({"node_dir": str(keys / f"site-{i}"), "party_id": i,
                                     "data": str(f), "out_dir": str(tmp_path / f"site-{i}"),
                                     "metrics": "all", "insecure_trust_server_roster": True})
        (keys / f"site-{i}").mkdir(parents=True, mode=0o700)
        jobs.append(_sbatch(slurm, SLURM / "site.sbatch", f.parent, **common,
                            FEDSHIELD_SITE_CONFIG=site.save(keys / f"site-{i}" / "site.toml")))
    deadline = time.monotonic() + 1200
    while subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], env=slurm,
                         capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the jobs did not end"
        time.sleep(2)
    outputs = {j: next(tmp_path.rglob(f"fedshield-*-{j}.out")).read_text(errors="replace")
               for j in jobs}
    metrics = json.loads((run / "out" / "metrics.json").read_text())
    assert metrics.get("finished"), outputs[jobs[0]][-3000:]
    assert [r["status"] for r in metrics["rounds"]] == ["ok"]
    assert metrics["rounds"][0]["clients"] == [0, 1]
    assert [s["data"] for s in metrics["sites"]] == [str(f) for f in files]
    assert (tmp_path / "site-0" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "server.ctx").exists()  # the public context the sites' key set-up made
    for i in range(len(files)):
        assert (keys / f"site-{i}" / "party.key").stat().st_mode & 0o777 == 0o600
    assert not (run / "superlink.address").exists()
