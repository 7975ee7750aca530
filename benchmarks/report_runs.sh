#!/usr/bin/env bash
# The README's side-by-side comparison: the embedded demo set-up (tiny Llama built from a
# config, generated instruction data, 3 clients, 4 rounds) under each algorithm and baseline,
# then `fedshield report`. Usage: bash benchmarks/report_runs.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/compare}
FS=${FEDSHIELD:-.venv/bin/fedshield}
run() { local name=$1; shift; "$FS" run --no-progress --out "$OUT/$name" "$@"; }
run fedshield-delta                       # HE, shared key, local L1 pruning (the default)
run fedshield-threshold --keys threshold  # HE, 3-of-3 threshold keys
run fedshield-ffa --algorithm ffa         # HE, FFA-LoRA (A frozen, B sent)
run paper --algorithm paper               # the reference code's semantics, with HE
run fedavg-plaintext --no-he              # plaintext FedAvg baseline
run dp-lora --no-he --dp-clip 1.0 --dp-noise 0.5   # DP-LoRA baseline
"$FS" report "$OUT"/fedshield-delta "$OUT"/fedshield-threshold "$OUT"/fedshield-ffa \
  "$OUT"/paper "$OUT"/fedavg-plaintext "$OUT"/dp-lora --out "$OUT/report"
