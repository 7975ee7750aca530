"""The site worker: one long-lived process per SuperNode that holds the node's Site.

Flower 1.30 runs every message in a fresh ClientApp process; loading the model and tokenizing
the data there would cost a base-model load per message. The ClientApp
(fedshield.flower.client_app) therefore starts this worker once, on the node's first message,
and hands it every message over a Unix socket (fedshield.flower.site_ipc). The worker keeps the
model, the tokenized data, the key and the global adapter between rounds and messages.

It reads only what its node config names: ``data`` (its own file), ``key-file`` (where the key
set-up writes this party's key: it never leaves the node), ``party-id``, optionally
``identity-file`` (the node's long-term identity key, made here on first start), ``model``,
``eval-data``, ``name``, ``columns``, ``out-dir`` and ``train-fn`` (the site's own training
function, "package.module:function", which the run config may also name for every site; see
fedshield.fl.train_fn). It exits when
its SuperNode exits, after the run's final message, or after ``worker-idle-timeout`` seconds
without a message (default 3600).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ..config import RunConfig
from ..errors import FedShieldError, KeySetupError, ParameterError
from ..fl.federation import load_pinned
from ..fl.key_setup import NOT_PINNED
from ..fl.adapter_store import AdapterStore, adapter_fingerprint, pack_adapter, unpack_adapter
from ..fl.messages import RoundPlan
from ..fl.guard import Provenance
from ..fl.party import Party
from ..fl.site import Site, load_site_data
from ..fl.train_fn import SETTING as TRAIN_FN
from ..fl.train_fn import load_train_fn
from ..he import EncryptedUpdate
from ..he.identity import Identity
from ..model import build_lora_model, load_tokenizer
from ..threads import apply_to_torch
from .site_ipc import process_alive, recv_frame, run_digest, send_frame

log = logging.getLogger("fedshield")

DEFAULT_IDLE_TIMEOUT = 3600.0
FEDERATION = "federation"   # node config: the site's pinned, co-signed federation file
TRUST_SERVER_ROSTER = "insecure-trust-server-roster"   # node config: simulations only


class OutOfStep(FedShieldError):
    """This party's global adapter is not the one the server's round builds on."""


def _node_value(node: dict, key: str, default=None):
    value = node.get(key, default)
    return default if value in (None, "") else value


def build_site(node: dict, run_config: dict) -> tuple[Site, Path]:
    """The node's Site from its node config and the run config; (site, out-dir)."""
    try:
        data = str(node["data"])
        key_file = str(node["key-file"])
    except KeyError as exc:
        raise ParameterError(f"node config lacks {exc}: start the SuperNode with --node-config "
                             "'data=\"FILE\" key-file=\"PATH\" party-id=I'") from exc
    cfg = RunConfig.from_dict(json.loads(str(run_config["fedshield-config"])),
                              source="the run config's fedshield-config")
    model = _node_value(node, "model")
    if model is not None:
        cfg = cfg.replace(model=str(model))
    if _node_value(node, "party-id") is None:
        raise ParameterError("node config lacks party-id (0..sites-1)")
    party_id = int(node["party-id"])
    identity = node_identity(Path(str(_node_value(node, "identity-file",
                                                  f"{key_file}.identity"))))
    tokenizer = load_tokenizer(cfg.model)
    model_obj = build_lora_model(cfg.model, cfg.lora, seed=cfg.training.seed,
                                 tokenizer=tokenizer, max_len=cfg.data.max_len)
    eval_data = _node_value(node, "eval-data")
    site_data = load_site_data(data, tokenizer=tokenizer, cfg=cfg,
                               columns=str(_node_value(node, "columns", "")),
                               eval_path=None if eval_data is None else str(eval_data),
                               name=_node_value(node, "name"))
    party = Party(None, model_obj, algorithm=cfg.training.algorithm)
    out = Path(str(_node_value(node, "out-dir", ".")))
    spec = _node_value(node, TRAIN_FN, run_config.get(TRAIN_FN) or None)
    train_fn = None if spec is None else load_train_fn(str(spec))
    if train_fn is not None:
        log.info("site worker: party %d trains with its own %s", party_id, spec)
    site = Site(party_id, party, site_data, cfg, tokenizer, train_fn=train_fn,
                node_config=node, identity=identity)
    # the keys come from the key set-up, made here, held to the site's pinned federation
    site.key_holder(key_file, **pinned_federation(node))
    return site, out


