"""The local engine: every site and the Server in one process.

It runs the same round protocol as the Flower engine (fedshield.fl.rounds drives it, each
site answers through fedshield.fl.site_rounds), with a transport that hands each request to
the site's handler in-process: the Server plans, each site trains, prunes and encrypts, the
Server screens and aggregates, and every site decrypts (threshold keys: fuses the present
parties' partial decryptions), applies the result and evaluates on its own held-out part.
Each round's aggregate is applied in a step of its own, so a round is recorded (and
checkpointed) before the next starts. The sites share one model object (they train one after
another; each loads the global state before it trains).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..run.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from ..config import RunConfig
from ..base.errors import FedShieldError, ParameterError
from ..fl.adapter_store import adapter_fingerprint
from ..fl.dealer import deal_keys
from ..trust.federation import Federation, federation_for_run
from ..fl.party import Party
from ..fl.protocol import RelayedRequest, ShareRequest, TrainRequest
from ..fl.record import RoundRecord
from ..fl.rounds import RoundDriver
from ..fl.schedule import prune_ratio
from ..fl.server import Server
from ..fl.site import Site, load_site_data
from ..fl.site_rounds import SiteRounds
from ..fl.site_files import site_files
from ..trust.identity import Identity
from ..training.lora import build_lora_model
from ..training.base_model import load_tokenizer
from ..run.plots import plot_run
from ..run.run_dir import METRICS, PLOTS_DIR, check_out_dir, claim_out_dir
from ..base.threads import apply_to_torch

log = logging.getLogger("fedshield")


class LocalEngine:
    """One federated fine-tuning run in one process; :meth:`run` writes DIR/metrics.json,
    DIR/checkpoint/ (every round), DIR/adapter/ and DIR/plots/.

    A DIR that already holds a run is refused unless ``overwrite`` (then its results are
    removed when :meth:`run` starts); :meth:`resume` continues the run of a DIR instead.
    Set-up reads and tokenizes every site's data before the model and the keys, so that bad
    data stops the run before the expensive steps."""

    def __init__(self, cfg: RunConfig, show_progress: bool | None = None, *,
                 overwrite: bool = False, checkpoint: dict | None = None) -> None:
        """``checkpoint``: a run's last checkpoint (load_checkpoint), which this engine goes
        on from (see :meth:`resume`)."""
        self.cfg = cfg
        self.out = Path(cfg.engine.out)
        self.overwrite = overwrite
        if checkpoint is None:
            check_out_dir(self.out, overwrite=overwrite)
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.first_round = 1
        self._progress = None
        self.federation: Federation | None = None   # pinned by every site at its first key set-up
        apply_to_torch()  # FEDSHIELD_NUM_THREADS
        start = time.perf_counter()
        log.info("fedshield: set-up of %d sites: data, model %r, %s", cfg.n_sites,
                 cfg.model.name, f"{cfg.keys.mode} keys" if cfg.he.enabled else "no HE")
        files = site_files(cfg, self.out / "sites")
        self.tokenizer = load_tokenizer(cfg.model)
        data = [load_site_data(f.path, tokenizer=self.tokenizer, cfg=cfg, columns=f.columns,
                               name=f.name) for f in files]
        model = build_lora_model(cfg.model, cfg.lora, seed=cfg.training.seed,
                                 tokenizer=self.tokenizer, max_len=cfg.data.max_len)
        log.info("fedshield: set-up: data and model ready (%.1f s)", time.perf_counter() - start)
        he, dealer = cfg.he.enabled, cfg.keys.setup == "dealer"
        ctxs, server_ctx = deal_keys(cfg) if he and dealer else ([None] * cfg.n_sites, None)
        self.sites = [Site(i, Party.for_run(ctxs[i], model, cfg), d, cfg, self.tokenizer,
                           identity=Identity.generate() if he else None)
                      for i, d in enumerate(data)]
        self.server = Server(cfg, server_ctx, engine="local",
                             flood_bits=cfg.ckks_params().flood_bits if he else None)
        versions = fingerprints = None
        if checkpoint is not None:  # the same path as a resumed Flower server's
            done = checkpoint["round"]
            if sorted(checkpoint["state"]) != sorted(self.global_state):
                raise ParameterError(f"--resume {str(self.out)!r}: the checkpoint's LoRA "
                                     "tensors do not match the model this config builds")
            for site in self.sites:
                site.party.set_global(checkpoint["state"], version=done)
            try:  # the sites of this process make new identity keys (none is ever written)
                self.server.restore(checkpoint["server"], new_identities=True)
            except (TypeError, KeyError, ValueError, FedShieldError) as exc:
                raise ParameterError(f"--resume {str(self.out)!r}: the checkpoint's server "
                                     f"state does not fit this fedshield version: {exc}"
                                     ) from exc
            fp = adapter_fingerprint(self.global_state)
            versions = {s.party_id: done for s in self.sites}
            fingerprints = {s.party_id: fp for s in self.sites}
            self.first_round = done + 1
        self.server.enrol(((site.party_id, site.info()) for site in self.sites), versions,
                          fingerprints)
        # Key files and decryption budgets of this process's parties: a private directory
        # that goes with the engine (a resumed run sets up new keys).
        self._keys_dir = tempfile.TemporaryDirectory(prefix="fedshield-keys-") if he else None
        if he and dealer:
            for site, ctx in zip(self.sites, ctxs):
                site.use_keys(ctx, self.server.roster, self.server.identity.public,
                              self._party_dir(site) / "party.budget")
        self.rounds = [SiteRounds(site) for site in self.sites]
        dropouts = cfg.keys.dropouts
        self.driver = RoundDriver(
            self.server, self.send, pipeline=False, on_round=self._round_closed,
            # sites 0..dropouts-1 are gone before decryption: the others cover for them
            decrypting=lambda parties: [p for p in parties if p >= dropouts])
        log.info("fedshield: set-up done in %.1f s (initial evaluation%s)",
                 time.perf_counter() - start, ", keys dealt" if he and dealer else "")

    @classmethod
    def resume(cls, out: str | Path, show_progress: bool | None = None, *,
               rounds: int | None = None) -> "LocalEngine":
        """The run of DIR continued after its last checkpointed round; ``rounds`` extends it
        (or shortens it, down to the rounds already done). Every other setting stays as the
        run was started."""
        ckpt = load_checkpoint(out)
        done = ckpt["round"]
        try:
            cfg = RunConfig.from_dict(ckpt["config"], source=f"--resume {str(out)!r}")
            cfg = cfg.replace(out=str(out))
        except (TypeError, ParameterError) as exc:
            raise ParameterError(f"--resume {str(out)!r}: its checkpoint config does not fit "
                                 f"this fedshield version: {exc}") from exc
        planned = cfg.training.rounds
        if rounds is not None:
            cfg = cfg.replace(rounds=rounds, _source=f"--resume {str(out)!r}")
        if done > cfg.training.rounds:
            given = f"--rounds {rounds}" if rounds is not None else f"its rounds={planned}"
            raise ParameterError(f"--resume {str(out)!r}: {given} is fewer than the {done} "
                                 f"rounds the run has completed; give --rounds {done} or more")
        engine = cls(cfg, show_progress=show_progress, checkpoint=ckpt)
        if cfg.training.rounds != planned:  # the schedules follow the new total (README)
            log.info("fedshield: %s resumes after round %d with rounds=%d (was %d)", out, done,
                     cfg.training.rounds, planned)
        restore_rng(*ckpt["rng"])  # after set-up, so nothing above consumes the restored streams
        return engine

    # -- keys ---------------------------------------------------------------------------------
    def _party_dir(self, site: Site) -> Path:
        path = Path(self._keys_dir.name) / f"party-{site.party_id}"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def pin_federation(self) -> Federation:
        """The federation of this process's sites, made as real sites make theirs out of band:
        the run's roster, parameters and floor, signed by every site and the server; each site
        then holds every key set-up to it."""
        fed = federation_for_run(self.cfg, self.server.identity.public)
        for site in self.sites:
            fed = fed.with_member(site.name, site.identity.public)
        for identity in [site.identity for site in self.sites] + [self.server.identity]:
            fed = fed.signed_by(identity)
        self.federation = fed
        return fed

    def _key_step(self, site: Site, request: RelayedRequest):
        """A key set-up message at ``site``, as a site worker answers it."""
        holder = site.keys or site.key_holder(self._party_dir(site) / "party.key",
                                              federation=self.federation
                                              or self.pin_federation())
        return holder.handle(request.op, request.fields, list(request.blobs))

    # -- the transport: each request to its site's handler, in this process -----------------
    def send(self, requests) -> list:
        """One message step: each request (by node, the party id here) to its site."""
        out = []
        for node, request in requests.items():
            site = self.sites[node]
            if isinstance(request, (RelayedRequest, ShareRequest)):
                try:    # a party's refusal is its answer (the protocol names the party)
                    reply = (self._key_step(site, request) if isinstance(request, RelayedRequest)
                             else self.rounds[node].handle(request))
                except FedShieldError as exc:
                    reply = exc
            else:
                reply = self.rounds[node].handle(request)
                if isinstance(request, TrainRequest) and request.plan is not None \
                        and self._progress is not None:
                    self._progress.update(1)
            out.append((node, reply))
        return out

    # -- what every site shares in this process ------------------------------------------------
    @property
    def global_state(self) -> dict:
        """The global LoRA state (every site holds the same one)."""
        return self.sites[0].party.global_state

    def set_global_state(self, state: dict, version: int | None = None) -> None:
        for site in self.sites:
            site.party.set_global(state, site.party.version if version is None else version)

    @property
    def layout(self):
        return self.sites[0].party.layout

    @property
    def last_aggregate(self):
        """The last round's aggregate (without HE: its plaintext average)."""
        return self.driver.last_result

    # -- one round --------------------------------------------------------------------------
    def run_round(self, round_idx: int, progress=None) -> dict:
        """Round ``round_idx``, applied and recorded; FedShieldError when it failed."""
        self._progress = progress
        try:
            self.driver.run_round(round_idx)
        finally:
            self._progress = None
        entry = self.server.current
        if entry is None or entry.round != round_idx or entry.status != "ok":
            raise FedShieldError(f"round {round_idx} failed: "
                                 f"{entry.failure if entry is not None else 'not run'}")
        return entry.to_dict()

    def _round_closed(self, entry: RoundRecord) -> None:
        if entry.status == "ok":
            entry.samples = self.sites[0].samples()

    # -- the whole run ----------------------------------------------------------------------
    def run(self) -> dict:
        cfg, server = self.cfg, self.server
        record = server.record
        first = self.first_round
        if first > 1:
            self.out.mkdir(parents=True, exist_ok=True)
            log.info("fedshield: resuming %s after round %d of %d", self.out, first - 1,
                     cfg.training.rounds)
        else:
            claim_out_dir(self.out, overwrite=self.overwrite)
            log.info("fedshield: %d sites %s, %d rounds, HE %s, %d LoRA values; initial eval "
                     "loss %.4f", cfg.n_sites, [s.name for s in self.sites], cfg.training.rounds,
                     "on" if cfg.he.enabled else "off", record.num_lora_values,
                     record.initial_eval_loss)
        log.info("fedshield: %s", prune_schedule(cfg))
        n = cfg.n_sites
        bar = tqdm(total=cfg.training.rounds * n, initial=(first - 1) * n,
                   desc="sites x rounds", unit="update", disable=not self.show_progress,
                   file=sys.stderr)
        with bar:
            for r in range(first, cfg.training.rounds + 1):
                entry = self.run_round(r, progress=bar)
                bar.set_postfix(round=r, eval_loss=f"{entry['eval_loss']:.3f}")
                log.info("round %d/%d: eval loss %.4f (ppl %.2f), train loss %s, %d bytes "
                         "up/site, kept %.2f, seconds %s", r, cfg.training.rounds,
                         entry["eval_loss"], entry["perplexity"],
                         [round(x, 3) for x in entry["train_loss"]], max(entry["bytes_up"]),
                         entry["kept_fraction"], entry["seconds"])
                state = server.checkpoint()
                save_checkpoint(self.out, round_idx=r, state=self.sites[0].party.global_state,
                                metrics=state.pop("record"), config=cfg.to_dict(),
                                server=state)
                record.write(self.out / METRICS)
        # metrics.json says finished only once the adapter and the plots are written: an
        # interruption before that leaves a run that --resume completes.
        self.sites[0].save_adapter(self.out, show_progress=self.show_progress)
        plot_run(record.to_dict(), self.out / PLOTS_DIR)
        record.finished = True
        record.write(self.out / METRICS)
        if self._keys_dir is not None:
            self._keys_dir.cleanup()
        return record.to_dict()


