"""benchmarks/compare.py, benchmarks/flowertune_budget.py and benchmarks/fft.py run end to end
(CI-sized)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
import flowertune_budget  # noqa: E402


def test_mistral_lora_value_count():
    # 32 layers x (q: A 32x4096 + B 4096x32, v: A 32x4096 + B 1024x32)
    assert flowertune_budget.lora_values() == 32 * (2 * 32 * 4096 + 32 * 4096 + 1024 * 32)
    assert sum(a * b for _, (a, b) in compare.state_shapes("mistral7b")) == \
        flowertune_budget.lora_values()


def test_budget_arithmetic():
    rows = [{"row": "x", "bytes_up_per_value": 10.0, "bytes_down_per_value": 5.0}]
    table = flowertune_budget.budget_rows(rows)
    plain, x = table
    n = flowertune_budget.lora_values()
    # finance samples 5 clients a round: 200 rounds x 5 x (4 + 4) bytes x n
    assert plain["mb"]["finance"] == 200 * 5 * 8 * n / 1e6
    assert x["mb"]["general NLP"] == 200 * 2 * 15 * n / 1e6
    assert x["rounds_in_budget"]["finance"] == int(200_000 // (5 * 15 * n / 1e6))


def test_compare_and_budget_scripts(tmp_path):
    out = tmp_path / "compare.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--state",
                        "small", "--no-peers", "--repeat", "1", "--quiet", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr  # rc 1: a row missed 1e-6
    doc = json.loads(out.read_text())
    rows = {row["row"]: row for row in doc["rows"]}
    dense = rows["fedshield dense"]
    v2 = rows["fedshield v2 parameters (N=16384, 60-bit, c0+c1), dense"]
    assert dense["params"]["seeded"] and not v2["params"]["seeded"]
    assert dense["bytes_up_per_value"] < v2["bytes_up_per_value"] / 3
    assert rows["fedshield FFA (B only)"]["kept_fraction"] == 0.5
    assert all(row["max_abs_err"] <= 1e-6 for row in doc["rows"])
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flowertune_budget.py"),
                        str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| fedshield dense |" in r.stdout and "plaintext fp32" in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flowertune_budget.py"),
                          str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_fft_script_times_both_paths():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fft.py"), "--n", "16", "64",
                        "--rounds", "1", "--calls", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("N = ")[1:]
    assert [b.split()[0] for b in blocks] == ["16", "64"]
    assert "avx2" not in blocks[0]  # 8 slots: the plain loops only
    assert all("scalar  forward" in b for b in blocks)
