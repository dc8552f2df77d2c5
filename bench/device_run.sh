#!/usr/bin/env bash
# The one command a GPU session runs on the device machine (see bench/README.md):
#
#   here, once:  bash bench/fetch_wheels.sh            # liger-kernel + cut-cross-entropy wheels -> .whl/
#   device:      run(command="GIFT_FAST_COMMIT=<sha of HEAD> bash bench/device_run.sh", carry=[".whl"],
#                    timeout_s=600)
#
# Phases: PHASE=all (default: GPU tests ~100 s + the full suite ~7 min, under 9 min in all),
# PHASE=tests, PHASE=suite (the suite alone with SUITE_BUDGET=420 s by default).
# Writes at most 7 files straight into $OUT (the device tool returns 8 files, 2 folders deep):
# nvidia-smi.txt, gpu_tests.log, suite.log, results.json, results.md, time_vs_n.png, mem_vs_n.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
PHASE=${PHASE:-all}
export PYTHONUNBUFFERED=1

# 1. Peers as carried wheels (the device machine has no registry), then gift_fast itself
#    (editable, so that gift_fast.kernels maps onto kernels/ as setup.py says).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ carried: liger-kernel and cut-cross-entropy will be reported unavailable"
fi
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "editable install failed; linking gift_fast/kernels"; ln -sfn ../kernels gift_fast/kernels; }
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt" | tail -3

# 2. GPU tests (the ones marked gpu), bounded.
if [[ $PHASE == all || $PHASE == tests ]]; then
  timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -m gpu -x tests -p no:cacheprovider \
      > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? (tail):"; tail -5 "$OUT/gpu_tests.log"
fi

# 3. The full suite; it stops starting new runs after SUITE_BUDGET seconds and reports the rest
#    as skipped; results.json is rewritten after every case, so a kill still leaves results.
if [[ $PHASE == all || $PHASE == suite ]]; then
  if [[ $PHASE == all ]]; then budget=${SUITE_BUDGET:-330}; else budget=${SUITE_BUDGET:-420}; fi
  timeout $((budget + 90)) python3 -m bench.run_suite --full --time-budget "$budget" --out "$OUT" \
      2> "$OUT/suite.log" | tee -a "$OUT/suite.log" | tail -60
  echo "suite rc=${PIPESTATUS[0]}"
fi
ls -la "$OUT"
