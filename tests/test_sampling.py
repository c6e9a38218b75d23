"""The sampler: the release's processor order and maths, seeding, and parameter checks."""
import math

import numpy as np
import pytest
import torch

from qwen_fast.errors import RequestError
from qwen_fast.sampling import (SamplingParams, apply_repetition_penalty, make_generator,
                                process_scores, sample_next)


def P(**kw):
    return SamplingParams().replace(**kw)


def test_repetition_penalty_over_history_each_id_once():
    scores = torch.tensor([2.0, -2.0, 1.0, 0.0, -1.0])
    hist = torch.tensor([0, 1, 1, 3, 0])            # repeated ids are penalised once
    out = apply_repetition_penalty(scores, hist, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.0, -1.0]
    assert scores.tolist() == [2.0, -2.0, 1.0, 0.0, -1.0]   # input untouched


def test_repetition_penalty_runs_in_the_logits_dtype():
    scores = torch.tensor([3.0, -3.0], dtype=torch.bfloat16)
    out = apply_repetition_penalty(scores, torch.tensor([0, 1]), 1.1)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [(torch.tensor(3.0, dtype=torch.bfloat16) / 1.1).item(),
                            (torch.tensor(-3.0, dtype=torch.bfloat16) * 1.1).item()]


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([5.0, 4.8, 1.0])
    hist = torch.tensor([0])
    assert sample_next(logits, hist, P(temperature=0, repetition_penalty=1.0), None) == 0
    assert sample_next(logits, hist, P(temperature=0, repetition_penalty=1.1), None) == 1


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()
    s = process_scores(logits, torch.tensor([], dtype=torch.long), P(top_p=0.8, repetition_penalty=1.0))
    # ascending cumsum: 0.1, 0.25, 0.5, 1.0 -> drop those <= 0.2: only the 0.1 token
    assert torch.isinf(s).tolist() == [False, False, False, True]
    s = process_scores(logits, torch.tensor([], dtype=torch.long), P(top_p=0.5, repetition_penalty=1.0))
    assert torch.isinf(s).tolist() == [False, True, True, True]
    s = process_scores(logits, torch.tensor([], dtype=torch.long), P(top_p=1e-6, repetition_penalty=1.0))
    assert torch.isinf(s).tolist() == [False, True, True, True]    # at least one is kept


def test_top_k_and_temperature():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    s = process_scores(logits, torch.tensor([], dtype=torch.long),
                       P(top_k=2, top_p=1.0, temperature=2.0, repetition_penalty=1.0))
    assert torch.isinf(s).tolist() == [True, False, False, True]
    assert s[1].item() == 1.5 and s[2].item() == 1.0


def test_padding_ids_are_never_drawn():
    logits = torch.zeros(10)
    logits[8:] = 50.0
    p = P(top_p=1.0, repetition_penalty=1.0)
    g = make_generator(0)
    assert all(sample_next(logits, torch.tensor([], dtype=torch.long), p, g, valid_vocab=8) < 8
               for _ in range(50))
    assert sample_next(logits, torch.tensor([], dtype=torch.long), P(temperature=0), None, valid_vocab=8) < 8


def test_seeded_draws_repeat_and_follow_the_distribution():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    p = P(top_p=1.0, repetition_penalty=1.0)
    empty = torch.tensor([], dtype=torch.long)
    a = [sample_next(logits, empty, p, make_generator(7)) for _ in range(5)]
    g1, g2 = make_generator(7), make_generator(7)
    s1 = [sample_next(logits, empty, p, g1) for _ in range(200)]
    s2 = [sample_next(logits, empty, p, g2) for _ in range(200)]
    assert s1 == s2 and len(set(a)) == 1
    g = make_generator(1)
    n = 4000
    counts = torch.bincount(torch.tensor([sample_next(logits, empty, p, g) for _ in range(n)]), minlength=3)
    for c, q in zip(counts.tolist(), [0.5, 0.3, 0.2]):
        assert abs(c / n - q) < 4 * math.sqrt(q * (1 - q) / n)


@pytest.mark.parametrize("kw,msg", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(seed=-1), "seed"), (dict(seed="x"), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop=[1]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_bad_parameters_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        P(**kw)


def test_unknown_parameter():
    with pytest.raises(RequestError, match=r"unknown generation parameter\(s\) \['max_tokens'\]"):
        P(max_tokens=3)


def test_stop_token_ids_checked_against_vocab():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        P(stop_token_ids=[200000]).validate(vocab_size=151936)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("penalty", [1.0, 1.1, 0.7, 3.0])
def test_greedy_fast_path_is_the_release_argmax(dtype, penalty):
    """sample_next's greedy path (fp32 copy, penalty on the history only) picks the token the
    release's maths picks (process_scores then argmax), over many random rows with ties and
    with history ids past the valid vocabulary; the logits passed in are left unchanged."""
    from qwen_fast.sampling import process_scores
    g = torch.Generator().manual_seed(7)
    p = SamplingParams(temperature=0, repetition_penalty=penalty)
    for trial in range(40):
        logits = (torch.randn(1000, generator=g) * 3).round().to(dtype)   # many exact ties
        history = torch.randint(0, 1000, (30,), generator=g)
        before = logits.clone()
        want = int(torch.argmax(process_scores(logits, history, p, 990)))
        assert sample_next(logits, history, p, None, 990) == want
        assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_cpu_penalty_values_are_torchs_bits(dtype):
    """The CPU greedy path computes the release's penalty in NumPy (fp32 maths, then the
    dtype's rounding): every penalized value must be the one torch's dtype ops give, bit for
    bit, over values of every magnitude (overflow to inf included) and awkward penalties."""
    from qwen_fast.sampling import _round_like
    g = torch.Generator().manual_seed(8)
    big = torch.finfo(dtype).max
    s = torch.cat([torch.randn(20000, generator=g) * 10 ** torch.randint(-6, 5, (20000,), generator=g),
                   torch.tensor([big, -big, 0.0, -0.0, 1e-30, -1e-30])]).to(dtype)
    for penalty in (1.1, 0.7, 3.0, 1.0001, 1.37, 1e-3, 250.0):
        want = torch.where(s < 0, s * penalty, s / penalty).float().numpy()
        v = s.float().numpy()
        pf = np.float32(penalty)
        with np.errstate(over="ignore", under="ignore"):
            got = _round_like(np.where(v < 0, v * pf, v / pf), dtype)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), penalty
