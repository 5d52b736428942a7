# Shared set-up of the GPU scripts (bench/device_check.sh, bench/device_generate.sh); sourced from
# the repository root. It needs no network:
#
# * OUT (default bench/results/gpu-latest), PY (python3), PYTHONPATH with the repository first;
# * wheels carried in .gpu_carry/whl (bench/device_prepare.sh fetches them) go to /tmp/mtp_ext_site;
# * GGUF parts carried in .gpu_carry (one per call where a call cannot carry the whole file) are
#   kept in /tmp/mtp_ext_parts, which outlives the call while the machine is held;
# * build_extension builds mtp_ext in place unless the sources are unchanged since the last build
#   on this machine (a hash of csrc/ and setup.py, kept next to the extension); MTP_EXT_SKIP_BUILD=1
#   skips it (dry runs on a machine without a GPU, with the extension installed otherwise).
OUT="${OUT:-bench/results/gpu-latest}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PARTS=/tmp/mtp_ext_parts
SMOLLM2_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
start=$SECONDS
# One call may run 10 minutes: every step's time limit is cut to what is left before DEADLINE
# seconds (default 570), so the script ends, with what it measured, before the call is killed.
DEADLINE="${DEADLINE:-570}"
step() { echo "== $(basename "$0"): $* ($((SECONDS - start)) s)"; }
limit() {  # limit N: N seconds, or what is left before the deadline if less (at least 10)
  local left=$((DEADLINE - (SECONDS - start)))
  [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"
}

if compgen -G ".gpu_carry/whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/mtp_ext_site .gpu_carry/whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/mtp_ext_site"
  else
    echo "installing the carried wheels failed: loading SmolLM2 from its GGUF file will fail"
  fi
fi
mkdir -p "$PARTS"
for part in .gpu_carry/*.gguf.part*; do
  [ -f "$part" ] && cp "$part" "$PARTS/" && echo "kept $(basename "$part") in $PARTS"
done

build_extension() {
  if [ "${MTP_EXT_SKIP_BUILD:-0}" = 1 ]; then echo "build skipped (MTP_EXT_SKIP_BUILD=1)"; return 0; fi
  local stamp
  stamp="$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-32)-$TORCH_CUDA_ARCH_LIST"
  if compgen -G "mtp_ext/_C*.so" > /dev/null && [ "$(cat mtp_ext/.build_stamp 2>/dev/null)" = "$stamp" ]; then
    echo "the extension is already built from these sources"
    return 0
  fi
  rm -f mtp_ext/_C*.so mtp_ext/.build_stamp
  if ! timeout "$(limit 240)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"
    echo "the build failed (log: $OUT/build.log)"
    return 1
  fi
  grep -E -A3 "(warning|error)( #[0-9A-Za-z-]+)?:" "$OUT/build.log" | head -40 || true
  "$PY" - <<'PYEOF' || return 1
import torch
import mtp_ext  # noqa: F401
assert torch._C._dispatch_has_kernel_for_dispatch_key("mtp_ext::softmax_topk", "CUDA"), \
    "the extension was built without its CUDA kernels"
print("built with CUDA kernels; GPU:", torch.cuda.get_device_name())
PYEOF
  echo "$stamp" > mtp_ext/.build_stamp
}

# Joins the kept SmolLM2 parts into $MTP_EXT_CACHE/gguf (where mtp_ext.data.assets finds the file
# without its package) and checks the result; returns 1 when a part is missing.
join_smollm2() {
  export MTP_EXT_CACHE="${MTP_EXT_CACHE:-/tmp/mtp_ext_cache}"
  local target="$MTP_EXT_CACHE/gguf/$SMOLLM2_GGUF"
  mkdir -p "$(dirname "$target")"
  if [ ! -f "$target" ]; then
    local parts=("$PARTS"/smollm2.gguf.part*)
    [ "${#parts[@]}" -ge 2 ] && [ -f "${parts[0]}" ] || { echo "SmolLM2 GGUF parts missing in $PARTS"; return 1; }
    cat "${parts[@]}" > "$target.tmp" && mv "$target.tmp" "$target"
  fi
  echo "$SMOLLM2_SHA256  $target" | sha256sum -c - || { rm -f "$target"; return 1; }
}
