"""The step planner of continuous batching over the paged KV cache (pure bookkeeping: no model, no
threads; its engine calls it under one lock, and it is unit-tested alone).

``schedule()`` returns a StepPlan: which requests compute how many tokens in the next forward.

1. Cancelled requests leave the batch and give their pages back.
2. Running requests, oldest first: one token for each that decodes (plus its draft when it
   speculates: speculative.py; a draft takes only free pages and is verified in the same
   forward); a chunk of its remaining
   prompt for each that prefills (or recomputes after a preemption), from the step's prefill
   budget: ``prefill_chunk`` tokens in all while some request decodes (so a newcomer's prompt
   delays the others' next token by one chunk's time, not by the whole prompt), up to
   ``prefill_tokens`` when none does. Every token's page is taken now. When the pool has no
   page left, the most recently admitted running request is preempted: its pages are freed and
   it goes back to the head of the queue, to be recomputed from its prompt and generated tokens
   when room returns (its caller sees only latency). A request that cannot grow although it is
   alone in the pool ends with finish_reason "length".
3. Waiting requests, first come first served, while the batch has a free row
   (``max_batch_size``) and the pool has pages for the request's tokens plus a reserve of one page
   for each running request (so that admitting it does not preempt someone at the next step).
   A request is admitted for the pages it needs now, not for its worst case
   (prompt + max_new_tokens); it takes more pages as it writes.

``update(plan, sampled, errors)`` then records the step: computed tokens, sampled tokens (a stop
id or the token limit finishes a request and frees its pages; a verified draft keeps the positions
of its accepted prefix, the rest are dropped by length), and requests whose row failed (only
those rows: the others go on).

Only a request whose prompt alone cannot fit the whole pool is refused, when it is added
(CapacityError).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence

from .errors import CapacityError
from .kv_cache import PagePool, format_bytes, page_keys
from .request import Request, RequestStatus


@dataclass
class ScheduledSeq:
    req: Request
    start: int          # tokens already in the cache
    count: int          # tokens this step computes: all_ids[start : start + count - len(draft)],
                        # then the draft
    draft: List[int] = field(default_factory=list)   # speculated tokens verified after the last
                                                     # known one (speculative.py)
    samples: bool = field(init=False)   # the step reaches the last known token: its logits
                                        # give the next
    def __post_init__(self):
        self.samples = self.start + self.count - len(self.draft) == self.req.num_tokens

    def token_ids(self) -> List[int]:
        """The ids this step computes."""
        return self.req.token_ids(self.start, self.start + self.count - len(self.draft)) + self.draft


@dataclass
class StepPlan:
    seqs: List[ScheduledSeq] = field(default_factory=list)
    preempted: List[Request] = field(default_factory=list)
    finished: List[Request] = field(default_factory=list)   # retired while planning

    @property
    def num_tokens(self) -> int:
        return sum(s.count for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, pool: PagePool, max_batch_size: int = 8, prefill_chunk: int = 256,
                 prefill_tokens: int = 4096, prefix_caching: bool = False,
                 alpha_of: Callable[[int], int] = lambda prompt_tokens: 1,
                 cache_format: str = "paged", speculative_max_batch: Optional[int] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 1 <= prefill_chunk <= prefill_tokens:
            raise ValueError(f"need 1 <= prefill_chunk <= prefill_tokens, got {prefill_chunk} "
                             f"and {prefill_tokens}")
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens
        self.prefix_caching = prefix_caching
        self.alpha_of = alpha_of
        self.cache_format = cache_format
        # Drafts only while at most this many sequences decode (None: always): a verify's extra
        # rows cost more in a large batch, where the step is no longer bound by the weights.
        self.speculative_max_batch = speculative_max_batch
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []        # in admission order
        self.stats = {"steps": 0, "preemptions": 0, "max_running": 0, "cached_tokens": 0,
                      "tail_hits": 0, "prefix_hits": 0}

    # ---- requests in and out -----------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, what: str = "the prompt") -> None:
        """CapacityError when `prompt_tokens` positions cannot fit the whole pool."""
        pool = self.pool
        if pool.pages_for(prompt_tokens) > pool.num_pages:
            raise CapacityError(
                f"{what} has {prompt_tokens} tokens, which need "
                f"{format_bytes(pool.pages_for(prompt_tokens) * pool.bytes_per_page)} of KV cache; "
                f"the engine's pool holds {pool.capacity_tokens} tokens "
                f"({format_bytes(pool.num_pages * pool.bytes_per_page)}, kv_cache_budget); "
                "shorten the prompt or raise kv_cache_budget in Engine.from_pretrained")

    def add(self, req: Request) -> None:
        self.check_fits(len(req.prompt_ids))
        if req.alpha is None:
            req.alpha = self.alpha_of(len(req.prompt_ids))
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    # ---- the prefix cache ----------------------------------------------------------------------
    def _keys(self, r: Request, pages: int) -> List[bytes]:
        """r's prefix-cache keys of its first `pages` full pages (computed once, extended as
        its tokens grow). Everything that changes a page's contents is in the chain's salt."""
        if len(r.page_keys) < pages:
            r.page_keys = page_keys(r.token_ids(0, pages * self.pool.page_size),
                                    self.pool.page_size, self._salt(r), r.page_keys)
        return r.page_keys[:pages]

    def _salt(self, r: Request) -> bytes:
        return (f"{self.cache_format}|{self.pool.dtype}|kv={self.pool.kv_dtype}/{self.pool.kv_group}"
                f"|alpha={r.alpha}").encode()

    def _parent(self, r: Request, full: int) -> bytes:
        """The key a tail after r's first `full` pages is kept under."""
        return self._keys(r, full)[full - 1] if full else self._salt(r)

    def _tail_hit(self, r: Request, full: int) -> tuple:
        """(page, n): a tail page whose first n positions continue r's `full` cached pages with
        r's own next ids (n < r's tokens left, so that one is computed), or (None, 0)."""
        if not self.prefix_caching:
            return None, 0
        start = full * self.pool.page_size
        n = min(r.num_tokens - 1 - start, self.pool.page_size - 1)
        if n <= 0:
            return None, 0
        return self.pool.match_tail(self._parent(r, full), r.token_ids(start, start + n))

    def _cache_hit(self, r: Request) -> List[int]:
        """The cached pages r can start from: the longest cached prefix of its full pages,
        leaving at least one token to compute (its logits give the next token)."""
        if not self.prefix_caching:
            return []
        return self.pool.match(self._keys(r, (r.num_tokens - 1) // self.pool.page_size))

    def _publish(self, r: Request) -> None:
        """Index r's pages that are full and computed (never a page partly written)."""
        if not self.prefix_caching:
            return
        full = r.num_computed // self.pool.page_size
        if full > r.num_published:
            for i, key in enumerate(self._keys(r, full)[r.num_published:], r.num_published):
                self.pool.publish(r.pages[i], key)
            r.num_published = full

    def clear_cache(self) -> None:
        self.pool.clear_cache()

    def abort(self, req: Request) -> bool:
        """Cancel a request: a waiting one leaves the queue now (True); a running one is marked
        and leaves the batch at the next schedule() (its pages may be in use by a forward)."""
        if req.finished:
            return False
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
            self._finish(req, "abort")
            return True
        return False

    def waiting_beyond_batch(self, extra: int = 0) -> int:
        """Requests that would wait for a batch row if `extra` more arrived now: the queue less
        the rows the running requests leave free (the next plan admits that many at most)."""
        free_rows = max(0, self.max_batch_size - len(self.running))
        return max(0, len(self.waiting) + extra - free_rows)

    def snapshot(self) -> Dict[str, int]:
        """The queue, the batch and the page pool now, with the running totals (for metrics)."""
        pool = self.pool
        return {"running": len(self.running), "waiting": len(self.waiting),
                "preempted": sum(r.status is RequestStatus.PREEMPTED for r in self.waiting),
                "max_batch_size": self.max_batch_size,
                "kv_pages_total": pool.num_pages, "kv_pages_used": pool.num_used,
                "kv_pages_free": pool.num_free, "kv_pages_cached": pool.num_cached,
                "kv_page_size": pool.page_size, "steps": self.stats["steps"],
                "preemptions": self.stats["preemptions"],
                "prefix_cache_hits": self.stats["prefix_hits"],
                "prefix_cache_hit_tokens": self.stats["cached_tokens"]}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for r in [r for r in self.running if r.cancelled] + [r for r in self.waiting if r.cancelled]:
            if r in self.waiting:
                self.waiting.remove(r)
            self._finish(r, "abort")
            plan.finished.append(r)
        n_decoding = sum(r.num_tokens - r.num_computed == 1 for r in self.running)
        decoding = n_decoding > 0
        may_draft = self.speculative_max_batch is None or n_decoding <= self.speculative_max_batch
        budget = self.prefill_chunk if decoding else self.prefill_tokens
        i = 0
        while i < len(self.running):
            r = self.running[i]
            left = r.num_tokens - r.num_computed
            count = 1 if left == 1 else min(left, budget)
            if count == 0:          # no prefill budget left this step
                i += 1
                continue
            if not self._grow(r, r.num_computed + count, plan):
                continue            # r itself was preempted or finished: running[i] is the next
            if left > 1:
                budget -= count
            draft = self._draft(r) if left == 1 and r.spec is not None and may_draft else []
            plan.seqs.append(ScheduledSeq(r, r.num_computed, count + len(draft), draft))
            i += 1
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            r = self.waiting[0]
            hit = self._cache_hit(r)
            tail, tail_n = self._tail_hit(r, len(hit))
            need = self.pool.pages_for(r.num_tokens) - len(hit)
            # Cached pages it will hold, and the tail it copies from, are not room for it.
            free = (self.pool.num_free - sum(self.pool.is_evictable(p) for p in hit)
                    - (tail is not None))
            if self.running and free < need + len(self.running):
                break               # waits for room; nobody behind it jumps the queue
            if not self.running and free < need:
                break
            self.waiting.popleft()
            self.pool.share(hit)
            r.pages = list(hit)
            r.num_computed = len(hit) * self.pool.page_size + tail_n
            r.num_published = len(hit)
            if r.num_preemptions == 0:
                r.cached_tokens = r.num_computed
                self.stats["cached_tokens"] += r.num_computed
                self.stats["prefix_hits"] += r.num_computed > 0
            r.status = RequestStatus.RUNNING
            if r.t_admitted is None:
                r.t_admitted = time.perf_counter()
            self.running.append(r)
            count = min(r.num_tokens - r.num_computed, budget)
            if tail is not None:
                self.pool.share([tail])           # not evicted by the pages taken for r
                self._grow(r, r.num_computed + count, plan)
                self.pool.copy_positions(tail, r.pages[len(hit)], tail_n)
                self.pool.give_back([tail])
                self.stats["tail_hits"] += 1
            else:
                self._grow(r, r.num_computed + count, plan)
            budget -= count
            plan.seqs.append(ScheduledSeq(r, r.num_computed, count))
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self.running))
        return plan

    def _grow(self, r: Request, tokens: int, plan: StepPlan) -> bool:
        """Give r pages for `tokens` positions, preempting the most recently admitted requests
        (r itself last) while the pool is short. False if r was preempted or finished."""
        need = self.pool.pages_for(tokens) - len(r.pages)
        while need > self.pool.num_free:
            victim = self.running[-1]
            if victim is r:
                if len(self.running) == 1:      # alone and still no room: it cannot grow
                    self._finish(r, "length")
                    plan.finished.append(r)
                else:
                    self._preempt(r, plan)
                return False
            self._preempt(victim, plan)
        if need > 0:
            r.pages += self.pool.take(need)
            r.peak_pages = max(r.peak_pages, len(r.pages))
        return True

    def _draft(self, r: Request) -> List[int]:
        """r's draft for this step (r decodes, its next position's page is taken): at most the
        tokens r may still output less the one this step samples anyway, and only as far as
        the pool's free pages reach (a draft never preempts anyone); their pages are taken."""
        draft = r.spec.draft(r.limit - len(r.output_ids) - 1)
        if draft:
            P = self.pool.page_size
            room = (len(r.pages) + self.pool.num_free) * P - (r.num_computed + 1)
            draft = draft[:max(0, room)]
            self._grow(r, r.num_computed + 1 + len(draft), StepPlan())   # never preempts: fits
        return draft

    def _preempt(self, r: Request, plan: StepPlan) -> None:
        self.running.remove(r)
        self.pool.give_back(r.pages)
        r.pages = []
        r.num_computed = r.num_published = 0
        r.status = RequestStatus.PREEMPTED
        r.num_preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(r)
        plan.preempted.append(r)

    def _finish(self, r: Request, reason: Optional[str] = None) -> None:
        if r in self.running:
            self.running.remove(r)
        if r.finish_reason is None:
            r.finish_reason = reason
        full, part = divmod(r.num_computed, self.pool.page_size)
        if (self.prefix_caching and part and full < len(r.pages) and r.error is None
                and not r.cancelled and r.finish_reason in ("stop", "length")):
            # Its last page, partly computed, is kept as a tail (released first: evicted first).
            start = full * self.pool.page_size
            self.pool.release_tail(r.pages.pop(full), self._parent(r, full),
                                   r.token_ids(start, r.num_computed))
        self.pool.give_back(r.pages)
        r.pages = []
        r.status = RequestStatus.FINISHED
        r.t_done = time.perf_counter()

    # ---- after the forward -------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: Mapping[Request, Sequence],
               errors: Optional[Mapping[Request, BaseException]] = None) -> List[Request]:
        """Record a step's results; returns the requests that finished. sampled[r]: the
        (token, logprob or None) pairs r's step yielded, in order (one, or with a draft up to
        len(draft) + 1; a failed row may have yielded some before its error)."""
        done = []
        for s in plan.seqs:
            r = s.req
            if r.finished:
                continue
            # The step's positions hold the known tokens and the draft; the draft's are valid
            # up to its first token that was not output (the rest is dropped by length, and
            # overwritten when the sequence gets there).
            appended: List[int] = []
            for tok, lp in sampled.get(r, ()):
                r.step_logprob = lp
                r.append_token(tok)
                if tok in r.stop_ids:
                    break                       # a stop id: not part of the output
                appended.append(tok)
                if r.finish_reason is not None:
                    break
            kept = 0
            while kept < min(len(s.draft), len(appended)) and appended[kept] == s.draft[kept]:
                kept += 1
            if r.spec is not None and s.samples:
                r.spec.record(len(s.draft), kept, appended)
            if errors and r in errors:
                r.error = errors[r]
                self._finish(r, "error")
                done.append(r)
                continue
            r.num_computed = s.start + s.count - len(s.draft) + kept
            self._publish(r)
            if r.finish_reason is not None:
                self._finish(r)
                done.append(r)
        return done

    def finish_all(self, error: BaseException) -> List[Request]:
        """Fail every request (a step that failed as a whole, or the engine closing)."""
        out = list(self.running) + list(self.waiting)
        self.waiting.clear()
        for r in out:
            r.error = error
            self._finish(r, "error")
        return out
