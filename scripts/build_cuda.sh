#!/usr/bin/env bash
# CI step for the CUDA kernels on a machine with nvcc and no GPU: builds the full extension (CPU and
# CUDA kernels) against a CUDA build of torch, imports it, and runs tests/test_cuda_build.py, which
# checks that every op has a CUDA kernel registered and that calling one without a GPU fails with a
# clear error. Every compile error of csrc/cuda and csrc/kernels/*.cu fails this step.
#
# The CUDA build of torch lives in its own virtual environment outside the repository, created on
# the first run and reused afterwards. The build itself happens in a temporary copy of the sources,
# so the repository's own mtp_ext/_C*.so (the CPU build the test suite uses) is never touched.
#
#   MTP_EXT_CUDA_ENV       the environment (default: ~/.cache/mtp_ext/cuda-build-venv)
#   MTP_EXT_CUDA_TORCH     the torch requirement (default: torch==2.14.1, a CUDA 13.0 build)
#   MTP_EXT_CUDA_BUILD_DIR where the build copy goes (default: a fresh temporary directory)
#   CUDA_HOME              the CUDA toolkit (default: /usr/local/cuda, or the one holding nvcc)
#   TORCH_CUDA_ARCH_LIST   the architectures to compile for (default: "8.0;9.0")
#   MAX_JOBS               parallel compile jobs (default: 2)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
start=$SECONDS

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc > /dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  else
    echo "build_cuda.sh: nvcc not found (set CUDA_HOME); the CUDA build is skipped" >&2
    exit 0
  fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

ENV_DIR="${MTP_EXT_CUDA_ENV:-$HOME/.cache/mtp_ext/cuda-build-venv}"
TORCH_REQ="${MTP_EXT_CUDA_TORCH:-torch==2.14.1}"
PY="$ENV_DIR/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-cache-dir)

# 1. The environment: created once; the requirements are re-checked (fast) on every run.
stamp="$ENV_DIR/.mtp_ext_requirements"
# transformers: the release the GPU machines have, for the decoding test on fake CUDA tensors.
wanted="$TORCH_REQ numpy setuptools wheel ninja pytest transformers==5.17.0"
if [ ! -x "$PY" ]; then
  echo "build_cuda.sh: creating $ENV_DIR with $TORCH_REQ (once per machine)"
  mkdir -p "$(dirname "$ENV_DIR")"
  "${PYTHON:-python3}" -m venv "$ENV_DIR"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  # shellcheck disable=SC2086
  if ! "${PIP[@]}" $wanted > "$ENV_DIR/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$ENV_DIR/pip.log" >&2
    echo "build_cuda.sh: installing $wanted failed" >&2
    exit 1
  fi
  echo "$wanted" > "$stamp"
fi
"$PY" - <<'EOF'
import torch
assert torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build"
print(f"build_cuda.sh: torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
echo "build_cuda.sh: environment ready after $((SECONDS - start)) s"

# 2. Build in a copy of the sources (the repository's CPU build stays as it is). The copy keeps
# its path between runs when MTP_EXT_CUDA_BUILD_DIR is set, so ninja recompiles only what changed.
if [ -n "${MTP_EXT_CUDA_BUILD_DIR:-}" ]; then
  BUILD="$MTP_EXT_CUDA_BUILD_DIR"
  mkdir -p "$BUILD"
else
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
fi
mkdir -p "$BUILD/src"
# Only what the build and the test need; files that did not change keep their times.
for item in setup.py pyproject.toml README.md csrc mtp_ext tests; do
  [ -e "$REPO/$item" ] || continue
  if [ -d "$REPO/$item" ]; then
    mkdir -p "$BUILD/src/$item"
    cp -a -u "$REPO/$item/." "$BUILD/src/$item/"
  else
    cp -a -u "$REPO/$item" "$BUILD/src/$item"
  fi
done
rm -f "$BUILD"/src/mtp_ext/_C*.so
cd "$BUILD/src"
if ! "$PY" setup.py build_ext --inplace --build-temp "$BUILD/temp" > "$BUILD/build.log" 2>&1; then
  echo "build_cuda.sh: the CUDA build failed; the log:" >&2
  cat "$BUILD/build.log" >&2
  exit 1
fi
# Compiler warnings are shown (the build passes with them, but they should be fixed).
if grep -E -q "(warning|error)( #[0-9A-Za-z-]+)?:" "$BUILD/build.log"; then
  echo "build_cuda.sh: compiler warnings:"
  grep -E -A4 "(warning|error)( #[0-9A-Za-z-]+)?:" "$BUILD/build.log"
fi
echo "build_cuda.sh: built after $((SECONDS - start)) s"

# 3. Import it and run the no-GPU checks, from the build copy.
"$PY" - <<'EOF'
import torch
import mtp_ext
ops = mtp_ext.ops.__all__
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mtp_ext::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"build_cuda.sh: import ok, CUDA kernels registered for all {len(ops)} ops")
EOF
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_build.py tests/test_decoding_fake_cuda.py
echo "build_cuda.sh: done in $((SECONDS - start)) s"
