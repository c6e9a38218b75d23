"""Prompt-lookup speculation's parts (qwen_fast/speculative.py): drafts against a brute-force
search, the acceptance rule's exactness (same tokens and generator state as plain decoding, for
greedy and seeded sampling, with stops), the switch, and bad settings."""
import random

import pytest
import torch

from qwen_fast.errors import RequestError
from qwen_fast.speculative import NgramIndex, SpeculationSwitch, SpeculativeConfig, accept


def _brute(tokens, k, n_min, n_max):
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        for end in range(L - 1, n - 1, -1):           # latest earlier occurrence first
            if tokens[end - n:end] == suffix:
                return tokens[end:end + k]
    return []


def test_drafts_follow_the_latest_earlier_occurrence():
    idx = NgramIndex(1, 3, [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    assert idx.propose(4) == [7, 8, 4, 1]             # after the latest earlier "1 2 3"
    idx.extend([7])
    assert idx.propose(2) == [8, 4]                   # "2 3 7"
    assert NgramIndex(1, 3, [1, 2, 3]).propose(4) == []
    assert NgramIndex(1, 3, [4, 4]).propose(3) == [4]  # overlapping: the period continues
    assert NgramIndex(2, 3, [1, 2, 9, 5, 2]).propose(3) == []   # only a 1-gram recurs


@pytest.mark.parametrize("seed", range(6))
def test_incremental_index_matches_a_brute_force_search(seed):
    rng = random.Random(seed)
    n_min, n_max, k = rng.choice([(1, 4), (2, 3), (1, 1), (3, 5)]) + (rng.randint(1, 8),)
    tokens = [rng.randrange(6) for _ in range(300)]
    idx = NgramIndex(n_min, n_max, tokens[:5])
    pos = 5
    while pos < len(tokens):
        assert idx.propose(k) == _brute(tokens[:pos], k, n_min, n_max), pos
        step = rng.randint(1, 4)
        idx.extend(tokens[pos:pos + step])
        pos += step


def _plain_decode(logits_fn, gen, n, stop=None):
    """One token at a time: the reference that speculation must reproduce."""
    out = []
    for _ in range(n):
        p = torch.softmax(logits_fn(out), -1)
        t = int(torch.multinomial(p, 1, generator=gen))
        out.append(t)
        if stop is not None and t == stop:
            break
    return out


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_accept_reproduces_plain_decoding_and_its_generator(greedy, seed):
    V, n = 12, 40
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3

    def logits_fn(history):          # a toy model: the next token depends on the last one
        return table[history[-1] if history else 0]

    def sampler(gen):
        def sample(history):
            if greedy:
                return int(torch.argmax(logits_fn(history)))
            return int(torch.multinomial(torch.softmax(logits_fn(history), -1), 1, generator=gen))
        return sample

    g_plain = torch.Generator().manual_seed(100 + seed)
    want = [] if greedy else None
    if greedy:
        s = sampler(None)
        for _ in range(n):
            want.append(s(want))
    else:
        want = _plain_decode(logits_fn, g_plain, n)
    # Speculative: drafts from prompt lookup over the output so far (often wrong), verified.
    g_spec = torch.Generator().manual_seed(100 + seed)
    s = sampler(g_spec)
    out, steps = [], 0
    idx = NgramIndex(1, 2, [])
    while len(out) < n:
        draft = idx.propose(min(4, n - len(out) - 1)) if len(out) < n - 1 else []
        # Row i of a verify forward sees the draft's first i tokens, not what was sampled.
        got = accept(draft, lambda i, acc: s(out + list(draft[:i])),
                     done=lambda toks: len(out) + len(toks) >= n)
        out += got
        idx.extend(got)
        steps += 1
    assert out == want
    if not greedy:                   # the generator advanced exactly as plain decoding's
        assert torch.equal(g_spec.get_state(), g_plain.get_state())
    assert steps <= n


def test_accept_stops_where_plain_decoding_stops():
    seq = [3, 4, 5, 0, 6, 7]
    got = accept([3, 4, 5, 0, 6], lambda i, acc: seq[len(acc)], done=lambda toks: toks[-1] == 0)
    assert got == [3, 4, 5, 0]
    assert accept([9, 9], lambda i, acc: 1) == [1]                 # first token rejected
    assert accept([], lambda i, acc: 2) == [2]                     # no draft: a plain step
    assert accept([1, 2], lambda i, acc: [1, 2, 8][i]) == [1, 2, 8]   # all kept, plus one


def test_switch_turns_off_where_drafts_fail_and_backs_off():
    sw = SpeculationSwitch(min_accept=1.0, warmup=2, backoff=4, max_backoff=16)
    assert sw.should_draft()
    sw.record(8, 0)
    assert sw.should_draft()                                        # still warming up
    sw.record(8, 0)
    assert [sw.should_draft() for _ in range(5)] == [False] * 4 + [True]
    sw.record(8, 0)
    sw.record(8, 1)                                                 # 0.3 on average: still low
    assert [sw.should_draft() for _ in range(9)] == [False] * 8 + [True]   # backoff doubled
    sw.record(8, 6)
    sw.record(8, 7)
    assert sw.should_draft() and sw.backoff == 4                    # paying again: reset
    assert (sw.drafts, sw.accepted) == (48, 14)


@pytest.mark.parametrize("kw, param", [
    (dict(method="eagle"), "speculative"),
    (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(num_speculative_tokens=True), "num_speculative_tokens"),
    (dict(ngram_max=0), "ngram_max"),
    (dict(ngram_min=3, ngram_max=2), "ngram_min"),
])
def test_bad_settings_are_refused_by_name(kw, param):
    with pytest.raises(RequestError) as e:
        SpeculativeConfig(**kw)
    assert e.value.param == param and param in str(e.value)
