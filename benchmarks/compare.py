"""Side-by-side: fedshield versus the FedShield-LLM reference code and NVIDIA FLARE's HE filters.

One run, one LoRA state, the same client values for every row:

  1. fedshield dense            shared keys, seeded (wire v3: c0 and a seed travel)
  2. fedshield 50% global mask  the same mask on every client (mask=), pruned values not sent
  3. fedshield FFA (B only)     FFA-LoRA: A frozen, only the B matrices travel
  4. fedshield v2 parameters    what wire v2 sent: N=16384, 60-bit modulus, c0 and c1
  5. fedshield threshold        3 parties' joint public key (c0 and c1), partial decryptions
  6. ... + 30-bit flooding      the same with every partial decryption noise-flooded
  7. reference-code style       TenSEAL CKKS N=8192 q=[60,40,40,60], one ckks_vector per tensor
  8. NVFlare style              TenSEAL CKKS N=8192 q=[60,40,40], symmetric, per-layer vectors

Columns: bytes on the wire per LoRA value (client upload, and the aggregate sent back), client
seconds to encrypt one update and to decrypt the aggregate, server seconds to aggregate all
clients, and the largest error of the decrypted aggregate against the plaintext mean computed
in float64 (each row against what its system computes: fedshield and NVFlare the weighted
mean, the reference code the unweighted mean; the masked row the weighted mean with zeros at
pruned positions). Ratios are the reference row's figure divided by the row's (x5 = five times
smaller or faster).

The TenSEAL rows run in a subprocess under their own interpreter (benchmarks/peers_tenseal.py):
the script creates benchmarks/.peer-venv with a Python for which tenseal wheels exist and
``pip install tenseal numpy`` into it, once. Without a suitable Python or network those rows
are skipped with a message and the fedshield rows are still printed.

  .venv/bin/python benchmarks/compare.py --state small      # CI-sized, seconds
  .venv/bin/python benchmarks/compare.py --state llama7b    # 16.8M values, ~5 min, ~6 GB
  .venv/bin/python benchmarks/compare.py --state mistral7b  # 13.6M values: FlowerTune's model
      # (every run also prints each per-round step of a site against OpenFHE's own call on one
      # thread, measured in the same run, and the Mistral-7B per-round totals)
  .venv/bin/python benchmarks/compare.py --state llama7b --peer-values 4194304
      # TenSEAL rows on 32 of 128 tensors, scaled to the full state (marked *)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peers_tenseal.py"
DEFAULT_PEER_VENV = HERE / ".peer-venv"
TOL = 1e-6  # absolute, on LoRA values of magnitude <= 0.02

STATES = {
    # 8 tensors of 8x512 = 32768 values: one TenSEAL ciphertext per tensor.
    "small": {"layers": 2, "modules": ("q_proj", "v_proj"), "r": 8, "d": 512, "llama": False},
    # Llama-2-7B, r=32 on q_proj/v_proj: 32 layers x 2 modules x (A 32x4096, B 4096x32)
    # = 128 tensors of 131072 values, 16,777,216 values.
    "llama7b": {"layers": 32, "modules": ("q_proj", "v_proj"), "r": 32, "d": 4096, "llama": True},
    # Mistral-7B (FlowerTune's base model), r=32 on q_proj/v_proj: grouped-query attention
    # makes v_proj 4096 -> 1024, so B of v_proj is 1024x32: 13,631,488 values.
    "mistral7b": {"layers": 32, "modules": ("q_proj", "v_proj"), "r": 32, "d": 4096,
                  "llama": True, "out": {"v_proj": 1024}},
}


# ----------------------------------------------------------------------------- the state

def state_shapes(kind: str) -> list[tuple[str, tuple[int, int]]]:
    s = STATES[kind]
    shapes = []
    for layer in range(s["layers"]):
        for mod in s["modules"]:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            if s["llama"]:
                shapes.append((f"{prefix}.lora_A.weight", (s["r"], s["d"])))
                shapes.append((f"{prefix}.lora_B.weight",
                               (s.get("out", {}).get(mod, s["d"]), s["r"])))
            else:  # small: every tensor r x d (A-shaped), so each fills one TenSEAL ciphertext
                shapes.append((f"{prefix}.lora_A.weight", (s["r"], s["d"])))
                shapes.append((f"{prefix}.lora_B.weight", (s["r"], s["d"])))
    return shapes


def make_states(kind: str, n_clients: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Client updates shaped like LoRA deltas after a round: N(0, 0.004^2), clipped to 0.02."""
    shapes = state_shapes(kind)
    states = []
    for k in range(n_clients):
        rng = np.random.default_rng(seed + 1 + k)
        st = {}
        for name, shape in shapes:
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= np.float32(0.004)
            np.clip(a, -0.02, 0.02, out=a)
            st[name] = a
        states.append(st)
    return states


