"""End-to-end benchmark: ``qwen-fast bench`` and ``benchmarks/bench_decode.py`` are this code.

Full-size Qwen-1.8B shapes with random weights (``load_format="dummy"``, no download). For each
backend, in one run: time to first token and prefill tokens/s for a prompt, decode ms/token and
tokens/s (with ``--context N``: N tokens already cached), the weight bytes one decode token
reads, and bytes x tokens/s as GB/s against a read and a copy of memory measured in the same
run: decode is bound by reading the weights, so the read bandwidth is its roofline.

    qwen-fast bench [--dtype bfloat16] [--backend auto,reference] [--prompt-tokens 128]
                    [--new-tokens 16] [--context N] [--threads N] [--quant none|int4|int8]
                    [--lm-head-quant none|int4|int8] [--json FILE]

Every option is checked before the first bandwidth pass (check_args): a bad one, or a context
plus new tokens beyond the model's 32767, exits at once with "error: argument --OPTION: ...".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

from .config import BUILTIN_CONFIGS, QwenConfig, builtin_config, parse_dtype
from .errors import ConfigError, QwenFastError
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
        t = engine.generate(prompt, max_new_tokens=1, **greedy).prefill_s
        if not t > 0:
            raise BenchError(f"the prefill of {prompt_tokens} tokens measured {t} s; nothing to "
                             "divide the tokens by")
        ttft.append(t)
        for c, context in enumerate(contexts):
            _progress(f"{engine.model.backend}: decode {new_tokens} tokens after "
                      f"{context or prompt_tokens} ({i + 1}/{repeats})")
            before = read_gbs()
            r = engine.generate(longest[:context] if context else prompt,
                                max_new_tokens=new_tokens + 1, **greedy)
            roof = max(before, read_gbs())
            t_tok = _decode_seconds_per_token(r, new_tokens, context or prompt_tokens)
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
            "kv_bytes_per_token": kv_bytes_per_token(engine.kv_pool, context or prompt_tokens),
            "weights_gb_s": nbytes / t_tok / 1e9,
            "read_gb_s": statistics.median(x["read_gb_s"] for x in runs),
            "pct_of_read": statistics.median(x["pct_of_read"] for x in runs),
            "rounds": runs})
    for row in rows[1:]:
        row["rate_vs_first_context"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return rows


def _decode_seconds_per_token(r, new_tokens: int, cached: int) -> float:
    """Seconds per decode token of one run asked for new_tokens + 1 tokens (the first comes from
    the prefill). A run that stopped short (the context filled up) or measured no time is an
    error naming what happened, never a division by zero or a rate from fewer tokens."""
    decoded = r.completion_tokens - 1
    if decoded != new_tokens:
        raise BenchError(f"decoding {new_tokens} tokens after {cached} produced {decoded}: the engine "
                         f"stopped early (finish_reason {getattr(r, 'finish_reason', None)!r}); "
                         "--context or --prompt-tokens plus --new-tokens must fit the model's context")
    if not r.decode_s > 0:
        raise BenchError(f"decoding {new_tokens} tokens after {cached} measured {r.decode_s} s")
    return r.decode_s / decoded


BACKENDS = ("auto", "native", "reference")      # qwen_fast.model.BACKENDS (a test keeps them equal);
                                                # not imported: checking the options loads no model code
QUANTS = ("none", "int4", "int8")
TINY = "tiny"                                   # the test suite's 2-layer model: a smoke run in seconds


class BenchOptionError(QwenFastError, ValueError):
    """An option of ``qwen-fast bench`` that cannot run, found before anything is measured or
    built. The message starts with the option, as argparse's own do: "argument --context: ..."."""


class BenchError(QwenFastError, RuntimeError):
    """A measurement that could not be taken (the engine stopped short, a time of zero)."""


