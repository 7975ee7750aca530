"""Soak: --clients updates of --values values each through the native aggregator, read one at
a time from disk the way a server streams them, then decrypted and compared with the
plaintext weighted average.

Prints (and with --json writes) the time of each phase and the aggregating process's peak
resident memory (a process of its own, as a server is: the public context, no torch) before
and after aggregating: the aggregator holds one sum and one update at a time, so the growth
should stay near a few updates' size, not --clients of them.

  .venv/bin/python benchmarks/soak_aggregate.py [--clients 100] [--values 1048576] [--json F]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedshield.run.bench import lora_like_state
from fedshield.he import (CKKSParams, EncryptedUpdate, Layout, aggregate, decrypt_update,
                          encrypt_update, keygen_shared, load_context)

TOLERANCE = 1e-6


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, it starts afresh at
    exec, so a child does not report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # not Linux: KiB


def soak(n_clients: int, n_values: int, workdir: Path, log=print) -> dict:
    params = CKKSParams.for_precision(TOLERANCE, max_clients=n_clients)
    keys = keygen_shared(params)
    client, server = keys.client_context(), keys.server_context()
    layout = Layout.from_state_dict(lora_like_state(n_values, 0, scale=1.0))
    weights = [1.0 + (k % 7) for k in range(n_clients)]
    bound = 2.0 * max(weights)
    total = None
    start = time.perf_counter()
    for k in range(n_clients):
        state = lora_like_state(n_values, k, scale=1.0)
        upd = encrypt_update(client, state, layout, weight=weights[k], round=1,
                             weight_bound=bound)
        (workdir / f"u{k:04d}.bin").write_bytes(upd.to_bytes())
        contrib = {n: weights[k] * v.astype(np.float64) for n, v in state.items()}
        total = contrib if total is None else {n: total[n] + contrib[n] for n in total}
        if (k + 1) % 10 == 0:
            log(f"encrypted {k + 1}/{n_clients} updates "
                f"({time.perf_counter() - start:.0f} s)")
    t_encrypt = time.perf_counter() - start
    update_mb = (workdir / "u0000.bin").stat().st_size / 1e6
    server.save(workdir / "server.ctx", include_secret=False)
    (workdir / "round.json").write_text(json.dumps({"clients": n_clients, "bound": bound}))
    out = subprocess.run([sys.executable, __file__, "--aggregate-only", str(workdir)],
                         check=True, capture_output=True, text=True)
    server_side = json.loads(out.stdout)
    agg = EncryptedUpdate.from_bytes((workdir / "aggregate.bin").read_bytes())
    start = time.perf_counter()
    got = decrypt_update(client, agg, layout)
    t_decrypt = time.perf_counter() - start
    wsum = sum(weights)
    err = max(float(np.max(np.abs(np.asarray(got[n], dtype=np.float64) - total[n] / wsum)))
              for n in total)
    return {"clients": n_clients, "values": layout.numel, "update_mb": update_mb,
            "encrypt_s": t_encrypt, **server_side, "decrypt_s": t_decrypt,
            "all_updates_mb": update_mb * n_clients, "max_abs_err": err,
            "tolerance": TOLERANCE}


def aggregate_only(workdir: Path) -> dict:
    """The server's side, in its own process: stream the updates from disk into one sum."""
    server = load_context(workdir / "server.ctx")
    spec = json.loads((workdir / "round.json").read_text())
    rss_before = peak_rss_mb()

    def from_disk():
        for k in range(spec["clients"]):
            yield EncryptedUpdate.from_bytes((workdir / f"u{k:04d}.bin").read_bytes())

    start = time.perf_counter()
    agg = aggregate(server, from_disk(), round=1, weight_bound=spec["bound"])
    seconds = time.perf_counter() - start
    (workdir / "aggregate.bin").write_bytes(agg.to_bytes())
    return {"aggregate_s": seconds, "server_peak_rss_before_mb": rss_before,
            "server_peak_rss_after_mb": peak_rss_mb(),
            "server_loaded_torch": "torch" in sys.modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--values", type=int, default=1 << 20)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--aggregate-only", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aggregate_only:
        print(json.dumps(aggregate_only(Path(args.aggregate_only))))
        return
    with tempfile.TemporaryDirectory(prefix="fedshield-soak-") as tmp:
        row = soak(args.clients, args.values, Path(tmp),
                   log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
