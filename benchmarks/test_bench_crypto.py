"""pytest-benchmark suites for the encrypted path: pack/unpack, encrypt, aggregate, decrypt.

Run: .venv/bin/python -m pytest benchmarks/test_bench_crypto.py --benchmark-only
Compare rows of one run only (this machine is noisy); the OpenFHE rows are the baselines.
"""

import numpy as np
import pytest
import torch

import fedshield as fs
from fedshield import native
from fedshield.run.bench import openfhe_aggregate_baseline, openfhe_encrypt_baseline

N_VALUES = 1 << 20  # 32 tensors of 32x1024: 64 ciphertexts at N=2^14
CLIENTS = 4


@pytest.fixture(scope="module")
def keys():
    return fs.keygen_shared()


@pytest.fixture(scope="module")
def states():
    g = torch.Generator().manual_seed(0)
    return [{f"layers.{i}.lora_{'AB'[i % 2]}.weight": torch.rand(32, 1024, generator=g) * 0.02 - 0.01
             for i in range(N_VALUES // (32 * 1024))} for _ in range(CLIENTS)]


@pytest.fixture(scope="module")
def layout(states):
    return fs.Layout.from_state_dict(states[0])


@pytest.fixture(scope="module")
def updates(keys, states, layout):
    return [fs.encrypt_update(keys.client_context(), s, layout, weight=10.0 + i).to_bytes()
            for i, s in enumerate(states)]


def test_pack(benchmark, states, layout):
    arrays = layout.flat_arrays(states[0])
    per_ct = fs.CKKSParams().values_per_ciphertext
    n = -(-(layout.numel + 1) // per_ct) * per_ct
    benchmark(native.pack_values, arrays, [None] * len(arrays), 1e-3, 1e-3, 4.0, n, 0)


def test_unpack(benchmark, states, layout):
    arrays = layout.flat_arrays(states[0])
    per_ct = fs.CKKSParams().values_per_ciphertext
    n = -(-(layout.numel + 1) // per_ct) * per_ct
    buf = native.pack_values(arrays, [None] * len(arrays), 1e-3, 1e-3, 4.0, n, 0)
    outs = [np.empty(s.numel, dtype=np.float32) for s in layout.specs]
    benchmark(native.unpack_values, buf, outs, [None] * len(outs), True, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_encrypt(benchmark, keys, states, layout, workers):
    ctx = keys.client_context()
    fs.encrypt_update(ctx, states[0], layout, weight=10.0, workers=workers)  # start the pool
    benchmark.pedantic(fs.encrypt_update, args=(ctx, states[0], layout),
                       kwargs=dict(weight=10.0, workers=workers), rounds=3)


def test_encrypt_raw_openfhe(benchmark, keys, updates):
    """Baseline: MakeCKKSPackedPlaintext + Encrypt on the same number of ciphertexts, one core."""
    n_cts = fs.EncryptedUpdate.from_bytes(updates[0]).n_ciphertexts
    benchmark.pedantic(openfhe_encrypt_baseline(keys.client_context(), n_cts), rounds=3)


def test_aggregate(benchmark, keys, updates):
    benchmark(fs.aggregate, keys.server_context(), updates)


def test_aggregate_openfhe(benchmark, keys, updates):
    """Baseline: OpenFHE's own server path, DeserializeCiphertextString + EvalAddInPlace."""
    # the baseline rebuilds OpenFHE ciphertexts from parsed updates, not their bytes
    parsed = [fs.EncryptedUpdate.from_bytes(u) for u in updates]
    openfhe_path, _ = openfhe_aggregate_baseline(keys.client_context(), parsed)
    benchmark.pedantic(openfhe_path, rounds=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_decrypt(benchmark, keys, updates, layout, workers):
    ctx = keys.client_context()
    agg = fs.aggregate(keys.server_context(), updates)
    fs.decrypt_update(ctx, agg, layout, workers=workers)  # start the pool
    benchmark.pedantic(fs.decrypt_update, args=(ctx, agg, layout), kwargs=dict(workers=workers),
                       rounds=3)
