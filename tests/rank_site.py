"""Sites that train with plain torch loops, for tests/test_party.py: a tiny PEFT model, a few
AdamW steps, and a site of several ranks (torch.distributed, gloo on the CPU) that joins a
federation through fs.Party; the test process plays the other site and the server, and the
two exchange updates and aggregates through files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

VOCAB = 64


def tiny_peft(r: int = 4):
    """The federation's initial model: every site builds the same one (same seeds)."""
    from fedshield.config import LoraConfig
    from fedshield.training.lora import attach_lora
    from fedshield.training.base_model import build_tiny_llama
    return attach_lora(build_tiny_llama(VOCAB, seed=0), LoraConfig(r=r, alpha=2 * r), seed=0)


def train_steps(model, seed: int, steps: int = 3, lr: float = 2e-2) -> None:
    """A user's own loop: AdamW on the trainable parameters, random token batches."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def wait_for(path: Path, timeout: float = 300.0) -> bytes:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)
    return path.read_bytes()


def multi_rank_site(rank: int, world: int, work: str, port: int, wrapper: str, rounds: int,
                    weight: float, weight_bound: float) -> None:
    """One rank of a site (torch.multiprocessing entry point). Each round: train (DDP or FSDP2),
    encrypt collectively (rank 0 writes the one update), wait for the aggregate (rank 0 reads
    it), apply it collectively; every rank saves its LoRA state before and after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import fedshield as fs
    from fedshield.training.lora import get_lora_state
    work = Path(work)
    ctx = fs.load_context(work / "site.key")
    model = tiny_peft()
    dp = {}
    if wrapper == "ddp-dp":       # DP-LoRA: the lead draws the noise, every rank sends it
        wrapper, dp = "ddp", {"dp_clip": 1e-3, "dp_noise": 2.0 ** -30}
    if wrapper == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    elif wrapper == "unsynced":   # each rank trains its own copy: the ranks disagree
        trained = model
    else:
        from torch.distributed.fsdp import fully_shard

        trained = fully_shard(model)
    party = fs.Party(ctx, trained, weight_bound=weight_bound, **dp)
    for r in range(1, rounds + 1):
        train_steps(trained, seed=1000 * r + rank)   # each rank its own batches
        local = get_lora_state(trained)
        if wrapper == "unsynced":
            try:
                party.encrypt_update(weight=weight)
            except fs.ParameterError as exc:
                (work / f"error-rank{rank}.txt").write_text(str(exc))
            break
        upd = party.encrypt_update(weight=weight)
        assert (upd is None) == (rank != 0)
        torch.save(local, work / f"local-r{r}-rank{rank}.pt")
        if rank == 0:
            (work / f"update-r{r}.bin").write_bytes(upd.to_bytes())
        agg = wait_for(work / f"aggregate-r{r}.bin") if rank == 0 else None
        party.apply_aggregate(agg)
        assert party.version == r
        torch.save(get_lora_state(trained), work / f"global-r{r}-rank{rank}.pt")
    torch.distributed.destroy_process_group()
