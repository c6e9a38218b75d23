"""The paged KV cache, measured (issue: paged KV cache and step planner). Each part prints ratios
measured in one run, back to back:

  --part pages     attention over the pages of 24 layers (cold: every layer's keys come from
                   memory, as in a decode step) against linear reading the same bytes, for page
                   sizes 16 .. 4096 (4096 = one page per head: the contiguous layout); GB/s of each
                   and attention / linear. Chooses the default page size.
  --part capacity  how many requests run at once in a 2 GiB pool when each asks for
                   max_new_tokens=8192 and writes about 300 tokens: admission by worst case (the
                   contiguous cache's rule: slots x (prompt + max_new_tokens) <= budget) against the
                   step planner over pages (simulated on the real planner, no model).
  --part mixed     8 requests decoding while newcomers arrive with 1000-token prompts (int4,
                   full-size random weights): the decoding requests' inter-token latency p50/p99
                   against one step that packs a 256-token chunk with the 8 decode tokens, and
                   against a plain decode step.
  --part decode    decode tok/s at 128 and 4096 cached tokens, bf16 and int4, in this tree and in
                   --baseline TREE (a checkout of the contiguous cache, built in place), run in
                   turn, each round both trees (qwen-fast bench in a subprocess).
  --part batching  benchmarks/bench_batching.py at n = 8 in both trees, in turn.

    .venv/bin/python benchmarks/bench_paged.py --part pages,capacity,mixed
    .venv/bin/python benchmarks/bench_paged.py --part decode,batching --baseline ../base
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import read_peak_gbs, time_fns  # noqa: E402


def part_pages(args) -> dict:
    from qwen_fast import ops
    H, D, L, S = 16, 128, 24, args.context
    torch.manual_seed(0)
    out = {"context": S, "layers": L, "rows": []}
    # linear over the same bytes as one layer's keys + values: [2 * H * S, D] ... as a weight
    # [N, K] with K = 2048 (a decode GEMV reads it once).
    kv_bytes = 2 * H * S * D * 2
    K = 2048
    N = kv_bytes // (K * 2)
    weights = [torch.randn(N, K).to(torch.bfloat16) for _ in range(L)]
    x = torch.randn(1, K).to(torch.bfloat16)
    y = torch.empty(1, N, dtype=torch.bfloat16)

    def lin():
        for w in weights:
            ops.linear(x, w, out=y)
    q = torch.randn(1, H, D).to(torch.bfloat16)
    a = torch.empty(1, H, D, dtype=torch.bfloat16)
    seq = torch.zeros(1, dtype=torch.int32)
    pos = torch.tensor([S - 1], dtype=torch.int32)
    for P in args.page_sizes:
        n = -(-S // P)
        perm = torch.randperm(n).to(torch.int32)[None]
        pools = [(torch.randn(n, H, P, D).to(torch.bfloat16), torch.randn(n, H, P, D).to(torch.bfloat16))
                 for _ in range(L)]

        def att(pools=pools, perm=perm):
            for kp, vp in pools:
                ops.attention(q, kp, vp, perm, seq, pos, max_keys=S, out=a)
        t_att, t_lin = time_fns([att, lin], min_runs=7, min_time_s=2.0)
        row = {"page_size": P, "attention_gbs": L * kv_bytes / t_att / 1e9,
               "linear_gbs": L * N * K * 2 / t_lin / 1e9}
        row["ratio"] = row["attention_gbs"] / row["linear_gbs"]
        out["rows"].append(row)
        print(f"P={P:5d}  attention {row['attention_gbs']:6.1f} GB/s  linear {row['linear_gbs']:6.1f} GB/s"
              f"  attention/linear {row['ratio']:.2f}", flush=True)
        del pools
    out["read_pass_gbs"] = read_peak_gbs()
    print(f"read pass {out['read_pass_gbs']:.1f} GB/s")
    return out


def part_capacity(args) -> dict:
    from qwen_fast.config import builtin_config
    from qwen_fast.kv_cache import DEFAULT_PAGE_SIZE, PagePool, bytes_per_token
    from qwen_fast.request import Request
    from qwen_fast.sampling import SamplingParams
    from qwen_fast.scheduler import Scheduler
    cfg, dtype = builtin_config("qwen-1.8b-chat"), torch.bfloat16
    budget, prompt, limit, writes = 2 * 2**30, 30, 8192, 300
    per = bytes_per_token(cfg, dtype)
    # The contiguous cache admitted n sequences while slots(n) x longest worst case fit the budget,
    # slots(n) the next power of two (qwen_fast/scheduler.py before the paged cache).
    before = 0
    while True:
        n = before + 1
        slots = 1 << (n - 1).bit_length()
        if slots * (prompt + limit) * per > budget:
            break
        before = n
    pool = PagePool.for_budget(cfg, budget, DEFAULT_PAGE_SIZE, dtype, "meta")
    sched = Scheduler(pool, max_batch_size=256)
    reqs = [Request(list(range(1000, 1000 + prompt)), SamplingParams(), limit) for _ in range(256)]
    for r in reqs:
        sched.add(r)
    rng = random.Random(0)
    stop_at = {r: writes + rng.randint(-20, 20) for r in reqs}
    running = []
    while sched.has_work():
        plan = sched.schedule()
        running.append(len(sched.running))
        sched.update(plan, {s.req: [(0 if len(s.req.output_ids) + 1 >= stop_at[s.req] else 7, None)]
                            for s in plan.seqs if s.samples})
        for r in list(sched.running):
            if len(r.output_ids) >= stop_at[r]:
                sched.abort(r)
    # Without preemption: every request holding the pages of its prompt and all it writes.
    whole = pool.num_pages // pool.pages_for(prompt + writes + 20)
    out = {"budget_bytes": budget, "prompt": prompt, "max_new_tokens": limit, "writes": writes,
           "page_size": DEFAULT_PAGE_SIZE, "pages": pool.num_pages, "before": before,
           "after_without_preemption": whole, "after_peak": max(running),
           "after_median": statistics.median(running), "preemptions": sched.stats["preemptions"],
           "requests": len(reqs), "steps": len(running)}
    print(f"2 GiB pool ({pool.num_pages} pages of {DEFAULT_PAGE_SIZE}), {len(reqs)} requests of "
          f"{prompt} prompt tokens, max_new_tokens={limit}, ~{writes} tokens written each:\n"
          f"  worst-case admission (contiguous cache): {before} at once\n"
          f"  pages: {whole} at once with room for everything they write; the planner ran "
          f"{max(running)} at its peak, median {out['after_median']:.0f} over {len(running)} steps, "
          f"with {sched.stats['preemptions']} preemptions")
    return out


def part_mixed(args) -> dict:
    from qwen_fast import Engine
    e = Engine.from_pretrained(load_format="dummy", config="qwen-1.8b-chat", dtype="bfloat16",
                               quant="int4", lm_head_quant="int4", max_batch_size=16,
                               kv_cache_budget=4 * 2**30)
    vocab = len(e.tokenizer) - 208
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()
    greedy = dict(temperature=0, ignore_eos=True)
    e.generate(prompt(8), max_new_tokens=2, **greedy)          # warm-up
    # One step of a 256-token chunk with 8 decode tokens, and a plain 8-token decode step.
    streams = [e.stream(prompt(64), max_new_tokens=100000, **greedy) for _ in range(8)]
    for s in streams:
        next(s)
    stamps = {id(s): [] for s in streams}
    stop = threading.Event()

    def reader(s):
        for _ in s:
            stamps[id(s)].append(time.perf_counter())
            if stop.is_set():
                break
    threads = [threading.Thread(target=reader, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    time.sleep(3)                                               # decode only
    t_newcomers = time.perf_counter()
    ttfts = []
    for i in range(args.newcomers):
        r = e.generate(prompt(1000), max_new_tokens=1, **greedy)
        ttfts.append(r.prefill_s)
    t_end = time.perf_counter()
    time.sleep(1)
    stop.set()
    for s in streams:
        s.close()
    for t in threads:
        t.join(30)
    gaps_decode, gaps_mixed = [], []
    for ts in stamps.values():
        for a, b in zip(ts, ts[1:]):
            (gaps_mixed if t_newcomers <= b <= t_end else gaps_decode).append(b - a)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
    chunk_steps = -(-1000 // e.PREFILL_CHUNK)
    out = {"itl_decode_p50_ms": 1e3 * q(gaps_decode, 0.5), "itl_decode_p99_ms": 1e3 * q(gaps_decode, 0.99),
           "itl_mixed_p50_ms": 1e3 * q(gaps_mixed, 0.5), "itl_mixed_p99_ms": 1e3 * q(gaps_mixed, 0.99),
           "itl_mixed_max_ms": 1e3 * max(gaps_mixed),
           "newcomer_ttft_s": statistics.median(ttfts), "chunk_steps_per_newcomer": chunk_steps,
           "newcomers": args.newcomers}
    # A mixed step's time: the newcomer's TTFT spreads over its chunk steps.
    out["mixed_step_ms_est"] = 1e3 * out["newcomer_ttft_s"] / chunk_steps
    print(json.dumps(out, indent=1))
    e.close()
    return out


def _bench_json(tree: Path, dtype: str, quant: bool, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qwen_fast.cli", "bench", "--dtype", dtype, "--backend", "auto",
           "--prompt-tokens", "128", "--new-tokens", "16", "--context", "128,4096",
           "--repeats", "2", "--json", str(out)]
    if quant:
        cmd += ["--quant", "int4", "--lm-head-quant", "int4"]
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def part_decode(args) -> dict:
    rows = []
    for rnd in range(args.rounds):
        for dtype, quant in (("bfloat16", False), ("bfloat16", True)):
            got = {}
            for name, tree in (("paged", ROOT), ("contiguous", args.baseline)):
                res = _bench_json(tree, dtype, quant, Path(f"/tmp/bench_paged_{name}.json"))
                # tok/s, and the bytes a token reads (weights + KV) x tok/s as a share of the
                # read pass measured around that run: the machine's bandwidth moves between runs.
                got[name] = {r["context"]: (r["decode_tokens_per_s"], 100 * r["decode_tokens_per_s"]
                                            * (r["weight_bytes_per_token"] + r["kv_bytes_per_token"])
                                            / 1e9 / r["read_gb_s"]) for r in res["results"]}
            for ctx in sorted(got["paged"]):
                (tp, sp), (tc, sc) = got["paged"][ctx], got["contiguous"][ctx]
                row = {"round": rnd, "weights": "int4" if quant else dtype, "context": ctx,
                       "paged_tok_s": tp, "contiguous_tok_s": tc, "ratio": tp / tc,
                       "paged_pct_of_read": sp, "contiguous_pct_of_read": sc, "share_ratio": sp / sc}
                rows.append(row)
                print(f"round {rnd} {row['weights']:8s} ctx {ctx:5d}: paged {tp:6.2f} tok/s ({sp:4.1f}% "
                      f"of read), contiguous {tc:6.2f} ({sc:4.1f}%): ratio {tp / tc:.3f}, of shares "
                      f"{sp / sc:.3f}", flush=True)
    return {"rows": rows}


def part_batching(args) -> dict:
    rows = []
    for rnd in range(args.rounds):
        for name, tree in (("paged", ROOT), ("contiguous", args.baseline)):
            env = dict(os.environ, PYTHONPATH=str(tree))
            r = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_batching.py"),
                                "--n", "8"], cwd=tree, env=env, check=True, capture_output=True,
                               text=True)
            print(f"round {rnd} {name}:\n{r.stdout.strip()}", flush=True)
            rows.append({"round": rnd, "tree": name, "stdout": r.stdout})
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="pages,capacity", help="pages, capacity, mixed, decode, batching")
    p.add_argument("--context", type=int, default=4096, help="cached tokens for --part pages")
    p.add_argument("--page-sizes", default="16,32,64,128,4096")
    p.add_argument("--newcomers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline", type=Path, help="a checkout of the contiguous cache, built in place")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.page_sizes = [int(x) for x in args.page_sizes.split(",")]
    parts = args.part.split(",")
    if any(x in parts for x in ("decode", "batching")) and args.baseline is None:
        p.error("--part decode/batching need --baseline TREE")
    out = {}
    for part in parts:
        out[part] = globals()[f"part_{part}"](args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
