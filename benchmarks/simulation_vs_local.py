"""Wall time of one run on Flower's simulation runtime against the local engine.

    .venv/bin/python benchmarks/simulation_vs_local.py [--sites 4] [--rounds 2] [--cpus 1]

The demo set-up (tiny Llama, generated data) with --sites sites: the local engine trains them
one after another in one process; the simulation runtime runs each site in its own worker,
as many at a time as the node's CPUs allow at --cpus per site. Prints both wall times (one
run each, start-up included) and the final eval losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args(argv)
    from fedshield.config import RunConfig
    from fedshield.engines.flower.launcher import SiteResources, run_flower
    from fedshield.engines.local import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig.from_flat(clients=args.sites, rounds=args.rounds, samples=0,
                                  engine="flower", out=str(Path(tmp) / "sim"))
        load = [os.getloadavg()[0]]
        start = time.perf_counter()
        local = run(cfg.replace(engine="local", out=str(Path(tmp) / "local"), min_clients=0),
                    show_progress=False)
        t_local = time.perf_counter() - start
        load.append(os.getloadavg()[0])
        start = time.perf_counter()
        sim = run_flower(cfg, simulation=SiteResources(cpus=args.cpus))
        t_sim = time.perf_counter() - start
        load.append(os.getloadavg()[0])
    print(f"{args.sites} sites x {args.rounds} rounds, {os.cpu_count()} CPUs, "
          f"{args.cpus} CPU(s) per simulated site; load average {load[0]:.1f} at start, "
          f"{load[1]:.1f} after the local run, {load[2]:.1f} at the end")
    print(f"  local engine        {t_local:7.1f} s   eval loss {local['rounds'][-1]['eval_loss']:.4f}")
    print(f"  simulation runtime  {t_sim:7.1f} s   eval loss {sim['rounds'][-1]['eval_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