def global_mask(kind: str, keep: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """The round's global mask: per tensor, keep the largest |w| of the previous global state.

    Every client derives the same mask from the same (decrypted) previous global state, which
    is what makes slot-wise addition of compacted updates valid. Exactly round(keep * numel)
    values per tensor are kept; ties are broken by position.
    """
    rng = np.random.default_rng(seed + 10_000)
    mask = {}
    for name, shape in state_shapes(kind):
        prev = np.abs(rng.standard_normal(shape, dtype=np.float32)).ravel()
        n_keep = int(round(keep * prev.size))
        order = np.argsort(-prev, kind="stable")[:n_keep]
        m = np.zeros(prev.size, dtype=bool)
        m[order] = True
        mask[name] = m.reshape(shape)
    return mask


def client_weights(n_clients: int) -> list[float]:
    """num_examples per client: unequal, so weighting errors would show."""
    return [float(120 + 130 * k) for k in range(n_clients)]


def weighted_mean(states, weights, name) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return sum(w[k] * states[k][name].astype(np.float64) for k in range(len(states))) / w.sum()


# ----------------------------------------------------------------------------- fedshield rows

def _descendants(pid: int) -> list[int]:
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_descendants(k)]
    return out


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live child processes (fedshield may encrypt in
    worker processes, which process_time() does not see). Linux /proc; else this process."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def best_encrypt(fn, n_clients: int, repeat: int):
    """Times encrypting every client once (and client 0 again up to `repeat` samples)."""
    times, cpus, outs = [], [], []
    for k in range(n_clients):
        t, c = time.perf_counter(), tree_cpu_seconds()
        outs.append(fn(k))
        times.append(time.perf_counter() - t)
        cpus.append(tree_cpu_seconds() - c)
    for _ in range(max(0, repeat - n_clients)):
        t, c = time.perf_counter(), tree_cpu_seconds()
        fn(0)
        times.append(time.perf_counter() - t)
        cpus.append(tree_cpu_seconds() - c)
    best = int(np.argmin(times))
    return times[best], cpus[best] / times[best], outs


def best_of(fn, repeat: int):
    best, out = math.inf, None
    for _ in range(max(1, repeat)):
        out = None
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


THRESHOLD_PARTIES = 3
FLOOD_BITS = 30


def fedshield_setups(log):
    """(label, client context for encryption, server context, decrypt(agg, layout, mask)) of
    each key mode: shared keys (seeded, wire v3), threshold keys (3 parties, each partial
    decryption fused), threshold keys with noise flooding."""
    import fedshield as fs

    # what a fedshield run ships: its Server sends each round's weight bound (max_weight=0;
    # fs.CKKSParams() also covers weights 1..10**6 with no bound passed, at 7.375 B/value)
    keys = fs.keygen_shared(fs.CKKSParams.for_precision(max_weight=0))
    client = keys.client_context()
    yield ("", client, keys.server_context(),
           lambda agg, layout, mask: fs.decrypt_update(client, agg, layout, mask=mask))
    # What wire v2 shipped: N=16384, one 60-bit modulus, public-key encryption, c0 and c1.
    v2 = fs.keygen_shared(fs.CKKSParams(ring_dim=16384, scale_bits=50, first_mod_bits=60,
                                        seeded=False))
    v2_client = v2.client_context()
    yield ("v2 parameters (N=16384, 60-bit, c0+c1)", v2_client, v2.server_context(),
           lambda agg, layout, mask: fs.decrypt_update(v2_client, agg, layout, mask=mask))
    for flood, label in ((0, "threshold"), (FLOOD_BITS, f"threshold + {FLOOD_BITS}-bit flooding")):
        log(f"  {label}: generating the keys of {THRESHOLD_PARTIES} parties ...")
        # as keygen_threshold resolves a request for its parties (CKKSParams.for_keys)
        params = fs.CKKSParams(flood_bits=flood, max_weight=0).for_keys("threshold",
                                                                        THRESHOLD_PARTIES)
        parties, server = fs.keygen_threshold(params, THRESHOLD_PARTIES)

        def decrypt(agg, layout, mask, parties=parties):
            shares = [fs.partial_decrypt(p, agg) for p in parties]
            return fs.combine_partials(agg, shares, layout, mask, ctx=parties[0])

        yield label, parties[0], server, decrypt


