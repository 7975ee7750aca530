"""Fuzz targets: every parser that takes bytes from outside, fed mutated valid messages.

Each target accepts nothing but fs.FedShieldError subclasses (or a result that matches the
unmutated input's), never a crash. Case counts are small in `make test`;
FEDSHIELD_FUZZ_EXAMPLES=N runs every hypothesis target N times (README, "Fuzzing and
sanitizers"); `make asan-test` runs them under AddressSanitizer/UBSan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# -- partial decryptions: the exact failure of issue 15 (a crash inside OpenFHE) ---------------

SHARE_FUZZ_CHILD = textwrap.dedent("""
    import json, random, sys
    import numpy as np
    import fedshield as fs
    from fedshield.he.frames import unframe
    from fedshield.he.partial import PARTIAL_MAGIC
    from conftest import make_state, weighted_average
    from forgery import mutate, random_mutations, reseal_sha256

    cases, out = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(15)
    stats = {"cases": 0, "rejected": {}, "same": 0, "wrong": [], "other": [],
             "residue_edits": 0, "residue_edits_rejected": 0}
    for params, n_cases in ((fs.CKKSParams(), cases - cases // 3),
                            (fs.CKKSParams(flood_bits=30), cases // 3)):
        parties, server = fs.keygen_threshold(params, 3)
        states = [make_state(150 + i) for i in range(3)]
        layout = fs.Layout.from_state_dict(states[0])
        weights = [fs.DEFAULT_WEIGHT_BOUND / 3] * 3
        agg = fs.aggregate(server, [fs.encrypt_update(p, s, layout, weight=w)
                                    for p, s, w in zip(parties, states, weights)])
        ref = weighted_average(states, weights)
        shares = [fs.partial_decrypt(p, agg) for p in parties]
        sections = [unframe(s, PARTIAL_MAGIC, "share", fs.InvalidUpdate)[1] for s in shares]
        combiner = parties[0]
        for case in range(n_cases):
            k = rng.randrange(3)
            # two in three keep the size: one to four changed bytes, as in the crashes; half
            # of the edits in the first 3000 bytes, where OpenFHE's own header used to travel
            # (there the old format crashed the fusing process)
            ops = random_mutations(rng, in_place=case % 3 != 0)
            bad = reseal_sha256(mutate(shares[k], ops, head=3000))
            if bad == shares[k]:
                continue
            try:
                touched = unframe(bad, PARTIAL_MAGIC, "share", fs.InvalidUpdate)[1] != sections[k]
            except fs.InvalidUpdate:
                touched = False
            stats["cases"] += 1
            stats["residue_edits"] += touched
            given = list(shares)
            given[k] = bad
            try:
                got = fs.combine_partials(agg, given, layout, ctx=combiner)
            except fs.FedShieldError as exc:
                name = type(exc).__name__
                stats["rejected"][name] = stats["rejected"].get(name, 0) + 1
                stats["residue_edits_rejected"] += touched
                continue
            except BaseException as exc:  # anything but a FedShieldError is a failure
                stats["other"].append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            err = max(float(np.abs(got[n].double().numpy() - r).max()) for n, r in ref.items())
            if err <= 2e-6:
                stats["same"] += 1
            else:
                stats["wrong"].append({"share": k, "error": err, "residues": touched})
    json.dump(stats, open(out, "w"))
    print("CHILD-OK")
""")


def test_tampered_partial_decryptions_never_crash_the_key_holder(tmp_path):
    """Issue 15, item 1: one changed byte in a share's OpenFHE part crashed the fusing process
    (SIGSEGV in PrecomputeCRTTables, heap corruption, std::terminate), 7 times in 1,286. Now
    hundreds of random edits, the frame digest recomputed as any relay can, run in a child
    process: it must exit normally; every share is rejected with a FedShieldError or fuses
    to the right average, and no edit of the residues ever passes."""
    out = tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", SHARE_FUZZ_CHILD, "450", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, (
        f"the fusing process died (exit {proc.returncode}): {proc.stderr[-3000:]}")
    stats = json.loads(out.read_text())
    print("share fuzz:", stats)
    assert stats["cases"] >= 400
    assert stats["other"] == [], stats["other"][:5]
    assert stats["wrong"] == [], stats["wrong"][:5]
    # the edits reached the residues (past framing, into OpenFHE's fusion) and all failed there
    assert stats["residue_edits"] >= 100
    assert stats["residue_edits_rejected"] == stats["residue_edits"]
