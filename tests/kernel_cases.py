"""Pieces shared by the per-op kernel tests (test_<op>.py): the device and dtype grids and
per-case seeds."""
from __future__ import annotations

import zlib

import pytest
import torch

DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]


def devices(cuda_ready: bool, reason: str) -> list:
    """The device grid: the CPU, and CUDA (marked gpu) that skips with `reason` unless ready."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda",
                         marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_ready, reason=reason)])]


def case_generator(request) -> torch.Generator:
    """A generator seeded from the test's own id: reproducible, and different for every case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))
