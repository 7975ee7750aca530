"""Per-call time of CKKS encoding's special FFT as the CKKS code runs it (native.ckks_fft, in
place, no copy), forward (decoding: coefficients -> slots) and inverse (encoding), on the plain
loops and on the AVX2 path where the CPU has it. Best of many short rounds, the paths
interleaved, since a shared machine's load moves from second to second.

  .venv/bin/python benchmarks/fft.py [--n 4096 8192] [--rounds 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedshield import native
from fedshield import ParameterError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192],
                    help="ring dimensions (N/2 complex values each; 4096: shared keys, "
                         "8192: threshold keys)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=100, help="forward/inverse pairs per round")
    args = ap.parse_args()
    for n in args.n:
        v = np.random.default_rng(0).standard_normal(n)
        paths = ["scalar"] + (["avx2"] if _runs(n) else [])
        best = {}
        for _ in range(args.rounds):
            for path in paths:
                took = [0.0, 0.0]
                for _ in range(args.calls):  # forward then inverse: the values stay finite
                    t0 = time.perf_counter()
                    native.ckks_fft(v, False, path)
                    t1 = time.perf_counter()
                    native.ckks_fft(v, True, path)
                    took[0] += t1 - t0
                    took[1] += time.perf_counter() - t1
                for inverse in (0, 1):
                    key = (path, inverse)
                    best[key] = min(best.get(key, took[inverse]), took[inverse])
        print(f"N = {n} ({n // 2} slots)")
        for path in paths:
            fwd, inv = (best[(path, i)] / args.calls * 1e6 for i in (0, 1))
            ratio = "" if path == "scalar" else (
                f"   ({best[('scalar', 0)] / best[(path, 0)]:.2f}x, "
                f"{best[('scalar', 1)] / best[(path, 1)]:.2f}x)")
            print(f"{path:7s} forward {fwd:8.2f} us   inverse {inv:8.2f} us{ratio}")


def _runs(n: int) -> bool:
    """Whether the AVX2 path runs for ring dimension n on this CPU (ckks_fft refuses it
    otherwise)."""
    try:
        native.ckks_fft(np.zeros(n), False, "avx2")
    except ParameterError:
        return False
    return True


if __name__ == "__main__":
    main()
