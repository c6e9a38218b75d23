"""The step planner (qwen_fast/scheduler.py) alone, without a model: what each plan holds, the
token budget, admission by the pages a request needs now, preemption when the pool runs out, and
the page accounting, checked after every step of a random workload."""
from __future__ import annotations

import collections
import random

import pytest
import torch

from qwen_fast.errors import CapacityError
from qwen_fast.kv_cache import PagePool
from qwen_fast.request import Request, RequestStatus
from qwen_fast.sampling import SamplingParams
from qwen_fast.scheduler import Scheduler
from qwen_fast.testing import tiny_config

EOS = 9


def _pool(pages, page_size=4):
    return PagePool(tiny_config(), pages, page_size, torch.float32)


def _req(prompt_len, limit=100, first=1000):
    return Request(list(range(first, first + prompt_len)), SamplingParams(), limit, stop_ids=[EOS])


def _step(sched, token=7, tokens=None):
    """Plan a step and record it as if the forward sampled `token` (or tokens[req])."""
    plan = sched.schedule()
    sampled = {s.req: [((tokens or {}).get(s.req, token), None)] for s in plan.seqs if s.samples}
    sched.update(plan, sampled)
    return plan


def _check_pages(sched):
    held = collections.Counter(p for r in sched.running for p in r.pages)
    for r in sched.running:
        assert len(set(r.pages)) == len(r.pages), "a page held twice by one request"
    for page, holders in held.items():       # shared: cached pages several requests hold
        assert sched.pool._ref[page] == holders, "a reference count is off"
    assert len(held) + sched.pool.num_free == sched.pool.num_pages, "a page lost"
    for r in sched.running:
        assert len(r.pages) >= sched.pool.pages_for(r.num_computed)
    for r in sched.waiting:
        assert not r.pages and r.num_computed == 0


def test_decode_tokens_and_a_prefill_chunk_share_a_plan_within_the_budget():
    sched = Scheduler(_pool(100), max_batch_size=8, prefill_chunk=32, prefill_tokens=256)
    a, b = _req(5), _req(6, first=2000)
    sched.add(a), sched.add(b)
    first = _step(sched)
    assert [(s.req, s.start, s.count) for s in first.seqs] == [(a, 0, 5), (b, 0, 6)]
    assert all(s.samples for s in first.seqs)
    c = _req(100, first=3000)
    sched.add(c)
    plan = _step(sched)
    assert [(s.req, s.count) for s in plan.seqs] == [(a, 1), (b, 1), (c, 32)]
    assert [s.samples for s in plan.seqs] == [True, True, False]
    assert c.num_computed == 32 and not c.output_ids
    while c.num_computed < 100:
        plan = _step(sched)
        assert sum(s.count for s in plan.seqs if s.req is c) <= 32
    assert len(c.output_ids) == 1 and c.status is RequestStatus.RUNNING
    _check_pages(sched)


def test_nothing_decoding_takes_the_larger_prefill_budget_first_come_first_served():
    sched = Scheduler(_pool(200), prefill_chunk=16, prefill_tokens=100)
    a, b = _req(70), _req(70, first=2000)
    sched.add(a), sched.add(b)
    plan = sched.schedule()
    assert [(s.req, s.count) for s in plan.seqs] == [(a, 70), (b, 30)]


def test_admission_is_bounded_by_the_batch_and_by_pages_needed_now():
    sched = Scheduler(_pool(10, page_size=4), max_batch_size=2)
    reqs = [_req(4, limit=10**6, first=1000 * (i + 1)) for i in range(3)]
    for r in reqs:
        sched.add(r)
    _step(sched)
    assert sched.running == reqs[:2] and list(sched.waiting) == reqs[2:]   # the batch is full
    # A huge limit reserves nothing: each holds the one page its 4 prompt tokens need, and a
    # second page only when position 4 is written.
    assert [len(r.pages) for r in reqs[:2]] == [1, 1]
    _step(sched)
    assert [len(r.pages) for r in reqs[:2]] == [2, 2]


def test_the_head_of_the_queue_waits_for_its_pages_plus_a_reserve():
    sched = Scheduler(_pool(6, page_size=4))
    a = _req(12)                         # 3 pages
    sched.add(a)
    _step(sched)
    big, small = _req(10, first=2000), _req(1, first=3000)   # 3 pages; 1 page
    sched.add(big), sched.add(small)
    plan = _step(sched)
    # 3 free, big needs 3 + 1 reserve for `a`: it waits, and `small` behind it does not jump it
    assert [s.req for s in plan.seqs] == [a] and list(sched.waiting) == [big, small]
    a.cancelled = True
    plan = _step(sched)                  # `a` leaves; big and small are admitted
    assert a.finish_reason == "abort" and [s.req for s in plan.seqs] == [big, small]
    _check_pages(sched)


