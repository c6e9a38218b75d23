"""Prompt-lookup speculation (qwen_fast/speculative.py), measured in one run:

  verify      the cost of a forward that verifies k drafted tokens (1 + k rows a sequence, with
              the logits of every row) relative to a plain decode step (1 row a sequence), for
              k = 1, 2, 4, 8, 16, at batch 1 and 8, bf16 and int4 weights (int4 lm_head too: a verify
              needs every row's logits, and a bf16 lm_head's 9-row product is compute-bound on a
              small CPU), full-size shapes
              (random weights), --context tokens already cached; all k of one (model, batch)
              timed interleaved (harness.time_fns). Target: k = 8 at most 1.3x one token.
  fixture     the trained fixture (qwen_fast/fixture.py) on input-grounded prompts built from
              held-out standard-library files: repeat a function, repeat it under a new name, and
              continue a file (the least grounded); plain decoding and speculation on each
              prompt, greedy and seeded sampling: the outputs must be identical; acceptance,
              tokens a step, tokens/s and the speed-up.
  projection  the speed-up projected for per-token acceptance rates a (the chance that each
              drafted token is kept, given the ones before it were), from the verify costs
              measured above: E[tokens a step] = (1 - a^(k+1)) / (1 - a), over cost(k). A
              PROJECTION, not a measurement: labelled as such in the output.

    .venv/bin/python benchmarks/bench_speculative.py [--parts verify,fixture,projection]
        [--fixture DIR] [--context 512] [--md out.md] [--json out.json]

--config tiny is a smoke run on the test-size model (the fixture part then uses a random tiny
model whose logits are sharpened, so that it loops and drafts get accepted).
"""
from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from qwen_fast import Engine
from qwen_fast.testing import PagedBatch, tiny_config
sys.path.insert(0, str(Path(__file__).resolve().parent))   # harness, also when loaded by path
from harness import machine, time_fns, write_outputs  # noqa: E402

KS = (1, 2, 4, 8, 16)


def _log(msg: str) -> None:
    print(f"[bench-speculative] {msg}", file=sys.stderr, flush=True)


# ---- verify cost ---------------------------------------------------------------------------
def verify_costs(args) -> List[dict]:
    rows = []
    for quant in args.quants:
        kw = dict(load_format="dummy", dtype="bfloat16", quant=quant, lm_head_quant=quant,
                  kv_cache_budget=2**26)
        if args.config == "tiny":
            kw["config"] = tiny_config()
        e = Engine.from_pretrained(**kw)
        m = e.model
        g = torch.Generator().manual_seed(0)
        for B in args.batches:
            batch = PagedBatch(m, B, args.context + max(KS) + 1, page_size=64)
            batch.forward([torch.randint(100, 50000, (args.context,), generator=g).tolist()
                           for _ in range(B)])
            n = batch.lengths[:]

            def step(k, B=B, batch=batch, n=n):
                # B sequences of 1 + k tokens at positions n .. n + k: written and read again
                # each call (the cache state does not advance), every row's logits.
                def run():
                    batch.lengths[:] = n
                    batch.forward([list(range(1000, 1001 + k))] * B, all_logits=True)
                return run
            ks = (0,) + KS
            _log(f"{quant or 'bf16'} batch {B}: timing k = {ks}")
            times = time_fns([step(k) for k in ks], min_runs=args.runs, min_time_s=0.5, warmup=1)
            for k, t in zip(ks, times):
                rows.append({"weights": quant or "bf16", "batch": B, "k": k, "tokens": B * (1 + k),
                             "ms": t * 1e3, "cost": t / times[0]})
        e.close()
        del e, m
    return rows


def verify_table(rows: List[dict]) -> str:
    out = ["| weights | batch | k | rows | step (ms) | cost vs 1 token |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['weights']} | {r['batch']} | {r['k']} | {r['tokens']} | {r['ms']:.1f} | "
                   f"{r['cost']:.2f}x |")
    return "\n".join(out)


