"""The ``qwen-fast`` command line: ``chat`` (a REPL with the release demo's commands),
``generate`` (one completion, streamed or as JSON), ``serve`` (an OpenAI-compatible HTTP API,
qwen_fast/server.py; needs ``pip install "qwen_fast[server]"``), ``bench`` (qwen_fast/bench.py)
and ``quantize`` (a GPTQ-format checkpoint by round-to-nearest, qwen_fast/quant.py).

    qwen-fast chat --model Qwen-1_8B-Chat
    qwen-fast generate --model Qwen-1_8B-Chat "Once upon a time" --max-new-tokens 64
    qwen-fast serve --model Qwen-1_8B-Chat --port 8000 [--api-key KEY]
    qwen-fast quantize Qwen-1_8B-Chat Qwen-1_8B-Chat-RTN-Int4 --bits 4
"""
from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional, TextIO

HELP = """\
Commands:
    :help / :h              show this help
    :exit / :quit / :q      leave
    :clear / :cl            clear the screen
    :clear-history / :clh   forget the conversation
    :history / :his         show the conversation
    :seed                   show the seed
    :seed N                 set the seed (it is applied before every turn)
    :conf                   show the generation settings
    :conf key=value         change a setting, e.g. :conf top_p=0.9 or :conf temperature=0
    :reset-conf             back to the checkpoint's generation_config.json settings
Anything else is sent to the model."""


class ChatREPL:
    """The chat loop, separate from the terminal so that it can be driven and tested."""

    def __init__(self, engine, seed: int = 1234, system: Optional[str] = None,
                 out: TextIO = sys.stdout):
        from .chat import DEFAULT_SYSTEM
        self.engine = engine
        self.seed = seed
        self.system = DEFAULT_SYSTEM if system is None else system
        self.out = out
        self.history: List[tuple] = []
        self.params = engine.default_params

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Handle one input line; returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith(":"):
            return self._command(line)
        self.say(f"\nUser: {line}\n\nQwen: ")
        pieces = []
        try:
            for delta in self.engine.chat_stream(line, history=self.history, system=self.system,
                                                 params=self.params, seed=self.seed):
                pieces.append(delta)
                print(delta, end="", file=self.out, flush=True)
        except KeyboardInterrupt:
            self.say("\n[interrupted]")
        except Exception as e:  # a failed turn is reported; the session and its history go on
            self.say(f"\nerror: {type(e).__name__}: {e}")
            return True
        response = "".join(pieces).strip()
        self.say()
        self.history.append((line, response))
        return True

    def _command(self, line: str) -> bool:
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("exit", "quit", "q"):
            return False
        if cmd in ("help", "h"):
            self.say(HELP)
        elif cmd in ("clear", "cl"):
            print("\033[2J\033[H", end="", file=self.out, flush=True)
        elif cmd in ("clear-history", "clear-his", "clh"):
            self.history = []
            self.say("History cleared.")
        elif cmd in ("history", "his"):
            if not self.history:
                self.say("(no history)")
            for i, (q, r) in enumerate(self.history):
                self.say(f"[{i}] User: {q}\n[{i}] Qwen: {r}")
        elif cmd == "seed":
            if not arg:
                self.say(f"seed = {self.seed}")
            else:
                try:
                    self.seed = self.engine.sampling_params(self.params, seed=int(arg)).seed
                    self.say(f"seed = {self.seed}")
                except ValueError:
                    self.say(f"error: :seed needs an integer in [0, 2**32 - 1], got {arg!r}")
        elif cmd == "conf":
            if not arg:
                for k, v in vars(self.params).items():
                    if k != "seed":
                        self.say(f"{k} = {v!r}")
            else:
                self._set_conf(arg)
        elif cmd == "reset-conf":
            self.params = self.engine.default_params
            self.say("Generation settings reset.")
        else:
            self.say(f"error: unknown command :{cmd} (type :help)")
        return True

    def _set_conf(self, arg: str) -> None:
        key, eq, raw = arg.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key:
            self.say("error: use :conf key=value, e.g. :conf top_p=0.9")
            return
        try:
            value = ast.literal_eval(raw)   # literals only: never eval user input
        except (ValueError, SyntaxError):
            value = raw                     # a bare word is taken as a string
        if key == "seed":
            self.say("error: use :seed N to set the seed")
            return
        try:
            self.params = self.engine.sampling_params(self.params, **{key: value})
        except ValueError as e:
            self.say(f"error: {e}")
            return
        self.say(f"{key} = {getattr(self.params, key)!r}")

    def run(self, inp: TextIO = sys.stdin) -> None:
        self.say("Qwen-1.8B-Chat (qwen_fast). Type :help for commands, :exit to leave.")
        interactive = inp.isatty()
        while True:
            try:
                if interactive:
                    print("\n> ", end="", file=self.out, flush=True)
                line = inp.readline()
                if not line:
                    break
                if not self.handle(line):
                    break
            except KeyboardInterrupt:   # Ctrl-C at the prompt: a new prompt, not the end
                self.say("\n(interrupted: :exit or Ctrl-D leaves)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", "-c", "--checkpoint-path", dest="model",
                   help="checkpoint directory (release layout); optional with --load-format dummy")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "reference"])
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                   help="dummy = random weights from the built-in qwen-1.8b-chat config")
    p.add_argument("--lm-head-quant", choices=["int8", "int4"],
                   help="quantize lm_head at load (a GPTQ checkpoint's layers are quantized anyway)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache: auto (the model's dtype) or int8 (about half the bytes a "
                        "position; auto is int8 for a config.json with use_cache_quantization)")
    p.add_argument("--speculative", choices=["ngram"],
                   help="prompt-lookup speculation by default (drafts from the sequence's own "
                        "tokens, verified in one step: same output, fewer steps on text that "
                        "repeats its input); a server request's own field overrides it")
    p.add_argument("--num-speculative-tokens", type=int, help="draft tokens a step (default 8)")
    p.add_argument("--ngram-min", type=int, help="shortest n-gram looked up (default 1)")
    p.add_argument("--ngram-max", type=int, help="longest n-gram looked up (default 4)")
    p.add_argument("--speculative-max-batch", type=int,
                   help="draft only while at most this many sequences decode (default: always)")
    p.add_argument("--quant", choices=["int8", "int4"],
                   help="quantize the layers' Linears at load (round-to-nearest, group 128) of a "
                        "dense checkpoint or of the random dummy weights")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append")
    p.add_argument("--ignore-eos", action="store_true", default=None)


