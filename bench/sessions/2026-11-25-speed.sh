#!/usr/bin/env bash
# The speed benchmark on the GPU machine, in one call: builds the random-weight Mistral-7B and the
# synthetic Alpaca workload, runs bench/speed.py (the shipped recipes through train_sft.py, and TRL's
# defaults) and then bench/step_breakdown.py (levers and a profile of one micro-batch).
#   bash bench/sessions/2026-11-25-speed.sh        (run from the repository root; writes to $OUT)
#   CONFIGS="lora-recipe lora-sdpa" BREAKDOWN=no bash bench/sessions/2026-11-25-speed.sh     (some of speed.py's configs only)
#   TIMEOUT=300 ...                                                          (seconds per run; default 150)
set -uo pipefail
out=${OUT:-/tmp/out}; work=/tmp/smoke; mkdir -p "$out" "$work"
WORK=$work bash bench/inputs.sh
python bench/speed.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" --steps 10 --rows 6000 \
  --baseline_steps 20 --timeout ${TIMEOUT:-150} --work /tmp/speed --out "$out/speed.md" ${CONFIGS:+--configs $CONFIGS}
for log in /tmp/speed/*.log; do grep -qiE "error|traceback" "$log" && { echo "== $log"; tail -6 "$log"; }; done
echo "speed.py done after ${SECONDS} s"
[ "${BREAKDOWN:-yes}" = no ] && exit 0
python bench/step_breakdown.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" \
  --config recipes/mistral-7b-lora.yaml --out "$out/breakdown.json" 2>&1 | grep -vE "Warning|warn\(|it/s\]"
echo "all done after ${SECONDS} s"
