"""Pieces shared by the per-op kernel tests (test_<op>.py): the dtype grid and per-case seeds."""
from __future__ import annotations

import zlib

import pytest
import torch

DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]


def case_generator(request) -> torch.Generator:
    """A generator seeded from the test's own id: reproducible, and different for every case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))
