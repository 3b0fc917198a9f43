#!/usr/bin/env bash
# How the speed benchmark's packages reach the GPU machine, which reaches no registry and takes 64 MiB per call
# (the work tree is ~9 MiB of it): FlashAttention-4 alone is 100 MB of wheels, 92 MB of them nvidia-cutlass-dsl's
# CUDA 13 libraries, so it travels installed and xz-packed (~36 MB a half) over two back-to-back calls to one warm
# machine (a machine idle for ~30 s is given back, and a new one is bare).
#
# Here, once:
#   bash bench/speed_inputs.sh fetch
#     .whl-speed/        trl, datasets (+ dill, multiprocess), liger-kernel, mistral-common (its tokenizer file)  ~10 MB
#     .whl-fa4/partN/    FlashAttention-4 and what it imports, installed to one folder, tar.xz, cut in two    ~36 MB each
# There, naming the paths in each call's carry:
#   1. carry .whl-speed .whl-fa4/part1   bash bench/speed_inputs.sh install .whl-speed && bash bench/speed_inputs.sh fa4 .whl-fa4/part1
#   2. carry .whl-fa4/part2              bash bench/speed_inputs.sh fa4 .whl-fa4/part2
# after which `bash bench/speed_inputs.sh env` prints the PYTHONPATH that puts FA4 on the path (and `noenv` the one
# without it: compare runs with and without FA4 on one machine by the PYTHONPATH alone).
#
# The set (torch 2.11.0+cu130): flash-attn-4 4.0.0b36 (CuTe DSL), quack-kernels 0.6.5, apache-tvm-ffi 0.1.15,
# torch-c-dlpack-ext 0.1.5, and nvidia-cutlass-dsl 4.8.1, which since 4.4 is a 10 KB stub whose payload is split
# over -libs-core (the Python DSL itself: cutlass/cute), -libs-base (its MLIR bindings, which -libs-core
# requires) and -libs-cu13 (the CUDA 13 compiler and runtime libraries, matching a +cu130 torch; the stub's default
# is -libs-cu12). All three unpack into nvidia_cutlass_dsl/dsl_packages/cutlass, which the stub's .pth puts on
# sys.path; a folder on PYTHONPATH never runs a .pth, so `env` names that folder itself. Without -libs-core, or
# without that folder, `import cutlass.cute` fails, which is how a hand-carried set failed before
# (../shared/CONTEXT.md §1c). cuda-bindings and protobuf, which -libs-core needs, are on the GPU image.
set -euo pipefail
FA4_SITE=/tmp/fa4site
# The GPU machine's interpreter and platform, which may not be this one's.
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
download() { python3 -m pip download -q --no-deps "${target[@]}" "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
case "$1" in
fetch)
  grep -qx '/.whl\*/' .git/info/exclude 2>/dev/null || echo '/.whl*/' >> .git/info/exclude
  download -d .whl-speed trl==1.16.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 liger-kernel==0.8.5 mistral-common==1.13.1
  rm -rf build/fa4-wheels build/fa4site .whl-fa4 && mkdir -p .whl-fa4/part1 .whl-fa4/part2
  download -d build/fa4-wheels flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15 torch-c-dlpack-ext==0.1.5
  python3 -m pip install -q --no-index --no-deps --no-compile "${target[@]}" --target build/fa4site build/fa4-wheels/*.whl
  tar -C build/fa4site -cf - . | xz -T2 -9 > build/fa4site.tar.xz
  half=$(( ($(stat -c %s build/fa4site.tar.xz) + 1) / 2 ))
  split -b "$half" -d -a 1 build/fa4site.tar.xz build/fa4site.tar.xz.
  mv build/fa4site.tar.xz.0 .whl-fa4/part1/ && mv build/fa4site.tar.xz.1 .whl-fa4/part2/
  du -sh .whl-speed .whl-fa4/* ;;
install)  # plain wheels, into /tmp/site (first on every command's PYTHONPATH); of mistral-common only its tokenizer
  # file: installed, it would need pydantic, which the GPU image lacks, and transformers imports it when present
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls "$2"/*.whl | grep -v mistral_common)
  python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extract('mistral_common/data/tokenizer.model.v1', '/tmp/mc') for w in glob.glob('$2/mistral_common-*.whl')]"
  du -sh /tmp/site ;;
fa4)  # one half per call; the second one unpacks both
  mkdir -p /tmp/fa4parts && cp "$2"/fa4site.tar.xz.* /tmp/fa4parts/
  if [ -f /tmp/fa4parts/fa4site.tar.xz.0 ] && [ -f /tmp/fa4parts/fa4site.tar.xz.1 ]; then
    mkdir -p "$FA4_SITE" && cat /tmp/fa4parts/fa4site.tar.xz.0 /tmp/fa4parts/fa4site.tar.xz.1 | xz -d | tar -C "$FA4_SITE" -xf -
    PYTHONPATH=$(bash "$0" env) python3 -c "import cutlass.cute, flash_attn.cute; print('FlashAttention-4 imports')"
  else
    echo "FA4: $(ls /tmp/fa4parts) here, waiting for the other half"
  fi ;;
env) echo "/tmp/site:$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages:$PWD" ;;
noenv) echo "/tmp/site:$PWD" ;;
esac
