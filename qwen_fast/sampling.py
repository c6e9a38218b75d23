"""Sampling parameters and the next-token sampler, in the release's order (qwen-spec.md §6):

1. repetition penalty over every id of the sequence, prompt included (score < 0: x penalty,
   else / penalty), each distinct id once;
2. temperature (skipped at 1.0); 3. top-k (skipped at 0); 4. top-p (ascending sort, drop the
   tokens whose cumulative probability is <= 1 - top_p, keep at least one);
5. softmax and one multinomial draw from a per-request generator.

Extensions of the OpenAI API, each skipped at its default so that the release's path above is
untouched, applied in this order:

1a. presence_penalty and frequency_penalty, after the repetition penalty, over the tokens
    generated so far (not the prompt), as OpenAI defines them: score - frequency * count -
    presence * (count > 0);
1b. logit_bias: score + bias for each listed id (a bias of -100 bans a token in practice);
    greedy decoding takes its argmax here;
4b. min_p, after top-p: tokens whose probability is below min_p times the most likely one's are
    dropped (a ratio test, so its place among the masks matters only against top-p).

These extensions compute in fp32 and round the changed scores back to the logits' dtype once.
A json_schema constraint (qwen_fast/constrained.py) masks the logits before step 1.
Log-probabilities (``logprobs``) are those of the model's own distribution: log-softmax of the
raw logits in fp32, before any of the steps above (as vLLM reports by default).

Like transformers 4.3x, the scores stay in the logits' dtype (bf16 for the release) through all
steps. temperature == 0 means greedy: the repetition penalty, then argmax.

One deliberate difference: ids past the tokenizer (the 85 padding rows 151851..151935 of the
vocab) are masked before sampling, because no tokenizer can decode them; the release leaves
them in and would fail on decode in the rare case one is drawn.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import NumericalError, RequestError


#: Seeds are taken modulo nothing: torch's CPU generator (mt19937) uses only the low 32 bits of
#: a seed, so larger seeds would silently repeat smaller ones; they are refused instead.
MAX_SEED = 2**32 - 1
#: Most alternatives a token's log-probabilities list (OpenAI's top_logprobs allows 20).
MAX_LOGPROBS = 20


def _show(v) -> str:
    """A value for an error message: its repr, cut short (a bad value may be huge)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:       # an int too large for a float
        return False


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.1
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=list)
    stop_token_ids: Sequence[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    logprobs: Optional[int] = None      # None: none; k >= 0: the sampled token's + the top k
    json_schema: Union[None, bool, dict, str] = None   # True: any JSON object (constrained.py)
    # Prompt-lookup speculation (qwen_fast/speculative.py): "ngram" drafts up to
    # num_speculative_tokens tokens a step from the sequence's own earlier n-grams (sizes
    # ngram_min .. ngram_max); the output is the same as without it.
    speculative: Optional[str] = None
    num_speculative_tokens: int = 8
    ngram_min: int = 1
    ngram_max: int = 4

    @property
    def extended(self) -> bool:
        """Whether any extension beyond the release's sampling is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_p)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, d: Mapping) -> "SamplingParams":
        """SamplingParams from a dict of parameter names (checked)."""
        if not isinstance(d, Mapping):
            raise RequestError(f"params must be a SamplingParams or a dict of parameters, got "
                               f"{type(d).__name__}")
        return cls().replace(**d)

    def replace(self, **overrides) -> "SamplingParams":
        """A copy with overrides applied and checked; an unknown name raises RequestError."""
        unknown = sorted(set(overrides) - set(self.names()), key=str)
        if unknown:
            raise RequestError.of(str(unknown[0]), f"unknown generation parameter(s) {unknown}; valid ones are "
                               f"{self.names()}")
        p = dataclasses.replace(self, **overrides)
        p.validate()
        return p

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Check every field (RequestError naming it) and normalise in place: numpy scalars
        become int/float, a single stop string or id becomes a list."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise RequestError.of("max_new_tokens", f"max_new_tokens must be an integer >= 1, got {_show(self.max_new_tokens)}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise RequestError.of("temperature", f"temperature must be a finite number >= 0 (0 = greedy), got "
                               f"{_show(self.temperature)}")
        if not _is_num(self.top_p) or not (0 < self.top_p <= 1):
            raise RequestError.of("top_p", f"top_p must be a number in (0, 1], got {_show(self.top_p)}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise RequestError.of("top_k", f"top_k must be an integer >= 0 (0 or -1 = disabled), got {_show(self.top_k)}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise RequestError.of("repetition_penalty", f"repetition_penalty must be a finite number > 0 (1.0 = off), got "
                               f"{_show(self.repetition_penalty)}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise RequestError.of("seed", f"seed must be an integer in [0, 2**32 - 1] or None, got {_show(self.seed)}"
                               " (torch's CPU generator uses 32 bits of a seed: larger ones would "
                               "repeat smaller ones)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError.of("stop", f"stop must be a string or a list of non-empty strings, got {_show(self.stop)}")
        if _is_int(self.stop_token_ids):
            self.stop_token_ids = [self.stop_token_ids]
        elif isinstance(self.stop_token_ids, (np.ndarray, torch.Tensor)) and self.stop_token_ids.ndim == 1:
            self.stop_token_ids = self.stop_token_ids.tolist()     # ids as an array, like prompts
        if (not isinstance(self.stop_token_ids, (list, tuple))
                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)):
            raise RequestError.of("stop_token_ids", f"stop_token_ids must be a list of non-negative token ids, got "
                               f"{_show(self.stop_token_ids)}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if t >= vocab_size]
            if bad:
                raise RequestError.of("stop_token_ids", f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise RequestError.of("ignore_eos", f"ignore_eos must be True or False, got {_show(self.ignore_eos)}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                raise RequestError.of(name, f"{name} must be a number in [-2, 2] (0 = off), got {_show(v)}")
            setattr(self, name, float(v))
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError.of("min_p", f"min_p must be a number in [0, 1] (0 = off), got {_show(self.min_p)}")
        self.min_p = float(self.min_p)
        if self.logit_bias is None:
            self.logit_bias = {}
        if not isinstance(self.logit_bias, Mapping):
            raise RequestError.of("logit_bias", f"logit_bias must be a mapping of token id to bias, got "
                               f"{_show(self.logit_bias)}")
        bias = {}
        for k, v in self.logit_bias.items():
            tid = int(k) if isinstance(k, str) and k.isdigit() and len(k) < 10 else k
            if not _is_int(tid) or tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise RequestError.of("logit_bias", f"logit_bias keys must be token ids"
                                   f"{f' in [0, {vocab_size})' if vocab_size else ''}, got {_show(k)}")
            if not _is_num(v) or not -100.0 <= v <= 100.0:
                raise RequestError.of("logit_bias", f"logit_bias[{tid}] must be a number in [-100, 100], got {_show(v)}")
            bias[int(tid)] = float(v)
        self.logit_bias = bias
        if self.json_schema is False:
            self.json_schema = None
        if self.json_schema is not None and not isinstance(self.json_schema, (bool, dict, str)):
            raise RequestError.of("json_schema", f"json_schema must be a JSON schema (a dict or its "
                                  f"JSON text), True (any JSON object) or None, got "
                                  f"{_show(self.json_schema)}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestError.of("logprobs", f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (how many "
                               f"most likely tokens to report beside the chosen one), got "
                               f"{_show(self.logprobs)}")
        for name in ("num_speculative_tokens", "ngram_min", "ngram_max"):
            if _is_int(getattr(self, name)):
                setattr(self, name, int(getattr(self, name)))
        if self.speculative is not None or self.num_speculative_tokens != 8 or (
                self.ngram_min, self.ngram_max) != (1, 4):
            self.speculation()          # checks the four fields (RequestError naming one)
        self.ignore_eos = bool(self.ignore_eos)
        self.max_new_tokens, self.top_k = int(self.max_new_tokens), int(self.top_k)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.seed = None if self.seed is None else int(self.seed)
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def speculation(self):
        """The SpeculativeConfig these parameters ask for, or None (speculative=None)."""
        from .speculative import SpeculativeConfig
        cfg = SpeculativeConfig(self.speculative or "ngram", self.num_speculative_tokens,
                                self.ngram_min, self.ngram_max)
        return cfg if self.speculative is not None else None


def apply_repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores [V] (any dtype), history [n] int64 ids (prompt + generated). Returns a new tensor."""
    if penalty == 1.0 or history.numel() == 0:
        return scores
    s = torch.gather(scores, 0, history)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return scores.scatter(0, history, s)


def apply_extensions(scores: torch.Tensor, output: Optional[torch.Tensor], p: SamplingParams) -> torch.Tensor:
    """Steps 1a-1b of the module docstring on [V] scores: presence and frequency penalties over
    `output` (the generated ids), then logit_bias. A new tensor when anything changes."""
    work = torch.float64 if scores.dtype == torch.float64 else torch.float32   # stable: float64
    if (p.presence_penalty or p.frequency_penalty) and output is not None and output.numel():
        ids, counts = torch.unique(output, return_counts=True)
        ids, counts = ids[ids < scores.shape[0]], counts[ids < scores.shape[0]]
        pen = p.frequency_penalty * counts.float() + p.presence_penalty
        scores = scores.clone()
        scores[ids] = (scores[ids].to(work) - pen.to(work)).to(scores.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=scores.device)
        keep = ids < scores.shape[0]
        bias = torch.tensor(list(p.logit_bias.values()), dtype=work, device=scores.device)
        ids, bias = ids[keep], bias[keep]
        scores = scores.clone()
        scores[ids] = (scores[ids].to(work) + bias).to(scores.dtype)
    return scores


def process_scores(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
                   valid_vocab: Optional[int] = None, stable: bool = False,
                   output: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The release's logits processors and warpers on one row: [V] -> [V] scores (same dtype),
    -inf where a token cannot be drawn.

    stable=True is the fallback for parameters whose release maths overflows the dtype (a
    temperature of 1e-38 turns bf16 scores into inf, a repetition_penalty of 1e-45 too): the
    same steps in float64, with the temperature applied to (scores - max), which leaves the
    distribution unchanged in exact arithmetic but cannot overflow for any finite parameter.
    """
    scores = logits.double() if stable else logits
    if valid_vocab is not None and valid_vocab < scores.shape[0]:
        scores = scores.clone()
        scores[valid_vocab:] = float("-inf")
    scores = apply_repetition_penalty(scores, history, p.repetition_penalty)
    if stable:      # a penalty below ~1e-270 can still overflow float64: saturate, not NaN
        scores = scores.clamp(max=torch.finfo(torch.float64).max)
    if p.extended:
        scores = apply_extensions(scores, output, p)
    if p.greedy:
        return scores
    if p.temperature != 1.0:
        scores = (scores - scores.max()) / p.temperature if stable else scores / p.temperature
    if p.top_k > 0:
        k = min(p.top_k, scores.shape[0])
        kth = torch.topk(scores, k)[0][-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - p.top_p)
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(scores.float(), dim=-1)
        scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return scores


def _drawable(scores: torch.Tensor) -> bool:
    """No NaN and no +inf: -inf marks the tokens that cannot be drawn, anything else is a
    number the next step can use."""
    return not bool(torch.isnan(scores).any() or torch.isposinf(scores).any())


def _check_finite_logits(logits: torch.Tensor) -> None:
    lo, hi = torch.aminmax(logits.float())      # one pass; NaN and +-Inf propagate
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(logits)).sum())
        raise NumericalError(f"the model produced {bad} non-finite logits (NaN or Inf); the weights "
                             "or the dtype overflow (fp16?) are the cause, not the request")


def _greedy(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
            valid_vocab: Optional[int], allowed: Optional[torch.Tensor] = None) -> int:
    """argmax of the release's greedy scores, without its full-vocabulary passes: the tokens past
    valid_vocab are sliced off instead of set to -inf, the repetition penalty is computed in the
    logits' dtype on the history's entries only (the release's values) and written into an fp32
    copy, whose argmax is the same token (the copy holds the same values exactly; ties go to
    the first index in both). Falls back to the float64 maths when the penalty overflows."""
    valid = logits[:valid_vocab]
    scores = valid.to(torch.float32, copy=True)       # ours to write into
    if scores.device.type == "cpu":
        return _greedy_cpu(valid, scores.numpy(), history, p, logits, valid_vocab, allowed)
    lo, hi = torch.aminmax(scores)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _check_finite_logits(valid)
    if p.repetition_penalty != 1.0 and history.numel():
        h = history[history < valid.shape[0]]
        s = torch.gather(valid, 0, h)
        s = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
        scores.scatter_(0, h, s.float())
        if not bool(torch.isfinite(s).all()):      # the penalty overflowed the dtype
            return _masked_argmax(process_scores(logits, history, p, valid_vocab, stable=True), allowed)
    if allowed is not None:
        scores.masked_fill_(~allowed[:scores.shape[0]].to(scores.device), float("-inf"))
    return int(torch.argmax(scores))


def _masked_argmax(scores: torch.Tensor, allowed: Optional[torch.Tensor]) -> int:
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:scores.shape[0]].to(scores.device), float("-inf"))
    return int(torch.argmax(scores))


def _round_like(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """fp32 values rounded to `dtype` as torch rounds an op's fp32 result (to nearest, ties to
    even), returned as fp32."""
    if dtype == torch.float32:
        return v
    if dtype == torch.float16:
        return v.astype(np.float16).astype(np.float32)
    if dtype == torch.bfloat16:                  # c10::BFloat16's rounding: add 0x7fff + the
        u = v.view(np.uint32)                    # kept part's lowest bit, drop the low half
        return ((u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    raise TypeError(f"logits dtype {dtype} is not bfloat16, float16 or float32")


def _greedy_cpu(valid: torch.Tensor, a: np.ndarray, history: torch.Tensor, p: SamplingParams,
                logits: torch.Tensor, valid_vocab: Optional[int],
                allowed: Optional[torch.Tensor] = None) -> int:
    """_greedy's maths in NumPy on the fp32 copy `a` of the valid logits: the same token, in
    about a tenth of the time torch's small ops take on the step thread, whose caches the
    step's weights have just swept (each torch call costs 50-90 us there, measured).
    The penalty is the release's: fp32 products or quotients of the logits (as the dtype's
    ops compute them), rounded to the dtype."""
    if not (math.isfinite(a.min()) and math.isfinite(a.max())):    # NaN propagates
        _check_finite_logits(valid)
    if p.repetition_penalty != 1.0 and history.numel():
        h = history.numpy()
        h = h[h < a.shape[0]]
        v = a[h]
        with np.errstate(over="ignore", under="ignore"):
            pf = np.float32(p.repetition_penalty)       # inf for > 3.4e38: the fallback below
            s = _round_like(np.where(v < 0, v * pf, v / pf), valid.dtype)
        if not np.isfinite(s).all():             # the penalty overflowed the dtype
            return _masked_argmax(process_scores(logits, history, p, valid_vocab, stable=True), allowed)
        a[h] = s
    if allowed is not None:                      # a constraint's mask (after the finite check)
        a[~allowed.numpy()[:a.shape[0]]] = -np.inf
    return int(np.argmax(a))      # the first maximum, as torch.argmax


def sample_next(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
                generator: Optional[torch.Generator], valid_vocab: Optional[int] = None,
                output: Optional[torch.Tensor] = None, allowed: Optional[torch.Tensor] = None) -> int:
    """Next token id for one sequence. logits [V] in the model dtype; history [n] int64 (prompt
    and output); output: the generated ids alone (for presence and frequency penalties);
    allowed: bool [V], a constraint's mask (constrained.py), applied to the logits before
    everything else.

    The release's maths in the logits dtype first (bit-exact seeded sampling); only when that
    overflows does the float64 fallback of process_scores run. Non-finite logits (a broken
    model, not a parameter) raise NumericalError."""
    if p.greedy and not p.extended:
        return _greedy(logits, history, p, valid_vocab, allowed)
    _check_finite_logits(logits[:valid_vocab])
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    scores = process_scores(logits, history, p, valid_vocab, output=output)
    if p.greedy:
        if not _drawable(scores):
            scores = process_scores(logits, history, p, valid_vocab, stable=True, output=output)
        return int(torch.argmax(scores))
    probs = torch.softmax(scores, dim=-1)
    if not _drawable(scores) or not bool(torch.isfinite(probs).all()):
        probs = torch.softmax(process_scores(logits, history, p, valid_vocab, stable=True,
                                             output=output), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens at its
    position (id, log-probability), most likely first."""
    token_id: int
    logprob: float
    top: list


def token_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int,
                   valid_vocab: Optional[int] = None) -> list:
    """TokenLogprob of ids[i] under row i of logits [n, V] (any dtype; fp32 log-softmax over the
    valid vocabulary), with the k most likely tokens of each row."""
    lp = torch.log_softmax(logits[:, :valid_vocab].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(list(ids), dtype=torch.long, device=lp.device)[:, None])[:, 0]
    if k > 0:
        vals, idx = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
        tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]
    else:
        tops = [[] for _ in ids]
    return [TokenLogprob(int(t), float(c), top) for t, c, top in zip(ids, chosen.tolist(), tops)]


def make_generator(seed: Optional[int], device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator: seeded like the release's torch.manual_seed(seed), or from
    the OS's entropy when seed is None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
