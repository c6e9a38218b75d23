"""Checkpoint loading: a release-layout directory of safetensors, or random ("dummy") weights.

Layout (qwen-spec.md §1, §3): config.json, generation_config.json, qwen.tiktoken and either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Tensors are
memory-mapped, checked by name, shape, dtype and byte range, and converted to the requested dtype.
Pickle files (``*.bin``) are never opened, and no code from the checkpoint is ever run.

Every bad input is a CheckpointError (or a ConfigError for config.json) naming the file and the
tensor or field: each safetensors header is validated here in full, by the same rules as the
safetensors library, before that library sees the file, and anything it still raises is turned
into a CheckpointError naming the file.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from .config import (MAX_INDEX_BYTES, ConfigError, QwenConfig,
                     read_json_file)
from .errors import CheckpointError
from .gptq import QUANTIZED_LINEARS, gptq_shapes, read_gptq_config, unpack_gptq
from .safetensors_io import INDEX_NAME, SINGLE_NAME, read_safetensors_header


# Tensors the release code lists in _keys_to_ignore_*: buffers that may be saved, never used.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def expected_shapes(cfg: QwenConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of a bf16/fp16/fp32 release checkpoint with its [out, in] shape (spec §3.1).

    The config is validated first (ConfigError), so an absurd one never builds a huge dict."""
    cfg.validate()
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


def _short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# ---- checkpoint layout -----------------------------------------------------------------------

def _check_shard_name(index: Path, tensor: str, fname) -> None:
    """An index may only name plain ``*.safetensors`` files of its own directory: no paths,
    no '..', nothing absolute. The NAME is checked, not where a symlink points, so the Hugging
    Face cache layout (snapshots/<rev>/x.safetensors -> ../../blobs/<hash>) keeps working."""
    bad = None
    if not isinstance(fname, str):
        bad = "it is not a string"
    elif not fname or fname in (".", ".."):
        bad = "it is not a file name"
    elif "/" in fname or "\\" in fname or (os.altsep and os.altsep in fname) \
            or os.path.isabs(fname) or os.path.splitdrive(fname)[0]:
        bad = "it is a path; only plain file names in the checkpoint directory are allowed"
    elif "\0" in fname:
        bad = "it contains a NUL byte"
    elif not fname.endswith(".safetensors"):
        bad = "it is not a .safetensors file"
    else:
        try:
            fname.encode("utf-8")
        except UnicodeError:
            bad = "it is not valid Unicode"
    if bad:
        raise CheckpointError(f"{index.name}: weight_map maps {_short(tensor)} to "
                              f"{_short(fname)}: {bad}")


def _find_weight_files(model_dir: Path, headers: Dict[Path, dict]) -> Dict[str, Path]:
    """Map tensor name -> file, from the index if there is one, else from the file headers
    (read into `headers`, which caches them for the caller)."""
    index = model_dir / INDEX_NAME
    if os.path.lexists(index):
        obj = read_json_file(index, MAX_INDEX_BYTES, CheckpointError,
                             "safetensors index (a JSON object with a 'weight_map')")
        if not isinstance(obj, dict) or "weight_map" not in obj:
            got = (f"a JSON {type(obj).__name__}" if not isinstance(obj, dict)
                   else "an object without 'weight_map'")
            raise CheckpointError(f"{index.name}: expected a JSON object with a 'weight_map', "
                                  f"got {got}")
        weight_map = obj["weight_map"]
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index.name}: weight_map must be an object mapping tensor "
                                  f"names to file names, got a JSON {type(weight_map).__name__}")
        out = {}
        for name, fname in weight_map.items():
            _check_shard_name(index, name, fname)
            p = model_dir / fname
            if not os.path.lexists(p):
                raise CheckpointError(f"{index.name} maps {_short(name)} to {fname!r}, which does "
                                      f"not exist in {model_dir.name}/")
            out[name] = p
        return out
    single = model_dir / SINGLE_NAME
    files = [single] if os.path.lexists(single) else sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f" It has {pickles}: pickle checkpoints are never loaded (they can run code); "
                "convert them to safetensors first.") if pickles else ""
        raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {model_dir.name}/.{hint}")
    out = {}
    for p in files:
        headers[p] = read_safetensors_header(p)
        for name in headers[p]:
            out[name] = p
    return out


