#!/usr/bin/env bash
# Decoding on a GPU: the second thing to run on a machine with a GPU, after bench/device_check.sh
# (whose build it reuses while the machine is held). From the repository root:
#
#   bash bench/device_generate.sh
#
# 1. builds the extension unless bench/device_check.sh already built these sources;
# 2. runs the decoding loop's CUDA tests (greedy equality with model.generate on the GPU, and one
#    device synchronization per step under CUDA's sync debug mode);
# 3. bench/tree_step_cost.py: one tree step against one plain decode step for T = 1..64 on a
#    random-weight model of Llama 3.2 1B's shape (bfloat16, batch 1, then batch 4);
# 4. bench/generate_speed.py on real SmolLM2-135M with the shipped heads (float32, the prompts of
#    bench/prompts/smollm2.json): mtp_ext.generate against model.generate and prompt lookup, batch
#    1 and 4, and a sampling run. The model's GGUF file is joined from the two parts that
#    bench/device_prepare.sh cuts and that two calls carry, one each (see bench/README.md).
#
# Results go to $OUT (default bench/results/gpu-latest): tree_step_cost.{json,md},
# generate_gpu.{json,md} and the logs. Budget: about 4 minutes once built; each step has a time
# limit, cut to what is left before the call's 10 minutes run out (DEADLINE in device_common.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_common.sh
status=0

step "build"
build_extension || exit 1

step "decoding tests on CUDA"
timeout "$(limit 90)" "$PY" -m pytest tests/test_generate_loop.py -q -p no:cacheprovider -rfE \
  2>&1 | tee "$OUT/generate_tests.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "device_generate: the decoding tests failed"; }

step "tree step cost (random weights, Llama 3.2 1B shape)"
timeout "$(limit 150)" "$PY" bench/tree_step_cost.py --device cuda --shape llama-1b --dtype bfloat16 \
  --batch 1,4 --reps 10 --out "$OUT" 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "device_generate: tree_step_cost failed"; }

step "SmolLM2 decoding speed"
if join_smollm2; then
  timeout "$(limit 300)" "$PY" bench/generate_speed.py --device cuda --prompts bench/prompts/smollm2.json --set continuation \
    --rounds 2 --json "$OUT/generate_gpu.json" 2>&1 | tee "$OUT/generate_gpu.log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "device_generate: generate_speed failed"; }
  sed -n '/^#### SmolLM2-135M/,$p' "$OUT/generate_gpu.log" > "$OUT/generate_gpu.md"
else
  status=1
  echo "device_generate: no SmolLM2 GGUF here (carry both parts, see bench/README.md)"
fi

step "done, status $status"
exit $status
