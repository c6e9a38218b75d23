"""Prefix caching, measured in one run with caching on and off (the same weights, two engines):

  (a) a multi-turn chat: each turn adds about --turn-tokens tokens of question to the history
      (and the answer, --answer-tokens greedy tokens): TTFT of every turn, on and off;
  (b) --shared requests sharing a --system-tokens system prompt, each with its own 50-token
      question, sent together: total time and TTFT p50/p99, on and off.

    .venv/bin/python benchmarks/bench_prefix.py [--quant int4] [--turns 8] [--json out.json]

  (c) workload (a) over HTTP against llama.cpp's llama-server (one slot, its prompt cache on:
      cache_prompt) and our server (qwen-fast serve, prefix caching on), one after the other,
      each a subprocess, on the same random weights (ours: --load-format dummy, seed 0, --quant
      for the layers and lm_head; llama-server: the GGUF bench_llamacpp.py writes of them: Q4_0
      for int4, Q8_0 for int8, else our dtype's F16/BF16/F32). Each turn is sent as token ids,
      greedy, --answer-tokens tokens with EOS ignored, streamed: TTFT is the client's time from
      sending the request to the first streamed chunk; the next turn's history is the prompt
      plus that server's own answer (token ids). It reports the prompt tokens each server
      computed. llama-server is built from the llama-cpp-python sdist as bench_llamacpp.py
      builds its tools (--llama-cpp-dir or $LLAMA_CPP_DIR: an existing build); when it cannot
      be built (no compiler, no sdist, a failed build), (c) says why in one line and is skipped.

    .venv/bin/python benchmarks/bench_prefix.py --parts c [--md c.md] [--json c.json]

  --config tiny is a smoke run of (a) and (b) on the test-size model; --md writes the tables of
  the parts that ran (the sections of benchmarks/results/prefix-latest.md).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from qwen_fast import Engine
from qwen_fast.tokenizer import IncrementalDecoder, QwenTokenizer, default_vocab_path, \
    load_tiktoken_bpe
sys.path.insert(0, str(Path(__file__).resolve().parent))   # harness, also when loaded by path
from harness import write_outputs  # noqa: E402


def _prompt(engine, n, g):
    vocab = len(engine.tokenizer) - 208          # plain BPE ids: no special tokens
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def multi_turn(on, off, args) -> list:
    """Workload (a). The conversation is built once, from the caching engine's greedy answers;
    caching on then runs it --repeats times (the cache cleared before each: every repeat starts
    cold), and caching off once, after all of them, over the same prompts. The off turns are long
    (up to ~7 s of full-load prefill each) and no longer sit between the on turns, whose clock
    they slowed. Each repeat's answers must equal the first's, and off's must equal on's (greedy,
    the cache exact): a mismatch is reported in the row."""
    g = torch.Generator().manual_seed(0)
    prompts, answers = [], []
    history: List[int] = []                      # ids of the conversation so far
    on_s: List[List[float]] = []                 # [turn][repeat]
    cached_on: List[int] = []
    same = []
    for rep in range(args.repeats):
        on.clear_prefix_cache()
        for turn in range(args.turns):
            if rep == 0:
                prompts.append(history + _prompt(on, args.turn_tokens, g))
            r = on.generate(prompts[turn], max_new_tokens=args.answer_tokens, temperature=0,
                            ignore_eos=True)
            if rep == 0:
                answers.append(r.token_ids)
                history = prompts[turn] + r.token_ids
                on_s.append([])
                cached_on.append(r.cached_tokens)
                same.append(True)
            else:
                same[turn] = same[turn] and r.token_ids == answers[turn]
            on_s[turn].append(r.prefill_s)
        firsts = [s[rep] for s in on_s]
        print(f"on, repeat {rep + 1}: TTFT per turn " + " ".join(f"{t:.2f}" for t in firsts)
              + f" s; turn {args.turns} / turn 1 = {firsts[-1] / firsts[0]:.2f}", flush=True)
    rows = []
    for turn, ids in enumerate(prompts):
        r = off.generate(ids, max_new_tokens=args.answer_tokens, temperature=0, ignore_eos=True)
        med = statistics.median(on_s[turn])
        row = {"turn": turn + 1, "prompt_tokens": len(ids), "ttft_on_s": med,
               "ttft_on_all_s": on_s[turn], "cached_on": cached_on[turn],
               "ttft_off_s": r.prefill_s, "cached_off": r.cached_tokens,
               "ratio": r.prefill_s / med, "answers_equal": same[turn] and r.token_ids == answers[turn]}
        rows.append(row)
        print(f"turn {turn + 1}: {len(ids)} prompt tokens, TTFT on {med:.2f} s (median of "
              f"{len(on_s[turn])}; {row['cached_on']} cached), off {r.prefill_s:.2f} s: "
              f"{row['ratio']:.1f}x" + ("" if row["answers_equal"] else "; ANSWERS DIFFER"),
              flush=True)
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
#: The GGUF llama-server gets for our --quant (and, unquantized, our --dtype): the same weights.
GGUF_TYPE = {"int4": "q4_0", "int8": "q8_0"}
GGUF_DENSE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
REPLACEMENT = "\ufffd".encode()
PLAIN_VOCAB = 151643                                    # ids below this are plain BPE tokens


def gguf_type(quant: str, dtype: str) -> str:
    """llama.cpp's weight type for ours: Q4_0 for int4, Q8_0 for int8, else our dtype's own."""
    return GGUF_TYPE[quant] if quant in GGUF_TYPE else GGUF_DENSE[dtype]


def parse_parts(text: str) -> List[str]:
    """'a,c' -> ['a', 'c'] (each of a, b, c; in the order a, b, c)."""
    parts = {p.strip().lower() for p in text.split(",") if p.strip()}
    bad = parts - {"a", "b", "c"}
    if bad or not parts:
        raise ValueError(f"--parts: {text!r}: give some of a, b, c separated by commas")
    return sorted(parts)


DONE = "[DONE]"


def parse_sse_line(line) -> Optional[object]:
    """One line of a server-sent event stream: its JSON object for 'data: {...}', DONE for
    'data: [DONE]', None for anything else (blank lines, comments, other fields)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    return json.loads(data)


