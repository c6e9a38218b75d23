"""Tiny random-weight checkpoints in the exact release layout, for tests and smoke runs.

``write_checkpoint(dir, tiny_config())`` writes config.json, generation_config.json,
qwen.tiktoken and sharded safetensors with model.safetensors.index.json, as the Hugging Face
release does, so the loader is exercised exactly as on the real model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .config import GenerationConfig, QwenConfig
from .loader import expected_shapes


def tiny_config(**overrides) -> QwenConfig:
    """A 2-layer model with the real vocabulary and a short seq_length (32) so that dynamic
    NTK and logn scaling are reached by short prompts."""
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                intermediate_size=192, seq_length=32, max_position_embeddings=32)
    base.update(overrides)
    return QwenConfig(**base)


def random_state_dict(cfg: QwenConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      std: float = 0.08) -> Dict[str, torch.Tensor]:
    """Random weights with non-trivial attention (std large enough that softmax is not flat)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("c_attn.weight"):
            t = 2.5 * std * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(path, cfg: QwenConfig, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                     dtype: torch.dtype = torch.bfloat16, shards: int = 2, seed: int = 0,
                     generation_config: Optional[GenerationConfig] = None,
                     vocab_file: Optional[Path] = None) -> Path:
    """Write a release-layout checkpoint directory; returns its path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else random_state_dict(cfg, dtype, seed)
    d = cfg.to_dict()
    if not cfg.quantization_config:
        d.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(d, indent=2))
    gen = generation_config or GenerationConfig()
    (path / "generation_config.json").write_text(json.dumps(
        {k: v for k, v in dataclasses.asdict(gen).items() if k != "stop_words_ids" or v}, indent=2))
    src = vocab_file or Path(__file__).parent / "data" / "qwen.tiktoken"
    shutil.copyfile(src, path / "qwen.tiktoken")
    names = list(sd)
    if shards <= 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def raw_safetensors(header, data: bytes = b"", length: Optional[int] = None) -> bytes:
    """The bytes of a safetensors file with any header, valid or not, for loader tests.

    ``header``: a JSON value (dumped as is, NaN allowed) or the header bytes themselves;
    ``length``: the 8-byte header length field (default: the real length)."""
    import struct
    raw = header if isinstance(header, (bytes, bytearray)) else json.dumps(header).encode("utf-8", "surrogatepass")
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + bytes(raw) + data


def read_raw_safetensors(path) -> tuple:
    """(header dict, data bytes) of a valid safetensors file, for building mutated copies."""
    import struct
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


class TimeLimit(Exception):
    """Raised by time_limit when the code under it runs too long (a hang in a test)."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeLimit in the main thread after `seconds` (SIGALRM): a test that would hang,
    e.g. on opening a FIFO for reading, fails instead of blocking CI."""
    def on_alarm(*_):
        raise TimeLimit(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


SPECIAL_FILE_KINDS = ("fifo", "dev_zero", "directory", "broken_symlink")


def make_special_file(path, kind: str) -> None:
    """Put something that is not a regular file at `path` (replacing a file there): a FIFO, a
    symlink to /dev/zero, a directory, or a broken symlink."""
    path = Path(path)
    if path.is_file() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "broken_symlink":
        path.symlink_to(path.parent / "nowhere")
    else:
        raise ValueError(f"kind must be one of {SPECIAL_FILE_KINDS}, got {kind!r}")


class PagedBatch:
    """Sequences over a page pool of their own, for tests and benchmarks that drive
    QwenModel.forward directly (the engine's scheduler does this bookkeeping for real).

    Each of `num_seqs` sequences gets pages for `capacity` positions, taken from the pool in a
    shuffled order (so that a kernel reading a wrong page reads another sequence's keys).
    kv_dtype / kv_group: the pool's format (torch.int8: the int8 cache, see PagePool)."""

    def __init__(self, model, num_seqs: int, capacity: int, page_size: int = 16, seed: int = 0,
                 kv_dtype: Optional[torch.dtype] = None, kv_group: Optional[int] = None):
        from .kv_cache import PagePool
        per = -(-capacity // page_size)
        self.model = model
        self.pool = PagePool(model.cfg, num_seqs * per, page_size, model.dtype, model.device,
                             kv_dtype, kv_group)
        order = torch.randperm(num_seqs * per, generator=torch.Generator().manual_seed(seed)).tolist()
        self.pages = [order[b * per:(b + 1) * per] for b in range(num_seqs)]
        self.capacity = per * page_size
        self.lengths = [0] * num_seqs
        self.alpha: List[Optional[int]] = [None] * num_seqs

    def forward(self, tokens: Sequence[Sequence[int]], rows: Optional[Sequence[int]] = None,
                all_logits: bool = False, prompt_lengths: Optional[Sequence[int]] = None,
                logits_dtype: Optional[torch.dtype] = None):
        """Append tokens[i] to sequence rows[i] (default i) in one forward. A sequence with no
        cached tokens picks its NTK alpha from prompt_lengths[i] (default len(tokens[i])).
        Returns the logits [len(tokens), vocab] of each row's last token, or with all_logits a
        list of [len(tokens[i]), vocab] tensors."""
        from .config import ntk_alpha
        from .kv_cache import StepMetadata
        cfg = self.model.cfg
        rows = list(range(len(tokens))) if rows is None else list(rows)
        counts = [len(t) for t in tokens]
        for i, r in enumerate(rows):
            if self.lengths[r] + counts[i] > self.capacity:
                raise ValueError(f"sequence {r}: {self.lengths[r]} + {counts[i]} tokens exceed its "
                                 f"{self.capacity} positions")
            if self.lengths[r] == 0:
                n = counts[i] if prompt_lengths is None else int(prompt_lengths[i])
                self.alpha[r] = ntk_alpha(n, cfg.seq_length) if cfg.use_dynamic_ntk else 1
        starts = [self.lengths[r] for r in rows]
        meta = StepMetadata.build([self.pages[r] for r in rows], starts, counts, self.model.device)
        ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
        last = list(itertools.accumulate(counts))
        out = self.model.forward(ids, self.pool, meta, [self.alpha[r] for r in rows],
                                 logits_rows=None if all_logits else [n - 1 for n in last],
                                 logits_dtype=logits_dtype)
        for i, r in enumerate(rows):
            self.lengths[r] += counts[i]
        return list(torch.split(out, counts)) if all_logits else out
