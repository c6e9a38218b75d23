"""Continuous batching: the sequences of every caller decode together in one batch, new ones
join it between steps and finished ones leave it.

One Scheduler per Engine owns the model's KV cache: one slot per sequence in the batch, at
most ``max_batch_size`` slots. Each step

1. retires cancelled sequences and admits waiting ones (first come, first served) while a slot
   is free and the KV budget holds;
2. prefills newcomers by at most ``prefill_chunk`` prompt positions in all while other
   sequences are decoding (all of a prompt up to ``prefill_tokens`` when none is): a long
   prompt delays the batch's next token by one chunk's time, not by the whole prompt;
3. runs one decode forward over every sequence that has a token to feed, samples each
   sequence's next token with its own parameters, seed and stops, and retires the finished.

The steps run on one thread of the scheduler's own ("qwen-fast-steps", started when work
arrives, ended after LINGER_S idle seconds); callers wait for their sequences' text. One thread
matters for speed: libgomp gives every thread that runs OpenMP code a team of its own, and once
there are more such threads than cores its workers stop spinning between parallel regions and
sleep instead; a decode step runs about 240 of them, and a step run from a different caller's
thread each time measured 33 ms instead of 20 (int4, 2 cores). Engine.from_pretrained releases
the loading thread's team for the same reason. An open stream that nobody reads holds no one up
(its sequence decodes on, its text queues), and a call made inside a loop over a stream simply
joins the batch.

KV memory: the cache holds ``slots x capacity`` positions, where the slots grow (doubling) with
the number of sequences in the batch and the capacity with the longest of them, up to the
longest worst case (prompt + max_new_tokens) among the sequences admitted. A sequence is
admitted only while ``slots x longest worst case`` fits ``kv_cache_budget``; one that could
not fit even alone is refused when it is submitted (CapacityError). The cache is freed when the
batch empties.

Numerics: every row of a forward is computed independently, so a sequence decodes exactly as it
would alone, except that a prompt prefilled in chunks (while others decode) may differ from a
one-shot prefill in the last bits of low-precision dtypes.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Sequence

import torch

from .errors import CapacityError
from .model import KVCache
from .sampling import sample_next

if TYPE_CHECKING:
    from .engine import _Request


class Seq:
    """One submitted sequence: its decoding state (engine._Request), its place in the batch and
    what its caller has not read yet."""

    def __init__(self, state: "_Request"):
        self.state = state
        self.slot: Optional[int] = None
        self.prefilled = 0               # prompt positions in the cache
        self.pending: Optional[int] = None   # sampled token not yet fed to the model
        self.deltas: Deque[str] = deque()
        self.done = False
        self.cancelled = False
        self.error: Optional[BaseException] = None
        self.t_submit = time.perf_counter()
        self.t_first: Optional[float] = None
        self.t_done: Optional[float] = None
        self.kv_peak = 0

    @property
    def worst_case(self) -> int:
        """Positions this sequence may occupy: prompt + its token limit."""
        return len(self.state.prompt_ids) + self.state.limit


_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every step thread between two steps: a thread killed inside
    a step (OpenMP threads running) aborts the process ("terminate called without an active
    exception"). Runs after the non-daemon threads were joined, before finalization."""
    for sched in list(_LIVE):
        sched.close()


class _Job:
    """A call to run on the step thread (Scheduler.exclusive)."""

    def __init__(self, fn: Callable):
        self.fn, self.result, self.error = fn, None, None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:      # raised again in the caller's thread
            self.error = e
        finally:
            self.done.set()