def tokens_before_text(ids: List[int], push) -> Optional[int]:
    """How many of ``ids`` a streaming detokenizer (``push(id) -> text delta``) takes before
    its first text: 1 unless the first token is an incomplete UTF-8 character (or empty)."""
    for i, t in enumerate(ids):
        if push(t):
            return i + 1
    return None


def is_subsequence(part: List[int], whole: List[int]) -> bool:
    """Whether ``part`` is ``whole`` with some ids left out (in order)."""
    it = iter(whole)
    return all(x in it for x in part)


def ours_turn(events: List[Tuple[float, dict]], prompt_tokens: int) -> dict:
    """Our /v1/completions stream (return_token_ids, include_usage) -> the turn's numbers. A
    chunk is sent once the text has a whole character: the first chunk is the first token's,
    unless that token is held back (tokens_before_text says how many it waited for)."""
    chunks = [(t, e) for t, e in events if e.get("choices")]
    if not chunks:
        raise RuntimeError(f"our server sent no completion chunk: {events[-1:]}")
    ids = next((e["choices"][0]["token_ids"] for _, e in chunks
                if "token_ids" in e["choices"][0]), None)
    usage = next((e["usage"] for _, e in events if e.get("usage")), None) or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_s": chunks[0][0], "total_s": events[-1][0], "answer": ids,
            "cached": cached, "computed": None if cached is None else prompt_tokens - cached,
            "prompt_tokens_seen": usage.get("prompt_tokens")}


def split_tokens(data: bytes, k: int, ranks: Dict[bytes, int]) -> Optional[List[int]]:
    """The ids of the one way to cut ``data`` into ``k`` tokens of ``ranks`` (bytes -> id);
    None when there is no way or more than one."""
    found: List[List[int]] = []

    def walk(i: int, left: int, acc: List[int]) -> None:
        if len(found) > 1:
            return
        if left == 0:
            if i == len(data):
                found.append(list(acc))
            return
        for j in range(i + 1, len(data) - left + 2):
            t = ranks.get(data[i:j])
            if t is not None:
                walk(j, left - 1, acc + [t])

    walk(0, k, [])
    return found[0] if len(found) == 1 else None


