#!/usr/bin/env bash
# The real base on the GPU machine, in one lease: google/gemma-3-270m from its PyPI GGUF, trained on the real
# Alpaca records (and text-to-SQL rows) and judged on the held-out rows of data/. Run from the repository root
# once the wheels and data are in place (bench/real_base_inputs.sh); it runs detached (setsid), so that one call
# starts it and later calls read $W/status:
#   setsid nohup bash bench/sessions/2026-12-01-real-base.sh > /tmp/rb.log 2>&1 < /dev/null &
# Stages, in order; the runs of a stage share the GPU (a 270M model leaves most of an H200 idle):
#   convert   tools/base_from_gguf.py: build/gemma-3-270m
#   packing   the base's validation loss and stop metric, packed rows vs one example per row
#   train     one epoch of recipes/gemma-3-270m-alpaca.yaml on a bf16 base, on an FP8 base, on an NF4 base, and at
#             learning rate 5e-4; two epochs of recipes/gemma-3-270m-alpaca-sql.yaml (text-to-SQL mixed in);
#             the first-step LoRA gradients of each base against fp32 (bench/fp8_numerics.py)
#   eval      eval_compare.py, base beside tuned, on the held-out prompts, for every run
#   losses    per-step losses of the FP8 and NF4 runs against the bf16 run
#   generation  generation speed on the held-out prompts (bench/generation_speed.py; the section's table set it beside
#             eval_compare.py's generation before then, which is gone)
# A rehearsal on a CPU with the tiny model (every stage but FP8, which needs Hopper), minutes instead of a lease:
#   BASE=build/tiny-mistral RUNS="bf16 nf4 lr5e-4 sql" FLAGS="--max_steps 3 --bf16 false --use_cpu true --dtype float32 \
#     --validation_size 4 --max_length 512" MAX_NEW_TOKENS=16 W=/tmp/rehearsal bash bench/sessions/2026-12-01-real-base.sh
set -uo pipefail
W=${W:-/tmp/rb}; mkdir -p "$W/out" "$W/runs" "$W/cmp"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
repo=$W/repo; rm -rf "$repo"; mkdir -p "$repo"  # later calls re-send the tree: run from a copy of it
tar --exclude="./.whl*" --exclude="./.git" -cf - . | tar -C "$repo" -xf -; cd "$repo"
base=${BASE:-build/gemma-3-270m}
read -ra flags <<< "${FLAGS:-}"  # rehearsal only
[ "$base" = build/gemma-3-270m ] || flags+=(--model_name_or_path "$base")
runs=(${RUNS:-bf16 fp8 nf4 lr5e-4 sql})
prompts=(data/heldout_alpaca.jsonl data/heldout_sql.jsonl data/eval_prompts.jsonl)
say() { echo "$(date +%T) +${SECONDS}s $*" | tee -a "$W/status"; }
run() {  # run NAME COMMAND...: its log in $W/NAME.log, one status line
  local name=$1 started=$SECONDS; shift
  "$@" > "$W/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - started)) s"
  [ $rc -eq 0 ] || grep -vE "Warning|warn\(|it/s\]|s/it\]" "$W/$name.log" | tail -15 >> "$W/status"
  return $rc
}
train() {  # train NAME RECIPE FLAGS...
  local name=$1 recipe=$2; shift 2
  run "train-$name" python train_sft.py --config "recipes/$recipe.yaml" --output_dir "$W/runs/$name" \
    --overwrite_output_dir true --logging_steps 1 "$@" "${flags[@]}"
  cp "$W/runs/$name/run_summary.json" "$W/out/summary-$name.json" 2>/dev/null
}
compare() {  # compare NAME: the run's adapter beside the base on the held-out prompts
  run "eval-$1" python eval_compare.py --base "$base" --tuned "$W/runs/$1" --prompts "${prompts[@]}" \
    --output_dir "$W/cmp/$1" --max_new_tokens "${MAX_NEW_TOKENS:-512}" --batch_size 512
  cp "$W/cmp/$1/comparison.json" "$W/out/comparison-$1.json" 2>/dev/null
}

say "start on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
[ -f "$base/config.json" ] || run convert python tools/base_from_gguf.py "$base" || exit 1
cp "$base/conversion.json" "$W/out/" 2>/dev/null
run packing python bench/real_base.py packing --flags "${flags[*]}" --out "$W/out/packing.json"

declare -A extra=([bf16]="" [fp8]="--fp8_base true" [nf4]="--load_in_4bit true" [lr5e-4]="--learning_rate 5e-4" [sql]="")
for name in "${runs[@]}"; do
  recipe=gemma-3-270m-alpaca; [ "$name" = sql ] && recipe=gemma-3-270m-alpaca-sql
  train "$name" "$recipe" ${extra[$name]} &
done
run first-step python bench/fp8_numerics.py --parts first_step --recipe recipes/gemma-3-270m-alpaca.yaml \
  --model "$base" --data build/real-data/alpaca_train.jsonl --rows 2000 --nf4 \
  --out "$W/out/first_step.json" &
wait
say "training done"

for name in "${runs[@]}"; do compare "$name" & done
wait
compared=(); for name in bf16 fp8 nf4; do [ -d "$W/runs/$name" ] && compared+=("$W/runs/$name"); done
run losses python bench/real_base.py losses --runs "${compared[@]}" --out "$W/out/losses.json"
run generation python bench/generation_speed.py --base "$base" --tuned "$W/runs/bf16" --prompts "${prompts[@]}" \
  --max_new_tokens "${MAX_NEW_TOKENS:-256}" --runs static:128 --out "$W/out/generation.json"
tar -C "$W" -czf "$W/out/logs.tar.gz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.pth" \
  --exclude="tokenizer.json" --exclude="checkpoint-*" --exclude="merged" status runs cmp $(cd "$W" && ls *.log)
say "all done"
