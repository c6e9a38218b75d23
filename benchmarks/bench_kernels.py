"""Kernel microbenchmarks: each compiled op against its PyTorch reference, in GB/s and as a
share of the copy bandwidth measured in the same run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse

import torch

from harness import Row, copy_peak_gbs, machine, report, time_fn
from qwen_fast import ops, reference

# Tokens per call: decode (1), a batch of decode steps (16), prefill-sized blocks (512, 4096).
TOKENS = [1, 16, 512, 4096]
# Qwen-1.8B: hidden 2048 = 16 heads x head_dim 128 (rotary dim 128), MLP intermediate 5504.
HIDDEN, HEADS, HEAD_DIM, FFN = 2048, 16, 128, 5504


def cases(tokens: int, dtype, device):
    """(case, shape, bytes moved, kernel, reference) for each op at this many tokens."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    e = torch.empty((), dtype=dtype).element_size()
    x, r, w = randn(tokens, HIDDEN), randn(tokens, HIDDEN), randn(HIDDEN)
    act = tokens * HIDDEN * e
    # bytes: read x (+ residual), read weight, write out (+ residual_out)
    yield ("rms_norm", f"{tokens}x{HIDDEN}", act + HIDDEN * e + act,
           lambda: ops.rms_norm(x, w), lambda: reference.rms_norm(x, w))
    yield ("fused_add_rms_norm", f"{tokens}x{HIDDEN}", 2 * act + HIDDEN * e + 2 * act,
           lambda: ops.fused_add_rms_norm(x, r, w), lambda: reference.fused_add_rms_norm(x, r, w))
    # q as the model passes it: a strided view of the fused qkv output, one sequence of `tokens`.
    q = randn(1, tokens, 3 * HIDDEN).view(1, tokens, 3, HEADS, HEAD_DIM).unbind(2)[0]
    cos, sin = (randn(1, tokens, HEAD_DIM, dt=torch.float32) for _ in range(2))
    # bytes: read q, read cos and sin (fp32), write out
    yield ("rotary_embedding", f"1x{tokens}x{HEADS}x{HEAD_DIM}",
           act + 2 * tokens * HEAD_DIM * 4 + act,
           lambda: ops.rotary_embedding(q, cos, sin), lambda: reference.rotary_embedding(q, cos, sin))
    up, gate = randn(tokens, FFN), randn(tokens, FFN)
    # bytes: read up and gate, write out
    yield ("swiglu", f"{tokens}x{FFN}", 3 * tokens * FFN * e,
           lambda: ops.swiglu(up, gate), lambda: reference.swiglu(up, gate))


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
    for tokens in TOKENS:
        for name, shape, nbytes, kernel, ref in cases(tokens, dtype, device):
            _measure(name, shape, nbytes, kernel, ref, args.dtype, device, peak, out)
    for name, nbytes, kernel, ref in attention_cases(dtype, device):
        _measure("attention", name.split(" ", 1)[1], nbytes, kernel, ref, args.dtype, device, peak, out)
    meta = dict(machine(), device=str(device), copy_peak_gbs=round(peak, 1),
                build=ops.build_info())
    report(f"kernels-{device.type}", out, meta)


if __name__ == "__main__":
    main()
