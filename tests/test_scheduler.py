"""The scheduler (qwen_fast/scheduler.py): sequences from concurrent callers decode in one batch,
newcomers join between steps, finished and cancelled ones leave, the batch size and the KV
budget bound what runs at once, and a newcomer's prompt is prefilled in bounded chunks while
others decode. Greedy results equal each request run alone."""
from __future__ import annotations

import threading

import pytest
import torch

from qwen_fast import Engine
from qwen_fast.errors import CapacityError
from qwen_fast.model import KVCache

GREEDY = dict(temperature=0, ignore_eos=True)


def _engine(ckpt, **kw):
    return Engine.from_pretrained(ckpt, dtype="float32", backend="auto", **kw)


class Recorder:
    """Wraps model.forward: records (rows, num_new) of every call."""

    def __init__(self, model):
        self.calls, self._forward, self._lock = [], model.forward, threading.Lock()
        model.forward = self

    def __call__(self, ids, cache, num_new=None, rows=None, **kw):
        with self._lock:
            n = [ids.shape[1]] * ids.shape[0] if num_new is None else list(num_new)
            self.calls.append((list(rows) if rows is not None else list(range(ids.shape[0])), n))
        return self._forward(ids, cache, num_new=num_new, rows=rows, **kw)

    def decode_batch_sizes(self):
        return [len(r) for r, n in self.calls if max(n) == 1]


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
    rec = Recorder(e.model)
    got = _run_concurrently([lambda p=p: e.generate(p, max_new_tokens=12, **GREEDY).token_ids
                             for p in prompts])
    assert got == alone
    assert max(rec.decode_batch_sizes()) >= 2          # decoded together, not in turns
    # fewer decode forwards than 4 lone runs of 11 steps each
    assert len(rec.decode_batch_sizes()) < 4 * 11


def test_a_newcomer_joins_a_running_batch(tiny_ckpt):
    e = _engine(tiny_ckpt)
    rec = Recorder(e.model)
    long = e.stream("a long one", max_new_tokens=40, **GREEDY)
    pieces = [next(long) for _ in range(3)]             # decoding alone now
    short = e.generate("a short one", max_new_tokens=5, **GREEDY)
    pieces += list(long)
    assert short.completion_tokens == 5 and "".join(pieces)
    joined = [rows for rows, n in rec.calls if max(n) == 1 and len(rows) == 2]
    assert joined, "the newcomer never decoded in the same forward as the running sequence"


def test_max_batch_size_bounds_the_batch(tiny_ckpt):
    e = _engine(tiny_ckpt, max_batch_size=2)
    rec = Recorder(e.model)
    out = _run_concurrently([lambda i=i: e.generate(f"p{i}", max_new_tokens=6, **GREEDY)
                             for i in range(5)])
    assert all(r.completion_tokens == 6 for r in out)
    assert max(len(rows) for rows, _ in rec.calls) <= 2
    assert all(max(rows) < 2 for rows, _ in rec.calls)   # two slots only


def test_sequences_wait_for_kv_room_and_one_that_never_fits_is_refused(tiny_ckpt):
    probe = _engine(tiny_ckpt)
    per_token = KVCache.bytes_per_token(probe.cfg, probe.model.dtype)
    # room for one sequence of 3 + 30 positions at a time, not two
    e = _engine(tiny_ckpt, kv_cache_budget=40 * per_token)
    rec = Recorder(e.model)
    out = _run_concurrently([lambda i=i: e.generate(e.tokenizer.encode(f"w{i} x y")[:3],
                                                    max_new_tokens=30, **GREEDY)
                             for i in range(3)])
    assert all(r.completion_tokens == 30 for r in out)
    assert max(len(rows) for rows, _ in rec.calls) == 1   # one at a time: the budget held
    with pytest.raises(CapacityError, match="kv_cache_budget"):
        e.generate("x", max_new_tokens=100)              # 101 positions could never fit


