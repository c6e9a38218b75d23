"""GPTQ calibration of a checkpoint (qwen_fast/calibrate.py, quantize --method gptq): the
calibration forward is the model's, and the calibrated checkpoint loads and stays closer to the
dense model than round-to-nearest does, on the calibration text and on held-out text."""
import json

import pytest
import torch

from qwen_fast import Engine
from qwen_fast.calibrate import block_forward, calibration_ids, rope_tables
from qwen_fast.cli import main
from qwen_fast.quant import quantize_checkpoint
from qwen_fast.reference import rms_norm
from qwen_fast.testing import random_state_dict, tiny_config, write_checkpoint

CFG = tiny_config(hidden_size=128, num_attention_heads=4, kv_channels=32, intermediate_size=512,
                  seq_length=64, max_position_embeddings=64)
def _text(seed, words=900):
    """Text from one distribution (random words of a fixed list), a sample per seed."""
    import random
    rng = random.Random(seed)
    vocab = ("def class return self import from for while if else elif try except with as "
             "lambda yield print range len list dict set tuple int str float None True False "
             "open read write value key item index count total name path file data line text "
             "error result number point x y z a b c i j k the of and to in is that it was for on "
             "are as with his they at be this have from or one had by word but not what all were "
             "we when your can said there use an each which she do how their if will up other "
             "about out many then them these so some her would make like him into time has look "
             "two more write go see way could people my than first water been call who oil its "
             "now find long down day did get come made may part").split()
    return " ".join(rng.choice(vocab) + ("\n" if rng.random() < 0.1 else "") for _ in range(words))


TRAIN, HELD = _text(1), _text(2)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal") / "Qwen-cal"
    write_checkpoint(d, CFG, random_state_dict(CFG, torch.float32, seed=3), shards=1)
    return d


def test_calibration_forward_is_the_models(dense):
    eng = Engine.from_pretrained(dense, dtype="float32", backend="reference")
    sd = random_state_dict(CFG, torch.float32, seed=3)
    ids = torch.tensor([eng.tokenizer.encode(TRAIN)[:40]])
    h = sd["transformer.wte.weight"][ids]
    rope = rope_tables(CFG, ids.shape[1])
    for li in range(CFG.num_hidden_layers):
        p = f"transformer.h.{li}."
        h = block_forward(CFG, {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, h, rope)
    logits = rms_norm(h, sd["transformer.ln_f.weight"], CFG.layer_norm_epsilon) @ sd["lm_head.weight"].T
    want = eng.logits(ids[0].tolist())
    assert torch.allclose(logits[0], want, atol=2e-4, rtol=1e-4)


def test_forward_until_a_linear_collects_what_the_full_forward_does():
    sd = random_state_dict(CFG, torch.float32, seed=3)
    L = {k[len("transformer.h.0."):]: v for k, v in sd.items() if k.startswith("transformer.h.0.")}
    h = torch.randn(2, 16, CFG.hidden_size)
    rope = rope_tables(CFG, 16)
    full = {}
    assert block_forward(CFG, L, h, rope, lambda n, x: full.setdefault(n, x)) is not None
    order = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.c_proj"]
    for k, until in enumerate(order):
        got = {}
        assert block_forward(CFG, L, h, rope, lambda n, x: got.setdefault(n, x), until=until) is None
        want = order[:k + 1] + (["mlp.w2"] if k >= 2 else [])
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[n], full[n]) for n in got)


def test_calibration_windows(dense):
    tok = Engine.from_pretrained(dense, dtype="float32", backend="reference").tokenizer
    a = calibration_ids(tok, TRAIN, 4, 16, seed=1)
    b = calibration_ids(tok, TRAIN, 4, 16, seed=1)
    assert a.shape == (4, 16) and torch.equal(a, b)
    all_ = calibration_ids(tok, TRAIN, 10**6, 16)
    assert torch.equal(all_.flatten(), torch.tensor(tok.encode(TRAIN)[:all_.numel()]))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_ids(tok, "hi", 4, 16)


def _mse(eng, ref, text):
    ids = ref.tokenizer.encode(text)[:60]
    return float((eng.logits(ids) - ref.logits(ids)).pow(2).mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_beats_rtn(dense, tmp_path, act_order):
    cal = tmp_path / "cal.txt"
    cal.write_text(TRAIN)
    g = quantize_checkpoint(dense, tmp_path / "gptq", bits=4, group_size=-1, progress=False,
                            method="gptq", calibration=str(cal), samples=16, seq_len=64,
                            act_order=act_order)
    r = quantize_checkpoint(dense, tmp_path / "rtn", bits=4, group_size=-1, progress=False)
    qc = json.loads((g / "quantize_config.json").read_text())
    assert qc["desc_act"] is act_order and qc["bits"] == 4
    ref = Engine.from_pretrained(dense, dtype="float32", backend="reference")
    eg = Engine.from_pretrained(g, dtype="float32", backend="reference")
    er = Engine.from_pretrained(r, dtype="float32", backend="reference")
    on_cal = (_mse(eg, ref, TRAIN), _mse(er, ref, TRAIN))
    held = (_mse(eg, ref, HELD), _mse(er, ref, HELD))
    assert on_cal[0] < 0.8 * on_cal[1], on_cal
    assert held[0] < held[1], held


def test_cli_gptq_options(dense, tmp_path, capsys):
    cal = tmp_path / "cal.txt"
    cal.write_text(TRAIN)
    assert main(["quantize", str(dense), str(tmp_path / "a"), "--bits", "4", "--group-size", "-1",
                 "--method", "gptq"]) == 2
    assert "needs a calibration text file" in capsys.readouterr().err
    assert main(["quantize", str(dense), str(tmp_path / "b"), "--bits", "4", "--group-size", "-1",
                 "--calibration", str(cal)]) == 2
    assert "are for --method gptq" in capsys.readouterr().err
    assert main(["quantize", str(dense), str(tmp_path / "c"), "--bits", "8", "--group-size", "-1",
                 "--method", "gptq", "--calibration", str(cal), "--samples", "8",
                 "--seq-len", "32"]) == 0
    assert (tmp_path / "c" / "quantize_config.json").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
