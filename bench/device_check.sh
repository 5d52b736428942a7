#!/usr/bin/env bash
# The GPU check: the first thing to run on a machine with a GPU. From the repository root:
#
#   bash bench/device_check.sh
#
# 1. builds the extension from source, in place, with this machine's torch and nvcc
#    (TORCH_CUDA_ARCH_LIST defaults to 9.0 for H100/H200; set it for another card);
# 2. runs the CUDA tests: tests/test_cuda_kernels.py, tests/test_cuda_build.py and every
#    device-parametrized test's CUDA variant (-k cuda), with MTP_EXT_CUDA_VALUE_CHECKS=1 so the
#    bad-input tests see the value checks that synchronize; the large shapes (V = 262144 x 64,
#    more than 2^31 elements) run last, in a second pytest with its own time limit;
# 3. runs bench/cuda_ops.py (kernel vs reference vs torch.compile(reference), bytes, GB/s, fraction
#    of the measured copy bandwidth) and writes cuda_ops.json and cuda_ops.md.
#
# Everything it writes goes to $OUT (default: bench/results/gpu-latest): the build and test logs,
# nvidia-smi's view of the card and the benchmark table. It needs no network; the set-up it shares
# with bench/device_generate.sh (paths, carried wheels and GGUF parts, the build) is in
# bench/device_common.sh. Budget: about 8 minutes (each step has a time limit); it exits non-zero
# when a step fails, after running the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_common.sh
status=0

step "machine"
{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  command -v nvcc && nvcc --version | tail -2
} 2>&1 | tee "$OUT/machine.txt"

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
build_extension || exit 1

step "CUDA tests (the large shapes last)"
# (tests/test_generate_loop.py is bench/device_generate.sh's.)
MTP_EXT_CUDA_VALUE_CHECKS=1 timeout "$(limit 150)" "$PY" -m pytest tests -k "cuda and not test_large and not 2_31" \
  -q -p no:cacheprovider --continue-on-collection-errors -rfE --durations=15 \
  --ignore=tests/test_generate_loop.py \
  --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "device_check: CUDA tests failed or timed out"; }
MTP_EXT_CUDA_VALUE_CHECKS=1 timeout "$(limit 90)" "$PY" -m pytest tests -k "cuda and (test_large or 2_31)" \
  -q -p no:cacheprovider -rfE --durations=8 --ignore=tests/test_generate_loop.py \
  2>&1 | tee -a "$OUT/cuda_tests.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "device_check: large-shape CUDA tests failed or timed out"; }

step "CUDA benchmark"
timeout "$(limit 200)" "$PY" bench/cuda_ops.py --out "$OUT" --compile-budget 90 --budget 1.5 --reps 20 \
  2>&1 | tee "$OUT/cuda_ops.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "device_check: the benchmark failed or timed out"; }
[ -f "$OUT/cuda_ops.md" ] && cat "$OUT/cuda_ops.md"

step "done, status $status"
exit $status