def _sampling_overrides(args) -> dict:
    keys = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
            "stop_token_ids", "ignore_eos", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _speculation(args) -> dict:
    """The --speculative options as sampling parameters (checked before the model load)."""
    from .errors import RequestError
    from .sampling import SamplingParams
    names = ("speculative", "num_speculative_tokens", "ngram_min", "ngram_max")
    spec = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if spec and "speculative" not in spec:
        raise SystemExit("error: --num-speculative-tokens / --ngram-min / --ngram-max need "
                         "--speculative ngram")
    try:
        SamplingParams().replace(**spec)
    except RequestError as e:
        raise SystemExit(f"error: --{e.param.replace('_', '-')}: {e}") from None
    return spec


def _load(args):
    from .engine import Engine
    if args.model is None and args.load_format != "dummy":
        raise SystemExit("error: --model DIR is required (or --load-format dummy)")
    spec = _speculation(args)
    extra = {}
    if getattr(args, "speculative_max_batch", None) is not None:
        extra["speculative_max_batch"] = args.speculative_max_batch
    if getattr(args, "max_batch_size", None) is not None:
        extra["max_batch_size"] = args.max_batch_size
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    backend=args.backend, load_format=args.load_format,
                                    lm_head_quant=getattr(args, "lm_head_quant", None),
                                    quant=getattr(args, "quant", None),
                                    kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"), **extra)
    if spec:        # the engine's default: every request that does not say otherwise
        engine.default_params = engine.default_params.replace(**spec)
    if args.dtype == "auto":
        print(f"dtype: {str(engine.dtype).replace('torch.', '')} ({engine.dtype_reason})",
              file=sys.stderr)
    return engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-fast", description="Fast, exact Qwen-1.8B-Chat inference")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="interactive chat (REPL)")
    _add_model_args(c)
    c.add_argument("--seed", "-s", type=int, default=1234)
    c.add_argument("--system", default=None, help="system prompt (default: You are a helpful assistant.)")
    g = sub.add_parser("generate", help="complete one prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    g.add_argument("--seed", type=int)
    g.add_argument("--json", action="store_true", help="print the result as JSON (no streaming)")
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API (needs qwen_fast[server])")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("QWEN_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: "
                        "$QWEN_FAST_API_KEY; none = no key)")
    s.add_argument("--served-model-name", help="the model's id in the API (default: the "
                                               "checkpoint directory's name)")
    s.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 4 MiB)")
    s.add_argument("--max-concurrency", type=int, default=64,
                   help="streams run at the same time; more wait (default: 64)")
    s.add_argument("--max-batch-size", type=int, default=8,
                   help="sequences decoded together in one batch; more wait for a slot (default: 8)")
    s.add_argument("--max-waiting", type=int, default=128,
                   help="requests that may wait for a batch slot; more get 503 with Retry-After "
                        "(default: 128)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="default deadline of a request in seconds: still queued then -> 503, "
                        "generating -> 504 (default: none; a request's request_timeout field "
                        "overrides it)")
    s.add_argument("--allowed-origins", default=None,
                   help="CORS: comma-separated origins allowed to call the API from a browser "
                        "('*' = any; default: none, no CORS headers)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    pp = sub.add_parser("perplexity", help="perplexity of a text file, and KL divergence against "
                                           "a saved base run (as llama-perplexity)")
    _add_model_args(pp)
    pp.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    pp.add_argument("--context", type=int, default=512, help="tokens a window (default 512)")
    pp.add_argument("--stride", type=int, help="tokens between windows (default context // 2)")
    pp.add_argument("--chunks", action="store_true",
                    help="llama-perplexity's windows: non-overlapping chunks of --context tokens, "
                         "each scoring its second half (the same tokens llama-perplexity scores)")
    pp.add_argument("--save-logits", metavar="F", help="save each token's top-32 log-probabilities "
                                                     "and the rest's mass (.npz), as a --kl-base")
    pp.add_argument("--kl-base", metavar="F", help="a --save-logits file of a base run on the same "
                                                 "text: report KL divergence, top-1 agreement, ratio")
    pp.add_argument("--json", metavar="OUT", help="write the results as JSON")
    b = sub.add_parser("bench", help="decode benchmark on full-size random weights")
    from .bench import build_parser as bench_parser
    bench_parser(b)
    q = sub.add_parser("quantize", help="write a GPTQ (v1) checkpoint: round-to-nearest or calibrated GPTQ")
    q.add_argument("in_dir", metavar="IN_DIR", help="bf16/fp16/fp32 checkpoint directory")
    q.add_argument("out_dir", metavar="OUT_DIR", help="new or empty output directory")
    q.add_argument("--bits", type=int, choices=[4, 8], required=True)
    q.add_argument("--group-size", type=int, default=128,
                   help="inputs per scale and zero; -1 = one group of all inputs (default: 128)")
    q.add_argument("--asym", action="store_true",
                   help="asymmetric: a zero point per group (default: symmetric, as the release)")
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="rtn: round-to-nearest (default); gptq: calibrated GPTQ (needs --calibration)")
    q.add_argument("--calibration", metavar="FILE", help="UTF-8 text for GPTQ's calibration")
    q.add_argument("--samples", type=int, default=128, help="GPTQ: calibration windows (default 128)")
    q.add_argument("--seq-len", type=int, default=512,
                   help="GPTQ: tokens a window (default 512; at most the model's seq_length)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping, a share of mean(diag H)")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize inputs by decreasing activation energy (desc_act, g_idx)")
    q.add_argument("--seed", type=int, default=0, help="GPTQ: seed of the calibration windows")
    return parser


