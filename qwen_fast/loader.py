"""Checkpoint loading: a release-layout directory of safetensors, or random ("dummy") weights.

Layout (qwen-spec.md §1, §3): config.json, generation_config.json, qwen.tiktoken and either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Tensors are
memory-mapped, checked by name, shape, dtype and byte range, and converted to the requested dtype.
Pickle files (``*.bin``) are never opened, and no code from the checkpoint is ever run.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from .config import QwenConfig
from .errors import CheckpointError

# Tensors the release code lists in _keys_to_ignore_*: buffers that may be saved, never used.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def expected_shapes(cfg: QwenConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of a bf16/fp16/fp32 release checkpoint with its [out, in] shape (spec §3.1)."""
    h, f, v = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    shapes = {"transformer.wte.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (h,),
            p + "attn.c_attn.weight": (3 * cfg.projection_size, h),
            p + "attn.c_attn.bias": (3 * cfg.projection_size,),
            p + "attn.c_proj.weight": (h, cfg.projection_size),
            p + "ln_2.weight": (h,),
            p + "mlp.w1.weight": (f, h),
            p + "mlp.w2.weight": (f, h),
            p + "mlp.c_proj.weight": (h, f),
        })
    shapes["transformer.ln_f.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _is_ignorable(name: str) -> bool:
    return name.endswith(IGNORABLE_SUFFIXES)


def read_safetensors_header(path: Path) -> Dict[str, dict]:
    """Parse a safetensors header and check every tensor's byte range lies inside the file.

    Returns {name: {"dtype", "shape", "data_offsets"}}. Raises CheckpointError naming the file
    (and the tensor) for a truncated or malformed file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: file is {size} bytes, too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path.name}: header length {n} exceeds the file size {size} "
                                  "(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: malformed safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dt, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        want = numel * _ST_ITEMSIZE.get(dt, 0)
        if end - start != want:
            raise CheckpointError(f"{path.name}: tensor {name!r} ({dt} {shape}) spans {end - start}"
                                  f" bytes, expected {want}")
        if end > data_size:
            raise CheckpointError(
                f"{path.name}: tensor {name!r} is truncated: its data ends at byte {end} of the data "
                f"section but the file holds only {data_size} bytes (incomplete download?)")
    return header


def _find_weight_files(model_dir: Path, headers: Dict[Path, dict]) -> Dict[str, Path]:
    """Map tensor name -> file, from the index if there is one, else from the file headers
    (read into `headers`, which caches them for the caller)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name}: expected a JSON object with a 'weight_map' "
                                  f"({e.__class__.__name__}: {e})") from None
        out = {}
        for name, fname in weight_map.items():
            p = model_dir / fname
            if not p.exists():
                raise CheckpointError(f"{index.name} maps {name!r} to {fname!r}, which does not exist"
                                      f" in {model_dir.name}/")
            out[name] = p
        return out
    single = model_dir / "model.safetensors"
    files = [single] if single.exists() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f" It has {pickles}: pickle checkpoints are never loaded (they can run code); "
                "convert them to safetensors first.") if pickles else ""
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in "
                              f"{model_dir.name}/.{hint}")
    out = {}
    for p in files:
        headers[p] = read_safetensors_header(p)
        for name in headers[p]:
            out[name] = p
    return out


def check_checkpoint(model_dir: Path, cfg: QwenConfig) -> Dict[str, Tuple[Path, dict]]:
    """Validate every tensor of a checkpoint against the config; returns {name: (file, header)}."""
    if cfg.quantization_config:
        q = cfg.quantization_config
        raise CheckpointError(
            f"{model_dir.name}/config.json has a quantization_config ({q.get('quant_method', '?')}, "
            f"{q.get('bits', '?')} bits): GPTQ checkpoints are not supported by this version yet; "
            "use the bf16 release")
    headers: Dict[Path, dict] = {}
    files = _find_weight_files(model_dir, headers)
    for p in set(files.values()) - set(headers):
        headers[p] = read_safetensors_header(p)
    expected = expected_shapes(cfg)
    found: Dict[str, Tuple[Path, dict]] = {}
    for name, p in files.items():
        if name not in headers[p]:
            raise CheckpointError(f"the index maps {name!r} to {p.name}, but that file has no such tensor")
        found[name] = (p, headers[p][name])
    # Tensors present in files but absent from the index are also extras.
    for p, hdr in headers.items():
        for name in hdr:
            found.setdefault(name, (p, hdr[name]))

    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}; expected shape "
                              f"{list(expected[missing[0]])} for this config")
    extra = [n for n in found if n not in expected and not _is_ignorable(n)]
    if extra:
        raise CheckpointError(f"checkpoint has unexpected tensor {extra[0]!r} (shape "
                              f"{found[extra[0]][1]['shape']}, in {found[extra[0]][0].name}); it is "
                              "not part of a Qwen v1 model with this config.json")
    for name, shape in expected.items():
        p, info = found[name]
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"tensor {name!r} in {p.name} has shape {info['shape']}, expected "
                                  f"{list(shape)} from config.json")
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {p.name} has dtype {info['dtype']}, expected "
                                  "BF16, F16 or F32")
    return {n: found[n] for n in expected}


def _progress(iterable: Iterable, total: int, enabled: Optional[bool], desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm  # a light, well-kept progress bar; only imported when shown
    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


def load_state_dict(model_dir: str | os.PathLike, cfg: QwenConfig, dtype: torch.dtype,
                    device: str | torch.device = "cpu",
                    progress: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Read, check and convert every tensor of a checkpoint directory (memory-mapped)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    plan = check_checkpoint(model_dir, cfg)
    by_file: Dict[Path, list] = {}
    for name, (p, _) in plan.items():
        by_file.setdefault(p, []).append(name)
    out: Dict[str, torch.Tensor] = {}
    items = [(p, n) for p, names in by_file.items() for n in names]
    handles = {}
    try:
        for p, name in _progress(items, len(items), progress, f"loading {model_dir.name}"):
            if p not in handles:
                handles[p] = safe_open(str(p), framework="pt", device="cpu")
            t = handles[p].get_tensor(name)
            out[name] = t.to(device=device, dtype=dtype)
    finally:
        handles.clear()
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def dummy_state_dict(cfg: QwenConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                     seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights with the exact release names and shapes (normal(0, initializer_range),
    norms = 1, c_attn bias small): for benchmarks and smoke runs with no download."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, cfg.initializer_range, generator=g)
            t = t.to(dtype)
        out[name] = t.to(device)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def load_config(model_dir: str | os.PathLike) -> QwenConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model path {str(model_dir)!r} is not a directory (expected a "
                              "checkpoint directory with config.json and *.safetensors)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{model_dir.name}/ has no config.json")
    return QwenConfig.from_json(cfg_path)
