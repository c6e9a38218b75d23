"""The compiled extension: it is built, says how (build_info), and CI really compiled the CUDA
kernels whenever nvcc is on the machine, even though no GPU is there to run them."""
from __future__ import annotations

import glob
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from qwen_fast import ops, reference

BUILD_INFO_TYPES = {
    "cuda": bool,
    "cuda_archs": list,
    "nvcc_version": (str, type(None)),
    "openmp": bool,
    "openmp_threads": int,
    "simd": str,
    "compiler": str,
    "torch_version": str,
}


def _nvcc_on_machine() -> str | None:
    """nvcc where setup.py looks for it: CUDA_HOME, /usr/local/cuda, PATH."""
    for candidate in (Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "bin" / "nvcc",
                      Path("/usr/local/cuda/bin/nvcc")):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def test_extension_is_built():
    assert ops.HAVE_C, f"qwen_fast._C failed to import: {ops.IMPORT_ERROR}"


def test_build_info_keys_and_types():
    info = ops.build_info()
    assert set(info) == set(BUILD_INFO_TYPES)
    for key, types in BUILD_INFO_TYPES.items():
        assert isinstance(info[key], types), f"build_info()[{key!r}] = {info[key]!r}"
    assert all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["openmp_threads"] >= 1
    assert info["simd"] and info["compiler"]
    assert info["torch_version"] == torch.__version__  # built against the torch it runs with
    if info["cuda"]:
        assert info["cuda_archs"] and info["nvcc_version"]
    else:
        assert info["cuda_archs"] == [] and info["nvcc_version"] is None


def test_cuda_kernels_compiled_when_nvcc_is_present():
    nvcc = _nvcc_on_machine()
    if nvcc is None:
        pytest.skip("no nvcc on this machine: the extension is CPU-only by design")
    if os.environ.get("QWEN_FAST_CUDA", "auto").strip() == "0":
        pytest.skip("QWEN_FAST_CUDA=0 asks for a CPU-only build")
    info = ops.build_info()
    assert info["cuda"], f"nvcc exists ({nvcc}) but the extension was built without CUDA: {info}"


def test_cuda_device_count_without_a_gpu():
    count = ops.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not glob.glob("/dev/nvidia[0-9]*"):
        assert count == 0  # no driver or device: the CUDA runtime's error becomes 0, no crash
    elif ops.build_info()["cuda"]:
        assert count >= 1


def test_ops_have_docstrings():
    from qwen_fast import _C
    for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "swiglu", "attention",
                 "linear", "linear_isas", "build_info",
                 "cuda_device_count"):
        assert len(getattr(_C, name).__doc__ or "") > 40, name


def test_missing_extension_falls_back_to_reference_once(monkeypatch):
    monkeypatch.setattr(ops, "HAVE_C", False)
    monkeypatch.setattr(ops, "IMPORT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="simulated"):
        out = ops.rms_norm(x, w)
    assert torch.equal(out, reference.rms_norm(x, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        out2, h = ops.fused_add_rms_norm(x, x, w)
    assert torch.equal(h, reference.fused_add_rms_norm(x, x, w)[1])
    info = ops.build_info()
    assert info["cuda"] is False and "simulated" in info["import_error"]
    assert ops.cuda_device_count() == 0
