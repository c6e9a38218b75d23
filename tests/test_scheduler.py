"""Continuous batching through the engine (qwen_fast/core.py, scheduler.py, runner.py): requests
from concurrent callers run in one forward per step, newcomers join between steps (their prefill
chunk in the same forward as the others' decode tokens), finished and cancelled ones leave, the
batch size and the page pool bound what runs at once, a newcomer's prompt is prefilled in
bounded chunks while others decode, and a pool that runs out preempts and later recomputes.
Greedy and seeded results equal each request run alone. (The planner alone, without a model:
tests/test_step_planner.py.)"""
from __future__ import annotations

import threading

import pytest
import torch

from qwen_fast import Engine
from qwen_fast.errors import CapacityError
from qwen_fast.kv_cache import bytes_per_token

GREEDY = dict(temperature=0, ignore_eos=True)


def _engine(ckpt, **kw):
    return Engine.from_pretrained(ckpt, dtype="float32", backend="auto", **kw)


class Recorder:
    """Wraps the engine's runner: records each step's plan as [(request id, tokens)], one entry
    per forward."""

    def __init__(self, engine):
        runner = engine._core.runner
        self.calls, self._execute, self._lock = [], runner.execute, threading.Lock()
        runner.execute = self

    def __call__(self, plan):
        with self._lock:
            self.calls.append([(s.req.id, s.count) for s in plan.seqs])
        return self._execute(plan)

    def decode_batch_sizes(self):
        return [sum(1 for _, n in c if n == 1) for c in self.calls if any(n == 1 for _, n in c)]


def _run_concurrently(fns, timeout=120):
    out, errors = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return out


def test_concurrent_callers_share_the_decode_batch_and_get_their_lone_results(tiny_ckpt):
    e = _engine(tiny_ckpt)
    prompts = [f"prompt number {i}" for i in range(4)]
    alone = [e.generate(p, max_new_tokens=12, **GREEDY).token_ids for p in prompts]
    rec = Recorder(e)
    got = _run_concurrently([lambda p=p: e.generate(p, max_new_tokens=12, **GREEDY).token_ids
                             for p in prompts])
    assert got == alone
    assert max(rec.decode_batch_sizes()) >= 2          # decoded together, not in turns
    # fewer forwards than 4 lone runs of 12 steps each
    assert len(rec.calls) < 4 * 12


def test_a_newcomer_joins_a_running_batch(tiny_ckpt):
    e = _engine(tiny_ckpt)
    rec = Recorder(e)
    long = e.stream("a long one", max_new_tokens=40, **GREEDY)
    pieces = [next(long) for _ in range(3)]             # decoding alone now
    short = e.generate("a short one", max_new_tokens=5, **GREEDY)
    pieces += list(long)
    assert short.completion_tokens == 5 and "".join(pieces)
    long_id = long.request.id
    # The newcomer's prompt in the same forward as the running request's decode token: one
    # pass over the weights, not a prefill forward and then a decode forward.
    mixed = [c for c in rec.calls if (long_id, 1) in c and any(n > 1 for _, n in c)]
    assert mixed, rec.calls
    joined = [c for c in rec.calls if len(c) == 2 and all(n == 1 for _, n in c)]
    assert joined, "the newcomer never decoded in the same forward as the running request"


def test_max_batch_size_bounds_the_batch(tiny_ckpt):
    e = _engine(tiny_ckpt, max_batch_size=2)
    rec = Recorder(e)
    out = _run_concurrently([lambda i=i: e.generate(f"p{i}", max_new_tokens=6, **GREEDY)
                             for i in range(5)])
    assert all(r.completion_tokens == 6 for r in out)
    assert max(len(c) for c in rec.calls) == 2


def test_a_request_waits_for_pages_and_a_prompt_that_never_fits_is_refused(tiny_ckpt):
    """A pool of 3 pages of 16 positions: a 30-token prompt needs 2 pages, so a second one waits
    (its pages and a reserve page for the running one are not free) until the first ends; a
    prompt of 49 tokens could never fit and is refused when submitted."""
    probe = _engine(tiny_ckpt)
    per_token = bytes_per_token(probe.cfg, probe.model.dtype)
    e = _engine(tiny_ckpt, kv_cache_budget=48 * per_token, kv_page_size=16)
    assert e.kv_pool.num_pages == 3
    rec = Recorder(e)
    prompts = [[1000 + 40 * i + t for t in range(30)] for i in range(2)]
    out = _run_concurrently([lambda p=p: e.generate(p, max_new_tokens=2, **GREEDY) for p in prompts])
    assert all(r.completion_tokens == 2 for r in out)
    assert max(len(c) for c in rec.calls) == 1          # one at a time: the pool held
    assert e.scheduler.stats["preemptions"] == 0
    with pytest.raises(CapacityError, match="the prompt has 49 tokens"):
        e.generate(list(range(1, 50)), max_new_tokens=1)


