#!/usr/bin/env bash
# bench/RESULTS.md's "2026-12-06 (later session)" section, on one warm GPU in back-to-back calls (a machine idle
# for ~30 s is given back, and a new one is bare): the merged tree's GPU-only tests, and generation with a static
# cache and a compiled decoding step ("compiled") beside static batches, on the 7B shape and on the real base before
# and after tuning (the real base first: the device time left may end the 7B runs). The inputs are those of bench/sessions/2026-12-06.sh (its header says how each is fetched here)
# and the bf16 seed-42 adapter that session trained, in build/adapter-bf16-s42:
#   1. carry .whl-base build/carry build/adapter-bf16-s42 .whl-g/c0
#                                                     bash bench/sessions/2026-12-06-later.sh 1  (starts the work: tests first)
#   2-5. carry .whl-g/cN (N = 1..4)                   bash bench/sessions/2026-12-06-later.sh chunk N
#   then, until its status says "all done":           bash bench/sessions/2026-12-06-later.sh wait SECONDS
#   last:                                             bash bench/sessions/2026-12-06-later.sh collect
# Then, if device time is left on the same warm machine, the 7B training speed after the shared-input cache change
# (bench/speed.py, the bf16 and FP8 recipes), FlashAttention-4 in two halves; it starts once the generation is done:
#   carry .whl-fa4/part1                              bash bench/sessions/2026-12-06-later.sh fa4 1
#   carry .whl-fa4/part2                              bash bench/sessions/2026-12-06-later.sh fa4 2
#   then                                              bash bench/sessions/2026-12-06-later.sh wait SECONDS "speed done"
#                                                     bash bench/sessions/2026-12-06-later.sh collect
# transformers' continuous batching on the tuned real base instead (static beside it): call 1 as `1 continuous`, then
# the chunks, wait and collect as above.
# With little device time left, one call instead (carry .whl-base): the GPU-only tests, then the 7B shape's
# generation, 64 prompts, static beside compiled, everything written to $OUT as it goes:
#                                                     bash bench/sessions/2026-12-06-later.sh quick
set -uo pipefail
S=/tmp/s; out=${OUT:-/tmp/out}; mkdir -p "$S" "$out"
say() { echo "$(date +%T) $*" | tee -a "$S/status"; }
held_out=(data/heldout_alpaca.jsonl data/heldout_sql.jsonl data/eval_prompts.jsonl)
case "$1" in
1)
  nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv | tee "$S/gpu.txt"
  bash bench/speed_inputs.sh install .whl-base
  mkdir -p build && tar -xJf build/carry/real-data.tar.xz -C build
  repo=$S/repo; rm -rf "$repo"; mkdir -p "$repo"  # later calls re-send the tree: the work runs from a copy of it
  tar --exclude="./.whl*" --exclude="./.git" -cf - . | tar -C "$repo" -xf -
  mkdir -p "$S/gemma" && cp .whl-g/c0/* "$S/gemma/"
  (cd "$repo" && setsid nohup bash bench/sessions/2026-12-06-later.sh "work${2:+-$2}" > "$S/work.log" 2>&1 < /dev/null &)
  sleep 5; tail -3 "$S/status" ;;
quick)
  nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv | tee "$out/gpu.txt"
  bash bench/speed_inputs.sh install .whl-base
  (WORK=/tmp/smoke PYTHONPATH=/tmp/site:$PWD bash bench/inputs.sh > "$out/inputs.log" 2>&1) &
  PYTHONPATH=/tmp/site:/tmp/mc:$PWD python -m pytest -q -p no:cacheprovider tests/test_fp8_base.py \
    tests/test_fused_lora.py tests/test_generation.py 2>&1 | tail -6 | tee "$out/gpu-tests.txt"
  wait
  TORCH_LOGS=recompiles,perf_hints PYTHONPATH=/tmp/site:$PWD python bench/generation_speed.py \
    --base /tmp/smoke/mistral-7b --limit 64 --runs static:64 compiled:64 --out "$out/gen-7b.json" > "$out/gen-7b.log" 2>&1
  tail -8 "$out/gen-7b.log" ;;
chunk)
  cp .whl-g/c"$2"/* "$S/gemma/"
  if [ "$(ls "$S/gemma" | wc -l)" -eq 5 ]; then  # all in: unpacked, installed, converted (CPU) beside the GPU work
    # bench/sessions/2026-12-06.sh's convert stage: the same chunks, the same /tmp/s
    (cd "$S/repo" && setsid nohup bash bench/sessions/2026-12-06.sh convert > "$S/convert.log" 2>&1 < /dev/null &)
    sleep 2
  fi
  tail -3 "$S/status" ;;
work)  # detached, from $S/repo: the real base first (the 7B shape's inputs build meanwhile, on the CPU)
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export TORCH_LOGS=recompiles,perf_hints PYTHONPATH=/tmp/site:$PWD
  say "work starts"
  (WORK=/tmp/smoke bash bench/inputs.sh >> "$S/inputs.log" 2>&1; say "7B inputs ready") &
  # while the real base's chunks arrive: the GPU-only tests (the FP8 base's Triton kernels and GEMMs, fused LoRA's
  # grouped path) and generation's
  PYTHONPATH=/tmp/site:/tmp/mc:$PWD python -m pytest -q -p no:cacheprovider tests/test_fp8_base.py \
    tests/test_fused_lora.py tests/test_generation.py 2>&1 | tail -6 > "$S/gpu-tests.txt"
  say "GPU tests: $(tail -1 "$S/gpu-tests.txt")"
  until [ -f build/gemma-3-270m/conversion.json ] || grep -q "convert failed" "$S/status"; do sleep 5; done
  python bench/generation_speed.py --base build/gemma-3-270m --tuned build/adapter-bf16-s42 --prompts "${held_out[@]}" \
    --models base tuned --runs static:512 compiled:512 --out "$S/gen-real.json" > "$S/gen-real.log" 2>&1
  say "real-base generation done"; tail -8 "$S/gen-real.log" >> "$S/status"
  wait
  python bench/generation_speed.py --base /tmp/smoke/mistral-7b --limit 128 --runs static:128 compiled:128 \
    --out "$S/gen-7b.json" > "$S/gen-7b.log" 2>&1
  say "7B generation done"; tail -5 "$S/gen-7b.log" >> "$S/status"
  say "all done" ;;
fa4)
  bash bench/speed_inputs.sh fa4 .whl-fa4/part"$2"
  if [ "$2" = 2 ]; then
    (cd "$S/repo" && setsid nohup bash bench/sessions/2026-12-06-later.sh speed > "$S/speed.log" 2>&1 < /dev/null &)
    sleep 2
  fi
  tail -3 "$S/status" ;;
speed)  # detached, from $S/repo, alone on the GPU once the generation is done
  until grep -q "all done" "$S/status"; do sleep 5; done
  PYTHONPATH=$(bash bench/speed_inputs.sh env) python bench/speed.py --model /tmp/smoke/mistral-7b \
    --data /tmp/smoke/alpaca.jsonl --steps 8 --rows 4000 --timeout 170 --work "$S/speed" --out "$S/speed.md" \
    --configs lora-recipe lora-fp8-recipe > "$S/speed-run.log" 2>&1
  say "speed done"; tail -4 "$S/speed.md" >> "$S/status" ;;
work-continuous)  # `1 continuous`: transformers' continuous batching beside static on the tuned real base, no more
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site:$PWD
  say "work starts"
  until [ -f build/gemma-3-270m/conversion.json ] || grep -q "convert failed" "$S/status"; do sleep 5; done
  timeout 200 python bench/generation_speed.py --base build/gemma-3-270m --tuned build/adapter-bf16-s42 \
    --prompts "${held_out[@]}" --models tuned --runs static:512 continuous:128 --out "$S/gen-continuous.json" \
    > "$S/gen-continuous.log" 2>&1
  say "continuous done (exit $?)"; tail -5 "$S/gen-continuous.log" >> "$S/status"
  say "all done" ;;
wait)
  end=$((SECONDS + $2))
  until grep -q "${3:-all done}" "$S/status" 2>/dev/null || [ $SECONDS -ge $end ]; do sleep 10; done
  cat "$S/status" ;;
collect)
  tar -C "$S" -czf "$out/session.tar.gz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.pth" \
    --exclude="tokenizer.json" --exclude="checkpoint-*" --exclude="merged" --exclude="repo" --exclude="gemma" .
  ls -la "$out"; cat "$S/status" ;;
esac
