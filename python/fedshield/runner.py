"""The local simulation engine: clients train, prune, encrypt; a keyless server aggregates.

The loop orchestrates only; every heavy step is in train.py (torch), the native module
(packing, aggregation) or OpenFHE (encrypt/decrypt).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from . import data as fsdata
from . import datasets as fsdatasets
from .aggregate import aggregate
from .atomic import write_json_atomic
from .checkpoint import load_checkpoint, restore_rng, save_checkpoint
from .config import RunConfig
from .crypto_ops import decrypt_update, encrypt_update
from .dp import clip_and_noise, epsilon_exact, epsilon_rdp
from .evaluation import generate_samples, perplexity, write_adapter_meta
from .he import CKKSParams, combine_partials, keygen_shared, keygen_threshold, partial_decrypt
from .importance import importance_mask
from .layout import Layout
from .errors import DataError, ParameterError
from .model import (LoraSettings, attach_lora, build_tiny_llama, get_lora_state,
                    load_local_model, load_local_tokenizer, lora_targets_for,
                    prepare_for_training, resolve_device, set_lora_state)
from .pruning import apply_mask, kept_fraction, prune_ratio
from .train import cosine_lr, evaluate_loss, train_local

log = logging.getLogger("fedshield")

PHASES = ("train", "prune", "encrypt", "aggregate", "decrypt")

# A wider init of the random tiny base gives its frozen output layer enough reach that LoRA
# on q/v alone visibly lowers the loss in a few rounds (with 0.02 it barely moves).
TINY_INIT_STD = 0.1


AUTO_FLOOD_BITS = 30  # statistical security of flooding when flood_bits=-1 and keys=threshold


def ckks_params(cfg: RunConfig) -> CKKSParams:
    """The CKKS parameters of a run (every engine generates its keys with these)."""
    # Threshold decryption adds flooding noise: 2 more bits of scale keep it under 1e-6.
    scale_bits = cfg.scale_bits or (52 if cfg.keys == "threshold" else 50)
    # Threshold partial decryptions leave their parties: flood them by default (issue: IND-CPA^D).
    flood_bits = cfg.flood_bits if cfg.flood_bits >= 0 else (
        AUTO_FLOOD_BITS if cfg.keys == "threshold" else 0)
    return CKKSParams(ring_dim=cfg.ring_dim, scale_bits=scale_bits, flood_bits=flood_bits)


class _Timer:
    def __init__(self) -> None:
        self.seconds = {p: 0.0 for p in PHASES}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def _weighted_average(states: list[Mapping[str, torch.Tensor]],
                      weights: list[float]) -> dict[str, torch.Tensor]:
    """Plaintext FedAvg in float64: the reference the encrypted path must match."""
    total = float(sum(weights))
    return {name: (sum(w * s[name].double() for s, w in zip(states, weights)) / total).float()
            for name in states[0]}


@contextmanager
def _hf_progress(show: bool):
    """transformers' own progress bars (e.g. "Writing model shards") only when we show ours."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@dataclass
class RoundPlan:
    """What every client of round `round` must agree on."""

    round: int
    lr: float
    ratio: float                                # pruned fraction this round
    mask: dict[str, torch.Tensor] | None        # the global mask (prune=global), else None


@dataclass
class ClientReply:
    """One client's contribution to a round."""

    client: int
    payload: bytes | dict                       # EncryptedUpdate wire bytes, or plaintext values
    weight: float
    loss: float                                 # mean local training loss
    kept: float                                 # fraction of LoRA values kept by pruning
    nbytes: int                                 # bytes this client sends
    update_norm: float | None = None            # DP-LoRA: L2 norm before clipping


