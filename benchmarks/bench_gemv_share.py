"""The decode GEMVs alone, against the read pass, interleaved: one "token" runs the five
projections of every layer once (M = 1, int4 or int8, Qwen-1.8B's shapes, --layers layers of
their own random weights: far more bytes than the caches hold), then a 1 GiB read pass (torch's
sum, the bench's roofline); each round gives both rates, and the share is taken per round, so it
is the GEMVs' share of the bandwidth the machine had at that moment.

    .venv/bin/python benchmarks/bench_gemv_share.py [--bits 4,8] [--rounds 10] [--json out.json]

What it isolates: a decode step's share of the read pass (qwen_fast.bench) also pays for the
lm_head, attention, norms, sampling and the step's Python; this is the projections' own share.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from qwen_fast import ops
from qwen_fast.qweight import QuantWeight

# Qwen-1.8B's projections of one layer: (out_features, in_features).
SHAPES = [(6144, 2048), (2048, 2048), (5504, 2048), (5504, 2048), (2048, 5504)]


def run(bits: int, layers: int, rounds: int, read_bytes: int, shapes=SHAPES) -> dict:
    g = torch.Generator().manual_seed(0)
    ws = [QuantWeight.quantize((torch.randn(n, k, generator=g) * 0.02).bfloat16(), bits)
          for _ in range(layers) for (n, k) in shapes]
    nbytes = sum(w.nbytes for w in ws)
    xs = {k: torch.randn(1, k, generator=g).bfloat16() for k in {k for _, k in shapes}}
    ks = [k for _ in range(layers) for _, k in shapes]
    buf = torch.ones(read_bytes // 4)

    def token():
        for w, k in zip(ws, ks):
            ops.quant_linear(xs[k], w)
    token()
    buf.sum()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        token()
        t1 = time.perf_counter()
        buf.sum()
        t2 = time.perf_counter()
        gemv, read = nbytes / (t1 - t0) / 1e9, buf.numel() * 4 / (t2 - t1) / 1e9
        out.append({"gemv_gb_s": gemv, "read_gb_s": read, "share": gemv / read})
    return {"bits": bits, "layers": layers, "weight_bytes": nbytes, "rounds": out,
            "median_share": statistics.median(r["share"] for r in out),
            "median_read_gb_s": statistics.median(r["read_gb_s"] for r in out)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,8", help="comma-separated: 4, 8")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--read-mib", type=int, default=1024, help="size of the read pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    bits = []
    for b in args.bits.split(","):
        if b.strip() not in ("4", "8"):
            p.error(f"--bits: expected 4 and/or 8, got {b!r}")
        bits.append(int(b))
    if args.layers < 1 or args.rounds < 1 or args.read_mib < 1:
        p.error("--layers, --rounds and --read-mib must be at least 1")
    if not ops.HAVE_C:
        p.error("needs the compiled extension (qwen_fast._C)")
    torch.set_num_threads(args.threads)
    res = []
    for b in bits:
        r = run(b, args.layers, args.rounds, args.read_mib * 2**20)
        res.append(r)
        print(f"int{b}: {r['weight_bytes'] / 1e6:.0f} MB a token; per round (GEMV GB/s / read "
              "GB/s = share): " + ", ".join(f"{x['gemv_gb_s']:.1f}/{x['read_gb_s']:.1f}="
                                           f"{x['share']:.2f}" for x in r["rounds"])
              + f"; median share {r['median_share']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
