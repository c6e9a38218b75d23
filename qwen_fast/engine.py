"""The user-facing Engine: load, generate (batched), stream, chat, score logits.

    from qwen_fast import Engine
    eng = Engine.from_pretrained("Qwen-1_8B-Chat", device="cpu", dtype="bfloat16")
    response, history = eng.chat("你好")
    for delta in eng.stream("Once upon a time", max_new_tokens=32): print(delta, end="")

The decoding loop is plain Python over the model's batched forward. Every request in a batch has
its own sampling parameters, seed, stop conditions and KV-cache length.

Threads: one Engine may be shared. Every call's requests go through the engine's serving core
(qwen_fast/core.py): one step thread plans each step (qwen_fast/scheduler.py), runs it as one
forward over the packed tokens of every running request (qwen_fast/runner.py) and samples each
request's next token with its own parameters, generator and stop token ids, so results always
belong to their call and equal what the call would get alone. Text is made on the caller's
thread (TextStream): detokenization and stop strings stay off the step thread. A stream's request
runs from the moment stream() returns, whether or not it is read; closing the stream (from any
thread), or dropping it, cancels it.

Memory: the KV cache is a pool of pages (qwen_fast/kv_cache.py) sized by kv_cache_budget; a
request takes pages as it writes positions and gives them back when it ends. When the pool runs
out, the most recently admitted request is preempted and later recomputed (its caller sees only
latency); only a prompt that could not fit the whole pool is refused (CapacityError).
"""
from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import chat as chatml
from .config import GenerationConfig, QwenConfig, builtin_config, ntk_alpha, parse_dtype
from .errors import CapacityError, ConfigError, RequestError
from .loader import available_memory, dummy_state_dict, load_config, load_state_dict
from .core import EngineCore
from .kv_cache import (DEFAULT_PAGE_SIZE, PagePool, StepMetadata, check_kv_group,
                       format_bytes)
from .model import BACKENDS, QwenModel
from .request import Request
from .runner import Runner
from .speculative import SequenceSpeculation
from .sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob, make_generator, token_logprobs
from .scheduler import Scheduler
from .tokenizer import IncrementalDecoder, QwenTokenizer

Prompt = Union[str, Sequence[int], torch.Tensor, np.ndarray]


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str                  # "stop" (a stop token or string), "length", or "abort"
                                        # (the stream was closed before the end)
    prompt_tokens: int
    stop_reason: Union[int, str, None] = None   # the stop token id or stop string that ended it
    prefill_s: float = 0.0              # time to first token (prefill + first sample)
    decode_s: float = 0.0               # time for the remaining tokens
    kv_cache_bytes: int = 0             # peak KV cache pages this request held, in bytes
    num_preemptions: int = 0            # times the pool ran out and it was recomputed
    cached_tokens: int = 0              # prompt tokens read from the prefix cache, not computed
    logprobs: Optional[list] = None     # with params.logprobs: a TokenLogprob per token_ids entry
    stop_logprob: Optional["TokenLogprob"] = None   # and the stop token's, if one ended it
    num_draft_tokens: int = 0           # speculation: draft tokens verified (params.speculative)
    num_accepted_tokens: int = 0        # of them, those that were output

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string: that
    much must be held back while streaming, since it may still become a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def parse_device(device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a torch.device -> torch.device; ConfigError for anything
    else, or for a GPU this machine does not have."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device={device!r} was asked for but torch sees no CUDA GPU")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device={device!r}: this machine has {n} CUDA GPU(s) (0..{n - 1})")
    return dev


class _Text:
    """The text of one request, made on the reading caller's thread from the token ids the step
    thread appends: incremental detokenization (never a broken UTF-8 character), stop strings
    (the text is cut before the first one, and the request is then cancelled), and the holdback
    of a tail that may still become a stop string."""

    def __init__(self, req: Request, tokenizer: QwenTokenizer):
        self.req = req
        self.stops = req.params.stop or []
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""
        self.emitted = 0            # characters of text already handed out
        self.read = 0               # output tokens consumed
        self.stop_string: Optional[str] = None
        self.done = False

    def pending(self) -> bool:
        """Whether advance() has something to do (called under the core's lock)."""
        return self.done or self.req.finished or len(self.req.output_ids) > self.read

    def advance(self) -> str:
        """Consume the tokens that arrived; returns the text delta now safe to hand out."""
        r = self.req
        finished = r.finished           # read first: once finished, every token is in
        with r.lock:
            new = r.output_ids[self.read:]
        for tok in new:
            if self.done:
                break
            self.read += 1
            prev = len(self.text)
            self.text += self.decoder.push(tok)
            if self.stops:
                lo = max(0, prev - max(len(s) for s in self.stops) + 1)
                hits = [(i, s) for s in self.stops if (i := self.text.find(s, lo)) >= 0]
                if hits:
                    i, s = min(hits)
                    self.text = self.text[:i]
                    self.stop_string = s
                    self.done = True
        if not self.done and finished and self.read == len(r.output_ids):
            self.text += self.decoder.flush()
            self.done = True
        end = len(self.text) if self.done or not self.stops else len(self.text) - _holdback(self.text, self.stops)
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def result(self, page_bytes: int) -> "GenerationResult":
        r = self.req
        t_first = r.t_first if r.t_first is not None else (r.t_done or r.t_submit)
        t_done = r.t_done if r.t_done is not None else t_first
        stopped = self.stop_string is not None
        return GenerationResult(
            text=self.text, token_ids=list(r.output_ids[:self.read]),
            finish_reason="stop" if stopped else (r.finish_reason or "abort"),
            stop_reason=self.stop_string if stopped else r.stop_reason,
            prompt_tokens=len(r.prompt_ids), prefill_s=t_first - r.t_submit,
            decode_s=max(0.0, t_done - t_first), kv_cache_bytes=r.peak_pages * page_bytes,
            num_preemptions=r.num_preemptions, cached_tokens=r.cached_tokens,
            logprobs=list(r.logprobs[:self.read]) if r.params.logprobs is not None else None,
            stop_logprob=r.stop_logprob if not stopped and r.finish_reason == "stop" else None,
            num_draft_tokens=r.spec.drafted if r.spec is not None else 0,
            num_accepted_tokens=r.spec.accepted if r.spec is not None else 0)


