#!/usr/bin/env bash
# Prepare the wheels benchmarks/gpu_check.sh installs on the lent GPU machine, which reaches no package
# registry. Its Python 3.12 already has torch 2.11 (CUDA 13), onnxruntime (CPU build), transformers, timm,
# numpy, safetensors, psutil, tensorboard, ninja, pytest; this fetches the rest, pure or cp312 manylinux
# builds only, no dependencies (so nothing can pull another torch). Run it here, then carry the folder.
#   bash benchmarks/gpu_wheels.sh [DIR]      (default: gpu_wheels/; about 25 MB, under the 64 MiB limit)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_wheels}
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$DIR"
# what pyproject pins, where the GPU machine lacks it
PINNED="open_clip_torch==3.3.0 webdataset==1.0.2 pydantic==2.14.3 PyYAML==6.0.3 tqdm==4.70.1 matplotlib==3.11.2"
# their dependencies that the GPU machine lacks (versions as resolved here with torch 2.13)
DEPS="braceexpand ftfy wcwidth pydantic-core annotated-types typing-inspection hjson msgpack py-cpuinfo einops contourpy cycler fonttools kiwisolver pyparsing"
versions=()
for name in $DEPS; do
  version=$($PIP show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  versions+=("$name${version:+==$version}")
done
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" $PINNED "${versions[@]}"
# DeepSpeed is an sdist only: build its pure wheel here (ops are JIT-built on first use, or unused)
ls "$DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || $PIP wheel --quiet --no-deps deepspeed==0.19.8 -w "$DIR"
du -sh "$DIR"
ls "$DIR"
