#!/usr/bin/env bash
# On the GPU machine: train the two shipped recipes as they are for a few optimizer steps on random
# Mistral-7B weights, then run eval_compare.py on each adapter (merge, compare, report timing).
#   bash bench/sessions/2026-11-25-recipes-eval.sh train     # builds /tmp/dev/{mistral-7b,alpaca.jsonl} if absent, trains
#   bash bench/sessions/2026-11-25-recipes-eval.sh eval      # needs the adapters from "train"; writes to $OUT
set -uo pipefail
out=${OUT:-/tmp/out}; work=/tmp/dev; mkdir -p "$out" "$work"
case "$1" in
train)
  WORK=$work bash bench/inputs.sh
  for recipe in lora:4 qlora:3; do
    name=${recipe%%:*}; steps=${recipe##*:}
    /usr/bin/time -f "$name: %e s wall" python train_sft.py --config "recipes/mistral-7b-$name.yaml" \
      --model_name_or_path "$work/mistral-7b" --dataset_name "$work/alpaca.jsonl" --output_dir "$work/$name" \
      --overwrite_output_dir true --max_steps "$steps" --logging_steps 1 > "$work/$name.log" 2>&1 \
      || { echo "$name failed"; tail -20 "$work/$name.log"; }
    grep -E "^step|wall" "$work/$name.log" | tail -3
    cp "$work/$name/run_summary.json" "$out/train-$name.json"
  done ;;
eval)
  for name in lora qlora; do
    /usr/bin/time -f "eval $name: %e s wall" python eval_compare.py --base "$work/mistral-7b" --tuned "$work/$name" \
      --output_dir "$work/cmp-$name" --max_new_tokens 128 --batch_size 8 > "$work/eval-$name.log" 2>&1 \
      || { echo "eval $name failed"; tail -20 "$work/eval-$name.log"; }
    grep -E "merged into|QLoRA:|stop by EOS|mean new tokens|seconds per|wall" "$work/eval-$name.log"
    ls -la "$work/cmp-$name/merged" | grep safetensors
    cp "$work/cmp-$name/comparison.json" "$out/eval-$name.json"
  done ;;
esac
