"""The serving loop: one step thread runs plan -> forward -> record, over and over, for the
requests of every caller.

    callers --submit / abort--> EngineCore --schedule()--> StepPlan --Runner.execute--> tokens
                                     ^                                                  |
                                     +---------------- Scheduler.update <--------------+

Callers (Engine.generate / stream / chat, the server's threads) submit Requests and wait on the
core's condition for their token ids; text is made on their own threads (engine.TextStream), off
the step thread. The scheduler is touched only under the core's lock; the forward runs outside it,
so that callers can submit and cancel meanwhile (a cancelled running request leaves the batch at
the next plan: its pages may be in use by the forward in flight).

The steps run on one thread of the core's own ("qwen-fast-steps", started when work arrives,
ended after LINGER_S idle seconds). One thread matters for speed: libgomp gives every thread that
runs OpenMP code a team of its own, and once there are more such threads than cores its workers
stop spinning between parallel regions and sleep instead; a decode step runs about 240 of them,
and a step run from a different caller's thread each time measured 33 ms instead of 20 (int4,
2 cores). Engine.from_pretrained releases the loading thread's team for the same reason.
"""
from __future__ import annotations

import atexit
import threading
import weakref
from collections import deque
from typing import Callable, Deque, Optional, Sequence

import torch

from .errors import OverloadedError
from .request import Request
from .runner import Runner
from .scheduler import Scheduler

_LIVE: "weakref.WeakSet[EngineCore]" = weakref.WeakSet()
THREAD_NAME = "qwen-fast-steps"


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every step thread between two steps: a thread killed inside
    a step (OpenMP threads running) aborts the process ("terminate called without an active
    exception"). Runs after the non-daemon threads were joined, before finalization."""
    for core in list(_LIVE):
        core.close()
    for t in threading.enumerate():     # one still ending whose core was already freed
        if t.name == THREAD_NAME and t is not threading.current_thread():
            t.join(10.0)


class _Job:
    """A call to run on the step thread (EngineCore.exclusive)."""

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


class EngineCore:
    LINGER_S = 2.0      # an idle step thread waits this long for work, then ends

    def __init__(self, scheduler: Scheduler, runner: Runner):
        self.scheduler = scheduler
        self.runner = runner
        self.cond = threading.Condition()       # guards the scheduler; signals every step
        self._jobs: Deque[_Job] = deque()
        self._thread: Optional[threading.Thread] = None
        self._ending: Optional[threading.Thread] = None   # the last thread that left its loop
        self._closed = False
        _LIVE.add(self)

    # ---- the callers' side -------------------------------------------------------------------
    def submit(self, reqs: Sequence[Request], max_waiting: Optional[int] = None) -> None:
        """Queue requests (all or none: one that can never fit raises CapacityError first).
        max_waiting: refuse them (OverloadedError, nothing queued) if more than that many
        requests would then wait for a batch row; checked under the lock, so that concurrent
        submissions never overshoot it."""
        with self.cond:
            if self._closed:
                raise RuntimeError("the engine was closed")
            for r in reqs:
                self.scheduler.check_fits(len(r.prompt_ids))
            if max_waiting is not None:
                waiting = self.scheduler.waiting_beyond_batch(len(reqs))
                if waiting > max_waiting:
                    raise OverloadedError(
                        f"the engine is full: {waiting} requests would wait for a batch row "
                        f"(max_waiting={max_waiting}, {self.scheduler.max_batch_size} rows, all "
                        "busy); nothing was queued, retry later")
            for r in reqs:
                self.scheduler.add(r)
            self._ensure_thread()
            self.cond.notify_all()

    def abort(self, req: Request) -> None:
        """Cancel a request from any thread: a waiting one is dropped at once, a running one
        leaves the batch before the next step."""
        with self.cond:
            self.scheduler.abort(req)
            self.cond.notify_all()

    def snapshot(self) -> dict:
        """Scheduler.snapshot() under the lock."""
        with self.cond:
            return self.scheduler.snapshot()

    def wait_until(self, ready: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Block until ready() (called under the lock, after every step) is true."""
        with self.cond:
            return self.cond.wait_for(ready, timeout)

    def exclusive(self, fn: Callable):
        """Run fn (e.g. a full-sequence forward) on the step thread, between two steps, and
        return its result (or raise its error) here."""
        job = _Job(fn)
        with self.cond:
            if self._closed:
                raise RuntimeError("the engine was closed")
            self._jobs.append(job)
            self._ensure_thread()
            self.cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 10.0) -> None:
        """Fail every request (their callers get a RuntimeError) and stop the step thread after
        its current step. Submitting afterwards raises."""
        with self.cond:
            self._closed = True
            self.scheduler.finish_all(RuntimeError("the engine was closed"))
            # The running thread, or one that has left its loop and is still ending: its frame's
            # tensors are freed after the loop returns, and a thread still freeing them when the
            # interpreter finalizes is stopped inside torch's C++ destructors, which aborts the
            # process ("terminate called without an active exception", seen at exit in tests).
            threads = {t for t in (self._thread, self._ending) if t is not None}
            self.cond.notify_all()
        for thread in threads - {threading.current_thread()}:
            thread.join(timeout)

    # ---- the step thread ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        """Start the step thread if it is not running (caller holds cond). It takes the torch
        thread count of the thread that starts it (torch.set_num_threads is per thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(torch.get_num_threads(),),
                                            name=THREAD_NAME, daemon=True)
            self._thread.start()

    def _loop(self, threads: int) -> None:
        # Only when it differs: torch.set_num_threads starts a thread of its own in a new thread
        # (measured: one more thread, and the step 27 ms instead of 20 through the spin
        # throttling described above).
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        sched = self.scheduler
        while True:
            with self.cond:
                if not (self._jobs or sched.has_work()) and not self._closed:
                    self.cond.wait(timeout=self.LINGER_S)
                if self._closed or not (self._jobs or sched.has_work()):
                    self._thread = None          # ends; its OpenMP threads end with it
                    self._ending = threading.current_thread()
                    for job in self._jobs:       # only after close(): nobody will run them
                        job.error = RuntimeError("the engine was closed")
                        job.done.set()
                    self._jobs.clear()
                    return
                job = self._jobs.popleft() if self._jobs else None
                plan = sched.schedule() if job is None else None
                if plan is not None and plan.finished:
                    self.cond.notify_all()
            if job is not None:
                job.run()
                continue
            if not plan:
                with self.cond:                 # nothing could run (no room): wait for a change
                    self.cond.wait(timeout=0.05)
                continue
            try:
                sampled, errors = self.runner.execute(plan)
            except BaseException as e:           # the forward failed as a whole (or no memory):
                sampled, errors = {}, {s.req: e for s in plan.seqs}   # its requests get the error
            with self.cond:
                sched.update(plan, sampled, errors)
                self.cond.notify_all()