def pinned_federation(node: dict) -> dict:
    """The site's pinned federation (node config ``federation``: its co-signed file) or, for
    simulations only, ``insecure-trust-server-roster = true``; neither refuses to start."""
    path = _node_value(node, FEDERATION)
    trust = _node_value(node, TRUST_SERVER_ROSTER, False)
    if not isinstance(trust, bool):
        raise ParameterError(f"node config {TRUST_SERVER_ROSTER}={trust!r} must be true or false")
    if path is None:
        if not trust:
            raise KeySetupError(NOT_PINNED)
        log.warning("site worker: %s = true: this site TRUSTS THE SERVER'S ROSTER (simulations "
                    "only)", TRUST_SERVER_ROSTER)
        return {"trust_server_roster": True}
    return {"federation": load_pinned(str(path))}


def adapter_store(node: dict) -> AdapterStore:
    """The node's global adapters, beside its key file (its own directory)."""
    return AdapterStore(Path(str(node["key-file"])).parent / "global")


def _catch_up_aad(sender: int, recipient: int, version: int) -> bytes:
    return f"fedshield-catchup|round {version}|from {sender}|to {recipient}".encode()


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


class SiteWorker:
    """Serves one node's messages, one at a time, from its Site."""

    def __init__(self, site: Site, out: Path, run: str) -> None:
        self.site = site
        self.out = out
        self.run = run           # digest of the run config it serves
        self.done = False
        self.store = adapter_store(site.node_config)
        party = site.party
        self.initial = {k: v.clone() for k, v in party.global_state.items()}  # a new run's
        saved = self.store.latest()
        if saved is not None:  # a restarted worker goes on from the round it last applied
            version, state = saved
            party.set_global(state, version)
            log.info("site worker: party %d goes on from its global adapter of round %d",
                     site.party_id, version)

    def handle(self, op: str, fields: dict, sections: list[bytes]) -> tuple[dict, list[bytes]]:
        site, party = self.site, self.site.party
        if op == "ping":
            return {"party": site.party_id, "run": self.run}, []
        if op == "join":
            if not fields.get("resume") and party.version != 0:
                # a new run in a directory an earlier run used: start from the initial adapter
                log.info("site worker: a new run; party %d sets aside its adapter of round %d",
                         site.party_id, party.version)
                party.set_global(self.initial, 0)
                self.store.clear()
            return {**site.info().to_fields(), "version": party.version,
                    "adapter-fp": adapter_fingerprint(party.global_state)}, []
        if op.startswith("catchup."):
            return self._catch_up(op, fields, sections)
        if op.startswith("keys."):
            out = site.keys.handle(op, fields, sections)
            if op == "keys.commit":  # the key this node just wrote becomes the party's
                site.take_committed_keys()
            return out
        if op == "train":
            plan = RoundPlan.from_fields(fields)
            self._step_back_to(plan)
            reply = site.train_round(plan)
            return reply.to_fields(), [reply.update, reply.signature]
        if op == "share":
            start = time.perf_counter()
            agg = EncryptedUpdate.from_bytes(sections[0])
            if agg.round != int(fields["round"]):
                raise OutOfStep(f"asked to decrypt round {agg.round}'s aggregate in round "
                                f"{int(fields['round'])}")
            share, record = site.partial_decrypt(agg, [int(p) for p in fields["present"]],
                                                 provenance=Provenance.from_blobs(sections[1:]))
            return {"seconds": time.perf_counter() - start}, [share, record]
        if op == "evaluate":
            return self._evaluate(fields, sections)
        if op == "shutdown":
            self.done = True
            return {}, []
        raise ParameterError(f"unknown site worker operation {op!r}")

    def _evaluate(self, fields: dict, sections: list[bytes]) -> tuple[dict, list[bytes]]:
        site, party = self.site, self.site.party
        plan = RoundPlan.from_fields(fields)
        if party.version != plan.base_version:
            raise OutOfStep(f"party {site.party_id} holds the adapter of round {party.version}, "
                            f"the aggregate of round {plan.round} applies to round "
                            f"{plan.base_version}")
        agg = EncryptedUpdate.from_bytes(sections[0])
        if agg.round != plan.round or not agg.is_aggregate:
            raise OutOfStep(f"expected the aggregate of round {plan.round}, got {agg!r}")
        # sections: the aggregate, the shares (threshold), their signed records, then the
        # aggregate's provenance (manifest, server record, verify_aggregates: the updates)
        n_shares = len(fields.get("shares", []))
        shares = sections[1:1 + n_shares]
        records = sections[1 + n_shares:1 + 2 * n_shares]
        provenance = Provenance.from_blobs(sections[1 + 2 * n_shares:])
        if site.cfg.keys.mode == "threshold":
            seconds = site.apply(plan, agg=agg, shares=shares, share_records=records)
        else:
            seconds = site.apply(plan, agg=agg, provenance=provenance)
        self.store.save(party.version, party.global_state)
        reply = site.eval_reply(seconds)
        if fields.get("save-adapter"):
            site.save_adapter(self.out)
            log.info("party %d wrote %s/adapter", site.party_id, self.out)
        if fields.get("final"):
            self.done = True
        return reply.to_fields(), []

    def _step_back_to(self, plan: RoundPlan) -> None:
        """A server that was stopped after this party applied round r's aggregate, but before
        it recorded round r, redoes round r from r - 1: step back to it if it is kept here."""
        site, party = self.site, self.site.party
        if party.version == plan.base_version:
            return
        state = self.store.at(plan.base_version) if party.version > plan.base_version else None
        if state is None:
            raise OutOfStep(f"party {site.party_id} holds the adapter of round "
                            f"{party.version}, the server builds round {plan.round} on "
                            f"round {plan.base_version}")
        log.info("site worker: party %d steps back from round %d to round %d (the server redoes "
                 "round %d)", site.party_id, party.version, plan.base_version, plan.round)
        party.set_global(state, plan.base_version)

    def _catch_up(self, op: str, fields: dict, sections: list[bytes]
                  ) -> tuple[dict, list[bytes]]:
        """catchup.send: this party's global adapter of round ``version``, sealed to each party
        in ``to`` and signed; catchup.take: the adapter sealed to this party by ``from``."""
        site, party, keys = self.site, self.site.party, self.site.keys
        version = int(fields["version"])
        if op == "catchup.send":
            if party.version != version:
                raise OutOfStep(f"party {site.party_id} holds round {party.version}, not "
                                f"round {version}")
            blob = pack_adapter(version, party.global_state)
            to = [int(p) for p in fields["to"]]
            return {}, [keys.roster[p].seal(blob, site.identity,
                                            _catch_up_aad(site.party_id, p, version))
                        for p in to]
        if op == "catchup.take":
            sender = int(fields["from"])
            blob = site.identity.open_sealed(sections[0], keys.roster[sender],
                                             _catch_up_aad(sender, site.party_id, version))
            got, state = unpack_adapter(blob, f"party {sender}'s adapter")
            if got != version or sorted(state) != sorted(party.global_state):
                raise OutOfStep(f"party {sender} sent the adapter of round {got} with "
                                f"{len(state)} tensors; expected round {version}")
            party.set_global(state, version)
            self.store.save(version, state)
            log.info("site worker: party %d caught up with round %d from party %d",
                     site.party_id, version, sender)
            return {"version": version, "adapter-fp": adapter_fingerprint(state)}, []
        raise ParameterError(f"unknown site worker operation {op!r}")

    def serve(self, server: socket.socket, parent: int, idle_timeout: float) -> None:
        """Answers requests until done, the parent exits, or nothing came for idle_timeout."""
        server.settimeout(2.0)
        last = time.monotonic()
        while not self.done:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                if not process_alive(parent) or time.monotonic() - last > idle_timeout:
                    log.info("site worker: %s; exiting", "parent gone" if not process_alive(parent)
                             else f"idle for {idle_timeout:.0f} s")
                    return
                continue
            last = time.monotonic()
            with conn:
                conn.settimeout(None)
                try:
                    head, sections = recv_frame(conn)
                    op = str(head.get("op"))
                    start = time.perf_counter()
                    out_fields, out_sections = self.handle(op, head.get("fields") or {},
                                                           sections)
                    send_frame(conn, {"ok": True, "fields": out_fields}, out_sections)
                    if op != "ping":
                        log.info("site worker: %s answered in %.2f s", op,
                                 time.perf_counter() - start)
                except Exception as exc:  # reported to the ClientApp, which raises it
                    log.exception("site worker: request failed")
                    try:
                        send_frame(conn, {"ok": False,
                                          "error": f"{type(exc).__name__}: {exc}"})
                    except OSError:
                        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedshield.flower.site_worker")
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument("--spec", required=True,
                        help="JSON file: node_config and run_config (read, then deleted)")
    parser.add_argument("--parent", type=int, default=0, help="exit when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    spec_path = Path(args.spec)
    spec = json.loads(spec_path.read_text())
    spec_path.unlink(missing_ok=True)
    node = spec["node_config"]
    idle = float(_node_value(node, "worker-idle-timeout", DEFAULT_IDLE_TIMEOUT))
    apply_to_torch()  # several sites on one machine share its cores (FEDSHIELD_NUM_THREADS)
    site, out = build_site(node, spec["run_config"])
    log.info("site worker: %r ready on %s", site, args.socket)
    path = Path(args.socket)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)  # the socket is this user's alone
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(4)
    try:
        SiteWorker(site, out, run_digest(spec["run_config"])).serve(server, args.parent, idle)
    finally:
        server.close()
        for leftover in (path, path.with_suffix(".pid")):
            leftover.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
