"""GPTQ "v1" weight format (AutoGPTQ's ``checkpoint_format`` "gptq", as in Qwen-1_8B-Chat-Int4
and -Int8): its config, packing and unpacking, reference dequantization and round-to-nearest
(RTN) quantization of one matrix (qwen-spec.md §1.2, §3.3). Writing checkpoints is
qwen_fast/quant.py's; reading them qwen_fast/loader.py's. This module imports neither.

## The GPTQ v1 layout

A quantized ``nn.Linear`` with K inputs and N outputs (weight W [N, K]), ``bits`` = 4 or 8,
``per = 32 // bits`` values to an int32 word, G groups of inputs, is five tensors:

    qweight  int32    [K / per, N]   q, packed along the INPUT dim (transposed vs W)
    qzeros   int32    [G, N / per]   zero - 1, packed along the OUTPUT dim
    scales   float16  [G, N]
    g_idx    int32    [K]            group of input k: k // group_size (no act-order)
    bias     float16  [N]            AutoGPTQ <= 0.7 writes it for every layer: zeros,
                                     except c_attn's real bias

Below q[k, n] is the quantized value of W[n, k] (the functions of this module take and return
q as [N, K], like ``nn.Linear.weight``). Values are little-endian bit fields, field j = bits
``j*bits .. j*bits + bits - 1`` of the word (j = 0 the least significant):

- ``qweight[r, n]`` field j holds q[k = per*r + j, n]: 4 bits, nibble j is q[8r + j, n];
  8 bits, byte j is q[4r + j, n].
- ``qzeros[g, c]`` field j holds the zero of group g, output n = per*c + j, stored as
  ``zero - 1`` (the v1 convention). It is read as ``(field & mask) + 1`` (mask first, then
  + 1, as AutoGPTQ 0.4/0.5 do; 0.7.1 adds first, which differs only for a stored 15 / 255),
  so real zeros are 1 .. 2**bits. Symmetric quantization (``sym``) uses zero = 2**(bits-1):
  stored 7 (every word 0x77777777) or 127 (0x7F7F7F7F).
- ``group_size`` is 128 in the release; -1 means one group of all K inputs (G = 1).
- Dequantization: ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``, then
  ``y = x @ W.T + bias``.

Worked example: K = 16, N = 8, group_size 8 (so G = 2), 4 bits, q[k, n] = (k + n) % 16 and
an asymmetric zero[g, n] = g + n + 1:

    qweight [2, 8]   n = 0        n = 1        n = 2        ...  n = 7
        r = 0        0x76543210   0x87654321   0x98765432        0xEDCBA987
        r = 1        0xFEDCBA98   0x0FEDCBA9   0x10FEDCBA        0x6543210F
    qweight[0, 1]: nibble j is q[j, 1] = j + 1            (q[0..7, 1] = 1, ..., 8)
    qweight[1, 1]: nibble j is q[8 + j, 1] = (9 + j) % 16 (9, ..., 15, 0)
    qzeros [2, 1]    g = 0: 0x76543210 (nibble j = zero[0, n=j] - 1 = j)
                     g = 1: 0x87654321 (nibble j = zero[1, n=j] - 1 = j + 1)
    g_idx [16]       0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1
    W[1, 9] = scales[1, 1] * (q[9, 1] - zero[1, 1]) = scales[1, 1] * (10 - 3)

The file holds the words as int32: 0xFEDCBA98 is -19088744, 0x87654321 is -2023406815.

Size: per weight, ``bits`` plus one fp16 scale and one ``bits``-bit zero per group of
``group_size`` inputs and output, i.e. ``bits + (16 + bits) / group_size`` bits: 4.156 bits
(0.52 bytes) for 4 bits, group 128; 8.19 bits (1.02 bytes) for 8 bits. g_idx (4 bytes per
input) and bias (2 bytes per output) add a little per layer.

Only "gptq" (v1) is read: "gptq_v2" stores the zeros without the -1 offset and "marlin" is
another layout, so both are refused rather than misread.

## Our kernel layout

At load time every quantized Linear is repacked, one layer at a time, into what the int4/int8
kernel (csrc/cpu/quant_linear.cpp) streams: ``qwen_fast.qweight.QuantWeight`` (its docstring has
the byte order). The outputs go in tiles of 16; a tile is one uint8 row, and for each of its
C = ceil(K / 128) chunks of 128 inputs it holds

    q    the 16 x 128 values as 64-byte vectors whose 32-bit lane r holds four consecutive
         inputs of output r (int4: 1024 bytes, the low nibbles inputs 0..63 of the chunk, the
         high nibbles 64..127; int8: 2048 bytes)
    s    16 fp16 scales (the chunk's group's, one per output, as GPTQ stores them)
    z    16 real zeros, uint8 (int4) or uint16 (int8: GPTQ v1's real zeros reach 256)

so a tile's weights are one sequential read, and one vpdpbusd adds four products to each of
16 outputs with no horizontal sums; per chunk the kernel widens s and forms s * z in fp32
(exact). Per weight that is 4.19 bits (0.5234 bytes) for int4 and 8.25 bits (1.031 bytes)
for int8, against GPTQ's 4.16 / 8.19 bits per group of 128. (The first layout stored s and
s * z in fp32, 4.5 and 8.5 bits, with the same results bit for bit.) For Qwen-1.8B's 24 blocks
that is 636 MB (int4) and 1.25 GB (int8); lm_head adds 163 MB (int4), 321 MB (int8) or 622 MB
(bf16).

Worked example (int4, the same W[1, 9] as above, K = 16 so C = 1 chunk, padded to 128 inputs
with q = 0, N = 8 padded to one tile of 16 with zero rows): the tile's chunk record is 1024
bytes of q, in which lane r = 1 of vector j holds q[1, 4j .. 4j + 3] (| q[1, 64 + 4j ..] << 4),
then s with s[1] = scales[g, 1], then z. Because
a chunk has one scale, a group must cover whole chunks: group_size a multiple of 128 (or -1);
the example's group_size 8 is refused by the kernel layout (QuantWeight.from_components says
so), though this module reads and writes it. Act-order checkpoints (desc_act, g_idx not
k // group_size) are handled by sorting the inputs by group at load (a permutation the kernel
applies to x), not refused.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .config import MAX_CONFIG_BYTES, _is_int, _short, read_json_file
from .errors import ConfigError

#: The per-block Linears the release quantizes (tensor f"transformer.h.{i}.{name}.weight").
QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
QUANTIZE_CONFIG_NAME = "quantize_config.json"
#: Elements of a weight matrix handled at once by quantize_rtn, pack_gptq and unpack_gptq
#: (whole rows): bounds their fp32 temporaries to a few times 16 MiB.
BLOCK_ELEMENTS = 1 << 22
#: A quantized Linear's tensor name -> (its prefix, "weight" or "bias").
LINEAR_RE = re.compile(r"(transformer\.h\.\d+\.(?:%s))\.(weight|bias)"
                       % "|".join(map(re.escape, QUANTIZED_LINEARS)))


# ---- config ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GptqConfig:
    """The fields of a GPTQ quantize_config.json that decide how the tensors are read."""
    bits: int
    group_size: int
    desc_act: bool
    sym: bool

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "GptqConfig":
        """From quantize_config.json or config.json's quantization_config. Other keys
        (damp_percent, static_groups, true_sequential, ...) are ignored; quant_method and
        checkpoint_format must be "gptq" when present. ConfigError naming ``source``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object such as {{\"bits\": 4, "
                              f"\"group_size\": 128, ...}}, got {_short(d)}")
        for key in ("quant_method", "checkpoint_format"):
            if key in d and d[key] != "gptq":
                raise ConfigError(f"{source}: {key} is {_short(d[key])}; only 'gptq' (AutoGPTQ's "
                                  "v1 layout, zeros stored as zero - 1) is supported")
        if d.get("is_marlin_format", False) is not False:
            raise ConfigError(f"{source}: is_marlin_format is {_short(d['is_marlin_format'])}; "
                              "the Marlin layout is not supported, only GPTQ v1")
        missing = [k for k in ("bits", "group_size", "desc_act", "sym") if k not in d]
        if missing:
            raise ConfigError(f"{source}: no {missing[0]!r} field (bits, group_size, desc_act and "
                              "sym are all needed)")
        bits, group_size = d["bits"], d["group_size"]
        if not _is_int(bits) or bits not in (4, 8):
            raise ConfigError(f"{source}: bits must be 4 or 8, got {_short(bits)}")
        if not _is_int(group_size) or not (group_size == -1 or group_size > 0):
            raise ConfigError(f"{source}: group_size must be -1 (one group of all inputs) or a "
                              f"positive integer, got {_short(group_size)}")
        for key in ("desc_act", "sym"):
            if not isinstance(d[key], bool):
                raise ConfigError(f"{source}: {key} must be true or false, got {_short(d[key])}")
        return cls(bits, group_size, d["desc_act"], d["sym"])

    def to_dict(self) -> dict:
        """The release's quantize_config.json fields (qwen-spec.md §1.2)."""
        return {"bits": self.bits, "group_size": self.group_size, "damp_percent": 0.01,
                "desc_act": self.desc_act, "static_groups": False, "sym": self.sym,
                "true_sequential": True, "model_name_or_path": None,
                "model_file_base_name": "model"}


def read_gptq_config(model_dir: str | os.PathLike) -> Optional[GptqConfig]:
    """The GPTQ config of a checkpoint directory: from quantize_config.json, else from
    config.json's quantization_config (whose quant_method must be "gptq"); None when neither
    exists. ConfigError when a file is malformed or the two disagree."""
    model_dir = Path(model_dir)
    found = {}
    path = model_dir / QUANTIZE_CONFIG_NAME
    if os.path.lexists(path):
        found[str(path)] = GptqConfig.from_dict(
            read_json_file(path, MAX_CONFIG_BYTES, ConfigError, "GPTQ quantize config"), str(path))
    path = model_dir / "config.json"
    if os.path.lexists(path):
        d = read_json_file(path, MAX_CONFIG_BYTES, ConfigError, "model config (a JSON object)")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got a JSON {type(d).__name__}")
        q = d.get("quantization_config")
        if q is not None:
            source = f"{path} quantization_config"
            if not isinstance(q, dict) or q.get("quant_method") != "gptq":
                method = q.get("quant_method") if isinstance(q, dict) else q
                raise ConfigError(f"{source}: quant_method must be 'gptq', got {_short(method)}")
            found[source] = GptqConfig.from_dict(q, source)
    if len(set(found.values())) > 1:
        (a, ca), (b, cb) = found.items()
        raise ConfigError(f"{a} ({ca}) and {b} ({cb}) disagree")
    return next(iter(found.values()), None)


# ---- packing ---------------------------------------------------------------------------------

def _check_bits(bits) -> int:
    if not _is_int(bits) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {_short(bits)}")
    return 32 // bits


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_int_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.is_floating_point() \
            or t.is_complex() or t.dtype == torch.bool:
        what = f"{t.dtype} {_shape(t)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {ndim}-D integer tensor {layout}, got {what}")


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """ValueError unless every value of ``t`` is in [lo, hi]."""
    if t.numel():
        tmin, tmax = (int(v) for v in torch.aminmax(t))
        if tmin < lo or tmax > hi:
            raise ValueError(f"{name} values must be {what} in [{lo}, {hi}], got values in "
                             f"[{tmin}, {tmax}]")


