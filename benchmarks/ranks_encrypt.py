"""Encryption time of one site's update on 1 vs 2 ranks (torch.distributed, gloo on the CPU).

    .venv/bin/python benchmarks/ranks_encrypt.py [--values 4194304] [--repeat 3]

Each configuration runs fs.Party.encrypt_update on a peft model holding --values LoRA values,
in fresh processes started like torchrun's ranks (LOCAL_WORLD_SIZE set, so each rank's
FEDSHIELD_NUM_THREADS default is its share of the cores). Rows: 1 rank encrypting in-process
(1 thread), 1 rank with its default worker processes, and 2 ranks each encrypting half of the
ciphertexts; the lead stitches one update. Prints the best of --repeat per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path


def _model(values: int):
    import torch
    from peft import LoraConfig, get_peft_model

    width = 4096
    r = max(1, values // (2 * width))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(width, width, bias=False))
    model = get_peft_model(base, LoraConfig(r=r, target_modules=["0"], init_lora_weights=False))
    return model


def _rank(rank: int, world: int, port: int, key: str, values: int, repeat: int, workers,
          out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import fedshield as fs

    ctx = fs.load_context(key)
    model = _model(values)
    party = fs.Party(ctx, model, weight_bound=64.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.5)   # an update to send
    party.encrypt_update(weight=3.0, workers=workers)   # starts any worker pool
    best = float("inf")
    for _ in range(repeat):
        torch.distributed.barrier()
        start = time.perf_counter()
        upd = party.encrypt_update(weight=3.0, workers=workers)
        torch.distributed.barrier()
        best = min(best, time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": best, "values": party.layout.numel,
                                         "ciphertexts": upd.n_ciphertexts,
                                         "bytes": upd.nbytes}))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=1 << 22)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    import fedshield as fs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = str(Path(tmp) / "site.key")
        fs.keygen_shared().client_context().save(key)
        for label, world, workers in [("1 rank, in-process (1 thread)", 1, 1),
                                      ("1 rank, default worker processes", 1, None),
                                      ("2 ranks, default (1 thread each)", 2, None)]:
            out = str(Path(tmp) / "result.json")
            mp.start_processes(_rank, nprocs=world, join=True, start_method="spawn",
                               args=(world, _free_port(), key, args.values, args.repeat,
                                     workers, out))
            got = json.loads(Path(out).read_text())
            rows.append((label, got))
    print(f"{rows[0][1]['values']} LoRA values, {rows[0][1]['ciphertexts']} ciphertexts, "
          f"{rows[0][1]['bytes'] / 1e6:.1f} MB; {os.cpu_count()} CPUs")
    base = rows[0][1]["seconds"]
    for label, got in rows:
        print(f"  {label:36s} {got['seconds']:7.3f} s   x{base / got['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
