"""What authenticated rounds cost per round, and what --verify-aggregates adds, at 3 and 10
parties (fedshield.trust.guard), on real updates of --values values:

  - every party signs its update (sign_update); the server verifies every record (screen) and
    signs the aggregate's provenance; every key holder checks the provenance (AggregateGuard)
    before decrypting; threshold keys: every partial decryption is signed and checked too
  - --verify-aggregates: every key holder also downloads the round's signed updates and
    recomputes their sum natively (AggregateGuard(verify=True))

Each cost is printed beside the round's own work on the same machine (aggregating on the
server, decrypting at a key holder; encrypting is per party) and the bytes beside the
update's. Best of --repeat runs; 2-core machines shared with other jobs move by tens of percent.

  .venv/bin/python benchmarks/verify_cost.py [--values 1048576] [--parties 3 10] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import time


from fedshield.run.bench import lora_like_state
from fedshield.trust.guard import (UPDATE_DOMAIN, AggregateGuard, Provenance, sign_share,
                                sign_update)
from fedshield.he import (CKKSParams, Layout, aggregate, decrypt_update, encrypt_update,
                          keygen_shared, keygen_threshold, partial_decrypt)
from fedshield.trust.identity import RECORD_SIZE, Identity, verify_blob

ROUND = 1


def best_of(repeat: int, fn):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def one_setting(mode: str, n: int, n_values: int, repeat: int) -> dict:
    if mode == "shared":
        keys = keygen_shared(CKKSParams.for_precision(keys="shared"))
        ctxs, server_ctx = [keys.client_context()] * n, keys.server_context()
    else:
        ctxs, server_ctx = keygen_threshold(CKKSParams.for_precision(keys="threshold"), n)
    sts = [lora_like_state(n_values, seed) for seed in range(n)]
    layout = Layout.from_state_dict(sts[0])
    ids = [Identity.generate() for _ in range(n)]
    server_id = Identity.generate()
    updates = [encrypt_update(c, s, layout, weight=1.0, round=ROUND, weight_bound=1.0).to_bytes()
               for c, s in zip(ctxs, sts)]

    t_sign, records = best_of(repeat, lambda: [sign_update(i, p, u) for p, (i, u)
                                               in enumerate(zip(ids, updates))])
    t_screen, _ = best_of(repeat, lambda: [
        verify_blob(ids[p].public, UPDATE_DOMAIN, r, u, party_id=p, round=ROUND)
        for p, (r, u) in enumerate(zip(records, updates))])
    t_agg, agg = best_of(repeat, lambda: aggregate(server_ctx, updates, round=ROUND,
                                                  weight_bound=1.0))
    t_prov, prov = best_of(repeat, lambda: Provenance.make(server_id, agg, records, updates))
    roster = {p: i.public for p, i in enumerate(ids)}

    def check(verify: bool):
        guard = AggregateGuard(roster, server_id.public, n, verify=verify)
        return guard.check_aggregate(ctxs[0], agg, prov)

    t_guard, _ = best_of(repeat, lambda: check(False))
    t_verify, _ = best_of(repeat, lambda: check(True))
    if mode == "shared":
        t_decrypt, _ = best_of(repeat, lambda: decrypt_update(ctxs[0], agg, layout))
        t_shares = 0.0
    else:
        t_decrypt, share = best_of(repeat, lambda: partial_decrypt(ctxs[0], agg))
        rec = sign_share(ids[0], 0, ROUND, share)
        t_shares = best_of(repeat, lambda: sign_share(ids[0], 0, ROUND, share))[0] + \
            n * best_of(repeat, lambda: AggregateGuard(roster, server_id.public, n)
                        .check_shares(agg, [share], [rec]))[0]
    update_bytes = len(updates[0])
    return {
        "keys": mode, "parties": n, "values": n_values, "update_bytes": update_bytes,
        # bytes that authentication adds to one round's messages
        "auth_bytes_per_update": RECORD_SIZE,
        "auth_bytes_per_aggregate_message": len(prov.manifest) + len(prov.server_record),
        "auth_bytes_per_share": RECORD_SIZE if mode == "threshold" else 0,
        "verify_bytes_per_key_holder": sum(len(u) for u in updates),
        # seconds, each where it is spent
        "sign_s_per_party": t_sign / n,
        "screen_s_server": t_screen,
        "provenance_s_server": t_prov,
        "guard_s_per_key_holder": t_guard,
        "shares_s_per_key_holder": t_shares,
        "verify_s_per_key_holder": t_verify,
        "aggregate_s_server": t_agg,
        "decrypt_s_per_key_holder": t_decrypt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=1 << 20)
    parser.add_argument("--parties", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--keys", nargs="+", default=["shared", "threshold"],
                        choices=["shared", "threshold"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    rows = []
    for mode in args.keys:
        for n in args.parties:
            r = one_setting(mode, n, args.values, args.repeat)
            rows.append(r)
            mb = r["update_bytes"] / 1e6
            print(f"{mode:9s} n={n:2d}: update {mb:.2f} MB; auth adds {RECORD_SIZE} B/update, "
                  f"{r['auth_bytes_per_aggregate_message']} B/aggregate message; "
                  f"sign {r['sign_s_per_party'] * 1e3:.1f} ms/party, screen "
                  f"{r['screen_s_server'] * 1e3:.1f} ms + provenance "
                  f"{r['provenance_s_server'] * 1e3:.1f} ms (aggregate "
                  f"{r['aggregate_s_server'] * 1e3:.1f} ms), guard "
                  f"{r['guard_s_per_key_holder'] * 1e3:.2f} ms + shares "
                  f"{r['shares_s_per_key_holder'] * 1e3:.2f} ms/key holder (decrypt "
                  f"{r['decrypt_s_per_key_holder'] * 1e3:.0f} ms); verify: "
                  f"+{r['verify_bytes_per_key_holder'] / 1e6:.1f} MB and "
                  f"{r['verify_s_per_key_holder'] * 1e3:.0f} ms per key holder")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
