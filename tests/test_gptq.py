"""GPTQ checkpoints end to end: tiny checkpoints written in the release's v1 layout from known
quantized weights (int4 and int8, symmetric and asymmetric, one with act-order's non-trivial
g_idx), loaded with Engine.from_pretrained like a bf16 one.

- The reference backend must give the dense reference's logits on the dequantized weights
  (a dense fp32 checkpoint of exactly those weights), fp32, within 1e-5 relative.
- The native backend quantizes activations to int8 per 128-chunk (tests/test_quant_linear.py
  bounds each output). Through a model that error is mixed by the norms and attention, so the
  model-level check is statistical, on these fixed seeds: the mean |logit difference| to the
  reference backend is below 6% of the logits' standard deviation (measured: 3.3% int4, 2.8%
  int8 - an order of magnitude below what quantizing the weights themselves moves them, 45% of
  it for int4), and the teacher-forced top-1 token agrees on at least 34 of 40 positions
  (measured 35 and 37: a random tiny model's logits have many near-ties).
- Malformed GPTQ checkpoints get errors naming the tensor or field.
"""
from __future__ import annotations

import json

import pytest
import torch

from qwen_fast import Engine, ops
from qwen_fast.errors import CheckpointError, ConfigError
from qwen_fast.loader import expected_shapes
from qwen_fast.gptq import QUANTIZED_LINEARS, dequantize_gptq, pack_gptq
from qwen_fast.qweight import QuantWeight
from qwen_fast.testing import random_state_dict, tiny_config, write_checkpoint

CFG = dict(hidden_size=128, num_attention_heads=4, kv_channels=32, intermediate_size=512)
IDS = list(range(100, 140))


def _gptq_state(cfg, bits, sym, act_order, seed):
    """(GPTQ state dict as the release stores it, dense fp32 state dict of its dequantized
    weights)."""
    g = torch.Generator().manual_seed(seed)
    sd = {n: t.half() for n, t in random_state_dict(cfg, torch.float32, seed=seed).items()}
    dense = {n: t.float() for n, t in sd.items()}        # the fp16 values the checkpoint holds
    for i in range(cfg.num_hidden_layers):
        for lin in QUANTIZED_LINEARS:
            base = f"transformer.h.{i}.{lin}"
            n, k = dense.pop(base + ".weight").shape
            del sd[base + ".weight"]
            G = k // 128
            q = torch.randint(0, 2 ** bits, (n, k), generator=g)
            mid = 2 ** (bits - 1)
            zeros = (torch.full((G, n), mid) if sym
                     else torch.randint(1, 2 ** bits + 1, (G, n), generator=g))
            # scales giving weights of the size random_state_dict draws
            scales = (torch.rand(G, n, generator=g) * 0.04 / mid + 0.002 / mid).half()
            g_idx = torch.arange(k) // 128
            if act_order:
                g_idx = g_idx[torch.randperm(k, generator=g)]
            parts = pack_gptq(q, zeros, scales, g_idx.to(torch.int32), bits)
            for name, t in parts.items():
                sd[f"{base}.{name}"] = t
            if lin != "attn.c_attn":
                sd[base + ".bias"] = torch.zeros(n, dtype=torch.float16)
            dense[base + ".weight"] = dequantize_gptq(parts["qweight"], parts["qzeros"],
                                                      parts["scales"], parts["g_idx"], bits)
    return sd, dense


def _write(path, bits, sym=True, act_order=False, seed=0, state=None):
    qc = {"bits": bits, "group_size": 128, "damp_percent": 0.01, "desc_act": act_order,
          "static_groups": False, "sym": sym, "true_sequential": True,
          "model_name_or_path": None, "model_file_base_name": "model"}
    cfg = tiny_config(**CFG, quantization_config={**qc, "quant_method": "gptq"})
    sd, dense = _gptq_state(cfg, bits, sym, act_order, seed) if state is None else (state, None)
    write_checkpoint(path, cfg, sd, shards=1)
    (path / "quantize_config.json").write_text(json.dumps(qc))
    return path, dense


@pytest.fixture(scope="module")
def dense_cfg():
    return tiny_config(**CFG)


VARIANTS = [pytest.param(4, True, False, id="int4_sym"), pytest.param(4, False, False, id="int4_asym"),
            pytest.param(8, True, False, id="int8_sym"), pytest.param(8, False, False, id="int8_asym"),
            pytest.param(4, True, True, id="int4_act_order")]


