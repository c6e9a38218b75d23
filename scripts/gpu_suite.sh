#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   bash scripts/gpu_suite.sh [OUT_DIR]          (default gpu-report/)
# 1. builds qwen_fast._C for this GPU's architecture (in place, all cores);
# 2. runs every test, the GPU ones included (pytest-xdist when it is there);
# 3. runs compute-sanitizer memcheck and racecheck over the CUDA kernel tests;
# 4. runs the kernel benchmarks and the decode benchmark on the GPU;
# 5. writes report.md (every step's outcome and time, the benchmark tables) and summary.json
#    into OUT_DIR, beside the logs: at most 8 files, so that the device tool returns them all.
# Installs nothing (the GPU machine has no package index): torch, pybind11, ninja, pytest,
# tiktoken, safetensors and numpy must be there. Budget: about 6 minutes on an H100 (each step
# has its own time limit; a step that runs out is reported, the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT_DIR:-gpu-report}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
declare -A RESULT
STEPS=$(mktemp)   # one line per step: name<TAB>outcome<TAB>seconds

step() {  # step NAME LIMIT_S LOG CMD...: run with a time limit, record rc and seconds
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  echo "[gpu_suite] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then RESULT[$name]=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then RESULT[$name]="timed out after ${limit}s"
  else RESULT[$name]="failed (exit $rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "${RESULT[$name]}" "$took" >> "$STEPS"
  echo "[gpu_suite] $name: ${RESULT[$name]} in ${took}s"
}

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > /dev/null 2>&1; then
  echo "gpu_suite: no NVIDIA GPU here (nvidia-smi is missing or fails); run it on a GPU machine" >&2
  exit 2
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse --short HEAD 2> /dev/null
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  command -v compute-sanitizer || echo "compute-sanitizer: not found"
} > "$OUT/machine.txt" 2>&1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
export QWEN_FAST_CUDA=1 QWEN_FAST_CUDA_ARCHS=${QWEN_FAST_CUDA_ARCHS:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# 1. build (in place: the tests import the package from the checkout)
: > "$OUT/build.log"
step build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
"$PY" -c "import qwen_fast._C as C; print(C.build_info()); print('cuda devices', C.cuda_device_count())" \
  >> "$OUT/machine.txt" 2>&1
if [ "${RESULT[build]}" != ok ]; then
  tail -40 "$OUT/build.log"
  exit 1
fi

# 2. every test; the CPU ones spread over the cores when pytest-xdist is there
: > "$OUT/tests.log"
xdist=()
"$PY" -c "import xdist" 2> /dev/null && xdist=(-n 8)
step tests 240 "$OUT/tests.log" "$PY" -m pytest -q -ra "${xdist[@]}" -p no:cacheprovider

# 3. compute-sanitizer over the CUDA kernel tests (GPU cases only: -m gpu)
KERNEL_TESTS=$(ls tests/test_{rms_norm,rotary_embedding,rotary_kv_cache,swiglu,linear,quant_linear,attention,kv_int8}.py 2> /dev/null)
: > "$OUT/sanitizer.log"
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    echo "==== compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
    step "sanitizer-$tool" 90 "$OUT/sanitizer.log" compute-sanitizer --tool "$tool" \
      --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -x -m gpu -p no:cacheprovider $KERNEL_TESTS
  done
else
  for tool in memcheck racecheck; do
    RESULT[sanitizer-$tool]="skipped: compute-sanitizer not found"
    printf 'sanitizer-%s\t%s\t0\n' "$tool" "${RESULT[sanitizer-$tool]}" >> "$STEPS"
  done
fi

# 4. benchmarks on the GPU (their JSON and markdown also land in benchmarks/results/)
: > "$OUT/bench.log"
step bench-kernels 90 "$OUT/bench.log" "$PY" benchmarks/bench_kernels.py --device cuda
step bench-decode 90 "$OUT/bench.log" "$PY" benchmarks/bench_decode.py --device cuda \
  --backend auto,reference --prompt-tokens 512 --new-tokens 64 --context 0,4096 --repeats 3
step bench-decode-int4 60 "$OUT/bench.log" "$PY" benchmarks/bench_decode.py --device cuda \
  --quant int4 --lm-head-quant int4 --prompt-tokens 512 --new-tokens 64 --repeats 3
step bench-decode-int8kv 60 "$OUT/bench.log" "$PY" benchmarks/bench_decode.py --device cuda \
  --quant int4 --lm-head-quant int4 --kv-cache-dtype int8 --prompt-tokens 512 --new-tokens 64 \
  --context 0,4096 --repeats 3

# 5. report.md + summary.json
"$PY" - "$OUT" "$STEPS" <<'EOF'
import json, re, sys, glob, os
out, steps = sys.argv[1], sys.argv[2]
result, taken = {}, {}
for line in open(steps):
    name, outcome, secs = line.rstrip("\n").split("\t")
    result[name], taken[name] = outcome, int(secs)
def tail(path, n):
    try:
        return open(path, errors="replace").read().splitlines()[-n:]
    except OSError:
        return []
tests = [l for l in tail(os.path.join(out, "tests.log"), 400) if re.match(r"(FAILED|ERROR)\b", l)]
summary_line = next((l for l in reversed(tail(os.path.join(out, "tests.log"), 50))
                     if re.search(r"\d+ (passed|failed)", l)), "")
san = [l for l in tail(os.path.join(out, "sanitizer.log"), 4000)
       if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l or l.startswith("========= Invalid")]
benches = {}
for md in sorted(glob.glob("benchmarks/results/*cuda*-latest.md")):
    benches[os.path.basename(md)] = open(md).read()
jsons = {}
for name in ("kernels-cuda", "decode-cuda-bfloat16", "decode-cuda-bfloat16-int4-lm_head-int4"):
    files = sorted(glob.glob(f"benchmarks/results/{name}-2*.json"))
    if files:
        jsons[name] = json.load(open(files[-1]))
machine = open(os.path.join(out, "machine.txt")).read()
lines = ["# GPU suite report", "", "```", machine.strip(), "```", "",
         "| step | outcome | seconds |", "|---|---|---|"]
lines += [f"| {k} | {v} | {taken.get(k, '')} |" for k, v in result.items()]
lines += ["", f"tests: {summary_line}"] + [f"- {l}" for l in tests[:60]]
lines += ["", "compute-sanitizer:"] + [f"- {l}" for l in san[:40]]
for name, md in benches.items():
    lines += ["", f"## {name}", "", md]
open(os.path.join(out, "report.md"), "w").write("\n".join(lines) + "\n")
json.dump({"steps": result, "seconds": taken, "tests": summary_line, "failures": tests,
           "sanitizer": san, "benchmarks": jsons}, open(os.path.join(out, "summary.json"), "w"),
          indent=1)
print("\n".join(lines[:40 + len(result)]))
EOF
for k in "${!RESULT[@]}"; do [ "${RESULT[$k]}" = ok ] || [[ "${RESULT[$k]}" == skipped* ]] || exit 1; done
exit 0
