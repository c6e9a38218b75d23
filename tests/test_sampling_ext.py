"""The OpenAI sampling extensions (presence/frequency penalties, logit_bias, min_p), log-
probabilities of sampled and prompt tokens, and Engine.streams (several prompts submitted
together). qwen_fast/sampling.py's docstring gives the order these apply in."""
import math

import pytest
import torch

from qwen_fast.errors import RequestError
from qwen_fast.sampling import SamplingParams, process_scores, sample_next, token_logprobs


def _params(**kw):
    return SamplingParams().replace(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_presence_frequency_and_bias_follow_the_repetition_penalty(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, generator=g) * 3).to(dtype)
    prompt = torch.tensor([1, 2, 3])
    output = torch.tensor([5, 5, 7, 2])
    history = torch.cat([prompt, output])
    p = _params(temperature=0, repetition_penalty=1.3, presence_penalty=0.5,
                frequency_penalty=0.25, logit_bias={9: 4.0, "11": -100})
    got = process_scores(logits, history, p, output=output)
    # By hand: the release's penalty in the dtype, then the extensions in fp32, rounded once.
    base = process_scores(logits, history, _params(temperature=0, repetition_penalty=1.3))
    want = base.clone()
    for t, count in ((5, 2), (7, 1), (2, 1)):
        want[t] = (base[t].float() - (0.25 * count + 0.5)).to(dtype)
    want[9] = (base[9].float() + 4.0).to(dtype)
    want[11] = (base[11].float() - 100.0).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    # The prompt's ids are not counted: 1 and 3 only have the repetition penalty.
    assert got[1] == base[1] and got[3] == base[3]
    # Greedy follows the changed scores.
    assert sample_next(logits, history, p, None, output=output) == int(torch.argmax(want))


def test_extensions_off_leave_the_release_path_bit_identical():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(100, generator=g).to(torch.bfloat16)
    history = torch.tensor([3, 4, 5, 6])
    p = _params(temperature=0.7, top_p=0.9, top_k=20)
    assert not p.extended
    a = process_scores(logits, history, p)
    b = process_scores(logits, history, p, output=history[2:])
    assert torch.equal(a, b)
    for seed in range(5):
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert sample_next(logits, history, p, ga) == sample_next(logits, history, p, gb, output=history)


def test_logit_bias_forces_and_bans_tokens_in_generation(tiny_engine):
    forced = 1000
    r = tiny_engine.generate("hello", max_new_tokens=5, temperature=0, logit_bias={forced: 100})
    assert r.token_ids == [forced] * 5
    plain = tiny_engine.generate("hello", max_new_tokens=5, temperature=0, repetition_penalty=1.0)
    banned = tiny_engine.generate("hello", max_new_tokens=5, temperature=0, repetition_penalty=1.0,
                                  logit_bias={plain.token_ids[0]: -100})
    assert banned.token_ids[0] != plain.token_ids[0]


def test_min_p_keeps_only_tokens_near_the_most_likely():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0, 1.5])       # ratios 1, .90, .14, .05, .61
    p = _params(temperature=1.0, top_p=1.0, repetition_penalty=1.0, min_p=0.5)
    scores = process_scores(logits, torch.tensor([], dtype=torch.long), p)
    probs = torch.softmax(logits, -1)
    keep = probs >= 0.5 * probs.max()
    assert torch.equal(torch.isfinite(scores), keep)
    assert keep.tolist() == [True, True, False, False, True]
    # min_p = 1: only the most likely token can be drawn.
    p1 = p.replace(min_p=1.0)
    for seed in range(10):
        assert sample_next(logits, torch.tensor([], dtype=torch.long), p1,
                           torch.Generator().manual_seed(seed)) == 0


@pytest.mark.parametrize("kw, name", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
])
def test_bad_extension_parameters_are_named(kw, name):
    with pytest.raises(RequestError, match=name):
        _params(**kw)


def test_logit_bias_key_outside_the_vocabulary(tiny_engine):
    with pytest.raises(RequestError, match="logit_bias"):
        tiny_engine.generate("x", max_new_tokens=1, logit_bias={10**7: 1.0})


