"""safetensors files: reading a header by the library's own rules (before the library is trusted
with a file), and writing shards one tensor at a time. The loader reads through it, the
quantizer writes through it; the tensors' data is read by the safetensors library itself.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from .config import open_regular_file
from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Bytes per element of the dtypes every safetensors version since 0.4 (our minimum) knows.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
                "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
#: safetensors' own limit on the JSON header (MAX_HEADER_SIZE in its tensor.rs).
MAX_HEADER_BYTES = 100_000_000
_USIZE_MAX = 2**64 - 1          # shapes and offsets are usize in safetensors
#: The dtypes write_safetensors writes, by their safetensors names.
_ST_NAMES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# ---- safetensors header ----------------------------------------------------------------------

class _HeaderSyntax(ValueError):
    pass


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _HeaderSyntax(f"duplicate key {_short(k)}")
        d[k] = v
    return d


def _parse_int(s: str):
    if s.startswith("-"):
        # Every integer of a header is unsigned; '-0' is a float to serde_json.
        raise _HeaderSyntax(f"negative number {s[:40]}")
    if len(s) > 20:
        raise _HeaderSyntax(f"number {s[:40]}... is out of range")
    return int(s)


def _parse_float(s: str):
    f = float(s)
    if not math.isfinite(f):
        raise _HeaderSyntax(f"number {s[:40]} is out of range")
    return f


def _parse_constant(s: str):
    raise _HeaderSyntax(f"{s} is not valid JSON")


def _check_strings(obj) -> None:
    """Every key and string value must be valid Unicode (no lone surrogates from \\ud800
    escapes: Python accepts them, safetensors' JSON parser does not)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                k.encode("utf-8")
                stack.append(v)
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, str):
            o.encode("utf-8")


def read_safetensors_header(path: Path) -> Dict[str, dict]:
    """Parse and validate a safetensors header by the safetensors library's own rules.

    Returns {name: {"dtype", "shape", "data_offsets"}} (``__metadata__`` removed). Raises
    CheckpointError naming the file (and the tensor) for: a non-regular file, a file too short,
    a header length beyond the file or safetensors' 100,000,000-byte limit, a header that is
    not UTF-8 or not a JSON object, ``__metadata__`` that is not an object of strings, an entry
    that is not ``{"dtype", "shape", "data_offsets"}``, an unknown dtype, a shape or offsets
    that are not non-negative integers, a byte span that does not match dtype x shape, data
    past the end of the file (truncated), and tensors that overlap, leave gaps or do not cover
    the data section exactly.
    """
    path = Path(path)
    fname = path.name
    with open_regular_file(path, CheckpointError, "safetensors weight file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{fname}: file is {size} bytes, too short to be safetensors "
                                  "(8-byte header length, then a JSON header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{fname}: header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} "
                f"bytes (corrupted, or not a safetensors file)")
        if n > size - 8:
            raise CheckpointError(
                f"{fname}: header length {n} exceeds the file size: only {size - 8} bytes follow "
                "the length field (truncated, or not a safetensors file)")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{fname}: file ended inside the {n}-byte header (truncated)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{fname}: malformed safetensors header: not UTF-8 (byte "
                              f"0x{raw[e.start]:02x} at header offset {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int,
                            parse_float=_parse_float, parse_constant=_parse_constant)
        _check_strings(header)
    except RecursionError:
        raise CheckpointError(f"{fname}: malformed safetensors header (nested too deeply)") from None
    except (ValueError, UnicodeError) as e:   # JSONDecodeError, _HeaderSyntax, lone surrogates
        raise CheckpointError(f"{fname}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fname}: malformed safetensors header: expected a JSON object of "
                              f"tensors, got a JSON {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{fname}: malformed safetensors header: __metadata__ must be an "
                              f"object of strings, got {_short(meta)}")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        tn = f"{fname}: tensor {_short(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{tn}: header entry must be an object with dtype, shape and "
                                  f"data_offsets, got {_short(info)}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise CheckpointError(f"{tn}: header entry has no {missing[0]!r} (expected dtype, "
                                  "shape and data_offsets)")
        dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_ITEMSIZE:
            raise CheckpointError(f"{tn} has unknown dtype {_short(dt)}; known safetensors dtypes: "
                                  f"{', '.join(_ST_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                  and 0 <= s <= _USIZE_MAX for s in shape):
            raise CheckpointError(f"{tn}: shape must be a list of non-negative integers, got "
                                  f"{_short(shape)}")
        numel = 1
        for s in shape:             # safetensors multiplies left to right with overflow checks
            numel *= s
            if numel > _USIZE_MAX:
                raise CheckpointError(f"{tn}: shape {_short(shape)} has too many elements")
        nbytes = numel * _ST_ITEMSIZE[dt]
        if nbytes * 8 > _USIZE_MAX:
            raise CheckpointError(f"{tn}: shape {_short(shape)} has too many elements")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= _USIZE_MAX
                        for o in offsets)):
            raise CheckpointError(f"{tn}: data_offsets must be [start, end], two non-negative "
                                  f"integers, got {_short(offsets)}")
        start, end = offsets
        if end < start:
            raise CheckpointError(f"{tn}: data_offsets {offsets} end before they start")
        if end - start != nbytes:
            raise CheckpointError(f"{tn} ({dt} {shape}) spans {end - start} bytes, expected "
                                  f"{nbytes}")
        if end > data_size:
            raise CheckpointError(
                f"{tn} is truncated: its data ends at byte {end} of the data "
                f"section but the file holds only {data_size} bytes (incomplete download?)")
        spans.append((start, end, name))
    cursor, prev = 0, None
    for start, end, name in sorted(spans, key=lambda t: (t[0], t[1])):
        if start != cursor:
            if start < cursor:
                why = f"overlaps tensor {_short(prev)} (which ends at byte {cursor})"
            else:
                why = (f"starts at byte {start}, leaving bytes {cursor}..{start - 1} of the data "
                       "section unused")
            raise CheckpointError(f"{fname}: tensor {_short(name)} {why}; safetensors requires "
                                  "the tensors to cover the data section contiguously")
        cursor, prev = end, name
    if cursor != data_size:
        raise CheckpointError(f"{fname}: the tensors cover {cursor} bytes but the data section "
                              f"holds {data_size} (trailing bytes: corrupted file?)")
    return header


# ---- writing ---------------------------------------------------------------------------------

def write_safetensors(out_dir: Path, specs, tensors: Iterator[Tuple[str, torch.Tensor]],
                       max_shard_bytes: int) -> None:
    """Write ``tensors`` (in the order of ``specs``) as safetensors shards of at most
    ``max_shard_bytes``, holding one tensor in memory at a time: each header is written from
    ``specs`` before the data. One shard is model.safetensors (as in the release); several are
    model-0000i-of-0000n.safetensors listed by model.safetensors.index.json."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    fnames = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, shard in zip(fnames, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in shard:
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            weight_map[name], offset = fname, end
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)           # data 8-byte aligned, as safetensors writes it
        with open(out_dir / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in shard:
                got, t = next(tensors)
                if (got, t.dtype, tuple(t.shape)) != (name, dtype, tuple(shape)):
                    raise RuntimeError(f"internal error: writing {got!r} {t.dtype} "
                                       f"{list(t.shape)} where {name!r} {dtype} {list(shape)} "
                                       "was planned")
                f.write(t.contiguous().view(torch.uint8).numpy())
    if len(shards) > 1:
        (out_dir / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
