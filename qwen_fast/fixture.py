"""A small trained model with Qwen v1's architecture and the real vocabulary, to measure
quantization quality on something with structure (random weights have none).

    python -m qwen_fast.fixture [--micro] [--out DIR] [--steps N] [--seed 0]

Data: the Python standard library's sources (every machine has them), in path order; a file is
held out when the first byte of sha1(its path relative to the library) is a multiple of 10 (a
fixed rule, about 10% of the files). Part of the training windows repeat an earlier span of
themselves later on, so that the model learns to copy (prompt-lookup speculation relies on it).

Input embeddings: a row for each id of the training text, one shared row for the others.
Output layer: the ids seen most often in training get rows of their own; every other id of the
tokenizer shares one of BUCKETS rows, by id modulo BUCKETS. A bucket's row gives each member
the same logit w_b . x, so in training the bucket enters the partition function with
w_b . x + log(n_b) (its n_b members' total mass) and a member's loss is the bucket's
cross-entropy plus log(n_b). Exported, each member's lm_head row is w_b: the checkpoint's
distribution over all 151,851 ids is the trained one exactly (a test checks the NLL).

The checkpoint is written in the release layout (fp32 safetensors, config.json,
generation_config.json, qwen.tiktoken) under the cache folder (``$QWEN_FAST_CACHE`` or
~/.cache/qwen_fast)/fixture/NAME, named by its settings; deterministic for a seed (fixed steps).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .calibrate import block_forward, rope_tables
from .config import QwenConfig
from .reference import rms_norm
from .tokenizer import QwenTokenizer, default_vocab_path

BUCKETS = 512
EOD = 151643


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_FAST_CACHE") or Path.home() / ".cache" / "qwen_fast")


def stdlib_files() -> List[Tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "__pycache__" in rel:
            continue
        out.append((rel, p))
    return out


def held_out(rel: str) -> bool:
    return hashlib.sha1(rel.encode()).digest()[0] % 10 == 0


def token_stream(tok: QwenTokenizer, files: List[Tuple[str, Path]]) -> np.ndarray:
    ids: List[int] = []
    for _, p in files:
        ids += tok.encode(p.read_text(encoding="utf-8", errors="replace"), allowed_special=set())
        ids.append(EOD)
    return np.asarray(ids, dtype=np.int32)


def _config(layers: int, hidden: int, seq: int) -> QwenConfig:
    return QwenConfig(hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, kv_channels=128,
                      intermediate_size=4 * hidden, seq_length=seq,
                      max_position_embeddings=seq)


class Settings:
    def __init__(self, micro: bool = False, steps: Optional[int] = None, seed: int = 0):
        self.micro, self.seed = micro, seed
        if micro:
            self.layers, self.hidden, self.seq, self.batch = 1, 128, 64, 4
            self.steps, self.files, self.own = steps or 40, 40, 2048
        else:
            self.layers, self.hidden, self.seq, self.batch = 4, 256, 256, 16
            self.steps, self.files, self.own = steps or 600, None, 16384
        self.lr, self.copy_share = 3e-3, 0.5

    @property
    def name(self) -> str:
        key = json.dumps(self.__dict__, sort_keys=True)
        return ("micro-" if self.micro else "fixture-") + hashlib.sha1(key.encode()).hexdigest()[:10]


class Vocab:
    """Rows of the trained output layer: own rows for the `own` most frequent training ids,
    BUCKETS shared rows (id % BUCKETS) for every other tokenizer id."""

    def __init__(self, train: np.ndarray, n_ids: int, own: int):
        counts = np.bincount(train, minlength=n_ids)[:n_ids]
        top = np.argsort(-counts, kind="stable")[:own]
        self.row = np.full(n_ids, -1, dtype=np.int64)
        self.row[top] = np.arange(own)
        rest = self.row < 0
        self.row[rest] = own + (np.nonzero(rest)[0] % BUCKETS)
        n_b = np.bincount(self.row[rest] - own, minlength=BUCKETS)
        self.log_n = torch.zeros(own + BUCKETS)
        self.log_n[own:] = torch.from_numpy(np.log(np.maximum(n_b, 1)).astype(np.float32))
        self.log_n[own:][torch.from_numpy(n_b == 0)] = -math.inf    # an empty bucket: no mass
        self.rows = own + BUCKETS
        self.row_t = torch.from_numpy(self.row)
        # Input embeddings: a row for each id the training text holds, one shared by the rest
        # (an Adam step over all 151,936 rows cost more than the whole model's).
        seen = np.nonzero(counts)[0]
        self.emb_index = np.full(n_ids, len(seen), dtype=np.int64)
        self.emb_index[seen] = np.arange(len(seen))
        self.emb_rows = len(seen) + 1
        self.emb_t = torch.from_numpy(self.emb_index)


def _params(cfg: QwenConfig, rows: int, emb_rows: int, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f = cfg.hidden_size, cfg.ffn_dim
    std = 0.02

    def n(*shape, s=std):
        return (torch.randn(*shape, generator=g) * s).requires_grad_()
    p = {"emb.weight": n(emb_rows, h), "transformer.ln_f.weight": torch.ones(h).requires_grad_(),
         "out.weight": n(rows, h)}
    for i in range(cfg.num_hidden_layers):
        b = f"transformer.h.{i}."
        p.update({b + "ln_1.weight": torch.ones(h).requires_grad_(),
                  b + "attn.c_attn.weight": n(3 * h, h), b + "attn.c_attn.bias": torch.zeros(3 * h).requires_grad_(),
                  b + "attn.c_proj.weight": n(h, h, s=std / math.sqrt(2 * cfg.num_hidden_layers)),
                  b + "ln_2.weight": torch.ones(h).requires_grad_(),
                  b + "mlp.w1.weight": n(f, h), b + "mlp.w2.weight": n(f, h),
                  b + "mlp.c_proj.weight": n(h, f, s=std / math.sqrt(2 * cfg.num_hidden_layers))})
    return p


def forward_nll(cfg: QwenConfig, p: Dict[str, torch.Tensor], vocab: Vocab, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, T-1] over the full tokenizer vocabulary (bucket members included)."""
    T = ids.shape[1]
    h = p["emb.weight"][vocab.emb_t[ids]]
    rope = rope_tables(cfg, T)
    for i in range(cfg.num_hidden_layers):
        b = f"transformer.h.{i}."
        h = block_forward(cfg, {k[len(b):]: v for k, v in p.items() if k.startswith(b)}, h, rope)
    x = rms_norm(h, p["transformer.ln_f.weight"], cfg.layer_norm_epsilon)[:, :-1]
    logits = x @ p["out.weight"].T + vocab.log_n            # bucket rows carry their members' mass
    rows = vocab.row_t[ids[:, 1:]]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows.reshape(-1),
                          reduction="none").view(rows.shape)
    return nll + vocab.log_n[rows].clamp(min=0)              # a member's share of its bucket