def test_a_newcomers_prompt_is_prefilled_in_chunks_while_others_decode(tiny_ckpt):
    e = _engine(tiny_ckpt)
    e.scheduler.prefill_chunk = 8
    rec = Recorder(e)
    ids = list(range(1000, 1030))                        # 30 tokens: 4 chunks of <= 8
    alone = e.generate(ids, max_new_tokens=4, **GREEDY).token_ids
    e.clear_prefix_cache()                               # else all but one token are cached
    rec.calls.clear()
    s = e.stream("keeps decoding", max_new_tokens=60, **GREEDY)
    next(s)
    got = e.generate(ids, max_new_tokens=4, **GREEDY).token_ids
    s.close()
    chunks = [[n for _, n in c if n > 1] for c in rec.calls]
    prefills = [sum(c) for c in chunks if c]
    assert prefills and all(n <= 8 for n in prefills)
    assert sum(prefills) >= 30 - 8
    assert got == alone                                  # fp32: chunking changes no token


def test_cancelling_frees_the_slot_for_a_waiting_sequence(tiny_ckpt):
    e = _engine(tiny_ckpt, max_batch_size=1)
    s = e.stream("occupies the only slot", max_new_tokens=500, **GREEDY)
    next(s)
    assert len(e.scheduler.running) == 1
    s.close()                                            # cancelled: the slot is free
    r = e.generate("next", max_new_tokens=3, **GREEDY)
    assert r.completion_tokens == 3
    assert not e.scheduler.has_work() and e.kv_pool.num_used == 0


def test_max_batch_size_is_checked():
    from qwen_fast.errors import ConfigError
    from qwen_fast.testing import tiny_config
    with pytest.raises(ConfigError, match="max_batch_size must be a positive int, got 0"):
        Engine.from_pretrained(load_format="dummy", config=tiny_config(), max_batch_size=0)


def test_seeded_sampling_in_a_batch_equals_alone(tiny_ckpt):
    e = _engine(tiny_ckpt)
    kw = dict(max_new_tokens=10, ignore_eos=True, top_p=0.8, temperature=0.9)
    alone = [e.generate(f"s{i}", seed=i, **kw).token_ids for i in range(3)]
    got = _run_concurrently([lambda i=i: e.generate(f"s{i}", seed=i, **kw).token_ids
                             for i in range(3)])
    assert got == alone
    assert torch.is_tensor(e.logits([1, 2, 3]))           # exclusive use between steps


def test_a_failure_outside_the_forward_reaches_the_callers(tiny_ckpt, monkeypatch):
    """No memory while the step thread builds a step's metadata: the step's callers get the
    error, and the engine works again afterwards."""
    import qwen_fast.runner as R
    e = _engine(tiny_ckpt)

    def no_memory(*a, **k):
        raise MemoryError("no room for the step")
    with monkeypatch.context() as m:
        m.setattr(R.StepMetadata, "build", no_memory)
        with pytest.raises(MemoryError, match="no room"):
            e.generate("x", max_new_tokens=3, **GREEDY)
    assert e.generate("x", max_new_tokens=3, **GREEDY).completion_tokens == 3
    assert e.kv_pool.num_used == 0


def test_close_cancels_what_runs_and_refuses_what_comes(tiny_ckpt):
    e = _engine(tiny_ckpt)
    s = e.stream("long", max_new_tokens=10000, **GREEDY)
    next(s)
    e.close()
    with pytest.raises(RuntimeError, match="engine was closed"):
        "".join(s)
    with pytest.raises(RuntimeError, match="engine was closed"):
        e.generate("after", max_new_tokens=2)
    with pytest.raises(RuntimeError, match="engine was closed"):
        e.stream("after", max_new_tokens=2)                 # refused when called
    assert e._core._thread is None


