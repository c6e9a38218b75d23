"""Prefix caching, measured in one run with caching on and off (the same weights, two engines):

  (a) a multi-turn chat: each turn adds about --turn-tokens tokens of question to the history
      (and the answer, --answer-tokens greedy tokens): TTFT of every turn, on and off;
  (b) --shared requests sharing a --system-tokens system prompt, each with its own 50-token
      question, sent together: total time and TTFT p50/p99, on and off.

    .venv/bin/python benchmarks/bench_prefix.py [--quant int4] [--turns 8] [--json out.json]

(The comparison with llama.cpp's llama-server is not written yet.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from qwen_fast import Engine


def _prompt(engine, n, g):
    vocab = len(engine.tokenizer) - 208          # plain BPE ids: no special tokens
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def multi_turn(on, off, args) -> list:
    g = torch.Generator().manual_seed(0)
    tok = on.tokenizer
    history = []                                 # ids of the conversation so far
    rows = []
    for turn in range(1, args.turns + 1):
        question = _prompt(on, args.turn_tokens, g)
        ids = history + question
        row = {"turn": turn, "prompt_tokens": len(ids)}
        for name, e in (("on", on), ("off", off)):
            r = e.generate(ids, max_new_tokens=args.answer_tokens, temperature=0, ignore_eos=True)
            row[f"ttft_{name}_s"] = r.prefill_s
            row[f"cached_{name}"] = r.cached_tokens
            answer = r.token_ids
        row["ratio"] = row["ttft_off_s"] / row["ttft_on_s"]
        rows.append(row)
        print(f"turn {turn}: {len(ids)} prompt tokens, TTFT on {row['ttft_on_s']:.2f} s "
              f"({row['cached_on']} cached), off {row['ttft_off_s']:.2f} s: {row['ratio']:.1f}x",
              flush=True)
        history = ids + answer
    del tok
    return rows


def shared_prompt(on, off, args) -> dict:
    g = torch.Generator().manual_seed(1)
    system = _prompt(on, args.system_tokens, g)
    prompts = [system + _prompt(on, 50, g) for _ in range(args.shared)]
    out = {}
    for name, e in (("on", on), ("off", off)):
        e.generate(system + [1], max_new_tokens=1, temperature=0) if name == "on" else None
        results = [None] * len(prompts)

        def run(i):
            results[i] = e.generate(prompts[i], max_new_tokens=8, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = time.perf_counter() - t0
        ttft = sorted(r.prefill_s for r in results)
        out[name] = {"total_s": total, "ttft_p50_s": statistics.median(ttft),
                     "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
                     "cached_tokens": [r.cached_tokens for r in results]}
        print(f"shared {name}: total {total:.1f} s, TTFT p50 {out[name]['ttft_p50_s']:.2f} s, "
              f"p99 {out[name]['ttft_p99_s']:.2f} s", flush=True)
    out["ttft_p50_ratio"] = out["on"]["ttft_p50_s"] / out["off"]["ttft_p50_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen-1.8b-chat")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="int4", choices=["none", "int4", "int8"])
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--turn-tokens", type=int, default=200)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--shared", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    quant = None if args.quant == "none" else args.quant
    if args.config == "tiny":                   # a smoke run: the test-size model
        from qwen_fast.testing import tiny_config
        args.config = tiny_config(seq_length=8192, max_position_embeddings=8192)
    on = Engine.from_pretrained(load_format="dummy", config=args.config, dtype=args.dtype,
                                quant=quant, lm_head_quant=quant, max_batch_size=16,
                                kv_cache_budget=4 * 2**30)
    off = Engine(on.model, on.tokenizer, on.generation_config, max_batch_size=16,
                 kv_cache_budget=4 * 2**30, prefix_caching=False)
    on.generate(_prompt(on, 8, torch.Generator().manual_seed(9)), max_new_tokens=2)   # warm-up
    out = {"args": {k: str(v) for k, v in vars(args).items()},
           "multi_turn": multi_turn(on, off, args), "shared": shared_prompt(on, off, args)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    on.close()
    off.close()


if __name__ == "__main__":
    sys.exit(main())
