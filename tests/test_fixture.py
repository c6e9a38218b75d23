"""The trained fixture (qwen_fast/fixture.py): the held-out rule, the bucketed output layer's
exact export (the checkpoint's NLL over the full vocabulary is the trained model's), and a micro
training run that learns something."""
import math

import torch

from qwen_fast import Engine
from qwen_fast import fixture as FX


def test_held_out_rule_is_fixed_and_about_a_tenth():
    files = FX.stdlib_files()
    assert len(files) > 500 and all(not r.startswith("site-packages") for r, _ in files)
    share = sum(FX.held_out(r) for r, _ in files) / len(files)
    assert 0.06 < share < 0.14
    assert FX.held_out("os.py") == (__import__("hashlib").sha1(b"os.py").digest()[0] % 10 == 0)


def test_micro_fixture_trains_and_exports_exactly(tmp_path):
    s = FX.Settings(micro=True)
    logs = []
    cfg, p, vocab = FX.fit(s, log=logs.append)
    first, last = (float(l.split("loss ")[1].split(",")[0]) for l in (logs[1], logs[-1]))
    assert last < first - 1.0, logs                      # it learned something
    FX.export(cfg, p, vocab, tmp_path / "m", s)
    eng = Engine.from_pretrained(tmp_path / "m", dtype="float32", backend="reference")
    tok = eng.tokenizer
    ids = tok.encode("import os\nimport sys\n\ndef main(argv):\n    return 0\n")[:48]
    with torch.no_grad():
        want = FX.forward_nll(cfg, {k: v.detach().float() for k, v in p.items()}, vocab,
                              torch.tensor([ids]))[0]
    got = -torch.tensor([lp.logprob for lp in eng.prompt_logprobs(ids)[1:]], dtype=torch.float32)
    assert torch.allclose(got, want.float(), atol=2e-3, rtol=1e-3), (got - want).abs().max()
    # Over the full vocabulary, bucket members included: an unseen id's probability is its
    # bucket's share, well below uniform.
    assert math.exp(-float(got.mean())) < len(tok) / 10
