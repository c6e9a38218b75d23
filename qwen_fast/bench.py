"""End-to-end benchmark: ``qwen-fast bench`` and ``benchmarks/bench_decode.py`` are this code.

Full-size Qwen-1.8B shapes with random weights (``load_format="dummy"``, no download). For each
backend, in one run: time to first token and prefill tokens/s for a prompt, decode ms/token and
tokens/s (with ``--context N``: N tokens already cached), the weight bytes one decode token
reads, and bytes x tokens/s as GB/s against a read and a copy of memory measured in the same
run: decode is bound by reading the weights, so the read bandwidth is its roofline.

    qwen-fast bench [--dtype bfloat16] [--backend auto,reference] [--prompt-tokens 128]
                    [--new-tokens 16] [--context N] [--threads N] [--quant none|int4|int8]
                    [--lm-head-quant none|int4|int8] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

from .qweight import QuantWeight

PEAK_BUFFER_BYTES = 1 << 28     # 256 MiB: far larger than any CPU cache, small beside the model (peak RSS)


def _best_seconds(fn, runs: int = 5, device: str = "cpu") -> float:
    cuda = torch.device(device).type == "cuda"
    fn()                                    # warm-up (page faults, first touch)
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _buffer_bytes(nbytes: int, device: str) -> int:
    # A GPU's L2 is tens of MB: 1 GiB there, as far beyond it as 256 MiB is beyond a CPU's caches.
    return nbytes * 4 if torch.device(device).type == "cuda" else nbytes


def read_bandwidth_gbs(nbytes: int = PEAK_BUFFER_BYTES, device: str = "cpu") -> float:
    """GB/s of a read-only pass (a sum) over a buffer far larger than the caches: the roofline
    of a decode step, which reads every weight once and writes almost nothing."""
    nbytes = _buffer_bytes(nbytes, device)
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / _best_seconds(lambda: buf.sum(), device=device) / 1e9


def copy_bandwidth_gbs(nbytes: int = PEAK_BUFFER_BYTES // 2, device: str = "cpu") -> float:
    """GB/s of a large copy, counting the bytes read and written."""
    nbytes = _buffer_bytes(nbytes, device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device=device) / 1e9


def _nbytes(t) -> int:
    return t.nbytes if isinstance(t, QuantWeight) else t.numel() * t.element_size()


def weight_bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every matrix and norm once (int4/int8 ones in their
    packed layout, scales included), one embedding row."""
    total = sum(_nbytes(t) for L in model.layers for t in L.values())
    total += _nbytes(model.lm_head) + _nbytes(model.ln_f)
    return total + model.wte.shape[1] * model.wte.element_size()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def measure(engine, prompt_tokens: int, new_tokens: int, contexts: Sequence[int], repeats: int,
            read_gbs: Callable[[], float] = read_bandwidth_gbs) -> List[dict]:
    """Prefill and decode numbers of one engine, one row per context (0: after the prompt),
    medians over repeats; each repeat runs every context in turn, so their ratios come from
    neighbouring runs.

    Each decode run lies between two read passes, and its share of the read bandwidth is taken
    against the larger of the two: a shared machine's bandwidth drifts within seconds, so only
    a read measured next to the decode is its roofline. The share reported is the median of the
    runs' shares, the read bandwidth the median of their rooflines."""
    g = torch.Generator().manual_seed(0)
    vocab = len(engine.tokenizer) - 208        # plain BPE ids: no special tokens in the prompt
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist()
    longest = torch.randint(0, vocab, (max(max(contexts), 1),), generator=g).tolist()
    greedy = dict(temperature=0, ignore_eos=True)
    engine.generate(prompt[:8], max_new_tokens=2, **greedy)                       # warm-up
    nbytes = weight_bytes_per_token(engine.model)
    ttft = []
    rounds: List[List[dict]] = [[] for _ in contexts]
    for i in range(repeats):
        _progress(f"{engine.model.backend}: prefill {prompt_tokens} tokens ({i + 1}/{repeats})")
        ttft.append(engine.generate(prompt, max_new_tokens=1, **greedy).prefill_s)
        for c, context in enumerate(contexts):
            _progress(f"{engine.model.backend}: decode {new_tokens} tokens after "
                      f"{context or prompt_tokens} ({i + 1}/{repeats})")
            before = read_gbs()
            r = engine.generate(longest[:context] if context else prompt,
                                max_new_tokens=new_tokens + 1, **greedy)
            roof = max(before, read_gbs())
            t_tok = r.decode_s / (r.completion_tokens - 1)
            rounds[c].append({"ms_per_token": t_tok * 1e3, "read_gb_s": roof,
                              "pct_of_read": 100 * nbytes / t_tok / 1e9 / roof})
    t_pre = statistics.median(ttft)
    rows = []
    for context, runs in zip(contexts, rounds):
        t_tok = statistics.median(x["ms_per_token"] for x in runs) / 1e3
        rows.append({
            "backend": engine.model.backend, "context": context or prompt_tokens,
            "ttft_ms": t_pre * 1e3, "prefill_tokens_per_s": prompt_tokens / t_pre,
            "decode_tokens_per_s": 1 / t_tok, "ms_per_token": t_tok * 1e3,
            "weight_bytes_per_token": nbytes,
            "kv_bytes_per_token": kv_bytes_per_token(engine.model, context or prompt_tokens),
            "weights_gb_s": nbytes / t_tok / 1e9,
            "read_gb_s": statistics.median(x["read_gb_s"] for x in runs),
            "pct_of_read": statistics.median(x["pct_of_read"] for x in runs),
            "rounds": runs})
    for row in rows[1:]:
        row["rate_vs_first_context"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return rows


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="qwen-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen-1.8b-chat",
                   help="built-in config (default: qwen-1.8b-chat; 'tiny' for a smoke run)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--backend", default="auto", help="comma-separated: auto, native, reference")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--context", type=_contexts, default=[0],
                   help="decode with this many tokens already cached (default: after the prompt); "
                        "a comma-separated list measures each in one run, e.g. 128,2048")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quant", default="none", choices=["none", "int4", "int8"],
                   help="quantize the layers' weights at load (round-to-nearest, group 128)")
    p.add_argument("--lm-head-quant", default="none", choices=["none", "int4", "int8"],
                   help="quantize lm_head at load too (default: keep it in --dtype)")
    p.add_argument("--repeats", type=int, default=3,
                   help="prefill and decode runs per backend, each decode between read passes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    return p


def _contexts(text: str) -> List[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--context takes token counts such as 2048 or 128,2048, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--context counts must be >= 0, got {text!r}")
    return values


def kv_bytes_per_token(model, context: int) -> int:
    """KV-cache bytes one decode step reads with `context` tokens cached: every layer's keys and
    values of every position."""
    cfg = model.cfg
    return (2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context
            * torch.empty((), dtype=model.dtype).element_size())


def run(args) -> dict:
    from .engine import Engine
    from .model import resolve_ops

    for name in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    contexts = args.context if isinstance(args.context, list) else [int(args.context)]
    if any(c < 0 for c in contexts):
        raise ValueError(f"--context must be >= 0, got {args.context}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)     # torch and our OpenMP kernels share one runtime
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    _progress("measuring memory bandwidth")
    read_gbs = read_bandwidth_gbs(device=args.device)
    copy_gbs = copy_bandwidth_gbs(device=args.device)
    _progress(f"read {read_gbs:.1f} GB/s, copy {copy_gbs:.1f} GB/s; building random "
              f"{args.config} weights in {args.dtype}")
    if args.config == "tiny":           # the test suite's 2-layer model: a smoke run in seconds
        from .testing import tiny_config
        config = tiny_config()
    else:
        config = args.config
    none = lambda v: None if v in (None, "none") else v      # noqa: E731
    engine = Engine.from_pretrained(load_format="dummy", config=config, dtype=args.dtype,
                                    device=args.device, backend=backends[0],
                                    quant=none(args.quant),
                                    lm_head_quant=none(getattr(args, "lm_head_quant", None)))
    rows = []
    for backend in backends:
        engine.model.ops, engine.model.backend = resolve_ops(backend), backend   # same weights
        for row in measure(engine, args.prompt_tokens, args.new_tokens, contexts, args.repeats,
                           read_gbs=lambda: read_bandwidth_gbs(device=args.device)):
            read_gbs = max(read_gbs, row["read_gb_s"])
            rows.append(row)
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.device(args.device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(args.device)
    return {"machine": machine, "device": args.device,
            "config": args.config, "dtype": args.dtype, "quant": args.quant,
            "lm_head_quant": getattr(args, "lm_head_quant", "none"),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "context": [c or args.prompt_tokens for c in contexts], "read_gb_s": read_gbs,
            "copy_gb_s": copy_gbs, "peak_rss_mb": peak_rss_mb(), "results": rows}


def format_table(out: dict) -> str:
    quant = "" if out.get("quant", "none") == "none" else (
        f", {out['quant']} weights (lm_head {out.get('lm_head_quant', 'none')})")
    lines = [f"# decode benchmark: {out['config']} {out['dtype']}{quant}, prompt {out['prompt_tokens']}, "
             f"decode after {', '.join(map(str, out['context']))} tokens, {out['machine']['threads']} threads",
             "", f"read up to {out['read_gb_s']:.1f} GB/s, copy {out['copy_gb_s']:.1f} GB/s (same run; "
             "each decode run against a read pass just before and after it; medians of "
             f"{out['repeats']} runs); "
             f"peak RSS {out['peak_rss_mb']:.0f} MB", "",
             "| backend | context | TTFT ms | prefill tok/s | decode tok/s | ms/token | "
             "weight MB/token | KV MB/token | GB/s (weights) | read GB/s | % of read | "
             "rate vs first context |", "|" + "---|" * 12]
    for r in out["results"]:
        vs = f"{r['rate_vs_first_context']:.2f}" if "rate_vs_first_context" in r else ""
        lines.append(f"| {r['backend']} | {r['context']} | {r['ttft_ms']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['ms_per_token']:.1f} | {r['weight_bytes_per_token'] / 1e6:.0f} | "
                     f"{r['kv_bytes_per_token'] / 1e6:.0f} | {r['weights_gb_s']:.1f} | "
                     f"{r['read_gb_s']:.1f} | {r['pct_of_read']:.0f}% | {vs} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None, args=None) -> dict:
    args = args or build_parser().parse_args(argv)
    out = run(args)
    print(format_table(out))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
