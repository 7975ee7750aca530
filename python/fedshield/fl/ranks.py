"""The processes of one site: the ranks of a torch.distributed job (torchrun, Slurm, DDP, FSDP)
that train one model together, or just this process.

A site is one party however many ranks it trains on. The lead rank (rank 0 of the group) is
the one that talks to the federation: it sends the site's one update and receives the
aggregate. The other ranks share the work in between: each encrypts its slice of the update's
ciphertexts, and the decrypted global adapter is broadcast to all of them.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from ..base.errors import ParameterError

WORLD = "world"


class Ranks:
    """``group``: ``"world"`` (the default process group when torch.distributed is initialised
    with more than one rank, else this process alone), ``None`` (this process alone), or a
    torch.distributed ProcessGroup."""

    def __init__(self, group=WORLD) -> None:
        dist = torch.distributed
        if isinstance(group, str) and group != WORLD:
            raise ParameterError(f"process_group={group!r}: expected 'world', None or a "
                                 "torch.distributed ProcessGroup")
        ready = dist.is_available() and dist.is_initialized()
        if group is not None and not isinstance(group, str) and not ready:
            raise ParameterError("a process group was given but torch.distributed is not "
                                 "initialised")
        self.group = None if (group is None or not ready) else (
            dist.group.WORLD if group == WORLD else group)
        self.size = dist.get_world_size(self.group) if self.group is not None else 1
        if self.size == 1:
            self.group = None
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        # The global rank of the group's rank 0 (collectives name their source globally).
        self.lead_global = (dist.get_global_rank(self.group, 0) if self.group is not None
                            else 0)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank {self.rank} of {self.size})"

    def _device(self) -> torch.device:
        """Where collective tensors live: NCCL needs this rank's current CUDA device."""
        if torch.distributed.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def slice(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share of ``n`` items (ciphertexts)."""
        bounds = np.linspace(0, n, self.size + 1).astype(int)
        return int(bounds[self.rank]), int(bounds[self.rank + 1])

    def broadcast(self, tensor: torch.Tensor | None, numel: int) -> torch.Tensor:
        """The lead's flat fp32 ``tensor`` (of ``numel`` values) on every rank, on the CPU."""
        if not self.distributed:
            return tensor
        buf = (tensor.to(self._device(), torch.float32) if self.is_lead
               else torch.empty(numel, dtype=torch.float32, device=self._device()))
        if buf.numel() != numel:
            raise ParameterError(f"the lead rank holds {buf.numel()} values, expected {numel}")
        torch.distributed.broadcast(buf, src=self.lead_global, group=self.group)
        return buf.cpu()

    def broadcast_object(self, item):
        """The lead's ``item`` (picklable) on every rank."""
        if not self.distributed:
            return item
        box = [item if self.is_lead else None]
        torch.distributed.broadcast_object_list(box, src=self.lead_global, group=self.group)
        return box[0]

    def gather(self, item) -> list | None:
        """Every rank's ``item`` (picklable) in rank order on the lead; None elsewhere."""
        if not self.distributed:
            return [item]
        out = [None] * self.size if self.is_lead else None
        torch.distributed.gather_object(item, out, dst=self.lead_global, group=self.group)
        return out

    def all_gather(self, item) -> list:
        if not self.distributed:
            return [item]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, item, group=self.group)
        return out

    def check_same(self, what: str, parts: Sequence) -> None:
        """Raises ParameterError on every rank unless every rank holds the same ``parts``
        (tensors, arrays, numbers, strings): the ranks of a site must agree on what they
        encrypt, or the slices would not belong to one update."""
        if not self.distributed:
            return
        digest = hashlib.sha256()
        for part in parts:
            if isinstance(part, torch.Tensor):
                part = part.detach().cpu().contiguous().numpy()
            digest.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
        digests = self.all_gather(digest.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ParameterError(f"{what} differs between ranks {differ} and rank 0: every rank "
                                 "of a site must hold the same LoRA weights (DDP and FSDP keep "
                                 "them so) and pass the same weight, round and mask")
