"""Prompt-lookup (n-gram) speculation: drafts from a sequence's own tokens, the acceptance rule
that keeps the output identical to plain decoding, and the per-sequence switch that turns
speculation off where it does not pay.

Drafting (NgramIndex): the last n tokens of the sequence (prompt and output), for n from
``ngram_max`` down to ``ngram_min``, are looked up among the sequence's earlier n-grams; at the
first n that occurred before, the draft is the up to ``num_speculative_tokens`` tokens that
followed its most recent earlier occurrence. Most recent rather than first (HF's
prompt_lookup_num_tokens takes the first): in the work prompt lookup is for (code edits,
summaries, answers quoting a document) the text being continued is the latest copy. The index
keeps, per n, the latest end of every n-gram, updated as tokens are appended: a draft costs
O(ngram_max) dict work whatever the length.

Acceptance (accept): a verify forward gives the target distribution at the position of every
draft token and one past them. Position i is sampled exactly as plain decoding samples its
token there (same logits processing, same generator draws, history = the tokens before it); the
draft token is accepted when it equals that sample, and the first sample that differs (or the
one after the last draft token) is taken as well and ends the step. Since plain decoding would
have drawn the same values in the same order, the output and the generator's state are the
same as without speculation, for greedy and for seeded sampling alike.

Switch (SpeculationSwitch): a verify of k drafted tokens costs more than a 1-token step; it pays
when the tokens it yields per step outweigh that. Each sequence tracks its recent acceptance and
stops drafting while it is below ``min_accept`` accepted tokens per draft, probing again after
``backoff`` plain steps (doubling, up to ``max_backoff``, while it keeps failing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import RequestError


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method`` "ngram" (prompt lookup); ``num_speculative_tokens`` drafted a step (at most);
    n-gram sizes ``ngram_min`` .. ``ngram_max`` tried longest first."""
    method: str = "ngram"
    num_speculative_tokens: int = 8
    ngram_min: int = 1
    ngram_max: int = 4

    def __post_init__(self):
        if self.method != "ngram":
            raise RequestError.of("speculative", f"speculative must be 'ngram' (prompt lookup) or "
                                                 f"None, got {self.method!r}")
        k = self.num_speculative_tokens
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64):
            raise RequestError.of("num_speculative_tokens",
                                  f"num_speculative_tokens must be an integer in [1, 64], got {k!r}")
        lo, hi = self.ngram_min, self.ngram_max
        for name, v in (("ngram_min", lo), ("ngram_max", hi)):
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16):
                raise RequestError.of(name, f"{name} must be an integer in [1, 16], got {v!r}")
        if lo > hi:
            raise RequestError.of("ngram_min", f"ngram_min ({lo}) must not exceed ngram_max ({hi})")


class NgramIndex:
    """The latest end of every n-gram (n in [n_min, n_max]) of one sequence's tokens, for
    drafting. ``extend`` appends tokens (accepted ones only: drafts never enter)."""

    def __init__(self, n_min: int = 1, n_max: int = 4, tokens: Sequence[int] = ()):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: List[int] = []
        self._ends: Dict[int, Dict[Tuple[int, ...], int]] = {n: {} for n in range(n_min, n_max + 1)}
        self._indexed = 0         # every n-gram ending at or before this position is indexed
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def _index(self, upto: int) -> None:
        toks = self.tokens
        for end in range(self._indexed + 1, upto + 1):
            for n, ends in self._ends.items():
                if end >= n:
                    ends[tuple(toks[end - n:end])] = end
        self._indexed = max(self._indexed, upto)

    def propose(self, k: int) -> List[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix
        n-gram that occurred before; [] when none did."""
        L = len(self.tokens)
        if L < 2 or k < 1:
            return []
        self._index(L - 1)        # every n-gram but the suffixes ending at L
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            end = self._ends[n].get(tuple(self.tokens[L - n:L]))
            if end is not None:
                return self.tokens[end:end + k]
        return []


def accept(draft: Sequence[int], sample: Callable[[int, List[int]], int],
           done: Optional[Callable[[List[int]], bool]] = None) -> List[int]:
    """The tokens one verify step yields: sample(i, accepted) gives the token plain decoding
    would produce at draft position i after the tokens ``accepted`` (it must draw from the
    sequence's generator exactly as a 1-token step does); draft[i] is kept while it equals that
    sample, and the first differing sample, or the one after the last draft token, ends the
    step. done(tokens), when given, ends it early (a stop token, max_new_tokens, a stop string),
    as plain decoding stops after that token. Returns 1 .. len(draft) + 1 tokens."""
    out: List[int] = []
    for i in range(len(draft) + 1):
        t = int(sample(i, out))
        out.append(t)
        if (done is not None and done(out)) or i == len(draft) or t != int(draft[i]):
            break
    return out


class SpeculationSwitch:
    """Per sequence: whether to draft this step. Accepted tokens per draft are averaged over the
    drafts since the last switch (exponentially, weight ``decay`` on the past); once ``warmup``
    drafts are in, an average below ``min_accept`` stops drafting for ``backoff`` steps, doubling
    up to ``max_backoff`` each time the next round fails and reset when one succeeds."""

    def __init__(self, min_accept: float = 1.0, decay: float = 0.7, warmup: int = 3,
                 backoff: int = 16, max_backoff: int = 256):
        self.min_accept, self.decay, self.warmup = min_accept, decay, warmup
        self.base_backoff, self.max_backoff = backoff, max_backoff
        self.rate: Optional[float] = None
        self.count = 0            # drafts since the last switch
        self.off_for = 0
        self.backoff = backoff
        self.drafts = self.accepted = 0

    def should_draft(self) -> bool:
        if self.off_for > 0:
            self.off_for -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        """After a verify: ``drafted`` tokens proposed, ``accepted`` of them kept (the bonus
        token not counted)."""
        if drafted <= 0:
            return
        self.drafts += drafted
        self.accepted += accepted
        self.rate = accepted if self.rate is None else \
            self.decay * self.rate + (1 - self.decay) * accepted
        self.count += 1
        if self.count < self.warmup:
            return
        if self.rate < self.min_accept:
            self.off_for = self.backoff
            self.backoff = min(2 * self.backoff, self.max_backoff)
            self.rate, self.count = None, 0   # the next round starts afresh
        else:
            self.backoff = self.base_backoff


class SequenceSpeculation:
    """One request's speculation state: its config, the n-gram index of its tokens (prompt,
    then every token it outputs) and its switch, with the totals reported in its result."""

    def __init__(self, config: SpeculativeConfig, prompt_ids: Sequence[int]):
        self.config = config
        self.index = NgramIndex(config.ngram_min, config.ngram_max, prompt_ids)
        self.switch = SpeculationSwitch()
        self.drafted = 0          # draft tokens verified
        self.accepted = 0         # of them kept
        self.steps = 0            # verify steps (a draft of >= 1 token)

    def draft(self, room: int) -> List[int]:
        """This step's draft: at most min(num_speculative_tokens, room) tokens, [] when the
        switch is off or nothing matches."""
        k = min(self.config.num_speculative_tokens, room)
        if k < 1 or not self.switch.should_draft():
            return []
        return self.index.propose(k)

    def record(self, drafted: int, accepted: int, tokens: Sequence[int]) -> None:
        """After a step: `drafted` tokens verified, `accepted` kept; `tokens` the ones appended
        to the sequence (indexed for the next drafts)."""
        self.index.extend(tokens)
        if drafted:
            self.steps += 1
            self.drafted += drafted
            self.accepted += accepted
            self.switch.record(drafted, accepted)
