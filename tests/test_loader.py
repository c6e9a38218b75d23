"""Loader: release layout (sharded + index, single file), dtype conversion, and every kind of
malformed checkpoint gets an error naming the tensor/file and what was expected."""
import json
import os

import pytest
import torch

from qwen_fast import Engine
from qwen_fast.config import ConfigError, QwenConfig
from qwen_fast.loader import CheckpointError, expected_shapes, load_state_dict
from qwen_fast.safetensors_io import MAX_HEADER_BYTES, read_safetensors_header
from qwen_fast.testing import (SPECIAL_FILE_KINDS, make_special_file, random_state_dict, raw_safetensors,
                               read_raw_safetensors, tiny_config, write_checkpoint)


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


def test_quantized_configs_without_their_tensors_are_refused_clearly(tmp_path, cfg):
    """A GPTQ config over dense tensors names the first missing GPTQ tensor (tests/test_gptq.py
    loads real GPTQ checkpoints); another quantization method is refused by name."""
    path = _write(tmp_path, cfg)
    conf = json.loads((path / "config.json").read_text())
    conf["quantization_config"] = {"bits": 4, "group_size": 32, "quant_method": "gptq",
                                   "desc_act": False, "sym": True}
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer.h.0.attn.c_attn.qweight'"):
        Engine.from_pretrained(path)
    conf["quantization_config"] = {"bits": 4, "quant_method": "awq"}
    (path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"quantized \('awq'\) checkpoints are not supported"):
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
    with pytest.raises(ConfigError, match=r"generation_config.json: top_p must be a finite number in \(0, 1\]"):
        Engine.from_pretrained(path)


def test_progress_bar_on_request(tmp_path, cfg, capsys):
    out = load_state_dict(_write(tmp_path, cfg), cfg, torch.bfloat16, progress=True)
    assert len(out) == len(expected_shapes(cfg))
    assert "loading ckpt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Malformed safetensors headers: every one is a CheckpointError naming the file, validated
# before safetensors' own parser sees the file.
# ---------------------------------------------------------------------------------------


T = "transformer.ln_f.weight"


def _one(dtype="F32", shape=(2,), offsets=(0, 8), **extra):
    def aslist(v):
        return list(v) if isinstance(v, tuple) else v
    return {T: dict({"dtype": dtype, "shape": aslist(shape), "data_offsets": aslist(offsets)}, **extra)}