@dataclasses.dataclass
class BenchPlan:
    """The options as check_args() resolved them: what run() builds and measures."""
    config: QwenConfig
    backends: List[str]
    contexts: List[int]
    device: torch.device


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="qwen-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen-1.8b-chat",
                   help="built-in config (default: qwen-1.8b-chat; 'tiny' for a smoke run)")
    p.add_argument("--dtype", default="bfloat16",
                   help="bfloat16, float16 or float32 (bf16, fp16, fp32; auto: the config's)")
    p.add_argument("--backend", default="auto",
                   help="comma-separated, each once: auto, native, reference (default: auto)")
    p.add_argument("--prompt-tokens", type=int, default=128, help=">= 1 (default: 128)")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="decode tokens timed after the first (>= 1; default: 16); with the "
                        "context and that first token they must fit the model's 32767")
    p.add_argument("--context", type=_contexts, default=[0],
                   help="decode with this many tokens already cached (default: after the prompt); "
                        "a comma-separated list measures each in one run, e.g. 128,2048")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads, 1 to this machine's CPU count (default: all cores)")
    p.add_argument("--quant", default="none", choices=QUANTS,
                   help="quantize the layers' weights at load (round-to-nearest, group 128)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache: auto (the model's dtype) or int8 (about half the bytes a position)")
    p.add_argument("--lm-head-quant", default="none", choices=QUANTS,
                   help="quantize lm_head at load too (default: keep it in --dtype)")
    p.add_argument("--repeats", type=int, default=3,
                   help="prefill and decode runs per backend, each decode between read passes (>= 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    return p


def _items(text, example: str) -> List[str]:
    """The items of a comma-separated list: ValueError (a bare message) for an empty list, an
    empty item or an item given twice."""
    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise ValueError(f"got {text!r}, an empty list; expected a comma-separated list such as {example}")
    if not all(items):
        raise ValueError(f"{text!r} has an empty item; expected a comma-separated list such as {example}")
    twice = [v for i, v in enumerate(items) if v in items[:i]]
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice in {text!r}; expected each item once")
    return items


def _parse_contexts(text) -> List[int]:
    values = []
    for v in _items(text, "2048 or 128,2048"):
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a token count; expected integers >= 0 such as 2048 or "
                             "128,2048") from None
        if n < 0:
            raise ValueError(f"{n} is negative; expected token counts >= 0 (0: after the prompt)")
        values.append(n)
    if len(set(values)) != len(values):            # '128,0128'
        raise ValueError(f"{text!r} lists a count twice; expected each once")
    return values


def _contexts(text: str) -> List[int]:
    try:
        return _parse_contexts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _error(option: str, msg: str) -> BenchOptionError:
    return BenchOptionError(f"argument {option}: {msg}")


def _check_int(args, name: str, lo: int, hi: Optional[int] = None, what: str = "") -> Optional[int]:
    option = "--" + name.replace("_", "-")
    v = getattr(args, name)
    if v is None and name == "threads":
        return None
    bound = f"in [{lo}, {hi}]{what}" if hi is not None else f">= {lo}"
    if not isinstance(v, int) or isinstance(v, bool):
        raise _error(option, f"{v!r} is not an integer; expected one {bound}")
    if v < lo or (hi is not None and v > hi):
        raise _error(option, f"got {v}; expected an integer {bound}")
    return v


def _check_config(name) -> QwenConfig:
    names = ", ".join(sorted(BUILTIN_CONFIGS) + [TINY])
    if isinstance(name, QwenConfig):               # run(args) from code may pass one
        cfg = dataclasses.replace(name)
    elif isinstance(name, str) and name.strip().lower() == TINY:
        from .testing import tiny_config
        cfg = tiny_config()
    elif isinstance(name, str) and name.strip().lower() in BUILTIN_CONFIGS:
        cfg = builtin_config(name.strip())
    else:
        raise _error("--config", f"unknown config {name!r}; expected one of {names}")
    try:
        cfg.validate()
    except ConfigError as e:
        raise _error("--config", str(e)) from None
    return cfg


