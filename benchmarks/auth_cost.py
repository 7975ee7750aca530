"""What authentication (fedshield.trust.identity) costs on this machine, best of --repeat runs:

  - a signed record (sign_blob / verify_blob) of a 72 MB update: SHA-256 of the blob, then
    Ed25519 over the 49-byte record head; SHA-256 alone is printed beside it
  - the same for a 1 KB share header, and a plain Identity.sign / PublicIdentity.verify of it
  - seal / open_sealed of a 200 KB key share (X25519, HKDF-SHA256, ChaCha20-Poly1305, Ed25519)

  .venv/bin/python benchmarks/auth_cost.py [--repeat 5] [--json out.json]

Timings on a machine other jobs share move by tens of percent; the load average is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

from fedshield.trust.identity import Identity, sign_blob, verify_blob

UPDATE_BYTES = 72_000_000
HEADER_BYTES = 1_000
SHARE_BYTES = 200_000


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(repeat: int) -> list[dict]:
    alice, bob = Identity.generate(), Identity.generate()
    update, header, share = (os.urandom(n) for n in (UPDATE_BYTES, HEADER_BYTES, SHARE_BYTES))
    aad = b"key-share|context|epoch 1|from 0|to 1"
    rows = []

    def row(what: str, size: int, seconds: float) -> None:
        rows.append({"what": what, "bytes": size, "seconds": seconds,
                     # a rate only where the bytes, not the fixed cost, dominate
                     "MB_per_s": size / seconds / 1e6 if size >= SHARE_BYTES else None})

    row("sha256 alone (72 MB update)", UPDATE_BYTES,
        best_of(repeat, lambda: hashlib.sha256(update).digest()))
    record = sign_blob(alice, "update", 1, 1, update)
    row("sign_blob (72 MB update)", UPDATE_BYTES,
        best_of(repeat, lambda: sign_blob(alice, "update", 1, 1, update)))
    row("verify_blob (72 MB update)", UPDATE_BYTES,
        best_of(repeat, lambda: verify_blob(alice.public, "update", record, update,
                                            party_id=1, round=1)))
    many = 100 * repeat   # sub-millisecond operations: time 100 at once, report one
    record = sign_blob(alice, "share", 1, 1, header)
    row("sign_blob (1 KB share header)", HEADER_BYTES, best_of(many, lambda: sign_blob(
        alice, "share", 1, 1, header)))
    row("verify_blob (1 KB share header)", HEADER_BYTES, best_of(many, lambda: verify_blob(
        alice.public, "share", record, header, party_id=1, round=1)))
    signature = alice.sign("share", header)
    row("Identity.sign (1 KB)", HEADER_BYTES, best_of(many, lambda: alice.sign("share", header)))
    row("PublicIdentity.verify (1 KB)", HEADER_BYTES,
        best_of(many, lambda: alice.public.verify("share", header, signature)))
    sealed = bob.public.seal(share, alice, aad)
    assert bob.open_sealed(sealed, alice.public, aad) == share
    row("seal (200 KB share)", SHARE_BYTES,
        best_of(repeat * 10, lambda: bob.public.seal(share, alice, aad)))
    row("open_sealed (200 KB share)", SHARE_BYTES,
        best_of(repeat * 10, lambda: bob.open_sealed(sealed, alice.public, aad)))
    rows.append({"what": "sealed message overhead", "bytes": len(sealed) - SHARE_BYTES,
                 "seconds": None, "MB_per_s": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = measure(args.repeat)
    load_after = os.getloadavg()
    print(f"{'operation':36} {'bytes':>11} {'ms':>10} {'MB/s':>8}")
    for r in rows:
        ms = f"{r['seconds'] * 1e3:10.3f}" if r["seconds"] is not None else f"{'':10}"
        rate = f"{r['MB_per_s']:8.0f}" if r["MB_per_s"] else f"{'':8}"
        print(f"{r['what']:36} {r['bytes']:>11,} {ms} {rate}")
    print(f"load average (1 min) {load_before[0]:.2f} at start, {load_after[0]:.2f} at end; "
          f"{os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "load_average": [load_before[0], load_after[0]]}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