def test_a_full_pool_preempts_the_most_recently_admitted_and_recomputes_it_later():
    sched = Scheduler(_pool(4, page_size=4), prefill_chunk=64, prefill_tokens=64)
    a, b = _req(2), _req(7, first=2000)  # 1 page and 2 pages (+ 1 reserve page): both admitted
    sched.add(a), sched.add(b)
    _step(sched)
    _step(sched)                          # a writes position 2, b position 7
    _step(sched)                          # a position 3, b position 8: b takes the last page
    assert sched.pool.num_free == 0 and len(b.output_ids) == 3
    plan = _step(sched)                   # a writes position 4: a second page; b is preempted
    assert plan.preempted == [b] and b.status is RequestStatus.PREEMPTED
    assert b.num_computed == 0 and not b.pages and list(sched.waiting) == [b]
    assert b.num_preemptions == 1 and len(b.output_ids) == 3
    assert [s.req for s in plan.seqs] == [a] and len(a.pages) == 2
    _check_pages(sched)
    a.cancelled = True
    plan = _step(sched)                   # room again: b recomputes its prompt and outputs
    assert [(s.req, s.start, s.count) for s in plan.seqs] == [(b, 0, 10)]
    assert plan.seqs[0].samples and len(b.output_ids) == 4
    _check_pages(sched)


def test_the_requester_itself_is_preempted_when_it_is_the_newest():
    sched = Scheduler(_pool(5, page_size=4), prefill_chunk=64, prefill_tokens=64)
    a, b = _req(7), _req(6, first=2000)
    sched.add(a), sched.add(b)
    for _ in range(3):
        _step(sched)                      # a takes the last page at position 8
    plan = _step(sched)                   # b needs a page at position 8: none, and b is newest
    assert plan.preempted == [b] and [s.req for s in plan.seqs] == [a]
    _check_pages(sched)


def test_a_request_alone_that_cannot_grow_ends_with_length():
    sched = Scheduler(_pool(2, page_size=4))
    r = _req(6)
    sched.add(r)
    for _ in range(4):
        _step(sched)                      # prefill, positions 6, 7; position 8 needs a third page
    assert r.finish_reason == "length" and r.status is RequestStatus.FINISHED
    assert len(r.output_ids) == 3
    assert sched.pool.num_free == 2 and not sched.has_work()


def test_only_a_prompt_that_cannot_fit_the_pool_is_refused():
    sched = Scheduler(_pool(3, page_size=4))
    sched.add(_req(12, limit=10**6))      # 12 positions fit 3 pages; its limit is no matter
    with pytest.raises(CapacityError, match="the prompt has 13 tokens"):
        sched.add(_req(13))


def test_cancelling_a_waiting_request_removes_it_at_once():
    sched = Scheduler(_pool(10), max_batch_size=1)
    a, b = _req(3), _req(3, first=2000)
    sched.add(a), sched.add(b)
    _step(sched)
    assert sched.abort(b) and b.finished and b.finish_reason == "abort"
    assert list(sched.waiting) == []
    assert not sched.abort(a) and a.cancelled and not a.finished   # running: at the next plan
    plan = _step(sched)
    assert plan.finished == [a] and not plan.seqs and sched.pool.num_free == 10


def test_a_stop_id_or_the_limit_finishes_and_frees_and_a_failed_row_fails_alone():
    sched = Scheduler(_pool(10))
    a, b, c = _req(3), _req(3, limit=2, first=2000), _req(3, first=3000)
    for r in (a, b, c):
        sched.add(r)
    plan = sched.schedule()
    sched.update(plan, {a: [(EOS, None)], b: [(5, None)]}, errors={c: RuntimeError("row 3 is NaN")})
    assert a.finish_reason == "stop" and a.stop_reason == EOS and a.output_ids == []
    assert isinstance(c.error, RuntimeError) and c.finished
    assert sched.running == [b] and b.output_ids == [5]
    _step(sched)
    assert b.finish_reason == "length" and b.output_ids == [5, 7]
    assert sched.pool.num_free == 10


def _check_cache(pool):
    """The prefix cache's index agrees with the pages' states: an evictable page is cached or a
    tail (one of the two), unheld and not free; a tail is never held between plans."""
    assert not set(pool._free) & set(pool._evictable)
    for page in pool._evictable:
        assert pool._ref[page] == 0 and (page in pool._key_of) != (page in pool._tail_of)
    for page, parent in pool._tail_of.items():
        assert page in pool._evictable and page in pool._tails[parent]
        assert 0 < len(pool._tails[parent][page]) < pool.page_size