def prune_schedule(cfg: RunConfig) -> str:
    """The pruning schedule of a run in words (logged when it starts)."""
    p = cfg.pruning
    if p.mode == "off":
        return "pruning off"
    end, rounds = cfg.prune_t_end, cfg.training.rounds
    if end == p.t_start:
        return f"pruning {p.mode}: pruned fraction {p.target:.2f} from round {end}"
    text = (f"pruning {p.mode}: pruned fraction {p.p0:.2f} at round {p.t_start} -> "
            f"{p.target:.2f} at round {end}")
    if end > rounds:
        last = prune_ratio(rounds, p.p0, p.target, p.t_start, end)
        text += f" (after the last round, {rounds}: the run ends at {last:.2f})"
    return text


def run(config: RunConfig, show_progress: bool | None = None, *,
        overwrite: bool = False) -> dict:
    """Runs a federated fine-tuning job and writes metrics.json, checkpoint/, adapter/, plots/
    (into a directory without a run, unless ``overwrite``)."""
    return LocalEngine(config, show_progress=show_progress, overwrite=overwrite).run()


def resume(out: str | Path, show_progress: bool | None = None, *,
           rounds: int | None = None) -> dict:
    """Continues the run in `out` from its last checkpoint; no round is lost or repeated.
    ``rounds`` changes the run's total (not below the rounds it has completed)."""
    return LocalEngine.resume(out, show_progress=show_progress, rounds=rounds).run()
