"""Prefix caching, measured in one run with caching on and off (the same weights, two engines):

  (a) a multi-turn chat: each turn adds about --turn-tokens tokens of question to the history
      (and the answer, --answer-tokens greedy tokens): TTFT of every turn, on and off;
  (b) --shared requests sharing a --system-tokens system prompt, each with its own 50-token
      question, sent together: total time and TTFT p50/p99, on and off.

    .venv/bin/python benchmarks/bench_prefix.py [--quant int4] [--turns 8] [--json out.json]

  (c) workload (a) over HTTP against llama.cpp's llama-server (one slot, its prompt cache on:
      cache_prompt) and our server (prefix caching on), one after the other, on the same random
      weights (the GGUF of bench_llamacpp.py: Q4_0 for int4, Q8_0 for int8, F16 for none): the
      client's time for a one-token reply to each turn, and the tokens each server computed.
      llama-server is built from the llama-cpp-python sdist as bench_llamacpp.py builds its
      tools (--llama-cpp-dir to use an existing build); without a compiler or the sdist, (c)
      says why and is skipped.

    .venv/bin/python benchmarks/bench_prefix.py --parts c     # (c) alone
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

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


# ---- (c) over HTTP, against llama.cpp's llama-server ---------------------------------------------
def _post(url: str, body: dict, timeout: float = 600.0) -> Tuple[dict, float]:
    """POST JSON, return (the JSON reply, seconds from sending to the whole reply)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    return out, time.perf_counter() - t0


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900.0) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_turns(args, ours: bool, port: int, tool: Optional[Path] = None,
               gguf: Optional[Path] = None) -> List[dict]:
    """Workload (a) over HTTP against one server, started here and stopped after: each turn
    sends the history plus a new question as token ids, greedy, one new token (so the reply's
    time is its TTFT, as the client sees it); the history then grows by the question and a fixed
    answer of --answer-tokens ids (the same for both servers, so both see the same prompts)."""
    g = torch.Generator().manual_seed(0)
    vocab = 151643                                      # plain BPE ids: no special tokens
    log = open(Path(tempfile.gettempdir()) / f"bench_prefix_{'ours' if ours else 'llama'}.log", "w")
    if ours:
        cmd = [sys.executable, "-m", "qwen_fast.cli", "serve", "--load-format", "dummy",
               "--dtype", args.dtype, "--port", str(port), "--log-level", "warning"]
        if args.quant != "none":
            cmd += ["--quant", args.quant, "--lm-head-quant", args.quant]
        health = f"http://127.0.0.1:{port}/health"
    else:
        cmd = [str(tool), "-m", str(gguf), "-t", str(args.threads), "-c", "8192", "-np", "1",
               "--port", str(port), "--host", "127.0.0.1", "-b", "2048", "-ub", "512"]
        health = f"http://127.0.0.1:{port}/health"
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    rows = []
    try:
        _wait_ready(health, proc)
        history: List[int] = []
        warm = torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(9)).tolist()
        for turn in range(0, args.turns + 1):            # turn 0: a warm-up, not reported
            question = torch.randint(0, vocab, (args.turn_tokens,), generator=g).tolist()
            ids = history + question if turn else warm
            if ours:
                out, dt = _post(f"http://127.0.0.1:{port}/v1/completions",
                                {"model": "qwen-1.8b-chat", "prompt": ids, "max_tokens": 1,
                                 "temperature": 0})
                usage = out.get("usage", {})
                computed = len(ids) - ((usage.get("prompt_tokens_details") or {})
                                       .get("cached_tokens") or 0)
            else:
                out, dt = _post(f"http://127.0.0.1:{port}/completion",
                                {"prompt": ids, "n_predict": 1, "temperature": 0,
                                 "cache_prompt": True})
                computed = (out.get("timings") or {}).get("prompt_n")
            if turn:
                rows.append({"turn": turn, "prompt_tokens": len(ids), "ttft_s": dt,
                             "computed": computed})
                print(f"  {'ours' if ours else 'llama-server'} turn {turn}: {len(ids)} tokens, "
                      f"{computed} computed, {dt:.2f} s", flush=True)
                answer = torch.randint(0, vocab, (args.answer_tokens,), generator=g).tolist()
                history = ids + answer
    finally:
        _stop(proc)
        log.close()
    return rows


