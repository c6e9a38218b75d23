"""Property: any value of any generation parameter either works or is refused with a
RequestError naming it, at call time; never another exception, never a crash mid-generation."""
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qwen_fast.errors import RequestError
from qwen_fast.sampling import SamplingParams

NAMES = SamplingParams.names()

# Values of every kind a caller (or a JSON body) might send, weighted to the edges.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, 1, -1, 2**32 - 1, 2**32, 2**63, 2**64, 151935, 151936, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-45, 5e-324, 1e-38, 1e-300, 3.5e38, 1.7e308, 1.0, 0.5, -0.0]),
    st.text(max_size=5),
    st.sampled_from([np.int64(3), np.int32(-2), np.uint64(2**63), np.float32(0.7),
                     np.float64("nan"), np.bool_(True)]),
)
wild = st.one_of(scalars, st.lists(scalars, max_size=3), st.tuples(scalars),
                 st.dictionaries(st.text(max_size=3), scalars, max_size=2))
# Per parameter: values it accepts, weighted to the edges of what is accepted.
valid = {
    "max_new_tokens": st.one_of(st.integers(1, 6), st.sampled_from([10**30, np.int64(3)])),
    "temperature": st.one_of(st.floats(0, 5), st.sampled_from(
        [0, 1e-45, 5e-324, 1e-38, 1e-300, 3.5e38, 1.7e308, np.float32(0.7)])),
    "top_p": st.one_of(st.floats(5e-324, 1), st.sampled_from([1.0, 5e-324, np.float64(0.3)])),
    "top_k": st.one_of(st.integers(-1, 10**6), st.sampled_from([10**30, np.int16(2)])),
    "repetition_penalty": st.one_of(st.floats(1e-300, 1e300), st.sampled_from(
        [1e-45, 5e-324, 1.7e308, 1.0])),
    "seed": st.one_of(st.none(), st.integers(0, 2**32 - 1), st.sampled_from([np.uint32(7)])),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3),
                                                                max_size=3)),
    "stop_token_ids": st.one_of(st.lists(st.integers(0, 151935), max_size=4),
                                st.integers(0, 151935)),
    "ignore_eos": st.one_of(st.booleans(), st.sampled_from([np.bool_(True)])),
    "presence_penalty": st.one_of(st.floats(-2, 2), st.sampled_from([2, -2.0, np.float32(0.5)])),
    "frequency_penalty": st.one_of(st.floats(-2, 2), st.sampled_from([0, 1e-300, np.float64(-1.5)])),
    "logit_bias": st.dictionaries(st.one_of(st.integers(0, 151850), st.sampled_from(["17", "0"])),
                                  st.floats(-100, 100), max_size=3),
    "min_p": st.one_of(st.floats(0, 1), st.sampled_from([1.0, 5e-324])),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "json_schema": st.sampled_from([None, False, True, {"type": "object"},
                                    {"type": "integer", "maximum": 9}, '{"type": "string"}']),
    "speculative": st.sampled_from([None, "ngram"]),
    "num_speculative_tokens": st.one_of(st.integers(1, 64), st.sampled_from([np.int64(2)])),
    "ngram_min": st.integers(1, 2),
    "ngram_max": st.integers(2, 16),
}
assert set(valid) == set(NAMES)
# Each parameter present or not; when present, mostly a valid value, so that about half of
# the calls are accepted and run.
overrides = st.one_of(
    st.fixed_dictionaries({}, optional={
        n: st.integers(0, 15).flatmap(lambda i, v=v: wild if i == 0 else v) for n, v in valid.items()}),
    st.dictionaries(st.sampled_from(NAMES + ["max_tokens", "typo", ""]), wild, max_size=3))


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from qwen_fast import Engine
    return Engine.from_pretrained(tiny_ckpt, dtype="bfloat16", backend="reference")


def _check(call):
    """Run call(); returns True if it worked, False if refused with a RequestError."""
    t0 = time.perf_counter()
    try:
        call()
        ok = True
    except RequestError as e:
        assert str(e)
        event(f"refused: {str(e)[:25]}")
        ok = False
    assert time.perf_counter() - t0 < 30
    return ok


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kw=overrides, as_dict=st.booleans())
def test_any_parameter_value_works_or_is_refused_by_name(engine, kw, as_dict):
    def stream_a_few():
        it = engine.stream("Hi", params=kw) if as_dict else engine.stream("Hi", **kw)
        try:
            for _, _ in zip(range(4), it):
                pass
        finally:
            it.close()
    worked = _check(stream_a_few)
    event("worked" if worked else "refused")
    if worked:
        p = engine.sampling_params(kw)
        # The normalised parameters are plain Python values in range.
        assert isinstance(p.max_new_tokens, int) and p.max_new_tokens >= 1
        assert math.isfinite(p.temperature) and p.temperature >= 0
        if p.max_new_tokens <= 8:
            r = engine.generate("Hi", params=p)
            assert r.finish_reason in ("stop", "length") and len(r.token_ids) <= p.max_new_tokens
    if not worked:
        with pytest.raises(RequestError):
            engine.sampling_params(kw)
