"""GPTQ v1 format (qwen_fast/gptq.py) and the quantizer (qwen_fast/quant.py): packing against the documented words, round trips,
round-to-nearest error bounds, quantize_config.json reading, quantize_checkpoint and the CLI."""
import json
import math
import os
import signal

import pytest
import torch
from safetensors import safe_open

from qwen_fast import gptq, quant
from qwen_fast.cli import main
from qwen_fast.config import QwenConfig
from qwen_fast.errors import CheckpointError, ConfigError
from qwen_fast.gptq import (QUANTIZED_LINEARS, GptqConfig, dequantize_gptq, gptq_shapes,
                            pack_gptq, quantize_rtn, read_gptq_config, unpack_gptq)
from qwen_fast.loader import expected_shapes
from qwen_fast.quant import quantize_checkpoint
from qwen_fast.safetensors_io import read_safetensors_header
from qwen_fast.testing import random_state_dict, tiny_config, write_checkpoint

# The release's quantize_config.json (Qwen-1_8B-Chat-Int4; qwen-spec.md §1.2).
RELEASE_INT4 = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
                "static_groups": False, "sym": True, "true_sequential": True,
                "model_name_or_path": None, "model_file_base_name": "model"}


def _i32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


# ---- packing ---------------------------------------------------------------------------------

def test_docstring_worked_example():
    n, k = torch.arange(8)[:, None], torch.arange(16)[None]
    q = (k + n) % 16                                   # [N, K]; the docstring's q[k, n]
    zeros = torch.arange(2)[:, None] + torch.arange(8)[None] + 1
    scales = torch.arange(1, 17, dtype=torch.float16).reshape(2, 8) / 4
    g_idx = torch.arange(16, dtype=torch.int32) // 8
    p = pack_gptq(q, zeros, scales, g_idx, bits=4)
    assert p["qweight"].dtype == p["qzeros"].dtype == torch.int32
    words = [[0x76543210, 0x87654321, 0x98765432, 0xA9876543, 0xBA987654, 0xCBA98765,
              0xDCBA9876, 0xEDCBA987],
             [0xFEDCBA98, 0x0FEDCBA9, 0x10FEDCBA, 0x210FEDCB, 0x3210FEDC, 0x43210FED,
              0x543210FE, 0x6543210F]]
    assert p["qweight"].tolist() == [[_i32(w) for w in row] for row in words]
    assert p["qweight"][1, 0] == -19088744 and p["qzeros"][1, 0] == -2023406815
    assert p["qzeros"].tolist() == [[_i32(0x76543210)], [_i32(0x87654321)]]
    assert p["g_idx"].tolist() == [0] * 8 + [1] * 8
    w = dequantize_gptq(**p, bits=4)
    assert w[1, 9] == scales[1, 1].float() * (10 - 3)


def test_eight_bit_bytes_and_symmetric_zero_words():
    q = torch.arange(4 * 8).reshape(4, 8) * 7 % 256    # [N=4, K=8]
    p = pack_gptq(q, torch.full((1, 4), 128), torch.ones(1, 4, dtype=torch.float16),
                  torch.zeros(8, dtype=torch.int32), bits=8)
    assert p["qweight"].shape == (2, 4) and p["qzeros"].tolist() == [[0x7F7F7F7F]]
    for r in range(2):
        for n in range(4):
            expect = sum(int(q[n, 4 * r + j]) << (8 * j) for j in range(4))
            assert p["qweight"][r, n] == _i32(expect)


def test_release_shapes():
    """The Int4 1.8B shapes of qwen-spec.md §3.3."""
    assert gptq_shapes(6144, 2048, 4, 128)["qweight"] == ((256, 6144), torch.int32)
    s = gptq_shapes(2048, 5504, 4, 128)
    assert [s[k][0] for k in ("qweight", "qzeros", "scales", "g_idx")] == \
        [(688, 2048), (43, 256), (43, 2048), (5504,)]
    assert gptq_shapes(5504, 2048, 8, -1)["qzeros"] == ((1, 1376), torch.int32)


