"""`fedshield run --engine flower`: a real SuperLink and one SuperNode per site, as separate
processes talking gRPC on loopback, driven by ``flwr run``.

The launcher does what each site would do on its own machine (docs: "Deployment on Flower"):
it gives every site a directory of its own (``OUT/flower/nodes/SITE``, mode 0700) with its data
file and its site config (``site.toml``), starts the site's worker from it
(``fedshield site worker --config site.toml``), and only then starts the site's SuperNode,
whose node config names nothing but the worker's socket and relay token. No key is made here:
each site's worker makes its identity key and, in the key set-up the ServerApp runs before
round 1, its key (or key share) in its own directory (fedshield.fl.key_setup); the ServerApp
writes the public context beside the SuperLink's (``OUT/flower/server/server.ctx``).

The sites of a launcher run report every metric (``metrics = "all"``): their one owner runs
them all on this machine. A real site chooses its own policy (default ``aggregate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from ...base.atomic import write_json_atomic
from ...config import RunConfig
from ...base.errors import DataError, FedShieldError, ParameterError
from ...trust.federation import federation_for_run
from ...fl.site_check import CHECKS, check_data_file, check_model
from ...fl.site_config import SiteConfig
from ...fl.site_files import site_files
from ...trust.identity import Identity
from ...run.outcome import RunFailed
from ...run.run_dir import METRICS, SERVER_STATE, claim_out_dir
from ...base.threads import ENV as THREADS_ENV
from ...base.threads import available_cpus
from . import site_executor, supernode
from .deployment import Deployment, DeploymentError, write_app_project
from .warm_start import write_spec
from .site_ipc import (NODE_SOCKET, NODE_TOKEN, RESUME_STATE, RUN_COMPLETE, SERVER_IDENTITY,
                       SIMULATION_SITES, Relay, SiteWorkerError)

log = logging.getLogger("fedshield")

SERVER_APP = "fedshield.engines.flower.server_app:app"
SITES_FILE = "sites.json"     # OUT/flower/: every site's config and relay (what --resume starts)
SITE_CONFIG = "site.toml"     # in each site's node directory
WORKERS = "site-workers"  # the warm process the site workers are forked from
WORKER_START_TIMEOUT = 600.0  # a worker's first answer (it imports torch before it listens)
CLIENT_APP = "fedshield.engines.flower.client_app:app"
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


@dataclass(frozen=True)
class LocalSite:
    """A site of a launcher run: its site config file and its SuperNode's node config."""

    config: Path
    node: dict

    def to_dict(self) -> dict:
        return {"site-config": str(self.config), "node-config": self.node}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalSite":
        return cls(Path(d["site-config"]), dict(d["node-config"]))


def precheck(cfg: RunConfig) -> RunConfig:
    """Before anything starts: every --site-data file exists, reads and has its columns, and
    --model is 'tiny' or a model directory; relative paths are made absolute against this
    process's directory (each site worker runs in its own node directory)."""
    cwd = Path.cwd()
    for path in cfg.data.site_data:
        problem = check_data_file(cwd / path, cfg.data.columns, "--site-data")
        if problem is None:
            continue
        if problem.check in ("columns", "content"):   # DataError's text names the file
            raise DataError(f"--site-data: {problem.detail}")
        raise DataError(f"--site-data {path!r}: {CHECKS[problem.check]} (looked for "
                        f"{problem.detail})")
    model = cfg.model.name
    if check_model(str(cwd / model) if model != "tiny" else model) is not None:
        raise ParameterError(f"--model {model!r}: {CHECKS['model']} (looked in "
                             f"{cwd / model})")
    changes = {}
    if cfg.data.site_data:
        changes["site_data"] = [os.path.abspath(p) for p in cfg.data.site_data]
    if model != "tiny":
        changes["model"] = os.path.abspath(model)
    return cfg.replace(**changes, _source="the launcher's absolute paths") if changes else cfg