def gptq_shapes(n: int, k: int, bits: int, group_size: int,
                name: str = "weight") -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """{"qweight", "qzeros", "scales", "g_idx"}: (shape, dtype) for an [n, k] (out, in) weight.

    ValueError naming ``name`` unless group_size (-1 = all of k) divides k and 32 / bits
    divides both n and k."""
    per = _check_bits(bits)
    gs = k if group_size == -1 else group_size
    if not _is_int(gs) or gs <= 0 or k % gs:
        raise ValueError(f"{name} has {k} inputs (shape [{n}, {k}]), not a multiple of "
                         f"group_size {_short(group_size)}")
    if n % per or k % per:
        raise ValueError(f"{name} has shape [{n}, {k}]; with bits={bits} both outputs and inputs "
                         f"must be multiples of {per} (values per int32)")
    g = k // gs
    return {"qweight": ((k // per, n), torch.int32), "qzeros": ((g, n // per), torch.int32),
            "scales": ((g, n), torch.float16), "g_idx": ((k,), torch.int32)}


def _pack_last(x: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values < 2**bits [..., C] -> int32 [..., C * bits / 32], value j of every run of
    32 / bits in field j of the word (little-endian bytes: field 0 in the lowest byte)."""
    if bits == 4:
        x = x.reshape(*x.shape[:-1], -1, 2)
        x = x[..., 0] | (x[..., 1] << 4)
    return x.flatten().view(torch.int32).reshape(*x.shape[:-1], -1)


def _unpack_last(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of _pack_last: int32 [..., W] -> uint8 [..., W * 32 / bits]."""
    b = w.flatten().view(torch.uint8).reshape(*w.shape[:-1], -1)
    if bits == 4:
        b = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)
    return b


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> Dict[str, torch.Tensor]:
    """GPTQ v1 tensors {"qweight", "qzeros", "scales", "g_idx"} from q [N, K] (integers in
    [0, 2**bits)), the REAL zeros [G, N] (integers in [1, 2**bits]: stored as zero - 1),
    scales fp16 [G, N] and g_idx [K] (integers in [0, G)). ValueError naming the tensor for
    any other shape, dtype or value; N and K must be multiples of 32 / bits."""
    per = _check_bits(bits)
    _check_int_tensor("q", q, 2, "[N, K] (out, in)")
    _check_int_tensor("zeros", zeros, 2, "[G, N]")
    _check_int_tensor("g_idx", g_idx, 1, "[K]")
    n, k = q.shape
    if n % per or k % per or not n or not k:
        raise ValueError(f"q has shape {_shape(q)}; with bits={bits} both N (outputs) and K "
                         f"(inputs) must be positive multiples of {per} (values per int32)")
    if zeros.shape[1] != n or not zeros.shape[0]:
        raise ValueError(f"zeros has shape {_shape(zeros)}; with q of {n} outputs it must be "
                         f"[G, {n}], G >= 1")
    g = zeros.shape[0]
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float16 \
            or scales.shape != (g, n):
        what = f"{scales.dtype} {_shape(scales)}" if isinstance(scales, torch.Tensor) else \
            type(scales).__name__
        raise ValueError(f"scales must be float16 [{g}, {n}] like zeros, got {what}")
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx has shape {_shape(g_idx)}; with q of {k} inputs it must be [{k}]")
    maxq = (1 << bits) - 1
    _check_range("q", q, 0, maxq, f"{bits}-bit codes")
    _check_range("zeros", zeros, 1, maxq + 1, "real zero points (stored as zero - 1)")
    _check_range("g_idx", g_idx, 0, g - 1, f"group indices (zeros has {g} groups)")
    qweight = torch.empty((k // per, n), dtype=torch.int32)
    rows = max(1, BLOCK_ELEMENTS // k)
    for r in range(0, n, rows):
        qweight[:, r:r + rows] = _pack_last(q[r:r + rows].to(torch.uint8), bits).T
    return {"qweight": qweight, "qzeros": _pack_last((zeros - 1).to(torch.uint8), bits),
            "scales": scales.contiguous(), "g_idx": g_idx.to(torch.int32).contiguous()}


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_gptq: (q [N, K] uint8, real zeros [G, N] int16, scales [G, N] fp16,
    g_idx [K] int64). K is g_idx's length and [G, N] scales' shape; qweight and qzeros must
    match them (ValueError naming the tensor and the shape it must have), and every g_idx
    value must be in [0, G)."""
    per = _check_bits(bits)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float16 or scales.ndim != 2:
        what = f"{scales.dtype} {_shape(scales)}" if isinstance(scales, torch.Tensor) else \
            type(scales).__name__
        raise ValueError(f"scales must be a 2-D float16 tensor [G, N], got {what}")
    _check_int_tensor("g_idx", g_idx, 1, "[K]")
    g, n = scales.shape
    k = g_idx.shape[0]
    if not k or k % per:
        raise ValueError(f"g_idx has {k} inputs; with bits={bits} K must be a positive multiple "
                         f"of {per}")
    if not g or not n or n % per:
        raise ValueError(f"scales has shape {_shape(scales)}; with bits={bits} it must be [G, N] "
                         f"with G >= 1 and N a positive multiple of {per}")
    for name, t, shape, why in (
            ("qweight", qweight, (k // per, n), f"g_idx of {k} inputs and scales of {n} outputs"),
            ("qzeros", qzeros, (g, n // per), f"scales of shape [{g}, {n}]")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {_shape(t)}; with bits={bits} and {why} it must "
                             f"be {list(shape)}")
    _check_range("g_idx", g_idx, 0, g - 1, f"group indices (scales has {g} groups)")
    q = torch.empty((n, k), dtype=torch.uint8)
    rows = max(1, BLOCK_ELEMENTS // k)
    for r in range(0, n, rows):
        q[r:r + rows] = _unpack_last(qweight[:, r:r + rows].T, bits)
    zeros = _unpack_last(qzeros, bits).to(torch.int16) + 1
    return q, zeros, scales, g_idx.to(torch.int64)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """The reference dequantization, W [N, K] = scales * (q - zero) per input's group, computed
    in fp32 (exact: an fp16 scale times a small integer), then cast to ``dtype``."""
    q, zeros, scales, g_idx = unpack_gptq(qweight, qzeros, scales, g_idx, bits)
    s = scales.float().T[:, g_idx]
    z = zeros.T[:, g_idx]
    return (s * (q.to(torch.int16) - z)).to(dtype)


# ---- round-to-nearest quantization -----------------------------------------------------------

def fp16_round_up(s: torch.Tensor) -> torch.Tensor:
    """Positive fp32 -> the smallest fp16 >= it (the next larger bit pattern when rounding to
    nearest went down; a value below the smallest subnormal becomes that subnormal)."""
    h = s.to(torch.float16)
    return torch.where(h.float() < s, (h.view(torch.int16) + 1).view(torch.float16), h)


def group_params(x: torch.Tensor, bits: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, real zero as fp32) of each group of x [..., group] (fp32), by quantize_rtn's
    rules below; ValueError when a scale exceeds the fp16 range."""
    maxq = (1 << bits) - 1
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    half = 1 << (bits - 1)
    s = torch.maximum(hi / (half - 1), -lo / half) if sym else \
        torch.maximum((hi - lo) / maxq, hi / (maxq - 1))
    s16 = fp16_round_up(torch.where(s == 0, 1.0, s))
    if bool(torch.isinf(s16).any()):
        raise ValueError(f"w has weights up to {float(torch.maximum(-lo, hi).max()):.4g} in "
                         f"magnitude: their {bits}-bit scale exceeds the float16 range (65504)")
    sf = s16.float()
    z = torch.full_like(sf, 1 << (bits - 1)) if sym else (-lo / sf).round().clamp(1, maxq)
    return s16, z


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int,
                 sym: bool = True) -> Dict[str, torch.Tensor]:
    """Round-to-nearest GPTQ v1 tensors (pack_gptq's dict, g_idx = k // group_size) of a weight
    w [N, K] of any float dtype, per (group of ``group_size`` inputs, output):

    - sym: zero = 2**(bits-1) (8 for 4 bits, as the release), and the smallest scale that
      represents both extremes: max(max(w) / (2**(bits-1) - 1), -min(w) / 2**(bits-1)), i.e.
      max(hi / 7, -lo / 8) for 4 bits. The release's AutoGPTQ rule, 2 max|w| / 15, puts a
      positive extreme at 7.5 steps, past the top code, and so clips it to 7/7.5 of itself;
      on the trained fixture (benchmarks/bench_quality.py) that rule gave int4 GPTQ a KL of
      0.0225 from bf16, this one 0.0057 (RTN 0.0295 -> 0.0092). Same format, same loader.
    - asym: lo = min(w, 0), hi = max(w, 0) (the range always includes 0),
      scale = max((hi - lo) / (2**bits - 1), hi / (2**bits - 2)),
      zero = round(-lo / scale) clamped to [1, 2**bits - 1]. The v1 format cannot store a zero
      of 0 (stored zero - 1 would be -1), so a group with (almost) no negative weights gets the
      second term: zero 1, with hi on the top code. A zero of 2**bits is never needed, so the
      stored 15 / 255 that AutoGPTQ versions read differently (see above) is never written.
    - An all-zero group gets scale 1 (every code is the zero and dequantizes to exactly 0).
    - The scale is stored in fp16 rounded UP to the next fp16 (never down) and q is computed
      with that stored value: q = clamp(round(w / scale) + zero, 0, 2**bits - 1). So
      dequantize_gptq reproduces exactly the chosen levels and every weight is within
      scale / 2 of its level (scale = the stored fp16 value; up to fp32 rounding of w / scale).

    Works in fp32 on blocks of whole rows (about BLOCK_ELEMENTS values), so a [151936, 2048]
    matrix needs no full-size fp32 copy. ValueError for NaN/Inf weights, a scale beyond the
    fp16 range or a shape the format cannot store (see gptq_shapes)."""
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
        what = f"{w.dtype} {_shape(w)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a 2-D float tensor [N, K] (out, in), got {what}")
    if not isinstance(sym, bool):
        raise ValueError(f"sym must be True or False, got {_short(sym)}")
    n, k = w.shape
    g = gptq_shapes(n, k, bits, group_size, "w")["scales"][0][0]
    gs, maxq = k // g, (1 << bits) - 1
    q = torch.empty((n, k), dtype=torch.uint8)
    scales = torch.empty((n, g), dtype=torch.float16)
    zeros = torch.empty((n, g), dtype=torch.int16)
    rows = max(1, BLOCK_ELEMENTS // k)
    for r in range(0, n, rows):
        x = w[r:r + rows].float().reshape(-1, g, gs)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"w holds NaN or Inf (in rows {r}..{r + x.shape[0] - 1})")
        s16, z = group_params(x, bits, sym)
        sf = s16.float()
        codes = (x / sf[..., None]).round_().add_(z[..., None]).clamp_(0, maxq)
        q[r:r + rows] = codes.reshape(-1, k).to(torch.uint8)
        scales[r:r + rows] = s16
        zeros[r:r + rows] = z.to(torch.int16)
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    return pack_gptq(q, zeros.T, scales.T.contiguous(), g_idx, bits)


# ---- checkpoints -----------------------------------------------------------------------------
