#!/usr/bin/env bash
# The speed comparison of bench/RESULTS.md's 2026-12-01 section, in three back-to-back calls to one warm GPU
# machine (a machine idle for ~30 s is given back, and a new one is bare), each carrying its part of the packages
# (bench/speed_inputs.sh, bench/unsloth_inputs.sh: fetched here first) and writing to $OUT:
#   1. carry .whl-speed .whl-fa4/part1            bash bench/sessions/2026-12-01-speed-peers.sh 1
#      packages; the 7B and the workload; TRL's defaults, tuned TRL and the LoRA recipe without FlashAttention-4
#   2. carry .whl-fa4/part2 .whl-unsloth/part1    bash bench/sessions/2026-12-01-speed-peers.sh 2
#      FA4 on the path: tuned TRL with FA4, the LoRA and FP8 recipes; the LoRA micro-batch with and without
#      shared-input groups, and FP8's with fast accumulation in its input-gradient GEMM (bench/step_breakdown.py)
#   3. carry .whl-unsloth/part2                   bash bench/sessions/2026-12-01-speed-peers.sh 3
#      Unsloth; where whole LoRA steps leave the GPU idle (bench/step_gaps.py)
# Then, after the changes those called for (no per-micro-batch loss test, the NaN guard read a step late, fast
# accumulation in FP8's input-gradient GEMM), on a second machine:
#   4. carry .whl-speed .whl-fa4/part1            bash bench/sessions/2026-12-01-speed-peers.sh 4
#      packages, the 7B; FP8 vs bf16 per-step losses over 50 steps (bench/fp8_numerics.py)
#   5. carry .whl-fa4/part2                       bash bench/sessions/2026-12-01-speed-peers.sh 5
#      tuned TRL without FA4 on the path; with it, the LoRA recipe with and without transformers' per-micro-batch
#      loss test, the FP8 recipe; the whole-step gaps again
set -uo pipefail
out=${OUT:-/tmp/out}; work=/tmp/smoke; mkdir -p "$out"
speed() {
  python bench/speed.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" --steps 10 --rows 6000 \
    --baseline_steps 20 --timeout 170 --work /tmp/speed "$@"
}
keep_logs() { cp /tmp/speed/*.log "$out/" 2>/dev/null; nvidia-smi --query-gpu=name,memory.used --format=csv > "$out/gpu.txt"; }
case "$1" in
1)
  bash bench/speed_inputs.sh install .whl-speed && bash bench/speed_inputs.sh fa4 .whl-fa4/part1
  export PYTHONPATH=$(bash bench/speed_inputs.sh noenv)
  WORK=$work bash bench/inputs.sh
  speed --configs trl-defaults trl-tuned lora-recipe --out "$out/call1-speed-no-fa4.md"
  keep_logs ;;
2)
  bash bench/speed_inputs.sh fa4 .whl-fa4/part2
  mkdir -p /tmp/unsloth-site && xz -d < .whl-unsloth/part1/unsloth-site.tar.xz | tar -C /tmp/unsloth-site -xf -
  export PYTHONPATH=$(bash bench/speed_inputs.sh env)
  speed --configs trl-tuned-fa4 lora-recipe lora-fp8-recipe --out "$out/call2-speed-fa4.md"
  python bench/step_breakdown.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" \
    --config recipes/mistral-7b-lora.yaml --variants recipe unshared no-adapters --out "$out/call2-breakdown-lora.json" \
    2>&1 | grep -vE "Warning|warn\(|it/s\]"
  python bench/step_breakdown.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" \
    --config recipes/mistral-7b-lora-fp8.yaml --variants recipe fast-input-grad --out "$out/call2-breakdown-fp8.json" \
    2>&1 | grep -vE "Warning|warn\(|it/s\]"
  keep_logs ;;
3)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/unsloth-site .whl-unsloth/part2/*.whl
  export PYTHONPATH=$(bash bench/speed_inputs.sh env)
  speed --configs unsloth --timeout 240 --out "$out/call3-speed-unsloth.md"
  python bench/step_gaps.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" --config recipes/mistral-7b-lora.yaml \
    --out "$out/call3-step-gaps-lora.json" 2>&1 | grep -vE "Warning|warn\(|it/s\]" | tail -25
  keep_logs ;;
4)
  bash bench/speed_inputs.sh install .whl-speed && bash bench/speed_inputs.sh fa4 .whl-fa4/part1
  export PYTHONPATH=$(bash bench/speed_inputs.sh noenv)
  WORK=$work bash bench/inputs.sh
  python bench/fp8_numerics.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" --parts losses \
    --out "$out/call4-fp8-numerics-losses.json" 2>&1 | grep -vE "Warning|warn\(|it/s\]" | tail -8 ;;
5)
  bash bench/speed_inputs.sh fa4 .whl-fa4/part2
  PYTHONPATH=$(bash bench/speed_inputs.sh noenv) speed --configs trl-tuned --out "$out/call5-speed-no-fa4.md"
  export PYTHONPATH=$(bash bench/speed_inputs.sh env)
  speed --configs lora-recipe lora-nan-filter lora-fp8-recipe --out "$out/call5-speed-fa4.md"
  python bench/step_gaps.py --model "$work/mistral-7b" --data "$work/alpaca.jsonl" --config recipes/mistral-7b-lora.yaml \
    --out "$out/call5-step-gaps-lora.json" 2>&1 | grep -vE "Warning|warn\(|it/s\]" | tail -25
  keep_logs ;;
esac
echo "call $1 done after ${SECONDS} s"
