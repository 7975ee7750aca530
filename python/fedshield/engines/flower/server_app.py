"""The fedshield ServerApp: enrols the sites, runs the rounds, writes metrics.json and plots.

Its loop is driven by the Grid: enrolment, then fedshield.fl.rounds.RoundDriver over the Grid
transport (fedshield.engines.flower.transport): with shared keys one message step per round
(and one more for the run's last aggregate), with threshold keys two.

Run config: ``fedshield-config`` (the run config as JSON), ``server-context`` (where it writes
the PUBLIC context each key set-up makes) and ``out-dir`` (where metrics.json and plots/ go).
The keys are made by the parties on their own nodes (fedshield.fl.key_setup); the server only
relays the set-up's messages. It holds no secret key and never imports openfhe or torch; it
never sees a plaintext update, the global adapter or a site's data.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from flwr.common import Context
from flwr.serverapp import Grid, ServerApp

from ...base.atomic import write_json_atomic
from ...config import RunConfig
from ...base.errors import FedShieldError
from ...fl.record import Resumption, RoundRecord
from ...fl.rounds import RoundDriver
from ...fl.server import Server
from ...trust.identity import Identity
from ...run.outcome import NEXT_STEP, RunFailed, failure_kind
from ...run.run_dir import METRICS, SERVER_STATE
from .polling import PromptGrid
from .records import CHUNK_BYTES, route_logs_to_flower
from .site_ipc import RESUME_STATE, RUN_COMPLETE, SERVER_IDENTITY
from .transport import GridTransport

log = logging.getLogger("fedshield")
app = ServerApp()


def _plot(metrics: dict, out: Path) -> None:
    """plots/ beside metrics.json, where matplotlib is installed (the `server` extra has it)."""
    try:
        from ...run.plots import plot_run  # noqa: PLC0415 - matplotlib is optional on a server
    except ImportError as exc:
        log.warning("no plots: %s (pip install 'fedshield[server]')", exc)
        return
    plot_run(metrics, out / "plots")


def enrolment_failure(server: Server, n_sites: int, missing: list[int]) -> str:
    """Which sites did not enrol, and each refusal the server got (a site that failed its
    start-up checks names itself, the setting and the check)."""
    refusals = [f"node {e['node']}: {e['reason']}" for e in server.record.events
                if e["stage"] == "join"]
    if refusals:   # the server stopped waiting at the first refusal
        return (f"{len(refusals)} site(s) refused to join, and the key set-up needs every "
                f"site: {'; '.join(refusals)}")
    return (f"{n_sites - len(missing)} of {n_sites} sites enrolled (parties {missing} did "
            "not answer), and the key set-up needs every site")


def _fail(record, metrics_path: Path, kind: str, message: str,
          cause: BaseException | None = None) -> None:
    """Records the failure and its kind in metrics.json (how `flwr run`'s user reads it) and
    raises, so the ServerApp exits non-zero and Flower marks the run failed."""
    record.failure = message
    record.failure_kind = kind
    record.write(metrics_path)
    log.error("the run failed (%s): %s; %s", kind, message, NEXT_STEP.get(kind, ""))
    raise RunFailed(message, kind) from cause


@app.main()
def main(grid: Grid, context: Context) -> None:
    route_logs_to_flower()   # in the ServerApp process only: importing this module changes no logger
    grid = PromptGrid(grid)
    rc = context.run_config
    cfg = RunConfig.from_dict(json.loads(str(rc["fedshield-config"])),
                              source="the run config's fedshield-config")
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    context_path = Path(str(rc["server-context"]))
    # the identity the sites' federation file pins (one made here would be refused by them)
    identity = (Identity.load(str(rc[SERVER_IDENTITY])) if str(rc.get(SERVER_IDENTITY, ""))
                else None)
    server = Server(cfg, None, engine="flower", flood_bits=cfg.ckks_params().flood_bits,
                    identity=identity)
    resume = str(rc.get(RESUME_STATE, ""))
    if resume:  # a restarted ServerApp: the run's record, rounds, key epoch and parties
        server.restore(json.loads(Path(resume).read_text()))
    metrics_path, state_path = out / METRICS, out / SERVER_STATE
    done = server.record.rounds[-1].round if server.record.rounds else 0

    def on_keys(ctx) -> None:
        context_path.parent.mkdir(parents=True, exist_ok=True)
        ctx.save(context_path, include_secret=False)
        server.record.write(metrics_path)

    def on_round(entry: RoundRecord) -> None:
        server.record.write(metrics_path)
        write_json_atomic(state_path, server.checkpoint())  # what --resume goes on from
        log.info("round %d %s: eval loss %s, parties %s, excluded %s", entry.round,
                 entry.status, entry.eval_loss, entry.clients,
                 [(e["party"], e["reason"]) for e in entry.excluded])

    transport = GridTransport(grid, server, chunk_bytes=int(rc.get("chunk-bytes", CHUNK_BYTES)))
    participants = transport.enroll(timeout=cfg.engine.round_timeout)
    driver = RoundDriver(server, transport.send, on_round=on_round, on_keys=on_keys)
    driver.steps["join"] = 1
    record = server.record
    record.participants = sorted(participants.values())
    record.write(metrics_path)
    missing = sorted(set(range(cfg.n_sites)) - set(participants.values()))
    if missing:   # every run starts with a key set-up, and it needs every party
        _fail(record, metrics_path, "site", enrolment_failure(server, cfg.n_sites, missing))
    if resume:
        record.resumed.append(Resumption(after_round=done,
                                         parties=sorted(participants.values())))
    try:
        for r in range(done + 1, cfg.training.rounds + 1):
            driver.run_round(r, last=r == cfg.training.rounds)
    except FedShieldError as exc:  # e.g. a party failed the key set-up: nothing decrypts
        kind = failure_kind(exc)
        _fail(record, metrics_path, "run" if kind == "error" else kind, str(exc), exc)
    record.not_enrolled = transport.late_nodes()
    # what the whole server process loaded, not only our modules
    record.server_loaded_openfhe = "openfhe" in sys.modules
    record.server_loaded_torch = "torch" in sys.modules
    _plot(record.to_dict(), out)
    # finished only once the plots are written too: the launcher stops waiting at this line
    record.finished = True
    record.write(metrics_path)
    log.info("%s: %s", RUN_COMPLETE, metrics_path)
