"""`fedshield run --engine flower`: a real SuperLink and one SuperNode per client, as separate
processes talking gRPC on loopback, driven by ``flwr run``.

The launcher plays the key dealer: it generates the keys with the run's CKKS parameters and
writes one key file per party (mode 0600) and the public server context. Everything a
process needs travels as a path in its node config or the run config, as in a real
deployment where each file sits on its own machine (README: "Deployment on Flower").
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..atomic import write_json_atomic
from ..config import RunConfig
from ..errors import FedShieldError
from ..he import keygen_shared, keygen_threshold
from ..runner import ckks_params
from .deployment import Deployment, DeploymentError, write_app_project

log = logging.getLogger("fedshield")

SERVER_APP = "fedshield.flower.server_app:app"
CLIENT_APP = "fedshield.flower.client_app:app"


@dataclass
class FlowerApp:
    """What `flwr run` ships (the FAB): component references and extra module files."""

    server_app: str = SERVER_APP
    client_app: str = CLIENT_APP
    files: Sequence[Path] = ()
    run_config: dict = field(default_factory=dict)   # extra run-config entries


def write_keys(cfg: RunConfig, key_dir: Path) -> tuple[list[Path], Path]:
    """One key file per party (0600) and the public server context."""
    key_dir.mkdir(parents=True, exist_ok=True)
    params = ckks_params(cfg)
    if cfg.keys == "threshold":
        parties, server_ctx = keygen_threshold(params, n_parties=cfg.clients,
                                               threshold=cfg.threshold or None)
    else:
        keys = keygen_shared(params)
        parties, server_ctx = [keys.client_context()] * cfg.clients, keys.server_context()
    paths = []
    for i, ctx in enumerate(parties):
        path = key_dir / f"party-{i}.key"
        ctx.save(path)
        paths.append(path)
    server_path = key_dir / "server.ctx"
    server_ctx.save(server_path, include_secret=False)
    return paths, server_path


def write_app(app_dir: Path, cfg: RunConfig, server_ctx: Path, out: Path,
              app: FlowerApp) -> None:
    """The Flower app project `flwr run` packs into a FAB."""
    app_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"fedshield-config": json.dumps(cfg.to_dict()),
                  "server-context": str(server_ctx), "out-dir": str(out), **app.run_config}
    write_app_project(app_dir, name="fedshield-run",
                      description="fedshield encrypted LoRA aggregation",
                      server_app=app.server_app, client_app=app.client_app, config=run_config,
                      dependencies=("fedshield[flower]",))
    # The FAB needs at least one module of its own; the apps themselves live in fedshield.
    (app_dir / "fedshield_run.py").write_text('"""fedshield run (components in fedshield.flower)."""\n')
    for f in app.files:
        shutil.copy(f, app_dir / Path(f).name)


def run_flower(cfg: RunConfig, show_progress: bool | None = None, *,
               app: FlowerApp | None = None, node_env: dict | None = None,
               node_configs: list[dict] | None = None,
               late_node_configs: Sequence[dict] = ()) -> dict:
    """Runs `cfg` on a loopback Flower deployment; returns the metrics (also in
    cfg.out/metrics.json) after the adapter and plots are written.

    ``node_configs`` adds entries to each party's node config; ``late_node_configs`` starts
    extra SuperNodes once the parties are enrolled (they must take no part in the run)."""
    try:
        import flwr  # noqa: F401, PLC0415
    except ImportError as exc:
        raise FedShieldError("--engine flower needs Flower: pip install 'fedshield[flower]'") from exc
    app = app or FlowerApp()
    out = Path(cfg.out).resolve()
    work = out / "flower"
    if work.exists():
        shutil.rmtree(work)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        metrics_path.unlink()
    start = time.perf_counter()
    key_paths, server_path = write_keys(cfg, work / "keys")
    log.info("flower: keys written to %s (%s mode) in %.1f s", work / "keys", cfg.keys,
             time.perf_counter() - start)
    configs = node_configs or [{} for _ in range(cfg.clients)]
    configs = [{"party-id": i, "key-file": str(key_paths[i]), "out-dir": str(out), **c}
               for i, c in enumerate(configs)]
    write_app(work / "app", cfg, server_path, out, app)
    # train, share, evaluate per round plus enrolment, each bounded by round_timeout
    budget = cfg.round_timeout * (3 * cfg.rounds + 2) + 120
    try:
        late = [{"party-id": 0, "key-file": str(key_paths[0]), "out-dir": str(out / "late"), **c}
                for c in late_node_configs]
        code, metrics = _deploy(work, cfg, configs, late, node_env, budget, metrics_path)
    except DeploymentError as exc:
        raise FedShieldError(str(exc)) from exc
    if code != 0 or not metrics.get("finished"):
        raise FedShieldError(f"the Flower run failed (flwr run exit code {code}): "
                             f"{_last_error(work / 'logs' / 'flwr-run.log')}; see "
                             f"{work / 'logs'} and {metrics_path}")
    metrics["seconds_total"] = round(time.perf_counter() - start, 2)
    write_json_atomic(metrics_path, metrics)
    return metrics


def _deploy(work: Path, cfg: RunConfig, configs: list[dict], late: list[dict],
            node_env: dict | None, budget: float, metrics_path: Path) -> tuple[int, dict]:
    with Deployment(work, len(configs) + len(late), configs + late, env=node_env) as dep:
        dep.start_superlink()
        for i in range(cfg.clients):
            dep.start_supernode(i)
        log.info("flower: SuperLink (fleet 127.0.0.1:%d) and %d SuperNodes started; logs in %s",
                 dep.fleet, cfg.clients, dep.logs)
        pending = list(range(cfg.clients, cfg.clients + len(late)))

        def start_late_nodes() -> None:
            if pending and metrics_path.exists() and '"participants"' in metrics_path.read_text():
                for i in pending:
                    log.info("flower: starting a late SuperNode (%d)", i)
                    dep.start_supernode(i)
                pending.clear()

        code = dep.run_app(work / "app", budget, on_poll=start_late_nodes)
        return code, _wait_for_metrics(metrics_path, 60.0 if code == 0 else 5.0)


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
            if "finished" in metrics:
                return metrics
        time.sleep(0.5)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Files for a multi-machine deployment (README, "Deployment on Flower"):

    python -m fedshield.flower.launcher keys --config run.json --dir keys/
    python -m fedshield.flower.launcher app --config run.json --server-context PATH \\
        --out DIR --dir app/
    """
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m fedshield.flower.launcher",
                                     description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="one key file per party (0600) and server.ctx (public)")
    keys.add_argument("--config", required=True, help="RunConfig JSON file")
    keys.add_argument("--dir", required=True)
    app = sub.add_parser("app", help="the Flower app directory `flwr run` ships")
    app.add_argument("--config", required=True, help="RunConfig JSON file")
    app.add_argument("--server-context", required=True,
                     help="path of server.ctx on the SuperLink's machine")
    app.add_argument("--out", required=True,
                     help="directory for metrics.json and plots/ on the SuperLink's machine")
    app.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    cfg = RunConfig.from_file(args.config)
    if args.command == "keys":
        paths, server = write_keys(cfg, Path(args.dir))
        print("\n".join(str(p) for p in [*paths, server]))
    else:
        write_app(Path(args.dir), cfg, Path(args.server_context), Path(args.out), FlowerApp())
        print(Path(args.dir) / "pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
