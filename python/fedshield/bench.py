"""`fedshield bench`: headline figures measured in one run, on this machine.

Rows: shared keys (seeded, wire v3) dense, with a 50% global mask, FFA-LoRA (only the B
matrices travel); threshold keys (joint public key, 3 parties); threshold keys with 30-bit
noise flooding. Baselines on the same ciphertexts: raw OpenFHE encode + encrypt, and OpenFHE's
own server path (deserialize + EvalAddInPlace).
"""

from __future__ import annotations

import time

import numpy as np

from . import _native
from .threads import num_threads
from .he import (CKKSParams, Layout, aggregate, backend, combine_partials, decrypt_update,
                 encrypt_update, keygen_shared, keygen_threshold, partial_decrypt)
from .he.encryption import auto_weight_bound, rebuild_ciphertexts

# Unequal example counts, far below any default bound: the weighted average must stay exact.
WEIGHTS = (5.0, 1.0, 4.0, 7.0)
THRESHOLD_PARTIES = 3
FLOOD_BITS = 30


def lora_like_state(n_values: int, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    """A LoRA-shaped state of about ``n_values`` values: (32 x 1024) A/B tensors, uniform in
    [-scale, scale] (the default: values like fine-tuning deltas). The benchmarks' one client
    state."""
    rng = np.random.default_rng(seed)
    cols = 1024
    n_tensors = max(2, n_values // (32 * cols))
    return {f"layers.{i // 2}.lora_{'AB'[i % 2]}.weight":
            rng.uniform(-scale, scale, (32, cols)).astype(np.float32) for i in range(n_tensors)}


def _weights(n_clients: int) -> list[float]:
    return [WEIGHTS[k % len(WEIGHTS)] for k in range(n_clients)]


def _reference(states, weights, mask=None) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64)
    out = {}
    for name in states[0]:
        avg = sum(wk * st[name].astype(np.float64) for wk, st in zip(w, states)) / w.sum()
        out[name] = avg if mask is None else np.where(mask[name], avg, 0.0)
    return out


def _max_error(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(got[n], dtype=np.float64) - want[n])))
               for n in want)


def openfhe_encrypt_baseline(ctx, n_cts: int, seed: int = 0):
    """A callable doing raw MakeCKKSPackedPlaintext + Encrypt for n_cts full ciphertexts, with
    the key the context's own encryption uses (the secret key for seeded contexts)."""
    secret = ctx.params.seeded
    cc, pk, sk = ctx.openfhe_objects(need_secret=secret)
    key = sk if secret else pk
    n_slots = ctx.params.slots
    reals = np.random.default_rng(seed).uniform(-0.01, 0.01, n_cts * 2 * n_slots)
    slots = reals.view(np.complex128)

    def raw_encrypt():
        for i in range(n_cts):
            cc.Encrypt(key, cc.MakeCKKSPackedPlaintext(slots[i * n_slots:(i + 1) * n_slots]))

    return raw_encrypt


