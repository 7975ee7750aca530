"""`fedshield bench` runs end to end and reports consistent figures."""

import json
import math

import fedshield as fs
from fedshield.cli.commands import main as cli_main
from fedshield.run.bench import FLOOD_BITS, THRESHOLD_PARTIES


def test_bench_writes_headline_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--values", "65536", "--clients", "2", "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for row in ("bytes/value, dense", "bytes/value, 50% mask", "bytes/value, FFA (B only)",
                "bytes/value, threshold", "bytes/value, threshold flooded", "aggregate MB/s"):
        assert row in printed
    assert f["lora_values"] == 65536 and f["clients"] == 2
    # Seeded (wire v3): only c0 travels, log_q bits per coefficient, N reals per ciphertext;
    # 65536 values + the weight fill ceil(65537 / N) ciphertexts.
    n_cts = math.ceil(65537 / f["ring_dim"])
    c0_only = n_cts * f["ring_dim"] * f["modulus_bits"] / 8 / 65536
    assert c0_only <= f["bytes_per_value_dense"] <= c0_only * 1.01
    # A full OpenFHE ciphertext carries both polynomials plus its headers.
    assert f["openfhe_fresh_bytes_per_value"] > 2 * c0_only
    assert f["bytes_per_value_mask50"] < f["bytes_per_value_dense"] * 0.6
    assert f["bytes_per_value_ffa"] < f["bytes_per_value_dense"] * 0.6
    # Threshold mode keeps both polynomials; flooding adds towers.
    th, fl = f["threshold"], f["threshold_flooded"]
    assert th["bytes_per_value"] >= 2 * th["modulus_bits"] / 8
    assert fl["modulus_bits"] > th["modulus_bits"]
    assert fl["bytes_per_value"] > th["bytes_per_value"]
    # the flooded row measures the LMSS22-sized run profile (max_weight=0) for the bench's
    # parties: two polynomials of N residues per ciphertext, each residue at most its
    # prime's width (bits + 1) and the towers' product at least 2**log_q_min
    flooded = fs.CKKSParams(flood_bits=FLOOD_BITS, max_weight=0).for_keys("threshold",
                                                                         THRESHOLD_PARTIES)
    assert (fl["ring_dim"], fl["modulus_bits"]) == (flooded.ring_dim, flooded.log_q)
    per_bit = math.ceil(65537 / flooded.ring_dim) * flooded.ring_dim * 2 / 8 / 65536
    assert flooded.log_q_min * per_bit <= fl["bytes_per_value"]
    assert fl["bytes_per_value"] <= (flooded.log_q + flooded.n_towers) * per_bit * 1.01
    # Unequal weights (5 and 1, far below any fixed bound) stay within 1e-6 on every row.
    for err in (f["max_abs_err_dense"], f["max_abs_err_mask50"], f["max_abs_err_ffa"],
                th["max_abs_err"], fl["max_abs_err"]):
        assert 0 <= err <= 1e-6
    for key in ("encrypt_us_per_value", "raw_openfhe_encrypt_us_per_value",
                "aggregate_speedup_vs_openfhe", "decrypt_us_per_value"):
        assert f[key] > 0
    # every per-round step against OpenFHE's own call, measured in this run (no typed figures)
    for key in ("encrypt", "decrypt", "threshold_encrypt", "partial", "combine"):
        row = f["steps"][key]
        assert row["fedshield_us_per_value"] > 0 and row["openfhe_1thread_us_per_value"] > 0
        assert math.isclose(row["ratio"], row["fedshield_us_per_value"]
                            / row["openfhe_1thread_us_per_value"])
        assert math.isclose(row["cpu_ratio"], row["fedshield_1thread_cpu_us_per_value"]
                            / row["openfhe_cpu_us_per_value"])
    assert f["steps"]["mistral7b_round_s"]["shared"] > 0
    assert "| shared-key decrypt |" in printed and "Mistral-7B per round" in printed
