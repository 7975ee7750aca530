"""`fedshield run --engine flower`: a real SuperLink and one SuperNode per site, as separate
processes talking gRPC on loopback, driven by ``flwr run``.

Each site gets a directory of its own (``OUT/flower/nodes/SITE``) holding its data file, and its
SuperNode runs there: its node config names only its own files, as in a real deployment where
each site is its own machine (README: "Deployment on Flower"). No key is made here: each site
makes its identity key and, in the key set-up the ServerApp runs before round 1, its key (or
key share) in its own directory (fedshield.fl.key_setup); the ServerApp writes the public
context beside the SuperLink's (``OUT/flower/server/server.ctx``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..atomic import write_json_atomic
from ..config import RunConfig
from ..errors import FedShieldError, ParameterError
from ..fl.federation import federation_for_run
from ..fl.site_files import site_files
from ..he.identity import Identity
from ..run_dir import METRICS, SERVER_STATE, claim_out_dir
from ..threads import ENV as THREADS_ENV
from ..threads import available_cpus
from .deployment import Deployment, DeploymentError, write_app_project
from .site_ipc import (RESUME_STATE, SERVER_IDENTITY, SIMULATION_SITES, SiteWorkerError, request, socket_path,
                       spawn_worker)

log = logging.getLogger("fedshield")

SERVER_APP = "fedshield.flower.server_app:app"
SITES_FILE = "sites.json"     # OUT/flower/: every site's node config (what --resume starts)
CLIENT_APP = "fedshield.flower.client_app:app"
SERVER_IDENTITY_FILE = "identity.key"   # OUT/flower/server/: the server's (pinned) identity


# What ray logs when it could not start on an overloaded node: its raylet did not register
# within its fixed 30 s, or its GCS server did not answer (nor write its logs) in time.
RAY_START_FAILURES = ("timed out during startup", "Failed to start GCS", "gcs_server.err")
# Ray gives its GCS server one second per retry to come up (20 by default): two minutes on
# a loaded node.
RAY_PATIENCE = {"RAY_NUM_REDIS_GET_RETRIES": "120"}


@dataclass(frozen=True)
class SiteResources:
    """What each site of a simulation-runtime run declares (many sites on one node): ``cpus``
    (its ray actors and its site worker's FEDSHIELD_NUM_THREADS) and ``gpus``, a fraction of a
    GPU (0: CPU only). Sites run in parallel as far as the node's CPUs and GPUs allow; each
    site worker is pinned to GPU ``devices[floor(i * gpus) % len(devices)]``."""

    cpus: int = 1
    gpus: float = 0.0
    devices: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1:
            raise ParameterError(f"cpus={self.cpus!r} must be an int >= 1 (per site)")
        if not (isinstance(self.gpus, (int, float)) and 0.0 <= self.gpus <= 1.0):
            raise ParameterError(f"gpus={self.gpus!r} must be a fraction of a GPU in [0, 1]")
        if self.gpus and not self.devices:
            raise ParameterError("gpus > 0 needs at least one GPU in devices")

    def env(self, site: int) -> dict:
        """The environment of site ``site``'s worker."""
        out = {THREADS_ENV: str(self.cpus), "OMP_NUM_THREADS": str(self.cpus)}
        out["CUDA_VISIBLE_DEVICES"] = (str(self.devices[int(site * self.gpus) % len(self.devices)])
                                       if self.gpus else "")
        return out

    def federation_config(self, n_sites: int) -> dict:
        """`flwr run --federation-config` of the simulation runtime."""
        return {"num-supernodes": n_sites, "client-resources-num-cpus": self.cpus,
                "client-resources-num-gpus": float(self.gpus)}


@dataclass
class FlowerApp:
    """What `flwr run` ships (the FAB): component references and extra module files."""

    server_app: str = SERVER_APP
    client_app: str = CLIENT_APP
    files: Sequence[Path] = ()
    run_config: dict = field(default_factory=dict)   # extra run-config entries
    site_workers: bool = True    # start each site's worker with its SuperNode (fedshield's apps)


def prepare_sites(cfg: RunConfig, work: Path) -> tuple[list[dict], Path]:
    """One directory per site with its data file (a copy); returns each site's node config
    and where the ServerApp writes the public context."""
    if cfg.keys.setup == "dealer":
        raise ParameterError("--key-setup dealer is a simulation shortcut of the local engine; "
                             "on Flower every site makes its own keys (--key-setup protocol)")
    files = site_files(cfg, work / "split")
    node_dirs = []
    for i, f in enumerate(files):
        node_dir = work / "nodes" / f.name
        if node_dir in node_dirs:
            node_dir = work / "nodes" / f"{f.name}-{i}"
        node_dir.mkdir(parents=True)
        node_dirs.append(node_dir)
    server_path = work / "server" / "server.ctx"
    server_path.parent.mkdir(parents=True, exist_ok=True)
    configs = []
    for i, (f, node_dir) in enumerate(zip(files, node_dirs)):
        data = node_dir / f"data{f.path.suffix}"
        shutil.copyfile(f.path, data)
        config = {"party-id": i, "name": f.name, "data": str(data),
                  "key-file": str(node_dir / "party.key"),
                  "identity-file": str(node_dir / "identity.key")}
        if f.columns:
            config["columns"] = f.columns
        configs.append(config)
    shutil.rmtree(work / "split", ignore_errors=True)  # each node holds its own copy
    pin_federation(cfg, configs, server_path.parent)
    return configs, server_path


def pin_federation(cfg: RunConfig, configs: list[dict], server_dir: Path) -> None:
    """What the sites of a real deployment do out of band (`fedshield federation`), done here
    for the sites this launcher deploys: every site and the server make an identity key in
    their own directory, the federation of the run's roster, parameters and floor is signed by
    all of them, and each site pins its copy (node config ``federation``)."""
    server = Identity.generate()
    server.save(server_dir / SERVER_IDENTITY_FILE)
    fed = federation_for_run(cfg, server.public)
    identities = []
    for config in configs:
        identity = Identity.generate()
        identity.save(config["identity-file"])
        identities.append(identity)
        fed = fed.with_member(config["name"], identity.public)
    for identity in identities + [server]:
        fed = fed.signed_by(identity)
    for config in configs:
        path = Path(config["key-file"]).parent / "federation.json"
        fed.save(path)
        config["federation"] = str(path)


def write_app(app_dir: Path, cfg: RunConfig, server_ctx: Path, out: Path,
              app: FlowerApp) -> dict:
    """The Flower app project `flwr run` packs into a FAB; returns its run config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"fedshield-config": json.dumps(cfg.to_dict()),
                  "server-context": str(server_ctx), "out-dir": str(out),
                  SERVER_IDENTITY: str(server_ctx.parent / SERVER_IDENTITY_FILE),
                  **app.run_config}
    write_app_project(app_dir, name="fedshield-run",
                      description="fedshield encrypted LoRA aggregation",
                      server_app=app.server_app, client_app=app.client_app, config=run_config,
                      dependencies=("fedshield[flower]",))
    # The FAB needs at least one module of its own; the apps themselves live in fedshield.
    (app_dir / "fedshield_run.py").write_text('"""fedshield run (components in fedshield.flower)."""\n')
    for f in app.files:
        shutil.copy(f, app_dir / Path(f).name)
    return run_config


def run_flower(cfg: RunConfig, show_progress: bool | None = None, *,
               app: FlowerApp | None = None, node_env: dict | None = None,
               node_configs: list[dict] | None = None,
               late_node_configs: Sequence[dict] = (), overwrite: bool = False,
               simulation: SiteResources | None = None) -> dict:
    """Runs `cfg` on a loopback Flower deployment; returns the metrics (also in
    OUT/metrics.json) after the adapter and plots are written. OUT must not hold a run
    unless ``overwrite``. Every process it starts is ended when it returns or raises
    (KeyboardInterrupt included).

    ``node_configs`` adds entries to each site's node config; ``late_node_configs`` starts
    extra SuperNodes once the sites are enrolled (they must take no part in the run).
    ``simulation``: the same ServerApp and ClientApp on Flower's simulation runtime (one
    SuperLink, virtual SuperNodes in ray actors, each site declaring these resources)."""
    _need_flower()
    app = app or FlowerApp()
    if simulation is not None and late_node_configs:
        raise ParameterError("late_node_configs: the simulation runtime has no SuperNodes to "
                             "start late")
    out = claim_out_dir(Path(cfg.engine.out).resolve(), overwrite=overwrite)
    work = out / "flower"
    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    configs, server_path = prepare_sites(cfg, work)
    log.info("flower: %d site directories under %s (%s keys) in %.1f s", len(configs),
             work / "nodes", cfg.keys.mode, time.perf_counter() - start)
    extra = node_configs or [{} for _ in configs]
    configs = [{**c, "out-dir": str(out), **e} for c, e in zip(configs, extra)]
    # what --resume starts the same sites from (their directories keep their files)
    write_json_atomic(work / SITES_FILE, {"sites": configs, "server-context": str(server_path)})
    return _run(cfg, out, configs, server_path, app, node_env, late_node_configs, simulation,
                rounds_left=cfg.training.rounds, start=start)


def resume_flower(out: str | Path, show_progress: bool | None = None, *,
                  rounds: int | None = None, app: FlowerApp | None = None,
                  node_env: dict | None = None) -> dict:
    """Goes on with the Flower run in OUT after its last recorded round (a killed SuperLink,
    ServerApp or launcher): the same sites from their own directories, each from the global
    adapter it last applied; parties that are behind catch up (README, "Resume").
    ``rounds`` extends the run."""
    _need_flower()
    out = Path(out).resolve()
    state_path, metrics_path = out / SERVER_STATE, out / METRICS
    sites_path = out / "flower" / SITES_FILE
    for path in (state_path, metrics_path, sites_path):
        if not path.is_file():
            raise ParameterError(f"--resume {str(out)!r}: no {path.name} there, so no Flower "
                                 "round was recorded to go on from (run it again with "
                                 "--overwrite)")
    try:
        recorded = json.loads(metrics_path.read_text())
        cfg = RunConfig.from_dict(recorded["config"], source=f"--resume {str(out)!r}")
        sites = json.loads(sites_path.read_text())
        configs, server_path = sites["sites"], Path(sites["server-context"])
        done = int(json.loads(state_path.read_text())["record"]["rounds"][-1]["round"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ParameterError(f"--resume {str(out)!r}: its server state does not load: "
                             f"{exc}") from exc
    cfg = cfg.replace(out=str(out), **({} if rounds is None else {"rounds": rounds}),
                      _source=f"--resume {str(out)!r}")
    if done > cfg.training.rounds:
        raise ParameterError(f"--resume {str(out)!r}: --rounds {cfg.training.rounds} is fewer "
                             f"than the {done} rounds the run has recorded")
    app = app or FlowerApp()
    app = replace(app, run_config={**app.run_config, RESUME_STATE: str(state_path)})
    log.info("flower: resuming %s after round %d of %d", out, done, cfg.training.rounds)
    return _run(cfg, out, configs, server_path, app, node_env, (), None,
                rounds_left=cfg.training.rounds - done, start=time.perf_counter())


def _need_flower() -> None:
    try:
        import flwr  # noqa: F401, PLC0415
    except ImportError as exc:
        raise FedShieldError("--engine flower needs Flower: pip install 'fedshield[flower]'") from exc


def _run(cfg: RunConfig, out: Path, configs: list[dict], server_path: Path, app: FlowerApp,
         node_env: dict | None, late_node_configs: Sequence[dict],
         simulation: SiteResources | None, *, rounds_left: int, start: float) -> dict:
    """Deploys the sites ``configs`` and runs the app until the run is finished."""
    work, metrics_path = out / "flower", out / METRICS
    if simulation is not None:  # virtual SuperNodes find their node config by partition id
        app = replace(app, run_config={**app.run_config,
                                       SIMULATION_SITES: json.dumps(configs)})
    run_config = write_app(work / "app", cfg, server_path, out, app)
    # train, share, evaluate per round plus enrolment and the key set-up's steps (the chain
    # and ~8 more), each bounded by round_timeout
    budget = cfg.engine.round_timeout * (3 * rounds_left + cfg.n_sites + 10) + 120
    late = [{**configs[0], "out-dir": str(out / "late"), **c} for c in late_node_configs]
    # every site of this machine gets its share of the cores (FEDSHIELD_NUM_THREADS)
    share = str(max(1, available_cpus() // len(configs)))
    node_env = {THREADS_ENV: share, "OMP_NUM_THREADS": share, **(node_env or {})}
    try:
        if simulation is not None:
            code, metrics = _simulate(work, configs, node_env, run_config, simulation, budget,
                                      metrics_path)
        else:
            code, metrics = _deploy(work, configs, late, node_env,
                                    run_config if app.site_workers else None, budget,
                                    metrics_path)
    except DeploymentError as exc:
        raise FedShieldError(str(exc)) from exc
    if code != 0 or not metrics.get("finished"):
        raise FedShieldError(f"the Flower run failed (flwr run exit code {code}): "
                             f"{_last_error(work / 'logs' / 'flwr-run.log')}; see "
                             f"{work / 'logs'} and {metrics_path}")
    metrics["seconds_total"] = round(time.perf_counter() - start, 2)
    write_json_atomic(metrics_path, metrics)
    return metrics


def _deploy(work: Path, configs: list[dict], late: list[dict], node_env: dict | None,
            run_config: dict | None, budget: float, metrics_path: Path) -> tuple[int, dict]:
    """Runs the app; ``run_config`` (when given) starts each site worker with its SuperNode."""
    n = len(configs)
    node_dirs = [Path(c["key-file"]).parent for c in configs]
    with Deployment(work, n + len(late), configs + late, env=node_env) as dep, \
            _site_workers(configs, node_dirs, run_config, dep):
        dep.start_superlink()
        for i in range(n):
            dep.start_supernode(i, cwd=node_dirs[i])
        log.info("flower: SuperLink (fleet 127.0.0.1:%d) and %d SuperNodes started; logs in %s",
                 dep.fleet, n, dep.logs)
        pending = list(range(n, n + len(late)))
        reported = 0

        def on_poll() -> None:
            nonlocal reported
            if pending and metrics_path.exists() and '"participants"' in metrics_path.read_text():
                for i in pending:
                    log.info("flower: starting a late SuperNode (%d)", i)
                    dep.start_supernode(i)
                pending.clear()
            reported = _log_new_rounds(metrics_path, reported)

        code = dep.run_app(work / "app", budget, on_poll=on_poll)
        return code, _wait_for_metrics(metrics_path, 60.0 if code == 0 else 5.0)


def _simulate(work: Path, configs: list[dict], node_env: dict, run_config: dict,
              resources: SiteResources, budget: float, metrics_path: Path) -> tuple[int, dict]:
    """The simulation runtime: a SuperLink with --simulation, no SuperNode processes; each
    site's worker gets its declared CPUs (and GPU)."""
    node_dirs = [Path(c["key-file"]).parent for c in configs]
    envs = [{**node_env, **resources.env(i)} for i in range(len(configs))]
    with Deployment(work, 0, [], env={**node_env, **RAY_PATIENCE}) as dep, \
            _site_workers(configs, node_dirs, run_config, dep,
                          [{**dep.env, **e} for e in envs]):
        dep.start_superlink(simulation=True)
        log.info("flower: simulation runtime, %d sites of %s; logs in %s", len(configs),
                 resources, dep.logs)
        attempts = 3
        for attempt in range(1, attempts + 1):
            code = dep.run_app(work / "app", budget,
                               federation_config=resources.federation_config(len(configs)))
            metrics = _wait_for_metrics(metrics_path, 60.0 if code == 0 else 5.0)
            log_text = (dep.logs / "flwr-run.log").read_text(errors="replace")
            # ray failed to start before any site was contacted: start the run once more
            ray_failed = any(f in log_text for f in RAY_START_FAILURES)
            if metrics.get("finished") or not ray_failed or attempt == attempts:
                return code, metrics
            log.warning("flower: ray did not start on this loaded node (attempt %d of %d); "
                        "starting the simulation once more", attempt, attempts)
            metrics_path.unlink(missing_ok=True)
        return code, metrics