def llama_turn(events: List[Tuple[float, dict]], ranks: Optional[Dict[bytes, int]] = None,
               pieces: Optional[Dict[int, bytes]] = None) -> dict:
    """llama-server's /completion stream -> the turn's numbers. Each token's chunk carries
    its id (``tokens``) and the count so far (``tokens_predicted``); a token that ends inside a
    UTF-8 character gets no chunk of its own: its bytes come in the next chunk's ``content``,
    its id never. With the vocabulary (``ranks``: bytes -> id, ``pieces``: id -> bytes; the
    GGUF's ids are ours) such ids are rebuilt from those bytes when only one cut fits and no
    byte was lost (invalid UTF-8 comes as U+FFFD) (``rebuilt`` counts them); ``complete`` says
    whether every id is there. The last event
    (``stop``) has the timings: prompt_n = prompt tokens evaluated, cache_n = reused."""
    ids: List[int] = []
    first, first_n, final, rebuilt, lost = None, None, None, 0, False
    for t, e in events:
        if e.get("stop"):
            final = e
            continue
        toks = e.get("tokens") or []
        if first is None and (toks or e.get("content")):
            first, first_n = t, e.get("tokens_predicted")
        held = (e.get("tokens_predicted") or 0) - len(ids) - len(toks)
        if held > 0:
            data = (e.get("content") or "").encode("utf-8")
            cur = (pieces or {}).get(toks[0], b"") if toks and toks[0] < PLAIN_VOCAB else b""
            part = data[:len(data) - len(cur)]
            # Bytes that are no UTF-8 at all reach the client as U+FFFD: those are lost.
            cut = split_tokens(part, held, ranks) if ranks is not None and len(toks) == 1 \
                and data.endswith(cur) and REPLACEMENT not in part else None
            if cut is None:
                lost = True
            else:
                ids += cut
                rebuilt += held
        ids += toks
    if final is None:
        raise RuntimeError(f"llama-server's stream has no final event: {events[-1:]}")
    timings = final.get("timings") or {}
    n = timings.get("predicted_n", final.get("tokens_predicted"))
    return {"ttft_s": first if first is not None else events[-1][0], "total_s": events[-1][0],
            "answer": ids, "complete": not lost and len(ids) == n, "rebuilt": rebuilt,
            "first_chunk_tokens": first_n,
            "computed": timings.get("prompt_n"), "cached": timings.get("cache_n"),
            "tokens_cached": final.get("tokens_cached"),
            "prompt_tokens_seen": final.get("tokens_evaluated")}


