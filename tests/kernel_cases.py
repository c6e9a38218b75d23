"""Pieces shared by the per-op kernel tests (test_<op>.py): the device and dtype grids and
per-case seeds."""
from __future__ import annotations

import zlib

import pytest
import torch

import simt_ops
from qwen_fast import ops

DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]


def devices(cuda_ready: bool, reason: str, simt: bool = False) -> list:
    """The device grid: the CPU, CUDA (marked gpu) that skips with `reason` unless ready, and
    with simt=True "simt": the op's CUDA kernel run by the SIMT emulator on CPU tensors (marked
    simt; see tensor_device and kernel_op)."""
    grid = [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda",
                         marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_ready, reason=reason)])]
    if simt:
        grid.append(pytest.param("simt", id="simt", marks=[
            pytest.mark.simt, pytest.mark.skipif(not simt_ops.HAVE_SIMT, reason=simt_ops.SKIP)]))
    return grid


def tensor_device(device: str) -> str:
    """Where a case's tensors live: the emulator runs on CPU tensors."""
    return "cpu" if device == "simt" else device


def kernel_op(device: str, name: str):
    """The function a case calls: ops.<name>, or for "simt" its emulator twin in simt_ops."""
    return getattr(simt_ops if device == "simt" else ops, name)


def case_generator(request) -> torch.Generator:
    """A generator seeded from the test's own id: reproducible, and different for every case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))
