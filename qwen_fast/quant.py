"""``quantize_checkpoint``: a release-layout bf16/fp16/fp32 checkpoint -> a GPTQ v1 one, as the
Int4 and Int8 releases are laid out (the format itself: qwen_fast/gptq.py), one tensor at a
time, written through qwen_fast/safetensors_io.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .config import MAX_CONFIG_BYTES, MAX_VOCAB_BYTES, read_bounded_file, read_json_file
from .errors import CheckpointError, ConfigError
from .gptq import LINEAR_RE, QUANTIZE_CONFIG_NAME, GptqConfig, gptq_shapes, quantize_rtn
from .loader import INDEX_NAME, _progress, check_checkpoint, load_config, tensor_reader
from .qweight import CHUNK
from .safetensors_io import write_safetensors

#: Largest safetensors shard quantize_checkpoint writes (a bigger tensor gets one of its own).
MAX_SHARD_BYTES = 2_000_000_000
#: The hidden sibling a run writes into before renaming it to the output (then the writer's pid).
_PARTIAL_PREFIX = ".{name}.partial-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's process: alive
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list:
    """Remove the hidden partial directories earlier runs for out_dir left behind when they were
    killed (SIGKILL cannot be caught): those whose writer process is gone. Returns them."""
    prefix = _PARTIAL_PREFIX.format(name=out_dir.name)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        pid = p.name[len(prefix):]
        if p.name.startswith(prefix) and pid.isdigit() and p.is_dir() and not p.is_symlink() \
                and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _output_specs(plan: Dict[str, Tuple[Path, dict]],
                  gcfg: GptqConfig) -> List[Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor, in the order _output_tensors yields them."""
    specs = []
    for name, (_, info) in plan.items():
        m = LINEAR_RE.fullmatch(name)
        if m is None:
            specs.append((name, torch.float16, tuple(info["shape"])))
        elif m[2] == "weight":      # a quantized Linear's bias is written with its weight
            n, k = info["shape"]
            shapes = gptq_shapes(n, k, gcfg.bits, gcfg.group_size, name)
            specs += [(f"{m[1]}.{key}", dt, shape) for key, (shape, dt) in shapes.items()]
            specs.append((f"{m[1]}.bias", torch.float16, (n,)))
    return specs


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    out = t.to(torch.float16)
    if out.numel() and not bool(torch.isfinite(torch.stack(list(torch.aminmax(out)))).all()):
        raise CheckpointError(f"tensor {name!r} holds NaN/Inf or values beyond the float16 range "
                              "(65504); the GPTQ format stores it in float16")
    return out


