"""Kernel microbenchmarks: each compiled op against its PyTorch reference, in GB/s and as a
share of the copy bandwidth measured in the same run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch

from harness import Row, copy_peak_gbs, machine, report, time_fn
from qwen_fast import ops, reference

# Rows: decode (1 token), a small batch, prefill-sized blocks. Hidden 2048 = Qwen-1.8B.
SHAPES = [(1, 2048), (16, 2048), (512, 2048), (4096, 2048)]


def cases(rows: int, hidden: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(hidden, generator=g).to(device=device, dtype=dtype)
    e = x.element_size()
    act = rows * hidden * e
    # bytes: read x (+ residual), read weight, write out (+ residual_out)
    yield ("rms_norm", act + hidden * e + act,
           lambda: ops.rms_norm(x, w), lambda: reference.rms_norm(x, w))
    yield ("fused_add_rms_norm", 2 * act + hidden * e + 2 * act,
           lambda: ops.fused_add_rms_norm(x, r, w), lambda: reference.fused_add_rms_norm(x, r, w))


# (B, T, S): decode at a short and a long context, a batch of 4 decoding, a 128-token prefill.
ATTENTION_SHAPES = [(1, 1, 128), (1, 1, 2048), (4, 1, 2048), (1, 128, 128)]


def attention_cases(dtype, device):
    """Qwen-1.8B attention (16 heads of 128); bytes: the cached keys and values each query row
    reads (once per sequence and head), q and out."""
    H, D = 16, 128
    g = torch.Generator(device="cpu").manual_seed(0)
    for B, T, S in ATTENTION_SHAPES:
        q = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype)
        start = torch.full((B,), S - T, dtype=torch.long)
        e = q.element_size()
        nbytes = 2 * B * S * H * D * e + 2 * q.numel() * e
        yield (f"attention B{B} T{T} S{S}", nbytes, lambda q=q, k=k, v=v, s=start: ops.attention(q, k, v, s),
               lambda q=q, k=k, v=v, s=start: reference.attention(q, k, v, s))


def _measure(name, shape, nbytes, kernel, ref, dtype_name, device, peak, out):
    t_ref = time_fn(ref, device)
    t_k = time_fn(kernel, device)
    for impl, t, sp in (("reference", t_ref, None), ("kernel", t_k, t_ref / t_k)):
        gbs = nbytes / t / 1e9
        out.append(Row(name, impl, shape, dtype_name, t * 1e6, nbytes, gbs, 100 * gbs / peak, sp))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = copy_peak_gbs(device)
    out = []
    for rows, hidden in SHAPES:
        for name, nbytes, kernel, ref in cases(rows, hidden, dtype, device):
            _measure(name, f"{rows}x{hidden}", nbytes, kernel, ref, args.dtype, device, peak, out)
    for name, nbytes, kernel, ref in attention_cases(dtype, device):
        _measure("attention", name.split(" ", 1)[1], nbytes, kernel, ref, args.dtype, device, peak, out)
    meta = dict(machine(), device=str(device), copy_peak_gbs=round(peak, 1),
                build=ops.build_info())
    report(f"kernels-{device.type}", out, meta)


if __name__ == "__main__":
    main()
