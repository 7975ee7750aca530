"""A multi-rank site on CUDA (NCCL): run by benchmarks/gpu_check.sh under torchrun.

    torchrun --nproc-per-node=N benchmarks/nccl_site.py --wrapper ddp|fsdp1|fsdp2

Each rank holds a tiny Llama with LoRA on its GPU, wrapped as asked, and one fs.Party on the
NCCL group. Two rounds of a one-site federation: train with a plain loop, encrypt collectively
(each rank its slice of the ciphertexts; rank 0 stitches the update), aggregate, decrypt on
rank 0 and broadcast over NCCL; every rank must end at its local LoRA weights (the average of
one site) within 1e-5. Rank 0 prints the encryption time. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrapper", choices=["ddp", "fsdp1", "fsdp2"], default="ddp")
    parser.add_argument("--rank-lora", type=int, default=64)
    args = parser.parse_args(argv)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    import fedshield as fs
    from fedshield.config import LoraConfig
    from fedshield.training.lora import attach_lora, get_lora_state
    from fedshield.training.base_model import build_tiny_llama
    key = os.environ["FEDSHIELD_SITE_KEY"]
    ctx = fs.load_context(key)
    server = ctx.public()
    model = attach_lora(build_tiny_llama(64, seed=0),
                        LoraConfig(r=args.rank_lora, alpha=2 * args.rank_lora), seed=0).cuda()
    if args.wrapper == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    elif args.wrapper == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        trained = FSDP(model, device_id=local, use_orig_params=True)
    else:
        from torch.distributed.fsdp import fully_shard

        trained = fully_shard(model)
    party = fs.Party(ctx, trained, weight_bound=8.0)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    worst = 0.0
    for r in (1, 2):
        g = torch.Generator().manual_seed(100 * r + rank)
        for _ in range(3):
            ids = torch.randint(0, 64, (4, 12), generator=g).cuda()
            loss = trained(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        mine = get_lora_state(trained)
        torch.cuda.synchronize()
        torch.distributed.barrier()
        start = time.perf_counter()
        upd = party.encrypt_update(weight=4.0)
        torch.distributed.barrier()
        seconds = time.perf_counter() - start
        agg = fs.aggregate(server, [upd]) if rank == 0 else None
        party.apply_aggregate(agg)
        now = get_lora_state(trained)
        worst = max(worst, max(float((now[k] - mine[k]).abs().max()) for k in mine))
        if rank == 0:
            print(f"nccl site ({args.wrapper}, {world} ranks): round {r}, "
                  f"{party.layout.numel} LoRA values encrypted in {seconds:.3f} s")
    errors = [None] * world
    torch.distributed.all_gather_object(errors, worst)
    torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"nccl site ({args.wrapper}, {world} ranks): max error on any rank {max(errors):.2e}")
    return 0 if max(errors) <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