def against_llama_server(args) -> Optional[dict]:
    """Part (c): both servers, one after the other; None (with a line saying why) when
    llama.cpp's llama-server cannot be found or built."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_llamacpp as B
    cache = B.cache_dir()
    build = Path(args.llama_cpp_dir).expanduser() if args.llama_cpp_dir else B.default_build_dir(cache)
    try:
        if B.missing_tools(["llama-server", "llama-quantize"], build):
            B.build_llama_cpp(build, args.sdist, cache, targets=["llama-server", "llama-quantize"])
        ftype = {"int4": "q4_0", "int8": "q8_0", "none": "f16"}[args.quant]
        gguf = B.ensure_gguf(cache, "qwen-1.8b-chat", args.dtype, 0, ftype, build)
    except B.Missing as e:
        print(f"(c) skipped: {e}", flush=True)
        return None
    tool = B.find_tool("llama-server", build)
    print(f"(c) llama-server {tool} on {gguf.name}", flush=True)
    llama = http_turns(args, False, args.port, tool=tool, gguf=gguf)
    ours = http_turns(args, True, args.port + 1)
    rows = []
    for a, b in zip(ours, llama):
        rows.append({"turn": a["turn"], "prompt_tokens": a["prompt_tokens"],
                     "ttft_ours_s": a["ttft_s"], "computed_ours": a["computed"],
                     "ttft_llama_s": b["ttft_s"], "computed_llama": b["computed"],
                     "ratio": a["ttft_s"] / b["ttft_s"]})
        print(f"turn {a['turn']}: ours {a['ttft_s']:.2f} s ({a['computed']} computed), "
              f"llama-server {b['ttft_s']:.2f} s ({b['computed']} computed): "
              f"{a['ttft_s'] / b['ttft_s']:.2f}x", flush=True)
    return {"gguf": gguf.name, "turns": rows}


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
    p.add_argument("--parts", default="a,b,c", help="which of a, b, c to run (default all)")
    p.add_argument("--threads", type=int, default=2, help="llama-server's threads (part c)")
    p.add_argument("--port", type=int, default=8351, help="llama-server's port; ours is +1")
    p.add_argument("--llama-cpp-dir", help="an existing llama.cpp build (its bin/ has llama-server)")
    p.add_argument("--sdist", help="the llama-cpp-python sdist to build llama.cpp from")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    quant = None if args.quant == "none" else args.quant
    if args.config == "tiny":                   # a smoke run: the test-size model
        from qwen_fast.testing import tiny_config
        args.config = tiny_config(seq_length=8192, max_position_embeddings=8192)
    out = {"args": {k: str(v) for k, v in vars(args).items()}}
    if parts & {"a", "b"}:
        on = Engine.from_pretrained(load_format="dummy", config=args.config, dtype=args.dtype,
                                    quant=quant, lm_head_quant=quant, max_batch_size=16,
                                    kv_cache_budget=4 * 2**30)
        off = Engine(on.model, on.tokenizer, on.generation_config, max_batch_size=16,
                     kv_cache_budget=4 * 2**30, prefix_caching=False)
        on.generate(_prompt(on, 8, torch.Generator().manual_seed(9)), max_new_tokens=2)   # warm-up
        if "a" in parts:
            out["multi_turn"] = multi_turn(on, off, args)
        if "b" in parts:
            out["shared"] = shared_prompt(on, off, args)
        on.close()
        off.close()
        del on, off
    if "c" in parts:
        if not isinstance(args.config, str) or args.config != "qwen-1.8b-chat":
            print("(c) runs on the full-size model only", flush=True)
        else:
            out["llama_server"] = against_llama_server(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