@contextmanager
def _site_workers(configs: list[dict], node_dirs: list[Path], run_config: dict | None,
                  dep: Deployment, envs: list[dict] | None = None):
    """Starts each site's worker first (it loads its model and data while Flower starts up;
    its ClientApp finds it by its node config), in ``envs[i]`` (default: the deployment's
    environment). At the end of a run each is asked to shut down, then any still running is
    ended; when the run was interrupted or failed they are ended at once (a busy worker
    answers no shutdown request)."""
    if run_config is None:
        yield
        return
    paths = [socket_path(c) for c in configs]
    names = [f"site-worker-{i}" for i in range(len(configs))]
    envs = envs or [dep.env] * len(configs)
    for name, path, config, node_dir, env in zip(names, paths, configs, node_dirs, envs):
        dep.procs[name] = spawn_worker(path, config, run_config, os.getpid(), env=env,
                                       cwd=node_dir)
    finished = False
    try:
        yield
        finished = True
    finally:
        for path in paths if finished else ():
            try:
                request(path, "shutdown", {}, timeout=30.0)
            except SiteWorkerError:
                pass  # it already exited after the run's final message
        deadline = time.monotonic() + 10.0
        for name in names if finished else ():
            try:
                dep.procs[name].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        dep.stop(names)  # a worker ended by a signal leaves its socket and pid files
        for path in paths:
            for leftover in (path, path.with_suffix(".pid")):
                leftover.unlink(missing_ok=True)