def quantization_error(cfg: QwenConfig, source: str) -> Optional[str]:
    """The message refusing a quantized config that is not GPTQ (None when it is not quantized
    or is GPTQ, which the loader reads: qwen_fast/gptq.py)."""
    if cfg.quantization_config is None:
        return None
    method = cfg.quantization_config.get("quant_method", "gptq")
    if method == "gptq":
        return None
    return (f"{source} has a quantization_config ({cfg.quantization_summary()}): quantized "
            f"({_short(method, 20)}) checkpoints are not supported; GPTQ (the release's Int4 / "
            "Int8) and bf16 / fp16 / fp32 checkpoints are")


def _gptq_expected(model_dir: Path, cfg: QwenConfig, expected: Dict[str, Tuple[int, ...]]):
    """For a GPTQ checkpoint: (its GptqConfig, {name: (shape, dtype name)} of the quantized
    tensors, {name: shape} of the optional zero biases); expected loses the dense weights
    they replace. (None, {}, {}) for a dense checkpoint."""

    gcfg = read_gptq_config(model_dir)
    if gcfg is None:
        if cfg.quantization_config is not None:
            raise CheckpointError(f"{model_dir.name}/config.json has a quantization_config but "
                                  "no GPTQ settings could be read (quantize_config.json)")
        return None, {}, {}
    quantized, optional = {}, {}
    st_name = {torch.int32: "I32", torch.float16: "F16"}
    for i in range(cfg.num_hidden_layers):
        for lin in QUANTIZED_LINEARS:
            base = f"transformer.h.{i}.{lin}"
            n, k = expected.pop(base + ".weight")
            try:
                shapes = gptq_shapes(n, k, gcfg.bits, gcfg.group_size, base)
            except ValueError as e:
                raise CheckpointError(f"{model_dir.name}: {e} (quantize_config.json: bits "
                                      f"{gcfg.bits}, group_size {gcfg.group_size})") from None
            for part, (shape, dt) in shapes.items():
                quantized[f"{base}.{part}"] = (shape, st_name[dt])
            if lin != "attn.c_attn":        # AutoGPTQ <= 0.7 wrote a zero bias everywhere
                optional[base + ".bias"] = (n,)
    return gcfg, quantized, optional


