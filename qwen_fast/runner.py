"""Executes a StepPlan: one forward over the step's packed tokens (a newcomer's prefill chunk and the
others' decode tokens share one pass over the weights), then one sampled token for each request
whose step reached its last known token.

The step's paged metadata (page table, each token's sequence and position) is built once here and
shared by every layer. A row whose logits are not finite (NumericalError) fails only its own
request; the other rows of the step go on.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .errors import NumericalError
from .kv_cache import PagePool, StepMetadata
from .model import StepBuffers
from .request import Request
from .sampling import sample_next, token_logprobs
from .scheduler import StepPlan
from .speculative import accept


class Runner:
    def __init__(self, model, pool: PagePool, valid_vocab: int, buffer_rows: int = 8):
        self.model = model
        self.pool = pool
        self.valid_vocab = valid_vocab
        self.buffers = StepBuffers(buffer_rows)     # this runner's: engines may share a model

    def execute(self, plan: StepPlan) -> Tuple[Dict[Request, List[tuple]], Dict[Request, BaseException]]:
        """Run the plan; returns, for each request that samples, the (token, logprob) pairs its
        step yields (one, or with a draft those speculative.accept keeps), and the errors of
        rows that failed (their requests only)."""
        ids: List[int] = []
        starts, counts, pages, alphas, rows = [], [], [], [], []
        for s in plan.seqs:
            r = s.req
            ids += s.token_ids()
            starts.append(s.start)
            counts.append(s.count)
            pages.append(r.pages)
            alphas.append(r.alpha)          # set by Scheduler.add from the prompt's length
            if s.samples:                   # the last known token's row, then the draft's
                rows += range(len(ids) - 1 - len(s.draft), len(ids))
        meta = StepMetadata.build(pages, starts, counts, self.model.device)
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long), self.pool, meta, alphas,
                                    logits_rows=rows, buffers=self.buffers)
        sampled: Dict[Request, List[tuple]] = {}
        errors: Dict[Request, BaseException] = {}
        j = 0
        for s in plan.seqs:
            if not s.samples:
                continue
            out = sampled[s.req] = []
            try:
                self._sample(s, logits[j:j + 1 + len(s.draft)], out)
            except (NumericalError, RuntimeError) as e:   # RuntimeError: a grammar's refusal
                errors[s.req] = e
            j += 1 + len(s.draft)
        return sampled, errors

    def _sample(self, s, logits: torch.Tensor, out: List[tuple]) -> None:
        """The tokens of s's step into out, as (token, logprob or None): logits row i samples
        the token after the last known one and draft[:i], exactly as a 1-token step would
        (its history, the generator's next draws, the constraint's state); speculative.accept
        keeps the draft while it agrees and stops at a stop id or the token limit."""
        r = s.req
        p = r.params
        c = r.constraint

        def sample(i: int, toks: List[int]) -> int:
            history = r.history_ahead(toks)     # the sequence, then this step's tokens so far
            output = history[len(r.prompt_ids):] if p.extended else None
            tok = sample_next(logits[i], history, p, r.generator, self.valid_vocab, output,
                              None if c is None else c.allowed())
            if c is not None and tok not in r.stop_ids:
                c.accept(tok)
            lp = None
            if p.logprobs is not None:      # handed to Request.append_token by update()
                lp = token_logprobs(logits[i:i + 1], [tok], p.logprobs, self.valid_vocab)[0]
            out.append((tok, lp))
            return tok

        def done(toks: List[int]) -> bool:
            return toks[-1] in r.stop_ids or len(r.output_ids) + len(toks) >= r.limit
        accept(s.draft, sample, done)