def _log_new_rounds(metrics_path: Path, reported: int) -> int:
    """One line per round the ServerApp has recorded since the last call (its own log goes to
    the Flower logs): the user's progress. Returns the rounds reported so far."""
    try:
        metrics = json.loads(metrics_path.read_text())  # written atomically: whole or absent
    except (OSError, ValueError):
        return reported
    rounds = metrics.get("rounds", [])
    total = metrics.get("config", {}).get("training", {}).get("rounds")
    for r in rounds[reported:]:
        loss = r.get("eval_loss")
        log.info("flower: round %s/%s %s: eval loss %s, parties %s", r.get("round"), total,
                 r.get("status"), "n/a" if loss is None else f"{loss:.4f}", r.get("clients"))
    return max(reported, len(rounds))


def _last_error(log_path: Path) -> str:
    """The last exception line of the ServerApp's streamed log (flwr run exits 0 even when
    the ServerApp raised)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if head.endswith(("Error", "Exception", "Exit")) and " " not in head:
            return line.strip()
    return "no exception in the log"


def _wait_for_metrics(path: Path, timeout: float = 60.0) -> dict:
    """metrics.json once the ServerApp marked it finished (or failed)."""
    deadline = time.monotonic() + timeout
    metrics: dict = {}
    while time.monotonic() < deadline:
        if path.exists():
            try:
                metrics = json.loads(path.read_text())
            except json.JSONDecodeError:
                metrics = {}
            if metrics.get("finished") or "failure" in metrics:
                return metrics
        time.sleep(0.5)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Files for a multi-machine deployment (README, "Deployment on Flower"):

    python -m fedshield.flower.launcher app --config run.json --server-context PATH \\
        --out DIR --dir app/

    No key file is made here: every site makes its own in the key set-up the ServerApp runs.
    """
    parser = argparse.ArgumentParser(prog="python -m fedshield.flower.launcher",
                                     description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    app = sub.add_parser("app", help="the Flower app directory `flwr run` ships")
    app.add_argument("--config", required=True, help="run config (TOML or JSON)")
    app.add_argument("--server-context", required=True,
                     help="where the ServerApp writes the public context (server.ctx) of each "
                          "key epoch, on the SuperLink's machine")
    app.add_argument("--out", required=True,
                     help="directory for metrics.json and plots/ on the SuperLink's machine")
    app.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    cfg = RunConfig.from_file(args.config)
    if cfg.keys.setup == "dealer":
        parser.error("--key-setup dealer is a simulation shortcut of the local engine; on "
                     "Flower every site makes its own keys")
    write_app(Path(args.dir), cfg, Path(args.server_context), Path(args.out), FlowerApp())
    print(Path(args.dir) / "pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