class TextStream:
    """The text deltas of one generation (Engine.stream): an iterator whose ``result`` is the
    GenerationResult (finish_reason, usage, timings) once it is exhausted, None before.

    The request runs from the moment the stream is made, whether or not it is read. close()
    cancels it, from any thread (a consumer blocked in next() then stops); dropping the stream
    does the same when it is garbage-collected. A stream closed before its end ends with
    finish_reason "abort" in its result."""

    def __init__(self, engine: "Engine", req: Request):
        self._core = engine._core
        self._page_bytes = engine._pool.bytes_per_page
        self._text = _Text(req, engine.tokenizer)
        self._closed = False
        self.result: Optional["GenerationResult"] = None

    @property
    def request(self) -> Request:
        return self._text.req

    @property
    def tokens_read(self) -> int:
        """Output tokens whose text has been consumed so far (the deltas handed out, and any held
        back for a possible stop string or an unfinished UTF-8 character, cover them)."""
        return self._text.read

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        t = self._text
        while True:
            if self.result is not None:
                raise StopIteration
            if self._closed:
                self._end()
                raise StopIteration
            delta = t.advance()
            if t.done:
                self._end()
                if delta:
                    return delta
                raise StopIteration
            if delta:
                return delta
            self._core.wait_until(lambda: self._closed or t.pending())

    def _end(self) -> None:
        r = self._text.req
        if not r.finished:
            self._core.abort(r)         # a stop string, or closed: free its pages now
        if r.error is not None and self._text.stop_string is None and not self._closed:
            raise r.error
        self.result = self._text.result(self._page_bytes)

    def close(self) -> None:
        """Cancel the generation (any thread); later next() calls stop."""
        if self._closed:
            return
        self._closed = True
        with self._core.cond:
            self._core.scheduler.abort(self._text.req)
            self._core.cond.notify_all()

    def __del__(self) -> None:
        # Only a flag, no lock: the garbage collector may run this on any thread, the step
        # thread too, in the middle of planning. The next plan retires the request.
        if not self._closed and self.result is None:
            self._closed = True
            self._text.req.cancelled = True


_log = logging.getLogger("qwen_fast")


def auto_dtype(cfg: QwenConfig, device: Union[str, torch.device],
               backend: str = "auto") -> Tuple[torch.dtype, str]:
    """The dtype that dtype="auto" picks, and why.

    The release's choice (cfg.default_dtype(): its fp32 / fp16 / bf16 flags, bf16 when none is
    set), except on a CPU whose kernels compute bf16 natively (AVX-512 BF16: the attention's
    q . k and the unquantized GEMMs run vdpbf16ps), where a checkpoint that asks for fp16 runs
    in bf16: measured on the development machine (Zen 4), 1,400-token prefill of the int4 model
    took 15-16 s in fp16 against 6 s in bf16 before fp16 had its own attention kernel and
    hardware conversions, and still 1.07-1.08x bf16's time after (benchmarks/bench_dtype.py).
    The numerics change: activations, the KV cache and the weights that are not quantized
    (embeddings, norms, an fp16 lm_head) round to bf16's 8 significant bits instead of fp16's
    11, so logits differ from the release's fp16 run by about bf16's rounding, and a long greedy
    generation can take another path. int4/int8 weights are unaffected (their fp16 scales are
    widened to fp32 exactly). Pass dtype="float16" to keep fp16.
    fp32 checkpoints stay fp32 (a request for the most exact maths), and GPUs and the
    reference backend keep the release's choice."""
    release = cfg.default_dtype()
    if release != torch.float16:
        return release, "the checkpoint's (config.json)" if (cfg.fp32 or cfg.fp16 or cfg.bf16) \
            else "the release's default"
    if torch.device(device).type != "cpu" or backend == "reference":
        return release, "the checkpoint's (config.json)"
    from . import ops
    if not ops.HAVE_C or "avx512_bf16" not in ops._C.linear_isas():
        return release, "the checkpoint's (config.json); this CPU has no AVX-512 BF16"
    return torch.bfloat16, ("config.json asks for float16; this CPU computes bf16 natively "
                            "(AVX-512 BF16), faster than fp16; pass dtype='float16' to keep it")


