"""Serving benchmark: the OpenAI-compatible server (qwen_fast/server.py) under a bounded load on
loopback, at several concurrency levels.

    python benchmarks/bench_serving.py --dummy tiny                      # smoke run, seconds
    python benchmarks/bench_serving.py --model Qwen-1_8B-Chat --concurrency 1,4,16 \\
        [--requests 32] [--prompt-tokens 128] [--max-tokens 64] [--dtype bfloat16] [--device cpu]

It loads the engine, starts the server itself on 127.0.0.1 (a free port, in this process, no
key), and for each concurrency level c sends ``--requests`` streamed /v1/completions requests
from c client threads (each thread sends its next request as soon as the previous one ended).
Every request has its own random prompt of exactly ``--prompt-tokens`` token ids and its own
seed, and ``ignore_eos`` so that it produces exactly ``--max-tokens`` tokens.

Reported per level: requests/s and output tokens/s over the level's wall time; TTFT (request
sent -> first text chunk), inter-token latency (gap between consecutive text chunks; a chunk
may hold more than one token when a character spans tokens), TPOT ((latency - TTFT) /
(tokens - 1) per request) and end-to-end latency, as p50 and p99. The client is the standard
library's http.client (one connection per request), so its own overhead is small.
JSON and a markdown table go to benchmarks/results/serving-<model>-<device>-*.
"""
from __future__ import annotations

import argparse
import http.client
import json
import queue
import random
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(xs: List[float], q: float) -> Optional[float]:
    """q-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def one_request(host: str, port: int, body: dict, timeout: float) -> Dict:
    """Send one streamed completion; returns its timings (seconds) and what came back."""
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=payload,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        chunk_times, text, usage, finish = [], [], None, None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                if ch.get("text"):
                    chunk_times.append(time.perf_counter())
                    text.append(ch["text"])
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
        t_end = time.perf_counter()
    finally:
        conn.close()
    return {"start": t0, "end": t_end, "chunk_times": chunk_times, "text": "".join(text),
            "usage": usage, "finish_reason": finish}


def run_level(host: str, port: int, concurrency: int, bodies: List[dict], timeout: float) -> Dict:
    todo: "queue.Queue[dict]" = queue.Queue()
    for b in bodies:
        todo.put(b)
    done, errors = [], []
    lock = threading.Lock()

    def worker():
        while True:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            try:
                r = one_request(host, port, body, timeout)
                r["max_tokens"] = body["max_tokens"]
                with lock:
                    done.append(r)
            except Exception as e:     # counted and reported
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    ttft, itl, tpot, latency = [], [], [], []
    out_tokens = 0
    for r in done:
        n = r["max_tokens"]            # ignore_eos: every request runs to max_tokens
        out_tokens += n
        lat = r["end"] - r["start"]
        latency.append(lat)
        if r["chunk_times"]:
            first = r["chunk_times"][0] - r["start"]
            ttft.append(first)
            itl += [b - a for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
            if n > 1:
                tpot.append((r["chunk_times"][-1] - r["chunk_times"][0]) / (n - 1))

    def ms(xs, q):
        v = percentile(xs, q)
        return None if v is None else round(v * 1e3, 2)

    return {
        "concurrency": concurrency, "requests": len(bodies), "completed": len(done),
        "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 3),
        "requests_per_s": round(len(done) / wall, 3), "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 2),
        "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
        "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
        "latency_p50_ms": ms(latency, 50), "latency_p99_ms": ms(latency, 99),
        "finish_reasons": sorted({r["finish_reason"] for r in done if r["finish_reason"]}),
    }


def make_bodies(n: int, prompt_tokens: int, max_tokens: int, vocab: int, seed: int, model: str) -> List[dict]:
    rng = random.Random(seed)
    return [{"model": model, "prompt": [rng.randrange(vocab) for _ in range(prompt_tokens)],
             "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.9, "seed": seed + i,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            for i in range(n)]


def format_table(rows: List[Dict], meta: Dict) -> str:
    head = ("| concurrency | requests | errors | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
            "ITL p50 ms | ITL p99 ms | TPOT p50 ms | latency p50 ms | latency p99 ms |")
    lines = [head, "|" + "---|" * 12]

    def f(v):
        return "" if v is None else f"{v:g}"
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['completed']}/{r['requests']} | {r['errors']} | "
                     f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                     f"{f(r['ttft_p50_ms'])} | {f(r['ttft_p99_ms'])} | {f(r['itl_p50_ms'])} | "
                     f"{f(r['itl_p99_ms'])} | {f(r['tpot_p50_ms'])} | {f(r['latency_p50_ms'])} | "
                     f"{f(r['latency_p99_ms'])} |")
    meta_line = ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "machine")
    return f"# serving benchmark: {meta['model']}\n\n{meta_line}\n\n" + "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (release layout)")
    src.add_argument("--dummy", choices=["tiny", "full"],
                     help="random weights: tiny (2 layers, qwen_fast.testing.tiny_config) or the "
                          "full-size qwen-1.8b-chat shapes")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: 2 x concurrency, at least 4)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quant", default=None, choices=["int4", "int8"],
                   help="--dummy full only: quantize the layers at load")
    p.add_argument("--lm-head-quant", default=None, choices=["int4", "int8"])
    p.add_argument("--max-batch-size", type=int, default=8, help="the engine's decode batch")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    return p


def _build_engine(args):
    """(engine, name) for the chosen model."""
    import torch

    from qwen_fast import Engine
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dummy == "tiny":
        from qwen_fast.testing import tiny_config
        engine = Engine.from_pretrained(load_format="dummy", config=tiny_config(), device=args.device,
                                        dtype=args.dtype, backend=args.backend,
                                        max_batch_size=args.max_batch_size)
        return engine, "tiny"
    if args.dummy == "full":
        engine = Engine.from_pretrained(load_format="dummy", config="qwen-1.8b-chat", device=args.device,
                                        dtype=args.dtype, backend=args.backend, quant=args.quant,
                                        lm_head_quant=args.lm_head_quant,
                                        max_batch_size=args.max_batch_size)
        return engine, "qwen-1.8b-chat-dummy" + (f"-{args.quant}" if args.quant else "")
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    backend=args.backend, lm_head_quant=args.lm_head_quant,
                                    max_batch_size=args.max_batch_size)
    return engine, Path(args.model).resolve().name


def _serve(args, conn) -> None:
    """The server's process: build the engine, serve, report (host, port, facts), then serve
    until the parent terminates it. A process of its own, as in deployment, so that the load
    generator's threads do not share its interpreter lock."""
    import torch

    from qwen_fast.server import BackgroundServer, create_app
    t0 = time.perf_counter()
    engine, name = _build_engine(args)
    load_s = time.perf_counter() - t0
    with BackgroundServer(create_app(engine, model_name=name)) as srv:
        conn.send({"host": srv.host, "port": srv.port, "name": name, "load_s": load_s,
                   "device": str(engine.device), "device_type": engine.device.type,
                   "dtype": str(engine.dtype).replace("torch.", ""),
                   "eos": engine.generation_config.eos_token_id,
                   "torch_threads": torch.get_num_threads()})
        threading.Event().wait()