def _stream(url: str, body: dict, timeout: float = 600.0) -> List[Tuple[float, dict]]:
    """POST ``body`` and read the reply's server-sent events: [(seconds from sending the
    request to the event's arrival, event)], up to [DONE] or the end of the stream."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Accept": "text/event-stream"})
    events = []
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            ev = parse_sse_line(line)
            if ev is DONE:
                break
            if ev is not None:
                events.append((time.perf_counter() - t0, ev))
    if not events:
        raise RuntimeError(f"{url}: an empty event stream")
    return events


def _post(url: str, body: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            pass                                        # not listening yet, or 503 (loading)
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_turns(args, ours: bool, tool: Optional[Path] = None,
               gguf: Optional[Path] = None) -> List[dict]:
    """Workload (a) over HTTP against one server, started here and stopped after. Each turn
    sends the history plus --turn-tokens new ids (the same draws for both servers) as token
    ids, streamed, greedy, --answer-tokens new tokens with EOS ignored; TTFT is the client's
    time from sending the request to the first streamed chunk. The next turn's history is
    this prompt plus this server's own answer (its token ids). Turn 0, a short prompt, warms
    the server up and is not reported."""
    name = "ours" if ours else "llama-server"
    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    logpath = Path(tempfile.gettempdir()) / f"bench_prefix_{'ours' if ours else 'llama'}.log"
    if ours:
        cmd = [sys.executable, "-m", "qwen_fast.cli", "serve", "--load-format", "dummy",
               "--dtype", args.dtype, "--port", str(port), "--log-level", "warning"]
        if args.quant != "none":
            cmd += ["--quant", args.quant, "--lm-head-quant", args.quant]
        tok = QwenTokenizer(default_vocab_path())
    else:
        ranks = load_tiktoken_bpe(default_vocab_path())     # the GGUF's ids 0..151642 are these
        pieces = {i: b for b, i in ranks.items()}
        cmd = [str(tool), "-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads),
               "-c", str(args.ctx), "-np", "1", "--host", "127.0.0.1", "--port", str(port)]
    print(f"(c) {name}: {' '.join(cmd[1:] if ours else [tool.name] + cmd[1:])} (log: {logpath})",
          flush=True)
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(0, PLAIN_VOCAB, (8,), generator=torch.Generator().manual_seed(9)).tolist()
    rows = []
    with open(logpath, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            t0 = time.perf_counter()
            _wait_ready(base + "/health", proc)
            print(f"(c) {name} ready after {time.perf_counter() - t0:.0f} s", flush=True)
            history: List[int] = []
            for turn in range(0, args.turns + 1):
                if turn:            # the same questions as (a): its seed, its draws
                    question = torch.randint(0, PLAIN_VOCAB, (args.turn_tokens,), generator=g)
                    ids = history + question.tolist()
                else:
                    ids = warm
                if ours:
                    body = {"model": "qwen-1.8b-chat", "prompt": ids,
                            "max_tokens": args.answer_tokens, "temperature": 0,
                            "repetition_penalty": 1.0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True},
                            "return_token_ids": True}
                    r = ours_turn(_stream(base + "/v1/completions", body), len(ids))
                    r["first_chunk_tokens"] = tokens_before_text(r["answer"] or [],
                                                                 IncrementalDecoder(tok).push)
                else:
                    body = {"prompt": ids, "n_predict": args.answer_tokens, "temperature": 0,
                            "repeat_penalty": 1.0, "ignore_eos": True, "cache_prompt": True,
                            "stream": True, "return_tokens": True}
                    r = llama_turn(_stream(base + "/completion", body), ranks, pieces)
                    r["refetched"] = not r.pop("complete")
                    if r["refetched"]:
                        # An id held back with a UTF-8 character could not be rebuilt: ask
                        # again, whole (not timed); its answer is what the slot's cache holds.
                        whole = _post(base + "/completion", {**body, "stream": False})
                        r["streamed_ids"], r["answer"] = r["answer"], whole["tokens"]
                        r["refetch_agrees"] = is_subsequence(r["streamed_ids"], r["answer"])
                if len(r["answer"] or []) != args.answer_tokens:
                    raise RuntimeError(f"{name} answered {len(r['answer'] or [])} tokens, not "
                                       f"{args.answer_tokens}: {r}")
                if turn:
                    rows.append({"turn": turn, "prompt_tokens": len(ids), **r})
                    print(f"  {name} turn {turn}: {len(ids)} prompt tokens, {r['computed']} "
                          f"computed, TTFT {r['ttft_s']:.2f} s", flush=True)
                    history = ids + r["answer"]
        finally:
            _stop(proc)
    return rows


def compare_turns(ours: List[dict], llama: List[dict]) -> List[dict]:
    """The two servers' turns side by side, with ours / llama-server of the TTFT."""
    rows = []
    for a, b in zip(ours, llama):
        rows.append({"turn": a["turn"], "prompt_tokens": a["prompt_tokens"],
                     "ttft_ours_s": a["ttft_s"], "cached_ours": a["cached"],
                     "computed_ours": a["computed"],
                     "ttft_llama_s": b["ttft_s"], "computed_llama": b["computed"],
                     "cached_llama": b["cached"],
                     "ratio": a["ttft_s"] / b["ttft_s"] if b["ttft_s"] else None})
    return rows


