"""The trained fixture (qwen_fast/fixture.py): the held-out rule, the bucketed output layer's
exact export (the checkpoint's NLL over the full vocabulary is the trained model's), a micro
training run that learns something and is deterministic, the never-seen row, and the seeded
induction circuit (it copies before training; its entries are held)."""
import math

import numpy as np
import pytest
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


def test_micro_training_is_deterministic():
    a = FX.fit(FX.Settings(micro=True, steps=6), log=lambda m: None)[1]
    b = FX.fit(FX.Settings(micro=True, steps=6), log=lambda m: None)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_settings_overrides_are_checked():
    s = FX.Settings(micro=True, own="512", seed_copy="0", lr="1e-3")
    assert (s.own, s.seed_copy, s.lr) == (512, False, 1e-3)
    assert s.name != FX.Settings(micro=True).name
    with pytest.raises(ValueError, match="unknown fixture setting 'owns'"):
        FX.Settings(owns=3)


def test_never_seen_ids_share_one_row_that_only_goes_down():
    train = np.array([5, 6, 7, 5, 5, 6, 9, 10, 11], dtype=np.int32)
    v = FX.Vocab(train, 40, own=2, buckets=3)
    assert v.rows == 2 + 3 + 1
    assert sorted(v.row[[5, 6]]) == [0, 1]                   # the two most frequent
    assert all(2 <= v.row[i] < 5 for i in (7, 9, 10, 11))    # seen, shared by id % 3
    unseen = [i for i in range(40) if i not in (5, 6, 7, 9, 10, 11)]
    assert set(v.row[unseen]) == {5}
    assert math.isclose(float(v.log_n[5]), math.log(len(unseen)), rel_tol=1e-6)


def test_seeded_copying_copies_before_training_and_is_held():
    s = FX.Settings(micro=True, layers=2, hidden=256, seq=128, own=512, seed_copy="1", steps=3)
    cfg = FX._config(s.layers, s.hidden, s.seq)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 3000, 20000).astype(np.int32)
    vocab = FX.Vocab(train, cfg.vocab_size, s.own, s.buckets)
    p = FX._params(cfg, vocab.rows, vocab.emb_rows, 0)
    held = FX.seed_copying(cfg, p, vocab, torch.Generator().manual_seed(1))
    ids = torch.from_numpy(train[:4 * 128].reshape(4, 128).astype(np.int64))
    ids[:, 80:112] = ids[:, 10:42]
    with torch.no_grad():
        nll = FX.forward_nll(cfg, p, vocab, ids)
    first, again = float(nll[:, 10:41].mean()), float(nll[:, 80:111].mean())
    assert again < first - 3.0, (first, again)               # the repeat is predicted
    # A training step changes the weights but not the held entries.
    before = {k: p[k].detach().clone() for k in held}
    w1 = p["transformer.h.1.mlp.w1.weight"].detach().clone()
    opt = torch.optim.AdamW(list(p.values()), lr=1e-2, weight_decay=0.0)     # as fit()
    FX.forward_nll(cfg, p, vocab, ids).mean().backward()
    for k, m in held.items():
        p[k].grad[m] = 0
    opt.step()
    for k, m in held.items():
        assert torch.equal(p[k].detach()[m], before[k][m]), k
    assert not torch.equal(p["transformer.h.1.mlp.w1.weight"].detach(), w1)
