"""The TenSEAL side of benchmarks/compare.py: the peers fedshield is measured against.

Runs under its own interpreter (a venv with ``tenseal`` and ``numpy``; see compare.py, which
creates it), because the ``openfhe`` wheel and ``tenseal`` need not share one. It imports
neither torch nor fedshield.

Input: an .npz written by compare.py with, for every client ``k`` and tensor ``i``, the
flattened float32 array ``c{k}_t{i}`` and the client weights ``weights``. Output: a JSON file
with one entry per row. Every row is timed on exactly these values; compare.py extrapolates
per-value figures when it passed a subset of the state.

Rows (what each system's shipped code does, serialization added where the reference code
keeps everything in one process, so that bytes on the wire can be counted):

reference  FedShield-LLM reference code (utils/HE_utils.py): ts.context(CKKS, 8192,
           [60, 40, 40, 60]), galois keys, global scale 2^40, public-key encryption.
           Client: one ckks_vector per tensor (flattened), serialize.
           Server: deserialize, ``sum += update`` for every client, ``* (1 / n)``,
           serialize the result. Unweighted mean (the reference weights all clients equally).
nvflare    NVIDIA FLARE HE filters (lighter HEBuilder + HEModelEncryptor +
           HEInTimeAccumulateWeightedAggregator + HEModelDecryptor): ts.context(CKKS, 8192,
           [60, 40, 40], encryption_type=SYMMETRIC), relin keys, scale 2^40.
           Client: values * weight (weigh_by_local_iter), ckks_vector per flattened layer,
           serialize. Server: ckks_vector_from + add, ``* (1 / sum of weights)``, serialize.
           Weighted mean.
Client decrypt (both): deserialize, decrypt() (a Python list, as the API returns it),
to a float array of the tensor's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import tenseal as ts

ROWS = {
    "reference": dict(coeff_mod_bit_sizes=[60, 40, 40, 60], symmetric=False, galois=True,
                      relin=False, weighted=False),
    "nvflare": dict(coeff_mod_bit_sizes=[60, 40, 40], symmetric=True, galois=False,
                    relin=True, weighted=True),
}


def make_context(spec: dict):
    kw = {"encryption_type": ts.ENCRYPTION_TYPE.SYMMETRIC} if spec["symmetric"] else {}
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                     coeff_mod_bit_sizes=spec["coeff_mod_bit_sizes"], **kw)
    ctx.global_scale = 2 ** 40
    if spec["galois"]:
        ctx.generate_galois_keys()
    if spec["relin"]:
        ctx.generate_relin_keys()
    return ctx


def server_context(ctx, spec: dict):
    """What the aggregating party holds: the reference code's one context (secret key
    included), NVFlare's server_context.tenseal (no secret key, no public key)."""
    if not spec["symmetric"]:
        return ctx
    blob = ctx.serialize(save_public_key=False, save_secret_key=False,
                         save_galois_keys=False, save_relin_keys=True)
    return ts.context_from(blob)


def run_row(name: str, spec: dict, clients: list[list[np.ndarray]], weights: list[float],
            repeat: int) -> dict:
    ctx = make_context(spec)
    sctx = server_context(ctx, spec)
    n_clients = len(clients)
    n_values = sum(a.size for a in clients[0])

    def encrypt(k: int) -> list[bytes]:
        out = []
        for a in clients[k]:
            v = a.astype(np.float64)
            if spec["weighted"]:
                v = v * np.float64(weights[k])
            out.append(ts.ckks_vector(ctx, v).serialize())
        return out

    enc_times, enc_cpu, wire = [], [], []
    for k in range(n_clients):
        t, c = time.perf_counter(), time.process_time()
        wire.append(encrypt(k))
        enc_times.append(time.perf_counter() - t)
        enc_cpu.append(time.process_time() - c)
    for _ in range(max(0, repeat - n_clients)):
        t, c = time.perf_counter(), time.process_time()
        encrypt(0)
        enc_times.append(time.perf_counter() - t)
        enc_cpu.append(time.process_time() - c)
    bytes_up = sum(len(b) for b in wire[0])

    factor = 1.0 / (sum(weights) if spec["weighted"] else n_clients)

    def aggregate() -> list[bytes]:
        result = []
        for i in range(len(wire[0])):
            acc = ts.ckks_vector_from(sctx, wire[0][i])
            for k in range(1, n_clients):
                acc += ts.ckks_vector_from(sctx, wire[k][i])
            result.append((acc * factor).serialize())
        return result

    agg_times, agg = [], None
    for _ in range(max(1, repeat)):
        agg = None
        t = time.perf_counter()
        agg = aggregate()
        agg_times.append(time.perf_counter() - t)
    bytes_down = sum(len(b) for b in agg)

    def decrypt() -> list[np.ndarray]:
        return [np.asarray(ts.ckks_vector_from(ctx, b).decrypt(), dtype=np.float64)
                for b in agg]

    dec_times, out = [], None
    for _ in range(max(1, repeat)):
        out = None
        t = time.perf_counter()
        out = decrypt()
        dec_times.append(time.perf_counter() - t)

    max_err = 0.0
    w = np.asarray(weights if spec["weighted"] else [1.0] * n_clients, dtype=np.float64)
    for i, got in enumerate(out):
        want = sum(w[k] * clients[k][i].astype(np.float64) for k in range(n_clients)) / w.sum()
        max_err = max(max_err, float(np.max(np.abs(got - want))))

    return {
        "row": name,
        "params": {"poly_modulus_degree": 8192,
                   "coeff_mod_bit_sizes": spec["coeff_mod_bit_sizes"], "scale_bits": 40,
                   "encryption": "symmetric" if spec["symmetric"] else "public-key",
                   "n_threads": "tenseal default"},
        "target": "weighted mean" if spec["weighted"] else "unweighted mean",
        "n_values": n_values,
        "n_tensors": len(clients[0]),
        "n_ciphertexts": sum(-(-a.size // 4096) for a in clients[0]),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "encrypt_s": min(enc_times),
        "encrypt_cpu_over_wall": enc_cpu[int(np.argmin(enc_times))] / min(enc_times),
        "aggregate_s": min(agg_times),
        "decrypt_s": min(dec_times),
        "max_abs_err": max_err,
        "encrypt_samples": len(enc_times),
        "aggregate_samples": len(agg_times),
    }


def peak_rss_gib() -> float | None:
    """This process's high-water RSS (VmHWM; getrusage's ru_maxrss survives exec, so it would
    report the forking parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", required=True)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--rows", default="reference,nvflare")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    data = np.load(args.npz)
    weights = [float(w) for w in data["weights"]]
    n_clients = len(weights)
    n_tensors = int(data["n_tensors"])
    clients = [[data[f"c{k}_t{i}"] for i in range(n_tensors)] for k in range(n_clients)]

    result = {"tenseal": ts.__version__, "numpy": np.__version__,
              "python": platform.python_version(), "executable": sys.executable,
              "pid": os.getpid(), "rows": []}
    for name in [r for r in args.rows.split(",") if r]:
        result["rows"].append(run_row(name, ROWS[name], clients, weights, args.repeat))
        result["peak_rss_gib"] = peak_rss_gib()
        with open(args.out, "w") as f:  # what finished survives a later failure
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
