#!/usr/bin/env bash
# The decoding tests again on the oldest transformers release mtp_ext supports (5.17, the one on
# the GPU machines) and its dependencies, laid over .venv's packages: hf_compat's version differences (the cache
# argument's name, DynamicCache's API, masks) must hold on both ends. The release is kept in a
# folder of the user's cache ($MTP_EXT_CACHE, default ~/.cache/mtp_ext), fetched once.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=5.17.0
TARGET="${MTP_EXT_CACHE:-$HOME/.cache/mtp_ext}/transformers-$VERSION"
if [ ! -f "$TARGET/transformers/__init__.py" ]; then
  rm -rf "$TARGET.tmp"
  # With its own dependencies (huggingface-hub 1.x, httpx, ...), which newer releases replaced.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --target "$TARGET.tmp" \
    "transformers==$VERSION"
  rm -rf "$TARGET" && mv "$TARGET.tmp" "$TARGET"
fi
found="$(PYTHONPATH="$TARGET" .venv/bin/python -c 'import transformers; print(transformers.__version__)')"
[ "$found" = "$VERSION" ] || { echo "test_transformers_oldest.sh: got transformers $found"; exit 1; }
echo "test_transformers_oldest.sh: decoding tests on transformers $found"
PYTHONPATH="$TARGET" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_generate.py \
  tests/test_generate_loop.py tests/test_heads_transformer.py tests/test_heads_eagle.py tests/test_trees.py \
  tests/test_assets.py
