"""QwenConfig / GenerationConfig: every field checked by type and range with a ConfigError
naming it; the bounded-file helpers every checkpoint file is read through."""
import json
import math
import os

import pytest
import torch

from qwen_fast.config import (BOOL_FIELDS, FLOAT_BOUNDS, INT_BOUNDS, GenerationConfig, QwenConfig,
                              ntk_alpha, parse_dtype, read_bounded_file, read_json_file)
from qwen_fast.errors import CheckpointError, ConfigError
from qwen_fast.loader import expected_shapes
from qwen_fast.testing import make_special_file

QWEN_72B = dict(vocab_size=152064, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                kv_channels=128, intermediate_size=49152, seq_length=32768,
                max_position_embeddings=32768, rotary_emb_base=1000000)


def test_release_and_largest_qwen_v1_configs_are_valid():
    QwenConfig().validate()
    cfg = QwenConfig.from_dict(dict(QWEN_72B, model_type="qwen", architectures=["QWenLMHeadModel"],
                                    use_flash_attn="auto", onnx_safe=None))   # unknown keys ignored
    assert cfg.hidden_size == 8192 and cfg.rotary_emb_base == 1e6
    assert isinstance(cfg.rotary_emb_base, float)      # JSON 1000000 normalised to the float field


@pytest.mark.parametrize("name", sorted(INT_BOUNDS))
def test_int_fields(name):
    lo, hi = INT_BOUNDS[name]
    for bad in (lo - 1, hi + 1, 10**400, float(lo + 2), str(lo + 2), True, None, [lo]):
        with pytest.raises(ConfigError, match=rf"^{name} must be an integer in \[{lo}, {hi}\], got "):
            QwenConfig.from_dict({name: bad})


@pytest.mark.parametrize("name", sorted(FLOAT_BOUNDS))
def test_float_fields(name):
    lo, hi, lo_open = FLOAT_BOUNDS[name]
    bads = [math.nan, math.inf, -math.inf, hi * 2 + 1, 10**400, str(hi), True, None, lo - 1]
    if lo_open:
        bads.append(lo)
    for bad in bads:
        with pytest.raises(ConfigError, match=rf"^{name} must be a finite number in "):
            QwenConfig.from_dict({name: bad})


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_bool_fields(name):
    for bad in ("false", "true", 0, 1, None, []):
        with pytest.raises(ConfigError, match=rf"^{name} must be true or false \(a JSON boolean\)"):
            QwenConfig.from_dict({name: bad})
    assert getattr(QwenConfig.from_dict({name: not getattr(QwenConfig(), name)}), name) \
        is not getattr(QwenConfig(), name)


@pytest.mark.parametrize("kw, match", [
    (dict(seq_length=1), r"seq_length must be an integer in \[2, "),    # log base 1 in the logn table
    (dict(kv_channels=20), r"kv_channels \* num_attention_heads = 320 must equal hidden_size = 2048"),
    (dict(intermediate_size=11007), r"intermediate_size must be even"),
    (dict(rotary_pct=0.01), r"rotary dim 1; expected an even dim in \[4, kv_channels=128\]"),
    (dict(hidden_size=4, num_attention_heads=2, kv_channels=2, intermediate_size=8),
     r"rotary dim 2; expected an even dim in \[4"),                       # dim / (dim - 2) in NTK
    (dict(quantization_config="gptq"), r"quantization_config is malformed: expected a JSON object"),
    (dict(quantization_config=[4]), r"quantization_config is malformed"),
    (dict(quantization_config={"quant_method": 4}), r"quantization_config is malformed: quant_method "
                                                    r"must be a string, got 4"),
    (dict(quantization_config={"bits": "4"}), r"quantization_config is malformed: bits must be an integer"),
    (dict(model_type="qwen2"), r"model_type is 'qwen2', expected 'qwen'"),
])
def test_config_relations(kw, match):
    with pytest.raises(ConfigError, match=match):
        QwenConfig.from_dict(kw)


def test_config_must_be_an_object():
    for bad in ([], "qwen", 3, None):
        with pytest.raises(ConfigError, match=r"config must be a JSON object"):
            QwenConfig.from_dict(bad)


