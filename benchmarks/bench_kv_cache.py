"""The int8 KV cache (kv_cache_dtype="int8") against the 16-bit one, in one run:

  decode    full-size shapes, random weights (int4 layers and lm_head by default), one sequence
            with --depth positions cached (both caches filled with the same random keys and
            values: the int8 one with their codes), decode steps over either cache alternating
            step by step (the fused decode layers of one model), --rounds rounds of --new-tokens
            steps, each round between two read passes.
            Reported: ms/token, the bytes a token reads (weights + the cache at the mean depth),
            their share of the read bandwidth, and int8's speed over bf16's (target >= 1.3x at
            4,096 cached tokens with int4 weights).
  capacity  positions one kv_cache_budget holds with each cache (target: twice).
  llama     llama-bench on the same random weights as Q4_0 (bench_llamacpp.py's GGUF), decode
            at -d depth with its F16 cache and with -ctk q8_0 -ctv q8_0 (flash attention on for
            both: llama.cpp needs it for a quantized V cache), right after ours.
  kl        the trained fixture (qwen_fast/fixture.py) in --kl-dtype (fp16, as llama.cpp's F16
            rows): KL of the int8 cache's next-token distributions from the 16-bit cache's, exact
            over the vocabulary, on
            llama-perplexity's chunks of held-out text; llama.cpp's F16 model with -ctk/-ctv q8_0
            against its F16 cache on the same chunks (its --kl-divergence). Scales: one per
            position and head (ours, the default) and one per 32 elements (kv_group=32, the
            q8_0 block), to measure which the kernels should keep.

  klsplit   the same KL with keys and values rounded with separate groups (fake quantization
            into the 16-bit cache), to see which of the two needs the finer scales.

    .venv/bin/python benchmarks/bench_kv_cache.py [--parts decode,capacity,llama,kl,klsplit]
        [--depth 4096] [--quant int4] [--md out.md] [--json out.json]

--config tiny is a smoke run of decode and capacity on the test-size model.
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from qwen_fast import Engine, reference
from qwen_fast.bench import read_bandwidth_gbs, weight_bytes_per_token
from qwen_fast.testing import PagedBatch, tiny_config
sys.path.insert(0, str(Path(__file__).resolve().parent))   # harness, also when loaded by path
from harness import machine, write_outputs  # noqa: E402


def _log(msg: str) -> None:
    print(f"[bench-kv-cache] {msg}", file=sys.stderr, flush=True)


def _engines(args):
    kw = dict(load_format="dummy", dtype="bfloat16", quant=args.quant, lm_head_quant=args.quant,
              kv_cache_budget=args.budget)
    if args.config == "tiny":
        kw["config"] = tiny_config(num_attention_heads=2, kv_channels=32, seq_length=8192,
                                   max_position_embeddings=8192)
    base = Engine.from_pretrained(**kw)
    int8 = Engine(base.model, base.tokenizer, base.generation_config,
                  kv_cache_budget=args.budget, kv_cache_dtype="int8")
    return {"bf16": base, "int8": int8}


def fill(batch: PagedBatch, context: int, gen: torch.Generator, dtype) -> None:
    """The same random keys and values in every layer of either cache (int8: their codes and
    scales, reference.quantize_kv), and the sequence's length set to `context`: a cache as deep
    as a long prompt leaves it, without the prefill."""
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


def decode(args, model) -> Dict[str, object]:
    """Decode steps of one sequence at --depth cached positions over either cache (the fused
    decode layers, the same model), alternating step by step; each round of steps between two
    read passes, its share of the read bandwidth against the larger."""
    caches = {}
    for name, kv_dtype, group in (("bf16", None, None), ("int8", torch.int8, None),
                                  ("int8 group 32", torch.int8, 32)):
        b = PagedBatch(model, 1, args.depth + args.new_tokens * (args.rounds + 1) + 8,
                       page_size=64, kv_dtype=kv_dtype, kv_group=group)
        fill(b, args.depth, torch.Generator().manual_seed(0), model.dtype)
        caches[name] = b
    weights = weight_bytes_per_token(model)
    for b in caches.values():
        b.forward([[5]])                                  # warm-up step
    runs: Dict[str, List[dict]] = {k: [] for k in caches}
    for rnd in range(args.rounds):
        times: Dict[str, List[float]] = {k: [] for k in caches}
        before = read_bandwidth_gbs()
        for _ in range(args.new_tokens):
            for name, b in caches.items():
                t0 = time.perf_counter()
                b.forward([[7]])
                times[name].append(time.perf_counter() - t0)
        roof = max(before, read_bandwidth_gbs())
        for name, b in caches.items():
            t = statistics.median(times[name])
            kv = b.pool.bytes_per_page // b.pool.page_size * (b.lengths[0] - args.new_tokens / 2)
            runs[name].append({"ms": t * 1e3, "read_gb_s": roof, "kv_bytes": kv,
                               "pct_of_read": 100 * (weights + kv) / t / 1e9 / roof})
        _log(f"round {rnd + 1}: " + ", ".join(f"{k} {r[-1]['ms']:.1f} ms" for k, r in runs.items()))
    out = {"depth": args.depth, "weights": args.quant or "bf16", "weight_bytes": weights,
           "steps_a_round": args.new_tokens, "rows": {}}
    for name, rs in runs.items():
        ms = statistics.median(x["ms"] for x in rs)
        out["rows"][name] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                             "bytes_per_token": weights + rs[0]["kv_bytes"],
                             "kv_bytes_per_token": rs[0]["kv_bytes"],
                             "pct_of_read": statistics.median(x["pct_of_read"] for x in rs),
                             "read_gb_s": statistics.median(x["read_gb_s"] for x in rs), "rounds": rs}
    out["speedup"] = out["rows"]["bf16"]["ms_per_token"] / out["rows"]["int8"]["ms_per_token"]
    out["round_speedups"] = [a["ms"] / b["ms"] for a, b in zip(runs["bf16"], runs["int8"])]
    out["speedup_group_32"] = out["rows"]["bf16"]["ms_per_token"] / out["rows"]["int8 group 32"]["ms_per_token"]
    return out


def capacity(args, engines) -> Dict[str, object]:
    pools = {k: e.kv_pool for k, e in engines.items()}
    out = {k: {"positions": p.capacity_tokens, "bytes_per_position": p.bytes_per_page // p.page_size}
           for k, p in pools.items()}
    out["ratio"] = out["int8"]["positions"] / out["bf16"]["positions"]
    return out


def llama(args) -> Dict[str, object]:
    import bench_llamacpp as B
    opts = argparse.Namespace(llama_cpp_dir=args.llama_cpp_dir, cache_dir=None, build=False,
                              no_build=args.no_build, sdist=None, jobs=2)
    try:
        build = B.ensure_tools(["llama-bench", "llama-quantize"], opts)
    except B.Missing as m:
        return {"skipped": f"{m.what}. To get it: {m.how}"}
    ftype = {"int4": "q4_0", "int8": "q8_0", None: "bf16"}[args.quant]
    model = B.ensure_gguf(B.cache_dir(), "qwen-1.8b-chat", "bfloat16", 0, ftype, build)
    bench = B.find_tool("llama-bench", build)
    out = {"model": ftype.upper(), "depth": args.depth}
    for cache in ("f16", "q8_0"):
        cmd = [str(bench), "-m", str(model), "-p", "0", "-n", str(args.new_tokens), "-d",
               str(args.depth), "-t", str(torch.get_num_threads()), "-r", str(args.llama_reps),
               "-fa", "1", "-ctk", cache, "-ctv", cache, "-o", "json"]
        _log("$ llama-bench " + " ".join(cmd[1:]))
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            return {"skipped": f"llama-bench failed: {r.stderr[-600:]}"}
        import json
        rec = [x for x in json.loads(r.stdout) if x.get("n_gen") == args.new_tokens]
        out[cache] = {"tokens_per_s": rec[0]["avg_ts"], "std": rec[0]["stddev_ts"]}
    out["speedup"] = out["q8_0"]["tokens_per_s"] / out["f16"]["tokens_per_s"]
    return out


def kl(args) -> Dict[str, object]:
    """Our int8 cache vs our bf16 cache, and llama.cpp's q8_0 cache vs its F16 cache, on the
    fixture's held-out chunks."""
    import bench_llamacpp as B
    import bench_quality as Q
    from qwen_fast import fixture as FX
    from qwen_fast import perplexity as P
    from qwen_fast.tokenizer import QwenTokenizer
    model = Path(args.fixture) if args.fixture else FX.train(FX.Settings(), log=_log)
    work = FX.cache_dir() / "kv-cache" / model.name
    work.mkdir(parents=True, exist_ok=True)
    tok = QwenTokenizer.default()
    text_file = work / "heldout.txt"
    ids = Q.held_out_ids(tok, args.chunks * args.context, text_file)
    wins = P.chunk_windows(len(ids), args.context)
    engines = {"16-bit": Engine.from_pretrained(model, dtype=args.kl_dtype)}
    for name, group in (("int8", None), ("int8 group 32", 32)):
        engines[name] = Engine(engines["16-bit"].model, engines["16-bit"].tokenizer,
                               engines["16-bit"].generation_config, kv_cache_dtype="int8",
                               kv_cache_group=group)
    acc: Dict[str, Dict[str, list]] = {k: {"kl": [], "nll": [], "agree": []} for k in engines}
    for w in range(len(wins)):
        base = None
        for name, e in engines.items():
            lp, target = next(P.scored_logprobs(e, ids, wins[w:w + 1], None))
            base = lp if base is None else base
            acc[name]["kl"].append(P.kl_full(base, lp))
            acc[name]["nll"].append(-lp.gather(1, target[:, None])[:, 0])
            acc[name]["agree"].append(lp.argmax(-1) == base.argmax(-1))
    out: Dict[str, object] = {"model": model.name, "chunks": len(wins), "context": args.context,
                              "dtype": args.kl_dtype}
    for name, a in acc.items():
        a = {k: torch.cat(v) for k, v in a.items()}
        out[f"ours {name}"] = {"perplexity": math.exp(float(a["nll"].double().mean())),
                               "kl_mean": float(a["kl"].mean()),
                               "kl_p99": float(torch.quantile(a["kl"].float(), 0.99)),
                               "top1_agreement": float(a["agree"].float().mean())}
    for e in engines.values():
        e.close()
    opts = argparse.Namespace(llama_cpp_dir=args.llama_cpp_dir, cache_dir=None, build=False,
                              no_build=args.no_build, sdist=None, jobs=2)
    try:
        build = B.ensure_tools(["llama-perplexity"], opts)
    except B.Missing as m:
        out["llama"] = {"skipped": f"{m.what}. To get it: {m.how}"}
        return out
    from qwen_fast.loader import load_config
    f16 = Q.fixture_f16_gguf(model, load_config(model), work)
    tool = str(B.find_tool("llama-perplexity", build))
    kld = work / "f16-cache.kld"
    common = ["-m", str(f16), "-c", str(args.context), "-t", str(torch.get_num_threads()),
              "--chunks", str(args.chunks), "-fa", "on"]
    r = subprocess.run([tool, *common, "-f", str(text_file), "--kl-divergence-base", str(kld)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        out["llama"] = {"skipped": f"llama-perplexity (F16 cache) failed: {r.stdout[-600:]}"}
        return out
    base_ppl = Q._num(r"Final estimate: PPL = ([\d.]+)", r.stdout)
    r = subprocess.run([tool, *common, "-ctk", "q8_0", "-ctv", "q8_0", "--kl-divergence-base",
                        str(kld), "--kl-divergence"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        out["llama"] = {"skipped": f"llama-perplexity (q8_0 cache) failed: {r.stdout[-600:]}"}
        return out
    out["llama F16 cache"] = {"perplexity": base_ppl, "kl_mean": 0.0}
    out["llama q8_0 cache"] = Q.llama_kl_numbers(r.stdout)
    return out


def fake_quant_rotary(orig, k_group, v_group):
    """A rotary_kv_cache op that writes keys and values rounded as an int8 cache with those
    groups would hold them (reference.quantize_kv, dequantized; None: unrounded) into the 16-bit
    cache: what each group size of keys and of values costs in accuracy, before any kernel has
    separate key and value groups."""
    def fq(x, group):
        if group is None:
            return x
        codes, scales = reference.quantize_kv(x, group=group)
        return reference.dequantize_kv(codes, scales).to(x.dtype)

    def op(q, k, v, cos, sin, k_pages, v_pages, page_table, token_seq, token_pos, out=None, **kw):
        kr = reference.rotary_embedding(k[None], cos[None], sin[None])[0]
        qkv = torch.stack([q, fq(kr, k_group), fq(v, v_group)], 1)   # one buffer: q, k, v views
        one, zero = torch.ones_like(cos), torch.zeros_like(sin)       # k is rotated already
        orig(*qkv.unbind(1), one, zero, k_pages, v_pages, page_table, token_seq, token_pos)
        q_rot = reference.rotary_embedding(q[None], cos[None], sin[None])[0]
        return q_rot if out is None else out.copy_(q_rot)
    return op


def kl_split(args) -> Dict[str, object]:
    """KL from the 16-bit cache of keys and values rounded with separate groups (fake
    quantization through fake_quant_rotary, the fixture in --kl-dtype)."""
    import bench_quality as Q
    from qwen_fast import fixture as FX
    from qwen_fast import perplexity as P
    from qwen_fast.tokenizer import QwenTokenizer
    model = Path(args.fixture) if args.fixture else FX.train(FX.Settings(), log=_log)
    tok = QwenTokenizer.default()
    work = FX.cache_dir() / "kv-cache" / model.name
    work.mkdir(parents=True, exist_ok=True)
    ids = Q.held_out_ids(tok, args.chunks * args.context, work / "heldout.txt")
    wins = P.chunk_windows(len(ids), args.context)
    e = Engine.from_pretrained(model, dtype=args.kl_dtype)
    orig = e.model.ops["rotary_kv_cache"]
    base = [lp for lp, _ in P.scored_logprobs(e, ids, wins, None)]
    D = e.cfg.head_dim
    rows = []
    for kg, vg in ((D, D), (32, 32), (32, D), (D, 32)):
        e.model.ops["rotary_kv_cache"] = fake_quant_rotary(orig, kg, vg)
        kl = torch.cat([P.kl_full(b, lp) for b, (lp, _) in
                        zip(base, P.scored_logprobs(e, ids, wins, None))])
        rows.append({"k_group": kg, "v_group": vg, "kl_mean": float(kl.mean())})
        _log(f"keys per {kg}, values per {vg}: KL {rows[-1]['kl_mean']:.6f}")
    e.model.ops["rotary_kv_cache"] = orig
    e.close()
    return {"model": model.name, "dtype": args.kl_dtype, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="decode,capacity,llama,kl")
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--quant", default="int4", help="int4, int8 or none (bf16 weights)")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=2 * 2**30, help="kv_cache_budget of each engine")
    ap.add_argument("--llama-reps", type=int, default=3)
    ap.add_argument("--llama-cpp-dir")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--fixture")
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--kl-dtype", default="float16",
                    help="the fixture's dtype for kl (default float16: llama.cpp's rows run its "
                         "F16 file with an F16 cache as their base)")
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.quant = None if a.quant == "none" else a.quant
    parts = a.parts.split(",")
    if a.config == "tiny":
        a.depth, a.new_tokens, a.rounds, a.budget = min(a.depth, 256), min(a.new_tokens, 4), 1, 2**24
        parts = [p for p in parts if p in ("decode", "capacity")]
    data: Dict[str, object] = {"machine": machine(), "threads": torch.get_num_threads()}
    md = [f"# int8 KV cache ({a.config}; {torch.get_num_threads()} threads)"]
    if "decode" in parts or "capacity" in parts:
        engines = _engines(a)
        if "capacity" in parts:
            c = data["capacity"] = capacity(a, engines)
            md += ["", "## Capacity (one budget)", "",
                   f"- bf16 cache {c['bf16']['positions']} positions ({c['bf16']['bytes_per_position']} "
                   f"B each), int8 {c['int8']['positions']} ({c['int8']['bytes_per_position']} B): "
                   f"{c['ratio']:.2f}x (target 2x)"]
        if "decode" in parts:
            d = data["decode"] = decode(a, engines["bf16"].model)
            md += ["", f"## Decode at {d['depth']} cached tokens, {d['weights']} weights (measured)", "",
                   "| cache | ms/token | tokens/s | MB a token (weights + KV) | % of read bandwidth |",
                   "|---|---|---|---|---|"]
            for name, r in d["rows"].items():
                md.append(f"| {name} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
                          f"{r['bytes_per_token'] / 1e6:.0f} ({d['weight_bytes'] / 1e6:.0f} + "
                          f"{r['kv_bytes_per_token'] / 1e6:.0f}) | {r['pct_of_read']:.0f}% |")
            md.append(f"\nint8 cache with a scale per 32 elements: {d['speedup_group_32']:.2f}x")
            md.append(f"\nint8 cache {d['speedup']:.2f}x the bf16 cache's speed (rounds: "
                      f"{', '.join(f'{x:.2f}' for x in d['round_speedups'])}; target >= 1.3x: "
                      f"{'met' if d['speedup'] >= 1.3 else 'NOT met'})")
        for e in engines.values():
            e.close()
        del engines
    if "llama" in parts:
        ll = data["llama"] = llama(a)
        if "skipped" in ll:
            md += ["", f"llama.cpp: skipped ({ll['skipped']})"]
        else:
            md += ["", f"## llama-bench, {ll['model']}, tg{a.new_tokens} at -d {a.depth} (right after ours)", "",
                   f"- F16 cache {ll['f16']['tokens_per_s']:.1f} ± {ll['f16']['std']:.1f} tok/s; "
                   f"q8_0 cache {ll['q8_0']['tokens_per_s']:.1f} ± {ll['q8_0']['std']:.1f} tok/s "
                   f"({ll['speedup']:.2f}x)"]
            if "decode" in data:
                d = data["decode"]["rows"]
                md.append(f"- ours / llama.cpp: bf16 cache vs F16 {d['bf16']['tokens_per_s'] / ll['f16']['tokens_per_s']:.2f}x, "
                          f"int8 vs q8_0 {d['int8']['tokens_per_s'] / ll['q8_0']['tokens_per_s']:.2f}x")
    if "kl" in parts:
        k = data["kl"] = kl(a)
        md += ["", f"## KL from the 16-bit cache, fixture {k['model']} in {k['dtype']}, {k['chunks']} "
                   f"chunks of {k['context']} (measured)", "", "| row | perplexity | KL mean | KL p99 | top-1 |",
               "|---|---|---|---|---|"]
        for name, r in k.items():
            if isinstance(r, dict) and "kl_mean" in r:
                md.append(f"| {name} | {r['perplexity']:.3f} | {r['kl_mean']:.6f} | "
                          f"{r.get('kl_p99') or 0:.5f} | {(r.get('top1_agreement') or 1):.2%} |")
        if "llama q8_0 cache" in k:
            ours, theirs = k["ours int8"]["kl_mean"], k["llama q8_0 cache"]["kl_mean"]
            md.append(f"\nours int8 KL {ours:.6f} <= llama.cpp q8_0's {theirs:.6f}: "
                      f"{'met' if ours <= theirs else 'NOT met'}")
        elif "llama" in k:
            md.append(f"\nllama.cpp: skipped ({k['llama']['skipped']})")
    if "klsplit" in parts:
        ks = data["klsplit"] = kl_split(a)
        md += ["", f"## Key and value groups apart (fake quantization), fixture in {ks['dtype']}", "",
               "| keys: elements a scale | values: elements a scale | KL from the 16-bit cache |",
               "|---|---|---|"]
        md += [f"| {r['k_group']} | {r['v_group']} | {r['kl_mean']:.6f} |" for r in ks["rows"]]
    text = "\n".join(md)
    print(text)
    write_outputs(text + "\n", data, Path(a.md) if a.md else None, Path(a.json) if a.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
