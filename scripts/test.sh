#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), builds and runs the torch-free kernel unit tests with CMake
# (compiling the CUDA kernels too when nvcc is present), runs the test suite, the op and decoding
# tests again on the CUDA kernels under the CPU emulator (pytest --cuda-emulator), the decoding
# tests on the oldest supported transformers (scripts/test_transformers_oldest.sh), the benchmark
# suite's correctness checks on small shapes, then, when nvcc is present, the CUDA build step
# (scripts/build_cuda.sh: the full extension against a CUDA build of torch, import, no-GPU tests).
# Extra arguments go to the test-suite pytest, e.g. `-m slow` or `-k verify`.
set -euo pipefail
cd "$(dirname "$0")/.."
EMULATED_TESTS=(tests/test_softmax_topk.py tests/test_marginalize.py tests/test_fused_mtp_heads.py
  tests/test_small_batch_linear.py tests/test_verify_tree.py tests/test_verify_tree_from_hidden.py
  tests/test_tree_helpers.py tests/test_bad_input.py tests/test_generate.py tests/test_generate_loop.py
  tests/test_trees.py tests/test_heads.py tests/test_op_safety.py tests/test_sampling_edge_cases.py)
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # ninja from the environment
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
.venv/bin/python -m pytest tests "$@"
# The CUDA kernels on the CPU: the op and decoding test files again, every op on CPU tensors
# running its CUDA launcher and kernels under the emulator of csrc/emulator
# (tests/cuda_emulator.py).
.venv/bin/python -m pytest --cuda-emulator -q -p no:warnings "${EMULATED_TESTS[@]}"
# The same for the ops with a tensor-core path (16-bit tables from compute capability 8.0, the
# emulator's default 9.0), on a device of 7.5: their CUDA-core kernels.
CUDA_EMU_CC=7.5 .venv/bin/python -m pytest --cuda-emulator -q -p no:warnings \
  tests/test_fused_mtp_heads.py tests/test_verify_tree_from_hidden.py tests/test_small_batch_linear.py
# The decoding tests on the oldest supported transformers release as well.
bash scripts/test_transformers_oldest.sh
# Benchmark smoke run: every benchmark's correctness check on small shapes, without timing.
.venv/bin/python -m pytest bench --bench-small --bench-no-compile --benchmark-disable -q
# The CUDA extension: built and imported on any machine with nvcc, GPU or not.
if command -v nvcc > /dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  bash scripts/build_cuda.sh
  # Registers, shared memory and local memory of every kernel, as ptxas reports them.
  .venv/bin/python scripts/cuda_resources.py
else
  echo "test.sh: nvcc not found: the CUDA build step (scripts/build_cuda.sh) is SKIPPED"
fi
