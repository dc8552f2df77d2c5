#!/usr/bin/env bash
# Runs the GPU tests and the full benchmark suite on any machine with an NVIDIA GPU, and writes
# one result set: bash bench/gpu_run.sh
#
# Needs, installed beforehand in the Python that runs it:
#   - a CUDA build of torch (e.g. `pip install torch` from the CUDA index of pytorch.org; the
#     CPU-only pin of the test command does not see the GPU) and triton;
#   - gift_fast with its test and benchmark extras, which bring the peers (liger-kernel,
#     cut-cross-entropy) and matplotlib: pip install -e ".[test,bench]"
#
# Environment (all optional):
#   OUT            result folder (default bench/results/<gpu name>-<YYYYMMDD>, e.g. h100-80gb-hbm3-20270101)
#   SUITE_BUDGET   seconds for the timed sweep (default 420; later runs are reported as skipped)
#   PHASE          all (default), tests or suite
# Writes into $OUT: nvidia-smi.txt, gpu_tests.log, suite.log, results.json, results.md, the PNG
# plots, model_prediction.md (bench.model --predict) and model_vs_measured.md (measured next to
# the model for the same shapes, with the r each measurement implies). Commit the folder.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "bench/gpu_run.sh: torch sees no CUDA device (is a CUDA build of torch installed?)" >&2
  exit 2
}
gpu=$(python3 -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower().replace('nvidia', '')).strip('-'))")
OUT=${OUT:-bench/results/${gpu}-$(date -u +%Y%m%d)}
PHASE=${PHASE:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/nvidia-smi.txt" 2>&1
tail -1 "$OUT/nvidia-smi.txt"

if [[ $PHASE == all || $PHASE == tests ]]; then
  python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "GPU tests: exit status $? (last lines of $OUT/gpu_tests.log):"
  tail -5 "$OUT/gpu_tests.log"
fi

if [[ $PHASE == all || $PHASE == suite ]]; then
  # results.json is rewritten after every case, so an interrupted run still leaves results.
  python3 -m bench.run_suite --full --time-budget "${SUITE_BUDGET:-420}" --out "$OUT" \
      2> "$OUT/suite.log" | tee -a "$OUT/suite.log" | tail -60
  echo "suite: exit status ${PIPESTATUS[0]}"
fi
# The calibrated cost model for the same shapes, next to what was measured: the "implied r"
# column is our Triton kernels' efficiency relative to cuBLAS that makes the model match.
python3 -m bench.model --predict --gpu-name "$gpu" > "$OUT/model_prediction.md"
if [[ -f $OUT/results.json ]]; then
  python3 -m bench.model --compare "$OUT/results.json" --gpu-name "$gpu" \
      | tee "$OUT/model_vs_measured.md"
fi
ls -la "$OUT"
