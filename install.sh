#!/usr/bin/env bash
# Installs qwen_fast and its test tools into a virtual environment (default: .venv here).
#   bash install.sh            -> .venv with torch 2.13.0 (CPU build), then qwen_fast (editable,
#                                 with the dev and server extras: tests, fastapi, uvicorn)
#   VENV=/path bash install.sh -> another environment; VENV=none uses the active Python
# torch is installed first because the C++/CUDA extension is compiled against it
# (--no-build-isolation). The CUDA kernels are compiled whenever nvcc is found.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ "$VENV" != none ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
else
  PY=python3
fi
"$PY" -m pip install -q "setuptools>=64" wheel
# The CPU build of torch 2.13.0; a bare 'torch' would fetch a multi-GB CUDA build.
"$PY" -m pip install -q "torch==${QWEN_FAST_TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q pybind11 ninja
"$PY" -m pip install -q --no-build-isolation -e ".[dev,server]"
"$PY" -c "import qwen_fast._C as C; print('qwen_fast._C built:', C.build_info())"