def test_a_newcomers_prompt_is_prefilled_in_chunks_while_others_decode(tiny_ckpt):
    e = _engine(tiny_ckpt)
    e.scheduler.prefill_chunk = 8
    rec = Recorder(e.model)
    ids = list(range(1000, 1030))                        # 30 tokens: 4 chunks of <= 8
    alone = e.generate(ids, max_new_tokens=4, **GREEDY).token_ids
    rec.calls.clear()
    s = e.stream("keeps decoding", max_new_tokens=60, **GREEDY)
    next(s)
    got = e.generate(ids, max_new_tokens=4, **GREEDY).token_ids
    s.close()
    prefills = [n for rows, n in rec.calls if max(n) > 1]
    assert prefills and all(sum(n) <= 8 for n in prefills)
    assert sum(sum(n) for n in prefills) >= 30 - 8
    assert got == alone                                  # fp32: chunking changes no token


def test_cancelling_frees_the_slot_for_a_waiting_sequence(tiny_ckpt):
    e = _engine(tiny_ckpt, max_batch_size=1)
    s = e.stream("occupies the only slot", max_new_tokens=500, **GREEDY)
    next(s)
    assert len(e.scheduler._active) == 1
    s.close()                                            # cancelled: the slot is free
    r = e.generate("next", max_new_tokens=3, **GREEDY)
    assert r.completion_tokens == 3
    assert not e.scheduler._active


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
    """No memory for the KV cache (raised while the step thread sets up a step): the callers
    get the error, and the engine works again afterwards."""
    import qwen_fast.scheduler as S
    e = _engine(tiny_ckpt)

    def no_memory(self):
        raise MemoryError("no room for the KV cache")
    with monkeypatch.context() as m:
        m.setattr(S.Scheduler, "_ensure_cache", no_memory)
        with pytest.raises(MemoryError, match="no room"):
            e.generate("x", max_new_tokens=3, **GREEDY)
    assert e.generate("x", max_new_tokens=3, **GREEDY).completion_tokens == 3


def test_the_kv_budget_counts_the_slots_the_cache_already_holds(tiny_ckpt):
    """The cache never shrinks while its batch lives: after four sequences grew it to four
    slots and three of them finished, a newcomer must fit four slots at the longest worst case,
    not the two that two sequences would need."""
    from qwen_fast.engine import _Request
    from qwen_fast.scheduler import Seq
    probe = _engine(tiny_ckpt)
    per_token = KVCache.bytes_per_token(probe.cfg, probe.model.dtype)
    e = _engine(tiny_ckpt, kv_cache_budget=4 * 200 * per_token)
    sched, p = e.scheduler, e.sampling_params(**GREEDY)

    def seq(limit):
        return Seq(_Request(e, [1, 2], p, [], limit))
    with sched._cond:
        sched._cache = KVCache(e.cfg, 4, 64, e.model.dtype, max_capacity=200)
        running, newcomer = seq(190), seq(300)          # worst cases 192 and 302 positions
        running.slot = 3
        sched._active = {3: running}
        sched._waiting.append(newcomer)
        sched._admit()
        assert newcomer.slot is None and list(sched._waiting) == [newcomer]   # 4 x 302 > 800
        sched._cache = None                             # the batch drained: a cache of one slot
        sched._active = {}
        sched._admit()
        assert newcomer.slot == 0 and not sched._waiting
        sched._active, sched._waiting = {}, type(sched._waiting)()


def test_close_cancels_what_runs_and_refuses_what_comes(tiny_ckpt):
    e = _engine(tiny_ckpt)
    s = e.stream("long", max_new_tokens=10000, **GREEDY)
    next(s)
    e.close()
    with pytest.raises(RuntimeError, match="scheduler was closed"):
        "".join(s)
    with pytest.raises(RuntimeError, match="scheduler was closed"):
        e.generate("after", max_new_tokens=2)
    assert e.scheduler._thread is None


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