class LocalSimulation:
    """One federated fine-tuning run in one process (the `local` engine)."""

    def __init__(self, config: RunConfig, show_progress: bool | None = None, *,
                 make_keys: bool = True) -> None:
        """make_keys=False: no key generation here (an engine that hands out its own key
        files passes a context to client_round and aggregates itself)."""
        self.cfg = config
        self.out = Path(config.out)
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.client_ctxs, self.server_ctx, self.params = [], None, None
        self.resumed: dict | None = None
        # The alpaca template; its preamble-free variant keeps the tiny demo's sequences short.
        self.compact = config.template == "compact" or (config.template == "auto"
                                                         and config.model == "tiny")
        self._setup_data()
        self._setup_model()
        if make_keys:
            self._setup_keys()

    # -- set-up ------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.data == "synthetic":
            self._setup_synthetic_data()
        else:
            self._setup_file_data()
        # A public bound on any client's weight, agreed by the federation; it cancels out.
        self.weight_bound = float(2 ** math.ceil(math.log2(max(self.client_sizes))))

    def _tokenizer(self):
        if self.cfg.model == "tiny":
            return fsdata.build_tokenizer()
        return load_local_tokenizer(self.cfg.model)

    def _split(self, examples: list, split: str, source: str) -> list:
        cfg = self.cfg
        if split == "iid":
            return fsdatasets.split_iid(examples, cfg.clients, cfg.seed)
        if split == "dirichlet":
            return fsdatasets.split_dirichlet(examples, cfg.clients, cfg.dirichlet_alpha,
                                              cfg.seed)
        if not all("task" in ex for ex in examples):
            raise DataError(f"{source}: split='tasks' needs a task field; map a column to it "
                            "(--columns task=COLUMN) or use --split iid|dirichlet")
        try:
            return fsdata.split_non_iid(examples, cfg.clients, cfg.seed)
        except ValueError as exc:
            raise DataError(f"{source}: {exc}") from exc

    def _setup_synthetic_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = self._tokenizer()
        n_train = cfg.clients * cfg.examples_per_client
        examples = fsdata.make_synthetic_examples(n_train + cfg.eval_examples, cfg.seed)
        # Interleaved split keeps every task in the held-out set.
        eval_examples, train_examples = examples[:cfg.eval_examples], examples[cfg.eval_examples:]
        split = "tasks" if cfg.split == "auto" else cfg.split
        shards = self._split(train_examples, split, "synthetic data")
        if cfg.model == "tiny":  # the demo's examples always fit; keep its strict tokenizer
            self.client_data = [fsdata.tokenize_examples(s, self.tokenizer, cfg.max_len,
                                                         compact=self.compact) for s in shards]
            self.eval_data = fsdata.tokenize_examples(eval_examples, self.tokenizer, cfg.max_len,
                                                      compact=self.compact)
            self.sample_examples = eval_examples[:cfg.samples]
            self.client_sizes = [len(s) for s in shards]
            return
        self._tokenize(shards, eval_examples, "synthetic data")

    def _setup_file_data(self) -> None:
        cfg = self.cfg
        examples = fsdatasets.load_instruction_data(cfg.data, cfg.columns)
        if len(examples) < cfg.eval_examples + cfg.clients:
            raise DataError(f"{cfg.data}: {len(examples)} examples are too few for "
                            f"eval_examples={cfg.eval_examples} held out plus one per client "
                            f"({cfg.clients} clients)")
        self.tokenizer = self._tokenizer()
        order = list(range(len(examples)))
        random.Random(cfg.seed).shuffle(order)
        examples = [examples[i] for i in order]
        train_examples = examples[:-cfg.eval_examples]
        eval_examples = examples[-cfg.eval_examples:]
        shards = self._split(train_examples, "iid" if cfg.split == "auto" else cfg.split,
                             cfg.data)
        self._tokenize(shards, eval_examples, cfg.data)

    def _tokenize(self, shards: list, eval_examples: list, source: str) -> None:
        """Long examples lose prompt tokens from the left; answers too long are skipped."""
        cfg = self.cfg
        self.client_data, self.client_sizes = [], []
        self.sample_examples = list(eval_examples[:cfg.samples])
        self.data_stats = {"truncated": 0, "skipped": 0}
        for client, shard in enumerate(shards):
            tensors, stats = fsdatasets.tokenize_fitting(
                shard, self.tokenizer, cfg.max_len, compact=self.compact,
                source=f"{source}, client {client}")
            self.client_data.append(tensors)
            self.client_sizes.append(stats["kept"])
            self.data_stats["truncated"] += stats["truncated"]
            self.data_stats["skipped"] += stats["skipped"]
        self.eval_data, stats = fsdatasets.tokenize_fitting(
            eval_examples, self.tokenizer, cfg.max_len, compact=self.compact,
            source=f"{source}, held-out")
        self.data_stats["eval_truncated"] = stats["truncated"]
        self.data_stats["eval_skipped"] = stats["skipped"]

    def _setup_model(self) -> None:
        cfg = self.cfg
        quantized = cfg.quantize != "none"
        self.device = torch.device("cuda") if quantized else resolve_device(cfg.device)
        if cfg.model == "tiny":
            base = build_tiny_llama(len(self.tokenizer), seed=cfg.seed, init_std=TINY_INIT_STD)
            if cfg.dtype == "bf16":
                base.to(torch.bfloat16)
            targets = lora_targets_for("llama", cfg.lora_targets)
        else:
            base = load_local_model(cfg.model, dtype=cfg.dtype, vocab_size=len(self.tokenizer),
                                    max_len=cfg.max_len, quantize=cfg.quantize)
            targets = lora_targets_for(base.config.model_type, cfg.lora_targets)
        base = prepare_for_training(base, grad_checkpointing=cfg.grad_checkpointing,
                                    quantized=quantized)
        settings = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                target_modules=targets)
        try:
            self.model = attach_lora(base, settings, seed=cfg.seed)
        except ValueError as exc:  # peft: a target module the model does not have
            raise ParameterError(f"LoRA targets {list(targets)} on --model {cfg.model!r}: "
                                 f"{exc}") from exc
        if not quantized:  # bitsandbytes placed the quantized model already
            self.model.to(self.device)
        if cfg.algorithm == "ffa":
            # FFA-LoRA: A stays at its seeded initialisation, identical on every client.
            for name, param in self.model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
        self.global_state = get_lora_state(self.model)
        # What clients send and the server aggregates: every LoRA tensor, or B alone (ffa).
        self.shared_keys = [k for k in self.global_state
                            if cfg.algorithm != "ffa" or "lora_B" in k]
        self.layout = Layout.from_state_dict(self._shared(self.global_state))

    def _setup_keys(self) -> None:
        cfg = self.cfg
        if not cfg.he:
            return
        params = self.params = ckks_params(cfg)
        if cfg.keys == "threshold":
            self.client_ctxs, self.server_ctx = keygen_threshold(
                params, n_parties=cfg.clients, threshold=cfg.threshold or None)
        else:
            keys = keygen_shared(params)
            self.client_ctxs = [keys.client_context()] * cfg.clients
            # The server only ever sees this public context.
            self.server_ctx = keys.server_context()

    def _shared(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: state[k] for k in self.shared_keys}

    @property
    def client_ctx(self):
        """Client 0's context (shared-key mode: the one every client holds)."""
        return self.client_ctxs[0] if self.client_ctxs else None

    def _decrypt(self, agg, mask, timer: _Timer) -> tuple[dict, list[int], int]:
        """The average every present client ends up with; (average, present ids, share bytes)."""
        cfg = self.cfg
        if cfg.keys == "shared":
            with timer.phase("decrypt"):
                return decrypt_update(self.client_ctx, agg, self.layout, mask=mask), \
                    list(range(cfg.clients)), 0
        # Clients 0..dropouts-1 (the lead among them) are gone before decryption; the present
        # ones cover for them with their Shamir shares.
        present = list(range(cfg.dropouts, cfg.clients))
        with timer.phase("decrypt"):
            shares = [partial_decrypt(self.client_ctxs[i], agg, present=present) for i in present]
            average = combine_partials(agg, shares, self.layout, mask=mask)
        return average, present, sum(len(s) for s in shares)

    # -- one round, in steps an engine can place on different machines ---------------------
    def plan_round(self, round_idx: int, timer: _Timer | None = None) -> RoundPlan:
        """What every client must agree on before training: learning rate, pruning, mask."""
        cfg = self.cfg
        timer = timer or _Timer()
        lr = cosine_lr(round_idx - 1, cfg.rounds, cfg.lr, cfg.lr_min)
        ratio = (0.0 if cfg.prune == "off" else
                 prune_ratio(round_idx, cfg.prune_p0, cfg.prune_target,
                             cfg.prune_t_start, cfg.prune_t_end))
        # Global mask: from the previous round's decrypted global state, identical on every
        # client. Round 1 sends everything (LoRA B starts at zero: no magnitudes to rank yet).
        mask = None
        if cfg.prune == "global" and round_idx > 1:
            with timer.phase("prune"):
                mask = importance_mask(self._shared(self.global_state), ratio)
        return RoundPlan(round=round_idx, lr=lr, ratio=ratio, mask=mask)

    def _train_client(self, client: int, plan: RoundPlan, timer: _Timer):
        cfg = self.cfg
        set_lora_state(self.model, self.global_state)
        with timer.phase("train"):
            result = train_local(self.model, self.client_data[client], steps=cfg.local_steps,
                                 batch_size=cfg.batch_size, lr=plan.lr, grad_accum=cfg.grad_accum,
                                 seed=cfg.seed * 1_000_003 + plan.round * 1009 + client)
        local = self._shared(get_lora_state(self.model))
        if cfg.algorithm == "paper":  # the pruned weights themselves, averaged unweighted
            values, weight = local, 1.0
        else:  # delta and ffa: weighted FedAvg of updates
            values = {k: local[k] - self.global_state[k] for k in local}
            weight = float(result["num_examples"])
        return values, weight, float(result["loss"])

    def client_round(self, client: int, plan: RoundPlan, timer: _Timer | None = None,
                     ctx=None) -> ClientReply:
        """Client `client` trains from the current global state, prunes and (HE on) encrypts
        with `ctx` (default: its context from this simulation's key set-up)."""
        cfg = self.cfg
        timer = timer or _Timer()
        values, weight, loss = self._train_client(client, plan, timer)
        norm = None
        if cfg.dp:
            with timer.phase("train"):  # DP noise is part of producing the local update
                values, norm = clip_and_noise(values, cfg.dp_clip, cfg.dp_noise)
        with timer.phase("prune"):
            if cfg.prune == "local":
                mask = importance_mask(values, plan.ratio)
                values = apply_mask(values, mask)  # each client's own mask: sent densely
                kept = kept_fraction(mask)
            elif plan.mask is not None:
                values = apply_mask(values, plan.mask)
                kept = kept_fraction(plan.mask)
            else:
                kept = 1.0
        if not cfg.he:
            return ClientReply(client, values, weight, loss, kept,
                               4 * self.layout.kept_count(plan.mask), norm)  # dense fp32
        with timer.phase("encrypt"):
            upd = encrypt_update(ctx if ctx is not None else self.client_ctxs[client], values,
                                 self.layout, weight=weight, mask=plan.mask, round=plan.round,
                                 weight_bound=self.weight_bound)
        return ClientReply(client, upd.to_bytes(), weight, loss, kept, upd.nbytes, norm)

    def aggregate_replies(self, replies: Iterable[ClientReply], plan: RoundPlan,
                          timer: _Timer | None = None):
        """The server's step: an EncryptedUpdate (HE on) or the plaintext weighted average."""
        timer = timer or _Timer()
        with timer.phase("aggregate"):
            if not self.cfg.he:
                replies = list(replies)
                return _weighted_average([r.payload for r in replies], [r.weight for r in replies])
            # The server states what it knows of the round: a forged first reply cannot then
            # fix another round, layout, mask or weight bound for the rest.
            return aggregate(self.server_ctx, (r.payload for r in replies), round=plan.round,
                             layout=self.layout, mask=plan.mask, weight_bound=self.weight_bound)

    def apply_average(self, average: Mapping[str, torch.Tensor]) -> None:
        """Folds the round's decrypted average into the global state."""
        if self.cfg.algorithm == "paper":
            new = {k: v.clone() for k, v in average.items()}
        else:
            new = {k: self.global_state[k] + average[k] for k in average}
        self.global_state = {**self.global_state, **new}
        set_lora_state(self.model, self.global_state)

    def evaluate(self) -> float:
        set_lora_state(self.model, self.global_state)
        return evaluate_loss(self.model, self.eval_data, batch_size=32)

    def run_round(self, round_idx: int, progress=None) -> dict:
        cfg = self.cfg
        timer = _Timer()
        plan = self.plan_round(round_idx, timer)
        replies = []
        for client in range(cfg.clients):
            replies.append(self.client_round(client, plan, timer))
            if progress is not None:
                progress.update(1)
        result = self.aggregate_replies(replies, plan, timer)
        if cfg.he:
            self.last_aggregate = result
            bytes_down = result.nbytes
            average, present, share_bytes = self._decrypt(result, plan.mask, timer)
        else:
            average, present, share_bytes = result, list(range(cfg.clients)), 0
            bytes_down = replies[0].nbytes
        self.apply_average(average)
        eval_loss = self.evaluate()
        entry = {
            "round": round_idx,
            "train_loss": [r.loss for r in replies],
            "eval_loss": eval_loss,
            "perplexity": perplexity(eval_loss),
            "bytes_up": [r.nbytes for r in replies],
            "bytes_down": bytes_down,
            "seconds": {k: round(v, 4) for k, v in timer.seconds.items()},
            "kept_fraction": sum(r.kept for r in replies) / len(replies),
            "decrypting_clients": present,
            "bytes_partial_decryptions": share_bytes,
            "prune_ratio": plan.ratio,
            "lr": plan.lr,
            "samples": self.samples(),
        }
        if cfg.dp:
            entry["update_norm"] = [r.update_norm for r in replies]
            entry["dp_epsilon"] = epsilon_rdp(cfg.dp_noise, round_idx, cfg.dp_delta)
        return entry

    def samples(self) -> list[dict]:
        """The global model's greedy answers to the first held-out prompts."""
        set_lora_state(self.model, self.global_state)
        return generate_samples(self.model, self.tokenizer, self.sample_examples,
                                compact=self.compact, max_new_tokens=self.cfg.sample_tokens)

    def dp_summary(self, rounds: int) -> dict:
        cfg = self.cfg
        return {"clip": cfg.dp_clip, "noise_multiplier": cfg.dp_noise, "delta": cfg.dp_delta,
                "rounds": rounds, "accountant": "rdp (Mironov 2017; Balle et al. 2020 conversion)",
                "epsilon": epsilon_rdp(cfg.dp_noise, rounds, cfg.dp_delta),
                "epsilon_exact": epsilon_exact(cfg.dp_noise, rounds, cfg.dp_delta),
                "neighbouring": "one client's whole update added or removed (sensitivity = clip)"}

    # -- the whole run ---------------------------------------------------------------------
    @classmethod
    def resume(cls, out: str | Path, show_progress: bool | None = None) -> "LocalSimulation":
        """The run of DIR continued after its last checkpointed round."""
        ckpt = load_checkpoint(out)
        try:
            cfg = RunConfig(**{**ckpt["config"], "out": str(out)})
        except TypeError as exc:
            raise ParameterError(f"--resume {str(out)!r}: its checkpoint config does not fit "
                                 f"this fedshield version: {exc}") from exc
        if ckpt["round"] > cfg.rounds:
            raise ParameterError(f"--resume {str(out)!r}: checkpoint of round {ckpt['round']} "
                                 f"but the run has {cfg.rounds} rounds")
        sim = cls(cfg, show_progress=show_progress)
        if sorted(ckpt["state"]) != sorted(sim.global_state):
            raise ParameterError(f"--resume {str(out)!r}: the checkpoint's LoRA tensors do not "
                                 "match the model this config builds")
        sim.global_state = ckpt["state"]
        set_lora_state(sim.model, sim.global_state)
        restore_rng(*ckpt["rng"])  # after set-up, so nothing above consumes the restored streams
        sim.resumed = ckpt
        return sim

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        set_lora_state(self.model, self.global_state)
        if self.resumed is not None:
            metrics, first = self.resumed["metrics"], self.resumed["round"] + 1
            log.info("fedshield: resuming %s after round %d of %d", self.out, first - 1,
                     cfg.rounds)
        else:
            initial = self.evaluate()
            metrics = {
                "config": cfg.to_dict(),
                "num_lora_values": self.layout.numel,
                "client_examples": self.client_sizes,
                "initial_eval_loss": initial,
                "initial_perplexity": perplexity(initial),
                "server_has_secret_key": bool(self.server_ctx.has_secret_key) if cfg.he else None,
                # Statistical security (bits) of the noise flooding of decryptions; 0 = none.
                "flood_bits": self.params.flood_bits if self.params else None,
                "rounds": [],
            }
            first = 1
            log.info("fedshield: %d clients, %d rounds, HE %s, %d LoRA values; initial eval "
                     "loss %.4f", cfg.clients, cfg.rounds, "on" if cfg.he else "off",
                     self.layout.numel, initial)
        bar = tqdm(total=cfg.rounds * cfg.clients, initial=(first - 1) * cfg.clients,
                   desc="clients x rounds", unit="update", disable=not self.show_progress,
                   file=sys.stderr)
        with bar:
            for r in range(first, cfg.rounds + 1):
                entry = self.run_round(r, progress=bar)
                metrics["rounds"].append(entry)
                if cfg.dp:
                    metrics["dp"] = self.dp_summary(r)
                bar.set_postfix(round=r, eval_loss=f"{entry['eval_loss']:.3f}")
                log.info("round %d/%d: eval loss %.4f (ppl %.2f), train loss %s, %d bytes "
                         "up/client, kept %.2f, seconds %s", r, cfg.rounds, entry["eval_loss"],
                         entry["perplexity"], [round(x, 3) for x in entry["train_loss"]],
                         max(entry["bytes_up"]), entry["kept_fraction"], entry["seconds"])
                save_checkpoint(self.out, round_idx=r, state=self.global_state,
                                metrics=metrics, config=cfg.to_dict())
                write_json_atomic(self.out / "metrics.json", metrics)
        self._save_adapter()
        from .plots import plot_run  # noqa: PLC0415 - matplotlib only when writing plots

        plot_run(metrics, self.out / "plots")
        return metrics

    def _save_adapter(self) -> None:
        """DIR/adapter (PEFT) over its base: DIR/base_model (the tiny base and its tokenizer),
        or the --model directory itself, referenced by absolute path."""
        if self.cfg.model == "tiny":
            base_dir = self.out / "base_model"
            base = build_tiny_llama(len(self.tokenizer), seed=self.cfg.seed,
                                    init_std=TINY_INIT_STD)
            with _hf_progress(self.show_progress):
                base.save_pretrained(base_dir)
            self.tokenizer.save_pretrained(base_dir)
        else:
            base_dir = Path(self.cfg.model)
        set_lora_state(self.model, self.global_state)
        for peft_config in self.model.peft_config.values():
            peft_config.base_model_name_or_path = str(base_dir.resolve())
        with _hf_progress(self.show_progress):
            self.model.save_pretrained(self.out / "adapter")
        write_adapter_meta(self.out / "adapter", compact=self.compact, max_len=self.cfg.max_len,
                           base=str(base_dir.resolve()))


def run(config: RunConfig, show_progress: bool | None = None) -> dict:
    """Runs a federated fine-tuning job and writes metrics.json, checkpoint/, adapter/, plots/."""
    return LocalSimulation(config, show_progress=show_progress).run()


def resume(out: str | Path, show_progress: bool | None = None) -> dict:
    """Continues the run in `out` from its last checkpoint; no round is lost or repeated."""
    return LocalSimulation.resume(out, show_progress=show_progress).run()