class Scheduler:
    def __init__(self, model, tokenizer_len: int, max_batch_size: int = 8,
                 kv_cache_budget: Optional[int] = None, prefill_chunk: int = 256,
                 prefill_tokens: int = 4096):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.valid_vocab = tokenizer_len
        self.max_batch_size = max_batch_size
        self.kv_cache_budget = kv_cache_budget
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens
        self._cond = threading.Condition()        # guards the queues below; signals progress
        self._jobs: Deque["_Job"] = deque()        # exclusive() calls, run between steps
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        _LIVE.add(self)
        self._waiting: Deque[Seq] = deque()
        self._active: Dict[int, Seq] = {}    # slot -> sequence
        self._cache: Optional[KVCache] = None

    # ---- budget ----------------------------------------------------------------------------
    def bytes_for(self, slots: int, positions: int) -> int:
        return slots * positions * KVCache.bytes_per_token(self.model.cfg, self.model.dtype)

    def check_fits(self, count: int, worst: int) -> None:
        """Refuse (CapacityError) sequences that could never be admitted: `count` sequences of
        which the longest may occupy `worst` positions need that much room for one of them."""
        if self.kv_cache_budget is None:
            return
        need = self.bytes_for(1, worst)
        if need > self.kv_cache_budget:
            raise CapacityError(
                f"this request needs up to {need / 2**30:.2f} GiB of KV cache for one sequence "
                f"({count} sequence(s) x up to {worst} tokens, decoded as room allows), more than "
                f"the engine's kv_cache_budget of {self.kv_cache_budget / 2**30:.2f} GiB; lower "
                "max_new_tokens or the prompt, or raise kv_cache_budget in Engine.from_pretrained")

    # ---- the callers' side -------------------------------------------------------------------
    def submit(self, seqs: Sequence[Seq]) -> None:
        self.check_fits(len(seqs), max(s.worst_case for s in seqs))
        self._enqueue(self._waiting, seqs)

    def cancel(self, seq: Seq) -> None:
        """Stop a sequence: it leaves the batch at the next step (its slot is freed)."""
        with self._cond:
            if not seq.done:
                seq.cancelled = True
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    self._finish(seq)
            self._cond.notify_all()

    def next_delta(self, seq: Seq) -> Optional[str]:
        """The sequence's next text delta, waiting for the steps that make it; None once it is
        done (its error, if it failed, is raised)."""
        with self._cond:
            while True:
                if seq.deltas:
                    return seq.deltas.popleft()
                if seq.done:
                    if seq.error is not None:
                        raise seq.error
                    return None
                self._cond.wait()

    def wait(self, seqs: Sequence[Seq]) -> None:
        """Wait until every sequence is done (their deltas stay queued)."""
        with self._cond:
            while True:
                failed = next((s.error for s in seqs if s.done and s.error is not None), None)
                if failed is not None:
                    raise failed
                if all(s.done for s in seqs):
                    return
                self._cond.wait()

    def exclusive(self, fn: Callable):
        """Run fn (e.g. a full-sequence forward) on the step thread, between two steps, and
        return its result (or raise its error) here."""
        job = _Job(fn)
        self._enqueue(self._jobs, [job])
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every sequence (their callers get a RuntimeError) and stop the step thread
        after its current step. Submitting afterwards raises."""
        with self._cond:
            self._closed = True
            err = RuntimeError("the engine's scheduler was closed")
            for seq in list(self._waiting) + list(self._active.values()):
                self._finish(seq, err)
            self._waiting.clear()
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _enqueue(self, queue: Deque, items) -> None:
        """Append work for the step thread (starting it if needed); refused once closed."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine's scheduler was closed")
            queue.extend(items)
            self._ensure_thread()
            self._cond.notify_all()

    # ---- the step thread ---------------------------------------------------------------------
    LINGER_S = 2.0      # an idle step thread waits this long for work, then ends

    def _ensure_thread(self) -> None:
        """Start the step thread if it is not running (caller holds _cond). It takes the torch
        thread count of the thread that starts it (torch.set_num_threads is per thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(torch.get_num_threads(),),
                                            name="qwen-fast-steps", daemon=True)
            self._thread.start()

    def _loop(self, threads: int) -> None:
        # Only when it differs: torch.set_num_threads starts a thread of its own in a new thread
        # (measured: one more thread, and the step 27 ms instead of 20 through the spin
        # throttling described above).
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        while True:
            with self._cond:
                if not (self._jobs or self._waiting or self._active) and not self._closed:
                    self._cond.wait(timeout=self.LINGER_S)
                if self._closed or not (self._jobs or self._waiting or self._active):
                    self._thread = None          # ends; its OpenMP threads end with it
                    for job in self._jobs:       # only after close(): nobody will run them
                        job.error = RuntimeError("the engine's scheduler was closed")
                        job.done.set()
                    self._jobs.clear()
                    return
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:
                job.run()
            else:
                try:
                    self._step()
                except BaseException as e:   # a failed step (the forward, sampling, or no
                    with self._cond:         # memory for the cache): its callers get the error
                        for seq in list(self._active.values()):
                            self._finish(seq, e)
            with self._cond:
                self._cond.notify_all()

    # ---- the step ----------------------------------------------------------------------------
    def _finish(self, seq: Seq, error: Optional[BaseException] = None) -> None:
        """Mark done and free its slot (caller holds _cond)."""
        seq.done = True
        seq.error = error
        seq.t_done = time.perf_counter()
        if seq.slot is not None:
            self._active.pop(seq.slot, None)
            if self._cache is not None:
                self._cache.lengths[seq.slot] = 0
            seq.slot = None
        if not self._active:
            self._cache = None           # the batch is empty: free the KV memory

    def _admit(self) -> None:
        """Move waiting sequences into free slots while the budget holds (caller holds _cond)."""
        while self._waiting and len(self._active) < self.max_batch_size:
            seq = self._waiting[0]
            worst = max([s.worst_case for s in self._active.values()] + [seq.worst_case])
            # the slots the cache will have: it never shrinks while the batch lives
            held = self._cache.batch_size if self._cache is not None else 0
            slots = max(held, self._slots_for(len(self._active) + 1))
            if (self.kv_cache_budget is not None and self._active
                    and self.bytes_for(slots, worst) > self.kv_cache_budget):
                break       # waits for room: sequences ahead of it must finish first
            self._waiting.popleft()
            free = next(i for i in range(self.max_batch_size) if i not in self._active)
            seq.slot = free
            self._active[free] = seq

    def _slots_for(self, n: int) -> int:
        s = 1
        while s < n:
            s *= 2
        return min(s, self.max_batch_size)

    def _ensure_cache(self) -> KVCache:
        """The KV cache, with a slot for every active sequence and room for the longest worst
        case among them (positions grow with use: KVCache.ensure)."""
        m = self.model
        need_slots = self._slots_for(max(self._active) + 1)
        worst = max(s.worst_case for s in self._active.values())
        c = self._cache
        if c is None:
            c = self._cache = KVCache(m.cfg, need_slots, min(64, worst), m.dtype, m.device,
                                      max_capacity=worst)
        else:
            if worst > c.max_capacity:
                c.max_capacity = worst
            if need_slots > c.batch_size:
                c.grow_slots(need_slots)
                c.buffers = None        # the decode buffers are sized by the slots
        return c

    def _step(self) -> None:
        with self._cond:
            for slot, seq in list(self._active.items()):
                if seq.cancelled:
                    self._finish(seq)
            self._admit()
            if not self._active:
                return
            active = sorted(self._active.values(), key=lambda s: s.slot)
        cache = self._ensure_cache()
        try:
            self._prefill(cache, active)
            self._decode(cache, active)
        finally:
            for seq in active:
                seq.kv_peak = max(seq.kv_peak, cache.peak_bytes)

    def _prefill(self, cache: KVCache, active: List[Seq]) -> None:
        todo = [s for s in active if s.prefilled < len(s.state.prompt_ids)]
        if not todo:
            return
        decoding = any(s.pending is not None for s in active)
        budget = self.prefill_chunk if decoding else self.prefill_tokens
        per = max(1, budget // len(todo))
        n_new = [min(per, len(s.state.prompt_ids) - s.prefilled) for s in todo]
        T = max(n_new)
        ids = torch.zeros(len(todo), T, dtype=torch.long)
        for i, (s, n) in enumerate(zip(todo, n_new)):
            ids[i, :n] = torch.tensor(s.state.prompt_ids[s.prefilled:s.prefilled + n])
        logits = self.model.forward(ids, cache, num_new=n_new, rows=[s.slot for s in todo],
                                    prompt_lengths=[len(s.state.prompt_ids) for s in todo])
        for i, (s, n) in enumerate(zip(todo, n_new)):
            s.prefilled += n
            if s.prefilled == len(s.state.prompt_ids):
                self._sample(s, logits[i])

    def _decode(self, cache: KVCache, active: List[Seq]) -> None:
        rows = [s for s in active if s.pending is not None and not s.done]
        if not rows:
            return
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long)
        for s in rows:
            s.pending = None
        logits = self.model.forward(ids, cache, rows=[s.slot for s in rows])
        for i, s in enumerate(rows):
            self._sample(s, logits[i])

    def _sample(self, seq: Seq, logits: torch.Tensor) -> None:
        r = seq.state
        tok = sample_next(logits, r.history, r.params, r.generator, self.valid_vocab)
        delta = r.add_token(tok)
        with self._cond:
            if seq.t_first is None:
                seq.t_first = time.perf_counter()
            if delta:
                seq.deltas.append(delta)
            if r.finish_reason is not None:
                self._finish(seq)
            elif not seq.cancelled:
                seq.pending = tok