def _check_device(text) -> torch.device:
    """cpu, cuda or cuda:N, and present: the same rule as Engine's device= (qwen_fast.engine),
    checked here without importing the engine."""
    expected = "expected cpu, cuda or cuda:N"
    try:
        dev = text if isinstance(text, torch.device) else torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise _error("--device", f"{text!r} is not a device; {expected}") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise _error("--device", f"{text!r}: a CPU device has no index; expected cpu")
        return dev
    if dev.type != "cuda":
        raise _error("--device", f"device type {dev.type!r} is not supported; {expected}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        why = ("this torch was built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA GPU")
        raise _error("--device", f"{text!r} was asked for but {why} (torch {torch.__version__}); "
                                 "expected cpu here")
    if dev.index is not None and dev.index >= n:
        raise _error("--device", f"{text!r}: this machine has {n} CUDA GPU(s); expected cuda:0 "
                                 f"to cuda:{n - 1}")
    return dev


def _check_json_path(path) -> None:
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise _error("--json", f"got {path!r}; expected the path of a file to write the results to")
    if os.path.isdir(path):
        raise _error("--json", f"{str(path)!r} is a directory; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise _error("--json", f"the directory {parent!r} does not exist; expected a file in an "
                               "existing directory")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise _error("--json", f"{str(path)!r} cannot be written; expected a writable path")


def check_args(args) -> BenchPlan:
    """Every option of ``qwen-fast bench``, checked before anything is measured or built (the
    bandwidth passes and the full-size model build take minutes): BenchOptionError naming the
    option, what it got and what it expects. Loads no model code and touches no GPU memory."""
    cfg = _check_config(args.config)
    name = args.config if isinstance(args.config, str) else "the config"
    if args.dtype != "auto":
        try:
            parse_dtype(args.dtype)
        except ConfigError:
            raise _error("--dtype", f"got {args.dtype!r}; expected bfloat16, float16 or float32 "
                                    "(bf16, fp16, fp32; auto: the config's)") from None
    try:
        backends = _items(args.backend, "auto or auto,reference")
    except ValueError as e:
        raise _error("--backend", str(e)) from None
    for b in backends:
        if b not in BACKENDS:
            raise _error("--backend", f"unknown backend {b!r}; expected a comma-separated list of "
                                      f"{', '.join(BACKENDS)}")
    limit = cfg.max_context
    prompt_tokens = _check_int(args, "prompt_tokens", 1, limit - 1,
                               f" (one token is produced after the prompt; {name}'s maximum "
                               f"context is {limit})")
    new_tokens = _check_int(args, "new_tokens", 1)
    context = args.context
    if isinstance(context, int) and not isinstance(context, bool):
        context = [context]
    try:
        contexts = (_parse_contexts(",".join(map(str, context))) if isinstance(context, (list, tuple))
                    else _parse_contexts(context))
    except ValueError as e:
        raise _error("--context", str(e)) from None
    cpus = os.cpu_count()
    _check_int(args, "threads", 1, cpus, " (this machine's CPUs)" if cpus else "")
    for option in ("quant", "lm_head_quant"):
        v = getattr(args, option, "none")
        if (v or "none") not in QUANTS:
            raise _error("--" + option.replace("_", "-"), f"got {v!r}; expected one of {', '.join(QUANTS)}")
    _check_int(args, "repeats", 1)
    device = _check_device(args.device)
    _check_json_path(getattr(args, "json_path", None))
    for c in contexts:      # each run: c (or the prompt) cached + 1 token from the prefill + new_tokens
        total = (c or prompt_tokens) + 1 + new_tokens
        if total > limit:
            what = (f"--context {c}" if c else f"--prompt-tokens {prompt_tokens} (--context 0)")
            raise _error("--context/--new-tokens" if c else "--prompt-tokens/--new-tokens",
                         f"{what} + 1 token from the prefill + --new-tokens {new_tokens} = {total} "
                         f"tokens, beyond {name}'s maximum context of {limit}; expected the "
                         f"cached tokens + --new-tokens <= {limit - 1}")
    return BenchPlan(config=cfg, backends=backends, contexts=contexts, device=device)


def kv_bytes_per_token(pool, context: int) -> int:
    """KV-cache bytes one decode step reads with `context` tokens cached: every layer's keys and
    values of every position, in the pool's format (an int8 cache's scales included)."""
    return pool.bytes_per_page // pool.page_size * context


def run(args, plan: Optional[BenchPlan] = None) -> dict:
    """Measure what args asks for; the options are checked first (check_args) unless plan is
    the result of that check."""
    plan = plan or check_args(args)
    from .engine import Engine
    from .model import resolve_ops

    if args.threads is not None:
        torch.set_num_threads(args.threads)     # torch and our OpenMP kernels share one runtime
    backends, contexts = plan.backends, plan.contexts
    _progress("measuring memory bandwidth")
    read_gbs = read_bandwidth_gbs(device=args.device)
    copy_gbs = copy_bandwidth_gbs(device=args.device)
    _progress(f"read {read_gbs:.1f} GB/s, copy {copy_gbs:.1f} GB/s; building random "
              f"{args.config} weights in {args.dtype}")
    none = lambda v: None if v in (None, "none") else v      # noqa: E731
    engine = Engine.from_pretrained(load_format="dummy", config=plan.config, dtype=args.dtype,
                                    device=args.device, backend=backends[0],
                                    quant=none(args.quant),
                                    lm_head_quant=none(getattr(args, "lm_head_quant", None)),
                                    kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
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
    """``qwen-fast bench``: every option is checked first; a bad one exits with argparse's
    usage and "qwen-fast bench: error: argument --OPTION: ..." (status 2) in a second, before
    any bandwidth pass or model build."""
    parser = build_parser()
    args = args or parser.parse_args(argv)
    try:
        plan = check_args(args)
    except BenchOptionError as e:
        parser.error(str(e))
    out = run(args, plan)
    print(format_table(out))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
