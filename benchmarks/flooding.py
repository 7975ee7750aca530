"""Noise flooding (CKKSParams.flood_bits): its cost in bytes, time and precision, same run.

For shared keys and for threshold keys (3 parties, n-of-n), with and without flooding: bytes
on the wire per LoRA value (a client's update), client seconds to encrypt one update, server
seconds to aggregate, key-holder seconds to decrypt (threshold: one party's partial decryption
and the fusion), and the largest |error| of the decrypted average against the float64 mean,
for values uniform in [-1, 1] and weights summing to the weight bound. Single process,
single worker (workers=1); ratios are flooding / no flooding within this run.

Flooded parameters are the requests each keygen resolves (fs.CKKSParams(flood_bits=s): the
LMSS22-sized profile for its key mode and parties, fedshield.he.flood_sizing).

  .venv/bin/python benchmarks/flooding.py                 # 262144 values, ~1 min on 2 cores
  .venv/bin/python benchmarks/flooding.py --values 65535 --bits 30 40 48
  .venv/bin/python benchmarks/flooding.py --precision    # max |error| per level and party count
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fedshield as fs


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(mode: str, params: fs.CKKSParams, n_values: int, n_clients: int = 3) -> dict:
    rng = np.random.default_rng(0)
    states = [{"w": torch.from_numpy(rng.uniform(-1, 1, n_values).astype(np.float32))}
              for _ in range(n_clients)]
    layout = fs.Layout.from_state_dict(states[0])
    bound = 2.0 ** 16
    weights = [bound / n_clients] * n_clients
    if mode == "shared":
        keys = fs.keygen_shared(params)
        encryptors, server = [keys.client_context()] * n_clients, keys.server_context()
    else:
        encryptors, server = fs.keygen_threshold(params, n_clients)
    ups, enc = [], []
    for ctx, st, w in zip(encryptors, states, weights):
        up, t = _timed(lambda: fs.encrypt_update(ctx, st, layout, weight=w, workers=1))
        ups.append(up)
        enc.append(t)
    agg, t_agg = _timed(lambda: fs.aggregate(server, ups))
    if mode == "shared":
        out, t_dec = _timed(lambda: fs.decrypt_update(encryptors[0], agg, layout, workers=1))
        t_fuse = 0.0
    else:
        shares, t_dec = [], 0.0
        for p in encryptors:
            share, t = _timed(lambda: fs.partial_decrypt(p, agg))
            shares.append(share)
            t_dec = max(t_dec, t)
        out, t_fuse = _timed(lambda: fs.combine_partials(agg, shares, layout, ctx=encryptors[0]))
    ref = sum(w * s["w"].double().numpy() for s, w in zip(states, weights)) / sum(weights)
    return {"params": encryptors[0].params,
            "bytes/value": ups[0].nbytes / n_values, "encrypt s": float(np.median(enc)),
            "aggregate s": t_agg, "decrypt s": t_dec, "fuse s": t_fuse,
            "max err": float(np.abs(out["w"].double().numpy() - ref).max())}


def precision(n_values: int, levels: list[int]) -> None:
    """Max |error| over n_values values in [-1, 1] (sum(w) = weight bound), each level and key
    mode, next to the predicted standard deviation of the flooding error alone."""
    from fedshield.he import flooding  # noqa: PLC0415

    print(f"{n_values} values in [-1, 1], sum(w) = weight bound; predicted = std of the "
          "flooding error alone (fedshield.he.flooding.slot_error_std)")
    print(f"{'flood_bits':>10} {'keys':>22} {'max |err|':>12} {'predicted std':>14}")
    for bits in levels:
        for mode, parties in (("shared", 1), ("threshold", 3), ("threshold", 5)):
            label = "shared (3 clients)" if mode == "shared" else f"threshold {parties} parties"
            try:
                r = run(mode, fs.CKKSParams(flood_bits=bits), n_values,
                        n_clients=parties if mode == "threshold" else 3)
            except fs.ParameterError as exc:
                print(f"{bits:>10} {label:>22} refused: {exc}")
                continue
            pred = flooding.slot_error_std(r["params"], parties)
            print(f"{bits:>10} {label:>22} {r['max err']:>12.3g} {pred:>14.3g}"
                  f"   (N={r['params'].ring_dim}, {r['params'].log_q} bits)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=262144)
    ap.add_argument("--bits", type=int, nargs="+", default=[30, 48])
    ap.add_argument("--precision", action="store_true",
                    help="only the precision table (65535 values, levels 20 30 40 48 64)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.precision:
        precision(65535, [20, 30, 40, 48, 64])
        return
    cols = ["bytes/value", "encrypt s", "aggregate s", "decrypt s", "fuse s", "max err"]
    print(f"{args.values} values, 3 clients; threshold: 3 parties n-of-n")
    print(f"{'row':<32}" + "".join(f"{c:>14}" for c in cols))
    for mode in ("shared", "threshold"):
        rows = [("off", run(mode, fs.CKKSParams(), args.values))]
        for bits in args.bits:
            try:
                rows.append((f"flood_bits={bits}", run(mode, fs.CKKSParams(flood_bits=bits),
                                                       args.values)))
            except fs.ParameterError as exc:
                print(f"{mode} flood_bits={bits}: refused: {exc}")
        off = rows[0][1]
        for name, r in rows:
            print(f"{mode + ' ' + name:<32}" + "".join(
                f"{r[c]:>14.3g}" for c in cols))
            if r is not off:
                print(f"{'  ratio to off':<32}" + "".join(
                    f"{(r[c] / off[c] if off[c] else float('nan')):>14.2f}" for c in cols[:-1]))


if __name__ == "__main__":
    main()