def fedshield_rows(kind: str, states, weights, mask, repeat: int, log) -> list[dict]:
    """Shared keys: dense, the 50% global mask, FFA-LoRA (only the B matrices travel);
    threshold keys, without and with flooding: dense. Bytes per value are over the whole
    LoRA state (an FFA update leaves the frozen A matrices out)."""
    import torch

    import fedshield as fs

    n_clients = len(states)
    n_values = sum(a.size for a in states[0].values())
    tstates = [{n: torch.from_numpy(a) for n, a in st.items()} for st in states]
    tmask = {n: torch.from_numpy(m) for n, m in mask.items()}
    kept = sum(int(m.sum()) for m in mask.values()) / n_values
    bound = float(2 ** math.ceil(math.log2(max(weights))))  # the round's, as the Server picks
    b_only = [{n: t for n, t in st.items() if "lora_B" in n} for st in tstates]
    rows = []
    for mode, client, server, decrypt in fedshield_setups(log):
        variants = [("dense", tstates, None)]
        if not mode:
            variants += [(f"{kept:.0%} global mask", tstates, tmask),
                         ("FFA (B only)", b_only, None)]
        for what, sts, m in variants:
            name = f"fedshield {mode + ', ' if mode else ''}{what}"
            layout = fs.Layout.from_state_dict(sts[0])
            log(f"  {name}: encrypting {n_clients} clients ...")

            def enc(k, m=m, sts=sts, layout=layout):
                return fs.encrypt_update(client, sts[k], layout, weight=weights[k], mask=m,
                                         weight_bound=bound).to_bytes()

            t_enc, enc_cores, blobs = best_encrypt(enc, n_clients, repeat)
            log(f"  {name}: aggregating ...")
            t_agg, agg = best_of(lambda b=blobs: fs.aggregate(server, b).to_bytes(), repeat)
            log(f"  {name}: decrypting ...")
            t_dec, out = best_of(lambda m=m, a=agg, lay=layout: decrypt(
                fs.EncryptedUpdate.from_bytes(a), lay, m), repeat)
            max_err = 0.0
            for tname, got in out.items():
                want = weighted_mean(states, weights, tname)
                if m is not None:
                    want = np.where(mask[tname], want, 0.0)
                max_err = max(max_err, float(np.max(np.abs(got.numpy().astype(np.float64)
                                                           - want))))
            first = fs.EncryptedUpdate.from_bytes(blobs[0])
            params = client.params
            rows.append({
                "row": name,
                "system": "fedshield",
                "params": {"ring_dim": params.ring_dim, "packing": params.packing,
                           "modulus_bits": params.log_q, "seeded": first.is_seeded,
                           "values_per_ciphertext": params.values_per_ciphertext},
                "target": "weighted mean" + (" x mask" if m is not None else ""),
                "n_values": n_values, "n_values_measured": n_values, "extrapolated": False,
                "kept_fraction": kept if m is not None else layout.numel / n_values,
                "n_ciphertexts": first.n_ciphertexts,
                "bytes_up": len(blobs[0]), "bytes_down": len(agg),
                "encrypt_s": t_enc, "aggregate_s": t_agg, "decrypt_s": t_dec,
                "max_abs_err": max_err, "encrypt_cpu_over_wall": enc_cores,
            })
            blobs = agg = out = None  # free this row's ciphertexts before the next one
    return rows


# ----------------------------------------------------------------------------- TenSEAL side