def prepare_sites(cfg: RunConfig, work: Path, out: Path,
                  site_settings: Sequence[dict] = ()) -> tuple[list[LocalSite], Path]:
    """One directory per site (mode 0700) with its data file (a copy) and its site config
    (``site_settings[i]`` on top of the launcher's); returns the sites and where the
    ServerApp writes the public context."""
    if cfg.keys.setup == "dealer":
        raise ParameterError("--key-setup dealer is a simulation shortcut of the local engine; "
                             "on Flower every site makes its own keys (--key-setup protocol)")
    files = site_files(cfg, work / "split")
    node_dirs = []
    for i, f in enumerate(files):
        node_dir = work / "nodes" / f.name
        if node_dir in node_dirs:
            node_dir = work / "nodes" / f"{f.name}-{i}"
        node_dir.mkdir(parents=True, mode=0o700)
        node_dirs.append(node_dir)
    server_path = work / "server" / "server.ctx"
    server_path.parent.mkdir(parents=True, exist_ok=True)
    extra = list(site_settings) or [{} for _ in files]
    if len(extra) != len(files):
        raise ParameterError(f"site_settings: {len(extra)} entries for {len(files)} sites")
    pin_federation(cfg, [(f.name, d) for f, d in zip(files, node_dirs)], server_path.parent)
    sites = []
    for i, (f, node_dir, own) in enumerate(zip(files, node_dirs, extra)):
        data = node_dir / f"data{f.path.suffix}"
        shutil.copyfile(f.path, data)
        site = SiteConfig.from_dict({"node_dir": str(node_dir), "party_id": i, "name": f.name,
                                     "data": data.name, "columns": f.columns,
                                     "model": cfg.model.name, "out_dir": str(out),
                                     "federation": FEDERATION_FILE, "metrics": "all", **own},
                                    source=f"site {i}")
        path = site.save(node_dir / SITE_CONFIG)
        sites.append(LocalSite(path, {NODE_SOCKET: str(site.path("socket")),
                                      NODE_TOKEN: str(site.path("token_file"))}))
    shutil.rmtree(work / "split", ignore_errors=True)  # each node holds its own copy
    return sites, server_path


FEDERATION_FILE = "federation.json"   # in each site's node directory


def pin_federation(cfg: RunConfig, sites: Sequence[tuple[str, Path]], server_dir: Path) -> None:
    """What the sites of a real deployment do out of band (`fedshield federation`), done here
    for the sites this launcher deploys: every site and the server make an identity key in
    their own directory, the federation of the run's roster, parameters and floor is signed by
    all of them, and each site pins its copy (site config ``federation``). ``sites``: each
    site's (name, node directory)."""
    server = Identity.generate()
    server.save(server_dir / SERVER_IDENTITY_FILE)
    fed = federation_for_run(cfg, server.public)
    identities = []
    for name, node_dir in sites:
        identity = Identity.generate()
        identity.save(node_dir / "identity.key")
        identities.append(identity)
        fed = fed.with_member(name, identity.public)
    for identity in identities + [server]:
        fed = fed.signed_by(identity)
    for _, node_dir in sites:
        fed.save(node_dir / FEDERATION_FILE)


