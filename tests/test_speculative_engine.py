"""Prompt-lookup speculation through the engine (issue 19): the output is the same as plain
decoding's, token for token (and logprob for logprob), for greedy and seeded sampling, with the
repetition penalty, stops, max_new_tokens and dynamic NTK; a k-token verify gives each row the
bits a 1-token step gives it; the switch stops drafting for a sequence whose drafts fail."""
import pytest
import torch

from qwen_fast import Engine
from qwen_fast.errors import RequestError
from qwen_fast.request import Request
from qwen_fast.sampling import SamplingParams
from qwen_fast.speculative import SequenceSpeculation, SpeculativeConfig
from qwen_fast.testing import PagedBatch, tiny_config

# seq_length 32: prompts of 48 tokens run at NTK alpha 2, and decode past 32 with logn scaling.
CFG = dict(hidden_size=128, num_attention_heads=2, kv_channels=64, intermediate_size=384)
TEXT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n" * 2


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained(load_format="dummy", config=tiny_config(**CFG), dtype="float32",
                               max_batch_size=4)
    # A sharper model: its random logits scaled up, so that sampling at a low temperature mostly
    # follows the argmax, which loops; prompt lookup then drafts tokens that get accepted.
    e.model.lm_head.mul_(40)
    yield e
    e.close()


CASES = {
    "greedy": dict(temperature=0.0, repetition_penalty=1.0),
    "greedy, penalty": dict(temperature=0.0, repetition_penalty=1.1),
    "seeded top-p": dict(temperature=0.1, seed=5, top_p=0.9, repetition_penalty=1.0,
                         presence_penalty=0.1),
    "seeded top-k, penalty, logprobs": dict(temperature=0.2, seed=3, top_k=5,
                                            repetition_penalty=1.05, logprobs=2),
}


def _same(a, b):
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.finish_reason == b.finish_reason and a.stop_reason == b.stop_reason
    assert a.logprobs == b.logprobs and a.stop_logprob == b.stop_logprob


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 4, 8])
def test_output_is_plain_decodings(engine, case, k):
    ids = engine.tokenizer.encode(TEXT)
    kw = dict(CASES[case], max_new_tokens=60)
    plain = engine.generate(ids, **kw)
    spec = engine.generate(ids, speculative="ngram", num_speculative_tokens=k, **kw)
    _same(plain, spec)
    assert spec.num_accepted_tokens <= spec.num_draft_tokens
    assert plain.num_draft_tokens == 0


def test_drafts_are_accepted_in_these_cases(engine):
    """Not vacuous: the cases above verify drafts and accept some, under greedy and seeded
    sampling alike."""
    ids = engine.tokenizer.encode(TEXT)
    for case in ("greedy", "seeded top-p"):
        r = engine.generate(ids, max_new_tokens=60, speculative="ngram", **CASES[case])
        assert r.num_draft_tokens >= 10 and r.num_accepted_tokens >= 5, case


def test_stops_and_limits_are_exact(engine):
    ids = engine.tokenizer.encode(TEXT)
    kw = dict(CASES["greedy"])
    ref = engine.generate(ids, max_new_tokens=60, **kw)
    loop = ref.token_ids[10:20]
    for extra in (dict(stop_token_ids=[loop[3]]),               # a stop id inside a draft
                  dict(stop=[engine.tokenizer.decode(loop[2:4])]),  # a stop string
                  dict(max_new_tokens=13),                       # the limit inside a draft
                  dict(max_new_tokens=1)):
        args = dict(kw, max_new_tokens=60)
        args.update(extra)
        plain = engine.generate(ids, **args)
        spec = engine.generate(ids, speculative="ngram", num_speculative_tokens=8, **args)
        _same(plain, spec)
    assert len(engine.generate(ids, max_new_tokens=13, speculative="ngram", **kw).token_ids) == 13


def test_a_batch_mixing_speculation_and_plain_requests(engine):
    """Requests with and without drafts, of different k, share steps (their rows verify in
    one forward); each gets what it gets alone."""
    prompts = [TEXT, TEXT[40:] + TEXT, "x = [1, 2, 3, 1, 2, 3, 1, 2,", TEXT[::-1]]
    params = [dict(CASES["greedy"]), dict(CASES["seeded top-p"]), dict(CASES["greedy, penalty"]),
              dict(CASES["seeded top-k, penalty, logprobs"])]
    alone = [engine.generate(p, max_new_tokens=40, **kw) for p, kw in zip(prompts, params)]
    streams = [engine.stream(p, max_new_tokens=40, speculative="ngram" if i % 3 == 0 else None,
                             num_speculative_tokens=[8, 3, 5, 2][i], **kw)
               for i, (p, kw) in enumerate(zip(prompts, params))]
    for s in streams:
        "".join(s)
    for a, s in zip(alone, streams):
        _same(a, s.result)


