#!/usr/bin/env bash
# Speed levers on the LoRA recipe, one at a time, same random 7B and workload as device_smoke.sh
#   bash bench/levers.sh [steps] [set]       (builds /tmp/smoke/{mistral-7b,alpaca.jsonl} if absent)
set -uo pipefail
steps=${1:-30}; set=${2:-first}
out=${OUT:-/tmp/out}; work=/tmp/smoke; mkdir -p "$out" "$work"
[ -d "$work/mistral-7b" ] || python -m alpaca_sft.random_model "$work/mistral-7b" --size 7b > /dev/null
[ -f "$work/alpaca.jsonl" ] || python bench/workload.py "$work/alpaca.jsonl" --model "$work/mistral-7b" > /dev/null
run() {  # name, extra flags...
  local name=$1; shift
  timeout 400 python train_sft.py --config recipes/mistral-7b-lora.yaml --model_name_or_path "$work/mistral-7b" \
    --dataset_name "$work/alpaca.jsonl" --output_dir "$work/$name" --overwrite_output_dir true \
    --max_steps "$steps" --logging_steps 5 --save_strategy no --packing true --attn_implementation auto "$@" \
    > "$work/$name.log" 2>&1 || { echo "$name failed:"; tail -8 "$work/$name.log"; }
  cp "$work/$name/run_summary.json" "$out/$name.json" 2>/dev/null
}
if [ "$set" = first ]; then
  run ckpt-b4 --per_device_train_batch_size 4
  run ckpt-liger-b4 --per_device_train_batch_size 4 --use_liger_kernel true
  run nockpt-b2 --per_device_train_batch_size 2 --gradient_checkpointing false
  run nockpt-liger-b2 --per_device_train_batch_size 2 --gradient_checkpointing false --use_liger_kernel true
elif [ "$set" = third ]; then  # bigger micro-batches, dropout off
  run nockpt-liger-b4-drop0 --per_device_train_batch_size 4 --gradient_checkpointing false --use_liger_kernel true --lora_dropout 0
  run nockpt-liger-b5-drop0 --per_device_train_batch_size 5 --gradient_checkpointing false --use_liger_kernel true --lora_dropout 0
else  # second set: LoRA dropout off (no dropped copy of every adapted input), bigger micro-batch
  run nockpt-liger-b2-again --per_device_train_batch_size 2 --gradient_checkpointing false --use_liger_kernel true
  run nockpt-liger-b2-drop0 --per_device_train_batch_size 2 --gradient_checkpointing false --use_liger_kernel true --lora_dropout 0
  run nockpt-liger-b3-drop0 --per_device_train_batch_size 3 --gradient_checkpointing false --use_liger_kernel true --lora_dropout 0
fi
python bench/summarize.py "$out"/*.json
