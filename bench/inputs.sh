#!/usr/bin/env bash
# The inputs of every GPU benchmark, built once per machine in WORK (default /tmp/smoke): the random-weight
# Mistral-7B (WORK/mistral-7b) and the synthetic Alpaca workload (WORK/alpaca.jsonl).
#   WORK=/tmp/smoke bash bench/inputs.sh        (sourced or run, from the repository root)
# Only mistral-common's tokenizer.model is unpacked (to /tmp/mc): the package itself needs pydantic,
# which the GPU image lacks.
work=${WORK:-/tmp/smoke}
if [ ! -f "$work/mistral-7b/config.json" ] || [ ! -f "$work/alpaca.jsonl" ]; then
  mkdir -p "$work"
  [ -f /tmp/mc/mistral_common/data/tokenizer.model.v1 ] || python -c "import glob, zipfile; \
zipfile.ZipFile(glob.glob('.whl*/mistral_common-*.whl')[0]).extract('mistral_common/data/tokenizer.model.v1', '/tmp/mc')"
  PYTHONPATH=/tmp/mc:${PYTHONPATH:-} python tools/random_model.py "$work/tok" --tokenizer_only
  python bench/workload.py "$work/alpaca.jsonl" --model "$work/tok" > /dev/null &
  PYTHONPATH=/tmp/mc:${PYTHONPATH:-} python tools/random_model.py "$work/mistral-7b" --size 7b > /dev/null
  wait
fi
echo "inputs ready in $work after ${SECONDS} s"
