"""The site worker: the part of a site that holds its key, its data and its guard.

A site starts it from its own fedshield install with its own site config
(``fedshield site worker --config SITE.toml``, fedshield.fl.site_config), under an account the
SuperNode's account cannot read. It keeps the model, the tokenized data, the key and the global
adapter between rounds, in the site's node directory (mode 0700).

Flower ships the ClientApp to the SuperNode in the app package (FAB), so the site does not trust
it: the ClientApp only relays the server's requests over the worker's Unix socket, after proving
it holds the relay secret (fedshield.engines.flower.site_ipc). The worker answers the protocol's
requests and nothing else (:data:`REQUESTS`): every field is checked against its type, no
request returns a file, a key, the data or a setting, and none changes a setting. The run's
hyperparameters come with ``join`` (the server's run config); a run config that names a site
setting (train_fn, the metrics policy, any file) is refused. What leaves the site follows its
metrics policy (:data:`WITHHELD`), and a failure leaves it as an error type and a fixed
message (:func:`error_reply`); the details go to the site's own log.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from ...config import RunConfig
from ...base.errors import (AuthenticationError, DataError, DecryptionBudgetExceeded,
                      DecryptionRefused, FedShieldError, IncompatibleUpdate, InvalidUpdate,
                      KeyMaterialError, KeyMessageRefused, KeySetupError, NotEnoughShares,
                      ParameterError, StorageError)
from ...trust.federation import load_pinned
from ...fl.key_setup import NOT_PINNED, refusal_fields
from ...fl.adapter_store import AdapterStore, adapter_fingerprint
from ...fl.messages import InvalidMessage
from ...fl.party import Party
from ...fl.protocol import (APPLY, CATCH, CATCHUP, COMMIT, PLAN_FIELDS, SHARE, TRAIN,
                            reply_to_wire, request_from_wire)
from ...fl.site import Site, load_site_data
from ...fl.site_check import SiteCheckFailed, check_site
from ...fl.site_config import SiteConfig, site_settings_in
from ...fl.site_rounds import OutOfStep, SiteRounds
from ...fl.train_fn import TrainFnError, load_train_fn
from ...trust.identity import Identity
from ...training.lora import build_lora_model
from ...training.base_model import load_tokenizer
from ...base.threads import apply_to_torch
from .site_ipc import (HANDSHAKE_TIMEOUT, MAX_HEAD, SiteWorkerError, make_token, prove_worker,
                       read_token, recv_frame, send_frame, unix_address)

log = logging.getLogger("fedshield")


class RequestRefused(FedShieldError):
    """A relayed request outside the protocol: an unknown operation, an unknown field, or a
    field of the wrong type."""


class NotJoined(FedShieldError):
    """A round request before the server's ``join`` told the worker the run's settings."""


class RunConfigRefused(FedShieldError):
    """The server's run config names a setting that only the site decides."""


# The only text of a failure that leaves the site: per error type (the first match along the
# exception's classes), a fixed message. No value, repr or path of the site's goes with it.
FIXED_MESSAGES: dict[type, str] = {
    RequestRefused: "the site worker does not answer this request",
    SiteCheckFailed: "the site failed its start-up checks",
    NotJoined: "the site has not joined a run",
    RunConfigRefused: "the run config names a setting that only the site decides",
    OutOfStep: "the party's global adapter is not the one this request builds on",
    TrainFnError: "the site's training function failed",
    KeySetupError: "the key set-up failed at this site",
    AuthenticationError: "a signature or sealed message did not verify",
    DecryptionRefused: "the site's guard refused to decrypt",
    DecryptionBudgetExceeded: "the site's decryption budget is spent",
    NotEnoughShares: "not enough partial decryptions to decrypt",
    InvalidMessage: "a request field is malformed",
    InvalidUpdate: "an update or aggregate was refused",
    IncompatibleUpdate: "an update or aggregate does not match this site's",
    KeyMaterialError: "the site lacks the key material for this request",
    StorageError: "the site could not write its files",
    DataError: "the site's data could not be used",
    ParameterError: "a setting or request value is invalid",
    FedShieldError: "the site refused this request",
}
UNEXPECTED = ("SiteError", "the site could not answer this request")


