"""Continuous batching, measured: n requests sent at once by n threads (one shared decode
batch, qwen_fast/scheduler.py) against the same n requests one after another, on the full-size
model with random weights. Prints total output tokens/s of both and their ratio, per n, timed
interleaved (sequential, then concurrent, for each n in turn) in one run.

    python benchmarks/bench_batching.py [--quant int4] [--lm-head-quant int4] [--dtype bfloat16]
        [--n 1,2,4,8] [--new-tokens 32] [--prompt-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from qwen_fast import Engine

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="qwen-1.8b-chat")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quant", default=None, choices=[None, "int4", "int8"])
    ap.add_argument("--lm-head-quant", default=None, choices=[None, "int4", "int8"])
    ap.add_argument("--n", default="1,2,4,8", help="concurrent requests to try, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(v) for v in args.n.split(",")]
    config = args.config
    if config == "tiny":
        from qwen_fast.testing import tiny_config
        config = tiny_config()
    e = Engine.from_pretrained(load_format="dummy", config=config, dtype=args.dtype,
                               device=args.device, quant=args.quant,
                               lm_head_quant=args.lm_head_quant, max_batch_size=max(ns))
    g = torch.Generator().manual_seed(0)
    vocab = len(e.tokenizer) - 208

    def prompt(i):
        return torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()

    kw = dict(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    e.generate(prompt(0)[:8], max_new_tokens=2, temperature=0)           # warm-up
    rows = []
    for n in ns:
        prompts = [prompt(i) for i in range(n)]
        t0 = time.perf_counter()
        seq = [e.generate(p, **kw) for p in prompts]
        t_seq = time.perf_counter() - t0
        out = [None] * n

        def run(i):
            out[i] = e.generate(prompts[i], **kw)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_con = time.perf_counter() - t0
        same = all(a.token_ids == b.token_ids for a, b in zip(seq, out))
        tokens = n * args.new_tokens
        rows.append({"n": n, "sequential_tok_s": tokens / t_seq, "concurrent_tok_s": tokens / t_con,
                     "speedup": t_seq / t_con, "greedy_tokens_equal": same})
        print(f"[bench_batching] n={n}: sequential {tokens / t_seq:.1f} tok/s, concurrent "
              f"{tokens / t_con:.1f} tok/s ({t_seq / t_con:.2f}x), same tokens: {same}", flush=True)
    what = f"{args.config} {args.dtype}" + (f" {args.quant} (lm_head {args.lm_head_quant})" if args.quant else "")
    md = [f"# continuous batching: {what}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens "
          f"each, {torch.get_num_threads()} threads, device {args.device}", "",
          "Total output tokens/s of n requests sent together by n threads (one decode batch) "
          "against the same requests one after another, same run (prefill included in both).", "",
          "| n | one after another tok/s | together tok/s | speed-up | greedy tokens equal |",
          "|---|---|---|---|---|"]
    md += [f"| {r['n']} | {r['sequential_tok_s']:.1f} | {r['concurrent_tok_s']:.1f} | "
           f"{r['speedup']:.2f}x | {r['greedy_tokens_equal']} |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"batching-{args.device}-{stamp}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (RESULTS / f"batching-{args.device}-latest.md").write_text(text)


if __name__ == "__main__":
    main()