def _verify_rows(model, kv_dtype=None):
    """Three sequences prefilled, then one step where each verifies a draft (k = 8, 3, 0)
    against the same tokens fed one step at a time: the logits, row for row."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (40, 23, 57)]
    nxt = [torch.randint(100, 5000, (1 + k,), generator=g).tolist() for k in (8, 3, 0)]
    one = PagedBatch(model, 3, 128, page_size=16, kv_dtype=kv_dtype)
    many = PagedBatch(model, 3, 128, page_size=16, seed=1, kv_dtype=kv_dtype)
    one.forward(prompts)
    many.forward(prompts)
    together = many.forward(nxt, all_logits=True)
    steps = [[] for _ in nxt]
    for j in range(max(map(len, nxt))):
        rows = [i for i in range(3) if j < len(nxt[i])]
        out = one.forward([[nxt[i][j]] for i in rows], rows=rows)
        for r, i in enumerate(rows):
            steps[i].append(out[r])
    return [(t, torch.stack(s)) for t, s in zip(together, steps)]


@pytest.mark.parametrize("dtype,quant", [("float32", None), ("bfloat16", "int4"),
                                         ("float16", "int8"), ("bfloat16", None)])
def test_a_verify_gives_each_row_the_bits_of_a_one_token_step(dtype, quant):
    """fp32, and int4/int8 weights in 16 bits, run kernels that give a row the same bits at any
    row count (README, prefix caching); bf16 dense too while a step has at most 96 rows."""
    e = Engine.from_pretrained(load_format="dummy", config=tiny_config(
        hidden_size=256, num_attention_heads=2, kv_channels=128, intermediate_size=1024),
        dtype=dtype, quant=quant, lm_head_quant=quant)
    try:
        for together, steps in _verify_rows(e.model):
            assert torch.equal(together, steps)
    finally:
        e.close()


def test_the_switch_stops_drafts_that_keep_failing():
    """Scheduler level: every draft is rejected at its first token; after the switch's warm-up
    the sequence stops drafting for a while, probes again, and backs off further."""
    from qwen_fast.kv_cache import PagePool
    from qwen_fast.scheduler import Scheduler
    cfg = tiny_config()
    sched = Scheduler(PagePool(cfg, 64, 16, torch.float32))
    r = Request([7] * 10, SamplingParams(), 200)
    r.spec = SequenceSpeculation(SpeculativeConfig(num_speculative_tokens=4), r.prompt_ids)
    r.spec.index.propose = lambda k: [5] * k        # a draft is always there ...
    sched.add(r)
    drafted = []
    for _ in range(120):
        plan = sched.schedule()
        s = plan.seqs[0]
        drafted.append(len(s.draft))
        sched.update(plan, {r: [(6, None)]})       # ... and always wrong
    assert r.spec.drafted == 4 * sum(n > 0 for n in drafted) and r.spec.accepted == 0
    assert r.num_computed == r.num_tokens - 1      # the rejected positions are not counted
    steps = [i for i, n in enumerate(drafted) if n]
    assert steps[:3] == [1, 2, 3]                 # warm-up: three drafts
    assert 4 <= len(steps) <= 12, steps           # without the switch: ~119
    gaps = [b - a for a, b in zip(steps, steps[1:]) if b - a > 1]
    assert gaps[0] >= 16 and gaps[1] >= 2 * gaps[0] - 1       # backing off, doubling


def test_bad_speculation_parameters_are_refused(engine):
    for kw, name in ((dict(speculative="eagle"), "speculative"),
                     (dict(speculative="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
                     (dict(speculative="ngram", ngram_min=3, ngram_max=2), "ngram_min"),
                     (dict(num_speculative_tokens=True), "num_speculative_tokens")):
        with pytest.raises(RequestError) as e:
            engine.generate("hi", max_new_tokens=2, **kw)
        assert e.value.param == name


def test_cli_sets_the_default(tiny_ckpt, capsys):
    from qwen_fast.cli import build_parser, main
    a = build_parser().parse_args(["serve", "--model", "m", "--speculative", "ngram",
                                   "--num-speculative-tokens", "6", "--ngram-max", "3"])
    assert (a.speculative, a.num_speculative_tokens, a.ngram_max) == ("ngram", 6, 3)
    args = ["generate", "--model", str(tiny_ckpt), "--max-new-tokens", "5", "--temperature", "0",
            "--ignore-eos", "--json", "one two one two one two"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args[:1] + ["--speculative", "ngram", "--num-speculative-tokens", "4"] + args[1:]) == 0
    spec = capsys.readouterr().out
    import json
    assert json.loads(spec)["token_ids"] == json.loads(plain)["token_ids"]
    for bad, opt in ((["--num-speculative-tokens", "4"], "--speculative ngram"),
                     (["--speculative", "ngram", "--num-speculative-tokens", "99"],
                      "--num-speculative-tokens")):
        with pytest.raises(SystemExit) as e:
            main(args[:1] + bad + args[1:])
        assert opt in str(e.value)


def test_json_schema_with_speculation(engine):
    """The grammar's state advances only with tokens that are output (each row is sampled after
    the previous one was accepted into it), so a constrained answer is the same too."""
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
              "required": ["a", "b"]}
    args = dict(CASES["greedy"], max_new_tokens=40, json_schema=schema)
    plain = engine.generate(TEXT, **args)
    spec = engine.generate(TEXT, speculative="ngram", **args)
    _same(plain, spec)
    assert spec.num_accepted_tokens >= 1      # drafts were verified under the grammar


def test_drafts_stop_above_speculative_max_batch():
    """Scheduler level: with two sequences decoding, speculative_max_batch=1 drafts for neither,
    2 for both."""
    from qwen_fast.kv_cache import PagePool
    from qwen_fast.scheduler import Scheduler
    for limit, want in ((1, 0), (2, 2), (None, 2)):
        sched = Scheduler(PagePool(tiny_config(), 64, 16, torch.float32), speculative_max_batch=limit)
        reqs = []
        for _ in range(2):
            r = Request([7] * 10, SamplingParams(), 50)
            r.spec = SequenceSpeculation(SpeculativeConfig(num_speculative_tokens=3), r.prompt_ids)
            r.spec.index.propose = lambda k: [5] * k
            sched.add(r)
            reqs.append(r)
        plan = sched.schedule()                     # the prefills
        sched.update(plan, {s.req: [(6, None)] for s in plan.seqs})
        plan = sched.schedule()                     # both decode
        assert sum(bool(s.draft) for s in plan.seqs) == want, limit
    with pytest.raises(Exception, match="speculative_max_batch"):
        Engine.from_pretrained(load_format="dummy", config=tiny_config(), speculative_max_batch=0)