def openfhe_aggregate_baseline(ctx, updates: list):
    """A callable aggregating the same ciphertexts the way an OpenFHE server would:
    DeserializeCiphertextString + EvalAddInPlace, on the updates rebuilt as full OpenFHE
    ciphertexts (ctx must hold the template, not the key). Returns (callable, bytes read)."""
    o = backend.openfhe()
    cc, _, _ = ctx.openfhe_objects()
    cc.Enable(o.LEVELEDSHE)  # EvalAdd needs it; fedshield's own path never calls OpenFHE here
    serialized = [rebuild_ciphertexts(ctx, u) for u in updates]

    def openfhe_aggregate():
        for j in range(len(serialized[0])):
            acc = o.DeserializeCiphertextString(serialized[0][j], o.BINARY)
            for k in range(1, len(serialized)):
                cc.EvalAddInPlace(acc, o.DeserializeCiphertextString(serialized[k][j], o.BINARY))

    return openfhe_aggregate, sum(len(c) for s in serialized for c in s)


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _shared_rows(states, weights, n: int, cores: int) -> dict:
    keys = keygen_shared(CKKSParams())
    client, server = keys.client_context(), keys.server_context()
    layout = Layout.from_state_dict(states[0])
    params = client.params
    bound = auto_weight_bound(max(weights))  # one bound for the round, as the Server picks

    def enc(k, workers=None, mask=None, st=None, lay=layout):
        return encrypt_update(client, st or states[k], lay, weight=weights[k], workers=workers,
                              mask=mask, weight_bound=bound)

    t_enc = _best(lambda: enc(0, workers=1), repeat=2)
    enc(0, workers=cores)  # start the pool
    t_enc_all = _best(lambda: enc(0, workers=cores), repeat=2)
    updates = [enc(k) for k in range(len(states))]
    t_raw = _best(openfhe_encrypt_baseline(client, updates[0].n_ciphertexts), repeat=2)

    blobs = [u.to_bytes() for u in updates]
    t_agg = _best(lambda: aggregate(server, blobs))
    agg = aggregate(server, blobs)
    openfhe_aggregate, openfhe_bytes = openfhe_aggregate_baseline(client, updates)
    t_ofhe = _best(openfhe_aggregate, repeat=1)
    t_dec = _best(lambda: decrypt_update(client, agg, layout, workers=1), repeat=2)
    decrypt_update(client, agg, layout, workers=cores)  # start the pool
    t_dec_all = _best(lambda: decrypt_update(client, agg, layout, workers=cores), repeat=2)
    err = _max_error(decrypt_update(client, agg, layout), _reference(states, weights))

    half = {k: np.arange(v.size).reshape(v.shape) % 2 == 0 for k, v in states[0].items()}
    masked = [enc(k, mask=half) for k in range(len(states))]
    err_mask = _max_error(decrypt_update(client, aggregate(server, masked), layout, mask=half),
                          _reference(states, weights, half))

    b_only = [{k: v for k, v in st.items() if "lora_B" in k} for st in states]
    b_layout = Layout.from_state_dict(b_only[0])
    ffa = [enc(k, st=b_only[k], lay=b_layout) for k in range(len(states))]
    err_ffa = _max_error(decrypt_update(client, aggregate(server, ffa), b_layout),
                         _reference(b_only, weights))

    # What an OpenFHE serialization of the same ciphertexts weighs (both polynomials, every
    # header byte), the form the other HE stacks ship.
    fresh = len(rebuild_ciphertexts(client, updates[0])[0])
    in_bytes = sum(len(b) for b in blobs)
    return {
        "ring_dim": params.ring_dim, "modulus_bits": params.log_q, "scale_bits": params.scale_bits,
        "bytes_per_value_dense": updates[0].nbytes / n,
        "bytes_per_value_mask50": masked[0].nbytes / n,
        "bytes_per_value_ffa": ffa[0].nbytes / n,
        "openfhe_fresh_bytes_per_value": fresh * updates[0].n_ciphertexts / n,
        "encrypt_us_per_value": t_enc / n * 1e6,
        "raw_openfhe_encrypt_us_per_value": t_raw / n * 1e6,
        "encrypt_overhead_ratio": t_enc / t_raw,
        "encrypt_all_cores_us_per_value": t_enc_all / n * 1e6,
        "encrypt_speedup_all_cores": t_enc / t_enc_all,
        "aggregate_MB_per_s": in_bytes / t_agg / 1e6,
        "aggregate_us_per_value": t_agg / n * 1e6,
        "openfhe_aggregate_MB_per_s": openfhe_bytes / t_ofhe / 1e6,
        "aggregate_speedup_vs_openfhe": t_ofhe / t_agg,
        "decrypt_us_per_value": t_dec / n * 1e6,
        "decrypt_all_cores_us_per_value": t_dec_all / n * 1e6,
        "decrypt_speedup_all_cores": t_dec / t_dec_all,
        "max_abs_err_dense": err, "max_abs_err_mask50": err_mask, "max_abs_err_ffa": err_ffa,
    }


def _threshold_row(states, weights, n: int, cores: int, flood_bits: int) -> dict:
    params = CKKSParams.for_precision(keys="threshold", flood_bits=flood_bits)
    parties, server = keygen_threshold(params, n_parties=THRESHOLD_PARTIES)
    layout = Layout.from_state_dict(states[0])
    bound = auto_weight_bound(max(weights))

    def enc(k):
        return encrypt_update(parties[0], states[k], layout, weight=weights[k], workers=cores,
                              weight_bound=bound)

    enc(0)  # start the pool
    t_enc = _best(lambda: enc(0), repeat=2)
    agg = aggregate(server, [enc(k) for k in range(len(states))])

    def decrypt():
        shares = [partial_decrypt(p, agg) for p in parties]
        return combine_partials(agg, shares, layout, ctx=parties[0])

    t_dec = _best(decrypt, repeat=1)
    first = enc(0)
    return {"ring_dim": params.ring_dim, "modulus_bits": params.log_q,
            "bytes_per_value": first.nbytes / n,
            "encrypt_all_cores_us_per_value": t_enc / n * 1e6,
            "decrypt_us_per_value": t_dec / n * 1e6,
            "max_abs_err": _max_error(decrypt(), _reference(states, weights))}