def test_exiting_with_a_live_stream_is_clean(tiny_ckpt):
    """A step thread killed mid-step at exit aborted the process (exit code 134); the
    scheduler now stops it between steps first."""
    import subprocess
    import sys
    code = ("from qwen_fast import Engine\n"
            f"e = Engine.from_pretrained({str(tiny_ckpt)!r}, dtype='float32')\n"
            "s = e.stream('x', max_new_tokens=100000, ignore_eos=True, temperature=0)\n"
            "next(s)\nprint('leaving')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "leaving" in r.stdout and "terminate called" not in r.stderr


# ---- the page pool: admission by what is written, preemption, recompute -------------------------

def test_eight_requests_of_8192_new_tokens_run_at_once_in_a_pool_of_8_x_512_positions(tiny_ckpt):
    """Admission counts the pages a request needs now, not its worst case: eight requests that may
    each write 8192 tokens all run together in a pool of 4096 positions (the old admission by
    worst case ran them one at a time, or refused them)."""
    probe = _engine(tiny_ckpt)
    e = _engine(tiny_ckpt, kv_cache_budget=8 * 512 * bytes_per_token(probe.cfg, probe.model.dtype))
    assert e.kv_pool.capacity_tokens == 8 * 512
    streams = [e.stream(f"request {i}", max_new_tokens=8192, **GREEDY) for i in range(8)]
    for s in streams:
        for _ in range(20):
            next(s)
    assert len(e.scheduler.running) == 8 and e.scheduler.stats["max_running"] == 8
    assert e.scheduler.stats["preemptions"] == 0
    for s in streams:
        s.close()
    e.generate("x", max_new_tokens=1)                     # a step retires the closed ones
    assert not e.scheduler.has_work() and e.kv_pool.num_used == 0


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_pool_that_runs_out_preempts_and_resumes_with_identical_output(tiny_ckpt, sampling):
    """Three requests that need 5 pages each share a pool of 12: some are preempted (their pages
    freed) and recomputed from their prompt and generated tokens; every output equals the
    request's uninterrupted run."""
    kw = dict(max_new_tokens=60, ignore_eos=True)
    kw.update(temperature=0) if sampling == "greedy" else kw.update(temperature=0.9, top_p=0.9)
    prompts = [[1000 + 50 * i + t for t in range(20)] for i in range(3)]
    big = _engine(tiny_ckpt)
    alone = [big.generate(p, seed=i, **kw).token_ids for i, p in enumerate(prompts)]
    probe_bytes = bytes_per_token(big.cfg, big.model.dtype)
    e = _engine(tiny_ckpt, kv_cache_budget=12 * 16 * probe_bytes, kv_page_size=16)
    got = _run_concurrently([lambda i=i, p=p: e.generate(p, seed=i, **kw)
                             for i, p in enumerate(prompts)])
    assert e.scheduler.stats["preemptions"] > 0
    assert sum(r.num_preemptions for r in got) == e.scheduler.stats["preemptions"]
    assert [r.token_ids for r in got] == alone
    assert e.kv_pool.num_used == 0


# ---- defects found by a hostile probe ----------------------------------------------------------

def test_closing_a_stream_from_another_thread_cancels_it(tiny_ckpt):
    """close() from another thread while a consumer is blocked in next(): the consumer stops
    (no 'generator already executing'), and the request leaves the batch."""
    e = _engine(tiny_ckpt)
    s = e.stream("cancel me from elsewhere", max_new_tokens=100000, **GREEDY)
    got, done = [], threading.Event()

    def consume():
        for d in s:
            got.append(d)
        done.set()
    t = threading.Thread(target=consume)
    t.start()
    e._core.wait_until(lambda: len(s.request.output_ids) >= 5)
    s.close()
    assert done.wait(30), "the consumer never stopped"
    t.join(5)
    assert s.result.finish_reason == "abort" and s.result.completion_tokens < 100000
    e.generate("x", max_new_tokens=1)
    assert not e.scheduler.has_work() and e.kv_pool.num_used == 0


def test_a_non_finite_row_fails_only_its_own_request(tiny_ckpt, monkeypatch):
    """Rows are independent: the request whose logits are NaN gets NumericalError; the others in
    the same steps finish with what they get alone."""
    from qwen_fast.errors import NumericalError
    e = _engine(tiny_ckpt)
    poison = 4242
    good = [e.tokenizer.encode(f"fine {i}") for i in range(2)]
    alone = [e.generate(p, max_new_tokens=8, **GREEDY).token_ids for p in good]
    forward = e.model.forward

    def poisoned(ids, *a, logits_rows=None, **k):
        out = forward(ids, *a, logits_rows=logits_rows, **k).clone()
        for j, row in enumerate(logits_rows):
            if int(ids[row]) == poison:
                out[j] = float("nan")
        return out
    monkeypatch.setattr(e.model, "forward", poisoned)

    rec = Recorder(e)
    with e._core.cond:                  # all three queued before the step thread plans
        streams = [e.stream([1, 2, poison], max_new_tokens=8, **GREEDY)]
        streams += [e.stream(p, max_new_tokens=8, **GREEDY) for p in good]
    with pytest.raises(NumericalError, match="non-finite"):
        list(streams[0])
    for s, want in zip(streams[1:], alone):
        "".join(s)
        assert s.result.token_ids == want
    assert len(rec.calls[0]) == 3                         # the bad row shared a step with them


def test_cancelling_a_waiting_request_removes_it_at_once(tiny_ckpt):
    e = _engine(tiny_ckpt, max_batch_size=1)
    first = e.stream("occupies the only row", max_new_tokens=100000, **GREEDY)
    next(first)
    waiting = e.stream("waits for a row", max_new_tokens=50, **GREEDY)
    assert list(e.scheduler.waiting) == [waiting.request]
    waiting.close()
    assert not e.scheduler.waiting and waiting.request.finished   # no step needed
    first.close()
    e.generate("x", max_new_tokens=1)
    assert waiting.request.num_computed == 0 and not waiting.request.output_ids   # never ran


def test_a_stream_runs_from_the_moment_it_is_made(tiny_ckpt):
    e = _engine(tiny_ckpt)
    s = e.stream("nobody reads me yet", max_new_tokens=5, **GREEDY)
    assert e._core.wait_until(lambda: s.request.finished, timeout=60)   # decoded unread
    assert len("".join(s)) > 0 and s.result.completion_tokens == 5