@pytest.mark.parametrize("header, data, match", [
    ([1, 2], b"", r"expected a JSON object of tensors, got a JSON list"),
    ("model", b"", r"expected a JSON object of tensors, got a JSON str"),
    (3, b"", r"got a JSON int"),
    (None, b"", r"got a JSON NoneType"),
    ({T: [1, 2]}, b"", r"header entry must be an object"),
    ({T: "F32"}, b"", r"header entry must be an object"),
    ({T: {"dtype": "F32", "shape": [2]}}, bytes(8), r"has no 'data_offsets'"),
    (_one(shape="2"), bytes(8), r"shape must be a list of non-negative integers, got '2'"),
    (_one(shape=(-2,)), bytes(8), r"malformed safetensors header \(negative number -2\)"),
    (_one(shape=(2.0,)), bytes(8), r"shape must be a list of non-negative integers, got \[2.0\]"),
    (_one(shape=(True, 2)), bytes(8), r"shape must be a list of non-negative integers"),
    (_one(shape=([2],)), bytes(8), r"shape must be a list of non-negative integers"),
    (_one(shape=(2**64,)), bytes(8), r"out of range|non-negative integers"),
    (_one(shape=(2**40, 2**40, 0)), b"", r"too many elements"),
    (_one(offsets=(0, -8)), bytes(8), r"negative number -8"),
    (_one(offsets=(8, 0)), bytes(8), r"end before they start"),
    (_one(offsets=(0, 8, 16)), bytes(8), r"data_offsets must be \[start, end\]"),
    (_one(offsets="0-8"), bytes(8), r"data_offsets must be \[start, end\]"),
    (_one(offsets=(0.0, 8.0)), bytes(8), r"data_offsets must be \[start, end\]"),
    (_one(dtype="Q4"), bytes(8), r"unknown dtype 'Q4'; known safetensors dtypes: BOOL, U8, .*BF16.*F32"),
    (_one(dtype=7), bytes(8), r"unknown dtype 7"),
    (_one(offsets=(0, 4)), bytes(4), r"spans 4 bytes, expected 8"),
    (_one(offsets=(8, 16)), bytes(16), r"starts at byte 8, leaving bytes 0..7 of the data section unused"),
    (_one(), bytes(12), r"the tensors cover 8 bytes but the data section holds 12 \(trailing bytes"),
    (_one(offsets=(0, 8)), bytes(4), r"is truncated: its data ends at byte 8 .* only 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12),
     r"tensor 'b' overlaps tensor 'a' \(which ends at byte 8\)"),
    (dict(_one(), __metadata__=["pt"]), bytes(8), r"__metadata__ must be an object of strings"),
    (dict(_one(), __metadata__={"format": 1}), bytes(8), r"__metadata__ must be an object of strings"),
    (dict(_one(), __metadata__="pt"), bytes(8), r"__metadata__ must be an object of strings"),
    (_one(extra=float("nan")), bytes(8), r"NaN is not valid JSON"),
    (_one(extra=1e999), bytes(8), r"Infinity is not valid JSON"),
    ({"\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"surrogates not allowed"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', bytes(8), r"duplicate key 'a'"),
    (b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8),
     r"duplicate key 'dtype'"),
    (b'{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b"", r"negative number -0"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}', b"",
     r"out of range"),
    (b"\xff\xfe{}", b"", r"not UTF-8 \(byte 0xff at header offset 0\)"),
    (b"[" * 100_000, b"", r"nested too deeply|not valid|malformed"),
    (b'{"a": 1', b"", r"malformed safetensors header \(Expecting"),
    (b"", b"", r"malformed safetensors header"),
])
def test_malformed_header(tmp_path, header, data, match):
    p = tmp_path / "model.safetensors"
    p.write_bytes(raw_safetensors(header, data))
    with pytest.raises(CheckpointError, match=match) as ei:
        read_safetensors_header(p)
    assert "model.safetensors" in str(ei.value)


def test_header_entries_in_any_order_and_padding_are_valid(tmp_path):
    """safetensors sorts entries by offset: listing them out of order is fine, as are
    zero-size tensors and the space padding safetensors writes."""
    import safetensors
    hdr = {"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
           "e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [16, 16]},
           "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "__metadata__": {"format": "pt"}}
    raw = json.dumps(hdr).encode() + b"   "
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw_safetensors(raw, torch.arange(4, dtype=torch.float32).numpy().tobytes()))
    assert set(read_safetensors_header(p)) == {"a", "b", "e"}
    with safetensors.safe_open(str(p), "pt") as f:
        assert f.get_tensor("b").tolist() == [2.0, 3.0]


def test_header_length_field(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(raw_safetensors(_one(), bytes(8), length=MAX_HEADER_BYTES + 1))
    with pytest.raises(CheckpointError, match=r"model.safetensors: header length 100000001 exceeds "
                                              r"safetensors' limit of 100000000 bytes"):
        read_safetensors_header(p)
    p.write_bytes(raw_safetensors(_one(), bytes(8), length=5000))
    with pytest.raises(CheckpointError, match=r"header length 5000 exceeds the file size: only \d+ "
                                              r"bytes follow"):
        read_safetensors_header(p)
    for blob in (b"", b"\x01\x00\x00"):
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"model.safetensors: file is {len(blob)} bytes, too short"):
            read_safetensors_header(p)


def test_malformed_header_through_engine(tmp_path, cfg):
    """The same checks run on the way through Engine.from_pretrained, for every shard."""
    path = _write(tmp_path, cfg, shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    hdr, data = read_raw_safetensors(shard)
    name = next(k for k in hdr if k != "__metadata__")
    hdr[name]["shape"] = ["64"]
    shard.write_bytes(raw_safetensors(hdr, data))
    with pytest.raises(CheckpointError, match=rf"model-00002-of-00002.safetensors: tensor '{name}': "
                                              r"shape must be a list of non-negative integers"):
        Engine.from_pretrained(path, backend="reference")


def test_remaining_safetensors_errors_name_the_file(tmp_path, cfg, monkeypatch):
    import safetensors

    def broken(*a, **k):
        raise safetensors.SafetensorError("Error while deserializing header: something new")
    monkeypatch.setattr(safetensors, "safe_open", broken)
    with pytest.raises(CheckpointError, match=r"model.safetensors: safetensors could not read tensor "
                                              r"'transformer.wte.weight' \(SafetensorError: .*something new"):
        load_state_dict(_write(tmp_path, cfg, shards=1), cfg, torch.float32)


# ---------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------

def _index(path):
    return path / "model.safetensors.index.json"


@pytest.mark.parametrize("content, match", [
    (b'["model-00001-of-00002.safetensors"]', r"expected a JSON object with a 'weight_map', got a JSON list"),
    (b'{"metadata": {}}', r"got an object without 'weight_map'"),
    (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', r"weight_map must be an object mapping "
                                                             r"tensor names to file names, got a JSON list"),
    (b'{"weight_map": {"lm_head.weight": 3}}', r"maps 'lm_head.weight' to 3: it is not a string"),
    (b'{"weight_map": {"lm_head.weight": null}}', r"it is not a string"),
    (b'{"weight_map": \xff}', r"not UTF-8 text \(byte 0xff at offset 15\)"),
    (b'{"weight_map": ', r"not valid JSON"),
])
def test_malformed_index(tmp_path, cfg, content, match):
    path = _write(tmp_path, cfg, shards=2)
    _index(path).write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as ei:
        load_state_dict(path, cfg, torch.bfloat16)
    assert "model.safetensors.index.json" in str(ei.value)


@pytest.mark.parametrize("fname, why", [
    ("../model-00001-of-00002.safetensors", "it is a path"),
    ("/tmp/model-00001-of-00002.safetensors", "it is a path"),
    ("sub/model-00001-of-00002.safetensors", "it is a path"),
    ("sub\\model-00001-of-00002.safetensors", "it is a path"),
    ("..", "it is not a file name"),
    ("", "it is not a file name"),
    ("pytorch_model.bin", "it is not a .safetensors file"),
    ("a\0.safetensors", "it contains a NUL byte"),
    ("\ud800.safetensors", "it is not valid Unicode"),
])
def test_index_names_only_plain_files_of_the_directory(tmp_path, cfg, fname, why):
    path = _write(tmp_path, cfg, shards=2)
    (path / "sub").mkdir()
    import shutil
    shutil.copy(path / "model-00001-of-00002.safetensors", path / "sub")
    idx = json.loads(_index(path).read_text())
    idx["weight_map"]["lm_head.weight"] = fname
    _index(path).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"index.json: weight_map maps 'lm_head.weight' to .*: {why}"):
        load_state_dict(path, cfg, torch.bfloat16)


def test_hub_cache_symlinks_load(tmp_path, cfg):
    """The Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>. Only the name in
    the index is checked, so symlinked shards (and config, vocab) keep working."""
    src = _write(tmp_path, cfg, shards=2)
    repo = tmp_path / "models--Qwen--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    e = Engine.from_pretrained(snap, backend="reference", dtype="float32")
    assert e.generate("hi", max_new_tokens=1, temperature=0).completion_tokens == 1


# ---------------------------------------------------------------------------------------
# Only bounded regular files are read: FIFOs, devices and directories are refused, never hang
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SPECIAL_FILE_KINDS)
@pytest.mark.parametrize("fname, exc", [
    ("config.json", ConfigError), ("generation_config.json", ConfigError),
    ("model.safetensors.index.json", CheckpointError), ("qwen.tiktoken", CheckpointError),
    ("model-00002-of-00002.safetensors", CheckpointError),
])
def test_special_files_are_refused(tmp_path, cfg, alarm, fname, exc, kind):
    if kind == "dev_zero" and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    path = _write(tmp_path, cfg, shards=2)
    make_special_file(path / fname, kind)
    want = {"fifo": "is a FIFO", "dev_zero": "is a character device", "directory": "is a directory",
            "broken_symlink": "no such file \\(a broken symlink\\)"}[kind]
    with pytest.raises(exc, match=rf"{fname}:? {want}|{fname}: {want}") as ei:
        Engine.from_pretrained(path, backend="reference", dtype="float32")
    assert "not a regular file" in str(ei.value) or kind == "broken_symlink"


