"""End-to-end decode benchmark, full-size Qwen-1.8B shapes with random weights: the same code as
``qwen-fast bench`` (qwen_fast/bench.py), writing its JSON and markdown to benchmarks/results/.

    python benchmarks/bench_decode.py [--dtype bfloat16] [--backend auto,reference]
        [--prompt-tokens 128] [--new-tokens 16] [--context N[,N]] [--threads N]
        [--quant none|int4|int8] [--lm-head-quant none|int4|int8] [--json FILE]
"""
from __future__ import annotations

import time
from pathlib import Path

from qwen_fast.bench import build_parser, format_table, main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = build_parser().parse_args()
    RESULTS.mkdir(exist_ok=True)
    name = f"decode-{args.device}-{args.dtype}"
    if args.quant != "none":
        name += f"-{args.quant}-lm_head-{args.lm_head_quant}"
    args.json_path = args.json_path or str(RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    (RESULTS / f"{name}-latest.md").write_text(format_table(main(args=args)))
