#!/usr/bin/env bash
# Multi-GPU runs on the GPU machine, as a user launches them, on the random-weight Mistral-7B and the
# synthetic workload of bench/workload.py. Every run is train_sft.py with a shipped recipe and a shipped
# accelerate config; its run_summary.json and trainer_state.json go to $OUT/multi_gpu/<run>/, and
# bench/multi_gpu_report.py turns them into the tables of bench/RESULTS.md.
#   bash bench/sessions/2026-11-25-multi-gpu.sh scaling fsdp-lora fsdp-qlora checkpointing epoch   (any of the phases)
# scaling:    one GPU vs DDP on all GPUs, LoRA and QLoRA recipes (RECIPES="lora lora-fp8" for others), at the same global batch
# fsdp-lora:  FSDP with the LoRA recipe: train, save, resume, merge with eval_compare.py
# fsdp-qlora: FSDP+QLoRA (4-bit weights stored as bf16), the same
# checkpointing: DDP vs FSDP with gradient checkpointing (LoRA recipe), the small-card setting
# epoch:      one full epoch of the LoRA recipe under DDP, wall time included
set -uo pipefail
work=/tmp/mg; out=$work/results/multi_gpu; mkdir -p "$out" "${OUT:-/tmp/out}"
gpus=$(nvidia-smi -L | wc -l)
model=$work/mistral-7b; data=$work/alpaca.jsonl
# Short runs: 12 optimizer steps on the first 6,000 records, a logged window every 2 steps.
short=(--model_name_or_path "$model" --dataset_name "$data" --max_train_rows 6000 --max_steps 12 --logging_steps 2
       --overwrite_output_dir true)
# The same global batch on one GPU and on all of them: one GPU accumulates what the others add.
one_gpu=(--gradient_accumulation_steps "$gpus")
all_gpus=(--gradient_accumulation_steps 1)

WORK=$work bash bench/inputs.sh
echo "$gpus GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

run() {  # run NAME COMMAND...: keeps the log, the run record and the log history of <work>/NAME
  local name=$1 started=$SECONDS; shift
  "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - started)) s wall"
  [ $rc -eq 0 ] || grep -vE "Warning|warn\(|it/s\]|s/it\]" "$work/$name.log" | tail -12
  mkdir -p "$out/$name"
  cp "$work/$name"/{run_summary.json,trainer_state.json,train_config.yaml} "$out/$name/" 2>/dev/null
  echo "$((SECONDS - started))" > "$out/$name/wall_s"
  return $rc
}
launch() {  # launch CONFIG ARGS...: accelerate launch of train_sft.py on every GPU
  local config=$1; shift
  accelerate launch --config_file "accelerate_configs/$config" --num_processes "$gpus" ${LAUNCH_FLAGS:-} train_sft.py "$@"
}
single() { CUDA_VISIBLE_DEVICES=0 python train_sft.py "$@"; }

fsdp() {  # fsdp NAME CONFIG RECIPE FLAGS...: 12 steps with a checkpoint at step 6, the same run resumed from
          # that checkpoint, then eval_compare.py merging what FSDP saved into a bf16 load of the base
  local name=$1 config=$2 recipe=$3; shift 3
  run "$name" launch "$config" --config "$recipe" "${short[@]}" "${all_gpus[@]}" --output_dir "$work/$name" \
    --save_strategy steps --save_steps 6 "$@"
  ls "$work/$name" "$work/$name/checkpoint-6" > "$out/$name/files.txt" 2>&1
  [ -d "$work/$name/checkpoint-6" ] && run "$name-resumed" launch "$config" --config "$recipe" "${short[@]}" \
    "${all_gpus[@]}" --output_dir "$work/$name-resumed" --resume_from_checkpoint "$work/$name/checkpoint-6" "$@"
  evaluate "$name"
}
evaluate() {  # evaluate NAME: eval_compare.py on the adapter of run NAME, on one GPU
  local name=$1
  [ -f "$work/$name/adapter_model.safetensors" ] || { echo "$name: no adapter to evaluate"; return; }
  ls "$work/$name" > "$out/$name/files.txt" 2>&1
  run "eval-$name" env CUDA_VISIBLE_DEVICES=0 python eval_compare.py --base "$model" --tuned "$work/$name" \
    --output_dir "$work/eval-$name" --max_new_tokens 32
  cp "$work/eval-$name/comparison.json" "$out/eval-$name/" 2>/dev/null
  grep -E "merged into|QLoRA:|FP8 base|stop by EOS" "$work/eval-$name.log"
}

for phase in "$@"; do
  case "$phase" in
  scaling)
    for recipe in ${RECIPES:-lora qlora}; do
      run "$recipe-1gpu" single --config "recipes/mistral-7b-$recipe.yaml" "${short[@]}" "${one_gpu[@]}" \
        --output_dir "$work/$recipe-1gpu" --save_strategy no
      run "$recipe-ddp" launch multi_gpu.yaml --config "recipes/mistral-7b-$recipe.yaml" "${short[@]}" "${all_gpus[@]}" \
        --output_dir "$work/$recipe-ddp" --save_strategy no
    done ;;
  fsdp-lora) fsdp fsdp-lora fsdp.yaml recipes/mistral-7b-lora.yaml ;;
  checkpointing)  # the setting for smaller cards: where sharding the base is worth its gathers
    for kind in ddp:multi_gpu fsdp:fsdp; do
      run "lora-${kind%%:*}-ckpt" launch "${kind##*:}.yaml" --config recipes/mistral-7b-lora.yaml "${short[@]}" \
        "${all_gpus[@]}" --output_dir "$work/lora-${kind%%:*}-ckpt" --save_strategy no --gradient_checkpointing true
    done ;;
  fsdp-qlora)
    fsdp fsdp-qlora fsdp_qlora.yaml recipes/mistral-7b-qlora.yaml --bnb_4bit_quant_storage bfloat16
    # FSDP2 and bitsandbytes' 4-bit parameters are a young pairing; if it fails, FSDP1, the documented route
    [ -f "$work/fsdp-qlora/adapter_model.safetensors" ] || LAUNCH_FLAGS="--fsdp_version 1 --fsdp_use_orig_params true" \
      fsdp fsdp1-qlora fsdp_qlora.yaml recipes/mistral-7b-qlora.yaml --bnb_4bit_quant_storage bfloat16 ;;
  epoch)
    run lora-ddp-epoch launch multi_gpu.yaml --config recipes/mistral-7b-lora.yaml --model_name_or_path "$model" \
      --dataset_name "$data" --output_dir "$work/lora-ddp-epoch" --overwrite_output_dir true ;;
  eval-*) evaluate "${phase#eval-}" ;;
  *) echo "unknown phase $phase: use scaling, fsdp-lora, fsdp-qlora, checkpointing, epoch, eval-<run>" >&2; exit 2 ;;
  esac
done
for dir in "$work"/*/; do  # runs of earlier calls on this machine, kept in their output folders
  name=$(basename "$dir"); [ -f "$dir/run_summary.json" ] && [ ! -d "$out/$name" ] || continue
  mkdir -p "$out/$name"; cp "$dir"/{run_summary.json,trainer_state.json,train_config.yaml} "$out/$name/" 2>/dev/null
done
python bench/multi_gpu_report.py "$out" --gpus "$gpus" | tee "$out/report.md"
tar -czf "${OUT:-/tmp/out}/multi_gpu.tgz" -C "$work/results" multi_gpu  # every run so far, as one file
