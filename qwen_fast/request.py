"""One generation request as the serving core sees it: token ids, sampling state, status and KV
pages. Text is made elsewhere (engine.TextStream, on the caller's thread): the step thread only
appends token ids and checks what needs no text (stop token ids, the token limit).

Status:  WAITING --admitted--> RUNNING --stop id / limit / cancel / error--> FINISHED
                                  |   ^
                      pool full:  v   |  re-admitted (recomputed from its tokens)
                               PREEMPTED (queued first among the waiting)

``num_computed`` counts the tokens whose keys and values are in the cache. A step computes
tokens ``all_ids[num_computed : num_computed + n]``; when that reaches the last known token the
step's logits give the next token. A decode step is n = 1; a prefill (or the recompute of a
preempted request: its prompt and every token it generated) is n > 1, in chunks.
"""
from __future__ import annotations

import enum
import itertools
import threading
import time
from typing import List, Optional, Sequence

import torch

from .sampling import SamplingParams

_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, limit: int,
                 stop_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None,
                 device: torch.device | str = "cpu"):
        self.id = next(_ids)
        self.prompt_ids: List[int] = list(prompt_ids)
        self.params = params
        self.limit = limit                      # new tokens at most
        self.stop_ids = frozenset(stop_ids)
        self.generator = generator
        # Prompt + output ids for the repetition penalty, one buffer sized for the worst case.
        self._ids = torch.empty(len(self.prompt_ids) + limit, dtype=torch.long, device=device)
        self._ids[:len(self.prompt_ids)] = torch.tensor(self.prompt_ids, dtype=torch.long)
        self.output_ids: List[int] = []
        self.logprobs: list = []                # TokenLogprob of each output id (params.logprobs)
        self.step_logprob = None                # the runner's, for the token it just sampled
        self.stop_logprob = None                # the stop token's, when one ended it
        self.constraint = None                  # a JsonConstraint (params.json_schema)
        self.spec = None                        # speculative.SequenceSpeculation (params.speculative)
        self.status = RequestStatus.WAITING
        self.num_computed = 0
        self.pages: List[int] = []
        self.alpha: Optional[int] = None        # dynamic-NTK alpha, from the prompt's length
        self.page_keys: List[bytes] = []        # prefix-cache keys of its full pages (so far)
        self.num_published = 0                  # its first pages published in the prefix cache
        self.cached_tokens = 0                  # prompt tokens found in the prefix cache
        self.finish_reason: Optional[str] = None    # "stop", "length" or "abort"
        self.stop_reason = None                 # the stop token id (a stop string: the caller's)
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.num_preemptions = 0
        self.peak_pages = 0
        self.t_submit = time.perf_counter()
        self.t_admitted: Optional[float] = None  # first admitted to the batch
        self.t_first: Optional[float] = None
        self.t_done: Optional[float] = None
        self.t_tokens: List[float] = []         # when each sampled token (a stop id too) arrived
        self.lock = threading.Lock()            # guards output_ids against the reading caller

    # ---- token ids ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> List[int]:
        """all_ids[start:stop] (prompt then output)."""
        P = len(self.prompt_ids)
        head = self.prompt_ids[start:min(stop, P)] if start < P else []
        return head + self.output_ids[max(start, P) - P:max(stop, P) - P]

    @property
    def history(self) -> torch.Tensor:
        """Prompt + output ids (int64, on the model's device) for the repetition penalty."""
        return self._ids[:self.num_tokens]

    def history_ahead(self, tokens: Sequence[int]) -> torch.Tensor:
        """history followed by `tokens` not yet appended (a verify step's outputs so far), in
        the same buffer: append_token writes the same ids there if they are kept."""
        n = self.num_tokens
        if tokens:
            self._ids[n:n + len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        return self._ids[:n + len(tokens)]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, tok: int) -> None:
        """Record a sampled token (the step thread); finishes the request on a stop id or at its
        limit. A stop id is not part of the output."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_tokens.append(now)
        lp, self.step_logprob = self.step_logprob, None
        if tok in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", tok
            self.stop_logprob = lp
            return
        with self.lock:
            self._ids[self.num_tokens] = tok
            if lp is not None:
                self.logprobs.append(lp)
            self.output_ids.append(tok)
        if len(self.output_ids) >= self.limit:
            self.finish_reason = "length"

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, {self.status.value}, prompt={len(self.prompt_ids)}, "
                f"output={len(self.output_ids)}, computed={self.num_computed}, pages={len(self.pages)})")
