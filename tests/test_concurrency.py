"""One Engine shared by threads: every call gets exactly the result it would get alone, the
calls' sequences decode together (the scheduler's continuous batching), and a stream that
nobody reads holds no one up."""
import sys
import threading

import pytest

from qwen_fast import Engine

GREEDY = dict(temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_pretrained(tiny_ckpt, dtype="bfloat16", backend="reference")


def _calls(e):
    """(name, call) pairs covering generate (single and batch), stream, chat, chat_stream and
    logits, sampled with fixed seeds and greedy, so each has one right answer."""
    calls = []
    for i in range(4):
        calls.append((f"gen{i}", lambda i=i: e.generate(f"prompt {i}", max_new_tokens=6, seed=i,
                                                        ignore_eos=True).token_ids))
        calls.append((f"batch{i}", lambda i=i: [r.token_ids for r in e.generate(
            ["a", f"b {i}", "c c c"], max_new_tokens=4 + i, seed=100 + i, ignore_eos=True)]))
        calls.append((f"stream{i}", lambda i=i: "".join(e.stream(f"story {i}:", max_new_tokens=5,
                                                                 seed=7 * i, ignore_eos=True))))
        calls.append((f"chat{i}", lambda i=i: e.chat(f"question {i}", history=[("hi", "hello")],
                                                     max_new_tokens=5, seed=i)))
        calls.append((f"chat_stream{i}", lambda i=i: "".join(e.chat_stream(
            f"q{i}", max_new_tokens=5, **GREEDY))))
        calls.append((f"logits{i}", lambda i=i: e.logits([1, 2, 3 + i]).argmax(-1).tolist()))
    return calls


@pytest.fixture()
def busy_switching():
    """Switch threads every microsecond, so that a race between calls shows up in one run."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_threads_get_the_results_of_lone_calls(engine, busy_switching):
    calls = _calls(engine)
    expected = {name: call() for name, call in calls}
    got, errors = {}, []
    lock = threading.Lock()

    def worker(items):
        try:
            for _ in range(2):
                for name, call in items:
                    r = call()
                    with lock:
                        got.setdefault(name, []).append(r)
        except Exception as e:  # reported below; a thread's exception would be lost otherwise
            errors.append(e)
    # 6 threads, each running a shuffled share of the calls twice, all at once.
    threads = [threading.Thread(target=worker, args=(calls[k::6][::-1] + calls[k::6],))
               for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    assert set(got) == set(expected)
    for name, results in got.items():
        assert all(r == expected[name] for r in results), name


def test_an_unread_stream_holds_no_one_up_and_keeps_its_result(engine):
    want = "".join(engine.stream("hold the engine", max_new_tokens=20, ignore_eos=True, seed=1))
    s = engine.stream("hold the engine", max_new_tokens=20, ignore_eos=True, seed=1)
    first = next(s)                           # open, then left unread for a while
    done = threading.Event()
    t = threading.Thread(target=lambda: (engine.generate("x", max_new_tokens=2), done.set()))
    t.start()
    assert done.wait(60)                      # ran meanwhile (the stream's sequence with it)
    t.join()
    assert first + "".join(s) == want


def test_a_dropped_stream_is_cancelled_and_frees_its_slot(engine):
    def start_and_drop():
        s = engine.stream("dropped", max_new_tokens=50, ignore_eos=True)
        next(s)                               # in the batch; then goes out of scope unclosed
    start_and_drop()
    import gc
    gc.collect()
    engine.generate("y", max_new_tokens=2)   # runs a step, which retires the cancelled one
    assert not engine.scheduler.has_work() and engine.kv_pool.num_used == 0


def test_nested_calls_in_one_thread_do_not_deadlock(engine):
    """A loop over a stream may call the engine again (e.g. to score what it streamed)."""
    want = engine.generate("inner", max_new_tokens=3, **GREEDY).token_ids
    seen = []
    for delta in engine.stream("outer", max_new_tokens=3, ignore_eos=True, **GREEDY):
        seen.append(engine.generate("inner", max_new_tokens=3, **GREEDY).token_ids)
    assert seen and all(x == want for x in seen)


def test_requests_are_checked_when_called_not_when_iterated(engine):
    from qwen_fast.errors import RequestError
    with pytest.raises(RequestError, match="top_p"):
        engine.stream("x", top_p=5)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.stream("")


def test_a_call_finishing_in_between_cannot_take_anothers_result(engine, monkeypatch):
    """The race the stress test above hunts for, made certain: thread A has finished decoding
    but not yet returned when thread B runs a whole call. (The old engine kept results in one
    attribute shared by all calls, so A returned B's result.)"""
    import qwen_fast.engine as E
    want_a = engine.generate("alpha", max_new_tokens=4, **GREEDY).token_ids
    want_b = engine.generate("beta beta", max_new_tokens=6, ignore_eos=True, **GREEDY).token_ids
    real_result, paused, resume = E._Text.result, threading.Event(), threading.Event()

    def result_then_pause(text, page_bytes):
        out = real_result(text, page_bytes)
        if threading.current_thread().name == "A":
            paused.set()
            resume.wait(60)
        return out
    monkeypatch.setattr(E._Text, "result", result_then_pause)
    got = {}
    a = threading.Thread(name="A", target=lambda: got.setdefault(
        "a", engine.generate("alpha", max_new_tokens=4, **GREEDY)))
    a.start()
    assert paused.wait(60)
    got["b"] = engine.generate("beta beta", max_new_tokens=6, ignore_eos=True, **GREEDY)
    resume.set()
    a.join(60)
    assert got["a"].token_ids == want_a and got["a"].prompt_tokens == 1
    assert got["b"].token_ids == want_b and got["b"].prompt_tokens == 2


@pytest.mark.parametrize("failure", [KeyboardInterrupt, "nan"])
def test_a_call_that_fails_midway_releases_the_engine(tiny_ckpt, failure):
    """Ctrl-C or NaN logits in the middle of decoding: the error reaches the caller (NaN as a
    NumericalError naming the cause), and other threads can use the engine right after."""
    from qwen_fast.errors import NumericalError
    e = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")
    forward, calls = e.model.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        if len(calls) == 3:
            if failure is KeyboardInterrupt:
                raise KeyboardInterrupt
            out = out.clone().fill_(float("nan"))
        return out
    e.model.forward = failing
    with pytest.raises(NumericalError if failure == "nan" else KeyboardInterrupt):
        e.generate("fail here", max_new_tokens=10, ignore_eos=True)
    e.model.forward = forward
    done = threading.Event()
    t = threading.Thread(target=lambda: (e.generate("after", max_new_tokens=2), done.set()))
    t.start()
    assert done.wait(60)
    t.join()


def test_engines_sharing_a_model_run_at_the_same_time(engine):
    """Two engines over one model (as the tests and the server's helpers make them) each have
    their own step thread, pages and activation buffers: running both at once changes nothing."""
    other = Engine(engine.model, engine.tokenizer, engine.generation_config)
    prompts = [f"shared model {i}" for i in range(4)]
    want = engine.generate(prompts, max_new_tokens=24, **GREEDY)
    got = {}
    threads = [threading.Thread(target=lambda k=k, e=e: got.setdefault(k, e.generate(
        prompts, max_new_tokens=24, **GREEDY))) for k, e in (("a", engine), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.close()
    assert [r.token_ids for r in got["a"]] == [r.token_ids for r in want]
    assert [r.token_ids for r in got["b"]] == [r.token_ids for r in want]