def run_bench(n_values: int = 1 << 20, n_clients: int = 4, verbose: bool = True) -> dict:
    states = [lora_like_state(n_values, seed) for seed in range(n_clients)]
    n = sum(v.size for v in states[0].values())
    weights = _weights(n_clients)
    cores = num_threads()
    figures = {"lora_values": n, "clients": n_clients, "weights": weights, "cores": cores,
               "native_threads": _native.default_threads()}
    figures.update(_shared_rows(states, weights, n, cores))
    figures["threshold"] = _threshold_row(states, weights, n, cores, 0)
    figures["threshold_flooded"] = _threshold_row(states, weights, n, cores, FLOOD_BITS)
    if verbose:
        _print(figures)
    return figures


def _print(f: dict) -> None:
    th, fl = f["threshold"], f["threshold_flooded"]
    cores = f["cores"]
    print(f"fedshield bench: {f['lora_values']} LoRA values, {f['clients']} clients (weights "
          f"{', '.join(f'{w:g}' for w in f['weights'])}), {f['native_threads']} threads")
    print(f"shared keys, seeded (N={f['ring_dim']}, {f['modulus_bits']}-bit modulus, scale "
          f"2^{f['scale_bits']}):")
    rows = [
        ("bytes/value, dense", f"{f['bytes_per_value_dense']:.2f}",
         f"as OpenFHE ciphertexts: {f['openfhe_fresh_bytes_per_value']:.2f}; "
         f"max |err| {f['max_abs_err_dense']:.1e}"),
        ("bytes/value, 50% mask", f"{f['bytes_per_value_mask50']:.2f}",
         f"max |err| {f['max_abs_err_mask50']:.1e}"),
        ("bytes/value, FFA (B only)", f"{f['bytes_per_value_ffa']:.2f}",
         f"max |err| {f['max_abs_err_ffa']:.1e}"),
        ("encrypt µs/value, 1 core", f"{f['encrypt_us_per_value']:.3f}",
         f"raw OpenFHE encode+encrypt: {f['raw_openfhe_encrypt_us_per_value']:.3f} "
         f"(overhead x{f['encrypt_overhead_ratio']:.2f})"),
        (f"encrypt µs/value, {cores} cores", f"{f['encrypt_all_cores_us_per_value']:.3f}",
         f"speed-up x{f['encrypt_speedup_all_cores']:.2f}"),
        ("aggregate MB/s", f"{f['aggregate_MB_per_s']:.0f}",
         f"OpenFHE deserialize+add: {f['openfhe_aggregate_MB_per_s']:.0f} "
         f"(x{f['aggregate_speedup_vs_openfhe']:.1f} faster)"),
        ("decrypt µs/value, 1 core", f"{f['decrypt_us_per_value']:.3f}", ""),
        (f"decrypt µs/value, {cores} cores", f"{f['decrypt_all_cores_us_per_value']:.3f}",
         f"speed-up x{f['decrypt_speedup_all_cores']:.2f}"),
    ]
    for label, row, bits in (("threshold", th, ""),
                             ("threshold flooded", fl, f", {FLOOD_BITS}-bit flooding")):
        rows.append((f"bytes/value, {label}", f"{row['bytes_per_value']:.2f}",
                     f"N={row['ring_dim']}, {row['modulus_bits']}-bit modulus{bits}; "
                     f"encrypt {row['encrypt_all_cores_us_per_value']:.3f} µs/value "
                     f"({cores} cores), {THRESHOLD_PARTIES} parties decrypt "
                     f"{row['decrypt_us_per_value']:.3f} µs/value; max |err| "
                     f"{row['max_abs_err']:.1e}"))
    for name, value, note in rows:
        print(f"  {name:<28}{value:>8}   {note}")
