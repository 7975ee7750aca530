"""`fedshield bench`: headline figures measured in one run, on this machine."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import _native
from .he import (CKKSParams, Layout, aggregate, backend, decrypt_update, encrypt_update,
                 keygen_shared)
from .he.crypto_pool import default_workers


def _state(n_values: int, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA-shaped state: (32 x 1024) tensors, values like fine-tuning deltas."""
    g = torch.Generator().manual_seed(seed)
    cols = 1024
    n_tensors = max(1, n_values // (32 * cols))
    return {f"layers.{i}.lora_{'AB'[i % 2]}.weight": torch.rand(32, cols, generator=g) * 0.02 - 0.01
            for i in range(n_tensors)}


def openfhe_encrypt_baseline(ctx, n_cts: int, seed: int = 0):
    """A callable doing raw MakeCKKSPackedPlaintext + Encrypt for n_cts full ciphertexts."""
    cc, pk, _ = ctx.openfhe_objects()
    n_slots = ctx.params.slots
    slots = np.random.default_rng(seed).uniform(-0.01, 0.01, n_cts * 2 * n_slots).view(np.complex128)

    def raw_encrypt():
        for i in range(n_cts):
            cc.Encrypt(pk, cc.MakeCKKSPackedPlaintext(slots[i * n_slots:(i + 1) * n_slots]))

    return raw_encrypt


def openfhe_aggregate_baseline(ctx, update_blobs: list[bytes]):
    """A callable aggregating the same ciphertexts the way an OpenFHE server would:
    DeserializeCiphertextString + EvalAddInPlace (ctx must hold the template, not the key)."""
    o = backend.openfhe()
    cc, _, _ = ctx.openfhe_objects()
    cc.Enable(o.LEVELEDSHE)  # EvalAdd needs it; fedshield's own path never calls OpenFHE here
    template, ct_layout = ctx.ciphertext_template
    serialized = [_native.decode_ciphertexts(b, template, ct_layout, 0) for b in update_blobs]

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


def run_bench(n_values: int = 1 << 20, n_clients: int = 4, verbose: bool = True) -> dict:
    params = CKKSParams()
    keys = keygen_shared(params)
    client, server = keys.client_context(), keys.server_context()
    states = [_state(n_values, seed) for seed in range(n_clients)]
    layout = Layout.from_state_dict(states[0])
    n = layout.numel

    cores = default_workers()
    t_enc = _best(lambda: encrypt_update(client, states[0], layout, weight=10.0, workers=1),
                  repeat=2)
    encrypt_update(client, states[0], layout, weight=10.0, workers=cores)  # start the pool
    t_enc_all = _best(lambda: encrypt_update(client, states[0], layout, weight=10.0,
                                             workers=cores), repeat=2)
    updates = [encrypt_update(client, s, layout, weight=10.0 + i) for i, s in enumerate(states)]
    half = {k: torch.arange(v.numel()).reshape(v.shape) % 2 == 0 for k, v in states[0].items()}
    masked = encrypt_update(client, states[0], layout, weight=10.0, mask=half)

    # Raw OpenFHE on the same number of ciphertexts: encode + encrypt only.
    raw_encrypt = openfhe_encrypt_baseline(client, updates[0].n_ciphertexts)
    t_raw = _best(raw_encrypt, repeat=2)

    blobs = [u.to_bytes() for u in updates]
    t_agg = _best(lambda: aggregate(server, blobs))
    agg = aggregate(server, blobs)

    # OpenFHE's own server path on the same ciphertexts: deserialize + EvalAddInPlace.
    openfhe_aggregate, openfhe_bytes = openfhe_aggregate_baseline(client, blobs)
    t_ofhe = _best(openfhe_aggregate, repeat=1)
    t_dec = _best(lambda: decrypt_update(client, agg, layout, workers=1), repeat=2)
    decrypt_update(client, agg, layout, workers=cores)  # start the pool
    t_dec_all = _best(lambda: decrypt_update(client, agg, layout, workers=cores), repeat=2)

    in_bytes = sum(len(b) for b in blobs)
    figures = {
        "lora_values": n,
        "clients": n_clients,
        "bytes_per_value_dense": updates[0].nbytes / n,
        "bytes_per_value_mask50": masked.nbytes / n,
        "openfhe_fresh_bytes_per_value": 262891 * updates[0].n_ciphertexts / n,
        "encrypt_us_per_value": t_enc / n * 1e6,
        "raw_openfhe_encrypt_us_per_value": t_raw / n * 1e6,
        "encrypt_overhead_ratio": t_enc / t_raw,
        "cores": cores,
        "encrypt_all_cores_us_per_value": t_enc_all / n * 1e6,
        "encrypt_speedup_all_cores": t_enc / t_enc_all,
        "aggregate_MB_per_s": in_bytes / t_agg / 1e6,
        "openfhe_aggregate_MB_per_s": openfhe_bytes / t_ofhe / 1e6,
        "aggregate_speedup_vs_openfhe": t_ofhe / t_agg,
        "decrypt_us_per_value": t_dec / n * 1e6,
        "decrypt_all_cores_us_per_value": t_dec_all / n * 1e6,
        "decrypt_speedup_all_cores": t_dec / t_dec_all,
        "native_threads": _native.default_threads,
    }
    if verbose:
        print(f"fedshield bench: {n} LoRA values, {n_clients} clients, "
              f"{_native.default_threads} threads")
        rows = [
            ("bytes/value, dense", f"{figures['bytes_per_value_dense']:.2f}",
             f"OpenFHE fresh ciphertexts: {figures['openfhe_fresh_bytes_per_value']:.2f}"),
            ("bytes/value, 50% mask", f"{figures['bytes_per_value_mask50']:.2f}", ""),
            ("encrypt µs/value, 1 core", f"{figures['encrypt_us_per_value']:.3f}",
             f"raw OpenFHE encode+encrypt: {figures['raw_openfhe_encrypt_us_per_value']:.3f} "
             f"(overhead x{figures['encrypt_overhead_ratio']:.2f})"),
            (f"encrypt µs/value, {cores} cores", f"{figures['encrypt_all_cores_us_per_value']:.3f}",
             f"speed-up x{figures['encrypt_speedup_all_cores']:.2f}"),
            ("aggregate MB/s", f"{figures['aggregate_MB_per_s']:.0f}",
             f"OpenFHE deserialize+add: {figures['openfhe_aggregate_MB_per_s']:.0f} "
             f"(x{figures['aggregate_speedup_vs_openfhe']:.1f} faster)"),
            ("decrypt µs/value, 1 core", f"{figures['decrypt_us_per_value']:.3f}", ""),
            (f"decrypt µs/value, {cores} cores", f"{figures['decrypt_all_cores_us_per_value']:.3f}",
             f"speed-up x{figures['decrypt_speedup_all_cores']:.2f}"),
        ]
        for name, value, note in rows:
            print(f"  {name:<24}{value:>10}   {note}")
    return figures