@pytest.mark.parametrize("bits,sym,act_order", VARIANTS)
def test_gptq_checkpoint_loads_and_matches_the_dense_reference(tmp_path, dense_cfg, bits, sym,
                                                                act_order):
    path, dense = _write(tmp_path / "q", bits, sym, act_order)
    write_checkpoint(tmp_path / "dense", dense_cfg, dense, shards=1)
    want = Engine.from_pretrained(tmp_path / "dense", dtype="float32", backend="reference").logits(IDS)
    ref = Engine.from_pretrained(path, dtype="float32", backend="reference")
    w = ref.model.layers[0]["mlp.c_proj.weight"]      # K = 256: two groups, so act-order permutes
    assert isinstance(w, QuantWeight) and w.bits == bits and (w.perm is not None) == act_order
    got = ref.logits(IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if not ops.HAVE_C:
        return
    nat = Engine.from_pretrained(path, dtype="float32", backend="auto").logits(IDS)
    diff = float((nat - got).abs().mean()) / float(got.std())
    agree = int((nat.argmax(-1) == got.argmax(-1)).sum())
    assert diff < 0.06, diff
    assert agree >= 34, agree


def test_gptq_model_decodes_and_bf16_runs(tmp_path):
    path, _ = _write(tmp_path / "q", 4)
    e = Engine.from_pretrained(path, dtype="bfloat16")
    r = e.generate(IDS[:8], max_new_tokens=6, temperature=0, ignore_eos=True)
    assert len(r.token_ids) == 6
    e16 = Engine.from_pretrained(path, dtype="float16")       # the release's Int4 runs in fp16
    assert len(e16.generate(IDS[:8], max_new_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3


def test_lm_head_quantized_at_load(tiny_ckpt):
    dense = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference")
    for kind, bits in (("int8", 8), ("int4", 4)):
        e = Engine.from_pretrained(tiny_ckpt, dtype="float32", backend="reference", lm_head_quant=kind)
        assert isinstance(e.model.lm_head, QuantWeight) and e.model.lm_head.bits == bits
        assert isinstance(e.model.wte, torch.Tensor)            # the embedding stays dense
        # read and quantized a block of rows at a time: the same bytes as at once
        whole = QuantWeight.quantize(dense.model.lm_head, bits)
        assert torch.equal(e.model.lm_head.data, whole.data)
        blocks = QuantWeight.quantize_rows(lambda r0, r1: dense.model.lm_head[r0:r1],
                                           *dense.model.lm_head.shape, bits, block_rows=1000)
        assert torch.equal(blocks.data, whole.data)
        a, b = dense.logits(IDS), e.logits(IDS)
        assert float((a - b).abs().mean()) < (0.02 if bits == 8 else 0.3) * float(a.std())


def test_dummy_weights_quantized_as_drawn(dense_cfg):
    e = Engine.from_pretrained(load_format="dummy", config=dense_cfg, quant="int8",
                               lm_head_quant="int4")
    assert all(isinstance(e.model.layers[i][f"{lin}.weight"], QuantWeight)
               for i in range(dense_cfg.num_hidden_layers) for lin in QUANTIZED_LINEARS)
    assert len(e.generate(IDS[:4], max_new_tokens=3, temperature=0, ignore_eos=True).token_ids) == 3
    with pytest.raises(ConfigError, match=r"quant must be None, 'int4' or 'int8', got 'int3'"):
        Engine.from_pretrained(load_format="dummy", config=dense_cfg, quant="int3")


def _broken(tmp_path, change, bits=4):
    """A valid int4 state dict with `change(sd)` applied, written as a checkpoint."""
    cfg = tiny_config(**CFG)
    sd, _ = _gptq_state(cfg, bits, True, False, 0)
    change(sd)
    return _write(tmp_path / "bad", bits, state=sd)[0]


L0 = "transformer.h.0."


@pytest.mark.parametrize("change,error", [
    pytest.param(lambda sd: sd.pop(L0 + "mlp.w1.qzeros"),
                 r"missing tensor 'transformer.h.0.mlp.w1.qzeros'.*\(GPTQ, 4 bits, group 128\)",
                 id="missing_qzeros"),
    pytest.param(lambda sd: sd.update({L0 + "attn.c_proj.qweight": torch.zeros(15, 128, dtype=torch.int32)}),
                 r"GPTQ tensor 'transformer.h.0.attn.c_proj.qweight' .* has shape \[15, 128\], "
                 r"expected \[16, 128\]", id="qweight_shape"),
    pytest.param(lambda sd: sd.update({L0 + "mlp.w2.scales": sd[L0 + "mlp.w2.scales"].float()}),
                 r"GPTQ tensor 'transformer.h.0.mlp.w2.scales' .* has dtype F32, expected F16",
                 id="scales_dtype"),
    pytest.param(lambda sd: sd.update({L0 + "mlp.w1.bias": torch.ones(256, dtype=torch.float16)}),
                 r"transformer.h.0.mlp.w1.bias is not zero", id="nonzero_bias"),
    pytest.param(lambda sd: sd.update({L0 + "mlp.w1.weight": torch.zeros(256, 128)}),
                 r"unexpected tensor 'transformer.h.0.mlp.w1.weight'", id="dense_weight_too"),
])
def test_malformed_gptq_checkpoints_are_named(tmp_path, change, error):
    path = _broken(tmp_path, change)
    with pytest.raises(CheckpointError, match=error):
        Engine.from_pretrained(path, dtype="float32")


def test_bad_quantize_configs(tmp_path):
    path, _ = _write(tmp_path / "q", 4)
    qc = json.loads((path / "quantize_config.json").read_text())
    (path / "quantize_config.json").write_text(json.dumps({**qc, "bits": 3}))
    with pytest.raises(ConfigError, match=r"bits"):
        Engine.from_pretrained(path)
    (path / "quantize_config.json").write_text(json.dumps({**qc, "group_size": 96}))
    cfgj = json.loads((path / "config.json").read_text())
    cfgj["quantization_config"]["group_size"] = 96
    (path / "config.json").write_text(json.dumps(cfgj))
    with pytest.raises(CheckpointError, match=r"not a multiple of group_size 96"):
        Engine.from_pretrained(path)


def test_groups_of_64_are_refused_by_name(tmp_path):
    """A group size that divides K but splits the kernel's 128-input chunks."""
    cfg = tiny_config(**CFG)
    g = torch.Generator().manual_seed(0)
    sd = {n: t.half() for n, t in random_state_dict(cfg, torch.float32).items()}
    qc = {"bits": 4, "group_size": 64, "desc_act": False, "sym": True}
    for i in range(cfg.num_hidden_layers):
        for lin in QUANTIZED_LINEARS:
            base = f"transformer.h.{i}.{lin}"
            n, k = sd.pop(base + ".weight").shape
            parts = pack_gptq(torch.randint(0, 16, (n, k), generator=g), torch.full((k // 64, n), 8),
                              torch.full((k // 64, n), 0.01).half(),
                              (torch.arange(k) // 64).to(torch.int32), 4)
            sd.update({f"{base}.{p}": t for p, t in parts.items()})
    write_checkpoint(tmp_path / "g64", tiny_config(**CFG, quantization_config={**qc, "quant_method": "gptq"}),
                     sd, shards=1)
    with pytest.raises(CheckpointError, match=r"transformer.h.0.attn.c_attn: the kernel needs groups "
                                              r"of whole 128-input chunks .* hold \[64\] inputs"):
        Engine.from_pretrained(tmp_path / "g64")


def test_quant_at_load_of_a_dense_checkpoint(tiny_ckpt, tmp_path):
    """quant= quantizes a dense checkpoint's layers at load (RTN); refused for a GPTQ one."""
    from qwen_fast.qweight import QuantWeight
    eng = Engine.from_pretrained(tiny_ckpt, quant="int4", dtype="float32")
    w = eng.model.layers[0]["mlp.w1.weight"]
    assert isinstance(w, QuantWeight) and w.bits == 4
    dense = Engine.from_pretrained(tiny_ckpt, dtype="float32")
    ids = eng.tokenizer.encode("quantized at load")
    a, b = eng.logits(ids), dense.logits(ids)
    # int4 RTN of random weights moves the logits, but they stay the dense model's
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 0.35, rel
    q = quantize_checkpoint_for(tmp_path, tiny_ckpt)
    with pytest.raises(ConfigError, match=r"quant='int8': this checkpoint is already quantized"):
        Engine.from_pretrained(q, quant="int8")
    assert set(expected_shapes(tiny_config(**CFG))) >= {L0 + "mlp.w1.weight"}


def quantize_checkpoint_for(tmp_path, src):
    from qwen_fast.quant import quantize_checkpoint
    return quantize_checkpoint(src, tmp_path / "q", bits=4, group_size=-1, progress=False)


def test_gptq_embedding_mapped_from_the_file_is_still_checked(tmp_path):
    """In the file's dtype (fp16) the embedding stays memory-mapped (only looked-up rows become
    resident); it is still checked for NaN/Inf, and still right."""
    cfg = tiny_config(**CFG)
    sd, dense = _gptq_state(cfg, 4, True, False, 0)
    path = _write(tmp_path / "ok", 4, state=dict(sd))[0]
    e = Engine.from_pretrained(path, dtype="float16")
    assert torch.equal(e.model.wte, sd["transformer.wte.weight"])
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"].clone()
    sd["transformer.wte.weight"][5, 3] = float("nan")
    bad = _write(tmp_path / "bad", 4, state=sd)[0]
    with pytest.raises(CheckpointError, match=r"'transformer.wte.weight' .* 1 non-finite values"):
        Engine.from_pretrained(bad, dtype="float16")