# ---- the fixture ---------------------------------------------------------------------------
def _functions(tok, min_tokens: int, max_tokens: int, count: int) -> List[dict]:
    """Top-level functions of held-out standard-library files, of min..max tokens, with the
    file's text before each."""
    from qwen_fast import fixture as FX
    out = []
    for rel, p in FX.stdlib_files():
        if not FX.held_out(rel) or not rel.endswith(".py"):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if "<|" in text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.end_lineno is None:
                continue
            src = "".join(lines[node.lineno - 1:node.end_lineno])
            n = len(tok.encode(src, allowed_special=set()))
            if min_tokens <= n <= max_tokens:
                out.append({"file": rel, "name": node.name, "src": src,
                            "before": "".join(lines[:node.lineno - 1])})
                break                       # one a file: different files, different styles
        if len(out) >= count:
            break
    return out


def fixture_prompts(tok, count: int, budget: int) -> List[dict]:
    """Input-grounded prompts of at most `budget` tokens: for each function, 'repeat' (the
    function, then its first line again), 'rename' (the function, a comment, then its first line
    under a new name) and 'continue' (the file's text before it, then the function's first line)."""
    prompts = []
    for f in _functions(tok, 60, budget // 2 - 20, count):
        head = f["src"].splitlines(keepends=True)[0]
        new = head.replace(f["name"], f["name"] + "_v2", 1)
        before = tok.encode(f["before"], allowed_special=set())[-(budget - 40):]
        for task, text in (("repeat", f["src"] + "\n\n" + head),
                           ("rename", f["src"] + "\n\n# The same, renamed:\n" + new),
                           ("continue", tok.decode(before) + head)):
            ids = tok.encode(text, allowed_special=set())[-budget:]
            prompts.append({"task": task, "file": f["file"], "function": f["name"], "ids": ids})
    return prompts


def run_fixture(args) -> Dict[str, object]:
    if args.config == "tiny":
        eng = Engine.from_pretrained(load_format="dummy", dtype="float32", config=tiny_config(
            hidden_size=128, num_attention_heads=2, kv_channels=64, intermediate_size=384,
            seq_length=512, max_position_embeddings=512))
        eng.model.lm_head.mul_(40)
        name = "tiny random (sharpened)"
    else:
        from qwen_fast import fixture as FX
        model = Path(args.fixture) if args.fixture else FX.train(FX.Settings(), log=_log)
        eng = Engine.from_pretrained(model, dtype=args.fixture_dtype)
        name = model.name
    budget = eng.cfg.seq_length - args.new_tokens
    prompts = fixture_prompts(eng.tokenizer, args.functions, min(budget, 400))
    if not prompts:
        raise SystemExit("no held-out function fits the prompt budget")
    modes = {"greedy": dict(temperature=0.0, repetition_penalty=1.0),
             "sampled": dict(temperature=0.7, top_p=0.8, repetition_penalty=1.0)}
    rows = []
    for mode, kw in modes.items():
        for i, p in enumerate(prompts):
            kw = dict(kw, max_new_tokens=args.new_tokens, ignore_eos=True)
            if mode == "sampled":
                kw["seed"] = 1000 + i
            eng.generate(p["ids"][:8], max_new_tokens=2)          # warm: same shapes, threads
            eng.clear_prefix_cache()
            t0 = time.perf_counter()
            plain = eng.generate(p["ids"], **kw)
            t1 = time.perf_counter()
            eng.clear_prefix_cache()
            t2 = time.perf_counter()
            spec = eng.generate(p["ids"], speculative="ngram", num_speculative_tokens=args.k, **kw)
            t3 = time.perf_counter()
            eng.clear_prefix_cache()
            same = plain.token_ids == spec.token_ids
            n = len(spec.token_ids)
            # Decode speed: tokens after the first over the time after the first (prefill out).
            rows.append({"mode": mode, "task": p["task"], "file": p["file"], "prompt": len(p["ids"]),
                         "tokens": n, "identical": same, "drafted": spec.num_draft_tokens,
                         "accepted": spec.num_accepted_tokens,
                         "plain_tok_s": plain.decode_tokens_per_s, "spec_tok_s": spec.decode_tokens_per_s,
                         "plain_s": t1 - t0, "spec_s": t3 - t2})
            _log(f"{mode} {p['task']:8s} {p['file'][:30]:30s} identical={same} "
                 f"accepted {spec.num_accepted_tokens}/{spec.num_draft_tokens} "
                 f"{plain.decode_tokens_per_s:.0f} -> {spec.decode_tokens_per_s:.0f} tok/s")
    eng.close()
    return {"model": name, "k": args.k, "new_tokens": args.new_tokens, "rows": rows}


def fixture_table(res: dict) -> str:
    out = ["| sampling | task | prompts | identical | accepted / drafted | tokens a step | "
           "plain tok/s | speculative tok/s | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    rows = res["rows"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode and r["task"] == task]
            if not sel:
                continue
            drafted, acc = sum(r["drafted"] for r in sel), sum(r["accepted"] for r in sel)
            toks = sum(r["tokens"] for r in sel)
            # steps: every output token is one plain step; speculation saves one per accepted
            steps = toks - acc
            plain = statistics.median(r["plain_tok_s"] for r in sel)
            spec = statistics.median(r["spec_tok_s"] for r in sel)
            speed = statistics.median(r["spec_tok_s"] / r["plain_tok_s"] for r in sel
                                      if r["plain_tok_s"] > 0)
            out.append(f"| {mode} | {task} | {len(sel)} | {sum(r['identical'] for r in sel)}/{len(sel)} | "
                       f"{acc}/{drafted} ({acc / max(drafted, 1):.0%}) | {toks / max(steps, 1):.2f} | "
                       f"{plain:.0f} | {spec:.0f} | {speed:.2f}x |")
    return "\n".join(out)


# ---- projection ----------------------------------------------------------------------------
def projection_table(rows: List[dict], rates=(0.5, 0.6, 0.7, 0.8, 0.9)) -> str:
    out = ["PROJECTION (not measured): speed-up = E[tokens a step] / measured verify cost, "
           "E = (1 - a^(k+1)) / (1 - a) for a per-token acceptance rate a.", "",
           "| weights | batch | k | cost | " + " | ".join(f"a={a}" for a in rates) + " |",
           "|---|---|---|---|" + "---|" * len(rates)]
    for r in rows:
        if r["k"] == 0:
            continue
        k = r["k"]
        cells = [f"{(1 - a ** (k + 1)) / (1 - a) / r['cost']:.2f}x" for a in rates]
        out.append(f"| {r['weights']} | {r['batch']} | {k} | {r['cost']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="verify,fixture,projection")
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--context", type=int, default=512, help="tokens cached before the verify")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--quants", default="none,int4", help="weights of the verify part")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fixture", help="the fixture checkpoint (default: the default fixture, "
                                      "trained on first use)")
    ap.add_argument("--fixture-dtype", default="float32")
    ap.add_argument("--functions", type=int, default=8, help="held-out functions (3 prompts each)")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens of the fixture part")
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.quants = [None if q == "none" else q for q in a.quants.split(",")]
    parts = set(a.parts.split(","))
    if a.config == "tiny":
        a.context = min(a.context, 64)
        a.functions = min(a.functions, 2)
        a.new_tokens = min(a.new_tokens, 24)
    data: Dict[str, object] = {"machine": machine(), "threads": torch.get_num_threads()}
    md = [f"# Prompt-lookup speculation ({a.config}; {torch.get_num_threads()} threads)"]
    rows = []
    if "verify" in parts or "projection" in parts:
        rows = verify_costs(a)
        data["verify"] = rows
        md += ["", f"## Verify cost, {a.context} tokens cached (measured)", "", verify_table(rows)]
        for r in rows:
            if r["k"] == 8:
                md.append(f"- {r['weights']} batch {r['batch']}: k = 8 costs {r['cost']:.2f}x one "
                          f"token (target <= 1.3x: {'met' if r['cost'] <= 1.3 else 'NOT met'})")
    if "fixture" in parts:
        res = run_fixture(a)
        data["fixture"] = res
        md += ["", f"## Input-grounded prompts on {res['model']}, k = {res['k']}, "
                   f"{res['new_tokens']} new tokens (measured)", "", fixture_table(res)]
    if "projection" in parts:
        md += ["", "## Projected speed-up", "", projection_table(rows)]
    text = "\n".join(md)
    print(text)
    write_outputs(text + "\n", data, Path(a.md) if a.md else None, Path(a.json) if a.json else None)
    if "fixture" in parts and not all(r["identical"] for r in data["fixture"]["rows"]):
        print("ERROR: speculation changed an output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