@pytest.mark.parametrize("fname, limit, exc", [
    ("config.json", 1 << 20, ConfigError), ("generation_config.json", 1 << 20, ConfigError),
    ("model.safetensors.index.json", 16 << 20, CheckpointError), ("qwen.tiktoken", 16 << 20, CheckpointError),
])
def test_oversized_small_files_are_refused(tmp_path, cfg, fname, limit, exc):
    path = _write(tmp_path, cfg, shards=2)
    with open(path / fname, "r+b") as f:     # sparse: no real disk use
        f.truncate(limit + 1)
    with pytest.raises(exc, match=rf"{fname} is {limit + 1} bytes, more than the {limit} bytes allowed"):
        Engine.from_pretrained(path, backend="reference", dtype="float32")


@pytest.mark.parametrize("fname, exc", [("config.json", ConfigError), ("generation_config.json", ConfigError),
                                        ("model.safetensors.index.json", CheckpointError)])
def test_json_files_not_utf8_or_not_objects(tmp_path, cfg, fname, exc):
    path = _write(tmp_path, cfg, shards=2)
    p = path / fname
    p.write_bytes(p.read_bytes().replace(b'"', b'\xe9"', 1))
    with pytest.raises(exc, match=rf"{fname}: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        Engine.from_pretrained(path, backend="reference", dtype="float32")
    p.write_bytes(b"[1, 2]")
    with pytest.raises(exc, match=rf"{fname}: .*(must be|expected) a JSON object"):
        Engine.from_pretrained(path, backend="reference", dtype="float32")
    p.write_bytes(b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(exc, match=rf"{fname}: not valid JSON \(nested too deeply\)"):
        Engine.from_pretrained(path, backend="reference", dtype="float32")
    p.write_bytes(b'{"x": ' + b"1" * 5000 + b"}")
    with pytest.raises(exc, match=rf"{fname}: not valid JSON \(Exceeds the limit"):
        Engine.from_pretrained(path, backend="reference", dtype="float32")


# ---------------------------------------------------------------------------------------
# Non-finite weights
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, cfg, bad):
    sd = random_state_dict(cfg, torch.bfloat16)
    w = sd["transformer.h.0.mlp.w1.weight"]
    w[3, :5] = bad
    path = _write(tmp_path, cfg, sd, shards=2)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.0.mlp.w1.weight' in "
                                              r"model-0000\d-of-00002.safetensors has 5 non-finite values "
                                              r"\(NaN or Inf\) out of 6144"):
        Engine.from_pretrained(path, backend="reference", dtype="float32")
    out = load_state_dict(path, cfg, torch.float32, check_finite=False)
    assert not torch.isfinite(out["transformer.h.0.mlp.w1.weight"]).all()
    e = Engine.from_pretrained(path, backend="reference", dtype="float32", check_finite=False)
    assert e.model is not None