class Engine:
    PREFILL_TOKENS = 4096   # most prompt tokens a step computes while nothing decodes
    PREFILL_CHUNK = 256     # most prompt tokens a step computes beside decoding requests

    def __init__(self, model: QwenModel, tokenizer: QwenTokenizer,
                 generation_config: Optional[GenerationConfig] = None,
                 kv_cache_budget: Union[int, str, None] = "auto", max_batch_size: int = 8,
                 kv_page_size: int = DEFAULT_PAGE_SIZE, prefix_caching: bool = True,
                 kv_cache_dtype: str = "auto", kv_cache_group: Optional[int] = None,
                 speculative_max_batch: Optional[int] = None):
        """Every call's requests run in one shared batch (continuous batching over a paged KV
        cache: qwen_fast/core.py), at most max_batch_size at a time; the others wait for a row.

        kv_cache_budget: the bytes of the KV page pool, made when the engine is built (on the
        CPU its memory is committed only as pages are written). A request is admitted for the
        pages its tokens need now and takes more as it writes; when the pool runs out the most
        recently admitted request is preempted and recomputed later. Only a prompt that cannot
        fit the whole pool is refused (CapacityError). "auto" = half the memory available on the
        device when the engine is built (after the weights); an int = that many bytes; None =
        room for max_batch_size sequences of the model's whole context (bounded by the memory
        available). The pool never holds more than that either way.
        kv_page_size: positions per page (qwen_fast/kv_cache.py says how it was chosen).
        prefix_caching: keep the full pages of finished and running requests indexed by their
        tokens (and NTK alpha, dtype, cache format), so that a request whose prompt starts the
        same way (a chat's history, a shared system prompt) computes only the rest. Cached pages
        nobody holds are evicted, least recently used first, when the pool needs room.
        kv_cache_dtype: "auto" (the model's dtype, or "int8" when config.json sets the release's
        use_cache_quantization) or "int8": keys and values as int8 with an fp32 scale per
        position and head (reference.quantize_kv), about half the bytes a position, so the same
        budget holds about twice the positions. The CPU kernels (rotary_kv_cache, attention,
        the fused decode layers) write and read it, as do the CUDA ones. kv_cache_group:
        elements an int8 scale covers (a multiple of 16 dividing head_dim; None = head_dim, one
        scale per position and head).
        speculative_max_batch: requests with speculative="ngram" draft only while at most this
        many sequences decode in a step (None: always), as vLLM's disable_by_batch_size: a
        verify's extra rows are nearly free while a step is bound by reading the weights, not
        once the batch has made it compute-bound (README: Speculative decoding)."""
        self.model = model
        self.dtype_reason = "the model's"     # from_pretrained: why it chose the dtype
        self.cfg: QwenConfig = model.cfg
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig()
        g = self.generation_config
        # A do_sample=False config means greedy: temperature 0 in our parameter names.
        self.default_params = SamplingParams(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature if g.do_sample else 0.0,
            top_p=g.top_p, top_k=g.top_k, repetition_penalty=g.repetition_penalty)
        self.default_params.validate()
        if (not isinstance(max_batch_size, numbers.Integral) or isinstance(max_batch_size, bool)
                or max_batch_size < 1):
            raise ConfigError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if (not isinstance(kv_page_size, numbers.Integral) or isinstance(kv_page_size, bool)
                or not 1 <= kv_page_size <= 4096):
            raise ConfigError(f"kv_page_size must be an int in [1, 4096], got {kv_page_size!r}")
        avail = available_memory(self.device)
        if kv_cache_budget == "auto":
            kv_cache_budget = None if avail is None else avail // 2
        elif kv_cache_budget is not None and (
                not isinstance(kv_cache_budget, numbers.Integral) or isinstance(kv_cache_budget, bool)
                or kv_cache_budget <= 0):
            raise ConfigError(f"kv_cache_budget must be 'auto', a positive number of bytes or None, "
                              f"got {kv_cache_budget!r}")
        if kv_cache_dtype not in ("auto", "int8"):
            raise ConfigError(f"kv_cache_dtype must be 'auto' (the model's dtype) or 'int8', "
                              f"got {kv_cache_dtype!r}")
        int8 = kv_cache_dtype == "int8" or self.cfg.use_cache_quantization
        self.kv_cache_dtype = torch.int8 if int8 else self.dtype
        page_size = int(kv_page_size)
        max_pages = int(max_batch_size) * -(-self.cfg.max_context // page_size)
        kv_group = None
        if self.kv_cache_dtype == torch.int8:
            try:
                kv_group = check_kv_group(self.cfg, kv_cache_group)
            except ValueError as e:
                raise ConfigError(f"kv_cache_group: {e}") from None
        page_bytes = PagePool.page_bytes(self.cfg, page_size, self.kv_cache_dtype, kv_group)
        if kv_cache_budget is None:
            kv_cache_budget = max_pages * page_bytes if avail is None else min(max_pages * page_bytes, avail)
        if kv_cache_budget < page_bytes:
            raise ConfigError(f"kv_cache_budget of {format_bytes(kv_cache_budget)} holds no KV page "
                              f"({page_size} positions = {format_bytes(page_bytes)}); raise it")
        self.kv_cache_budget: int = int(kv_cache_budget)
        self._pool = PagePool.for_budget(self.cfg, self.kv_cache_budget, page_size, self.dtype,
                                         self.device, max_pages=max_pages,
                                         kv_dtype=self.kv_cache_dtype, kv_group=kv_group)
        if speculative_max_batch is not None and (
                not isinstance(speculative_max_batch, numbers.Integral)
                or isinstance(speculative_max_batch, bool) or speculative_max_batch < 1):
            raise ConfigError(f"speculative_max_batch must be None or a positive int, got "
                              f"{speculative_max_batch!r}")
        if not isinstance(prefix_caching, bool):
            raise ConfigError(f"prefix_caching must be True or False, got {prefix_caching!r}")
        cfg = self.cfg
        self.scheduler = Scheduler(
            self._pool, int(max_batch_size), self.PREFILL_CHUNK, self.PREFILL_TOKENS,
            prefix_caching=prefix_caching,
            alpha_of=lambda n: ntk_alpha(n, cfg.seq_length) if cfg.use_dynamic_ntk else 1,
            speculative_max_batch=speculative_max_batch)
        self._core = EngineCore(self.scheduler, Runner(model, self._pool, len(tokenizer),
                                                       buffer_rows=int(max_batch_size) * 9))
        # The steps run on the core's thread: this (loading) thread's OpenMP team would only
        # slow them down (qwen_fast/core.py).
        self._release_caller_threads()

    def _release_caller_threads(self) -> None:
        """Release the calling thread's OpenMP team, if it has one (qwen_fast/core.py says why):
        after loading, and whenever a caller submits work, since torch code the caller ran in
        between (a benchmark's read pass, the caller's own tensors) makes one again. While it
        exists, every parallel region of every step pays a wake-up of a sleeping thread: an int4
        decode step measured 0.80 of the read pass with the team of the thread that had just
        run a read pass still alive, and 0.87-0.88 without (benchmarks/results/decode-share-latest.md).
        Costs nothing when there is none."""
        from . import ops
        if ops.HAVE_C and self.device.type == "cpu":
            ops._C.release_openmp_threads()

    @property
    def kv_pool(self) -> PagePool:
        """The KV page pool (its size, page size and use)."""
        return self._pool

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (pages held by running requests stay theirs)."""
        with self._core.cond:
            self.scheduler.clear_cache()

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike, None] = None, *, device: str = "cpu",
                        dtype: Union[str, torch.dtype] = "auto", backend: str = "auto",
                        load_format: str = "safetensors", config: Union[str, QwenConfig, None] = None,
                        progress: Optional[bool] = None, seed: int = 0,
                        kv_cache_budget: Union[int, str, None] = "auto",
                        check_finite: bool = True, verify_vocab: bool = True,
                        quant: Optional[str] = None,
                        lm_head_quant: Optional[str] = None,
                        max_batch_size: int = 8,
                        kv_page_size: int = DEFAULT_PAGE_SIZE,
                        prefix_caching: bool = True, kv_cache_dtype: str = "auto",
                        kv_cache_group: Optional[int] = None,
                        speculative_max_batch: Optional[int] = None) -> "Engine":
        """Load a checkpoint directory in the release layout, or build random weights.

        load_format: "safetensors" (default) or "dummy" (random weights from ``config``: a
        QwenConfig, a built-in name such as "qwen-1.8b-chat", or the path's config.json).
        dtype: a float dtype, or "auto": the release's (bf16 unless config.json says fp16 or
        fp32), except that on a CPU with AVX-512 BF16 a checkpoint that asks for fp16 (the
        release's Int4/Int8) runs in bf16, which our kernels compute faster there (see
        ``auto_dtype``). ``engine.dtype_reason`` says why the dtype was chosen.
        backend: "reference" (PyTorch), "native" or "auto" (our kernels where they exist).
        kv_cache_budget: bytes of the KV page pool (see Engine).
        max_batch_size: sequences decoded together at most (see Engine).
        kv_page_size: positions per KV page (see Engine).
        prefix_caching: reuse the cached pages of a prompt's prefix (see Engine).
        kv_cache_dtype, kv_cache_group: the KV cache's format; speculative_max_batch (see Engine).
        check_finite: refuse NaN/Inf weights (see loader.load_state_dict; about 0.2 s for 1.8B).
        verify_vocab: require the release qwen.tiktoken's sha256; False loads a deliberately
        different (still well-formed) vocabulary.
        quant: "int4" or "int8" quantizes the layers' Linears at load (round-to-nearest, group
        128, symmetric: what ``qwen-fast quantize`` writes): a dense checkpoint's after reading
        them, the dummy weights as they are drawn; a GPTQ checkpoint is loaded quantized as it
        is, and quant= is refused for it.
        lm_head_quant: "int8" or "int4" quantizes lm_head at load the same way (in bf16 it is
        about half of an int4 model's bytes per token); None keeps it in ``dtype``.

        Every problem with the files or the config is a ConfigError or CheckpointError naming
        the file and field; the small files are checked before any weight is read, and the
        weights' size is checked against the free memory before anything is allocated.
        """
        from .loader import check_memory

        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dev = parse_device(device)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"path must be a checkpoint directory (str or os.PathLike), got "
                              f"{type(path).__name__}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ConfigError(f"seed (of the dummy weights) must be an integer, got {seed!r}")
        model_dir = Path(path) if path is not None else None
        if config is not None and load_format != "dummy":
            raise ConfigError("config= is only used with load_format='dummy'; a checkpoint's own "
                              "config.json describes its weights")
        if load_format == "dummy":
            if isinstance(config, QwenConfig):
                cfg = config
            elif isinstance(config, str):
                cfg = builtin_config(config)
            elif config is not None:
                raise ConfigError(f"config must be a QwenConfig or a built-in config name, got "
                                  f"{type(config).__name__}")
            elif model_dir is not None:
                cfg = load_config(model_dir)
            else:
                cfg = builtin_config("qwen-1.8b-chat")
            cfg.validate()          # a QwenConfig built in code is checked like config.json
            if cfg.quantization_config is not None:
                raise ConfigError(f"the config has a quantization_config ({cfg.quantization_summary()}): "
                                  "load_format='dummy' draws dense weights; pass quant='int4' or "
                                  "'int8' to quantize them")
        elif load_format == "safetensors":
            if model_dir is None:
                raise ConfigError("from_pretrained needs a checkpoint directory (or load_format='dummy')")
            cfg = load_config(model_dir)
            if quant is not None and cfg.quantization_config is not None:
                raise ConfigError(f"quant={quant!r}: this checkpoint is already quantized "
                                  f"({cfg.quantization_summary()}) and is loaded as it is")
        else:
            raise ConfigError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
        if dtype == "auto":
            dt, dtype_reason = auto_dtype(cfg, dev, backend)
            _log.info("dtype auto: %s (%s)", str(dt).replace("torch.", ""), dtype_reason)
        else:
            dt, dtype_reason = parse_dtype(dtype), "asked for"
        # The small files first, so that a bad one is reported before gigabytes are read.
        gen_cfg = GenerationConfig()
        tok_dir = None
        if model_dir is not None and model_dir.is_dir():
            gpath = model_dir / "generation_config.json"
            if os.path.lexists(gpath):
                gen_cfg = GenerationConfig.from_json(gpath, vocab_size=cfg.vocab_size)
            tok_dir = model_dir
        tokenizer = (QwenTokenizer.from_dir(tok_dir, verify=verify_vocab) if tok_dir is not None
                     else QwenTokenizer.default())
        bits = {None: None, "int4": 4, "int8": 8}
        for name, value in (("quant", quant), ("lm_head_quant", lm_head_quant)):
            if value not in bits:
                raise ConfigError(f"{name} must be None, 'int4' or 'int8', got {value!r}")
        check_memory(cfg, dt, dev, f"load_format={load_format!r}")
        from .qweight import QuantWeight
        if load_format == "dummy":
            # Quantized as drawn, one tensor at a time: no dense copy of the whole model.
            from .gptq import QUANTIZED_LINEARS
            linears = tuple(f".{lin}.weight" for lin in QUANTIZED_LINEARS)

            def convert(name, t):
                # quantized on the CPU (QuantWeight's packing), then moved to the device
                if quant is not None and name.endswith(linears):
                    return QuantWeight.quantize(t.cpu(), bits[quant]).to(dev)
                if lm_head_quant is not None and name == "lm_head.weight":
                    return QuantWeight.quantize(t.cpu(), bits[lm_head_quant]).to(dev)
                return t
            weights = dummy_state_dict(cfg, dt, dev, seed=seed, convert=convert)
        else:
            weights = load_state_dict(model_dir, cfg, dt, dev, progress=progress,
                                      check_finite=check_finite,
                                      lm_head_bits=bits[lm_head_quant])
        if quant is not None and load_format != "dummy":
            # A dense checkpoint quantized at load (round-to-nearest, as `qwen-fast quantize`
            # without writing it), one matrix at a time.
            from .gptq import QUANTIZED_LINEARS
            linears = tuple(f".{lin}.weight" for lin in QUANTIZED_LINEARS)
            for name in [n for n in weights if n.endswith(linears)]:
                weights[name] = QuantWeight.quantize(weights[name].cpu(), bits[quant])
        if lm_head_quant is not None and not isinstance(weights["lm_head.weight"], QuantWeight):
            weights["lm_head.weight"] = QuantWeight.quantize(weights["lm_head.weight"].cpu(),
                                                             bits[lm_head_quant])
        # GPTQ layers are repacked on the CPU; the int4/int8 CUDA kernels read the same layout.
        weights = {k: v.to(dev) if isinstance(v, QuantWeight) and v.device != dev else v
                   for k, v in weights.items()}
        model = QwenModel(cfg, weights, dt, dev, backend=backend)
        engine = cls(model, tokenizer, gen_cfg, kv_cache_budget=kv_cache_budget,
                     max_batch_size=max_batch_size, kv_page_size=kv_page_size,
                     prefix_caching=prefix_caching, kv_cache_dtype=kv_cache_dtype,
                     kv_cache_group=kv_cache_group, speculative_max_batch=speculative_max_batch)
        engine.dtype_reason = dtype_reason
        return engine

    def close(self) -> None:
        """Stop the engine: running and waiting requests fail (their callers get a RuntimeError)
        and its step thread ends; later calls raise. Also done at interpreter exit (a step
        thread killed mid-step would abort the process)."""
        self._core.close()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- request checks: everything is checked before any work is done -------------------
    def sampling_params(self, params: Union[SamplingParams, Mapping, None] = None,
                        **overrides) -> SamplingParams:
        """The parameters a call would use: params (a SamplingParams or a dict; default the
        checkpoint's generation_config) with overrides, checked against this model."""
        if params is None:
            base = self.default_params
        elif isinstance(params, SamplingParams):
            base = params
        elif isinstance(params, Mapping):
            base = SamplingParams.from_mapping(params)
        else:
            raise RequestError(f"params must be a SamplingParams or a dict of parameters, got "
                               f"{type(params).__name__}")
        p = base.replace(**overrides)
        p.validate(vocab_size=self.cfg.vocab_size)
        return p

    def _token_ids(self, prompt, name: str = "prompt") -> List[int]:
        """One prompt -> ids: a str, a list/tuple of ints (numpy integers too), or a 1-D integer
        tensor/array. Anything else is refused by name (bytes, dicts and sets are not ids)."""
        ids = self._encode_one(prompt, name)
        if len(ids) >= self.cfg.max_context:
            raise CapacityError(f"{name} has {len(ids)} tokens; this model handles at most "
                                f"{self.cfg.max_context} tokens in all (prompt + output)",
                                param=name.split("[")[0])
        return ids

    def _encode_one(self, prompt, name: str) -> List[int]:
        param = name.split("[")[0]          # "prompt[3]" -> the parameter "prompt"
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (torch.Tensor, np.ndarray)):
            integer = (prompt.dtype.kind in "iu" if isinstance(prompt, np.ndarray) else
                       not (prompt.dtype.is_floating_point or prompt.dtype.is_complex
                            or prompt.dtype == torch.bool))
            if prompt.ndim != 1 or not integer:
                raise RequestError.of(param, f"{name} must be a 1-D integer tensor of token ids, got shape "
                                   f"{tuple(prompt.shape)} and dtype {prompt.dtype}")
            ids = [int(t) for t in prompt.tolist()]
        elif isinstance(prompt, (list, tuple)):
            ids = []
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise RequestError.of(param, f"{name}[{i}] must be a token id (an int), got "
                                       f"{type(t).__name__} {t!r:.40}")
                ids.append(int(t))
        else:
            raise RequestError.of(param, f"{name} must be a str, a list of token ids or a 1-D integer tensor,"
                               f" got {type(prompt).__name__}")
        if not ids:
            raise RequestError.of(param, f"{name} is empty: give at least one token")
        V = self.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise RequestError.of(param, f"{name}: token ids must be integers in [0, {V}); got {bad[:5]}")
        return ids

    def encode_prompts(self, prompt) -> Tuple[List[List[int]], bool]:
        """generate()'s prompt argument -> (token ids of each prompt, whether it was a batch),
        checked (RequestError with param "prompt"; CapacityError for one longer than the
        context). The one place prompts are read: generate(), stream() and the HTTP server's
        completions use it."""
        return self._batch(prompt)

    def _batch(self, prompt) -> Tuple[List[List[int]], bool]:
        """generate()'s prompt argument -> (ids of each prompt, whether it was a batch). A batch
        is a list/tuple of prompts (whose first item is not a token id) or a 2-D tensor/array;
        one prompt is anything _token_ids takes."""
        if isinstance(prompt, (torch.Tensor, np.ndarray)) and prompt.ndim == 2:
            if prompt.shape[0] == 0:
                raise RequestError.of("prompt", f"prompt is an empty batch (shape {tuple(prompt.shape)}): give "
                                   "at least one prompt")
            items = list(prompt)
        elif (isinstance(prompt, (list, tuple)) and prompt
              and isinstance(prompt[0], (str, list, tuple, torch.Tensor, np.ndarray))):
            items = list(prompt)
        else:
            return [self._token_ids(prompt)], False
        return [self._token_ids(x, f"prompt[{i}]") for i, x in enumerate(items)], True

    def _limits(self, prompts: List[List[int]], params: List[SamplingParams]) -> List[int]:
        """New tokens each request may produce: max_new_tokens, within the model's context."""
        return [min(p.max_new_tokens, self.cfg.max_context - len(ids)) for ids, p in zip(prompts, params)]

    def _check_budget(self, nbytes: int, what: str) -> None:
        if nbytes > self.kv_cache_budget:
            raise CapacityError(
                f"this request needs up to {format_bytes(nbytes)} ({what}), more than the engine's "
                f"kv_cache_budget of {format_bytes(self.kv_cache_budget)}; send fewer tokens at "
                "once, or raise kv_cache_budget in Engine.from_pretrained")

    # ---- requests through the serving core ----------------------------------------------------
    def _requests(self, prompts: List[List[int]], params: List[SamplingParams],
                  extra_stop_ids: Sequence[int] = (), max_waiting: Optional[int] = None) -> List[Request]:
        """Checked prompts -> submitted requests (all or none)."""
        if max_waiting is not None and (not isinstance(max_waiting, numbers.Integral)
                                        or isinstance(max_waiting, bool) or max_waiting < 0):
            raise RequestError.of("max_waiting", f"max_waiting must be None or an int >= 0, got {max_waiting!r}")
        reqs = []
        eos = self.generation_config.eos_token_id
        for ids, p, n in zip(prompts, params, self._limits(prompts, params)):
            stop = set(p.stop_token_ids) | set(extra_stop_ids)
            if not p.ignore_eos:
                stop.add(eos)
            r = Request(ids, p, n, stop, make_generator(p.seed, self.device), self.device)
            spec = p.speculation()
            if spec is not None:
                r.spec = SequenceSpeculation(spec, ids)
            if p.json_schema is not None:
                from .constrained import STOP_IDS, JsonConstraint
                r.constraint = JsonConstraint.compile(self.tokenizer, p.json_schema,
                                                      self.cfg.vocab_size,
                                                      sorted(r.stop_ids) or STOP_IDS)
            reqs.append(r)
        self._release_caller_threads()
        self._core.submit(reqs, max_waiting)
        return reqs

    def _collect(self, reqs: List[Request]) -> List[GenerationResult]:
        """Wait for the requests, making their text as their tokens arrive (so that a stop string
        ends its request at once); their results. Leaving early cancels what still runs."""
        texts = [_Text(r, self.tokenizer) for r in reqs]
        try:
            while True:
                for t in texts:
                    if not t.done:
                        t.advance()
                        if t.done and not t.req.finished:
                            self._core.abort(t.req)     # a stop string
                if all(t.done for t in texts):
                    break
                self._core.wait_until(lambda: any(t.pending() for t in texts if not t.done))
            failed = next((t.req.error for t in texts if t.req.error is not None
                           and t.stop_string is None), None)
            if failed is not None:
                raise failed
            return [t.result(self._pool.bytes_per_page) for t in texts]
        finally:
            for t in texts:
                if not t.req.finished:
                    self._core.abort(t.req)

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompt: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Mapping, None] = None, *,
                 max_waiting: Optional[int] = None,
                 **overrides) -> Union[GenerationResult, List[GenerationResult]]:
        """Complete a prompt, or a batch of prompts (a list/tuple of them, or a 2-D tensor).

        A prompt is text, a list of token ids or a 1-D integer tensor/array. Parameters
        (defaults from generation_config.json): max_new_tokens, temperature (0 = greedy), top_p,
        top_k, repetition_penalty, seed, stop (strings), stop_token_ids, ignore_eos, and, off by
        default, presence_penalty, frequency_penalty, logit_bias, min_p, logprobs, json_schema
        (qwen_fast/sampling.py and constrained.py say what each does); as keywords,
        or params= a SamplingParams or a dict. Generation stops at <|endoftext|> unless ignore_eos.
        max_waiting: refuse the call (OverloadedError, before anything is queued) if more than
        that many requests would then wait for a row of the engine's batch.
        """
        p = self.sampling_params(params, **overrides)
        prompts, many = self._batch(prompt)
        results = self._collect(self._requests(prompts, [p] * len(prompts), self._config_stop_ids(),
                                               max_waiting))
        return results if many else results[0]

    def stream(self, prompt: Prompt, params: Union[SamplingParams, Mapping, None] = None, *,
               max_waiting: Optional[int] = None, **overrides) -> TextStream:
        """Like generate() for one prompt, yielding text deltas as they become final (never a
        broken UTF-8 character, never a piece of a stop string); once exhausted, the stream's
        ``result`` is the GenerationResult. The request is checked and submitted when stream()
        is called (it runs whether or not the stream is read); close the stream (from any
        thread) or drop it to stop early."""
        p = self.sampling_params(params, **overrides)
        (req,) = self._requests([self._token_ids(prompt)], [p], self._config_stop_ids(), max_waiting)
        return TextStream(self, req)

    def streams(self, prompts: Sequence[Prompt],
                params: Union[SamplingParams, Mapping, Sequence, None] = None, *,
                max_waiting: Optional[int] = None, **overrides) -> List[TextStream]:
        """stream() for several prompts at once, submitted together (all or none, one
        max_waiting check for all), so that they decode in the same batch. params: one for all,
        or a list with one per prompt (each a SamplingParams or a dict; overrides apply to all)."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError.of("prompt", "prompts must be a non-empty list of prompts")
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise RequestError.of("params", f"params has {len(params)} entries for {len(prompts)} prompts")
            ps = [self.sampling_params(p, **overrides) for p in params]
        else:
            ps = [self.sampling_params(params, **overrides)] * len(prompts)
        ids = [self._token_ids(p) for p in prompts]
        reqs = self._requests(ids, ps, self._config_stop_ids(), max_waiting)
        return [TextStream(self, r) for r in reqs]

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: Prompt, top_logprobs: int = 0) -> List[Optional["TokenLogprob"]]:
        """The log-probability of each prompt token given the ones before it (None for the
        first), with the top_logprobs most likely tokens at each position: one prefill of the
        prompt (as logits()), log-softmax in fp32 over the tokenizer's ids, 256 rows at a time."""
        if (not isinstance(top_logprobs, numbers.Integral) or isinstance(top_logprobs, bool)
                or not 0 <= top_logprobs <= MAX_LOGPROBS):
            raise RequestError.of("top_logprobs", f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top_logprobs!r}")
        ids = self._token_ids(token_ids, "token_ids")
        n = len(ids)
        self._check_budget(n * (self._pool.bytes_per_page // self._pool.page_size + 2 * self.cfg.vocab_size),
                           f"{n} tokens of KV cache and their logits")

        logits = self._prefill(ids, logits_rows=list(range(n - 1))) if n > 1 else None
        out: List[Optional[TokenLogprob]] = [None]
        for a in range(0, n - 1, 256):
            b = min(n - 1, a + 256)
            out += token_logprobs(logits[a:b], ids[a + 1:b + 1], int(top_logprobs), len(self.tokenizer))
        return out

    def stats(self) -> Dict[str, int]:
        """The serving state now: requests running, waiting for a batch row (and how many of
        those were preempted), KV pages total / used / free / cached, and the running totals of
        steps, preemptions and prefix-cache hits (requests, and prompt tokens they were spared)."""
        return self._core.snapshot()

    @torch.inference_mode()
    def logits(self, token_ids: Prompt) -> torch.Tensor:
        """Full-sequence logits [len, vocab] (fp32 copy of the model-dtype logits), one prefill
        into pages of its own (not the shared pool's), run between two steps."""
        ids = self._token_ids(token_ids, "token_ids")
        n = len(ids)
        self._check_budget(n * (self._pool.bytes_per_page // self._pool.page_size + 4 * self.cfg.vocab_size),
                           f"{n} tokens of KV cache and a {n} x {self.cfg.vocab_size} fp32 logits tensor")

        return self._prefill(ids, logits_dtype=torch.float32)

    def _prefill(self, ids: List[int], **forward_kwargs) -> torch.Tensor:
        """One prefill of ids into pages of its own (not the shared pool's), run on the step
        thread between two steps; model.forward's logits (forward_kwargs choose rows, dtype)."""
        n = len(ids)

        def run():
            pool = PagePool(self.cfg, self._pool.pages_for(n), self._pool.page_size, self.dtype,
                            self.device, self.kv_cache_dtype, self._pool.kv_group)
            meta = StepMetadata.build([list(range(pool.num_pages))], [0], [n], self.device)
            return self.model.forward(torch.tensor(ids), pool, meta, [self.scheduler.alpha_of(n)],
                                      **forward_kwargs)
        return self._core.exclusive(run)

    def _chat_prompt(self, query, history, system, max_window_size) -> Tuple[List[int], list, str]:
        if isinstance(query, (list, tuple)):
            if history is not None:
                raise RequestError("pass either a list of messages or query + history, not both")
            query, history, system = chatml.messages_to_chat(query)
        if not isinstance(query, str):
            raise RequestError(f"query must be a str or a list of messages, got {type(query).__name__}")
        history = chatml.validate_history(history)
        if self.generation_config.chat_format != "chatml":
            raise RequestError(f"chat needs chat_format 'chatml'; this checkpoint's generation_config "
                               f"says {self.generation_config.chat_format!r} (a base model?): use generate()")
        mws = self.generation_config.max_window_size if max_window_size is None else max_window_size
        _, ids = chatml.make_context(self.tokenizer, query, history, system=system, max_window_size=mws)
        return self._token_ids(ids), history, query

    def chat_prompt(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
                    max_window_size: Optional[int] = None) -> List[int]:
        """The token ids of the ChatML prompt chat() sends (query + history, or a list of
        OpenAI-style messages), history trimmed to max_window_size. The one place a chat prompt
        is built: chat(), chat_stream() and the HTTP server's chat completions use it."""
        return self._chat_prompt(query, history, system, max_window_size)[0]

    @property
    def chat_stop_ids(self) -> List[int]:
        """The ids that end a chat answer (<|im_end|>, <|im_start|>, and generation_config's)."""
        return self._chat_stop_ids()

    def chat(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
             max_window_size: Optional[int] = None,
             params: Union[SamplingParams, Mapping, None] = None, **overrides) -> Tuple[str, list]:
        """One chat turn, as the release's model.chat: returns (response, history + [(query, response)]).

        query may also be an OpenAI-style list of {"role", "content"} messages."""
        ids, history, query = self._chat_prompt(query, history, system, max_window_size)
        p = self.sampling_params(params, **overrides)
        (result,) = self._collect(self._requests([ids], [p], self._chat_stop_ids()))
        response = result.text.strip()
        return response, history + [(query, response)]

    def chat_stream(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
                    max_window_size: Optional[int] = None,
                    params: Union[SamplingParams, Mapping, None] = None, **overrides) -> Iterator[str]:
        """Stream one chat turn as text deltas. Like the release, history is not updated.
        The request is checked when chat_stream() is called."""
        ids, history, query = self._chat_prompt(query, history, system, max_window_size)
        p = self.sampling_params(params, **overrides)
        (req,) = self._requests([ids], [p], self._chat_stop_ids())
        return self._chat_deltas(TextStream(self, req))

    @staticmethod
    def _chat_deltas(deltas: Iterator[str]) -> Iterator[str]:
        """chat() strips the response; strip the start of the stream the same way."""
        started = False
        try:
            for delta in deltas:
                if not started:
                    delta = delta.lstrip()
                    started = bool(delta)
                if delta:
                    yield delta
        finally:
            deltas.close()

    def _chat_stop_ids(self) -> List[int]:
        return [t for seq in chatml.STOP_WORDS_IDS for t in seq] + self._config_stop_ids()

    def _config_stop_ids(self) -> List[int]:
        """Single-token stop_words_ids of generation_config.json (the base release lists
        [[151643]]); the release code also stops on these."""
        out = []
        for seq in self.generation_config.stop_words_ids or []:
            if not isinstance(seq, list) or len(seq) != 1 or not isinstance(seq[0], int):
                raise ConfigError(f"generation_config stop_words_ids: only single-token stop words "
                                  f"are supported, got {seq!r}")
            out.append(seq[0])
        return out