def check_checkpoint(model_dir: Path, cfg: QwenConfig) -> Dict[str, Tuple[Path, dict]]:
    """Validate every tensor of a checkpoint against the config; returns {name: (file, header)}."""
    model_dir = Path(model_dir)
    cfg.validate()
    msg = quantization_error(cfg, f"{model_dir.name}/config.json")
    if msg:
        raise CheckpointError(msg)
    headers: Dict[Path, dict] = {}
    files = _find_weight_files(model_dir, headers)
    for p in sorted(set(files.values()) - set(headers)):
        headers[p] = read_safetensors_header(p)
    expected = expected_shapes(cfg)
    gcfg, quantized, optional = _gptq_expected(model_dir, cfg, expected)
    found: Dict[str, Tuple[Path, dict]] = {}
    for name, p in files.items():
        if name not in headers[p]:
            raise CheckpointError(f"the index maps {_short(name)} to {p.name}, but that file has no "
                                  "such tensor")
        found[name] = (p, headers[p][name])
    # Tensors present in files but absent from the index are also extras.
    for p, hdr in headers.items():
        for name in hdr:
            found.setdefault(name, (p, hdr[name]))

    wanted = {**expected, **{n: shape for n, (shape, _) in quantized.items()}}
    missing = [n for n in wanted if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}; expected shape "
                              f"{list(wanted[missing[0]])} for this config"
                              + (f" (GPTQ, {gcfg.bits} bits, group {gcfg.group_size})" if gcfg else ""))
    extra = [n for n in found if n not in wanted and n not in optional and not _is_ignorable(n)]
    if extra:
        raise CheckpointError(f"checkpoint has unexpected tensor {_short(extra[0])} (shape "
                              f"{_short(found[extra[0]][1]['shape'])}, in {found[extra[0]][0].name});"
                              " it is not part of a Qwen v1 model with this config.json")
    present_optional = {n: shape for n, shape in optional.items() if n in found}
    for name, shape in {**expected, **present_optional}.items():
        p, info = found[name]
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"tensor {name!r} in {p.name} has shape {info['shape']}, expected "
                                  f"{list(shape)} from config.json")
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {p.name} has dtype {info['dtype']}, expected "
                                  "BF16, F16 or F32")
    for name, (shape, dt) in quantized.items():
        p, info = found[name]
        if tuple(info["shape"]) != shape:
            raise CheckpointError(f"GPTQ tensor {name!r} in {p.name} has shape {info['shape']}, "
                                  f"expected {list(shape)} ({gcfg.bits} bits, group_size "
                                  f"{gcfg.group_size}, from the layer's shape in config.json)")
        if info["dtype"] != dt:
            raise CheckpointError(f"GPTQ tensor {name!r} in {p.name} has dtype {info['dtype']}, "
                                  f"expected {dt}")
    return {n: found[n] for n in [*expected, *present_optional, *quantized]}