def _windows(stream: np.ndarray, s: Settings, rng: np.random.Generator) -> torch.Tensor:
    T = s.seq
    starts = rng.integers(0, len(stream) - T, s.batch)
    out = np.stack([stream[a:a + T] for a in starts]).astype(np.int64)
    for w in out:
        if rng.random() < s.copy_share:                   # repeat an earlier span later on
            m = int(rng.integers(8, max(9, T // 4)))
            src = int(rng.integers(0, T // 2 - m)) if T // 2 - m > 0 else 0
            dst = int(rng.integers(src + m, T - m + 1))
            w[dst:dst + m] = w[src:src + m].copy()
    return torch.from_numpy(out)


def train(s: Settings, out_dir: Optional[Path] = None, log=print) -> Path:
    """Train (or reuse the cached) fixture; returns its checkpoint directory."""
    out_dir = Path(out_dir) if out_dir else cache_dir() / "fixture" / s.name
    if (out_dir / "config.json").is_file():
        return out_dir
    cfg, p, vocab = fit(s, log)
    export(cfg, p, vocab, out_dir, s)
    return out_dir


def fit(s: Settings, log=print):
    """(config, trained parameters, Vocab)."""
    torch.manual_seed(s.seed)
    tok = QwenTokenizer.default()
    files = stdlib_files()
    train_files = [f for f in files if not held_out(f[0])]
    if s.files:
        train_files = train_files[:s.files]
    t0 = time.perf_counter()
    stream = token_stream(tok, train_files)
    log(f"fixture: {len(train_files)} training files, {len(stream)} tokens ({time.perf_counter() - t0:.0f} s)")
    cfg = _config(s.layers, s.hidden, s.seq)
    vocab = Vocab(stream, len(tok), s.own)
    p = _params(cfg, vocab.rows, vocab.emb_rows, s.seed)
    opt = torch.optim.AdamW(list(p.values()), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(s.seed)
    t0 = time.perf_counter()
    for step in range(s.steps):
        warm = max(1, min(50, s.steps // 10))
        lr = s.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / s.steps))
        for gr in opt.param_groups:
            gr["lr"] = lr
        ids = _windows(stream, s, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_nll(cfg, p, vocab, ids).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        if step % 50 == 0 or step == s.steps - 1:
            el = time.perf_counter() - t0
            log(f"step {step + 1}/{s.steps}: loss {float(loss.detach()):.3f}, {(step + 1) * s.batch * s.seq / el:.0f} tok/s")
    return cfg, p, vocab


def export(cfg: QwenConfig, p: Dict[str, torch.Tensor], vocab: Vocab, out_dir: Path, s: Settings) -> None:
    """The release layout: every bucket member's lm_head row is its bucket's row."""
    from .testing import write_checkpoint
    sd = {k: v.detach().float().contiguous() for k, v in p.items()
          if k not in ("out.weight", "emb.weight")}
    n = len(vocab.row)
    head = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    head[:n] = p["out.weight"].detach().float()[vocab.row_t]
    sd["lm_head.weight"] = head
    wte = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    wte[:n] = p["emb.weight"].detach().float()[vocab.emb_t]
    sd["transformer.wte.weight"] = wte
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, cfg, sd, shards=1)
    shutil.copyfile(default_vocab_path(), tmp / "qwen.tiktoken")
    (tmp / "fixture.json").write_text(json.dumps(s.__dict__, indent=2) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro", action="store_true", help="the CI variant (one layer, under a minute)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="checkpoint directory (default: the cache)")
    a = ap.parse_args(argv)
    print(train(Settings(a.micro, a.steps, a.seed), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