def against_llama_server(args) -> Optional[dict]:
    """Part (c): llama-server, then ours, never together. None, after one line saying why,
    when llama.cpp's llama-server cannot be found or built (or the GGUF cannot be written)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_llamacpp as B
    cache = B.cache_dir()
    ftype = gguf_type(args.quant, args.dtype)
    opts = argparse.Namespace(llama_cpp_dir=args.llama_cpp_dir, cache_dir=None, build=False,
                              no_build=args.no_build, sdist=args.sdist, jobs=args.jobs)
    try:
        build = B.ensure_tools(["llama-server"] + (["llama-quantize"] if ftype in B.QUANT_TYPES
                                                   else []), opts)
        gguf = B.ensure_gguf(cache, "qwen-1.8b-chat", args.dtype, 0, ftype, build)
    except B.Missing as m:
        print(f"(c) skipped: {m.what}. To get it: {m.how}", flush=True)
        return None
    except RuntimeError as e:                   # the build (or llama-quantize) failed
        print(f"(c) skipped: llama.cpp could not be built: {e}", flush=True)
        return None
    tool = B.find_tool("llama-server", build)
    info = build / "qwen_fast-build.json"
    version = subprocess.run([str(tool), "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True).stdout.strip().splitlines()
    load = os.getloadavg()[0]
    llama = http_turns(args, False, tool=tool, gguf=gguf)
    ours = http_turns(args, True)
    rows = compare_turns(ours, llama)
    for r in rows:
        print(f"turn {r['turn']}: {r['prompt_tokens']} tokens: ours {r['ttft_ours_s']:.2f} s "
              f"({r['computed_ours']} computed), llama-server {r['ttft_llama_s']:.2f} s "
              f"({r['computed_llama']} computed): {r['ratio']:.2f}x", flush=True)
    return {"gguf": gguf.name, "llama_server": [v for v in version if v.startswith("version")],
            "llama_cpp_build": json.loads(info.read_text()).get("sdist") if info.is_file() else None,
            "threads": args.threads, "ctx": args.ctx, "answer_tokens": args.answer_tokens,
            "turn_tokens": args.turn_tokens, "loadavg_1min_before": round(load, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "turns": rows, "ours": ours, "llama": llama}


# ---- markdown ------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def markdown_c(c: dict) -> str:
    """Part (c)'s table (and what the runs had in common) as markdown."""
    lines = [f"Workload (a) over HTTP, token-id prompts, greedy {c['answer_tokens']}-token "
             f"answers (EOS ignored), streamed; TTFT = the client's time from sending the request "
             f"to the first streamed chunk. llama-server ({', '.join(c['llama_server']) or '?'}, "
             f"{c.get('llama_cpp_build') or 'own build'}): {c['gguf']}, one slot (-np 1), "
             f"cache_prompt, -t {c['threads']}, -c {c['ctx']}. Ours: qwen-fast serve on the same "
             f"random weights, prefix caching on. One after the other; 1-min load average "
             f"{c['loadavg_1min_before']} before, {c['loadavg_1min_after']} after.",
             "",
             "| turn | prompt tokens | TTFT ours (s) | cached ours | TTFT llama-server (s) | "
             "evaluated by llama-server (cached) | ours / llama-server |",
             "|---|---|---|---|---|---|---|"]
    for r in c["turns"]:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {_f(r['ttft_ours_s'])} | "
                     f"{_f(r['cached_ours'], '{}')} | {_f(r['ttft_llama_s'])} | "
                     f"{_f(r['computed_llama'], '{}')} ({_f(r['cached_llama'], '{}')}) | "
                     f"{_f(r['ratio'])} |")
    notes = []
    rebuilt = [f"{t['turn']} ({t['rebuilt']} id{'s' if t['rebuilt'] > 1 else ''})"
               for t in c["llama"] if t.get("rebuilt")]
    if rebuilt:
        notes.append("llama-server streams no id for a token that ends inside a UTF-8 "
                     "character; such ids were rebuilt from the bytes of the next chunk (one cut "
                     f"into vocabulary tokens fits) in turn(s) {', '.join(rebuilt)}")
    for who, turns in (("ours", c["ours"]), ("llama-server", c["llama"])):
        held = [f"{t['turn']} ({t['first_chunk_tokens']})" for t in turns
                if t.get("first_chunk_tokens") not in (None, 1)]
        if held:
            notes.append(f"{who}'s first chunk came after more than one token (an incomplete "
                         f"UTF-8 character held back) in turn(s) {', '.join(held)}")
        again = [t for t in turns if t.get("refetched")]
        if again:
            notes.append(
                f"{who}: ids it did not stream could not be rebuilt, so the answer was asked "
                f"for again, whole and not timed (the same prompt: {who} then recomputes only "
                f"its last token, and the next turn's history has this answer), in turn(s) "
                f"{', '.join(str(t['turn']) for t in again)}; the ids streamed "
                + ("agree with the answer fetched" if all(t.get("refetch_agrees") for t in again)
                   else "differ from the answer fetched (probably: the last prompt token "
                   "recomputed alone gets other bits than in the whole prompt's batch, and the "
                   "random weights' logits are close) in turn(s) " + ", ".join(
                       str(t["turn"]) for t in again if not t.get("refetch_agrees"))))
    t = c["turns"]
    if t:
        lines += ["", f"TTFT(turn {t[-1]['turn']}) / TTFT(turn 1): ours "
                  f"{t[-1]['ttft_ours_s'] / t[0]['ttft_ours_s']:.2f}, llama-server "
                  f"{t[-1]['ttft_llama_s'] / t[0]['ttft_llama_s']:.2f}."]
    if notes:
        lines += [""] + [f"Note: {n}." for n in notes]
    return "\n".join(lines) + "\n"