def _progress(iterable: Iterable, total: int, enabled: Optional[bool], desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm  # a light, well-kept progress bar; only imported when shown
    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


def _check_finite(name: str, p: Path, src: torch.Tensor, out: torch.Tensor) -> None:
    """CheckpointError if ``out`` (the converted tensor) holds NaN/Inf, saying whether the
    file holds them or the conversion to a narrower dtype overflowed."""
    if out.numel() == 0:
        return
    lo, hi = torch.aminmax(out)         # one pass, no temporary; NaN and +-Inf propagate
    if bool(torch.isfinite(torch.stack([lo, hi])).all()):
        return
    bad_src = int((~torch.isfinite(src)).sum())
    if bad_src:
        raise CheckpointError(
            f"tensor {name!r} in {p.name} has {bad_src} non-finite values (NaN or Inf) out of "
            f"{src.numel()}: the checkpoint is corrupted (check_finite=False skips this check)")
    bad = int((~torch.isfinite(out)).sum())
    big = float(src.detach().abs().max())
    raise CheckpointError(
        f"tensor {name!r} in {p.name}: {bad} values overflow {out.dtype} when converted from "
        f"{src.dtype} (largest magnitude {big:.4g}); load it in a wider dtype (bfloat16 or float32)")


@contextlib.contextmanager
def tensor_reader(plan: Dict[str, Tuple[Path, dict]]) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function reading one tensor of ``plan`` (check_checkpoint's result) by name, as
    stored (CPU, file dtype), one at a time (``rows=(r0, r1)``: only those rows); each file is
    opened once, on first use, and closed on exit. Whatever safetensors raises becomes a CheckpointError naming the file."""
    from safetensors import safe_open

    handles = {}

    def read(name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        p = plan[name][0]
        try:
            if p not in handles:
                handles[p] = safe_open(str(p), framework="pt", device="cpu")
            if rows is not None:        # rows r0:r1 of the first dim only
                return handles[p].get_slice(name)[rows[0]:rows[1]]
            return handles[p].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - whatever safetensors raises, name the file
            raise CheckpointError(f"{p.name}: safetensors could not read tensor {name!r} "
                                  f"({type(e).__name__}: {e})") from None

    try:
        yield read
    finally:
        handles.clear()


def load_state_dict(model_dir: str | os.PathLike, cfg: QwenConfig, dtype: torch.dtype,
                    device: str | torch.device = "cpu", progress: Optional[bool] = None,
                    check_finite: bool = True,
                    lm_head_bits: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Read, check and convert every tensor of a checkpoint directory (memory-mapped).

    check_finite: refuse a tensor holding NaN/Inf, in the file or after conversion to
    ``dtype`` (fp32 values beyond 65504 become Inf in fp16), with a CheckpointError naming the
    tensor, the file and the count. It is one ``torch.aminmax`` pass per tensor (no temporary):
    measured on the 2-core dev CPU, 18 ms for the 151936 x 2048 bf16 embedding (311M values;
    23 ms in fp32) and 0.2 s for all 1.84B values of Qwen-1.8B in bf16, against seconds for
    reading the 3.7 GB; ``check_finite=False`` skips it.
    lm_head_bits (4 or 8): lm_head is read a block of rows at a time and quantized as it comes
    (QuantWeight.quantize_rows), so that its dense copy never exists.
    """
    from .qweight import QuantWeight

    model_dir = Path(model_dir)
    plan = check_checkpoint(model_dir, cfg)
    gcfg = read_gptq_config(model_dir)    # check_checkpoint has validated it against the files
    gptq_parts = (".qweight", ".qzeros", ".scales", ".g_idx")
    by_file: Dict[Path, list] = {}
    for name, (p, _) in plan.items():
        if not name.endswith(gptq_parts):
            by_file.setdefault(p, []).append(name)
    out: Dict[str, torch.Tensor] = {}
    items = [(p, n) for p, names in by_file.items() for n in names]
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(tensor_reader(plan))
        for p, name in _progress(items, len(items), progress, f"loading {model_dir.name}"):
            if name == "lm_head.weight" and lm_head_bits is not None:
                def rows(r0, r1, p=p):
                    t = shared(name, (r0, r1))
                    x = t.to(device=device, dtype=dtype)
                    if check_finite:
                        _check_finite(name, p, t, x)
                    return x
                out[name] = QuantWeight.quantize_rows(rows, *plan[name][1]["shape"], lm_head_bits)
                continue
            if gcfg is None:
                t = shared(name)
                x = t.to(device=device, dtype=dtype)
            elif (name == "transformer.wte.weight" and torch.device(device).type == "cpu"
                  and _ST_DTYPES.get(plan[name][1]["dtype"]) == dtype):
                # The embedding in the file's dtype (the release's Int4 in fp16) stays mapped
                # from the file: only the rows that prompts look up become resident. The check
                # reads it through another handle, whose pages go when it is closed.
                if check_finite:
                    with tensor_reader(plan) as read:
                        t = read(name)
                        _check_finite(name, p, t, t)
                        del t
                with tensor_reader(plan) as read:
                    out[name] = read(name)
                continue
            else:
                # A GPTQ checkpoint: each tensor through its own handle, copied out (fp16 ones
                # are not converted), so that the mapped file is not left resident: what stays
                # is the model, not the file (1.8 GB for Int4, 0.9 GB of it repacked).
                with tensor_reader(plan) as read:
                    t = read(name)
                    x = t.to(device=device, dtype=dtype, copy=True)
            if check_finite:
                _check_finite(name, p, t, x)
            out[name] = x
    if gcfg is not None:
        _load_gptq(model_dir, cfg, gcfg, plan, out, progress, check_finite)
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _load_gptq(model_dir: Path, cfg: QwenConfig, gcfg, plan, out: dict,
               progress: Optional[bool], check_finite: bool) -> None:
    """Replace each quantized Linear's parts in ``out`` by one QuantWeight (kernel layout, made
    one layer at a time: no dense copy of the model), named like the dense weight. Each layer
    is read through its own file handles, closed before the next, so that the mapped file's
    pages do not all stay resident while the model is built."""
    from .qweight import QuantWeight

    bases = [f"transformer.h.{i}.{lin}" for i in range(cfg.num_hidden_layers)
             for lin in QUANTIZED_LINEARS]
    for base in _progress(bases, len(bases), progress, f"repacking {model_dir.name} (GPTQ)"):
        with tensor_reader(plan) as read:
            parts = {k: read(f"{base}.{k}").clone()
                     for k in ("qweight", "qzeros", "scales", "g_idx")}
        if check_finite:
            _check_finite(base + ".scales", plan[base + ".scales"][0], parts["scales"], parts["scales"])
        try:
            q, zeros, scales, g_idx = unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"],
                                                  parts["g_idx"], gcfg.bits)
            out[base + ".weight"] = QuantWeight.from_components(q, zeros, scales, g_idx, gcfg.bits)
        except ValueError as e:
            raise CheckpointError(f"{model_dir.name}: {base}: {e}") from None
        bias = base + ".bias"
        if not base.endswith("attn.c_attn") and bias in out:
            if bool(out.pop(bias).any()):
                raise CheckpointError(f"{model_dir.name}: {bias} is not zero; Qwen's {base.split('.', 3)[3]} "
                                      "has no bias (AutoGPTQ writes zeros there)")


def dummy_state_dict(cfg: QwenConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                     seed: int = 0, chunk_elements: int = 1 << 23,
                     convert: Optional[Callable[[str, torch.Tensor], object]] = None
                     ) -> Dict[str, torch.Tensor]:
    """Random weights with the exact release names and shapes (normal(0, initializer_range),
    norms = 1, c_attn bias small): for benchmarks and smoke runs with no download.

    Values are drawn in fp32 and rounded to dtype, a block of rows (about chunk_elements, a
    multiple of 16 elements) at a time: torch's CPU normal_ fills 16 values per step from one
    stream, so the blocks give the same values as one draw over the whole tensor (tested) while
    the fp32 temporary stays small (the 151936 x 2048 embedding would need 1.2 GB).
    convert(name, tensor), when given, replaces each tensor as soon as it is drawn (the
    quantized dummy weights: no dense copy of the whole model at any time)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype)
            rows = t.view(shape[0], -1)
            step = max(16, (chunk_elements // rows.shape[1]) // 16 * 16)
            for r in range(0, rows.shape[0], step):
                block = rows[r:r + step]
                block.copy_(torch.empty(block.shape, dtype=torch.float32).normal_(
                    0.0, cfg.initializer_range, generator=g))
        out[name] = t.to(device) if convert is None else convert(name, t.to(device))
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


# ---- memory ----------------------------------------------------------------------------------

def weights_nbytes(cfg: QwenConfig, dtype: torch.dtype) -> Tuple[int, int]:
    """(bytes of all weights in ``dtype``, elements of the largest tensor) for this config."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numels = [math.prod(s) for s in expected_shapes(cfg).values()]
    return sum(numels) * itemsize, max(numels)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device``: MemAvailable of /proc/meminfo (else
    the physical memory size) for the CPU, the free memory for a CUDA GPU; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - unknown: do not refuse
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: QwenConfig, dtype: torch.dtype, device, what: str) -> None:
    """ConfigError, before anything is allocated, when the weights of ``cfg`` in ``dtype``
    (plus one fp32 temporary of the largest tensor on the CPU) exceed the available memory."""
    device = torch.device(device)
    need, largest = weights_nbytes(cfg, dtype)
    if device.type == "cpu":
        need += 4 * largest
    have = available_memory(device)
    if have is not None and need > have:
        raise ConfigError(
            f"{what}: the weights need {need / 2**30:.2f} GiB of {device.type} memory in "
            f"{str(dtype).replace('torch.', '')} ({cfg.num_hidden_layers} layers, hidden "
            f"{cfg.hidden_size}, vocab {cfg.vocab_size}) but only {have / 2**30:.2f} GiB is "
            "available")


def load_config(model_dir: str | os.PathLike) -> QwenConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model path {str(model_dir)!r} is not a directory (expected a "
                              "checkpoint directory with config.json and *.safetensors)")
    cfg_path = model_dir / "config.json"
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"{model_dir.name}/ has no config.json")
    return QwenConfig.from_json(cfg_path)
