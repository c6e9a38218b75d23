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


class Runner:
    def __init__(self, model, pool: PagePool, valid_vocab: int, buffer_rows: int = 8):
        self.model = model
        self.pool = pool
        self.valid_vocab = valid_vocab
        self.buffers = StepBuffers(buffer_rows)     # this runner's: engines may share a model

    def execute(self, plan: StepPlan) -> Tuple[Dict[Request, int], Dict[Request, BaseException]]:
        """Run the plan; returns the sampled token of each request that samples, and the errors
        of rows that failed (their requests only)."""
        ids: List[int] = []
        starts, counts, pages, alphas, last = [], [], [], [], []
        for s in plan.seqs:
            r = s.req
            ids += r.token_ids(s.start, s.start + s.count)
            starts.append(s.start)
            counts.append(s.count)
            pages.append(r.pages)
            alphas.append(r.alpha)          # set by Scheduler.add from the prompt's length
            last.append(len(ids) - 1)
        meta = StepMetadata.build(pages, starts, counts, self.model.device)
        samplers = [i for i, s in enumerate(plan.seqs) if s.samples]
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long), self.pool, meta, alphas,
                                    logits_rows=[last[i] for i in samplers],
                                    buffers=self.buffers)
        sampled: Dict[Request, int] = {}
        errors: Dict[Request, BaseException] = {}
        for j, i in enumerate(samplers):
            r = plan.seqs[i].req
            p = r.params
            try:
                history = r.history
                output = history[len(r.prompt_ids):] if p.extended else None
                c = r.constraint
                tok = sample_next(logits[j], history, p, r.generator, self.valid_vocab, output,
                                  None if c is None else c.allowed())
                if c is not None and tok not in r.stop_ids:
                    c.accept(tok)
                if p.logprobs is not None:      # handed to Request.append_token by update()
                    r.step_logprob = token_logprobs(logits[j:j + 1], [tok], p.logprobs,
                                                    self.valid_vocab)[0]
                sampled[r] = tok
            except (NumericalError, RuntimeError) as e:   # RuntimeError: a grammar's refusal
                errors[r] = e
        return sampled, errors
