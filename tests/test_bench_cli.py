"""`fedshield bench` runs end to end and reports consistent figures."""

import json

from fedshield.cli import main as cli_main


def test_bench_writes_headline_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--values", "65536", "--clients", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "bytes/value, dense" in printed and "aggregate MB/s" in printed
    assert figures["lora_values"] == 65536 and figures["clients"] == 2
    # 65536 values + the weight need 5 ciphertexts of 16384 reals, ~245.8 KB each.
    assert 15.0 * 5 / 4 <= figures["bytes_per_value_dense"] <= 15.1 * 5 / 4
    assert figures["bytes_per_value_mask50"] < figures["bytes_per_value_dense"] * 0.7
    for key in ("encrypt_us_per_value", "raw_openfhe_encrypt_us_per_value",
                "aggregate_speedup_vs_openfhe", "decrypt_us_per_value"):
        assert figures[key] > 0
