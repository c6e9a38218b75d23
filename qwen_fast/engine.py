"""The user-facing Engine: load, generate (batched), stream, chat, score logits.

    from qwen_fast import Engine
    eng = Engine.from_pretrained("Qwen-1_8B-Chat", device="cpu", dtype="bfloat16")
    response, history = eng.chat("你好")
    for delta in eng.stream("Once upon a time", max_new_tokens=32): print(delta, end="")

The decoding loop is plain Python over the model's batched forward. Every request in a batch has
its own sampling parameters, seed, stop conditions and KV-cache length.

Threads: one Engine may be shared. Every call's sequences go through the engine's scheduler
(qwen_fast/scheduler.py): they decode together in one batch (continuous batching), each with
its own parameters, generator and stops, so results always belong to their call and equal what
the call would get alone. A stream's sequence decodes whether or not it is being read; closing
the stream (or dropping it: the garbage collector closes it) cancels it.

Memory: the shared KV cache grows with the tokens it really holds (KVCache.ensure) and with the
sequences in the batch; a sequence joins the batch only while every member's worst case
(prompt + max_new_tokens) fits the engine's kv_cache_budget, and one that could not fit even
alone is refused up front with a CapacityError, before any work is done.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import chat as chatml
from .config import GenerationConfig, QwenConfig, builtin_config, parse_dtype
from .errors import CapacityError, ConfigError, RequestError
from .loader import available_memory, dummy_state_dict, load_config, load_state_dict
from .model import BACKENDS, KVCache, QwenModel
from .sampling import SamplingParams, make_generator
from .scheduler import Scheduler, Seq
from .tokenizer import IncrementalDecoder, QwenTokenizer

Prompt = Union[str, Sequence[int], torch.Tensor, np.ndarray]


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str                  # "stop" (a stop token or string) or "length"
    prompt_tokens: int
    stop_reason: Union[int, str, None] = None   # the stop token id or stop string that ended it
    prefill_s: float = 0.0              # time to first token (prefill + first sample)
    decode_s: float = 0.0               # time for the remaining tokens
    kv_cache_bytes: int = 0             # peak KV cache of the call (shared by a batch's rows)

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


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class _Request:
    """Decoding state of one sequence of a batch."""

    def __init__(self, engine: "Engine", prompt_ids: List[int], params: SamplingParams,
                 extra_stop_ids: Sequence[int], limit: int):
        self.prompt_ids = prompt_ids
        self.params = params
        self.limit = limit
        self.stop_ids = set(params.stop_token_ids) | set(extra_stop_ids)
        if not params.ignore_eos:
            self.stop_ids.add(engine.generation_config.eos_token_id)
        # Prompt + output ids for the repetition penalty, in one buffer sized for the worst case.
        self._ids = torch.empty(len(prompt_ids) + limit, dtype=torch.long, device=engine.device)
        self._ids[:len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        self._n = len(prompt_ids)
        self.generator = make_generator(params.seed, engine.device)
        self.decoder = IncrementalDecoder(engine.tokenizer)
        self.out_ids: List[int] = []
        self.text = ""          # decoded text, stop string removed once found
        self.emitted = 0        # characters of text already yielded
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.t_first = 0.0

    @property
    def history(self) -> torch.Tensor:
        return self._ids[:self._n]

    def add_token(self, tok: int) -> str:
        """Record a sampled token; returns the text delta that is now safe to emit."""
        p = self.params
        if tok in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", tok
            self.text += self.decoder.flush()
            return self._emit(final=True)
        self.out_ids.append(tok)
        self._ids[self._n] = tok
        self._n += 1
        prev = len(self.text)
        self.text += self.decoder.push(tok)
        if p.stop:
            lo = max(0, prev - max(len(s) for s in p.stop) + 1)
            hits = [(i, s) for s in p.stop if (i := self.text.find(s, lo)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[:i]
                self.finish_reason, self.stop_reason = "stop", s
                return self._emit(final=True)
        if len(self.out_ids) >= self.limit:
            self.finish_reason = "length"
            self.text += self.decoder.flush()
            return self._emit(final=True)
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final or not self.params.stop else len(self.text) - _holdback(self.text, self.params.stop)
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


class TextStream:
    """The text deltas of one generation (Engine.stream): an iterator whose ``result`` is the
    GenerationResult (finish_reason, usage, timings) once it is exhausted, None before.
    close() stops the generation (it is cancelled in the engine's batch); dropping the stream
    does the same when it is garbage-collected."""

    def __init__(self, run):
        self._run = run
        self.result: Optional["GenerationResult"] = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._run)[1]
        except StopIteration as stop:
            if stop.value is not None:
                self.result = stop.value[0]
            raise StopIteration from None

    def close(self) -> None:
        self._run.close()


def _finish(run) -> list:
    """Run a _run generator to its end and return its results."""
    try:
        while True:
            next(run)
    except StopIteration as stop:
        return stop.value


class Engine:
    PREFILL_TOKENS = 4096   # most prompt positions one prefill forward takes (Scheduler.prefill_tokens)

    def __init__(self, model: QwenModel, tokenizer: QwenTokenizer,
                 generation_config: Optional[GenerationConfig] = None,
                 kv_cache_budget: Union[int, str, None] = "auto", max_batch_size: int = 8):
        """Every call's sequences decode in one shared batch (qwen_fast/scheduler.py: continuous
        batching), at most max_batch_size at a time; the others wait for a slot.

        kv_cache_budget: the most bytes the shared KV cache may hold, counting each sequence in
        the batch at its worst case (prompt + max_new_tokens); a sequence waits until it fits,
        and one that cannot fit even alone is refused when submitted. logits() counts its
        output too. "auto" = half the memory available on the device when the engine is built
        (after the weights; no limit if that is unknown); an int = that many bytes; None = no
        limit but the model's context."""
        self.model = model
        self.cfg: QwenConfig = model.cfg
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig()
        g = self.generation_config
        # A do_sample=False config means greedy: temperature 0 in our parameter names.
        self.default_params = SamplingParams(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature if g.do_sample else 0.0,
            top_p=g.top_p, top_k=g.top_k, repetition_penalty=g.repetition_penalty)
        self.default_params.validate()
        if kv_cache_budget == "auto":
            avail = available_memory(self.device)
            kv_cache_budget = None if avail is None else avail // 2
        elif kv_cache_budget is not None and (
                not isinstance(kv_cache_budget, numbers.Integral) or isinstance(kv_cache_budget, bool)
                or kv_cache_budget <= 0):
            raise ConfigError(f"kv_cache_budget must be 'auto', a positive number of bytes or None, "
                              f"got {kv_cache_budget!r}")
        self.kv_cache_budget: Optional[int] = None if kv_cache_budget is None else int(kv_cache_budget)
        if (not isinstance(max_batch_size, numbers.Integral) or isinstance(max_batch_size, bool)
                or max_batch_size < 1):
            raise ConfigError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.scheduler = Scheduler(model, len(tokenizer), int(max_batch_size),
                                   self.kv_cache_budget, prefill_tokens=self.PREFILL_TOKENS)
        # The steps run on the scheduler's thread: this (loading) thread's OpenMP team would
        # only slow them down (qwen_fast/scheduler.py).
        from . import ops
        if ops.HAVE_C and self.device.type == "cpu":
            ops._C.release_openmp_threads()

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
                        max_batch_size: int = 8) -> "Engine":
        """Load a checkpoint directory in the release layout, or build random weights.

        load_format: "safetensors" (default) or "dummy" (random weights from ``config``: a
        QwenConfig, a built-in name such as "qwen-1.8b-chat", or the path's config.json).
        dtype: "auto" (the release's: bf16 unless config.json says fp16/fp32), or a float dtype.
        backend: "reference" (PyTorch), "native" or "auto" (our kernels where they exist).
        kv_cache_budget: bytes the shared KV cache may hold (see Engine).
        max_batch_size: sequences decoded together at most (see Engine).
        check_finite: refuse NaN/Inf weights (see loader.load_state_dict; about 0.2 s for 1.8B).
        verify_vocab: require the release qwen.tiktoken's sha256; False loads a deliberately
        different (still well-formed) vocabulary.
        quant: "int4" or "int8" quantizes the dummy weights as they are drawn (round-to-nearest,
        group 128, symmetric: what ``qwen-fast quantize`` writes), for benchmarks; a GPTQ
        checkpoint (quantize_config.json) is loaded quantized without it.
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
            if quant is not None:
                raise ConfigError("quant= is only used with load_format='dummy'; a GPTQ "
                                  "checkpoint is loaded quantized as it is (quantize a bf16 one "
                                  "with `qwen-fast quantize`)")
            if model_dir is None:
                raise ConfigError("from_pretrained needs a checkpoint directory (or load_format='dummy')")
            cfg = load_config(model_dir)
        else:
            raise ConfigError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
        dt = cfg.default_dtype() if dtype == "auto" else parse_dtype(dtype)
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
            from .quant import QUANTIZED_LINEARS
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
        if lm_head_quant is not None and not isinstance(weights["lm_head.weight"], QuantWeight):
            weights["lm_head.weight"] = QuantWeight.quantize(weights["lm_head.weight"].cpu(),
                                                             bits[lm_head_quant])
        # GPTQ layers are repacked on the CPU; the int4/int8 CUDA kernels read the same layout.
        weights = {k: v.to(dev) if isinstance(v, QuantWeight) and v.device != dev else v
                   for k, v in weights.items()}
        model = QwenModel(cfg, weights, dt, dev, backend=backend)
        return cls(model, tokenizer, gen_cfg, kv_cache_budget=kv_cache_budget,
                   max_batch_size=max_batch_size)

    def close(self) -> None:
        """Stop the engine's scheduler: running and waiting sequences are cancelled (their
        callers get a RuntimeError) and its step thread ends; later calls raise. Also done at
        interpreter exit (a step thread killed mid-step would abort the process)."""
        self.scheduler.close()

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
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (torch.Tensor, np.ndarray)):
            integer = (prompt.dtype.kind in "iu" if isinstance(prompt, np.ndarray) else
                       not (prompt.dtype.is_floating_point or prompt.dtype.is_complex
                            or prompt.dtype == torch.bool))
            if prompt.ndim != 1 or not integer:
                raise RequestError(f"{name} must be a 1-D integer tensor of token ids, got shape "
                                   f"{tuple(prompt.shape)} and dtype {prompt.dtype}")
            ids = [int(t) for t in prompt.tolist()]
        elif isinstance(prompt, (list, tuple)):
            ids = []
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise RequestError(f"{name}[{i}] must be a token id (an int), got "
                                       f"{type(t).__name__} {t!r:.40}")
                ids.append(int(t))
        else:
            raise RequestError(f"{name} must be a str, a list of token ids or a 1-D integer tensor,"
                               f" got {type(prompt).__name__}")
        if not ids:
            raise RequestError(f"{name} is empty: give at least one token")
        V = self.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise RequestError(f"{name}: token ids must be integers in [0, {V}); got {bad[:5]}")
        if len(ids) >= self.cfg.max_context:
            raise CapacityError(f"{name} has {len(ids)} tokens; this model handles at most "
                                f"{self.cfg.max_context} tokens in all (prompt + output)")
        return ids

    def _batch(self, prompt) -> Tuple[List[List[int]], bool]:
        """generate()'s prompt argument -> (ids of each prompt, whether it was a batch). A batch
        is a list/tuple of prompts (whose first item is not a token id) or a 2-D tensor/array;
        one prompt is anything _token_ids takes."""
        if isinstance(prompt, (torch.Tensor, np.ndarray)) and prompt.ndim == 2:
            items = list(prompt)
        elif (isinstance(prompt, (list, tuple)) and prompt
              and isinstance(prompt[0], (str, list, tuple, torch.Tensor, np.ndarray))):
            items = list(prompt)
        else:
            return [self._token_ids(prompt)], False
        return [self._token_ids(x, f"prompt[{i}]") for i, x in enumerate(items)], True

    def _limits(self, prompts: List[List[int]], params: List[SamplingParams]) -> List[int]:
        """New tokens each sequence may produce; refuses (CapacityError) a call with a sequence
        whose worst-case KV cache could not fit the budget even alone."""
        limits = [min(p.max_new_tokens, self.cfg.max_context - len(ids)) for ids, p in zip(prompts, params)]
        self.scheduler.check_fits(len(prompts), max(len(ids) + n for ids, n in zip(prompts, limits)))
        return limits

    def _check_budget(self, nbytes: int, what: str) -> None:
        if self.kv_cache_budget is not None and nbytes > self.kv_cache_budget:
            raise CapacityError(
                f"this request needs up to {_gib(nbytes)} ({what}), more than the engine's "
                f"kv_cache_budget of {_gib(self.kv_cache_budget)}; lower max_new_tokens, send "
                "fewer prompts at once, or raise kv_cache_budget in Engine.from_pretrained")

    # ---- the decoding loop: the scheduler's -------------------------------------------------
    def _run(self, prompts: List[List[int]], params: List[SamplingParams], limits: List[int],
             extra_stop_ids: Sequence[int] = ()):
        """Generate for a checked batch through the scheduler: yields (row, text delta) of a
        single prompt as they come (a batch's rows all finish first), returns the results.
        Closing the generator early cancels its sequences."""
        seqs = [Seq(_Request(self, ids, p, extra_stop_ids, n))
                for ids, p, n in zip(prompts, params, limits)]
        sched = self.scheduler
        sched.submit(seqs)
        try:
            if len(seqs) == 1:
                while (delta := sched.next_delta(seqs[0])) is not None:
                    yield 0, delta
            else:
                sched.wait(seqs)
                for b, s in enumerate(seqs):
                    while s.deltas:
                        yield b, s.deltas.popleft()
            return [GenerationResult(
                text=s.state.text, token_ids=s.state.out_ids, finish_reason=s.state.finish_reason,
                stop_reason=s.state.stop_reason, prompt_tokens=len(s.state.prompt_ids),
                prefill_s=s.t_first - s.t_submit, decode_s=s.t_done - s.t_first,
                kv_cache_bytes=s.kv_peak) for s in seqs]
        finally:
            for s in seqs:
                if not s.done:
                    sched.cancel(s)

    def _start(self, ids: List[int], p: SamplingParams, extra_stop_ids: Sequence[int]):
        """A checked one-prompt run (not started yet: no turn is taken until it is iterated)."""
        return self._run([ids], [p], self._limits([ids], [p]), extra_stop_ids)

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompt: Union[Prompt, Sequence[Prompt]],
                 params: Union[SamplingParams, Mapping, None] = None,
                 **overrides) -> Union[GenerationResult, List[GenerationResult]]:
        """Complete a prompt, or a batch of prompts (a list/tuple of them, or a 2-D tensor).

        A prompt is text, a list of token ids or a 1-D integer tensor/array. Parameters
        (defaults from generation_config.json): max_new_tokens, temperature (0 = greedy), top_p,
        top_k, repetition_penalty, seed, stop (strings), stop_token_ids, ignore_eos; as keywords,
        or params= a SamplingParams or a dict. Generation stops at <|endoftext|> unless ignore_eos.
        """
        p = self.sampling_params(params, **overrides)
        prompts, many = self._batch(prompt)
        ps = [p] * len(prompts)
        results = _finish(self._run(prompts, ps, self._limits(prompts, ps), self._config_stop_ids()))
        return results if many else results[0]

    def stream(self, prompt: Prompt, params: Union[SamplingParams, Mapping, None] = None,
               **overrides) -> TextStream:
        """Like generate() for one prompt, yielding text deltas as they become final (never a
        broken UTF-8 character, never a piece of a stop string); once exhausted, the stream's
        ``result`` is the GenerationResult. The request is checked when stream() is called;
        close the iterator (or drop it) to stop early."""
        p = self.sampling_params(params, **overrides)
        return TextStream(self._start(self._token_ids(prompt), p, self._config_stop_ids()))

    @torch.inference_mode()
    def logits(self, token_ids: Prompt) -> torch.Tensor:
        """Full-sequence logits [len, vocab] (fp32 copy of the model-dtype logits), one prefill."""
        ids = self._token_ids(token_ids, "token_ids")
        n = len(ids)
        self._check_budget(n * (KVCache.bytes_per_token(self.cfg, self.dtype) + 4 * self.cfg.vocab_size),
                           f"{n} tokens of KV cache and a {n} x {self.cfg.vocab_size} fp32 logits tensor")
        def run():
            cache = KVCache(self.cfg, 1, n, self.dtype, self.device)
            return self.model.forward(torch.tensor([ids]), cache, all_logits=True,
                                      logits_dtype=torch.float32)[0]
        return self.scheduler.exclusive(run)

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

    def chat(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
             max_window_size: Optional[int] = None,
             params: Union[SamplingParams, Mapping, None] = None, **overrides) -> Tuple[str, list]:
        """One chat turn, as the release's model.chat: returns (response, history + [(query, response)]).

        query may also be an OpenAI-style list of {"role", "content"} messages."""
        ids, history, query = self._chat_prompt(query, history, system, max_window_size)
        p = self.sampling_params(params, **overrides)
        (result,) = _finish(self._start(ids, p, self._chat_stop_ids()))
        response = result.text.strip()
        return response, history + [(query, response)]

    def chat_stream(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
                    max_window_size: Optional[int] = None,
                    params: Union[SamplingParams, Mapping, None] = None, **overrides) -> Iterator[str]:
        """Stream one chat turn as text deltas. Like the release, history is not updated.
        The request is checked when chat_stream() is called."""
        ids, history, query = self._chat_prompt(query, history, system, max_window_size)
        p = self.sampling_params(params, **overrides)
        return self._chat_deltas(TextStream(self._start(ids, p, self._chat_stop_ids())))

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