@pytest.mark.parametrize("bits,size", [(4, 1.877e9), (8, 2.489e9)])
def test_release_file_size(bits, size):
    """All output tensors of Qwen-1.8B add up to the published file sizes (spec §3.3)."""
    plan = {n: (None, {"shape": list(s)}) for n, s in expected_shapes(QwenConfig()).items()}
    specs = quant._output_specs(plan, GptqConfig(bits, 128, False, True))
    total = sum(math.prod(shape) * dt.itemsize for _, dt, shape in specs)
    assert abs(total / size - 1) < 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_unpack_round_trip(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    n, k = 24, 256
    groups = 1 if group_size == -1 else k // group_size
    top = 1 << bits
    q = torch.randint(0, top, (n, k), generator=g)
    q[0, :2] = torch.tensor([0, top - 1])
    zeros = torch.full((groups, n), top // 2) if sym else \
        torch.randint(1, top + 1, (groups, n), generator=g)
    zeros[0, :2] = torch.tensor([1, top]) if not sym else zeros[0, :2]
    scales = (torch.rand(groups, n, generator=g) + 0.01).half()
    g_idx = torch.arange(k, dtype=torch.int32) // (k // groups)
    p = pack_gptq(q, zeros, scales, g_idx, bits)
    assert {t: (v.shape, v.dtype) for t, v in p.items()} == \
        {t: s for t, s in gptq_shapes(n, k, bits, group_size).items()}
    uq, uz, us, ug = unpack_gptq(**p, bits=bits)
    assert uq.dtype == torch.uint8 and uz.dtype == torch.int16 and ug.dtype == torch.int64
    assert torch.equal(uq.long(), q) and torch.equal(uz.long(), zeros)
    assert torch.equal(us, scales) and torch.equal(ug, g_idx.long())
    w = dequantize_gptq(**p, bits=bits, dtype=torch.float64)
    expect = scales.double()[g_idx.long()].T * (q - zeros[g_idx.long()].T)
    assert torch.equal(w, expect)


def test_act_order_g_idx_round_trips():
    g = torch.Generator().manual_seed(1)
    g_idx = torch.randperm(64, generator=g).to(torch.int32) // 16
    q = torch.randint(0, 16, (8, 64), generator=g)
    p = pack_gptq(q, torch.full((4, 8), 8), torch.ones(4, 8, dtype=torch.float16), g_idx, 4)
    uq, _, _, ug = unpack_gptq(**p, bits=4)
    assert torch.equal(uq.long(), q) and torch.equal(ug, g_idx.long())


def _good(bits=4, n=16, k=64, groups=2):
    return pack_gptq(torch.zeros(n, k, dtype=torch.long), torch.ones(groups, n, dtype=torch.long),
                     torch.ones(groups, n, dtype=torch.float16),
                     torch.arange(k, dtype=torch.int32) // (k // groups), bits)


@pytest.mark.parametrize("change,msg", [
    (dict(qweight=torch.zeros(7, 16, dtype=torch.int32)),
     r"qweight has shape \[7, 16\]; with bits=4 and g_idx of 64 inputs and scales of 16 outputs "
     r"it must be \[8, 16\]"),
    (dict(qweight=torch.zeros(8, 16)), r"qweight must be int32, got torch.float32"),
    (dict(qzeros=torch.zeros(2, 1, dtype=torch.int32)),
     r"qzeros has shape \[2, 1\]; with bits=4 and scales of shape \[2, 16\] it must be \[2, 2\]"),
    (dict(qzeros=torch.zeros(3, 2, dtype=torch.int32)), r"qzeros has shape \[3, 2\]"),
    (dict(scales=torch.ones(2, 16)), r"scales must be a 2-D float16 tensor \[G, N\], got "
                                     r"torch.float32"),
    (dict(scales=torch.ones(2, 12, dtype=torch.float16)),
     r"scales has shape \[2, 12\]; with bits=4 .* N a positive multiple of 8"),
    (dict(g_idx=torch.zeros(8, 8, dtype=torch.int32)), r"g_idx must be a 1-D integer tensor"),
    (dict(g_idx=torch.zeros(64)), r"g_idx must be a 1-D integer tensor \[K\], got torch.float32"),
    (dict(g_idx=torch.zeros(60, dtype=torch.int32)), r"g_idx has 60 inputs; with bits=4 K must "
                                                     r"be a positive multiple of 8"),
    (dict(g_idx=torch.full((64,), 2, dtype=torch.int32)),
     r"g_idx values must be group indices \(scales has 2 groups\) in \[0, 1\], got values in "
     r"\[2, 2\]"),
    (dict(g_idx=torch.full((64,), -1, dtype=torch.int32)), r"g_idx values must be group indices"),
    (dict(bits=3), r"bits must be 4 or 8, got 3"),
    (dict(bits=8), r"qweight has shape \[8, 16\]; with bits=8 .* must be \[16, 16\]"),
])
def test_unpack_rejects(change, msg):
    args = {**_good(), "bits": 4, **change}
    with pytest.raises(ValueError, match=msg):
        unpack_gptq(**args)


@pytest.mark.parametrize("change,msg", [
    (dict(q=torch.full((16, 64), 16)), r"q values must be 4-bit codes in \[0, 15\], got values "
                                       r"in \[16, 16\]"),
    (dict(q=torch.full((16, 64), -1)), r"q values must be 4-bit codes"),
    (dict(q=torch.zeros(16, 64)), r"q must be a 2-D integer tensor \[N, K\]"),
    (dict(q=torch.zeros(12, 64, dtype=torch.long)), r"q has shape \[12, 64\]; with bits=4 both"),
    (dict(zeros=torch.zeros(2, 16, dtype=torch.long)),
     r"zeros values must be real zero points \(stored as zero - 1\) in \[1, 16\], got values in "
     r"\[0, 0\]"),
    (dict(zeros=torch.full((2, 16), 17)), r"zeros values must be real zero points"),
    (dict(zeros=torch.ones(2, 8, dtype=torch.long)), r"zeros has shape \[2, 8\]"),
    (dict(scales=torch.ones(2, 16)), r"scales must be float16 \[2, 16\] like zeros"),
    (dict(g_idx=torch.zeros(32, dtype=torch.int32)), r"g_idx has shape \[32\]; .* must be \[64\]"),
    (dict(g_idx=torch.full((64,), 2, dtype=torch.int32)), r"g_idx values must be group indices"),
])
def test_pack_rejects(change, msg):
    args = dict(q=torch.zeros(16, 64, dtype=torch.long), zeros=torch.ones(2, 16, dtype=torch.long),
                scales=torch.ones(2, 16, dtype=torch.float16),
                g_idx=torch.arange(64, dtype=torch.int32) // 32, bits=4)
    with pytest.raises(ValueError, match=msg):
        pack_gptq(**{**args, **change})


# ---- round-to-nearest ------------------------------------------------------------------------

def _special_weights(n=16, k=256, seed=0):
    """Random weights with special groups (of 32) in rows 0..6."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0                                  # all zero
    w[1, :32] = 0.25                               # constant positive
    w[2, :32] = -0.25                              # constant negative
    w[3, :32] = w[3, :32].abs()                    # no negative weight
    w[4, :32] = -w[4, :32].abs()                   # no positive weight
    w[5, :32] *= 1e-6                              # scale in the fp16 subnormals
    w[6, :32] *= 1e-9                              # scale below the smallest fp16
    w[7, :32] *= 1e4                               # large
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, sym):
    """Every weight dequantizes within scale / 2 of itself, scale being the stored fp16 value
    (rounded up from the formula's, so no extra term); only fp32 rounding of w / scale adds
    a relative 2**-20."""
    w = _special_weights()
    p = quantize_rtn(w, bits, group_size, sym)
    gs = 256 if group_size == -1 else group_size
    assert torch.equal(p["g_idx"], torch.arange(256, dtype=torch.int32) // gs)
    deq = dequantize_gptq(**p, bits=bits)
    step = p["scales"].float().T[:, p["g_idx"].long()]
    assert ((deq - w).abs() <= step / 2 * (1 + 2**-20)).all()
    if group_size == 32:
        assert (deq[0, :32] == 0).all() and (p["scales"][0, 0] == 1)
        assert (deq[1:3, :32] - w[1:3, :32]).abs().max() <= step[1:3, 0].max() / 2
    _, zeros, _, _ = unpack_gptq(**p, bits=bits)
    if sym:
        assert (zeros == 1 << (bits - 1)).all()
        assert (p["qzeros"] == (0x77777777 if bits == 4 else 0x7F7F7F7F)).all()
    else:
        assert zeros.min() >= 1 and zeros.max() <= (1 << bits) - 1


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_sym_scale_is_the_smallest_that_keeps_both_extremes(bits):
    w = _special_weights(seed=3)[8:]
    half = 1 << (bits - 1)
    p = quantize_rtn(w, bits, 32, sym=True)
    scales = p["scales"]                                              # [G, N]
    g = w.reshape(8, 8, 32).float()
    s = torch.maximum(g.amax(-1).clamp(min=0) / (half - 1), -g.amin(-1).clamp(max=0) / half).T
    below = (scales.view(torch.int16) - 1).view(torch.float16).float()
    assert (scales.float() >= s).all() and (below < s).all()
    # No clipping: both extremes of every group are within half a step of their levels (the
    # release's 2 max|w| / 15 clips a positive extreme to 7/7.5 of itself).
    deq = dequantize_gptq(p["qweight"], p["qzeros"], scales, p["g_idx"], bits).reshape(8, 8, 32)
    step = scales.float().T[..., None]
    for pick in (torch.argmax, torch.argmin):
        i = pick(g, -1, keepdim=True)
        assert ((deq.gather(-1, i) - g.gather(-1, i)).abs() <= step / 2 + 1e-6).all()


def test_rtn_of_bf16_in_blocks_matches_one_pass(monkeypatch):
    w = (torch.randn(48, 256) * 0.1).to(torch.bfloat16)
    whole = quantize_rtn(w, 4, 64, sym=False)
    monkeypatch.setattr(gptq, "BLOCK_ELEMENTS", 5 * 256)        # 5 rows a block
    blocks = quantize_rtn(w, 4, 64, sym=False)
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)
    assert torch.equal(unpack_gptq(**blocks, bits=4)[0], unpack_gptq(**whole, bits=4)[0])


@pytest.mark.parametrize("args,msg", [
    ((torch.zeros(8, 96), 4, 64), r"w has 96 inputs \(shape \[8, 96\]\), not a multiple of "
                                  r"group_size 64"),
    ((torch.zeros(8, 64), 4, 0), r"not a multiple of group_size 0"),
    ((torch.zeros(12, 64), 4, 64), r"w has shape \[12, 64\]; with bits=4 both outputs"),
    ((torch.zeros(8, 64), 3, 64), r"bits must be 4 or 8, got 3"),
    ((torch.zeros(8, 64, dtype=torch.long), 4, 64), r"w must be a 2-D float tensor"),
    ((torch.full((8, 64), float("nan")), 4, 64), r"w holds NaN or Inf"),
    ((torch.full((8, 64), 1e6), 4, 64), r"scale exceeds the float16 range"),
])
def test_rtn_rejects(args, msg):
    with pytest.raises(ValueError, match=msg):
        quantize_rtn(*args)


# ---- quantize_config.json --------------------------------------------------------------------

def _write_json(path, obj):
    path.write_text(json.dumps(obj))


def test_read_release_quantize_config(tmp_path):
    assert read_gptq_config(tmp_path) is None
    _write_json(tmp_path / "quantize_config.json", RELEASE_INT4)
    cfg = read_gptq_config(tmp_path)
    assert cfg == GptqConfig(bits=4, group_size=128, desc_act=False, sym=True)
    assert cfg.to_dict() == RELEASE_INT4
    # config.json of the release: same fields plus quant_method and disable_exllama.
    _write_json(tmp_path / "config.json", {"model_type": "qwen", "quantization_config": {
        **RELEASE_INT4, "quant_method": "gptq", "disable_exllama": True}})
    assert read_gptq_config(tmp_path) == cfg
    (tmp_path / "quantize_config.json").unlink()
    assert read_gptq_config(tmp_path) == cfg
    _write_json(tmp_path / "config.json", {"model_type": "qwen"})
    assert read_gptq_config(tmp_path) is None


@pytest.mark.parametrize("change,msg", [
    (dict(bits=3), r"quantize_config.json: bits must be 4 or 8, got 3"),
    (dict(bits=True), r"bits must be 4 or 8, got True"),
    (dict(group_size=0), r"quantize_config.json: group_size must be -1 .* got 0"),
    (dict(group_size=-2), r"group_size must be -1"),
    (dict(desc_act="false"), r"desc_act must be true or false, got 'false'"),
    (dict(sym=None), r"sym must be true or false"),
    (dict(checkpoint_format="gptq_v2"), r"checkpoint_format is 'gptq_v2'; only 'gptq'"),
    (dict(checkpoint_format="marlin"), r"checkpoint_format is 'marlin'"),
    (dict(is_marlin_format=True), r"is_marlin_format is True"),
    (dict(quant_method="awq"), r"quant_method is 'awq'"),
    (dict(bits=None), r"bits must be 4 or 8"),
])
def test_bad_quantize_config_is_refused(tmp_path, change, msg):
    _write_json(tmp_path / "quantize_config.json", {**RELEASE_INT4, **change})
    with pytest.raises(ConfigError, match=msg):
        read_gptq_config(tmp_path)


def test_missing_field_and_ignored_fields(tmp_path):
    d = {k: v for k, v in RELEASE_INT4.items() if k != "sym"}
    with pytest.raises(ConfigError, match=r"no 'sym' field"):
        GptqConfig.from_dict(d, "x.json")
    extra = {**RELEASE_INT4, "checkpoint_format": "gptq", "quant_method": "gptq",
             "damp_percent": 0.1, "static_groups": True, "true_sequential": False}
    assert GptqConfig.from_dict(extra, "x.json") == GptqConfig(4, 128, False, True)
    with pytest.raises(ConfigError, match=r"x.json: expected a JSON object"):
        GptqConfig.from_dict([4], "x.json")


@pytest.mark.parametrize("qc,msg", [
    ({**RELEASE_INT4, "quant_method": "awq"}, r"config.json quantization_config: quant_method"),
    ({**RELEASE_INT4}, r"quant_method must be 'gptq', got None"),
    ({**RELEASE_INT4, "quant_method": "gptq", "group_size": 0}, r"group_size must be"),
])
def test_bad_config_json_quantization_config(tmp_path, qc, msg):
    _write_json(tmp_path / "config.json", {"quantization_config": qc})
    with pytest.raises(ConfigError, match=msg):
        read_gptq_config(tmp_path)


def test_disagreeing_files_are_refused(tmp_path):
    _write_json(tmp_path / "quantize_config.json", RELEASE_INT4)
    _write_json(tmp_path / "config.json", {"quantization_config": {
        **RELEASE_INT4, "bits": 8, "quant_method": "gptq"}})
    with pytest.raises(ConfigError, match=r"quantize_config.json .*bits=4.* and .*config.json "
                                          r"quantization_config .*bits=8.* disagree"):
        read_gptq_config(tmp_path)


# ---- quantize_checkpoint ---------------------------------------------------------------------

CFG = tiny_config(hidden_size=128, num_attention_heads=4, kv_channels=32, intermediate_size=512,
                  vocab_size=512)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant") / "Qwen-tiny"
    write_checkpoint(d, CFG, random_state_dict(CFG, torch.bfloat16), shards=2)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 8192}')
    (d / "tokenization_qwen.py").write_text("# tokenizer code of the release\n")
    return d


def _read_all(d):
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for p in files:
        read_safetensors_header(p)          # the loader's strict checks accept our writer
        with safe_open(str(p), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


def test_quantize_checkpoint(bf16_ckpt, tmp_path):
    out = quantize_checkpoint(bf16_ckpt, tmp_path / "int4", bits=4, progress=False)
    assert out == tmp_path / "int4"
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors",
                     "quantize_config.json", "tokenizer_config.json", "tokenization_qwen.py"}
    assert json.loads((out / "quantize_config.json").read_text()) == RELEASE_INT4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {**RELEASE_INT4, "quant_method": "gptq",
                                          "disable_exllama": True}
    assert cfg["torch_dtype"] == "float16" and cfg["fp16"] is True and cfg["bf16"] is False
    assert cfg["hidden_size"] == 128 and cfg["intermediate_size"] == 512
    assert read_gptq_config(out) == GptqConfig(4, 128, False, True)
    for name in ("generation_config.json", "qwen.tiktoken", "tokenization_qwen.py"):
        assert (out / name).read_bytes() == (bf16_ckpt / name).read_bytes()

    src = random_state_dict(CFG, torch.bfloat16)
    got = _read_all(out)
    expect_names = set()
    for name, t in src.items():
        base, _, kind = name.rpartition(".")
        if base.split(".", 3)[-1] in QUANTIZED_LINEARS:
            if kind == "bias":
                continue
            n, k = t.shape
            ref = quantize_rtn(t, 4, 128)
            for key, (shape, dtype) in gptq_shapes(n, k, 4, 128).items():
                x = got[f"{base}.{key}"]
                assert (x.shape, x.dtype) == (shape, dtype) and torch.equal(x, ref[key]), name
            bias = got[f"{base}.bias"]
            assert bias.dtype == torch.float16 and bias.shape == (n,)
            real = src.get(f"{base}.bias")
            assert torch.equal(bias, real.half() if real is not None else torch.zeros(n).half())
            assert torch.equal(dequantize_gptq(got[f"{base}.qweight"], got[f"{base}.qzeros"],
                                               got[f"{base}.scales"], got[f"{base}.g_idx"], 4),
                               dequantize_gptq(**ref, bits=4))
            expect_names |= {f"{base}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        else:
            assert got[name].dtype == torch.float16 and torch.equal(got[name], t.half()), name
            expect_names.add(name)
    assert set(got) == expect_names
    assert got["transformer.h.1.mlp.c_proj.qweight"].shape == (32, 128)      # K=256 -> 256/8
    assert (got["transformer.h.0.attn.c_attn.bias"] != 0).any()


def test_quantize_checkpoint_shards_and_8_bit_asym(bf16_ckpt, tmp_path):
    out = quantize_checkpoint(bf16_ckpt, tmp_path / "int8", bits=8, group_size=-1, sym=False,
                              progress=False, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    got = _read_all(out)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    w = random_state_dict(CFG, torch.bfloat16)["transformer.h.1.mlp.w2.weight"]
    ref = quantize_rtn(w, 8, -1, sym=False)
    assert got["transformer.h.1.mlp.w2.qzeros"].shape == (1, 64)
    assert all(torch.equal(got[f"transformer.h.1.mlp.w2.{k}"], ref[k]) for k in ref)
    assert read_gptq_config(out) == GptqConfig(8, -1, False, False)


def test_quantize_checkpoint_refusals(bf16_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        quantize_checkpoint(tmp_path / "nowhere", tmp_path / "o", bits=4)
    with pytest.raises(ValueError, match="is the input directory"):
        quantize_checkpoint(bf16_ckpt, bf16_ckpt, bits=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        quantize_checkpoint(bf16_ckpt, tmp_path / "full", bits=4)
    with pytest.raises(ConfigError, match="bits must be 4 or 8, got 3"):
        quantize_checkpoint(bf16_ckpt, tmp_path / "o", bits=3)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight has 128 inputs "
                                         r"\(shape \[384, 128\]\), not a multiple of group_size 256"):
        quantize_checkpoint(bf16_ckpt, tmp_path / "o", bits=4, group_size=256)
    # A group size the loader could not read is refused before any work (it used to be
    # written, then refused by the loader).
    for gs in (64, 96, 192):
        with pytest.raises(ValueError, match=f"group_size {gs} is refused before any work.*"
                                             "-1 or a multiple of 128"):
            quantize_checkpoint(bf16_ckpt, tmp_path / "o", bits=4, group_size=gs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    q = quantize_checkpoint(bf16_ckpt, tmp_path / "q", bits=4, progress=False)
    with pytest.raises(CheckpointError, match="is already quantized"):
        quantize_checkpoint(q, tmp_path / "o", bits=4)


def test_failure_midway_leaves_nothing(bf16_ckpt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise ValueError("w holds NaN or Inf")
    monkeypatch.setattr(quant, "quantize_rtn", boom)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.0.attn.c_attn.weight': w "
                                              r"holds NaN"):
        quantize_checkpoint(bf16_ckpt, tmp_path / "empty", bits=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert not any((tmp_path / "empty").iterdir())


def test_cli_quantize(bf16_ckpt, tmp_path, capsys):
    assert main(["quantize", str(bf16_ckpt), str(tmp_path / "q8"), "--bits", "8",
                 "--group-size", "-1", "--asym"]) == 0
    assert read_gptq_config(tmp_path / "q8") == GptqConfig(8, -1, False, False)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(bf16_ckpt), str(tmp_path / "q3"), "--bits", "3"])
    assert e.value.code == 2
    assert "invalid choice: 3" in capsys.readouterr().err
    assert main(["quantize", str(bf16_ckpt), str(tmp_path / "q0"), "--bits", "4",
                 "--group-size", "0"]) == 2
    assert "error: quantize: group_size must be -1" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "q8"), str(tmp_path / "qq"), "--bits", "4"]) == 2
    assert "is already quantized" in capsys.readouterr().err
    assert not (tmp_path / "q0").exists() and not (tmp_path / "qq").exists()


def test_cli_quantize_group_size_the_loader_cannot_read(bf16_ckpt, tmp_path, capsys):
    assert main(["quantize", str(bf16_ckpt), str(tmp_path / "q"), "--bits", "4",
                 "--group-size", "64"]) == 2
    assert "group_size 64 is refused before any work" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _dead_pid() -> int:
    pid = 4_000_000
    while quant._alive(pid):
        pid -= 1
    return pid


def test_stale_partial_directories_are_removed(bf16_ckpt, tmp_path):
    """A run killed with SIGKILL leaves .OUT.partial-PID behind; the next run for OUT removes
    those whose process is gone (and leaves a live run's alone)."""
    dead = tmp_path / f".q.partial-{_dead_pid()}"
    live = tmp_path / f".q.partial-{os.getppid()}"
    other = tmp_path / f".other.partial-{_dead_pid()}"
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    quantize_checkpoint(bf16_ckpt, tmp_path / "q", bits=4, progress=False)
    assert not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "q" / "quantize_config.json").exists()


def test_cli_quantize_sigterm_cleans_up(bf16_ckpt, tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of a run: the partial output is removed, as with Ctrl-C."""
    calls = []
    real = quant.quantize_rtn

    def term_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(quant, "quantize_rtn", term_on_second)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["quantize", str(bf16_ckpt), str(tmp_path / "q"), "--bits", "4"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) == before
