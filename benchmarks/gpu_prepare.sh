#!/usr/bin/env bash
# Download, HERE (where pip reaches a registry), the wheels the lent GPU machine lacks for
# `python -m benchmarks gpu`, into .whl/ (gitignored). That machine has Python 3.12 with torch +
# CUDA, transformers, accelerate, peft, safetensors, numpy, pillow, pyyaml, rich, jaxtyping, ninja,
# packaging, huggingface-hub (/work/.library/device/KINDS.md) and no network. The script's imports
# (geco.config, geco.models.*, geco.distill.vsd, geco.train.loop, geco.render.splat; no ray, mlflow,
# boto3, webdataset or bpy) add:
#   gsplat==1.5.3   pure-Python wheel; compiles its CUDA kernels at first use (needs ninja, numpy,
#                   jaxtyping, rich, torch: all there); benchmarks/gpu.py starts that build at once
#   diffusers==0.42.1 (needs huggingface-hub>=1.32, safetensors>=0.8, regex, requests, filelock: there)
#   pydantic + pydantic-core, annotated-types, typing-inspection, typing_extensions>=4.16 (pydantic's floor)
#   plyfile         (geco.export, imported by geco.generate's save path)
# Then, carrying .whl, ONE command on the GPU machine (about 16 MiB of wheels; the limit is 64 MiB):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. TORCH_EXTENSIONS_DIR=/tmp/torch_ext python3 -m benchmarks gpu --out "${OUT:-benchmarks/results}"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  gsplat==1.5.3 diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing_extensions==4.16.0 plyfile==1.1.5
ls .whl
du -sh .whl
