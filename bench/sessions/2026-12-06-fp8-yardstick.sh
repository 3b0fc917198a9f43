#!/usr/bin/env bash
# The FP8 yardstick on the GPU machine, in one lease: one epoch of recipes/gemma-3-270m-alpaca.yaml on the real
# base in bf16 with seeds 42 and 43 (their difference is the spread) and in each FP8 variant of
# bench/fp8_yardstick.py with seed 42, all at once (a 270M model leaves most of an H100 idle); then, at once
# again, the adapters merged into the bf16 base and judged on the held-out prompts (two eval_compare.py calls, each
# judging half the runs beside one generation of the base), and every
# adapter's validation loss on the bf16 base; one table of differences in seed spreads ($W/out/fp8-yardstick.md
# and .json). Run from the repository root once bench/real_base_inputs.sh's calls 1-5 brought the inputs,
# detached, so that one call starts it and later calls read $W/status (about 10 minutes on an H100):
#   bash bench/real_base_inputs.sh check && setsid nohup bash bench/sessions/2026-12-06-fp8-yardstick.sh > /tmp/fy.log 2>&1 < /dev/null &
#   cat /tmp/fy/status                       # until "all done"; then: cp -r /tmp/fy/out $OUT/fy
# The 7B shape's tokens/s of the same variants (bench/speed.py), after bench/speed_inputs.sh's two calls put
# FlashAttention-4 on the machine (without them: carry .whl-speed, install it, use `noenv`):
#   WORK=/tmp/smoke bash bench/inputs.sh && PYTHONPATH=$(bash bench/speed_inputs.sh env) python bench/speed.py \
#     --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl --steps 10 --rows 6000 --timeout 170 \
#     --out $OUT/speed/speed.md --configs lora-recipe lora-fp8-recipe lora-fp8-down-bf16 lora-fp8-attention \
#     lora-fp8-bf16-input-grad
# and the table again with those rates, anywhere the two folders are:
#   python bench/fp8_yardstick.py table --results fy --speed speed --out fy/fp8-yardstick.md
# A rehearsal on a CPU with the tiny model (the bf16 runs only: FP8 trains on Hopper alone), ~10 minutes:
#   BASE=build/tiny-mistral RUNS="bf16-seed42 bf16-seed43" FLAGS="--max_steps 3 --bf16 false --use_cpu true \
#     --dtype float32 --validation_size 4 --max_length 512 --max_train_rows 300" MAX_NEW_TOKENS=16 \
#     W=/tmp/fy-rehearsal bash bench/sessions/2026-12-06-fp8-yardstick.sh
set -uo pipefail
W=${W:-/tmp/fy}; mkdir -p "$W/out" "$W/runs" "$W/cmp"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
repo=$W/repo; rm -rf "$repo"; mkdir -p "$repo"  # later calls re-send the tree: run from a copy of it
tar --exclude="./.whl*" --exclude="./.git" -cf - . | tar -C "$repo" -xf -; cd "$repo"
base=${BASE:-build/gemma-3-270m}
read -ra flags <<< "${FLAGS:-}"  # rehearsal only
[ "$base" = build/gemma-3-270m ] || flags+=(--model_name_or_path "$base")
runs=(${RUNS:-$(python bench/fp8_yardstick.py runs)})
prompts=(${PROMPTS:-data/heldout_alpaca.jsonl data/heldout_sql.jsonl data/eval_prompts.jsonl})
say() { echo "$(date +%T) +${SECONDS}s $*" | tee -a "$W/status"; }
run() {  # run NAME COMMAND...: its log in $W/NAME.log, one status line
  local name=$1 started=$SECONDS; shift
  "$@" > "$W/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - started)) s"
  [ $rc -eq 0 ] || grep -vE "Warning|warn\(|it/s\]|s/it\]" "$W/$name.log" | tail -15 >> "$W/status"
  return $rc
}
train() {  # train NAME: one epoch of the recipe with the run's own flags
  local name=$1
  read -ra own <<< "$(python bench/fp8_yardstick.py flags "$name")"
  run "train-$name" python train_sft.py --config recipes/gemma-3-270m-alpaca.yaml --output_dir "$W/runs/$name" \
    --overwrite_output_dir true "${own[@]}" "${flags[@]}"
  cp "$W/runs/$name/run_summary.json" "$W/out/summary-$name.json" 2>/dev/null
}
compare() {  # compare GROUP RUN...: the runs' adapters merged into the bf16 base, judged beside it on the held-out prompts
  local group=$1; shift
  [ $# -gt 0 ] || return 0
  run "eval-$group" python eval_compare.py --base "$base" --tuned "${@/#/$W/runs/}" --prompts "${prompts[@]}" \
    --output_dir "$W/cmp/$group" --max_new_tokens "${MAX_NEW_TOKENS:-512}" --batch_size 512
  cp "$W/cmp/$group/comparison.json" "$W/out/comparison-$group.json" 2>/dev/null
}

say "start on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo cpu): ${runs[*]}"
[ -f "$base/config.json" ] || run convert python tools/base_from_gguf.py "$base" || exit 1
for name in "${runs[@]}"; do train "$name" & done
wait
trained=(); for name in "${runs[@]}"; do [ -f "$W/runs/$name/adapter_model.safetensors" ] && trained+=("$name"); done
half=$(( (${#trained[@]} + 1) / 2 ))  # two evaluations at once, each generating the base once beside its runs
compare a "${trained[@]:0:$half}" &
compare b "${trained[@]:$half}" &
run validate python bench/fp8_yardstick.py validate --runs "${trained[@]/#/$W/runs/}" --flags "${flags[*]}" \
  --out "$W/out/validate.json" &
wait
run table python bench/fp8_yardstick.py table --results "$W/out" ${SPEED:+--speed "$SPEED"} --out "$W/out/fp8-yardstick.md" \
  && cat "$W/out/fp8-yardstick.md"
tar -C "$W" -czf "$W/out/logs.tar.gz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.pth" \
  --exclude="tokenizer.json" --exclude="checkpoint-*" --exclude="merged" status runs cmp $(cd "$W" && ls *.log)
say "all done"
