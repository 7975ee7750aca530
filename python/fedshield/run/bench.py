"""`fedshield bench`: headline figures measured in one run, on this machine.

Rows: shared keys (seeded, wire v3) dense, with a 50% global mask, FFA-LoRA (only the B
matrices travel); threshold keys (joint public key, 3 parties); threshold keys with 30-bit
noise flooding. Baselines on the same ciphertexts: raw OpenFHE encode + encrypt, and OpenFHE's
own server path (deserialize + EvalAddInPlace). Then every per-round step of a site (encrypt,
decrypt, partial decryptions, their fusion) against OpenFHE's own call on one thread, in the
same run, and the Mistral-7B per-round totals those figures give (:func:`step_table`).
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import native
from ..base.threads import num_threads
from ..he.params import power_of_two_bound
from ..he import (CKKSParams, EncryptedUpdate, Layout, aggregate, backend, combine_partials,
                 decrypt_update, encrypt_update, keygen_shared, keygen_threshold,
                 partial_decrypt)
from ..he.encryption import rebuild_ciphertexts

# Unequal example counts, far below any default bound: the weighted average must stay exact.
WEIGHTS = (5.0, 1.0, 4.0, 7.0)
THRESHOLD_PARTIES = 3
FLOOD_BITS = 30
# What a run measures: the engines' profile, whose Server sends each round's weight bound
# (fs.CKKSParams() also covers weights 1..10**6 with no bound passed, at more bytes per value).
RUN_PARAMS = CKKSParams.for_precision(max_weight=0)


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
    # EvalAdd needs LEVELEDSHE: backend.make_crypto_context enables it on every context
    serialized = [rebuild_ciphertexts(ctx, u) for u in updates]

    def openfhe_aggregate():
        for j in range(len(serialized[0])):
            acc = o.DeserializeCiphertextString(serialized[0][j], o.BINARY)
            for k in range(1, len(serialized)):
                cc.EvalAddInPlace(acc, o.DeserializeCiphertextString(serialized[k][j], o.BINARY))

    return openfhe_aggregate, sum(len(c) for s in serialized for c in s)


def _best(fn, repeat: int = 3, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def _shared_rows(states, weights, n: int, cores: int) -> dict:
    keys = keygen_shared(RUN_PARAMS)
    client, server = keys.client_context(), keys.server_context()
    layout = Layout.from_state_dict(states[0])
    params = client.params
    bound = power_of_two_bound(max(weights))  # one bound for the round, as the Server picks

    def enc(k, mask=None, st=None, lay=layout, threads=0):
        return encrypt_update(client, st or states[k], lay, weight=weights[k], mask=mask,
                              weight_bound=bound, threads=threads)

    t_enc = _best(lambda: enc(0, threads=1), repeat=2)
    t_enc_all = _best(lambda: enc(0), repeat=2)
    updates = [enc(k) for k in range(len(states))]
    t_raw = _best(openfhe_encrypt_baseline(client, updates[0].n_ciphertexts), repeat=2)

    blobs = [u.to_bytes() for u in updates]
    t_agg = _best(lambda: aggregate(server, blobs))
    agg = aggregate(server, blobs)
    openfhe_aggregate, openfhe_bytes = openfhe_aggregate_baseline(client, updates)
    t_ofhe = _best(openfhe_aggregate, repeat=1)
    t_dec = _best(lambda: decrypt_update(client, agg, layout, threads=1), repeat=2)
    t_dec_all = _best(lambda: decrypt_update(client, agg, layout), repeat=2)
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
    # sized as keygen_threshold sizes a request for its parties (CKKSParams.for_keys): flooding
    # for the parties that flood, the plain profile for at least 16
    params = CKKSParams(flood_bits=flood_bits, max_weight=0).for_keys("threshold",
                                                                      THRESHOLD_PARTIES)
    parties, server = keygen_threshold(params, n_parties=THRESHOLD_PARTIES)
    layout = Layout.from_state_dict(states[0])
    bound = power_of_two_bound(max(weights))

    def enc(k):
        return encrypt_update(parties[0], states[k], layout, weight=weights[k],
                              weight_bound=bound)

    enc(0)  # first call: the native tables
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


# Mistral-7B, r=32 on q_proj/v_proj (benchmarks/compare.py --state mistral7b): LoRA values
MISTRAL7B_VALUES = 13_631_488
# OpenFHE's own calls are timed on at most this many ciphertexts (their cost per value does not
# depend on how many there are): the baseline of a 13.6M-value state stays seconds, not minutes.
OPENFHE_CIPHERTEXTS = 64
# timings per step and side, the best taken (this machine's load swings)
STEP_REPEATS = 5


def _openfhe_calls(ctx, parties, agg, tagg) -> dict:
    """OpenFHE's own single-threaded calls on the same parameters, {step: (call, values)}:
    MakeCKKSPackedPlaintext + Encrypt (secret key for seeded shared keys, the joint public key
    for threshold keys), Decrypt, MultipartyDecryptLead/Main of every party, Fusion."""
    o = backend.openfhe()
    rng = np.random.default_rng(0)

    def setup(c, update):
        k = min(update.n_ciphertexts, OPENFHE_CIPHERTEXTS)
        n_slots = c.params.slots
        slots = rng.uniform(-0.01, 0.01, k * 2 * n_slots).view(np.complex128)
        chunks = [slots[i * n_slots:(i + 1) * n_slots] for i in range(k)]
        cts = [o.DeserializeCiphertextString(b, o.BINARY)
               for b in rebuild_ciphertexts(c, update)[:k]]
        return chunks, cts, k * c.params.values_per_ciphertext

    cc, _, sk = ctx.openfhe_objects(need_secret=True)
    tcc, tpk, _ = parties[0].openfhe_objects()
    keys = [p.openfhe_objects(need_secret=True)[2] for p in parties]
    chunks, cts, n = setup(ctx, agg)
    tchunks, tcts, tn = setup(parties[0], tagg)
    calls = [tcc.MultipartyDecryptLead] + [tcc.MultipartyDecryptMain] * (len(parties) - 1)
    shares = [[call([ct], key)[0] for ct in tcts] for call, key in zip(calls, keys)]

    def decrypt():
        for ct in cts:
            cc.Decrypt(sk, ct)

    def partials():
        for call, key in zip(calls, keys):
            for ct in tcts:
                call([ct], key)

    def fuse():
        for j in range(len(tcts)):
            tcc.MultipartyDecryptFusion([row[j] for row in shares])

    return {
        "encrypt": (lambda: [cc.Encrypt(sk, cc.MakeCKKSPackedPlaintext(c)) for c in chunks], n),
        "decrypt": (decrypt, n),
        "threshold_encrypt": (lambda: [tcc.Encrypt(tpk, tcc.MakeCKKSPackedPlaintext(c))
                                       for c in tchunks], tn),
        "partial": (partials, tn),
        "combine": (fuse, tn),
    }


def _interleaved(sides: list[dict], repeat: int, clock) -> list[dict]:
    """Seconds per value of each side's calls ({step: (call, values)}), the best of ``repeat``
    timings by ``clock``, the sides taking turns step by step: a change of the machine's load
    during the run reaches both sides of a ratio alike."""
    best = [{key: float("inf") for key in side} for side in sides]
    for _ in range(repeat):
        for key in sides[0]:
            for side, out in zip(sides, best):
                call, _ = side[key]
                t = clock()
                call()
                out[key] = min(out[key], clock() - t)
    return [{key: out[key] / side[key][1] for key in side} for side, out in zip(sides, best)]


STEPS = (("encrypt", "shared-key encrypt", "MakeCKKSPackedPlaintext + Encrypt(sk)"),
         ("decrypt", "shared-key decrypt", "Decrypt"),
         ("threshold_encrypt", "threshold encrypt", "MakeCKKSPackedPlaintext + Encrypt(pk)"),
         ("partial", f"threshold partial decryption, {THRESHOLD_PARTIES} parties",
          "MultipartyDecryptLead/Main"),
         ("combine", "threshold combine", "MultipartyDecryptFusion"))


def step_table(states, weights, repeat: int = STEP_REPEATS) -> dict:
    """Each per-round step of a site, fedshield on every core against OpenFHE's own call on one
    thread, same parameters, one run: {step: {fedshield, openfhe (seconds per value), ratio}},
    plus the Mistral-7B per-round totals (seconds) those figures give. Each figure is the best
    of ``repeat`` timings, the two sides taking turns.

    Each row also holds the same comparison in CPU time, both on one thread (fedshield with
    threads=1, the process's CPU seconds): wall-clock ratios on a machine shared with other
    jobs swing with their load, the CPU-time ratio much less (it is what the wall ratio tends
    to, divided by the cores, on a quiet machine)."""
    layout = Layout.from_state_dict(states[0])
    n = layout.numel
    bound = power_of_two_bound(max(weights))
    keys = keygen_shared(RUN_PARAMS)
    client, server = keys.client_context(), keys.server_context()
    params = CKKSParams.for_precision(keys="threshold", max_weight=0)
    parties, tserver = keygen_threshold(params, n_parties=THRESHOLD_PARTIES)

    def enc(ctx, k, threads=0):
        return encrypt_update(ctx, states[k], layout, weight=weights[k], weight_bound=bound,
                              threads=threads)

    enc(client, 0)  # first call: tables
    agg = aggregate(server, [enc(client, k) for k in range(len(states))])
    tagg = aggregate(tserver, [enc(parties[0], k) for k in range(len(states))])
    blob = tagg.to_bytes()

    def partials(threads=0):
        # each party parses the aggregate's bytes and hashes them, as on its own machine
        return [partial_decrypt(p, EncryptedUpdate.from_bytes(blob), threads=threads)
                for p in parties]

    # a site fuses the aggregate it partially decrypted (fl/site_rounds.py keeps it): its
    # digest is the one its partial decryption computed, as in a round
    shares = [partial_decrypt(p, tagg) for p in parties]

    def ours(threads):
        return {
            "encrypt": (lambda: enc(client, 0, threads), n),
            "decrypt": (lambda: decrypt_update(client, agg, layout, threads=threads), n),
            "threshold_encrypt": (lambda: enc(parties[0], 0, threads), n),
            "partial": (lambda: partials(threads), n),
            "combine": (lambda: combine_partials(tagg, shares, layout, ctx=parties[0],
                                                 threads=threads), n),
        }

    theirs = _openfhe_calls(client, parties, agg, tagg)
    ours_wall, theirs_wall = _interleaved([ours(0), theirs], repeat, time.perf_counter)
    one, theirs_cpu = _interleaved([ours(1), theirs], repeat, time.process_time)
    table = {key: {"fedshield_us_per_value": ours_wall[key] * 1e6,
                   "openfhe_1thread_us_per_value": theirs_wall[key] * 1e6,
                   "ratio": ours_wall[key] / theirs_wall[key],
                   "fedshield_1thread_cpu_us_per_value": one[key] * 1e6,
                   "openfhe_cpu_us_per_value": theirs_cpu[key] * 1e6,
                   "cpu_ratio": one[key] / theirs_cpu[key]} for key, _, _ in STEPS}
    m = MISTRAL7B_VALUES
    # a site's round: it encrypts, and decrypts (shared) or sends its partial and fuses
    table["mistral7b_round_s"] = {
        "shared": (ours_wall["encrypt"] + ours_wall["decrypt"]) * m,
        "threshold": (ours_wall["threshold_encrypt"] + ours_wall["partial"] / THRESHOLD_PARTIES
                      + ours_wall["combine"]) * m,
        "values": m, "measured_on_values": n,
    }
    return table


def print_step_table(table: dict, cores: int, load: str = "") -> None:
    print(f"each step against OpenFHE's own call on 1 thread (fedshield: {cores} threads"
          f"{'; ' + load if load else ''}):")
    print("| step | fedshield µs/value | OpenFHE 1 thread | ratio | CPU time, both on 1 thread |")
    print("|---|---|---|---|---|")
    for key, label, call in STEPS:
        row = table[key]
        print(f"| {label} | {row['fedshield_us_per_value']:.4f} | "
              f"{row['openfhe_1thread_us_per_value']:.4f} (`{call}`) | {row['ratio']:.2f}x | "
              f"{row['fedshield_1thread_cpu_us_per_value']:.4f} vs "
              f"{row['openfhe_cpu_us_per_value']:.4f}: {row['cpu_ratio']:.2f}x |")
    tot = table["mistral7b_round_s"]
    print(f"Mistral-7B per round ({tot['values']:,} values, from {tot['measured_on_values']:,}):"
          f" shared keys encrypt + decrypt {tot['shared']:.2f} s; threshold keys encrypt + "
          f"partial + combine {tot['threshold']:.2f} s")


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return ""


def run_bench(n_values: int = 1 << 20, n_clients: int = 4, verbose: bool = True) -> dict:
    states = [lora_like_state(n_values, seed) for seed in range(n_clients)]
    n = sum(v.size for v in states[0].values())
    weights = _weights(n_clients)
    cores = num_threads()
    figures = {"lora_values": n, "clients": n_clients, "weights": weights, "cores": cores,
               "native_threads": native.default_threads()}
    figures.update(_shared_rows(states, weights, n, cores))
    figures["threshold"] = _threshold_row(states, weights, n, cores, 0)
    figures["threshold_flooded"] = _threshold_row(states, weights, n, cores, FLOOD_BITS)
    figures["load_before_steps"] = load_average()
    figures["steps"] = step_table(states, weights)
    if verbose:
        _print(figures)
        print_step_table(figures["steps"], cores, figures["load_before_steps"])
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
