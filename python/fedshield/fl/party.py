"""Party: one site's crypto half, usable from any training loop.

    party = fs.Party(ctx, model)              # ctx: a client or party context; model: a peft
                                              # model whose LoRA state now is the global state
    upd = party.encrypt_update(weight=n)      # EncryptedUpdate of (LoRA now - global), n: the
                                              # examples it trained on
    party.apply_aggregate(agg)                # LoRA := global + weighted average update
    share = party.partial_decrypt(agg)        # threshold keys; then apply_aggregate(agg, shares)

The party keeps the global LoRA state (fp32, on the CPU) next to the live model and knows which
round's aggregate it includes (``version``). Frozen base weights are never read or written:
only the LoRA tensors move, through peft's state-dict names.

The party owns every site-side rule of the federation, whatever loop trains the model: DP-LoRA's
clipping and noise of each update it prepares (``dp_clip``, ``dp_noise``), the algorithm's
weight of an update (:meth:`Party.weight_for`: ``paper`` weighs every party 1), and each round's
common mask (:meth:`Party.round_mask`): made once, from the global state the round starts from,
and used both for the update it encrypts and for the aggregate it decrypts.

The model may live on a GPU and be wrapped by DDP, FSDP (1 or 2) or torch.compile. A site that
trains on several ranks (torchrun) makes one Party per rank, on the same process group: its
LoRA weights are read and written on every rank; ``encrypt_update`` is a collective where each
rank encrypts its slice of the ciphertexts and the lead rank (rank 0) returns the site's one
update (the others get None); ``apply_aggregate`` is a collective where the lead decrypts the
aggregate it received and broadcasts the average to every rank. ``partial_decrypt`` and
``decrypt`` run on the lead alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from ..base.errors import FedShieldError, KeyMaterialError, ParameterError
from ..config import RunConfig
from ..dp.noise import MIN_NOISE_MULTIPLIER, clip_and_noise
from ..he import Context, EncryptedUpdate, Layout, combine_partials, decrypt_update, partial_decrypt
from ..he.budget import DecryptionBudget
from ..he.encryption import (DEFAULT_TOLERANCE, encrypt_ciphertexts, encrypt_packed, pack_update,
                             seal_update)
from ..training.lora import get_lora_state, set_lora_state, unwrap_peft
from ..pruning.mask import apply_mask, importance_mask, kept_fraction
from ..trust.guard import AggregateGuard, Provenance
from .ranks import WORLD, Ranks

ALGORITHMS = ("delta", "paper", "ffa")


@dataclass(frozen=True)
class PreparedUpdate:
    """An update ready to encrypt (or to send in the clear without HE): its values, the mask it
    is packed with (None: dense), the fraction of values its pruning kept, and (DP) its L2
    norm before clipping."""

    values: dict
    mask: dict | None
    kept_fraction: float
    update_norm: float | None = None


def _check_dp(algorithm: str, clip: float, noise: float) -> None:
    for name, value in (("dp_clip", clip), ("dp_noise", noise)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0):
            raise ParameterError(f"{name}={value!r} must be a finite number >= 0 (0: no DP)")
    if bool(clip) != bool(noise):
        raise ParameterError(f"dp_clip={clip!r}, dp_noise={noise!r}: DP-LoRA needs both a "
                             "clipping norm and a noise multiplier > 0 (or neither)")
    if noise and noise < MIN_NOISE_MULTIPLIER:
        raise ParameterError(f"dp_noise={noise!r} is below the smallest noise multiplier, "
                             "2**-40")
    if clip and algorithm == "paper":
        raise ParameterError("DP-LoRA clips and noises updates; algorithm='paper' sends "
                             "weights. Use algorithm 'delta' or 'ffa' with dp_clip")


def _check_key_context(ctx) -> None:
    if ctx is None:
        return
    if not isinstance(ctx, Context):
        raise TypeError(f"expected a fedshield Context or None, got {type(ctx).__name__}")
    if not (ctx.has_secret_key or ctx.is_party):
        raise KeyMaterialError(f"a Party needs a client or party context; this {ctx.role} "
                               "context holds no key material and could never decrypt")


class Party:
    """See the module docstring. ``algorithm``: ``delta`` (weighted FedAvg of updates),
    ``paper`` (the pruned weights themselves, whose average replaces the global state) or
    ``ffa`` (FFA-LoRA: LoRA A frozen at its seeded initialisation, only B is sent; with DDP,
    make the Party before wrapping the model, so that DDP sees A frozen).
    ``process_group``: the ranks that train this site's model (see the module docstring):
    ``"world"`` (every rank when torch.distributed is initialised), ``None`` (this process
    alone) or a ProcessGroup. ``dp_clip``, ``dp_noise``: DP-LoRA (both > 0, or both 0 for no
    DP): every update is clipped to L2 norm ``dp_clip`` and gets discrete Gaussian noise of
    standard deviation ``dp_noise * dp_clip`` (fedshield.dp.noise) before pruning."""

    def __init__(self, ctx: Context | None, model, *, algorithm: str = "delta",
                 weight_bound: float | None = None, process_group=WORLD,
                 guard: AggregateGuard | None = None,
                 budget: DecryptionBudget | None = None, dp_clip: float = 0.0,
                 dp_noise: float = 0.0) -> None:
        if algorithm not in ALGORITHMS:
            raise ParameterError(f"algorithm={algorithm!r} is not one of {ALGORITHMS}")
        _check_dp(algorithm, dp_clip, dp_noise)
        _check_key_context(ctx)
        unwrap_peft(model)  # TypeError unless a peft model is inside
        if weight_bound is not None and not (math.isfinite(weight_bound) and weight_bound > 0):
            raise ParameterError(f"weight_bound={weight_bound!r} must be a positive number")
        self.ctx = ctx
        # what this party checks and counts before its key touches an aggregate (None: nothing,
        # for loops that trust their transport; fedshield's sites always set both)
        self.guard = guard
        self.budget = budget
        self.model = model
        self.ranks = Ranks(process_group)
        self.algorithm = algorithm
        self.dp_clip, self.dp_noise = float(dp_clip), float(dp_noise)
        # the federation's bound on every weight (None: each update's own power of two)
        self.weight_bound = None if weight_bound is None else float(weight_bound)
        if algorithm == "ffa":  # A stays at its seeded initialisation, identical everywhere
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
        self._global = get_lora_state(model)
        if not self._global:
            raise ParameterError("the model has no LoRA tensors (attach LoRA with peft first)")
        self.shared_names = sorted(k for k in self._global
                                   if algorithm != "ffa" or "lora_B" in k)
        self.layout = Layout.from_state_dict(self._shared(self._global))
        if self.ranks.distributed:  # every rank starts from the lead's global state
            self._global = self._unflatten(self.ranks.broadcast(
                self._flatten(self._global, sorted(self._global)), self._numel_all()),
                sorted(self._global))
            self.load_global()
        self.version = 0          # the last round whose aggregate the global state includes
        # round -> its common mask (None: dense), from when it is made or an update is
        # encrypted with it until the round's aggregate is applied
        self._masks: dict[int, dict | None] = {}

    @classmethod
    def for_run(cls, ctx: Context | None, model, cfg: RunConfig, **options) -> "Party":
        """A party with a run's site-side rules: its algorithm and its DP settings."""
        return cls(ctx, model, algorithm=cfg.training.algorithm, dp_clip=cfg.dp.clip,
                   dp_noise=cfg.dp.noise, **options)

    def __repr__(self) -> str:
        ranks = f", {self.ranks}" if self.ranks.distributed else ""
        return (f"Party({self.algorithm}, {self.layout.numel} LoRA values, version "
                f"{self.version}{ranks}, {self.ctx!r})")

    # -- flat forms, for broadcasting between ranks ----------------------------------------------
    def _numel_all(self) -> int:
        return sum(t.numel() for t in self._global.values())

    @staticmethod
    def _flatten(state: Mapping, names: list[str]) -> torch.Tensor:
        return torch.cat([torch.as_tensor(state[k], dtype=torch.float32).reshape(-1)
                          for k in names])

    def _unflatten(self, flat: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for k in names:
            n = self._global[k].numel()
            out[k] = flat[at:at + n].reshape(self._global[k].shape).clone()
            at += n
        return out

    # -- the global state ---------------------------------------------------------------------
    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """name -> fp32 CPU tensor of every LoRA tensor (A and B); do not modify in place."""
        return self._global

    def set_global(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Replaces the global state (every LoRA tensor, e.g. from a checkpoint) and loads it."""
        if sorted(state) != sorted(self._global):
            raise ParameterError("the state's LoRA tensors are not this model's: missing "
                                 f"{sorted(set(self._global) - set(state))[:3]}, unexpected "
                                 f"{sorted(set(state) - set(self._global))[:3]}")
        self._global = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).clone()
                        for k, v in state.items()}
        self.version = version
        self._masks = {}          # made from the state replaced
        self.load_global()

    def load_global(self) -> None:
        """Sets the model's LoRA weights to the global state (e.g. before local training when
        several parties share one model object)."""
        set_lora_state(self.model, self._global)

    def _shared(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: state[k] for k in self.shared_names}

    def global_mask(self, ratio: float) -> dict[str, torch.Tensor]:
        """The keep-mask every party computes alike from the global state (prune=global)."""
        return importance_mask(self._shared(self._global), ratio)

    def round_mask(self, round: int, ratio: float = 0.0) -> dict[str, torch.Tensor] | None:
        """Round ``round``'s common mask (prune=global): :meth:`global_mask` of ``ratio``, made
        from the global state the round starts from the first time it is asked for, then kept
        until the round's aggregate is applied; the update and the aggregate of the round use
        this one. None (dense) for a ``ratio`` of 0. An update encrypted for the round with
        a mask of the caller's makes that one the round's."""
        if round not in self._masks:
            self._masks[round] = self.global_mask(ratio) if ratio else None
        return self._masks[round]

    @property
    def dp(self) -> bool:
        """Whether this party clips and noises its updates (DP-LoRA)."""
        return self.dp_clip > 0

    def weight_for(self, num_examples: float) -> float:
        """The weight the algorithm gives an update trained on ``num_examples`` examples: the
        count itself (weighted FedAvg), or 1 for ``paper`` (the unweighted average of the
        parties' pruned weights)."""
        if not (isinstance(num_examples, (int, float)) and not isinstance(num_examples, bool)
                and math.isfinite(num_examples) and num_examples > 0):
            raise ParameterError(f"weight={num_examples!r} must be a positive number (the "
                                 "examples the update was trained on)")
        return 1.0 if self.algorithm == "paper" else float(num_examples)

    # -- the update ----------------------------------------------------------------------------
    def update_values(self) -> dict[str, torch.Tensor]:
        """What this party sends, before pruning: LoRA now - global (``delta``, ``ffa``), or
        the LoRA weights themselves (``paper``)."""
        local = self._shared(get_lora_state(self.model))
        if self.algorithm == "paper":
            return local
        return {k: local[k] - self._global[k] for k in local}

    def prepare(self, *, prune_ratio: float = 0.0, mask: Mapping | None = None,
                values: Mapping | None = None) -> PreparedUpdate:
        """The update to send: ``values`` (default :meth:`update_values`), clipped and noised
        when the party does DP, then pruned by this party's own mask of ``prune_ratio`` (sent
        densely, zeros at pruned positions), or by ``mask`` (the round's common mask, see
        :meth:`round_mask`: the ciphertexts shrink)."""
        if prune_ratio and mask is not None:
            raise ParameterError("give prune_ratio (this party's own mask) or mask (the "
                                 "round's common mask), not both")
        if not (isinstance(prune_ratio, (int, float)) and 0.0 <= prune_ratio <= 1.0):
            raise ParameterError(f"prune_ratio={prune_ratio!r} must be in [0, 1]")
        values = dict(self.update_values() if values is None else values)
        self.layout.check_state(values, "update values")
        norm = None
        if self.dp:  # the noise is part of producing the update, before anything is dropped
            values, norm = self._clip_and_noise(values)
        if prune_ratio:
            own = importance_mask(values, prune_ratio)
            return PreparedUpdate(apply_mask(values, own), None, kept_fraction(own), norm)
        if mask is not None:
            mask = dict(mask)
            return PreparedUpdate(apply_mask(values, mask), mask, kept_fraction(mask), norm)
        return PreparedUpdate(values, None, 1.0, norm)

    def _clip_and_noise(self, values: dict) -> tuple[dict, float]:
        """DP-LoRA on ``values``; several ranks: the lead draws the noise and every rank
        gets its result (they send one update)."""
        if not self.ranks.distributed:
            return clip_and_noise(values, self.dp_clip, self.dp_noise)
        names = sorted(values)
        noised, norm = (clip_and_noise(values, self.dp_clip, self.dp_noise)
                        if self.ranks.is_lead else (None, None))
        flat = self._flatten(noised, names) if self.ranks.is_lead else None
        norm = self.ranks.broadcast_object(norm)
        flat = self.ranks.broadcast(flat, sum(values[k].numel() for k in names))
        out, at = {}, 0
        for k in names:
            n = values[k].numel()
            out[k] = flat[at:at + n].reshape(values[k].shape).clone()
            at += n
        return out, norm

    def encrypt(self, prepared: PreparedUpdate, weight: float, *, round: int | None = None,
                weight_bound: float | None = None, tolerance: float = DEFAULT_TOLERANCE,
                threads: int = 0, workers: int | None = None) -> EncryptedUpdate | None:
        """Encrypts a prepared update, pre-weighted by the algorithm's weight for ``weight``
        examples (:meth:`weight_for`: the count itself, 1 for ``paper``).

        On a site of several ranks this is a collective: each rank encrypts its slice of the
        ciphertexts, and the lead rank returns the one update stitched from every slice (the
        other ranks return None). ``threads``/``workers`` as in :func:`fs.encrypt_update`, per
        rank."""
        if self.ctx is None:
            raise KeyMaterialError("this party has no context (HE off): send its update values "
                                   "in the clear")
        round = self.version + 1 if round is None else round
        weight = self.weight_for(weight)
        bound = self.weight_bound if weight_bound is None else weight_bound
        ranks = self.ranks
        names = [s.name for s in self.layout.specs]
        mask = prepared.mask or {}
        ranks.check_same("the update", [*(prepared.values[k] for k in names),
                                        *(mask[k] for k in sorted(mask)), weight, round, bound])
        packed = pack_update(self.ctx, prepared.values, self.layout, weight=weight,
                             mask=prepared.mask, round=round, weight_bound=bound,
                             tolerance=tolerance, threads=threads)
        if not ranks.distributed:  # one rank: straight to the update, natively
            try:
                update = encrypt_packed(self.ctx, packed, threads)
            finally:
                packed.buffer.fill(0.0)  # the plaintext update: wiped once encrypted
            self._masks[round] = prepared.mask
            return update
        start, stop = ranks.slice(packed.n_ciphertexts)
        cts = encrypt_ciphertexts(self.ctx, packed, start, stop, workers=workers)
        header = packed.header
        del packed  # plaintext update: drop it as soon as it is encrypted
        slices = ranks.gather(cts)
        self._masks[round] = prepared.mask
        if slices is None:
            return None
        return seal_update(self.ctx, header, [ct for part in slices for ct in part], threads)

    def encrypt_update(self, weight: float, *, round: int | None = None,
                       prune_ratio: float = 0.0, mask: Mapping | None = None,
                       values: Mapping | None = None, **options) -> EncryptedUpdate | None:
        """EncryptedUpdate of (LoRA now - global) for round ``round`` (default: the next one),
        with DP when the party does it, weighted by :meth:`weight_for`; no pruning unless
        asked (``prune_ratio`` or ``mask``, see :meth:`prepare`). Several
        ranks: a collective, the update comes back on the lead rank (see :meth:`encrypt`)."""
        return self.encrypt(self.prepare(prune_ratio=prune_ratio, mask=mask, values=values),
                            weight, round=round, **options)

    def set_keys(self, ctx: Context, budget: DecryptionBudget | None = None) -> None:
        """Switches to the keys of a new key epoch (the global state stays as it is)."""
        _check_key_context(ctx)
        if ctx is None:
            raise KeyMaterialError("set_keys needs a client or party context")
        self.ctx = ctx
        self.budget = budget

    # -- the aggregate --------------------------------------------------------------------------
    def _admit(self, agg: EncryptedUpdate, provenance: Provenance | None) -> None:
        """The guard's checks, then the budget's charge, before the key touches ``agg``."""
        if self.guard is not None:
            self.guard.check_aggregate(self.ctx, agg, provenance)
        if self.budget is not None:
            self.budget.charge(self.ctx.fingerprint, agg.n_ciphertexts)

    @property
    def budget_left(self) -> int:
        """Ciphertexts this party's key may still decrypt (-1: not counted)."""
        return -1 if self.budget is None else self.budget.remaining

    def partial_decrypt(self, agg, present: Iterable[int] | None = None, *,
                        provenance: Provenance | None = None) -> bytes:
        """Threshold keys: this party's partial decryption of the aggregate (bytes), once its
        guard admits it (``provenance``: the aggregate's signed manifest) and its budget
        allows it."""
        if self.ctx is None:
            raise KeyMaterialError("this party has no context (HE off)")
        agg = agg if isinstance(agg, EncryptedUpdate) else EncryptedUpdate.from_bytes(agg)
        self._admit(agg, provenance)
        return partial_decrypt(self.ctx, agg, present=present)

    def decrypt(self, agg, shares: Iterable[bytes] | None = None, *,
                provenance: Provenance | None = None,
                share_records: Sequence[bytes] | None = None) -> dict[str, torch.Tensor]:
        """The weighted average update the aggregate holds (shared keys: decrypted with this
        party's key, once its guard admits it and its budget allows it; threshold keys: fused
        from every present party's ``shares``, each checked against its signed record in
        ``share_records`` by the guard), unpacked with the round's mask (:meth:`round_mask`;
        none made or used: dense)."""
        if self.ctx is None:
            raise KeyMaterialError("this party has no context (HE off)")
        agg = agg if isinstance(agg, EncryptedUpdate) else EncryptedUpdate.from_bytes(agg)
        mask = self._masks.get(agg.round)
        if shares is not None:
            shares = list(shares)
            if self.guard is not None:
                self.guard.check_shares(agg, shares, share_records or [])
            return combine_partials(agg, shares, self.layout, mask=mask, ctx=self.ctx)
        self._admit(agg, provenance)
        return decrypt_update(self.ctx, agg, self.layout, mask=mask)

    def apply_average(self, average: Mapping | None, version: int | None = None) -> dict:
        """Folds a decrypted (or plaintext) weighted average into the global state and the
        model: global + average (``paper``: the average replaces it). Several ranks: a
        collective; the lead's ``average`` and ``version`` reach every rank (the others may
        pass None). Returns the average applied."""
        names = self.shared_names
        if self.ranks.distributed:
            if self.ranks.is_lead:
                self.layout.check_state(average, "average")
            flat = self._flatten(average, names) if self.ranks.is_lead else None
            version = self.ranks.broadcast_object(version)
            average = self._unflatten(self.ranks.broadcast(
                flat, sum(self._global[k].numel() for k in names)), names)
        self.layout.check_state(average, "average")
        avg = {k: torch.as_tensor(v, dtype=torch.float32).reshape(self._global[k].shape)
               for k, v in average.items()}
        if self.algorithm == "paper":
            new = {k: v.clone() for k, v in avg.items()}
        else:
            new = {k: self._global[k] + avg[k] for k in avg}
        self._global = {**self._global, **new}
        self.load_global()
        self.version = self.version + 1 if version is None else version
        self._masks = {r: m for r, m in self._masks.items() if r > self.version}
        return avg

    def apply_aggregate(self, agg, shares: Iterable[bytes] | None = None,
                        **checks) -> dict[str, torch.Tensor]:
        """Decrypts the aggregate (see :meth:`decrypt`) and applies it: the model's LoRA becomes
        the new global state, of version ``agg.round``. Returns the average applied.
        ``checks``: ``provenance``, ``share_records`` for the guard (see decrypt).

        Several ranks: a collective; the lead rank, which received the aggregate, decrypts it
        and broadcasts the average (the other ranks may pass None for ``agg``). If the lead
        cannot decrypt, every rank raises."""
        ranks = self.ranks
        average = version = failure = None
        if ranks.is_lead:
            try:
                agg = agg if isinstance(agg, EncryptedUpdate) else EncryptedUpdate.from_bytes(agg)
                average, version = self.decrypt(agg, shares, **checks), agg.round
            except (FedShieldError, ValueError, TypeError) as exc:
                if not ranks.distributed:
                    raise
                failure = exc
        status = ranks.broadcast_object(None if failure is None
                                        else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if status is not None:
            raise FedShieldError(f"the lead rank could not decrypt the aggregate: {status}")
        return self.apply_average(average, version=version)