def test_quantized_config_is_well_formed():
    cfg = QwenConfig.from_dict({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert cfg.quantization_summary() == "'gptq', 4 bits"


def test_direct_config_is_validated_where_used():
    """A QwenConfig built in code is checked before anything is sized from it."""
    with pytest.raises(ConfigError, match=r"num_hidden_layers must be an integer in \[1, 1024\], got 1000000000"):
        expected_shapes(QwenConfig(num_hidden_layers=10**9))
    with pytest.raises(ConfigError, match=r"use_dynamic_ntk must be true or false"):
        QwenConfig(use_dynamic_ntk="false").validate()


def test_ntk_alpha():
    assert ntk_alpha(8192, 8192) == 1 and ntk_alpha(8193, 8192) == 3 and ntk_alpha(16385, 8192) == 7
    assert ntk_alpha(3, 2) == 3
    with pytest.raises(ValueError):
        ntk_alpha(0, 8192)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match=r"dtype must be one of bfloat16, float16, float32"):
        parse_dtype("int8")


# ---------------------------------------------------------------------------------------
# GenerationConfig
# ---------------------------------------------------------------------------------------

def test_release_generation_config():
    g = GenerationConfig.from_dict({"chat_format": "chatml", "eos_token_id": 151643,
                                    "pad_token_id": 151643, "max_window_size": 6144,
                                    "max_new_tokens": 512, "do_sample": True, "top_k": 0,
                                    "top_p": 0.8, "repetition_penalty": 1.1,
                                    "transformers_version": "4.31.0"}, vocab_size=151936)
    assert g.temperature == 1.0 and g.top_p == 0.8 and g.stop_words_ids == []
    base = GenerationConfig.from_dict({"chat_format": "raw", "stop_words_ids": [[151643]], "top_p": 0.8,
                                       "temperature": 1})
    assert base.repetition_penalty == 1.0 and base.stop_words_ids == [[151643]]
    assert isinstance(base.temperature, float)


@pytest.mark.parametrize("kw, match", [
    (dict(stop_words_ids=[[1, 2]]), r"stop_words_ids: multi-token stop words are not supported"),
    (dict(stop_words_ids=[[]]), r"stop_words_ids must be a list of non-empty lists of token ids"),
    (dict(stop_words_ids=[151643]), r"stop_words_ids must be a list of non-empty lists"),
    (dict(stop_words_ids="[[151643]]"), r"stop_words_ids must be a list"),
    (dict(stop_words_ids=[[1.0]]), r"stop_words_ids must be a list of non-empty lists of token ids"),
    (dict(stop_words_ids=[[True]]), r"stop_words_ids must be a list of non-empty lists of token ids"),
    (dict(stop_words_ids=[[-1]]), r"stop_words_ids: token id -1 is outside"),
    (dict(eos_token_id=10**12), r"eos_token_id must be a token id in \[0, "),
    (dict(eos_token_id=[]), r"eos_token_id must be a token id or a non-empty list"),
    (dict(eos_token_id=["a"]), r"eos_token_id must be a token id or a non-empty list"),
    (dict(eos_token_id=1.0), r"eos_token_id must be a token id"),
    (dict(pad_token_id="0"), r"pad_token_id must be a token id"),
    (dict(top_p="0.8"), r"top_p must be a finite number in \(0, 1\], got '0.8'"),
    (dict(top_p=0), r"top_p must be a finite number in \(0, 1\]"),
    (dict(top_p=10**400), r"top_p must be a finite number"),
    (dict(temperature=math.inf), r"temperature must be a finite number in \[0, inf\]"),
    (dict(temperature=-1), r"temperature must be a finite number"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a finite number in \(0, inf\]"),
    (dict(repetition_penalty=math.nan), r"repetition_penalty must be a finite number"),
    (dict(max_new_tokens=1.5), r"max_new_tokens must be an integer in \[1, 2147483647\], got 1.5"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer in \[1, "),
    (dict(max_window_size=-1), r"max_window_size must be an integer in \[0, "),
    (dict(top_k=-2), r"top_k must be an integer in \[-1, "),
    (dict(top_k="40"), r"top_k must be an integer"),
    (dict(chat_format=3), r"chat_format must be one of \['chatml', 'raw'\], got 3"),
    (dict(chat_format="chatml2"), r"chat_format must be one of"),
    (dict(do_sample="yes"), r"do_sample must be true or false"),
    (dict(do_sample=1), r"do_sample must be true or false"),
])
def test_generation_config_fields(kw, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig.from_dict(kw, vocab_size=151936)


def test_generation_token_ids_below_vocab_size():
    g = GenerationConfig(eos_token_id=151935, stop_words_ids=[[151935]])
    g.validate(vocab_size=151936)
    g.validate()
    with pytest.raises(ConfigError, match=r"eos_token_id must be a token id in \[0, 999\] \(below the "
                                          r"model's vocab_size 1000\), got 151935"):
        g.validate(vocab_size=1000)
    with pytest.raises(ConfigError, match=r"stop_words_ids: token id 151935 is outside \[0, 151934\]"):
        GenerationConfig(eos_token_id=0, stop_words_ids=[[151935]]).validate(vocab_size=151935)


def test_generation_eos_list():
    g = GenerationConfig.from_dict({"eos_token_id": [151643, 151645], "stop_words_ids": [[151644]]})
    assert g.eos_token_id == 151643 and g.stop_words_ids == [[151644], [151645]]


def test_generation_config_must_be_an_object():
    with pytest.raises(ConfigError, match=r"generation config must be a JSON object, got list"):
        GenerationConfig.from_dict([])


def test_from_json_names_file_and_field(tmp_path):
    p = tmp_path / "generation_config.json"
    p.write_text(json.dumps({"eos_token_id": 10**12}))
    with pytest.raises(ConfigError, match=rf"^{p}: eos_token_id must be a token id in \[0, 151935\]"):
        GenerationConfig.from_json(p, vocab_size=151936)
    p.write_text('{"top_p": NaN}')
    with pytest.raises(ConfigError, match=rf"^{p}: top_p must be a finite number in \(0, 1\], got nan"):
        GenerationConfig.from_json(p)
    p.write_bytes(b'{"chat_format": "\xff"}')
    with pytest.raises(ConfigError, match=rf"^{p}: not UTF-8 text \(byte 0xff at offset 17\)"):
        GenerationConfig.from_json(p)
    c = tmp_path / "config.json"
    c.write_text('{"rotary_emb_base": Infinity}')
    with pytest.raises(ConfigError, match=rf"^{c}: rotary_emb_base must be a finite number in \[1, 1e\+12\], got inf"):
        QwenConfig.from_json(c)


# ---------------------------------------------------------------------------------------
# read_bounded_file / read_json_file
# ---------------------------------------------------------------------------------------

def test_read_bounded_file(tmp_path):
    p = tmp_path / "f.json"
    p.write_bytes(b"x" * 10)
    assert read_bounded_file(p, 10) == b"x" * 10
    with pytest.raises(ConfigError, match=rf"^{p} is 11 bytes, more than the 10 bytes allowed for the thing$"):
        p.write_bytes(b"x" * 11)
        read_bounded_file(p, 10, what="thing")
    with pytest.raises(CheckpointError, match=r"no such file; expected the file"):
        read_bounded_file(tmp_path / "nope", 10, CheckpointError)
    with pytest.raises(ConfigError, match=r"is a directory, not a regular file"):
        read_bounded_file(tmp_path, 10)
    with pytest.raises(ConfigError, match=r"cannot be read"):
        read_bounded_file(str(tmp_path / "a\0b"), 10)


def test_read_bounded_file_fifo_and_devices(tmp_path, alarm):
    fifo = tmp_path / "fifo"
    make_special_file(fifo, "fifo")
    with pytest.raises(ConfigError, match=r"fifo is a FIFO \(named pipe\), not a regular file"):
        read_bounded_file(fifo, 10)
    link = tmp_path / "zero"
    make_special_file(link, "dev_zero")
    with pytest.raises(ConfigError, match=r"zero is a character device, not a regular file"):
        read_bounded_file(link, 1 << 20)


def test_read_bounded_file_follows_symlinks(tmp_path):
    (tmp_path / "real.json").write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to("real.json")
    assert read_json_file(tmp_path / "link.json", 100) == {"a": 1}
    (tmp_path / "dangling.json").symlink_to("gone.json")
    with pytest.raises(ConfigError, match=r"dangling.json: no such file \(a broken symlink\)"):
        read_json_file(tmp_path / "dangling.json", 100)


@pytest.mark.parametrize("content, match", [
    (b"{", r"not valid JSON \(Expecting"),
    (b"[" * 100_000, r"not valid JSON \(nested too deeply\)"),
    (b"1" * 5000, r"not valid JSON \(Exceeds the limit"),
    (b"\xef\xbb\xbf{}", r"not valid JSON \(Unexpected UTF-8 BOM"),
    (b"\x80", r"not UTF-8 text \(byte 0x80 at offset 0\)"),
])
def test_read_json_file_errors(tmp_path, content, match):
    p = tmp_path / "x.json"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{p}: {match}"):
        read_json_file(p, 1 << 20, CheckpointError)
