"""The SIMT emulator's own tests (csrc/simt): barriers, shuffles and shared memory behave as
on the GPU, and faults that a GPU run could hide are caught: a missing barrier (on some seeds
of the random fiber order), divergent barriers, an early return before a barrier, a shuffle
whose mask leaves out the calling lane, a bad launch configuration."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.simt
simt = pytest.importorskip("qwen_fast._simt", reason="qwen_fast._simt (the SIMT emulator) is not built")


def _reverse(blocks, threads, barrier, seed):
    simt.set_seed(seed)
    out = torch.full((blocks * threads,), -1, dtype=torch.int32)
    simt.selftest_reverse(out, blocks, threads, barrier)
    return out.view(blocks, threads)


def _want_reverse(blocks, threads):
    b = torch.arange(blocks)[:, None] * 10000
    return (b + torch.arange(threads - 1, -1, -1)[None, :]).to(torch.int32)


@pytest.mark.parametrize("threads", [32, 96, 256])
def test_barrier_orders_shared_memory(threads):
    for seed in range(3):
        assert torch.equal(_reverse(3, threads, True, seed), _want_reverse(3, threads))


def test_a_missing_barrier_is_caught():
    """Without the barrier a thread may read its partner's slot before the partner writes it.
    Fibers run in a random order between synchronisation points, so most seeds show a stale
    value (the previous block's, shared memory being reused): the emulator catches the bug
    where a GPU, whose warps often happen to run in step, may not."""
    wrong = 0
    for seed in range(8):
        got = _reverse(2, 64, False, seed)
        wrong += not torch.equal(got, _want_reverse(2, 64))
    assert wrong >= 6, f"the missing barrier showed on only {wrong} of 8 seeds"


@pytest.mark.parametrize("threads", [32, 64, 1024])
def test_block_sum(threads):
    g = torch.Generator().manual_seed(threads)
    x = torch.randint(-50, 50, (2, threads), generator=g).float()   # exact sums in fp32
    out = torch.empty_like(x)
    simt.selftest_block_sum(out, x, 2, threads)
    assert torch.equal(out, x.sum(1, keepdim=True).expand_as(x))


def test_shuffles():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, (128,), generator=g).float()
    out = torch.empty(128, 4)
    simt.selftest_shuffle(out.view(-1), x, 2, 64)
    w = x.view(4, 32)                                         # warps
    lane = torch.arange(32)
    assert torch.equal(out[:, 0].view(4, 32), w.sum(1, keepdim=True).expand(4, 32))
    assert torch.equal(out[:, 1].view(4, 32), w[:, 3:4].expand(4, 32))
    down = torch.where(lane < 31, (lane + 1).clamp(max=31), lane)
    assert torch.equal(out[:, 2].view(4, 32), w[:, down])
    assert torch.equal(out[:, 3].view(4, 32), w[:, lane ^ 1])


@pytest.mark.parametrize("which,match", [
    (0, r"deadlock in block \(0, 0, 0\): of 64 threads, 16 wait at __syncthreads, 0 at a warp "
        r"operation .*, 48 have exited"),
    (1, r"deadlock .* of 64 threads, 63 wait at __syncthreads, .* 1 have exited"),
    (2, r"mask 0x1 does not include the calling lane"),
])
def test_faults_are_reported_by_name(which, match):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=match):
        simt.selftest_fault(out, 64, which)
    # the emulator is usable again afterwards
    assert torch.equal(_reverse(1, 32, True, 0), _want_reverse(1, 32))


def test_bad_launch_configuration():
    with pytest.raises(RuntimeError, match="invalid launch configuration"):
        simt.selftest_launch(2048)


def test_dynamic_shared_memory_starts_as_garbage_in_every_block():
    out = torch.zeros(3 * 40, dtype=torch.uint8)
    simt.selftest_dynamic_smem(out, 3, 64, 40)
    assert bool((out == 0xFF).all())