# Errors whose own text also leaves the site (as "detail"): the key set-up protocol composes
# it from what the server and the other parties sent (party ids, epochs, the run's settings,
# the pinned federation's name), never from the site's files, data or keys, and the server
# needs it to learn which setting or party a site refuses.
# A failed start-up check names only the party, the setting and the check's fixed words.
PROTOCOL_DETAIL = (KeySetupError, SiteCheckFailed)
MAX_DETAIL = 600


def error_reply(exc: BaseException) -> dict:
    """A site-side exception as the reply that leaves the site: its type (a fedshield error's
    own class name, else the nearest fedshield class or 'SiteError') and a fixed message; a
    key set-up refusal also names what it refuses (PROTOCOL_DETAIL)."""
    for cls in type(exc).__mro__:
        if cls in FIXED_MESSAGES:
            own = type(exc).__module__.startswith("fedshield.")
            reply = {"ok": False, "error-type": type(exc).__name__ if own else cls.__name__,
                     "error": FIXED_MESSAGES[cls]}
            if isinstance(exc, PROTOCOL_DETAIL) and own:
                reply["detail"] = str(exc)[:MAX_DETAIL]
            return reply
    return {"ok": False, "error-type": UNEXPECTED[0], "error": UNEXPECTED[1]}


def describe(exc: BaseException) -> str:
    """A training failure after the site applied the aggregate (or a refused key commit), as
    its train reply tells it: the error's type and fixed message, and a key set-up refusal's
    detail (PROTOCOL_DETAIL); the other details go to the site's log."""
    reply = error_reply(exc)
    detail = f" ({reply['detail']})" if "detail" in reply else ""
    return f"{reply['error-type']}: {reply['error']}{detail}"


# -- the requests the worker answers -----------------------------------------------------------
MAX_LIST = 1 << 14
MAX_SECTIONS = 1 << 14


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool(v) -> bool:
    return isinstance(v, bool)