def _output_tensors(plan: Dict[str, Tuple[Path, dict]], read, gcfg: GptqConfig,
                    progress: Optional[bool], desc: str,
                    solved: Optional[Dict[str, dict]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Each output tensor of quantize_checkpoint, one input tensor at a time; the quantized
    Linears from `solved` (GPTQ) when given, else by round-to-nearest."""
    for name in _progress(list(plan), len(plan), progress, desc):
        m = LINEAR_RE.fullmatch(name)
        if m is None:
            yield name, _fp16(name, read(name))
        elif m[2] == "weight":
            w = read(name)
            try:
                packed = solved[m[1]] if solved is not None else \
                    quantize_rtn(w, gcfg.bits, gcfg.group_size, gcfg.sym)
            except ValueError as e:
                raise CheckpointError(f"tensor {name!r}: {e}") from None
            yield from ((f"{m[1]}.{key}", t) for key, t in packed.items())
            bias = f"{m[1]}.bias"
            yield bias, (_fp16(bias, read(bias)) if bias in plan
                         else torch.zeros(w.shape[0], dtype=torch.float16))


def quantize_checkpoint(in_dir: str | os.PathLike, out_dir: str | os.PathLike, bits: int,
                        group_size: int = 128, sym: bool = True, progress: Optional[bool] = None,
                        max_shard_bytes: int = MAX_SHARD_BYTES, method: str = "rtn",
                        calibration: Optional[str] = None, samples: int = 128, seq_len: int = 512,
                        damp: float = 0.01, act_order: bool = False, seed: int = 0) -> Path:
    """Quantize a bf16/fp16/fp32 release-layout checkpoint into a GPTQ v1 one (as the Int4 and
    Int8 releases): each block's QUANTIZED_LINEARS by quantize_rtn into .qweight/.qzeros/
    .scales/.g_idx/.bias (c_attn's real bias, zeros for the others), every other tensor in
    fp16; safetensors shards of at most max_shard_bytes, quantize_config.json, config.json with
    quantization_config and torch_dtype float16 (and fp16 true, as the release), and the other
    .json/.py/.tiktoken files copied. One input tensor is processed at a time.

    The result is written to a hidden sibling directory and renamed to ``out_dir`` at the end,
    so a failure leaves nothing. Refused: a missing or already quantized input, ``out_dir`` equal
    to it or not empty, and bits/group_size the format or the model's shapes do not allow.
    ``progress``: a progress bar on stderr (None: when stderr is a terminal). Returns out_dir.

    method "gptq": the quantized Linears by GPTQ (qwen_fast/calibrate.py, gptq_solver.py),
    calibrated on ``samples`` windows of ``seq_len`` tokens of the text file ``calibration``
    (drawn with ``seed``), with ``damp`` and optionally ``act_order`` (desc_act, g_idx).
    """
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq":
        if calibration is None:
            raise ValueError("method 'gptq' needs a calibration text file (--calibration FILE)")
        if not Path(calibration).is_file():
            raise ValueError(f"calibration file {calibration}: not a readable file")
        if not (isinstance(samples, int) and samples >= 1 and isinstance(seq_len, int) and seq_len >= 2):
            raise ValueError(f"samples must be >= 1 and seq_len >= 2, got {samples!r} and {seq_len!r}")
    elif act_order or calibration is not None:
        raise ValueError("calibration and act_order are for method 'gptq'")
    gcfg = GptqConfig.from_dict(
        {"bits": bits, "group_size": group_size, "desc_act": bool(act_order), "sym": sym},
        "quantize")
    if gcfg.group_size != -1 and gcfg.group_size % CHUNK:
        raise ValueError(f"group_size {gcfg.group_size} is refused before any work: this engine's "
                         f"int4/int8 kernels read groups of whole {CHUNK}-input chunks, so its "
                         f"loader reads group_size -1 or a multiple of {CHUNK} (the release uses "
                         "128)")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    cfg = load_config(in_dir)
    if cfg.quantization_config is not None or os.path.lexists(in_dir / QUANTIZE_CONFIG_NAME):
        raise CheckpointError(f"{in_dir} is already quantized (it has a quantization_config or "
                              f"{QUANTIZE_CONFIG_NAME}); quantize a bf16/fp16/fp32 checkpoint")
    if os.path.lexists(out_dir):
        if out_dir.resolve() == in_dir.resolve():
            raise ValueError(f"the output directory {out_dir} is the input directory; choose a "
                             "new or empty one")
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ValueError(f"the output directory {out_dir} exists and is not an empty "
                             "directory; choose a new or empty one")
    plan = check_checkpoint(in_dir, cfg)
    specs = _output_specs(plan, gcfg)
    config = read_json_file(in_dir / "config.json", MAX_CONFIG_BYTES, ConfigError, "model config")
    config.update(quantization_config={**gcfg.to_dict(), "quant_method": "gptq",
                                       "disable_exllama": True},
                  torch_dtype="float16", bf16=False, fp16=True, fp32=False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = out_dir.parent / f"{_PARTIAL_PREFIX.format(name=out_dir.name)}{os.getpid()}"
    tmp.mkdir()
    try:
        with tensor_reader(plan) as read:
            solved = None
            if method == "gptq":
                solved = _calibrate(in_dir, cfg, read, gcfg, calibration, samples, seq_len,
                                    damp, seed, progress)
            tensors = _output_tensors(plan, read, gcfg, progress, f"quantizing {in_dir.name}",
                                      solved)
            write_safetensors(tmp, specs, tensors, max_shard_bytes)
        for name, obj in (("config.json", config), (QUANTIZE_CONFIG_NAME, gcfg.to_dict())):
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        for p in sorted(in_dir.iterdir()):
            if p.suffix in (".json", ".py", ".tiktoken") and p.is_file() \
                    and p.name not in ("config.json", INDEX_NAME):
                (tmp / p.name).write_bytes(read_bounded_file(p, MAX_VOCAB_BYTES, CheckpointError,
                                                             f"{p.name} to copy"))
        os.replace(tmp, out_dir)        # an existing empty out_dir is replaced (rename(2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _calibrate(in_dir: Path, cfg, read, gcfg: GptqConfig, calibration, samples: int,
               seq_len: int, damp: float, seed: int, progress: Optional[bool]) -> Dict[str, dict]:
    from .calibrate import calibration_ids, gptq_checkpoint
    from .tokenizer import QwenTokenizer
    text = Path(calibration).read_text(encoding="utf-8")
    tok = QwenTokenizer.from_dir(in_dir) if (in_dir / "qwen.tiktoken").is_file() else QwenTokenizer.default()
    ids = calibration_ids(tok, text, samples, min(seq_len, cfg.seq_length), seed)
    bar = _progress(range(cfg.num_hidden_layers), cfg.num_hidden_layers, progress,
                    f"GPTQ {len(ids)} x {ids.shape[1]} tokens")
    it = iter(bar)

    def step(done, total):
        next(it, None)
    try:
        return gptq_checkpoint(cfg, read, ids, gcfg.bits, gcfg.group_size, gcfg.sym, damp,
                               gcfg.desc_act, progress=step)
    except ValueError as e:
        raise CheckpointError(f"GPTQ: {e}") from None
