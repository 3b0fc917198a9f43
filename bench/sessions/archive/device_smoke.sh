#!/usr/bin/env bash
# Start the Mistral-7B recipes on the GPU machine, with random weights of the full Mistral-7B-v0.1
# shape (the Hub is out of reach) and the synthetic Alpaca workload, for a few steps each.
#   bash bench/device_smoke.sh [steps]        (run from the repository root; writes to $OUT)
# The model is built in /tmp/smoke/mistral-7b unless already there (building needs mistral-common,
# which on an image without pydantic must be off the path when transformers 5.17 loads tokenizers).
set -uo pipefail
steps=${1:-20}
out=${OUT:-/tmp/out}; work=/tmp/smoke; mkdir -p "$out" "$work"
[ -d "$work/mistral-7b" ] || python -m alpaca_sft.random_model "$work/mistral-7b" --size 7b > /dev/null
python bench/workload.py "$work/alpaca.jsonl" --model "$work/mistral-7b" > /dev/null
run() {  # name, recipe, extra flags...
  local name=$1 recipe=$2; shift 2
  timeout 300 python train_sft.py --config "$recipe" --model_name_or_path "$work/mistral-7b" \
    --dataset_name "$work/alpaca.jsonl" --output_dir "$work/$name" --max_steps "$steps" --logging_steps 5 \
    --save_strategy no "$@" > "$work/$name.log" 2>&1 || { echo "$name failed:"; tail -25 "$work/$name.log"; }
  grep -E "^step" "$work/$name.log" | tail -2
  cp "$work/$name/run_summary.json" "$out/$name.json" 2>/dev/null
}
run lora-unpacked recipes/mistral-7b-lora.yaml --packing false --attn_implementation sdpa
run lora-packed recipes/mistral-7b-lora.yaml --packing true --attn_implementation auto --per_device_train_batch_size 4
run qlora-packed recipes/mistral-7b-qlora.yaml --packing true --attn_implementation auto --per_device_train_batch_size 4
python bench/summarize.py "$out"/*.json
python bench/check_packing.py 2>&1 | grep -v Warning | tail -5
