#!/usr/bin/env bash
# Downloads the peers' wheels for the device machine (Python 3.12, x86-64) into .whl/ (ignored by
# git; name it in the device tool's carry). Both are pure-Python wheels; torch and triton are
# already on the device image and are not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -la .whl
