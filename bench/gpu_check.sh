#!/usr/bin/env bash
# The engine on a GPU machine, in one command (< 10 minutes on one GPU): see bench/README.md.
#
#   bash bench/gpu_check.sh
#
# 1. The device tests (segment attention, fused dropout, the engine's autocast: bf16 base, fp32
#    LoRA) with LORAFLEET_REQUIRE_CUDA=1, so a machine without a working CUDA fails them instead
#    of skipping them.
# 2. A 1-rank engine run under the profiler (bench/gpu_check.py): dtypes, SDPA kernel, syncs per
#    step, peak CUDA memory against the estimate; one summary table.
# 3. The same with 2 NCCL ranks when the machine has 2 GPUs or more.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "== $GPUS GPU(s); torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"

echo "== device tests (CUDA required)"
LORAFLEET_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/worker/test_devices.py tests/worker/test_long_rows.py::test_no_sequence_squared_tensor_with_segment_attention

echo "== engine, 1 rank"
"$PY" -m bench.gpu_check --ranks 1

if [ "$GPUS" -ge 2 ]; then
  echo "== engine, 2 NCCL ranks"
  "$PY" -m bench.gpu_check --ranks 2
else
  echo "== engine, 2 ranks: skipped (1 GPU)"
fi