def _missing_server_deps() -> List[str]:
    missing = []
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _serve(args) -> int:
    missing = _missing_server_deps()     # before the (slow) model load
    if missing:
        print(f"error: qwen-fast serve needs {' and '.join(missing)}, which are not installed; "
              'install the server extra: pip install "qwen_fast[server]"', file=sys.stderr)
        return 1
    from .server import ServerOptions, serve
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else
                                      "qwen-1.8b-chat")
    # Every option is checked before the (slow) model load.
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()] \
        if args.allowed_origins else None
    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {args.port}")
        if args.max_batch_size is not None and args.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {args.max_batch_size}")
        opts = ServerOptions(name, args.api_key, args.max_body_bytes, args.max_concurrency,
                             args.max_waiting, args.request_timeout, origins)
    except ValueError as e:
        opt = str(e).split(" ", 1)[0].replace("_", "-")
        print(f"error: --{opt}: {e}", file=sys.stderr)
        return 2
    engine = _load(args)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    serve(engine, host=args.host, port=args.port, model_name=opts.model_name,
          api_key=opts.api_key, max_body_bytes=opts.max_body_bytes,
          max_concurrency=opts.max_concurrency, max_waiting=opts.max_waiting,
          request_timeout=opts.request_timeout, allowed_origins=opts.allowed_origins,
          log_level=args.log_level)
    return 0