def test_fp16_overflow_on_conversion_is_refused(tmp_path, cfg):
    sd = random_state_dict(cfg, torch.float32)
    sd["lm_head.weight"][7, 1] = 1e5          # finite in fp32, beyond fp16's 65504
    path = _write(tmp_path, cfg, sd, shards=1)
    load_state_dict(path, cfg, torch.bfloat16)             # bf16 has fp32's range
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' in model.safetensors: 1 values overflow "
                                              r"torch.float16 when converted from torch.float32 "
                                              r"\(largest magnitude 1e\+05\)"):
        load_state_dict(path, cfg, torch.float16)


# ---------------------------------------------------------------------------------------
# Configs and the vocabulary through from_pretrained
# ---------------------------------------------------------------------------------------

def _edit_json(p, **kw):
    d = json.loads(p.read_text())
    d.update(kw)
    p.write_text(json.dumps(d))


@pytest.mark.parametrize("edit, match", [
    (dict(seq_length=1), r"seq_length must be an integer in \[2, 1048576\], got 1"),
    (dict(num_hidden_layers=10**9), r"num_hidden_layers must be an integer in \[1, 1024\]"),
    (dict(rotary_emb_base=float("inf")), r"rotary_emb_base must be a finite number in \[1, 1e\+12\], got inf"),
    (dict(rotary_emb_base=float("nan")), r"rotary_emb_base must be a finite number"),
    (dict(use_dynamic_ntk="false"), r"use_dynamic_ntk must be true or false \(a JSON boolean\), got 'false'"),
    (dict(quantization_config="gptq"), r"quantization_config is malformed: expected a JSON object"),
    (dict(quantization_config={"quant_method": ["gptq"]}), r"quantization_config is malformed: quant_method"),
    (dict(vocab_size=10**400), r"vocab_size must be an integer"),
])
def test_bad_config_values(tmp_path, cfg, edit, match):
    path = _write(tmp_path, cfg)
    _edit_json(path / "config.json", **edit)
    with pytest.raises(ConfigError, match=r"config.json: " + match):
        Engine.from_pretrained(path, backend="reference")


