"""fp16 against bf16 activations on the same model, in one process: TTFT of a --prompt-tokens
prompt and the decode rate after it, the two dtypes alternating for --rounds rounds (a shared
machine's speed drifts; only neighbouring runs compare). Each dtype has its own engine on the
same random weights (seed 0, drawn in that dtype, --quant for the layers and the lm_head).

    .venv/bin/python benchmarks/bench_dtype.py [--prompt-tokens 1400] [--rounds 3] [--quant int4]
        [--json out.json] [--md out.md]

Prints each round's fp16 / bf16 time ratios (TTFT, and seconds per decode token) and their
medians; --config tiny is a smoke run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch

from qwen_fast import Engine
sys.path.insert(0, str(Path(__file__).resolve().parent))   # harness, also when loaded by path
from harness import write_outputs  # noqa: E402

DTYPES = ("bfloat16", "float16")


def measure(engines: dict, prompt: List[int], new_tokens: int, rounds: int) -> List[dict]:
    greedy = dict(temperature=0, ignore_eos=True)
    for e in engines.values():
        e.generate(prompt[:8], max_new_tokens=2, **greedy)            # warm-up
    out = []
    for r in range(rounds):
        row = {"round": r + 1}
        for name, e in engines.items():
            res = e.generate(prompt, max_new_tokens=new_tokens + 1, **greedy)
            decoded = res.completion_tokens - 1
            if decoded != new_tokens or not res.decode_s > 0 or not res.prefill_s > 0:
                raise RuntimeError(f"{name}: asked for {new_tokens} decode tokens, got {decoded} "
                                   f"in {res.decode_s} s (prefill {res.prefill_s} s)")
            row[f"ttft_{name}_s"] = res.prefill_s
            row[f"decode_{name}_tok_s"] = decoded / res.decode_s
        row["ttft_ratio"] = row["ttft_float16_s"] / row["ttft_bfloat16_s"]
        row["decode_time_ratio"] = row["decode_bfloat16_tok_s"] / row["decode_float16_tok_s"]
        print(f"round {r + 1}: TTFT fp16 {row['ttft_float16_s']:.2f} s, bf16 "
              f"{row['ttft_bfloat16_s']:.2f} s ({row['ttft_ratio']:.2f}x); decode fp16 "
              f"{row['decode_float16_tok_s']:.1f}, bf16 {row['decode_bfloat16_tok_s']:.1f} tok/s "
              f"(time {row['decode_time_ratio']:.2f}x)", flush=True)
        out.append(row)
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"## fp16 against bf16: {a['config']}, {a['quant']} weights and lm_head, "
             f"{a['prompt_tokens']}-token prompt, {a['new_tokens']} decode tokens", "",
             "| round | TTFT fp16 (s) | TTFT bf16 (s) | fp16 / bf16 | decode fp16 (tok/s) | "
             "decode bf16 (tok/s) | fp16 / bf16 time |", "|---|---|---|---|---|---|---|"]
    for r in res["rounds"]:
        lines.append(f"| {r['round']} | {r['ttft_float16_s']:.2f} | {r['ttft_bfloat16_s']:.2f} | "
                     f"{r['ttft_ratio']:.2f} | {r['decode_float16_tok_s']:.1f} | "
                     f"{r['decode_bfloat16_tok_s']:.1f} | {r['decode_time_ratio']:.2f} |")
    lines += ["", f"Medians: TTFT fp16 / bf16 {res['median_ttft_ratio']:.2f}, decode time "
              f"fp16 / bf16 {res['median_decode_time_ratio']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen-1.8b-chat", help="qwen-1.8b-chat, or tiny (smoke)")
    p.add_argument("--quant", default="int4", choices=["none", "int4", "int8"])
    p.add_argument("--prompt-tokens", type=int, default=1400)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    for name in ("prompt_tokens", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    config = args.config
    if config == "tiny":
        from qwen_fast.testing import tiny_config
        config = tiny_config(seq_length=8192, max_position_embeddings=8192)
    quant = None if args.quant == "none" else args.quant
    engines = {d: Engine.from_pretrained(load_format="dummy", config=config, dtype=d, quant=quant,
                                         lm_head_quant=quant, max_batch_size=1,
                                         kv_cache_budget=2**30, prefix_caching=False)
               for d in DTYPES}
    g = torch.Generator().manual_seed(0)
    vocab = len(engines["bfloat16"].tokenizer) - 208
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
    try:
        rounds = measure(engines, prompt, args.new_tokens, args.rounds)
    finally:
        for e in engines.values():
            e.close()
    res = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
           "median_ttft_ratio": statistics.median(r["ttft_ratio"] for r in rounds),
           "median_decode_time_ratio": statistics.median(r["decode_time_ratio"] for r in rounds)}
    md = markdown(res)
    print("\n" + md, flush=True)
    write_outputs(md, res, args.md, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