def test_logprobs_of_generated_tokens_match_full_sequence_logits(tiny_engine_fp32):
    eng = tiny_engine_fp32
    prompt = eng.tokenizer.encode("The logprobs of a few tokens")
    r = eng.generate(prompt, max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    assert len(r.logprobs) == len(r.token_ids) == 6
    ids = prompt + r.token_ids
    full = torch.log_softmax(eng.logits(ids)[:, :len(eng.tokenizer)].float(), dim=-1)
    for i, lp in enumerate(r.logprobs):
        row = full[len(prompt) - 1 + i]
        assert lp.token_id == r.token_ids[i]
        assert math.isclose(lp.logprob, float(row[lp.token_id]), abs_tol=1e-4)
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id      # greedy: the top one
        assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
    # Off by default; 0 = the chosen token only.
    assert eng.generate(prompt, max_new_tokens=2).logprobs is None
    r0 = eng.generate(prompt, max_new_tokens=2, logprobs=0, seed=3)
    assert len(r0.logprobs) == len(r0.token_ids) and all(lp.top == [] for lp in r0.logprobs)


def test_prompt_logprobs(tiny_engine_fp32):
    eng = tiny_engine_fp32
    ids = eng.tokenizer.encode("Prompt logprobs score every token after the first.")
    out = eng.prompt_logprobs(ids, top_logprobs=2)
    assert len(out) == len(ids) and out[0] is None
    full = torch.log_softmax(eng.logits(ids)[:, :len(eng.tokenizer)].float(), dim=-1)
    for i in range(1, len(ids)):
        assert out[i].token_id == ids[i]
        assert math.isclose(out[i].logprob, float(full[i - 1, ids[i]]), abs_tol=1e-4)
        assert [t for t, _ in out[i].top] == torch.topk(full[i - 1], 2).indices.tolist()
    assert eng.prompt_logprobs(ids[:1]) == [None]
    with pytest.raises(RequestError, match="top_logprobs"):
        eng.prompt_logprobs(ids, top_logprobs=50)


def test_token_logprobs_helper_masks_padding_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0, 50.0]])
    (lp,) = token_logprobs(logits, [2], 2, valid_vocab=3)
    want = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    assert math.isclose(lp.logprob, float(want[2]), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [2, 1]


def test_streams_submit_together_and_match_generate(tiny_engine):
    prompts = ["first prompt", "a second, longer prompt", [1, 2, 3, 4]]
    want = [tiny_engine.generate(p, max_new_tokens=4, temperature=0).token_ids for p in prompts]
    streams = tiny_engine.streams(prompts, max_new_tokens=4, temperature=0)
    for s in streams:
        list(s)
    assert [s.result.token_ids for s in streams] == want
    # One parameter set per prompt.
    streams = tiny_engine.streams(prompts[:2], params=[{"max_new_tokens": 1}, {"max_new_tokens": 3}],
                                  temperature=0, ignore_eos=True)
    for s in streams:
        list(s)
    assert [len(s.result.token_ids) for s in streams] == [1, 3]
    with pytest.raises(RequestError, match="params has 1 entries for 2 prompts"):
        tiny_engine.streams(prompts[:2], params=[{}])
    with pytest.raises(RequestError, match="prompts"):
        tiny_engine.streams([])


def test_extensions_stay_finite_in_the_float64_fallback():
    """A repetition penalty that overflows bf16 sends sampling to the float64 fallback; the
    extensions must not round its scores through fp32 (inf) there (found by the fuzz test)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g).to(torch.bfloat16)
    history = torch.tensor([1, 2, 3, 4])
    for kw in (dict(presence_penalty=2.0), dict(logit_bias={5: 1.0}), dict(frequency_penalty=-2.0)):
        p = _params(repetition_penalty=1e-300, **kw)
        tok = sample_next(logits, history, p, torch.Generator().manual_seed(1), output=history[2:])
        assert 0 <= tok < 64