def _perplexity(args) -> int:
    from . import perplexity as P
    # Options and files first: nothing is loaded for a run that cannot go.
    if args.context < 2:
        raise ValueError(f"--context must be >= 2, got {args.context}")
    if args.stride is not None and not 1 <= args.stride < args.context:
        raise ValueError(f"--stride must be in [1, --context - 1 = {args.context - 1}], got {args.stride}")
    if args.chunks and args.stride is not None:
        raise ValueError("--chunks and --stride go apart: chunks do not overlap")
    if args.save_logits and args.kl_base:
        raise ValueError("--save-logits and --kl-base go in separate runs: save the base run's "
                         "logits, then compare other runs against it")
    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"--file {args.file}: not a readable file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--file {args.file}: not UTF-8 text ({e})") from None
    base = P.load_logits(args.kl_base) if args.kl_base else None
    if base is not None:
        want = (args.context, args.context if args.chunks else args.stride or args.context // 2,
                bool(args.chunks))
        have = (int(base["context"]), int(base["stride"]), bool(base.get("chunks", False)))
        if have != want:
            raise ValueError(f"--kl-base was saved with --context {have[0]} "
                             + ("--chunks" if have[2] else f"--stride {have[1]}") + "; use the same")
    engine = _load(args)
    ids = engine.tokenizer.encode(text)
    from tqdm import tqdm
    bar = tqdm(total=None, unit="window", desc="perplexity", file=sys.stderr,
               disable=not sys.stderr.isatty())

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)
    try:
        if base is not None:
            run, kl = P.evaluate_against(engine, ids, base, progress)
        else:
            run, kl = P.evaluate(engine, ids, args.context, args.stride, progress,
                                 chunks=args.chunks), {}
    finally:
        bar.close()
    out = {**P.summary(run["nll"]), **kl, "context": run["context"], "stride": run["stride"],
           "chunks": run["chunks"],
           "text_tokens": len(ids), "file": str(path), "model": args.model,
           "dtype": str(engine.dtype).replace("torch.", ""), "quant": args.quant,
           "lm_head_quant": args.lm_head_quant}
    for key in ("kl_mean", "kl_p99", "top1_agreement", "perplexity_ratio"):
        out.setdefault(key, None)           # without --kl-base: no comparison
    if args.save_logits:
        P.save_logits(args.save_logits, run)
    line = (f"perplexity {out['perplexity']:.4f} +/- {out['perplexity_stderr']:.4f} over "
            f"{out['scored_tokens']} tokens (context {out['context']}, "
            + ("llama-perplexity chunks)" if out["chunks"] else f"stride {out['stride']})"))
    if kl:
        line += (f"\nKL divergence vs base: mean {kl['kl_mean']:.6f}, p99 {kl['kl_p99']:.6f}; "
                 f"top-1 agreement {100 * kl['top1_agreement']:.2f}%; perplexity ratio "
                 f"{kl['perplexity_ratio']:.4f} (base {kl['base_perplexity']:.4f})")
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _on_sigterm_interrupt():
    """Make SIGTERM raise KeyboardInterrupt (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    return signal.signal(signal.SIGTERM, interrupt)


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import QwenFastError
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            from .bench import main as bench_main
            bench_main(args=args)
            return 0
        if args.command == "perplexity":
            return _perplexity(args)
        if args.command == "quantize":
            from .quant import quantize_checkpoint
            # SIGTERM (a job scheduler, `kill`) cleans up as Ctrl-C does: the partial output is
            # removed on the way out. A SIGKILLed run's is removed by the next run for that output.
            old = _on_sigterm_interrupt()
            try:
                gptq = {} if args.method == "rtn" else dict(
                    calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                    damp=args.damp, act_order=args.act_order, seed=args.seed)
                if args.method == "rtn" and (args.calibration or args.act_order):
                    raise ValueError("--calibration and --act-order are for --method gptq")
                out = quantize_checkpoint(args.in_dir, args.out_dir, args.bits, args.group_size,
                                          sym=not args.asym, method=args.method, **gptq)
            finally:
                if old is not None:
                    signal.signal(signal.SIGTERM, old)
            print(f"wrote {out}")
            return 0
        engine = _load(args)
        if args.command == "chat":
            ChatREPL(engine, seed=args.seed, system=args.system).run()
            return 0
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        overrides = _sampling_overrides(args)
        if args.json:
            r = engine.generate(prompt, **overrides)
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                              "stop_reason": r.stop_reason, "usage": r.usage,
                              "prefill_s": r.prefill_s, "decode_s": r.decode_s}, ensure_ascii=False))
        else:
            for delta in engine.stream(prompt, **overrides):
                print(delta, end="", flush=True)
            print()
        return 0
    except (QwenFastError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