@pytest.mark.parametrize("caching", [False, True], ids=["no_cache", "prefix_cache"])
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_keeps_every_page_accounted_for(seed, caching):
    """Random arrivals, lengths, stops and cancellations on a small pool: after every step no page
    is lost or held twice, every request ends, and preemptions happened. With the prefix cache,
    prompts share prefixes of three bases or continue the latest answer (a chat): pages and tails
    are reused, evicted, and stay consistent with the index and the reference counts."""
    rng = random.Random(seed)
    pages = 16 if caching else 12
    sched = Scheduler(_pool(pages, page_size=4), max_batch_size=4, prefill_chunk=5,
                      prefill_tokens=9, prefix_caching=caching)
    bases = [list(range(100 * b, 100 * b + 20)) for b in range(3)]
    reqs = []
    for step in range(600):
        if len(reqs) < 40 and rng.random() < 0.3:
            done = [r for r in reqs if r.finish_reason in ("stop", "length") and r.num_tokens < 30]
            if caching and done and rng.random() < 0.7:      # a chat's next turn
                prev = max(done, key=lambda r: r.t_done)       # the latest answer
                prompt = prev.token_ids(0, prev.num_tokens) + [9000 + len(reqs)] * rng.randint(1, 3)
                r = Request(prompt, SamplingParams(), rng.randint(1, 6), stop_ids=[EOS])
            elif caching:
                prompt = rng.choice(bases)[:rng.randint(1, 20)] + [9000 + len(reqs)] * rng.randint(0, 3)
                r = Request(prompt, SamplingParams(), rng.randint(1, 30), stop_ids=[EOS])
            else:
                r = _req(rng.randint(1, 20), limit=rng.randint(1, 30), first=1000 * len(reqs))
            sched.add(r)
            reqs.append(r)
        if reqs and rng.random() < 0.03:
            sched.abort(rng.choice(reqs))
        plan = sched.schedule()
        assert plan.num_tokens <= 4 + 9
        sched.update(plan, {s.req: [(EOS if rng.random() < 0.02 else 7, None)] for s in plan.seqs if s.samples})
        _check_pages(sched)
        _check_cache(sched.pool)
    while sched.has_work():
        _step(sched)
        _check_pages(sched)
        _check_cache(sched.pool)
    assert all(r.finished for r in reqs) and sched.pool.num_free == pages
    assert sched.stats["preemptions"] > 0
    if caching:
        assert sched.stats["cached_tokens"] > 0 and sched.pool.evictions > 0


def test_a_request_only_flagged_cancelled_is_retired_at_the_next_plan_even_while_waiting():
    """A dropped stream's finalizer only sets the flag (it may run on any thread, mid-plan)."""
    sched = Scheduler(_pool(10), max_batch_size=1)
    a, b = _req(3), _req(3, first=2000)
    sched.add(a), sched.add(b)
    _step(sched)
    b.cancelled = True
    plan = sched.schedule()
    assert b in plan.finished and b.finish_reason == "abort" and not sched.waiting


def test_a_finished_requests_last_partial_page_is_a_tail_that_the_next_turn_copies():
    """A request's last page, partly computed, is kept as a tail; a prompt that continues it
    copies its positions into a page of its own (the tail is never written), and computes from
    there. The same tail twice is kept once; an aborted or failed request leaves none."""
    sched = Scheduler(_pool(12), max_batch_size=2, prefix_caching=True)
    pool = sched.pool
    a = Request(list(range(10)), SamplingParams(), 2, stop_ids=[EOS])
    sched.add(a)
    while sched.has_work():
        _step(sched)
    assert a.num_computed == 11 and pool.num_tails == 1 and pool.num_cached == 2   # 8 + 3
    (tail,) = pool._tail_of
    for layer in range(len(pool.k)):
        pool.k[layer][tail] = torch.arange(pool.k[layer][tail].numel()).view_as(pool.k[layer][tail]) + layer
        pool.v[layer][tail] = -pool.k[layer][tail]
    before = [t[tail].clone() for t in pool.k + pool.v]
    b = Request(a.token_ids(0, a.num_tokens) + [5, 6], SamplingParams(), 1, stop_ids=[EOS])
    sched.add(b)
    plan = sched.schedule()
    assert b.cached_tokens == 11 and [(s.start, s.count) for s in plan.seqs] == [(11, 3)]
    own = b.pages[2]
    assert own != tail and sched.stats["tail_hits"] == 1
    for t, was in zip(pool.k + pool.v, before):
        assert torch.equal(t[own][:, :3], was[:, :3]) and torch.equal(t[tail], was)
    sched.update(plan, {b: [(7, None)]})
    assert b.finished and pool.num_tails == 2                # b's own: ids 12, 13 of page 3
    c = Request(list(range(10)), SamplingParams(), 2, stop_ids=[EOS])
    sched.add(c)
    while sched.has_work():
        _step(sched)
    assert c.cached_tokens == 9 and pool.num_tails == 2     # a's tail again: kept once
    for how in ("abort", "error"):
        d = Request(list(range(50, 57)), SamplingParams(), 3, stop_ids=[EOS])
        sched.add(d)
        plan = sched.schedule()
        if how == "abort":
            sched.update(plan, {d: [(7, None)]})
            sched.abort(d)
            sched.schedule()
        else:
            sched.update(plan, {}, errors={d: RuntimeError("nan")})
        assert d.finished and pool.num_tails == 2, how
    pool.take(pool.num_free)                                 # pressure: the tail is evicted too
    assert pool.num_tails == 0 and not pool._tails
