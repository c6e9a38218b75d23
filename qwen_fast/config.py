"""Model and generation configuration of Qwen v1 (``QWenLMHeadModel``), read from the release's
``config.json`` / ``generation_config.json``, plus the built-in ``qwen-1.8b-chat`` config used by
``load_format="dummy"``.

Facts and traps are in qwen-spec.md §1-§2: the FFN width is ``intermediate_size // 2``, c_attn
always has a bias whatever ``no_bias`` says, and the vocabulary is padded to 151936 rows.

Every file of a checkpoint is opened through :func:`read_bounded_file` (or, for the weight files
that are memory-mapped, :func:`open_regular_file`): it must be a regular file after symlinks are
followed (a FIFO would block forever, ``/dev/zero`` never ends) and no larger than a stated cap,
so a bad path gives an error naming the file instead of a hang or a MemoryError.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import ConfigError

# ---- bounded reads of regular files ----------------------------------------------------------

#: Size caps of the small files of a checkpoint. The release's are 910 B (config.json), 249 B
#: (generation_config.json), 14.7 kB (the index) and 2.56 MB (qwen.tiktoken).
MAX_CONFIG_BYTES = 1 << 20          # config.json, generation_config.json: 1 MiB
MAX_INDEX_BYTES = 16 << 20          # model.safetensors.index.json: 16 MiB
MAX_VOCAB_BYTES = 16 << 20          # qwen.tiktoken: 16 MiB

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular_file(path: str | os.PathLike, error: type = ConfigError, what: str = "file"):
    """Open ``path`` for binary reading; it must be a regular file once symlinks are followed.

    Never blocks (a FIFO is refused before it is opened, and opened non-blocking in case it
    was swapped in meanwhile) and never opens a device. Every failure raises ``error`` (a
    ValueError subclass of ours) naming the file and saying what was expected (``what``).
    Returns a buffered binary file object; the caller closes it.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        broken = " (a broken symlink)" if os.path.islink(p) else ""
        raise error(f"{p}: no such file{broken}; expected the {what}") from None
    except (OSError, ValueError) as e:      # ValueError: a NUL byte in the path
        raise error(f"{p}: cannot be read ({getattr(e, 'strerror', None) or e}); expected the "
                    f"{what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{p} is {_kind(st.st_mode)}, not a regular file; expected the {what}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except OSError as e:
        raise error(f"{p}: cannot be opened ({e.strerror}); expected the {what}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p} is {_kind(st.st_mode)}, not a regular file; expected the {what}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded_file(path: str | os.PathLike, max_bytes: int, error: type = ConfigError,
                      what: str = "file") -> bytes:
    """All bytes of the regular file ``path``, which must hold at most ``max_bytes``.

    The one helper every small checkpoint file is read with (config.json,
    generation_config.json, the index, qwen.tiktoken). Raises ``error`` naming the file for a
    missing, unreadable, non-regular (FIFO, device, directory) or oversized file; it never
    reads more than ``max_bytes + 1`` bytes.
    """
    p = os.fspath(path)
    with open_regular_file(p, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{p} is {size} bytes, more than the {max_bytes} bytes allowed for the "
                        f"{what}")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{p}: read failed ({e.strerror}); expected the {what}") from None
    if len(data) > max_bytes:       # it grew while we read it
        raise error(f"{p} holds more than the {max_bytes} bytes allowed for the {what}")
    return data


def read_json_file(path: str | os.PathLike, max_bytes: int, error: type = ConfigError,
                   what: str = "JSON file") -> Any:
    """Parse a bounded regular file as UTF-8 JSON; every failure is ``error`` naming the file.

    Python's json module accepts NaN/Infinity literals and integers of any size; the values are
    checked by whoever uses them. Nesting too deep for the parser (RecursionError) and integers
    too long to convert (ValueError) are reported as malformed JSON, not leaked.
    """
    p = os.fspath(path)
    data = read_bounded_file(p, max_bytes, error, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    f"expected the {what} as UTF-8 JSON") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{p}: not valid JSON (nested too deeply); expected the {what}") from None
    except ValueError as e:     # JSONDecodeError, or an integer with too many digits
        raise error(f"{p}: not valid JSON ({e}); expected the {what}") from None


# ---- value checks --------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _check_int(name: str, v, lo: int, hi: int) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _check_float(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number (int or float) in [lo, hi] (or (lo, hi]); returns it as a float."""
    ok = False
    if _is_real(v):
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        ok = math.isfinite(f) and (lo < f if lo_open else lo <= f) and f <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {_short(v)}")
    return f


def _check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false (a JSON boolean), got {_short(v)}")
    return v


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
    raise ConfigError(f"dtype must be one of bfloat16, float16, float32 (or 'auto'), got {dtype!r}")


#: Integer fields of QwenConfig: (min, max). Generous for every Qwen v1 size (Qwen-72B:
#: hidden 8192, 80 layers, 64 heads, intermediate 49152, vocab 152064, seq_length 32768), small
#: enough that nothing is allocated or enumerated from an absurd value.
INT_BOUNDS = {
    "vocab_size": (1, 1 << 20),
    "hidden_size": (1, 65536),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "kv_channels": (1, 4096),
    "intermediate_size": (2, 1 << 20),
    "seq_length": (2, 1 << 20),             # log base seq_length (logn) and L / seq_length (NTK)
    "max_position_embeddings": (1, 1 << 20),
}
#: Float fields: (min, max, min excluded).
FLOAT_BOUNDS = {
    "rotary_emb_base": (1.0, 1e12, False),  # < 1 gives frequencies > 1 rad/position (fp32 overflow)
    "rotary_pct": (0.0, 1.0, True),
    "layer_norm_epsilon": (0.0, 1.0, True),
    "initializer_range": (0.0, 1.0, False),
}
BOOL_FIELDS = ("use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings",
               "bf16", "fp16", "fp32", "use_cache_quantization")


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
    # The release's int8 KV cache; kv_cache_dtype="auto" then means our int8 cache (README:
    # "int8 KV cache" says how its numerics differ from the release's).
    use_cache_quantization: bool = False

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
        """From a config.json object; unknown keys are ignored, known ones fully checked."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt != "qwen":
            raise ConfigError(f"model_type is {_short(mt)}, expected 'qwen' (Qwen v1); "
                              "Qwen1.5/Qwen2 checkpoints use a different architecture")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        cfg = cls(**kwargs)
        cfg.validate()
        for name in FLOAT_BOUNDS:      # JSON writes 10000 for 10000.0
            setattr(cfg, name, float(getattr(cfg, name)))
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "QwenConfig":
        return _from_json(cls, path)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(architectures=["QWenLMHeadModel"], model_type="qwen")
        return d

    def validate(self) -> None:
        """Check every field by type and range (ConfigError naming the field); see INT_BOUNDS,
        FLOAT_BOUNDS and BOOL_FIELDS for the accepted ranges."""
        for name, (lo, hi) in INT_BOUNDS.items():
            _check_int(name, getattr(self, name), lo, hi)
        for name, (lo, hi, lo_open) in FLOAT_BOUNDS.items():
            _check_float(name, getattr(self, name), lo, hi, lo_open)
        for name in BOOL_FIELDS:
            _check_bool(name, getattr(self, name))
        if self.projection_size != self.hidden_size:
            raise ConfigError(
                f"kv_channels * num_attention_heads = {self.projection_size} must equal "
                f"hidden_size = {self.hidden_size}")
        if self.intermediate_size % 2:
            raise ConfigError(f"intermediate_size must be even (FFN width is intermediate_size // 2),"
                              f" got {self.intermediate_size}")
        if self.rotary_dim % 2 or self.rotary_dim < 4:
            # The NTK base is base * alpha ** (dim / (dim - 2)): dim 2 divides by zero.
            raise ConfigError(f"rotary_pct={self.rotary_pct} gives rotary dim {self.rotary_dim}; "
                              f"expected an even dim in [4, kv_channels={self.kv_channels}]")
        q = self.quantization_config
        if q is not None:
            if not isinstance(q, dict):
                raise ConfigError(f"quantization_config is malformed: expected a JSON object such as "
                                  f'{{"quant_method": "gptq", "bits": 4, ...}}, got {_short(q)}')
            if "quant_method" in q and not isinstance(q["quant_method"], str):
                raise ConfigError(f"quantization_config is malformed: quant_method must be a string, "
                                  f"got {_short(q['quant_method'])}")
            if "bits" in q and not _is_int(q["bits"]):
                raise ConfigError(f"quantization_config is malformed: bits must be an integer, got "
                                  f"{_short(q['bits'])}")

    def quantization_summary(self) -> Optional[str]:
        """'gptq, 4 bits' for a (validated) quantization_config, else None."""
        q = self.quantization_config
        if q is None:
            return None
        return f"{_short(q.get('quant_method', 'gptq'), 20)}, {q.get('bits', '?')} bits"


QWEN_1_8B_CHAT = QwenConfig()

BUILTIN_CONFIGS = {"qwen-1.8b-chat": QWEN_1_8B_CHAT}


def builtin_config(name: str) -> QwenConfig:
    try:
        return dataclasses.replace(BUILTIN_CONFIGS[name.lower()])
    except KeyError:
        raise ConfigError(f"unknown built-in config {name!r}; known: {sorted(BUILTIN_CONFIGS)}") from None


CHAT_FORMATS = ("chatml", "raw")
#: Upper bound of the integer fields of generation_config.json.
GEN_INT_MAX = (1 << 31) - 1


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
    def from_dict(cls, d: dict, vocab_size: Optional[int] = None) -> "GenerationConfig":
        """From a generation_config.json object. null values mean "default"; a list
        eos_token_id (transformers allows several) gives the first as eos_token_id and the
        others as single-token stop words."""
        if not isinstance(d, dict):
            raise ConfigError(f"generation config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        # The base-model release has no repetition_penalty: transformers' default is 1.0.
        kwargs.setdefault("repetition_penalty", 1.0)
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            if not eos or not all(_is_int(t) for t in eos):
                raise ConfigError(f"eos_token_id must be a token id or a non-empty list of token "
                                  f"ids, got {_short(eos)}")
            kwargs["eos_token_id"] = eos[0]
            if len(eos) > 1:
                stops = kwargs.get("stop_words_ids", [])
                if isinstance(stops, list):
                    kwargs["stop_words_ids"] = stops + [[t] for t in eos[1:]]
        gen = cls(**kwargs)
        gen.validate(vocab_size=vocab_size)
        return gen

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Check every field by type and range (ConfigError naming it) and normalise the float
        fields to float. Token ids (eos_token_id, pad_token_id, stop_words_ids) must be below
        ``vocab_size`` when it is given (from_pretrained passes the model's)."""
        if not isinstance(self.chat_format, str) or self.chat_format not in CHAT_FORMATS:
            raise ConfigError(f"chat_format must be one of {list(CHAT_FORMATS)}, got "
                              f"{_short(self.chat_format)}")
        _check_bool("do_sample", self.do_sample)
        id_max = GEN_INT_MAX if vocab_size is None else vocab_size - 1
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v <= id_max:
                where = f" (below the model's vocab_size {vocab_size})" if vocab_size is not None else ""
                raise ConfigError(f"{name} must be a token id in [0, {id_max}]{where}, got {_short(v)}")
        _check_int("max_window_size", self.max_window_size, 0, GEN_INT_MAX)
        _check_int("max_new_tokens", self.max_new_tokens, 1, GEN_INT_MAX)
        _check_int("top_k", self.top_k, -1, GEN_INT_MAX)
        self.top_p = _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        self.temperature = _check_float("temperature", self.temperature, 0.0, math.inf)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty,
                                               0.0, math.inf, lo_open=True)
        sw = self.stop_words_ids
        if not isinstance(sw, list) or not all(isinstance(s, list) and s and all(_is_int(t) for t in s)
                                               for s in sw):
            raise ConfigError(f"stop_words_ids must be a list of non-empty lists of token ids, e.g. "
                              f"[[151643]], got {_short(sw)}")
        multi = [s for s in sw if len(s) != 1]
        if multi:
            raise ConfigError(f"stop_words_ids: multi-token stop words are not supported (only "
                              f"single-token ones such as [151643]), got {_short(multi[0])}")
        bad = [s[0] for s in sw if not 0 <= s[0] <= id_max]
        if bad:
            raise ConfigError(f"stop_words_ids: token id {_short(bad[0])} is outside [0, {id_max}]")
        # The sampling defaults must also be valid sampling parameters (same rules as a request).
        from .sampling import SamplingParams
        try:
            SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           top_p=self.top_p, top_k=self.top_k,
                           repetition_penalty=self.repetition_penalty).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike, vocab_size: Optional[int] = None) -> "GenerationConfig":
        return _from_json(cls, path, vocab_size=vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_json(cls, path: str | os.PathLike, **kwargs):
    """cls.from_dict of a bounded JSON file; every error names the file."""
    what = "generation config" if cls is GenerationConfig else "model config"
    d = read_json_file(path, MAX_CONFIG_BYTES, ConfigError, f"{what} (a JSON object)")
    try:
        return cls.from_dict(d, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from None


def ntk_alpha(true_seq_len: int, seq_length: int) -> int:
    """Dynamic-NTK alpha of the release: max(1, 2^ceil(log2(L / seq_length) + 1) - 1)."""
    if true_seq_len < 1 or seq_length < 1:
        raise ValueError(f"ntk_alpha needs a positive length and seq_length, got "
                         f"{true_seq_len} and {seq_length}")
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)
