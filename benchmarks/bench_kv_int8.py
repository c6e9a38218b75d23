"""Decode with the int8 KV cache against the 16-bit one: full-size Qwen-1.8B (dummy weights,
int4 layers and lm_head by default, bf16 activations), one sequence with CONTEXT cached
positions, the two caches filled with the same random keys and values (no prefill: the int8 one
holds reference.quantize_kv of the other's), decode steps timed alternately, per thread count.

    python benchmarks/bench_kv_int8.py [--context 4096] [--steps 9] [--threads 2,1] [--quant int4]

The step runs the fused decode layers (_C.DecodeLayer) with either cache; the speed-up is the
16-bit cache's median step time over the int8 cache's (measured in the same run, alternating).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import Row, copy_peak_gbs, machine, report
from qwen_fast import Engine, reference
from qwen_fast.testing import PagedBatch


def fill(batch: PagedBatch, context: int, gen: torch.Generator, dtype) -> None:
    """The same random keys and values in every layer of either cache (int8: their codes and
    scales), and the sequence's length set to `context`."""
    pool = batch.pool
    for li in range(len(pool.k)):
        for pages, scales in ((pool.k, pool.k_scales), (pool.v, pool.v_scales)):
            x = (torch.randn(pages[li].shape, generator=gen) * 0.5).to(dtype)
            if scales is None:
                pages[li].copy_(x)
            else:
                codes, s = reference.quantize_kv(x, group=pool.cfg.head_dim // scales[li].shape[-1])
                pages[li].copy_(codes)
                scales[li].copy_(s)
    batch.lengths[0] = context
    batch.alpha[0] = 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    ap.add_argument("--quant", default="int4", choices=["none", "int4", "int8"])
    ap.add_argument("--page-size", type=int, default=64)
    args = ap.parse_args()
    quant = None if args.quant == "none" else args.quant
    model = Engine.from_pretrained(load_format="dummy", config="qwen-1.8b-chat", dtype="bfloat16",
                                   quant=quant, lm_head_quant=quant, backend="auto").model
    caches = {}
    for name, kv_dtype in (("bf16 KV cache", None), ("int8 KV cache", torch.int8)):
        b = PagedBatch(model, 1, args.context + args.steps * 4 + 8, page_size=args.page_size,
                       kv_dtype=kv_dtype)
        fill(b, args.context, torch.Generator().manual_seed(0), model.dtype)   # the same values
        caches[name] = b
    peak = copy_peak_gbs("cpu")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        times = {name: [] for name in caches}
        for b in caches.values():
            b.forward([[5]])                                  # warm-up step
        for _ in range(args.steps):
            for name, b in caches.items():
                t0 = time.perf_counter()
                b.forward([[7]])
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, t in med.items():
            kv = caches[name].pool.page_bytes(model.cfg, 1, caches[name].pool.kv_dtype)
            rows.append(Row("decode step", name, f"ctx {args.context}, {threads} thread(s)",
                            "bfloat16", t * 1e6, kv * args.context, kv * args.context / t / 1e9,
                            100 * kv * args.context / t / 1e9 / peak,
                            med["bf16 KV cache"] / t if name != "bf16 KV cache" else None,
                            extra={"step_ms": [round(x * 1e3, 1) for x in times[name]]}))
    report("kv-int8-cpu", rows, dict(machine(), quant=args.quant, page_size=args.page_size,
                                     copy_peak_gbs=round(peak, 1),
                                     note="time in us per decode step (median); bytes: the KV "
                                          "cache the step reads (all layers); speed-up = bf16 "
                                          "cache step / int8 cache step, same run"))


if __name__ == "__main__":
    main()