def _str(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_HEAD


def _ints(v) -> bool:
    return isinstance(v, list) and len(v) <= MAX_LIST and all(_int(x) for x in v)


PLAN = dict(zip(PLAN_FIELDS, (_int, _num, _str, _num, _num, _int)))
# a train request: this round's plan, the previous round's aggregate to apply, a catch-up,
# the key set-up's commit
TRAIN_FIELDS = {**PLAN, **{APPLY + k: check for k, check in PLAN.items()},
                APPLY + "shares": _ints, APPLY + "save-adapter": _bool,
                CATCH + "version": _int, CATCH + "from": _int,
                COMMIT + "epoch": _int, COMMIT + "context-fp": _str}
# op -> (the fields it may carry and their types, fewest and most byte sections)
REQUESTS: dict[str, tuple[dict, int, int]] = {
    "ping": ({}, 0, 0),
    "join": ({"resume": _bool, "resume-from": _int, "run-config": _str}, 0, 0),
    TRAIN: (TRAIN_FIELDS, 0, MAX_SECTIONS),
    SHARE: ({"round": _int, "present": _ints}, 1, MAX_SECTIONS),
    CATCHUP: ({"version": _int, "to": _ints}, 0, 0),
}
# The key set-up's messages belong to fedshield.fl.key_setup, whose KeyHolder validates each
# one and refuses an operation it does not know; here only their shape is checked.
KEY_OP = re.compile(r"keys\.[a-z][a-z-]{0,31}")
MAX_KEY_FIELDS = 64


def _scalar(v) -> bool:
    return _bool(v) or _str(v) or (isinstance(v, int) and abs(v) < 1 << 62) or _num(v)


def check_request(op, fields, sections: list) -> None:
    """RequestRefused unless ``op`` is one of the protocol's with fields of the right names
    and types and a fitting number of byte sections."""
    if not isinstance(op, str) or not isinstance(fields, dict):
        raise RequestRefused(f"a request needs an op name and a fields object (op {op!r:.40})")
    if KEY_OP.fullmatch(op):
        if len(fields) > MAX_KEY_FIELDS or len(sections) > MAX_SECTIONS:
            raise RequestRefused(f"{op}: {len(fields)} fields, {len(sections)} sections")
        for name, value in fields.items():
            ok = _scalar(value) or (isinstance(value, list) and len(value) <= MAX_LIST
                                    and all(_scalar(x) for x in value))
            if not (isinstance(name, str) and len(name) <= 64 and ok):
                raise RequestRefused(f"{op}: field {name!r:.64} is not a scalar or a list of "
                                     "scalars")
        return
    if op not in REQUESTS:
        raise RequestRefused(f"unknown operation {op!r:.64}; the worker answers "
                             f"{sorted(REQUESTS)} and keys.*")
    schema, fewest, most = REQUESTS[op]
    unknown = sorted(set(fields) - set(schema))
    if unknown:
        raise RequestRefused(f"{op}: unknown fields {[str(u)[:64] for u in unknown]}; "
                             f"expected some of {sorted(schema)}")
    for name, value in fields.items():
        if not schema[name](value):
            raise RequestRefused(f"{op}: field {name!r} has a value of the wrong type or range "
                                 f"({type(value).__name__})")
    if not fewest <= len(sections) <= most:
        raise RequestRefused(f"{op}: {len(sections)} byte sections, expected {fewest}..{most}")


# What each metrics policy keeps from the replies that leave the site (fields, or field
# prefixes ending in "-" or "."); ``data`` is sent empty rather than dropped.
WITHHELD: dict[str, tuple[str, ...]] = {
    "all": (),
    "aggregate": ("train-loss", "update-norm", "metric.", "seconds-", "seconds", "data"),
    "none": ("train-loss", "update-norm", "metric.", "seconds-", "seconds", "data",
             "eval-loss"),
}


def withhold(fields: dict, policy: str) -> dict:
    """``fields`` as the site's metrics policy lets them leave."""
    drop = WITHHELD[policy]
    out = {}
    for name, value in fields.items():
        hit = any(name == d or (d.endswith(("-", ".")) and name.startswith(d)) for d in drop)
        if not hit:
            out[name] = value
        elif name == "data":
            out[name] = ""
    return out


# -- the site ----------------------------------------------------------------------------------
def node_identity(path: Path) -> Identity:
    """The node's long-term identity key: loaded, or made here (mode 0600) on first start."""
    if path.exists():
        return Identity.load(path)
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    identity.save(path)
    log.info("site worker: new identity key %s, fingerprint %s", path,
             identity.public.fingerprint())
    return identity


def run_config_of(text: str) -> RunConfig:
    """The run's settings from the server's run config (JSON of Flower's run config); refuses
    one that names a site setting."""
    try:
        run_config = json.loads(text)
        if not isinstance(run_config, dict):
            raise ValueError("not an object")
        settings = json.loads(str(run_config["fedshield-config"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidMessage(f"the run config does not load: {exc}") from exc
    # (fedshield-config's own model and data sections are the server's; the site ignores them)
    named = site_settings_in(run_config)
    if named:
        raise RunConfigRefused(f"the run config sets {named}: only the site config decides "
                               "these")
    return RunConfig.from_dict(settings, source="the run config's fedshield-config")


def run_digest(cfg: RunConfig) -> str:
    """Which run a site was built for."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def build_site(site_cfg: SiteConfig, cfg: RunConfig, identity: Identity, train_fn) -> Site:
    """The site of a run: the run's hyperparameters, the site's own model, data and key."""
    if cfg.model.name != site_cfg.model:
        log.info("site worker: the run config names model %r; this site trains its own %r",
                 cfg.model.name, site_cfg.model)
    cfg = cfg.replace(model=site_cfg.model, _source="the site config's model")
    tokenizer = load_tokenizer(cfg.model)
    model = build_lora_model(cfg.model, cfg.lora, seed=cfg.training.seed, tokenizer=tokenizer,
                             max_len=cfg.data.max_len)
    eval_data = site_cfg.path("eval_data") if site_cfg.eval_data else None
    data = load_site_data(site_cfg.path("data"), tokenizer=tokenizer, cfg=cfg,
                          columns=site_cfg.columns, eval_path=eval_data,
                          name=site_cfg.site_name)
    party = Party.for_run(None, model, cfg)
    site = Site(site_cfg.party_id, party, data, cfg, tokenizer, train_fn=train_fn,
                site_config=dataclasses.asdict(site_cfg), identity=identity)
    # the keys come from the key set-up, made here, held to the site's pinned federation
    site.key_holder(site_cfg.path("key_file"), **pinned_federation(site_cfg))
    return site


def pinned_federation(site_cfg: SiteConfig) -> dict:
    """The site's pinned federation (its co-signed file) or, for simulations only, the opt-in
    to trust the server's roster; without either the site does not join."""
    if site_cfg.federation:
        return {"federation": load_pinned(site_cfg.path("federation"))}
    if not site_cfg.insecure_trust_server_roster:
        raise KeySetupError(NOT_PINNED)
    log.warning("site worker: insecure_trust_server_roster = true: this site TRUSTS THE "
                "SERVER'S ROSTER (simulations only)")
    return {"trust_server_roster": True}


# How long the worker waits in accept() before it looks again at why it might stop: a SIGTERM
# may reach one of the process's other threads (torch's), and then the main thread sees it only
# once accept() returns, so this bounds how long a stopped worker takes to exit.
ACCEPT_POLL = 0.2

class SiteWorker:
    """Serves the relay's requests, one at a time, for the site its config describes."""

    def __init__(self, site_cfg: SiteConfig, problems=()) -> None:
        self.cfg = site_cfg
        # a site that failed its start-up checks only answers ping, and join with the first
        # problem; it makes no identity that its federation file would not pin
        self.problems = list(problems)
        if self.problems:
            self.identity, self.train_fn = None, None
        else:
            self.identity = node_identity(site_cfg.path("identity_file"))
            self.train_fn = load_train_fn(site_cfg.train_fn) if site_cfg.train_fn else None
        if self.train_fn is not None:
            log.info("site worker: party %d trains with its own %s", site_cfg.party_id,
                     site_cfg.train_fn)
        self.store = AdapterStore(site_cfg.path("node_dir") / "global")
        self.site: Site | None = None
        self.rounds: SiteRounds | None = None
        self.run = ""            # digest of the run config the site was built for
        self.initial: dict | None = None
        self.preloading: threading.Thread | None = None
        self.preloaded: tuple[str, Site, dict] | None = None   # (digest, site, initial)
        self.stopping = False    # set from another thread: serve() returns within ACCEPT_POLL

    # -- a run ----------------------------------------------------------------------------------
    def _start_run(self, text: str) -> None:
        """The site of the join's run: the preloaded one when the run is the same, else the
        previous run's, else one built now."""
        cfg = run_config_of(text)
        digest = run_digest(cfg)
        if self.preloading is not None:
            self.preloading.join()
            self.preloading = None
        if digest == self.run:
            return
        preloaded, self.preloaded = self.preloaded, None
        if preloaded is not None and preloaded[0] == digest:
            self._serve_run(*preloaded)
            return
        self.site, self.run = None, ""   # the previous run's model goes before the next loads
        self._serve_run(digest, *self._build(cfg))

    def _build(self, cfg: RunConfig) -> tuple[Site, dict]:
        """The run's site and its initial adapter; a restarted worker goes on from the round
        it last applied."""
        site = build_site(self.cfg, cfg, self.identity, self.train_fn)
        party = site.party
        initial = {k: v.clone() for k, v in party.global_state.items()}  # a new run's
        saved = self.store.latest()
        if saved is not None:
            version, state = saved
            party.set_global(state, version)
            log.info("site worker: party %d goes on from its global adapter of round %d",
                     site.party_id, version)
        return site, initial

    def _serve_run(self, digest: str, site: Site, initial: dict) -> None:
        self.site, self.run, self.initial = site, digest, initial
        self.rounds = SiteRounds(site, store=self.store, adapter_dir=self.cfg.path("out_dir"),
                                 describe=describe)
        log.info("site worker: %r serves a run", site)

    def preload(self, text: str) -> None:
        """Builds the site of the run ``text`` describes in the background while the worker
        already answers (``fedshield site worker --preload-run``): the model loads while
        Flower starts. The server's join still decides: a join for another run builds its
        own site, and a preload that fails only logs why."""
        def build() -> None:
            try:
                cfg = run_config_of(text)
                self.preloaded = (run_digest(cfg), *self._build(cfg))
                log.info("site worker: preloaded the run's site")
            except Exception as exc:  # noqa: BLE001 - the join builds it again and says why
                log.warning("site worker: could not preload the run: %s", exc)

        if not self.problems:
            self.preloading = threading.Thread(target=build, name="preload", daemon=True)
            self.preloading.start()

    def _site(self) -> Site:
        if self.site is None:
            raise NotJoined("a round request came before the server's join")
        return self.site

    def handle(self, op, fields, sections: list[bytes]) -> tuple[dict, list[bytes]]:
        """One relayed request: checked, answered, and its reply fields as the site's metrics
        policy lets them leave."""
        check_request(op, fields, sections)
        return self._answer(op, fields, sections)

    def _answer(self, op: str, fields: dict, sections: list[bytes]) -> tuple[dict, list[bytes]]:
        policy = self.cfg.metrics
        if op == "ping":
            return {}, []
        if self.problems:
            raise SiteCheckFailed(self.cfg, self.problems[0])
        if op == "join":
            out, blobs = self._join(fields)
            return withhold(out, policy), blobs
        site = self._site()
        if op.startswith("keys."):
            try:
                out, blobs = site.keys.handle(op, fields, sections)
            except KeyMessageRefused as exc:  # the sender's id rides in the reply's fields
                log.warning("site worker: %s", exc)
                return withhold(refusal_fields(exc), policy), []
            return withhold(out, policy), blobs
        # the round protocol: the same handler as the local engine's (fedshield.fl.site_rounds)
        reply = self.rounds.handle(request_from_wire(op, fields, sections))
        return reply_to_wire(reply, keep=lambda part: withhold(part, policy))

    def _join(self, fields: dict) -> tuple[dict, list[bytes]]:
        if "run-config" not in fields:
            raise InvalidMessage("join carries no run config")
        self._start_run(fields["run-config"])
        site, party = self.site, self.site.party
        if not fields.get("resume") and party.version != 0:
            # a new run in a directory an earlier run used: start from the initial adapter
            log.info("site worker: a new run; party %d sets aside its adapter of round %d",
                     site.party_id, party.version)
            party.set_global(self.initial, 0)
            self.store.clear()
        elif fields.get("resume") and "resume-from" in fields:
            # the server goes on after the round it last recorded; this site may have applied
            # the next aggregate already (it reports the round it can build on)
            self.rounds.step_back(fields["resume-from"], "the server resumes after round "
                                  f"{fields['resume-from']}")
        return {**site.info().to_fields(), "version": party.version,
                "adapter-fp": adapter_fingerprint(party.global_state)}, []

    # -- the socket -----------------------------------------------------------------------------
    def serve(self, server: socket.socket, token: bytes, *, exit_with: int = 0) -> None:
        """Answers authenticated requests until stopped, until ``exit_with`` (a pid) exits, or
        until nothing came for the site's idle_timeout."""
        server.settimeout(ACCEPT_POLL)
        idle = self.cfg.idle_timeout
        last = time.monotonic()
        while not self.stopping:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                if not process_alive(exit_with):
                    log.info("site worker: process %d exited; exiting", exit_with)
                    return
                if idle and time.monotonic() - last > idle:
                    log.info("site worker: idle for %.0f s; exiting", idle)
                    return
                continue
            last = time.monotonic()
            with conn:
                self._one(conn, token)

    def _one(self, conn: socket.socket, token: bytes) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)   # a peer that stalls holds nobody up
            if not prove_worker(conn, token):
                log.warning("site worker: a connection without the relay token; closed")
                return
            conn.settimeout(None)
            head, sections = recv_frame(conn)
        except (OSError, SiteWorkerError) as exc:
            log.warning("site worker: a connection failed before its request: %s", exc)
            return
        op = head.get("op")
        start = time.perf_counter()
        try:
            fields, blobs = self.handle(op, head.get("fields"), sections)
            reply, out = {"ok": True, "fields": fields}, blobs
        except Exception as exc:  # the details stay here; the relay gets type + fixed message
            log.exception("site worker: %.64r refused", op)
            reply, out = error_reply(exc), []
        try:
            send_frame(conn, reply, out)
        except OSError as exc:
            log.warning("site worker: could not send the reply to %.64r: %s", op, exc)
        if op != "ping":
            log.info("site worker: %.64r answered in %.2f s", op, time.perf_counter() - start)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (0: no process to watch, always true)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        log.warning("site worker: %s was open to others; it is now mode 0700", path)
        path.chmod(0o700)


def log_to(path: Path) -> None:
    """The worker's log: its own file, mode 0600 (it names the site's files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
    path.chmod(0o600)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def listen(path: Path) -> socket.socket:
    """The worker's socket at ``path`` (mode 0660: the socket's directory decides who may
    connect); refuses a path where another worker answers."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with unix_address(path) as address:
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(address)
                raise StorageError(f"another process listens on {path}")
            except OSError:
                path.unlink()   # left behind by a worker that was killed
            finally:
                probe.close()
        old = os.umask(0o117)
        try:
            server.bind(address)
        finally:
            os.umask(old)
    server.listen(8)
    return server


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def run_worker(config_path: str | Path, *, exit_with: int = 0,
               preload_run: str | Path | None = None) -> NoReturn:
    """``fedshield site worker``: serves the site its config describes until stopped, then
    ends the process (exit status 0); ``preload_run``: a run config (JSON, as the join
    carries it) whose site is built at once, in the background."""
    site_cfg = SiteConfig.from_file(config_path)
    _private_dir(site_cfg.path("node_dir"))
    log_to(site_cfg.path("log_file"))
    token = read_token(make_token(site_cfg.path("token_file")))
    apply_to_torch()  # several sites on one machine share its cores (FEDSHIELD_NUM_THREADS)
    problems = check_site(site_cfg)
    for problem in problems:   # the details, for the site's own eyes only
        log.error("site worker: start-up check failed: %s", problem)
        print(f"fedshield site worker: {config_path}: {problem}", file=sys.stderr, flush=True)
    worker = SiteWorker(site_cfg, problems)
    if preload_run is not None:
        worker.preload(Path(preload_run).read_text())
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    path = site_cfg.path("socket")
    server = listen(path)
    log.info("site worker: party %d listening on %s", site_cfg.party_id, path)
    print(f"fedshield site worker: party {site_cfg.party_id} listening on {path}; log in "
          f"{site_cfg.path('log_file')}", flush=True)
    try:
        worker.serve(server, token, exit_with=exit_with)
    except SystemExit:   # SIGTERM
        log.info("site worker: party %d stopped", site_cfg.party_id)
    finally:
        server.close()
        path.unlink(missing_ok=True)
    # Its files are written and its socket is gone: nothing is left to tear down but the
    # interpreter's torch and model, which takes seconds (a launcher stops several at once).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedshield.engines.flower.site_worker")
    parser.add_argument("--config", required=True, help="the site config (TOML, [site])")
    parser.add_argument("--exit-with", type=int, default=0, help="exit when this pid exits")
    args = parser.parse_args(argv)
    return run_worker(args.config, exit_with=args.exit_with)


if __name__ == "__main__":
    sys.exit(main())