def _run(cmd, timeout=1800, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _imports_tenseal(python: str) -> str | None:
    try:
        r = _run([python, "-c", "import tenseal, numpy; print(tenseal.__version__)"],
                 timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def _base_pythons(explicit: str | None) -> list[str]:
    """Interpreters to build the peer venv from, most likely to have tenseal wheels first."""
    if explicit:
        return [explicit]
    cands = []
    # This interpreter's own base install (not the project venv, which must stay untouched).
    base = os.path.join(sys.base_prefix, "bin", "python%d.%d" % sys.version_info[:2])
    if os.path.exists(base):
        cands.append(base)
    for v in ("3.10", "3.11", "3.12", "3.9", "3.8"):
        p = shutil.which(f"python{v}")
        if p:
            cands.append(p)
        cands += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{v}*/bin/python{v}")))
    p = shutil.which("python3")
    if p:
        cands.append(p)
    seen, out = set(), []
    for c in cands:  # probe: pyenv shims and broken links answer with an error, skip them
        try:
            r = _run([c, "-c", "import sys, venv; print(sys.executable)"], timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        real = os.path.realpath(r.stdout.strip()) if r.returncode == 0 else None
        if real and real not in seen:
            seen.add(real)
            out.append(c)
    return out


def ensure_peer_env(venv: Path, base_python: str | None, log) -> tuple[str | None, str]:
    """Returns (python with tenseal, description) or (None, why not)."""
    py = venv / "bin" / "python"
    if py.exists():
        v = _imports_tenseal(str(py))
        if v:
            return str(py), f"tenseal {v} in {venv}"
    errors = []
    for base in _base_pythons(base_python):
        log(f"  setting up {venv} from {base} (pip install tenseal numpy) ...")
        if venv.exists():
            shutil.rmtree(venv)
        try:
            r = _run([base, "-m", "venv", str(venv)], timeout=300)
            if r.returncode != 0:
                errors.append(f"{base}: venv failed: {r.stderr.strip()[-200:]}")
                continue
            r = _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                      "--only-binary=:all:", "tenseal", "numpy"], timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{base}: {exc}")
            continue
        if r.returncode != 0:
            tail = [ln for ln in r.stderr.strip().splitlines() if "is ignored" not in ln]
            errors.append(f"{base}: pip install failed: {' | '.join(tail[-3:])}")
            continue
        v = _imports_tenseal(str(py))
        if v:
            return str(py), f"tenseal {v} in {venv} (created from {base})"
        errors.append(f"{base}: tenseal installed but does not import")
    if venv.exists():
        shutil.rmtree(venv, ignore_errors=True)
    if not errors:
        return None, "no usable Python interpreter found"
    grouped: dict[str, list[str]] = {}
    for e in errors:  # "base: why"; one line per distinct why
        base, _, why = e.partition(": ")
        grouped.setdefault(why, []).append(base)
    return None, "; ".join(f"{', '.join(b)}: {why}" for why, b in grouped.items())


def peer_subset(states, n_peer: int | None):
    """The first tensors of the layout order holding at least n_peer values (whole tensors)."""
    names = sorted(states[0])  # fs.Layout order is sorted names as well
    if not n_peer:
        return names
    chosen, count = [], 0
    for n in names:
        if count >= n_peer:
            break
        chosen.append(n)
        count += states[0][n].size
    return chosen


def tenseal_rows(states, weights, n_peer, repeat, venv, base_python, timeout, log) -> tuple:
    py, info = ensure_peer_env(venv, base_python, log)
    if py is None:
        return [], (f"TenSEAL rows skipped: no interpreter with tenseal could be set up "
                    f"({info})"), None
    names = peer_subset(states, n_peer)
    n_full = sum(a.size for a in states[0].values())
    n_used = sum(states[0][n].size for n in names)
    with tempfile.TemporaryDirectory(prefix="fedshield-compare-") as tmp:
        npz, out = os.path.join(tmp, "state.npz"), os.path.join(tmp, "peers.json")
        arrays = {f"c{k}_t{i}": st[n].ravel() for k, st in enumerate(states)
                  for i, n in enumerate(names)}
        np.savez(npz, weights=np.asarray(weights), n_tensors=np.asarray(len(names)), **arrays)
        del arrays
        log(f"  TenSEAL rows ({info}) on {n_used:,} of {n_full:,} values ...")
        cmd = [py, str(PEER_SCRIPT), "--npz", npz, "--out", out, "--repeat", str(repeat)]
        try:
            r = _run(cmd, timeout=timeout)
            rc, err = r.returncode, (r.stderr or "").strip()
        except subprocess.TimeoutExpired:
            rc, err = -1, f"timed out after {timeout} s"
        peer = json.load(open(out)) if os.path.exists(out) else {"rows": []}
    note = None
    if rc != 0:
        note = (f"TenSEAL subprocess failed (rc={rc}): {err[-500:]}; rows that finished are "
                "shown")
    rows = []
    scale = n_full / n_used
    for r in peer["rows"]:
        label = {"reference": "reference-code style", "nvflare": "NVFlare style"}[r["row"]]
        rows.append({
            "row": label, "system": r["row"], "params": r["params"], "target": r["target"],
            "n_values": n_full, "n_values_measured": r["n_values"],
            "extrapolated": n_used != n_full, "kept_fraction": 1.0,
            "n_ciphertexts": round(r["n_ciphertexts"] * scale),
            "bytes_up": r["bytes_up"] * scale, "bytes_down": r["bytes_down"] * scale,
            "encrypt_s": r["encrypt_s"] * scale, "aggregate_s": r["aggregate_s"] * scale,
            "decrypt_s": r["decrypt_s"] * scale, "max_abs_err": r["max_abs_err"],
            "encrypt_cpu_over_wall": r["encrypt_cpu_over_wall"],
        })
    return rows, note, {"python": peer.get("python"), "tenseal": peer.get("tenseal"),
                        "peak_rss_gib": peer.get("peak_rss_gib"),
                        "n_values_measured": n_used, "n_tensors_measured": len(names)}


# ----------------------------------------------------------------------------- the table

def _fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def print_table(rows, n_values, n_clients, ref_name="reference-code style") -> None:
    ref = next((r for r in rows if r["row"] == ref_name), None)
    hdr = ["row", "up B/val", "down B/val", "encrypt s", "enc cpu/wall", "decrypt s",
           f"aggregate s ({n_clients} cl)", "max |err|", "ok"]
    if ref:
        hdr += ["vs reference: bytes", "enc", "dec", "agg"]
    lines = []
    for r in rows:
        star = "*" if r.get("extrapolated") else ""
        up, down = r["bytes_up"] / n_values, r["bytes_down"] / n_values
        cells = [r["row"] + star, f"{up:.2f}", f"{down:.2f}", _fmt_s(r["encrypt_s"]),
                 f"{r['encrypt_cpu_over_wall']:.2f}", _fmt_s(r["decrypt_s"]),
                 _fmt_s(r["aggregate_s"]), f"{r['max_abs_err']:.1e}",
                 "yes" if r["max_abs_err"] <= TOL else "NO"]
        if ref:
            cells += [f"x{ref['bytes_up'] / r['bytes_up']:.1f}",
                      f"x{ref['encrypt_s'] / r['encrypt_s']:.1f}",
                      f"x{ref['decrypt_s'] / r['decrypt_s']:.1f}",
                      f"x{ref['aggregate_s'] / r['aggregate_s']:.1f}"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(hdr))
    print("  ".join("-" * w for w in widths))
    for c in lines:
        print(fmt(c))


def source_state() -> str:
    """Which fedshield was measured: the commit, and whether the tree had local changes."""
    import fedshield  # noqa: PLC0415

    root = Path(fedshield.__file__).resolve().parents[2]
    try:
        head = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], timeout=30)
        dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                     timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    n = len([ln for ln in dirty.stdout.splitlines() if ln.strip()])
    return head.stdout.strip() + (f" + uncommitted changes in {n} tracked files" if n else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fedshield vs TenSEAL peers on one LoRA state",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--state", choices=sorted(STATES), default="small")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=None,
                    help="samples per timing (encrypt: every client once, client 0 again up to "
                         "this many); the best is reported (default 7 for small, 3 for llama7b)")
    ap.add_argument("--peer-values", type=int, default=None, metavar="N",
                    help="run the TenSEAL rows on the first whole tensors holding >= N values "
                         "and scale their per-value figures to the full state")
    ap.add_argument("--no-peers", action="store_true", help="skip the TenSEAL rows")
    ap.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV)
    ap.add_argument("--peer-python", default=None,
                    help="base interpreter for the peer venv (default: the first of this "
                         "interpreter's base, python3.10..3.12, pyenv installs, python3 that "
                         "gets tenseal wheels)")
    ap.add_argument("--peer-timeout", type=int, default=3600, help="seconds (default 3600)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.clients < 2:
        ap.error("--clients must be at least 2")
    if args.repeat is None:
        args.repeat = 7 if args.state == "small" else 3

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        import fedshield as fs
        from fedshield import native
    except ImportError as exc:
        print(f"fedshield does not import here ({exc}); run with the project venv, e.g. "
              ".venv/bin/python benchmarks/compare.py", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    source = source_state()
    log(f"compare: state={args.state}, {args.clients} clients; building the state ...")
    states = make_states(args.state, args.clients)
    weights = client_weights(args.clients)
    mask = global_mask(args.state)
    n_values = sum(a.size for a in states[0].values())
    n_tensors = len(states[0])

    rows = fedshield_rows(args.state, states, weights, mask, args.repeat, log)
    log("  each step against OpenFHE's own single-threaded call ...")
    from fedshield.run.bench import load_average, step_table  # noqa: PLC0415 - after the import check
    step_load = load_average()
    steps = step_table(states, weights, repeat=min(args.repeat, 3))
    notes, peer_info = [], None
    if args.no_peers:
        notes.append("TenSEAL rows skipped (--no-peers)")
    else:
        res = tenseal_rows(states, weights, args.peer_values, args.repeat, args.peer_venv,
                           args.peer_python, args.peer_timeout, log)
        peer_rows, note, peer_info = res
        rows = rows + peer_rows
        if note:
            notes.append(note)
    load1 = os.getloadavg()
    wall = time.perf_counter() - t0
    import resource  # noqa: PLC0415 - Linux/macOS; ru_maxrss is KiB on Linux
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rss_peer = (peer_info or {}).get("peak_rss_gib")

    shape = sorted({a.shape for a in states[0].values()})
    print(f"fedshield compare: state '{args.state}' ({n_tensors} tensors of "
          f"{' / '.join('x'.join(map(str, s)) for s in shape)}, {n_values:,} LoRA values), "
          f"{args.clients} clients, weights {', '.join(f'{w:g}' for w in weights)}; "
          f"best of {args.repeat}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load0[0]:.2f} at start, "
          f"{load1[0]:.2f} at end; fedshield native threads {native.default_threads()}; "
          f"Python {platform.python_version()}; fedshield at {source}"
          + (f"; TenSEAL {peer_info['tenseal']} on Python {peer_info['python']}"
             if peer_info and peer_info.get("tenseal") else ""))
    print()
    print_table(rows, n_values, args.clients)
    print()
    print("up/down B/val: bytes of one client's update / of the aggregate sent back, per LoRA "
          "value of the full state (pruned ones included).")
    print("seconds are for the full state: encrypt = one client's update to bytes (enc cpu/wall: "
          "cores it kept busy); decrypt = aggregate bytes to tensors;")
    print(f"aggregate = the server turning {args.clients} updates' bytes into the aggregate's "
          "bytes (TenSEAL: deserialize, add, x 1/n, serialize).")
    print(f"max |err|: decrypted aggregate vs the float64 plaintext mean (ok: <= {TOL:g}); "
          "vs reference: the reference row's figure / this row's.")
    if any(r.get("extrapolated") for r in rows):
        n_meas = peer_info["n_values_measured"]
        print(f"* extrapolated: measured on {n_meas:,} values ({peer_info['n_tensors_measured']} "
              f"of {n_tensors} tensors, --peer-values), per-value figures scaled by "
              f"{n_values / n_meas:.2f} to the full {n_values:,} values.")
    for n in notes:
        print(f"NOTE: {n}")
    print()
    from fedshield.run.bench import print_step_table  # noqa: PLC0415
    print_step_table(steps, native.default_threads(), step_load)
    if n_values == steps["mistral7b_round_s"]["values"]:
        print("(this state is the Mistral-7B one: the per-round totals are measured, not scaled)")
    print(f"(whole run: {wall:.0f} s; peak RSS {rss_self:.1f} GiB in this process"
          + (f", {rss_peer:.1f} GiB in the TenSEAL one)" if rss_peer else ")"))

    if args.json:
        doc = {"state": args.state, "n_values": n_values, "n_tensors": n_tensors,
               "clients": args.clients, "weights": weights, "repeat": args.repeat,
               "peer_values": args.peer_values, "peer": peer_info, "notes": notes,
               "machine": {"cpus": os.cpu_count(), "loadavg_start": load0,
                           "loadavg_end": load1, "native_threads": native.default_threads(),
                           "python": platform.python_version(),
                           "peak_rss_gib": rss_self, "peak_rss_tenseal_gib": rss_peer},
               "fedshield_version": getattr(fs, "__version__", None),
               "fedshield_source": source,
               "wall_s": wall, "rows": rows, "steps": steps}
        for r in doc["rows"]:
            r["bytes_up_per_value"] = r["bytes_up"] / n_values
            r["bytes_down_per_value"] = r["bytes_down"] / n_values
            r["encrypt_us_per_value"] = r["encrypt_s"] / n_values * 1e6
        args.json.write_text(json.dumps(doc, indent=1))
    failed = [r["row"] for r in rows if not r["max_abs_err"] <= TOL]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