@pytest.mark.parametrize("edit, match", [
    (dict(stop_words_ids=[[1, 2]]), r"stop_words_ids: multi-token stop words are not supported"),
    (dict(stop_words_ids=[[151936]]), r"stop_words_ids: token id 151936 is outside \[0, 151935\]"),
    (dict(eos_token_id=10**12), r"eos_token_id must be a token id in \[0, 151935\] \(below the model's "
                                r"vocab_size 151936\)"),
    (dict(pad_token_id=-1), r"pad_token_id must be a token id"),
    (dict(top_p="0.8"), r"top_p must be a finite number in \(0, 1\], got '0.8'"),
    (dict(max_new_tokens=1.5), r"max_new_tokens must be an integer in \[1, 2147483647\], got 1.5"),
    (dict(chat_format=3), r"chat_format must be one of \['chatml', 'raw'\], got 3"),
    (dict(do_sample="yes"), r"do_sample must be true or false"),
    (dict(temperature=float("nan")), r"temperature must be a finite number"),
    (dict(top_p=10**400), r"top_p must be a finite number"),
])
def test_bad_generation_config_values(tmp_path, cfg, edit, match):
    path = _write(tmp_path, cfg)
    _edit_json(path / "generation_config.json", **edit)
    with pytest.raises(ConfigError, match=r"generation_config.json: " + match):
        Engine.from_pretrained(path, backend="reference")


def test_single_token_stop_words_and_eos_list_are_used(tmp_path, cfg):
    path = _write(tmp_path, cfg)
    _edit_json(path / "generation_config.json", stop_words_ids=[[151643]], eos_token_id=[151643, 151645])
    e = Engine.from_pretrained(path, backend="reference", dtype="float32")
    assert e.generation_config.eos_token_id == 151643
    assert e.generation_config.stop_words_ids == [[151643], [151645]]


