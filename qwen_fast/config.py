"""Model and generation configuration of Qwen v1 (``QWenLMHeadModel``), read from the release's
``config.json`` / ``generation_config.json``, plus the built-in ``qwen-1.8b-chat`` config used by
``load_format="dummy"``.

Facts and traps are in qwen-spec.md §1-§2: the FFN width is ``intermediate_size // 2``, c_attn
always has a bias whatever ``no_bias`` says, and the vocabulary is padded to 151936 rows.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import ConfigError


_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: Any) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 ... -> torch dtype; only the three float types."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16, torch.float32):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of bfloat16, float16, float32 (or 'auto'), got {dtype!r}")


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 11008          # as in config.json; the real FFN width is half of it
    seq_length: int = 8192
    max_position_embeddings: int = 8192
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    initializer_range: float = 0.02
    quantization_config: Optional[dict] = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        """The MLP width: the release code uses ``intermediate_size // 2`` (5504 for 1.8B)."""
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    @property
    def max_context(self) -> int:
        """Longest sequence the release can run: its logn table has 32767 entries (spec §4)."""
        return 32767

    def default_dtype(self) -> torch.dtype:
        """The dtype the release would pick on a bf16-capable device: fp32/fp16/bf16 flags first."""
        if self.fp32:
            return torch.float32
        if self.fp16:
            return torch.float16
        return torch.bfloat16

    # ---- io ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "QwenConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt != "qwen":
            raise ConfigError(f"config.json: model_type is {mt!r}, expected 'qwen' (Qwen v1); "
                              "Qwen1.5/Qwen2 checkpoints use a different architecture")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        # config.json stores the layer-norm epsilon and flags under the same names we use.
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "QwenConfig":
        return _from_json(cls, path)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(architectures=["QWenLMHeadModel"], model_type="qwen")
        return d

    def validate(self) -> None:
        def pos_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_channels", "intermediate_size", "seq_length"):
            pos_int(name)
        if self.projection_size != self.hidden_size:
            raise ConfigError(
                f"kv_channels * num_attention_heads = {self.projection_size} must equal "
                f"hidden_size = {self.hidden_size}")
        if self.intermediate_size % 2:
            raise ConfigError(f"intermediate_size must be even (FFN width is intermediate_size // 2),"
                              f" got {self.intermediate_size}")
        if not (0 < self.rotary_pct <= 1.0) or self.rotary_dim % 2:
            raise ConfigError(f"rotary_pct={self.rotary_pct} gives rotary dim {self.rotary_dim}; "
                              "expected an even dim in (0, kv_channels]")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if not (isinstance(self.rotary_emb_base, (int, float)) and self.rotary_emb_base > 0):
            raise ConfigError(f"rotary_emb_base must be > 0, got {self.rotary_emb_base!r}")


QWEN_1_8B_CHAT = QwenConfig()

BUILTIN_CONFIGS = {"qwen-1.8b-chat": QWEN_1_8B_CHAT}


def builtin_config(name: str) -> QwenConfig:
    try:
        return dataclasses.replace(BUILTIN_CONFIGS[name.lower()])
    except KeyError:
        raise ConfigError(f"unknown built-in config {name!r}; known: {sorted(BUILTIN_CONFIGS)}") from None


@dataclass
class GenerationConfig:
    """generation_config.json of the Chat release (spec §2). temperature is absent there, so
    the transformers default 1.0 applies."""
    chat_format: str = "chatml"
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    max_window_size: int = 6144
    max_new_tokens: int = 512
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 0.8
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    stop_words_ids: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"generation config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        # The base-model release has no repetition_penalty: transformers' default is 1.0.
        kwargs.setdefault("repetition_penalty", 1.0)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        gen = cls(**kwargs)
        gen.validate()
        return gen

    def validate(self) -> None:
        """The sampling defaults must be valid sampling parameters (named in the error)."""
        from .sampling import SamplingParams
        try:
            SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           top_p=self.top_p, top_k=self.top_k,
                           repetition_penalty=self.repetition_penalty).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("eos_token_id", "max_window_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GenerationConfig":
        return _from_json(cls, path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_json(cls, path: str | os.PathLike):
    """cls.from_dict of a JSON file; every error names the file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return cls.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def ntk_alpha(true_seq_len: int, seq_length: int) -> int:
    """Dynamic-NTK alpha of the release: max(1, 2^ceil(log2(L / seq_length) + 1) - 1)."""
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)