def write_app(app_dir: Path, cfg: RunConfig, server_ctx: Path, out: Path,
              app: FlowerApp) -> dict:
    """The Flower app project `flwr run` packs into a FAB; returns its run config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"fedshield-config": json.dumps(cfg.to_dict()),
                  "server-context": str(server_ctx), "out-dir": str(out),
                  SERVER_IDENTITY: str(server_ctx.parent / SERVER_IDENTITY_FILE),
                  # declared so that `flwr run --run-config` may set them (Flower refuses a
                  # key the app does not declare)
                  RESUME_STATE: "",
                  **app.run_config}
    write_app_project(app_dir, name="fedshield-run",
                      description="fedshield encrypted LoRA aggregation",
                      server_app=app.server_app, client_app=app.client_app, config=run_config,
                      dependencies=("fedshield[flower]",))
    # The FAB needs at least one module of its own; the apps themselves live in fedshield.
    (app_dir / "fedshield_run.py").write_text('"""fedshield run (components in fedshield.engines.flower)."""\n')
    for f in app.files:
        shutil.copy(f, app_dir / Path(f).name)
    return run_config


def run_flower(cfg: RunConfig, show_progress: bool | None = None, *,
               app: FlowerApp | None = None, node_env: dict | None = None,
               node_configs: list[dict] | None = None, site_settings: Sequence[dict] = (),
               late_node_configs: Sequence[dict] = (), overwrite: bool = False,
               simulation: SiteResources | None = None) -> dict:
    """Runs `cfg` on a loopback Flower deployment; returns the metrics (also in
    OUT/metrics.json) after the adapter and plots are written. OUT must not hold a run
    unless ``overwrite``. Every process it starts is ended when it returns or raises
    (KeyboardInterrupt included).

    ``node_configs`` adds entries to each SuperNode's node config (what a test's ClientApp
    reads); ``site_settings`` to each site's config (e.g. ``train_fn``); ``late_node_configs``
    starts extra SuperNodes once the sites are enrolled (they must take no part in the run).
    ``simulation``: the same ServerApp and ClientApp on Flower's simulation runtime (one
    SuperLink, virtual SuperNodes in ray actors, each site declaring these resources)."""
    _need_flower()
    cfg = precheck(cfg)
    app = app or FlowerApp()
    if simulation is not None and late_node_configs:
        raise ParameterError("late_node_configs: the simulation runtime has no SuperNodes to "
                             "start late")
    out = claim_out_dir(Path(cfg.engine.out).resolve(), overwrite=overwrite)
    work = out / "flower"
    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    sites, server_path = prepare_sites(cfg, work, out, site_settings)
    log.info("flower: %d site directories under %s (%s keys) in %.1f s", len(sites),
             work / "nodes", cfg.keys.mode, time.perf_counter() - start)
    extra = node_configs or [{} for _ in sites]
    sites = [replace(s, node={**s.node, **e}) for s, e in zip(sites, extra)]
    # what --resume starts the same sites from (their directories keep their files)
    write_json_atomic(work / SITES_FILE, {"sites": [s.to_dict() for s in sites],
                                          "server-context": str(server_path)})
    return _run(cfg, out, sites, server_path, app, node_env, late_node_configs, simulation,
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
        saved = json.loads(sites_path.read_text())
        sites = [LocalSite.from_dict(d) for d in saved["sites"]]
        server_path = Path(saved["server-context"])
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
    return _run(cfg, out, sites, server_path, app, node_env, (), None,
                rounds_left=cfg.training.rounds - done, start=time.perf_counter())


def _need_flower() -> None:
    try:
        import flwr  # noqa: F401, PLC0415
    except ImportError as exc:
        raise FedShieldError("--engine flower needs Flower: pip install 'fedshield[flower]'") from exc


def _run(cfg: RunConfig, out: Path, sites: list[LocalSite], server_path: Path, app: FlowerApp,
         node_env: dict | None, late_node_configs: Sequence[dict],
         simulation: SiteResources | None, *, rounds_left: int, start: float) -> dict:
    """Starts the sites' workers, deploys their SuperNodes and runs the app until the run is
    finished."""
    work, metrics_path = out / "flower", out / METRICS
    if simulation is not None:  # virtual SuperNodes find their relay by partition id
        app = replace(app, run_config={**app.run_config,
                                       SIMULATION_SITES: json.dumps([s.node for s in sites])})
    run_config = write_app(work / "app", cfg, server_path, out, app)
    # the site workers load the run's model and data while Flower starts
    preload = work / "run-config.json"
    write_json_atomic(preload, run_config)
    # train, share, evaluate per round plus enrolment and the key set-up's steps (the chain
    # and ~8 more), each bounded by round_timeout
    budget = cfg.engine.round_timeout * (3 * rounds_left + cfg.n_sites + 10) + 120
    late = [{**sites[0].node, **c} for c in late_node_configs]   # never sent any work
    # every site of this machine gets its share of the cores (FEDSHIELD_NUM_THREADS)
    share = str(max(1, available_cpus() // len(sites)))
    node_env = {THREADS_ENV: share, "OMP_NUM_THREADS": share, **(node_env or {})}
    try:
        if simulation is not None:
            code, metrics = _simulate(work, sites, node_env, simulation, budget, metrics_path,
                                      preload)
        else:
            code, metrics = _deploy(work, sites, late, node_env, budget, metrics_path,
                                    executor_command(app), preload,
                                    joins_wait=app.client_app == CLIENT_APP)
    except DeploymentError as exc:   # e.g. a killed SuperLink: what was recorded goes on
        raise RunFailed(str(exc), "run", _resume_hint(out)) from exc
    if code != 0 or not metrics.get("finished"):
        last = _last_error(work / "logs" / "flwr-run.log")
        kind = metrics.get("failure_kind") or _kind_of(last)
        raise RunFailed(f"the Flower run failed (flwr run exit code {code}): "
                        f"{metrics.get('failure') or last}; see {work / 'logs'} and "
                        f"{metrics_path}", kind,
                        None if kind in ("site", "keys") else _resume_hint(out))
    metrics["seconds_total"] = round(time.perf_counter() - start, 2)
    write_json_atomic(metrics_path, metrics)
    return metrics


def executor_command(app: FlowerApp) -> list[str] | None:
    """How each SuperNode's tasks are run: by the site's own executor (one process per
    SuperNode, fedshield.engines.flower.site_executor) when the app's ClientApp is fedshield's
    relay and this Flower release has the API the executor speaks; else (None) by Flower, one
    ClientApp process per message (e.g. a test's app with another ClientApp)."""
    if app.client_app != CLIENT_APP:
        return None
    if site_executor.UNAVAILABLE is not None:
        log.info("flower: %s", site_executor.UNAVAILABLE)
        return None
    return [sys.executable, "-m", "fedshield.cli", "site", "executor", "--insecure",
            "--clientappio-api-address"]


def supernode_command(executor: bool = False) -> list[str] | None:
    """How the sites' SuperNodes start: ``fedshield site supernode`` (Flower's SuperNode with
    a short idle poll, fedshield.engines.flower.supernode; with ``executor``, taking its own
    tasks from a thread: one process per site) where this Flower release is the one it
    checked; else (None) Flower's own flower-supernode."""
    if supernode.UNAVAILABLE is not None:
        log.info("flower: %s; the SuperNodes poll every %d s while idle", supernode.UNAVAILABLE,
                 supernode.FLOWER_IDLE)
        return None
    return [sys.executable, "-m", "fedshield.cli", "site", "supernode",
            *(["--executor"] if executor else []), "--"]


def _deploy(work: Path, sites: list[LocalSite], late: list[dict], node_env: dict | None,
            budget: float, metrics_path: Path, executor: list[str] | None,
            preload: Path, joins_wait: bool) -> tuple[int, dict]:
    """Runs the app: each site's worker first, then its SuperNode (in its own home) and, with
    ``executor``, the process that answers that SuperNode's messages. ``joins_wait``: the
    app's ClientApp is fedshield's relay, which holds a join until its worker listens, so the
    run starts without waiting for the workers."""
    n = len(sites)
    with Deployment(work, n + len(late), [s.node for s in sites] + late, env=node_env) as dep:
        workers_ready = _site_workers(sites, dep, preload)
        # Flower's processes and the run start while the workers import torch and load their
        # models: fedshield's relay holds the run's join until its worker listens
        # (client_app.JOIN_WAIT), and a worker that exits ends the run (Deployment.check_alive)
        dep.start_superlink()
        # the executor runs inside each SuperNode's process where it can: one process per site
        command = supernode_command(executor=executor is not None)

        def start_supernode(i: int) -> None:
            if command is not None and executor is not None:
                dep.start_supernode(i, command=command, isolated=True)
            else:
                dep.start_supernode(i, executor=executor, command=command)

        for i in range(n):
            start_supernode(i)
        if not joins_wait:   # another ClientApp (a test's) may ask the worker at once
            workers_ready()
        log.info("flower: SuperLink (fleet 127.0.0.1:%d) and %d SuperNodes started; logs in %s",
                 dep.fleet, n, dep.logs)
        pending = list(range(n, n + len(late)))
        reported = 0

        def on_poll() -> None:
            nonlocal reported
            if pending and metrics_path.exists() and '"participants"' in metrics_path.read_text():
                for i in pending:
                    log.info("flower: starting a late SuperNode (%d)", i)
                    start_supernode(i)
                pending.clear()
            reported = _log_new_rounds(metrics_path, reported)

        code = dep.run_app(work / "app", budget, on_poll=on_poll,
                           complete=lambda: _run_complete(metrics_path, dep.logs))
        return code, _wait_for_metrics(metrics_path, 60.0 if code == 0 else 5.0)


def _simulate(work: Path, sites: list[LocalSite], node_env: dict, resources: SiteResources,
              budget: float, metrics_path: Path, preload: Path) -> tuple[int, dict]:
    """The simulation runtime: a SuperLink with --simulation, no SuperNode processes; each
    site's worker gets its declared CPUs (and GPU)."""
    envs = [{**node_env, **resources.env(i)} for i in range(len(sites))]
    with Deployment(work, 0, [], env={**node_env, **RAY_PATIENCE}) as dep:
        workers_ready = _site_workers(sites, dep, preload, [{**dep.env, **e} for e in envs])
        dep.start_superlink(simulation=True)
        workers_ready()
        log.info("flower: simulation runtime, %d sites of %s; logs in %s", len(sites),
                 resources, dep.logs)
        attempts = 3
        for attempt in range(1, attempts + 1):
            code = dep.run_app(work / "app", budget,
                               federation_config=resources.federation_config(len(sites)))
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


def _site_workers(sites: list[LocalSite], dep: Deployment, preload: Path,
                  envs: list[dict] | None = None) -> Callable[[], None]:
    """Starts each site's worker as ``fedshield site worker --config`` would (in its node
    directory, in ``envs[i]``; default: the deployment's environment, its log in
    logs/site-worker-I.log), all forked from one process that imports torch and transformers
    once (fedshield.engines.flower.warm_start); what it returns waits until each answers over
    its relay. The deployment stops them with everything else it started, all at once."""
    envs = envs or [dep.env] * len(sites)
    workers = [{"config": site.config, "cwd": site.config.parent, "env": env,
                "log": dep.logs / f"site-worker-{i}.log"}
               for i, (site, env) in enumerate(zip(sites, envs))]
    spec = write_spec(dep.work / "site-workers.json", workers, exit_with=os.getpid(),
                      preload_run=preload)
    dep.start(WORKERS, [sys.executable, "-m", "fedshield.engines.flower.warm_start", str(spec)],
              vital=True)

    def ready() -> None:
        for i, site in enumerate(sites):
            _wait_for_worker(dep, f"site-worker-{i}", site)
        log.info("flower: %d site workers ready", len(sites))

    return ready


def _wait_for_worker(dep: Deployment, name: str, site: LocalSite) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    proc = dep.procs[WORKERS]  # the warm process: it ends when any worker has
    while True:
        try:
            Relay.from_node_config(site.node).request("ping", {}, timeout=30.0)
            return
        except SiteWorkerError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            site_log = SiteConfig.from_file(site.config).path("log_file")
            tail = site_log.read_text(errors="replace")[-2000:] if site_log.exists() else ""
            raise FedShieldError(f"the site worker of {site.config} "
                                 f"{'exited' if proc.poll() is not None else 'did not answer'}; "
                                 f"see {dep.logs / (name + '.log')} and {site_log}: {tail}")
        time.sleep(0.2)


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


def _run_complete(metrics_path: Path, logs: Path) -> bool:
    """Whether the ServerApp recorded the run finished and `flwr run` has printed its last
    line (so flwr-run.log holds all of its output)."""
    try:
        if not json.loads(metrics_path.read_text()).get("finished"):
            return False
        return RUN_COMPLETE in (logs / "flwr-run.log").read_text(errors="replace")
    except (OSError, ValueError):
        return False


def _resume_hint(out: Path) -> str:
    """What to do after a run stopped: resume it once it recorded a round."""
    if (out / SERVER_STATE).is_file():
        return f"resume with `fedshield run --resume {out}`"
    return "no round was recorded: run it again with --overwrite"


def _kind_of(error_line: str) -> str:
    """The failure kind of the ServerApp's last exception line (before it wrote one)."""
    head = error_line.split(":", 1)[0]
    if head.endswith(("KeySetupError", "KeyMessageRefused")):
        return "keys"
    return "storage" if head.endswith("StorageError") else "run"


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

    python -m fedshield.engines.flower.launcher app --config run.json --server-context PATH \\
        --out DIR --dir app/

    No key file is made here: every site makes its own in the key set-up the ServerApp runs.
    """
    parser = argparse.ArgumentParser(prog="python -m fedshield.engines.flower.launcher",
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
    try:
        cfg = RunConfig.from_file(args.config)
        if cfg.keys.setup == "dealer":
            raise ParameterError("--key-setup dealer is a simulation shortcut of the local "
                                 "engine; on Flower every site makes its own keys")
        write_app(Path(args.dir), cfg, Path(args.server_context), Path(args.out), FlowerApp())
    except (FedShieldError, OSError) as exc:   # one line, as every fedshield command
        print(f"fedshield: error: {exc}", file=sys.stderr)
        return 2
    print(Path(args.dir) / "pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
