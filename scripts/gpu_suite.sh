#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and a CUDA build of torch: build the extension
# for this GPU, run every test (the GPU ones included), run the kernel and decode benchmarks,
# and collect logs and result tables in $OUT (default: gpu-report/).
#   bash scripts/gpu_suite.sh
# Uses the active python3 (PYTHON=... to choose) and installs no dependency: torch, tiktoken,
# safetensors, tqdm, pybind11, ninja and pytest must already be there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-report}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
{
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/machine.txt" 2>&1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
export QWEN_FAST_CUDA=1 QWEN_FAST_CUDA_ARCHS=${QWEN_FAST_CUDA_ARCHS:-$cap}
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed: see $OUT/build.log"; tail -30 "$OUT/build.log"; exit 1
fi
"$PY" -c "import qwen_fast._C as C; print(C.build_info())" >> "$OUT/machine.txt" 2>&1
"$PY" -m pytest -ra -q > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"
(cd benchmarks && "$PY" bench_kernels.py --device cuda) > "$OUT/bench_kernels.log" 2>&1 || status=1
(cd benchmarks && "$PY" bench_decode.py --device cuda --prompt-len 512 --new-tokens 64 --repeats 3) \
  > "$OUT/bench_decode.log" 2>&1 || status=1
cp benchmarks/results/*-cuda-latest.md "$OUT/" 2>/dev/null
cat "$OUT/machine.txt" "$OUT"/*-cuda-latest.md 2>/dev/null
exit $status
