"""The per-token cost of constrained decoding (response_format / json_schema).

    python benchmarks/bench_constrained.py [--tokens 200] [--decode] [--quant int4]

1. Along a JSON document's tokens (the real vocabulary, a schema with nested objects, arrays and
   strings): the time llguidance takes to compute each step's mask, to turn it into a bool
   tensor over the 151,936 ids, and the sampler's time with the mask against without (greedy,
   and seeded sampling at temperature 0.7 / top-p 0.8), on bf16 logits.
2. With --decode: full-size random weights (load_format="dummy"), greedy decode of the same
   prompt with json_schema on and off, alternating, ms per token each and their ratio.

Every number comes from this run; the table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qwen_fast.constrained import JsonConstraint
from qwen_fast.sampling import SamplingParams, sample_next
from qwen_fast.tokenizer import QwenTokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string"}}},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "address", "tags"]}
DOC = {"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "zip": "W1"},
       "tags": ["mathematician", "writer", "analyst", "first programmer"]}


def _us(xs):
    return statistics.median(xs) * 1e6


def mask_costs(tok, V: int, rounds: int) -> dict:
    text = json.dumps(DOC)
    ids = tok.encode(text)
    logits = torch.randn(V).to(torch.bfloat16)
    hist = torch.tensor(ids[:8])
    greedy = SamplingParams(temperature=0, repetition_penalty=1.1)
    sampled = SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.1)
    out = {k: [] for k in ("mask", "to_bool", "greedy", "greedy_masked", "sample", "sample_masked")}
    for _ in range(rounds):
        c = JsonConstraint.compile(tok, SCHEMA, V)
        for t in ids:
            t0 = time.perf_counter()
            c.compute()
            t1 = time.perf_counter()
            allowed = c.as_tensor()
            t2 = time.perf_counter()
            out["mask"].append(t1 - t0)
            out["to_bool"].append(t2 - t1)
            for key, p, a in (("greedy", greedy, None), ("greedy_masked", greedy, allowed),
                              ("sample", sampled, None), ("sample_masked", sampled, allowed)):
                g = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                sample_next(logits, hist, p, g, 151851, None, a)
                out[key].append(time.perf_counter() - t0)
            c.accept(t)
    return {k: _us(v) for k, v in out.items()} | {"tokens": len(ids)}


def decode_costs(args) -> dict:
    from qwen_fast import Engine
    eng = Engine.from_pretrained(None, load_format="dummy", dtype="bfloat16", quant=args.quant,
                                 lm_head_quant=args.quant)
    prompt = "Describe a person as JSON:"
    runs = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            kw = {"json_schema": {"type": "string"}} if mode == "on" else {}
            r = eng.generate(prompt, max_new_tokens=args.new_tokens, temperature=0,
                             ignore_eos=True, **kw)
            n = len(r.token_ids)
            if n > 1:
                runs[mode].append(r.decode_s / (n - 1) * 1e3)
    eng.close()
    return {k: statistics.median(v) for k, v in runs.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", action="store_true", help="also full-size decode, on and off")
    ap.add_argument("--quant", default="int4", help="weights for --decode (none, int8, int4)")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = QwenTokenizer.default()
    V = 151936
    JsonConstraint.compile(tok, SCHEMA, V)          # builds llguidance's tokenizer once (~0.7 s)
    m = mask_costs(tok, V, args.rounds)
    print(f"# constrained decoding, per token (median over {m['tokens']} tokens x {args.rounds} rounds)\n")
    print("| step | us |\n|---|---|")
    print(f"| llguidance mask | {m['mask']:.1f} |")
    print(f"| mask -> bool tensor | {m['to_bool']:.1f} |")
    print(f"| greedy sampling, unmasked / masked | {m['greedy']:.0f} / {m['greedy_masked']:.0f} |")
    print(f"| sampling (T 0.7, top-p 0.8), unmasked / masked | {m['sample']:.0f} / {m['sample_masked']:.0f} |")
    extra = m["mask"] + m["to_bool"] + m["greedy_masked"] - m["greedy"]
    print(f"\ngreedy: {extra:.0f} us a token on top of unconstrained decoding")
    if args.decode:
        d = decode_costs(args)
        print(f"\nfull-size {args.quant} decode, greedy, {args.new_tokens} tokens, median of "
              f"{args.rounds}: off {d['off']:.2f} ms/token, json_schema on {d['on']:.2f} ms/token "
              f"({d['on'] / d['off']:.3f}x)")


if __name__ == "__main__":
    main()
