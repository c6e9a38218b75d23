"""Kernel microbenchmarks: each compiled op against a baseline timed in the same run (the PyTorch
reference; for linear, torch's own F.linear), in GB/s and as a share of the copy and read-only
bandwidths measured in the same run.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--dtype bfloat16] [--cases rms_norm,linear]

--cases kv_int8: attention over the int8 KV cache against the 16-bit cache at decode (4096
cached keys), its speed-up the ratio of the two times.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from harness import Row, copy_peak_gbs, machine, read_pass, read_peak_gbs, report, time_fns
from qwen_fast import ops, reference

# Qwen-1.8B's projections: (name, N = out_features, K = in_features, has bias).
LINEAR_SHAPES = [
    ("c_attn", 6144, 2048, True),
    ("mlp.w1", 5504, 2048, False),   # mlp.w2 has the same shape
    ("mlp.c_proj", 2048, 5504, False),
    ("lm_head", 151936, 2048, False),
]
DECODE_ROWS = (1, 4)   # one sequence / four sequences decoding together
PREFILL_ROWS = 128     # a prompt chunk; not for lm_head (prefill projects only the last position)
READ_PASS_BYTES = 2**30


@dataclass
class Case:
    name: str
    shape: str
    nbytes: int
    flops: int | None
    kernel: Callable[[], object]
    baseline: Callable[[], object]
    baseline_impl: str
    # Read the weights from memory, not the cache: in the model every layer has its own, 0.9-3.7
    # GB in all, so a decode step always streams them from DRAM. Such a case is timed
    # interleaved with a read pass, its roofline at that moment.
    cold_cache: bool = False
    # More implementations to time against the baseline: (impl, fn).
    variants: tuple = ()
    # The baseline's bytes where they differ from the kernel's (the int8 cache against the bf16
    # one): each row's GB/s is then of its own bytes, and the speed-up is still of the times.
    baseline_nbytes: int | None = None


# Tokens per call: decode (1), a batch of decode steps (16), prefill-sized blocks (512, 4096).
TOKENS = [1, 16, 512, 4096]
# Qwen-1.8B: hidden 2048 = 16 heads x head_dim 128 (rotary dim 128), MLP intermediate 5504.
HIDDEN, HEADS, HEAD_DIM, FFN = 2048, 16, 128, 5504


def _elementwise(tokens: int, dtype, device):
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
    # The model's step: q out, k rotated and v copied into its pages, one sequence of `tokens`
    # after 64 cached ones.
    qkv = randn(tokens, 3 * HIDDEN).view(tokens, 3, HEADS, HEAD_DIM).unbind(1)
    kp, vp, meta = _pages([(64, tokens)], dtype, device, g)
    kv = (*qkv, cos[0], sin[0], kp, vp, *meta)
    # bytes: read q, k, v, cos and sin (and each token's sequence and position), write q out and
    # the keys and values into the pages
    yield ("rotary_kv_cache", f"{tokens}x{HEADS}x{HEAD_DIM} P{PAGE_SIZE}",
           3 * act + 2 * tokens * HEAD_DIM * 4 + 2 * tokens * 4 + 3 * act,
           lambda: ops.rotary_kv_cache(*kv), lambda: reference.rotary_kv_cache(*kv))
    up, gate = randn(tokens, FFN), randn(tokens, FFN)
    # bytes: read up and gate, write out
    yield ("swiglu", f"{tokens}x{FFN}", 3 * tokens * FFN * e,
           lambda: ops.swiglu(up, gate), lambda: reference.swiglu(up, gate))


# Positions per KV page (qwen_fast.kv_cache.DEFAULT_PAGE_SIZE).
PAGE_SIZE = 64


def _pages(seqs, dtype, device, g, H=HEADS, D=HEAD_DIM, P=PAGE_SIZE):
    """Random page pools [pages, H, P, D] for sequences of (cached, new) tokens, each sequence's
    pages drawn from a shuffled pool, and the step's (page_table, token_seq, token_pos), all on
    device."""
    need = [(c + n + P - 1) // P for c, n in seqs]
    perm = torch.randperm(sum(need), generator=g).to(torch.int32)
    table = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    at = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[at:at + n]
        at += n
    token_seq = torch.tensor([s for s, (c, n) in enumerate(seqs) for _ in range(n)],
                             dtype=torch.int32)
    token_pos = torch.tensor([p for c, n in seqs for p in range(c, c + n)], dtype=torch.int32)
    kp, vp = (torch.randn(sum(need), H, P, D, generator=g).to(device=device, dtype=dtype)
              for _ in range(2))
    return kp, vp, tuple(t.to(device) for t in (table, token_seq, token_pos))


# (label, [(cached, new) per sequence]): decode at a short and a long context, 4 sequences
# decoding, a 128-token prefill, and a mixed step (a 37-token chunk packed with 3 decode rows);
# on a GPU also 4096 cached tokens (the decode target of the CUDA kernel).
ATTENTION_STEPS = [
    ("decode S128", [(127, 1)]),
    ("decode S2048", [(2047, 1)]),
    ("4 x decode S2048", [(2047, 1)] * 4),
    ("prefill 128", [(0, 128)]),
    ("chunk 37 + 3 x decode S2048", [(1000, 37)] + [(2047, 1)] * 3),
]
CUDA_ATTENTION_STEPS = [
    ("decode S4096", [(4095, 1)]),
    ("4 x decode S4096", [(4095, 1)] * 4),
]


def attention_cases(dtype, device) -> Iterator[Case]:
    """Qwen-1.8B attention (16 heads of 128) over pages of PAGE_SIZE positions; bytes: the keys
    and values each query token reads (a prefill chunk's tokens share theirs, so there the rate
    counts every token's reads, not DRAM traffic), q, out and the step's metadata."""
    H, D = 16, 128
    g = torch.Generator(device="cpu").manual_seed(0)
    steps = ATTENTION_STEPS + (CUDA_ATTENTION_STEPS if torch.device(device).type == "cuda" else [])
    for label, seqs in steps:
        kp, vp, meta = _pages(seqs, dtype, device, g, H, D)
        n_tokens = sum(n for _, n in seqs)
        q = torch.randn(n_tokens, H, D, generator=g).to(device=device, dtype=dtype)
        max_keys = max(c + n for c, n in seqs)
        e = q.element_size()
        keys_read = sum(p + 1 for c, n in seqs for p in range(c, c + n))
        nbytes = 2 * keys_read * H * D * e + 2 * q.numel() * e + meta[0].numel() * 4 + 2 * n_tokens * 4
        yield Case("attention", f"{label} P{PAGE_SIZE}", nbytes, None,
                   lambda q=q, kp=kp, vp=vp, m=meta, mk=max_keys: ops.attention(q, kp, vp, *m,
                                                                              max_keys=mk),
                   lambda q=q, kp=kp, vp=vp, m=meta: reference.attention(q, kp, vp, *m),
                   "reference")


# The int8 KV cache against the 16-bit one at decode, where attention streams the whole cache
# (kv_group: elements per scale, 128 = one scale per position and head, the default).
KV_INT8_STEPS = [("decode S4096", [(4095, 1)])]
KV_INT8_GROUPS = (128, 32)


def kv_int8_cases(dtype, device) -> Iterator[Case]:
    """attention over the int8 cache (ops.attention with k_scales / v_scales) against the same
    step over the cache in `dtype`, both timed interleaved with the caches evicted before each
    run (in a decode step every layer's weights pass between two reads of its cache). bytes: the
    codes and scales (or the 16-bit keys and values) the token reads, q, out and the metadata;
    speed-up = 16-bit cache time / int8 cache time."""
    H, D = HEADS, HEAD_DIM
    g = torch.Generator(device="cpu").manual_seed(0)
    for label, seqs in KV_INT8_STEPS:
        kp, vp, meta = _pages(seqs, dtype, device, g, H, D)
        n_tokens = sum(n for _, n in seqs)
        q = torch.randn(n_tokens, H, D, generator=g).to(device=device, dtype=dtype)
        max_keys = max(c + n for c, n in seqs)
        keys_read = sum(p + 1 for c, n in seqs for p in range(c, c + n))
        e = q.element_size()
        other = 2 * q.numel() * e + meta[0].numel() * 4 + 2 * n_tokens * 4
        for group in KV_INT8_GROUPS:
            (k8, ks), (v8, vs) = (reference.quantize_kv(x, group=group) for x in (kp, vp))
            nbytes = 2 * keys_read * H * (D + 4 * (D // group)) + other
            yield Case("attention, int8 KV cache", f"{label} P{PAGE_SIZE} G{D // group}", nbytes,
                       None,
                       lambda q=q, m=meta, mk=max_keys, c=(k8, v8, ks, vs): ops.attention(
                           q, c[0], c[1], *m, max_keys=mk, k_scales=c[2], v_scales=c[3]),
                       lambda q=q, kp=kp, vp=vp, m=meta, mk=max_keys: ops.attention(
                           q, kp, vp, *m, max_keys=mk),
                       f"{dtype} KV cache".replace("torch.", ""), cold_cache=True,
                       baseline_nbytes=2 * keys_read * H * D * e + other)


def _randn(*shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def elementwise_cases(dtype, device) -> Iterator[Case]:
    """rms_norm, fused_add_rms_norm, rotary_embedding, rotary_kv_cache and swiglu at every token
    count."""
    for tokens in TOKENS:
        for name, shape, nbytes, kernel, ref in _elementwise(tokens, dtype, device):
            yield Case(name, shape, nbytes, None, kernel, ref, "reference")


def linear_cases(dtype, device) -> Iterator[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    best = ops._C.linear_isas()[0]     # the CPU kernel's best level (forced variants, CPU only)
    for name, n, k, has_bias in LINEAR_SHAPES:
        w = _randn(n, k, dtype=dtype, device=device, gen=g)
        b = _randn(n, dtype=dtype, device=device, gen=g) if has_bias else None
        e = w.element_size()
        rows = DECODE_ROWS + ((PREFILL_ROWS,) if name != "lm_head" else ())
        for m in rows:
            x = _randn(m, k, dtype=dtype, device=device, gen=g)
            # bytes: read the weight (and bias) once, read x, write y
            nbytes = n * k * e + (n * e if has_bias else 0) + m * k * e + m * n * e
            flops = 2 * m * n * k + (m * n if has_bias else 0)
            # Past the decode sizes ops.linear may hand bf16 / fp32 to torch (csrc/ops/linear.cpp):
            # time our kernel there too, forced, to show where the crossover lies.
            forced = ((("kernel, forced", lambda: ops._C.linear(x, w, b, isa=best)),)
                      if m > 16 and torch.device(device).type == "cpu" else ())
            yield Case(f"linear {name}", f"{m}x{k} @ {n}x{k}^T", nbytes, flops,
                       lambda: ops.linear(x, w, b), lambda: F.linear(x, w, b), "torch F.linear",
                       cold_cache=True, variants=forced)


def quant_linear_cases(dtype, device) -> Iterator[Case]:
    """int4_gemm / int8_gemm (ops.quant_linear) on Qwen's projections, against F.linear on the
    dense bf16 weight (what the same layer costs unquantized), with the kernel's AVX2 and
    portable paths as variants (where this CPU has them).
    bytes: the packed weights (scales included), x and y."""
    from qwen_fast.qweight import QuantWeight
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, n, k, _ in LINEAR_SHAPES:
        dense = _randn(n, k, dtype=dtype, device="cpu", gen=g) * 0.02
        packed = {bits: QuantWeight.quantize(dense, bits).to(device) for bits in (4, 8)}  # on the CPU
        dense = dense.to(device)
        for bits, w in packed.items():
            for m in DECODE_ROWS + ((PREFILL_ROWS,) if name != "lm_head" else ()):
                x = _randn(m, k, dtype=dtype, device=device, gen=g)
                e = x.element_size()
                nbytes = w.nbytes + m * k * e + m * n * e
                yield Case(f"int{bits} linear {name}", f"{m}x{k} @ {n}x{k}^T", nbytes, 2 * m * n * k,
                           lambda x=x, w=w: ops.quant_linear(x, w),
                           lambda x=x, d=dense: F.linear(x, d), f"torch F.linear ({dtype})",
                           cold_cache=True,
                           variants=() if cuda else tuple(
                               (f"kernel, {label}",
                                lambda x=x, w=w, isa=isa: ops.quant_linear(x, w, isa=isa))
                               for isa, label in (("avx2", "AVX2 path"), ("scalar", "portable path"))
                               if isa in ops._C.quant_linear_isas()))


CASES = {"elementwise": elementwise_cases, "attention": attention_cases, "linear": linear_cases,
         "quant_linear": quant_linear_cases, "kv_int8": kv_int8_cases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated families among {', '.join(CASES)}")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    families = args.cases.split(",")
    unknown = set(families) - set(CASES)
    if unknown:
        ap.error(f"unknown case families {sorted(unknown)}; choose among {list(CASES)}")
    if device.type == "cuda" and "linear" in families:
        print("linear: no CUDA kernel yet (ops.linear runs F.linear on CUDA); skipped")
        families.remove("linear")
    peak = copy_peak_gbs(device)
    read_peak = read_peak_gbs(device)
    read_fn = read_pass(device, READ_PASS_BYTES)
    out = []
    for family in families:
        for c in CASES[family](dtype, device):
            impls = [(c.baseline_impl, c.baseline), ("kernel", c.kernel), *c.variants]
            if c.cold_cache:  # all interleaved, caches evicted before every run
                times = time_fns([fn for _, fn in impls] + [read_fn], device, cold_cache=True)
                case_read_peak = READ_PASS_BYTES / times[-1] / 1e9
            else:  # one after the other, each with its data warm in the caches
                times = [time_fns([fn], device)[0] for _, fn in impls]
                case_read_peak = read_peak
            t_base = times[0]
            for (impl, _), t in zip(impls, times):
                nbytes = (c.baseline_nbytes if impl == c.baseline_impl and c.baseline_nbytes
                          else c.nbytes)
                gbs = nbytes / t / 1e9
                out.append(Row(c.name, impl, c.shape, args.dtype, t * 1e6, nbytes, gbs,
                               100 * gbs / peak, t_base / t if impl != c.baseline_impl else None,
                               extra={"read_peak_gbs": round(case_read_peak, 1)},
                               pct_read_peak=100 * gbs / case_read_peak,
                               gflops=c.flops / t / 1e9 if c.flops else None))
    meta = dict(machine(), device=str(device), copy_peak_gbs=round(peak, 1),
                read_peak_gbs=round(read_peak, 1),
                build=ops.build_info(),
                note="speed-up = baseline time / kernel time, timed interleaved; linear cases "
                     "read the weights from memory (caches evicted before each run) and their "
                     "% of read peak is against a 1 GiB read pass interleaved with them; "
                     "'kernel' is ops.linear (torch past 48-128 bf16 / fp32 rows), 'kernel, "
                     "forced' our kernel at the best ISA level")
    report(f"kernels-{device.type}", out, meta)


if __name__ == "__main__":
    main()
