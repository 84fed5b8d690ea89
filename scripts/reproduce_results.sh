#!/usr/bin/env bash
# Regenerates docs/results/: the demo policy's sweeps behind the README's evaluation tables, on the
# test split (Persuasion blocks after the 64 validation blocks), then writes the README's result
# blocks (between the matching <!-- results:NAME --> markers).
#   scripts/reproduce_results.sh            # trains runs/demo first if needed (about 13 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=${RUN:-runs/demo}
"$BIN/soljax" setup >/dev/null
"$BIN/soljax" train --config configs/demo.yaml --resume --out "$RUN"
cp "$RUN/metrics.jsonl" docs/results/demo_metrics.jsonl
cp "$RUN/training.png" docs/results/demo_training.png
"$BIN/soljax" eval ppl --run "$RUN" --split test --blocks 64 --trials 30 --out docs/results/demo_test
"$BIN/soljax" eval ppl --run "$RUN" --split test --blocks 64 --trials 30 --guard --out docs/results/demo_test_guard
"$BIN/python" scripts/results_tables.py --write
