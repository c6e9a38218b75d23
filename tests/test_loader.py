"""Loader: release layout (sharded + index, single file), dtype conversion, and every kind of
malformed checkpoint gets an error naming the tensor/file and what was expected."""
import json

import pytest
import torch

from qwen_fast import Engine
from qwen_fast.config import ConfigError, QwenConfig
from qwen_fast.loader import CheckpointError, expected_shapes, load_state_dict
from qwen_fast.testing import random_state_dict, tiny_config, write_checkpoint


@pytest.fixture()
def cfg():
    return tiny_config(num_hidden_layers=1)


def _write(tmp_path, cfg, sd=None, **kw):
    return write_checkpoint(tmp_path / "ckpt", cfg, sd, **kw)


def test_release_names_and_shapes_for_1_8b():
    shapes = expected_shapes(QwenConfig())
    assert len(shapes) == 195
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_836_828_672
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (6144, 2048)
    assert shapes["transformer.h.23.mlp.w2.weight"] == (5504, 2048)
    assert shapes["transformer.h.23.mlp.c_proj.weight"] == (2048, 5504)
    assert shapes["lm_head.weight"] == (151936, 2048)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                     (torch.float32, torch.bfloat16)])
def test_loads_and_converts_dtype(tmp_path, cfg, shards, src, dst):
    sd = random_state_dict(cfg, src)
    path = _write(tmp_path, cfg, sd, shards=shards)
    assert (path / "model.safetensors.index.json").exists() == (shards > 1)
    out = load_state_dict(path, cfg, dst)
    assert set(out) == set(sd)
    for k, v in out.items():
        assert v.dtype == dst
        torch.testing.assert_close(v, sd[k].to(dst))


def test_ignorable_tensors_are_accepted(tmp_path, cfg):
    sd = random_state_dict(cfg)
    sd["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    out = load_state_dict(_write(tmp_path, cfg, sd), cfg, torch.bfloat16)
    assert "transformer.h.0.attn.masked_bias" not in out


def test_missing_tensor(tmp_path, cfg):
    sd = random_state_dict(cfg)
    del sd["transformer.h.0.mlp.w2.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer.h.0.mlp.w2.weight'.*\[96, 64\]"):
        load_state_dict(_write(tmp_path, cfg, sd), cfg, torch.bfloat16)


def test_extra_tensor(tmp_path, cfg):
    sd = random_state_dict(cfg)
    sd["transformer.h.0.mlp.c_attn.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.h.0.mlp.c_attn.bias'"):
        load_state_dict(_write(tmp_path, cfg, sd), cfg, torch.bfloat16)


def test_misshaped_tensor(tmp_path, cfg):
    sd = random_state_dict(cfg)
    sd["transformer.h.0.attn.c_attn.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"'transformer.h.0.attn.c_attn.bias'.*shape \[64\], expected \[192\]"):
        load_state_dict(_write(tmp_path, cfg, sd), cfg, torch.bfloat16)


def test_wrong_dtype(tmp_path, cfg):
    sd = random_state_dict(cfg)
    sd["transformer.ln_f.weight"] = torch.ones(64, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="'transformer.ln_f.weight'.*dtype I32, expected BF16, F16 or F32"):
        load_state_dict(_write(tmp_path, cfg, sd), cfg, torch.bfloat16)


def test_truncated_shard(tmp_path, cfg):
    path = _write(tmp_path, cfg, shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: tensor '.*' is truncated"):
        load_state_dict(path, cfg, torch.bfloat16)


def test_garbage_file(tmp_path, cfg):
    path = _write(tmp_path, cfg, shards=1)
    (path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="model.safetensors: header length"):
        load_state_dict(path, cfg, torch.bfloat16)


def test_index_points_to_missing_shard(tmp_path, cfg):
    path = _write(tmp_path, cfg, shards=2)
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*does not exist"):
        load_state_dict(path, cfg, torch.bfloat16)


def test_index_names_tensor_absent_from_shard(tmp_path, cfg):
    path = _write(tmp_path, cfg, shards=2)
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="'lm_head.weight' to model-00001-of-00002.safetensors, but that file has no such tensor"):
        load_state_dict(path, cfg, torch.bfloat16)


def test_pickle_only_checkpoint_is_refused(tmp_path, cfg):
    path = _write(tmp_path, cfg, shards=2)
    for p in path.glob("model*"):
        p.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        Engine.from_pretrained(path)


def test_config_errors(tmp_path, cfg):
    path = _write(tmp_path, cfg)
    conf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(conf, kv_channels=20)))
    with pytest.raises(ConfigError, match="kv_channels \\* num_attention_heads = 80 must equal hidden_size = 64"):
        Engine.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(dict(conf, model_type="qwen2")))
    with pytest.raises(ConfigError, match="model_type is 'qwen2'"):
        Engine.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Engine.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        Engine.from_pretrained(path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        Engine.from_pretrained(tmp_path / "nope")


def test_gptq_checkpoint_is_refused_clearly(tmp_path, cfg):
    path = _write(tmp_path, cfg)
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"] = {"bits": 4, "group_size": 128, "quant_method": "gptq"}
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="GPTQ checkpoints are not supported"):
        Engine.from_pretrained(path)


def test_dummy_load_format_builtin_config():
    e = Engine.from_pretrained(load_format="dummy", config=tiny_config(), dtype="bfloat16")
    assert e.model.lm_head.shape == (151936, 64) and e.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown built-in config"):
        Engine.from_pretrained(load_format="dummy", config="qwen-100b")
    with pytest.raises(ValueError, match="load_format"):
        Engine.from_pretrained(load_format="pickle")


def test_tokenizer_and_generation_config_from_checkpoint(tiny_ckpt):
    e = Engine.from_pretrained(tiny_ckpt)
    assert e.dtype == torch.bfloat16                   # bf16/fp16/fp32 all false -> bf16
    assert e.generation_config.top_p == 0.8 and e.generation_config.repetition_penalty == 1.1
    assert e.default_params.max_new_tokens == 512
    assert e.tokenizer.encode("Panda") == [47, 9817]


def test_bad_generation_config_is_named(tmp_path, cfg):
    path = _write(tmp_path, cfg)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(dict(gen, top_p=1.7)))
    with pytest.raises(ConfigError, match=r"generation_config.json: top_p must be in \(0, 1\]"):
        Engine.from_pretrained(path)


def test_progress_bar_on_request(tmp_path, cfg, capsys):
    out = load_state_dict(_write(tmp_path, cfg), cfg, torch.bfloat16, progress=True)
    assert len(out) == len(expected_shapes(cfg))
    assert "loading ckpt" in capsys.readouterr().err