def markdown(out: dict) -> str:
    """The parts that ran, as the sections of benchmarks/results/prefix-latest.md."""
    parts = []
    if out.get("multi_turn"):
        rows = ["## (a) A multi-turn chat", "",
                "| turn | prompt tokens | TTFT on (s) | cached | TTFT off (s) | off / on |",
                "|---|---|---|---|---|---|"]
        mt = out["multi_turn"]
        rows += [f"| {r['turn']} | {r['prompt_tokens']} | {r['ttft_on_s']:.2f} | {r['cached_on']} | "
                 f"{r['ttft_off_s']:.2f} | {r['ratio']:.1f} |" for r in mt]
        reps = len(mt[0].get("ttft_on_all_s", [mt[0]["ttft_on_s"]]))
        per = [r["ttft_on_all_s"][i] for r in (mt[-1], mt[0]) for i in range(reps)] \
            if "ttft_on_all_s" in mt[0] else []
        rows += ["", f"TTFT on: the median of {reps} runs of the conversation (cache cleared "
                 f"before each). TTFT(turn {mt[-1]['turn']}) / TTFT(turn 1) = "
                 f"{mt[-1]['ttft_on_s'] / mt[0]['ttft_on_s']:.2f}"
                 + (" (each run: " + ", ".join(f"{per[i] / per[reps + i]:.2f}" for i in range(reps))
                    + ")" if per else "") + "."]
        bad = [str(r["turn"]) for r in mt if not r.get("answers_equal", True)]
        rows += ["Greedy answers " + (f"DIFFER in turn(s) {', '.join(bad)}" if bad else
                                      "identical in every run, on and off") + "."]
        parts.append("\n".join(rows) + "\n")
    if out.get("shared"):
        s = out["shared"]
        rows = ["## (b) Requests sharing a system prompt, sent together", "",
                "| | total (s) | TTFT p50 (s) | TTFT p99 (s) |", "|---|---|---|---|"]
        rows += [f"| {k} | {s[k]['total_s']:.1f} | {s[k]['ttft_p50_s']:.2f} | "
                 f"{s[k]['ttft_p99_s']:.2f} |" for k in ("on", "off")]
        rows += ["", f"TTFT p50 on / off = {s['ttft_p50_ratio']:.2f}"]
        parts.append("\n".join(rows) + "\n")
    if out.get("llama_server"):
        parts.append("## (c) against llama.cpp's llama-server\n\n" + markdown_c(out["llama_server"]))
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen-1.8b-chat", help="qwen-1.8b-chat, or tiny: a smoke "
                                                             "run of (a) and (b)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(GGUF_DENSE))
    p.add_argument("--quant", default="int4", choices=["none", "int4", "int8"])
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--turn-tokens", type=int, default=200)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="(a): runs of the conversation with "
                                                          "caching on (median TTFT per turn)")
    p.add_argument("--shared", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--md", type=Path, help="write the tables of the parts that ran here (markdown)")
    p.add_argument("--parts", default="a,b,c", help="which of a, b, c to run (default a,b,c)")
    p.add_argument("--threads", type=int, default=2, help="(c): both servers' threads")
    p.add_argument("--ctx", type=int, default=4096, help="(c): llama-server's context (-c)")
    p.add_argument("--port", type=int, default=0, help="(c): the servers' port (default: a free one)")
    p.add_argument("--llama-cpp-dir", help="(c): an existing llama.cpp build (its bin/ has "
                                           "llama-server); default $LLAMA_CPP_DIR, else the "
                                           "bench_llamacpp.py build under the cache")
    p.add_argument("--sdist", help="(c): the llama-cpp-python sdist to build llama.cpp from")
    p.add_argument("--no-build", action="store_true", help="(c): never build llama.cpp")
    p.add_argument("--jobs", type=int, default=2, help="(c): llama.cpp build jobs")
    args = p.parse_args(argv)
    try:
        parts = parse_parts(args.parts)
    except ValueError as e:
        p.error(str(e))
    quant = None if args.quant == "none" else args.quant
    config = args.config
    if config == "tiny":                        # a smoke run: the test-size model
        from qwen_fast.testing import tiny_config
        config = tiny_config(seq_length=8192, max_position_embeddings=8192)
    out = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "a" in parts or "b" in parts:
        on = Engine.from_pretrained(load_format="dummy", config=config, dtype=args.dtype,
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
        if args.config != "qwen-1.8b-chat":
            print("(c) skipped: it runs on the full-size model only (our server's dummy weights "
                  "are qwen-1.8b-chat's)", flush=True)
        else:
            out["llama_server"] = against_llama_server(args)
    md = markdown(out)
    if md:
        print("\n" + md, flush=True)
    write_outputs(md, out, args.md, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
