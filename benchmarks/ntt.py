"""Per-call time of one RNS tower's NTT as the CKKS code runs it (native.ckks_ntt), forward and
inverse, on every path this CPU and modulus allow: the scalar 64-bit Shoup path and the four-lane
64-bit AVX2 path (q < 2^60). Each call includes the
binding's copy of its input and its checks. Best of many short rounds, the paths interleaved,
since a shared machine's load moves from second to second.

  .venv/bin/python benchmarks/ntt.py [--bits 60] [--n 8192] [--rounds 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedshield import native


def ntt_prime(bits: int, n: int) -> tuple[int, int]:
    """The largest prime q < 2**bits with 2n | q - 1, and a primitive 2n-th root of unity."""
    q = (2 ** bits - 1) // (2 * n) * (2 * n) + 1
    while True:
        if all(pow(b, q - 1, q) == 1 for b in (2, 3, 5, 7, 11, 13, 17, 19, 23)):
            for g in range(2, 200):
                psi = pow(g, (q - 1) // (2 * n), q)
                if pow(psi, n, q) == q - 1:
                    return q, psi
        q -= 2 * n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=60, help="modulus size (the threshold ring's: 60)")
    ap.add_argument("--n", type=int, default=8192, help="ring dimension")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=100, help="calls per round")
    args = ap.parse_args()
    q, psi = ntt_prime(args.bits, args.n)
    coeffs = np.random.default_rng(0).integers(0, q, args.n, dtype=np.uint64)
    evals = native.ckks_ntt(coeffs, q, psi)
    paths = ["scalar"] + [p for p in ("avx2",) if _runs(p, coeffs, q, psi)]
    best = {}
    for _ in range(args.rounds):
        for path in paths:
            for inverse, a in ((False, coeffs), (True, evals)):
                t = time.perf_counter()
                for _ in range(args.calls):
                    native.ckks_ntt(a, q, psi, inverse, path)
                took = (time.perf_counter() - t) / args.calls
                key = (path, inverse)
                best[key] = min(best.get(key, took), took)
    print(f"N = {args.n}, q = {q} ({q.bit_length()} bits), the CKKS code's path here: "
          f"{native.ckks_ntt_path(args.n, q)}")
    for path in paths:
        fwd, inv = best[(path, False)] * 1e6, best[(path, True)] * 1e6
        ratio = "" if path == "scalar" else (f"   ({best[('scalar', False)] / best[(path, False)]:.2f}x, "
                                             f"{best[('scalar', True)] / best[(path, True)]:.2f}x)")
        print(f"{path:7s} forward {fwd:8.1f} us   inverse {inv:8.1f} us{ratio}")


def _runs(path: str, a: np.ndarray, q: int, psi: int) -> bool:
    """Whether `path` runs for q on this CPU (ckks_ntt refuses it otherwise)."""
    try:
        native.ckks_ntt(a, q, psi, False, path)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
