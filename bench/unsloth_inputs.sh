#!/usr/bin/env bash
# The wheels that make Unsloth (unsloth 2026.10.9, its own LoRA path) run as a speed peer on the GPU machine,
# which reaches no registry and takes 64 MiB per call (~54 MiB beside the work tree). Run here, from the repo root:
#   bash bench/unsloth_inputs.sh   -> .whl-unsloth/part1/unsloth-site.tar.xz (~5 MiB), part2/ (~41 MiB), git-ignored by
#                                     /.whl*/ in .git/info/exclude
# part1 is the first six wheels below installed here into one folder, less unsloth's Studio (the `studio` package its
# wheel also carries: 82 of its 109 MB installed, a web UI that `import unsloth` never imports), xz-packed: small
# enough to travel beside FlashAttention-4's second half (bench/speed_inputs.sh). There, one call per part,
# back-to-back on one warm machine (an idle one is given back, and a new one is bare):
#   1. carry [".whl-unsloth/part1"]
#      mkdir -p /tmp/unsloth-site && xz -d < .whl-unsloth/part1/unsloth-site.tar.xz | tar -C /tmp/unsloth-site -xf -
#   2. carry [".whl-unsloth/part2"]
#      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/unsloth-site .whl-unsloth/part2/*.whl
# and the peer runs with PYTHONPATH=/tmp/unsloth-site:$PWD alone (never /tmp/site: the project's trl 1.16 and
# datasets 5.2 are outside unsloth's pins), see bench/unsloth_peer.py.
#
# Why each wheel (read from unsloth's and unsloth_zoo's sources; checked on CPU, UNSLOTH_ALLOW_CPU=1):
#   unsloth, unsloth_zoo 2026.10.9   the peer itself (unsloth's wheel is 28 MB, 80% of it its Studio UI, never imported)
#   trl==1.15.0                      hard: unsloth/trainer.py, tokenizer_utils.py import trl at module level (pin <=1.15.0)
#   datasets==4.8.5                  hard: unsloth/dataprep/raw_text.py, zoo's training_utils.py and tokenizer_utils.py
#                                    import it at module level; trl too
#                                    (unsloth pins <5, not 4.0.*, 4.1.0, 4.4.*, 4.5.0; trl 1.15 wants >=4.7)
#   dill==0.4.1, multiprocess==0.70.19   hard for datasets 4.8.5 (dill<0.4.2, multiprocess<0.70.20); py312 wheel
#   bitsandbytes==0.50.2 (part2, alone: 41 MiB)  hard on the bf16 path too: unsloth_zoo/patching_utils.py
#                          patch_model_and_tokenizer(), run by every FastLanguageModel.from_pretrained, raises ImportError
#                          without `bitsandbytes.nn.Linear4bit` (elsewhere unsloth guards it: "16bit ... works"). Not a
#                          stub: a findable bitsandbytes turns on peft's and transformers' bnb code (is_bnb_available),
#                          which would then call into it; the real wheel is the one the project's QLoRA runs use here.
# Left out, with why (everything else unsloth declares is in the image):
#   xformers, flash-attn   guarded (models/_utils.py, utils/packing.py, a broken one falls back to torch's SDPA too).
#                          flash-attn has no wheel; PyPI's xformers 0.0.35 is built for torch 2.10+cu128
#                          (libcudart.so.12) and unsloth expects it not to load beside a cu130 torch (its #4381).
#                          Without them packed rows run torch's varlen kernel (torch >= 2.12) or, on torch 2.11, SDPA
#                          per packed segment; the peer's summary names which (attn_implementation).
#   torchao, cut_cross_entropy, tyro, hf_transfer, diffusers, pydantic, msgspec, sentence-transformers: imported only
#                          inside try/except, in functions off this path (QAT, vLLM, saving), or looked up by find_spec
#   structlog, json5, nest-asyncio, fastapi...: Studio's, never imported by `import unsloth`
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl\*/' .git/info/exclude 2>/dev/null || echo '/.whl*/' >> .git/info/exclude
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# pip's own failure still fails the script (pipefail); only grep finding nothing is forgiven.
download() { python3 -m pip download -q --no-deps "${target[@]}" "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
rm -rf .whl-unsloth && mkdir -p .whl-unsloth/part1 .whl-unsloth/part2
download -d .whl-unsloth/part1 unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 \
  dill==0.4.1 multiprocess==0.70.19 "$@"   # extra NAME==VERSION specs go to part1 (e.g. xformers==0.0.35, 3 MB)
download -d .whl-unsloth/part2 bitsandbytes==0.50.2
rm -rf build/unsloth-site
python3 -m pip install -q --no-index --no-deps --no-compile "${target[@]}" --target build/unsloth-site .whl-unsloth/part1/*.whl
tar -C build/unsloth-site --exclude=./studio -cf - . | xz -T2 -6 > .whl-unsloth/part1/unsloth-site.tar.xz
rm .whl-unsloth/part1/*.whl
ls -la .whl-unsloth/part*
for p in .whl-unsloth/part*; do
  size=$(du -cb "$p"/* | tail -1 | cut -f1)
  echo "$p: $((size / 1024 / 1024)) MiB ($size bytes)"
  [ "$size" -le $((54 * 1024 * 1024)) ] || { echo "$p is over 54 MiB" >&2; exit 1; }
done
