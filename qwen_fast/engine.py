"""The user-facing Engine: load, generate (batched), stream, chat, score logits.

    from qwen_fast import Engine
    eng = Engine.from_pretrained("Qwen-1_8B-Chat", device="cpu", dtype="bfloat16")
    response, history = eng.chat("你好")
    for delta in eng.stream("Once upon a time", max_new_tokens=32): print(delta, end="")

The decoding loop is plain Python over the model's batched forward. Every request in a batch has
its own sampling parameters, seed, stop conditions and KV-cache length.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import chat as chatml
from .config import GenerationConfig, QwenConfig, builtin_config, parse_dtype
from .loader import dummy_state_dict, load_config, load_state_dict
from .model import BACKENDS, KVCache, QwenModel
from .sampling import SamplingParams, make_generator, sample_next
from .tokenizer import IncrementalDecoder, QwenTokenizer

Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str                  # "stop" (a stop token or string) or "length"
    prompt_tokens: int
    stop_reason: Union[int, str, None] = None   # the stop token id or stop string that ended it
    prefill_s: float = 0.0              # time to first token (prefill + first sample)
    decode_s: float = 0.0               # time for the remaining tokens

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


class _Request:
    """Decoding state of one sequence of a batch."""

    def __init__(self, engine: "Engine", prompt_ids: List[int], params: SamplingParams,
                 extra_stop_ids: Sequence[int]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | set(extra_stop_ids)
        if not params.ignore_eos:
            self.stop_ids.add(engine.generation_config.eos_token_id)
        self.history = torch.tensor(prompt_ids, dtype=torch.long, device=engine.device)
        self.generator = make_generator(params.seed, engine.device)
        self.decoder = IncrementalDecoder(engine.tokenizer)
        self.out_ids: List[int] = []
        self.text = ""          # decoded text, stop string removed once found
        self.emitted = 0        # characters of text already yielded
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.t_first = 0.0

    def add_token(self, tok: int, limit: int) -> str:
        """Record a sampled token; returns the text delta that is now safe to emit."""
        p = self.params
        if tok in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", tok
            self.text += self.decoder.flush()
            return self._emit(final=True)
        self.out_ids.append(tok)
        self.history = torch.cat([self.history, self.history.new_tensor([tok])])
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
        if len(self.out_ids) >= limit:
            self.finish_reason = "length"
            self.text += self.decoder.flush()
            return self._emit(final=True)
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final or not self.params.stop else len(self.text) - _holdback(self.text, self.params.stop)
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


class Engine:
    def __init__(self, model: QwenModel, tokenizer: QwenTokenizer,
                 generation_config: Optional[GenerationConfig] = None):
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

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike, None] = None, *, device: str = "cpu",
                        dtype: Union[str, torch.dtype] = "auto", backend: str = "auto",
                        load_format: str = "safetensors", config: Union[str, QwenConfig, None] = None,
                        progress: Optional[bool] = None, seed: int = 0,
                        kv_cache_budget: Union[int, str, None] = "auto") -> "Engine":
        """Load a checkpoint directory in the release layout, or build random weights.

        load_format: "safetensors" (default) or "dummy" (random weights from ``config``: a
        QwenConfig, a built-in name such as "qwen-1.8b-chat", or the path's config.json).
        dtype: "auto" (the release's: bf16 unless config.json says fp16/fp32), or a float dtype.
        backend: "reference" (PyTorch), "native" or "auto" (our kernels where they exist).
        kv_cache_budget: bytes of KV cache one call may use (see Engine).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU")
        model_dir = Path(path) if path is not None else None
        if load_format == "dummy":
            if isinstance(config, QwenConfig):
                cfg = config
            elif isinstance(config, str):
                cfg = builtin_config(config)
            elif model_dir is not None:
                cfg = load_config(model_dir)
            else:
                cfg = builtin_config("qwen-1.8b-chat")
        elif load_format == "safetensors":
            if model_dir is None:
                raise ValueError("from_pretrained needs a checkpoint directory (or load_format='dummy')")
            cfg = load_config(model_dir)
        else:
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
        dt = cfg.default_dtype() if dtype == "auto" else parse_dtype(dtype)
        if load_format == "dummy":
            weights = dummy_state_dict(cfg, dt, dev, seed=seed)
        else:
            weights = load_state_dict(model_dir, cfg, dt, dev, progress=progress)
        gen_cfg = GenerationConfig()
        tok_dir = None
        if model_dir is not None and model_dir.is_dir():
            gpath = model_dir / "generation_config.json"
            if gpath.exists():
                gen_cfg = GenerationConfig.from_json(gpath)
            tok_dir = model_dir
        tokenizer = QwenTokenizer.from_dir(tok_dir) if tok_dir is not None else QwenTokenizer.default()
        model = QwenModel(cfg, weights, dt, dev, backend=backend)
        return cls(model, tokenizer, gen_cfg, kv_cache_budget=kv_cache_budget)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- helpers -------------------------------------------------------------------------
    def _params(self, params: Optional[SamplingParams], overrides: dict) -> SamplingParams:
        base = params if params is not None else self.default_params
        p = base.replace(**overrides)
        p.validate(vocab_size=self.cfg.vocab_size)
        return p

    def _prompt_ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.cfg.vocab_size}); got {bad[:5]}")
        if len(ids) >= self.cfg.max_context:
            raise ValueError(f"prompt has {len(ids)} tokens; this model handles at most "
                             f"{self.cfg.max_context} tokens in all (prompt + output)")
        return ids

    # ---- the decoding loop ---------------------------------------------------------------
    def _run(self, prompts: List[List[int]], params: List[SamplingParams],
             extra_stop_ids: Sequence[int] = ()) -> Iterator[Tuple[int, str]]:
        """Generate for a batch; yields (row, text delta) and leaves results in self._last."""
        reqs = [_Request(self, ids, p, extra_stop_ids) for ids, p in zip(prompts, params)]
        limits = [min(p.max_new_tokens, self.cfg.max_context - len(ids)) for ids, p in zip(prompts, params)]
        cap = max(len(ids) + n for ids, n in zip(prompts, limits))
        cache = KVCache(self.cfg, len(reqs), cap, self.dtype, self.device)
        T = max(len(ids) for ids in prompts)
        batch = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, ids in enumerate(prompts):
            batch[b, :len(ids)] = torch.tensor(ids)
        t0 = time.perf_counter()
        logits = self.model.forward(batch, cache, num_new=[len(ids) for ids in prompts])
        rows = list(range(len(reqs)))
        valid_vocab = len(self.tokenizer)
        first = True
        while rows:
            nxt = []
            for i, b in enumerate(rows):
                r = reqs[b]
                tok = sample_next(logits[i], r.history, r.params, r.generator, valid_vocab)
                delta = r.add_token(tok, limits[b])
                if first:
                    r.t_first = time.perf_counter() - t0
                if delta:
                    yield b, delta
                if r.finish_reason is None:
                    nxt.append((b, tok))
            first = False
            if not nxt:
                break
            rows = [b for b, _ in nxt]
            ids = torch.tensor([[tok] for _, tok in nxt], dtype=torch.long)
            logits = self.model.forward(ids, cache, rows=rows)
        total = time.perf_counter() - t0
        self._last = [GenerationResult(
            text=r.text, token_ids=r.out_ids, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            prompt_tokens=len(r.prompt_ids), prefill_s=r.t_first, decode_s=total - r.t_first)
            for r in reqs]

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompt: Union[Prompt, List[Prompt]], params: Optional[SamplingParams] = None,
                 **overrides) -> Union[GenerationResult, List[GenerationResult]]:
        """Complete a prompt (text or token ids), or a list of them as one batch.

        Parameters (defaults from generation_config.json): max_new_tokens, temperature (0 =
        greedy), top_p, top_k, repetition_penalty, seed, stop (strings), stop_token_ids,
        ignore_eos. Generation stops at <|endoftext|> unless ignore_eos.
        """
        p = self._params(params, overrides)
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
            prompt = prompt.tolist()
        many = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts = [self._prompt_ids(x) for x in (prompt if many else [prompt])]
        for _ in self._run(prompts, [p] * len(prompts), self._config_stop_ids()):
            pass
        return self._last if many else self._last[0]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None, **overrides) -> Iterator[str]:
        """Like generate() for one prompt, yielding text deltas as they become final (never a
        broken UTF-8 character, never a piece of a stop string)."""
        p = self._params(params, overrides)
        ids = self._prompt_ids(prompt)
        for _, delta in self._run([ids], [p], self._config_stop_ids()):
            yield delta

    @torch.inference_mode()
    def logits(self, token_ids: Prompt) -> torch.Tensor:
        """Full-sequence logits [len, vocab] (fp32 copy of the model-dtype logits), one prefill."""
        ids = self._prompt_ids(token_ids)
        cache = KVCache(self.cfg, 1, len(ids), self.dtype, self.device)
        out = self.model.forward(torch.tensor([ids]), cache, all_logits=True)
        return out[0].float()

    def _chat_prompt(self, query, history, system, max_window_size) -> Tuple[List[int], list, str]:
        if isinstance(query, list):
            if history is not None:
                raise ValueError("pass either a list of messages or query + history, not both")
            query, history, system = chatml.messages_to_chat(query)
        if not isinstance(query, str):
            raise TypeError(f"query must be a str or a list of messages, got {type(query).__name__}")
        history = [] if history is None else history
        if self.generation_config.chat_format != "chatml":
            raise ValueError(f"chat needs chat_format 'chatml'; this checkpoint's generation_config "
                             f"says {self.generation_config.chat_format!r} (a base model?): use generate()")
        mws = self.generation_config.max_window_size if max_window_size is None else max_window_size
        _, ids = chatml.make_context(self.tokenizer, query, history, system=system, max_window_size=mws)
        return ids, history, query

    def chat(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
             max_window_size: Optional[int] = None, params: Optional[SamplingParams] = None,
             **overrides) -> Tuple[str, list]:
        """One chat turn, as the release's model.chat: returns (response, history + [(query, response)]).

        query may also be an OpenAI-style list of {"role", "content"} messages."""
        ids, history, query = self._chat_prompt(query, history, system, max_window_size)
        p = self._params(params, overrides)
        for _ in self._run([self._prompt_ids(ids)], [p], extra_stop_ids=self._chat_stop_ids()):
            pass
        response = self._last[0].text.strip()
        return response, [tuple(t) for t in history] + [(query, response)]

    def chat_stream(self, query, history=None, system: str = chatml.DEFAULT_SYSTEM,
                    max_window_size: Optional[int] = None, params: Optional[SamplingParams] = None,
                    **overrides) -> Iterator[str]:
        """Stream one chat turn as text deltas. Like the release, history is not updated."""
        ids, history, query = self._chat_prompt(query, history, system, max_window_size)
        p = self._params(params, overrides)
        started = False
        for _, delta in self._run([self._prompt_ids(ids)], [p], extra_stop_ids=self._chat_stop_ids()):
            if not started:   # chat() strips the response; strip its start here the same way
                delta = delta.lstrip()
                started = bool(delta)
            if delta:
                yield delta

    def _chat_stop_ids(self) -> List[int]:
        return [t for seq in chatml.STOP_WORDS_IDS for t in seq] + self._config_stop_ids()

    def _config_stop_ids(self) -> List[int]:
        """Single-token stop_words_ids of generation_config.json (the base release lists
        [[151643]]); the release code also stops on these."""
        out = []
        for seq in self.generation_config.stop_words_ids or []:
            if not isinstance(seq, list) or len(seq) != 1 or not isinstance(seq[0], int):
                raise ValueError(f"generation_config stop_words_ids: only single-token stop words "
                                 f"are supported, got {seq!r}")
            out.append(seq[0])
        return out