def main(argv=None) -> List[Dict]:
    import multiprocessing as mp

    args = build_parser().parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 1,4,16")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(args, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(args.timeout):
            raise SystemExit("the server process did not start in time")
        info = parent.recv()
    except EOFError:
        raise SystemExit("the server process failed to start (see its output above)") from None
    name, vocab = info["name"], info["eos"]    # ordinary tokens only (the specials follow)
    try:
        from harness import machine
        mach = machine()
    except ImportError:
        mach = {}
    meta = {"model": name, "device": info["device"], "dtype": info["dtype"],
            "backend": args.backend, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "endpoint": "/v1/completions (streamed, ignore_eos)", "load_s": round(info["load_s"], 2),
            "torch_threads": info["torch_threads"], "server": "a process of its own",
            "machine": mach}
    rows = []
    host, port = info["host"], info["port"]
    try:
        warm = make_bodies(1, args.prompt_tokens, min(args.max_tokens, 4), vocab, args.seed + 10**6, name)
        one_request(host, port, warm[0], args.timeout)
        for i, c in enumerate(levels):
            n = args.requests or max(4, 2 * c)
            bodies = make_bodies(n, args.prompt_tokens, args.max_tokens, vocab, args.seed + 1000 * i, name)
            row = run_level(host, port, c, bodies, args.timeout)
            rows.append(row)
            print(f"concurrency {c}: {row['completed']}/{n} requests, {row['requests_per_s']:.2f} req/s, "
                  f"{row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']} ms", flush=True)
    finally:
        proc.terminate()
        proc.join(30)
    md = format_table(rows, meta)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"serving-{name}-{info['device_type']}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{tag}-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{tag}-latest.md").write_text(md)
    if any(r["errors"] for r in rows):
        raise SystemExit(f"some requests failed: {[r['error_samples'] for r in rows if r['errors']]}")
    return rows


if __name__ == "__main__":
    main()