def test_vocab_checked_through_from_pretrained(tmp_path, cfg):
    path = _write(tmp_path, cfg)
    vocab = path / "qwen.tiktoken"
    lines = vocab.read_bytes().splitlines(keepends=True)
    vocab.write_bytes(b"".join(lines[:100_000]))
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken: vocabulary has 100000 ranks \(0..99999\), "
                                              r"expected exactly 151643 .*rank 100000 is missing"):
        Engine.from_pretrained(path, backend="reference")
    # Swap the tokens of two ranks: still well-formed, but not the release file.
    a, b = lines[300].split(), lines[301].split()
    lines[300], lines[301] = b[0] + b" " + a[1] + b"\n", a[0] + b" " + b[1] + b"\n"
    vocab.write_bytes(b"".join(lines))
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken: sha256 is [0-9a-f]{64}, expected b2b1b8df"):
        Engine.from_pretrained(path, backend="reference")
    e = Engine.from_pretrained(path, backend="reference", verify_vocab=False)
    assert e.tokenizer.vocab_size == 151851


def test_dummy_config_is_validated(monkeypatch):
    with pytest.raises(ConfigError, match=r"seq_length must be an integer in \[2, "):
        Engine.from_pretrained(load_format="dummy", config=tiny_config(seq_length=1))
    with pytest.raises(ConfigError, match=r"rotary_emb_base must be a finite number"):
        Engine.from_pretrained(load_format="dummy", config=tiny_config(rotary_emb_base=float("nan")))
    with pytest.raises(ConfigError, match=r"config must be a QwenConfig or a built-in config name, got dict"):
        Engine.from_pretrained(load_format="dummy", config={"hidden_size": 64})
    with pytest.raises(ConfigError, match=r"quantization_config .*load_format='dummy' draws dense weights; pass quant="):
        Engine.from_pretrained(load_format="dummy", config=tiny_config(
            quantization_config={"quant_method": "gptq", "bits": 4}))


def test_dummy_weights_must_fit_in_memory(monkeypatch):
    # The largest config the bounds allow: refused from the estimate, nothing is allocated.
    huge = QwenConfig(vocab_size=2**20, hidden_size=65536, num_attention_heads=512, kv_channels=128,
                      num_hidden_layers=1024, intermediate_size=2**20)
    with pytest.raises(ConfigError, match=r"load_format='dummy': the weights need \d+\.\d+ GiB of cpu "
                                          r"memory in bfloat16 \(1024 layers, hidden 65536, vocab 1048576\) "
                                          r"but only \d+\.\d+ GiB is available"):
        Engine.from_pretrained(load_format="dummy", config=huge, dtype="bfloat16")
    import qwen_fast.loader as loader
    monkeypatch.setattr(loader, "available_memory", lambda device: 10 * 2**20)
    with pytest.raises(ConfigError, match=r"the weights need 0\.\d+ GiB .* but only 0\.01 GiB"):
        Engine.from_pretrained(load_format="dummy", config=tiny_config(), dtype="bfloat16")


def test_available_memory_is_known_here():
    from qwen_fast.loader import available_memory
    have = available_memory(torch.device("cpu"))
    assert have is None or have > 0


def test_dummy_weights_drawn_in_blocks_equal_one_draw():
    """dummy_state_dict draws big tensors a block of rows at a time (a small fp32 temporary):
    the values are those of one draw over the whole tensor, so 'seed 0' names one model."""
    from qwen_fast.loader import dummy_state_dict
    cfg = tiny_config(num_hidden_layers=1)
    whole = dummy_state_dict(cfg, torch.bfloat16, chunk_elements=1 << 40)
    blocks = dummy_state_dict(cfg, torch.bfloat16, chunk_elements=1000)
    assert whole.keys() == blocks.keys()
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)
