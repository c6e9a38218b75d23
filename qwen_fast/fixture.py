"""A small trained model with Qwen v1's architecture and the real vocabulary, to measure
quantization quality on something with structure (random weights have none).

    python -m qwen_fast.fixture [--micro] [--out DIR] [--steps N] [--seed 0] [--set KEY=VALUE]
        [--probe-every 100]

The default: 4 layers, hidden 256 (2 heads of 128), seq_length 512, 1,300 steps of 8 windows of
512 tokens (5.3M tokens, about 0.75 of an epoch), AdamW at 3e-3 with warm-up and cosine decay,
bf16 autocast: 974 s on the 2-core development machine (2026-12-05). On held-out text
(benchmarks/bench_fixture.py, 60,000 tokens, context 512): perplexity 130.8 against an
interpolated bigram's 281.3 (0.465x), 1.4e-4 of the probability on ids never seen in training,
and a loss 1.08 nat lower on tokens whose preceding 3-gram occurred earlier in the window.

Data: the Python standard library's sources (every machine has them), in path order; a file is
held out when the first byte of sha1(its path relative to the library) is a multiple of 10 (a
fixed rule, about 10% of the files). Every training window repeats an earlier span of itself
(8 to seq/3 tokens) later on, so that copying pays (with half of them repeating one, the
copying gap below was 0.88 nat instead of 1.08).

Copying: the model starts from an induction circuit (seed_copying: a previous-token head in
layer 0, an induction head in layer 1, tied output rows), whose entries training holds. Learned
from scratch it never appeared in the time allowed: after 400-800 steps, with natural or random
spans repeated in every window, the loss on a repeated span was that of its first occurrence.

Input embeddings: a row for each id of the training text, one shared row for the others.
Output layer: the ``own`` ids seen most often in training get rows of their own; the other ids
the training text holds share ``buckets`` rows (id modulo buckets); every id it never holds,
the padding ids past the tokenizer's included, shares one last row (never a target, so training
only pushes it down). A shared row gives each member the same logit w_b . x, so in training it
enters the partition function with w_b . x + log(n_b) (its n_b members' total mass) and a
member's loss is the row's cross-entropy plus log(n_b). Exported, each member's lm_head row is
w_b: the checkpoint's distribution over all of lm_head's rows is the trained one exactly (a
test checks the NLL). Training the full 151,936-row softmax instead was about 2.6x slower.

The checkpoint is written in the release layout (fp32 safetensors, config.json,
generation_config.json, qwen.tiktoken, and fixture.json + training.log: the settings and the
training's log with its held-out probes) under the cache folder (``$QWEN_FAST_CACHE`` or
~/.cache/qwen_fast)/fixture/NAME, named by a hash of its settings. Deterministic for a seed
at a given thread count (fixed steps; torch's CPU reductions may split differently with more
threads).
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
from .reference import rms_norm, rotate_half
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
    """What a fixture is trained with; its name hashes all of it. Keyword arguments override
    the defaults (for experiments: python -m qwen_fast.fixture --set own=4096)."""

    def __init__(self, micro: bool = False, steps: Optional[int] = None, seed: int = 0, **over):
        self.micro, self.seed = micro, seed
        if micro:
            self.layers, self.hidden, self.seq, self.batch = 1, 128, 64, 4
            self.steps, self.files, self.own = steps or 40, 40, 2048
        else:
            self.layers, self.hidden, self.seq, self.batch = 4, 256, 512, 8
            self.steps, self.files, self.own = steps or 1300, None, 4096
        self.buckets, self.lr, self.copy_share = BUCKETS, 3e-3, 1.0
        self.seed_copy, self.hold = not micro, 1.0
        for k, v in over.items():
            if not hasattr(self, k):
                raise ValueError(f"unknown fixture setting {k!r}; expected one of {sorted(self.__dict__)}")
            cur = getattr(self, k)
            if isinstance(cur, bool):
                v = str(v).lower() in ("1", "true", "yes")
            setattr(self, k, type(cur)(v) if cur is not None else int(v))

    @property
    def name(self) -> str:
        key = json.dumps(self.__dict__, sort_keys=True)
        return ("micro-" if self.micro else "fixture-") + hashlib.sha1(key.encode()).hexdigest()[:10]


class Vocab:
    """Rows of the trained output layer: own rows for the `own` most frequent training ids,
    `buckets` shared rows (id % buckets) for the other ids the training text holds, and one row
    shared by every id it never holds (never a target, so training only pushes it down)."""

    def __init__(self, train: np.ndarray, n_ids: int, own: int, buckets: int = BUCKETS):
        counts = np.bincount(train, minlength=n_ids)[:n_ids]
        seen = np.nonzero(counts)[0]
        own = min(own, len(seen))
        top = np.argsort(-counts, kind="stable")[:own]
        self.row = np.full(n_ids, -1, dtype=np.int64)
        self.row[top] = np.arange(own)
        rare = (self.row < 0) & (counts > 0)
        self.row[rare] = own + (np.nonzero(rare)[0] % buckets)
        self.row[counts == 0] = own + buckets
        self.rows = own + buckets + 1
        n = np.bincount(self.row, minlength=self.rows)
        self.log_n = torch.zeros(self.rows)
        shared = slice(own, self.rows)
        self.log_n[shared] = torch.from_numpy(np.log(np.maximum(n[shared], 1)).astype(np.float32))
        self.log_n[own:][torch.from_numpy(n[shared] == 0)] = -math.inf    # an empty row: no mass
        self.row_t = torch.from_numpy(self.row)
        # Input embeddings: a row for each id the training text holds, one shared by the rest
        # (an Adam step over all 151,936 rows cost more than the whole model's).
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


def seed_copying(cfg: QwenConfig, p: Dict[str, torch.Tensor], vocab: "Vocab",
                 g: torch.Generator) -> Dict[str, torch.Tensor]:
    """Start training from an induction circuit (in place, before training): without it the
    model never learned to copy in the time allowed (the loss on a repeated span stayed that of
    its first occurrence after 800 steps, with or without spans of random tokens to copy).

    - Embeddings use residual dims [0, D) (D = head_dim); dims [D, 2D) start empty.
    - Layer 0, head 0 attends to the previous position: its query and key are constant biases,
      the key's rotated one position ahead, so their rotary product peaks at distance 1. Its
      value reads dims [0, D) and c_proj writes them to [D, 2D): each position then holds its
      own token in [0, D) and the previous one in [D, 2D).
    - Layer 1, head 0 is an induction head: its query reads the current token, its key the
      previous-token slot, both through one random projection into the lowest rotary
      frequencies (those that turn by at most half a radian over seq_length positions, so
      matching tokens score alike at any distance); its value reads the token at the matched position and
      c_proj adds it to dims [0, D).
    - The output rows start as the embeddings of their ids (tied), so the added token raises
      its own logit.
    Returns {parameter: bool mask} of the two heads' entries (their query, key and value rows,
    the c_attn bias rows and their c_proj columns), which training holds for its first part
    (Settings.hold): trained from the start, the circuit was gone within 50 steps."""
    D, h = cfg.head_dim, cfg.hidden_size
    if cfg.num_hidden_layers < 2 or h < 2 * D:
        raise ValueError("copying is seeded in two layers of at least two heads' width")
    with torch.no_grad():
        emb = p["emb.weight"]
        emb[:, D:] = 0
        l0, l1 = "transformer.h.0.", "transformer.h.1."
        # the previous-token head: q = a, k = rope(a, +1) at every position
        a = torch.randn(D, generator=g) * 3.0
        cos, sin = rope_tables(cfg, 2)
        c = a * cos[0, 1, 0] + rotate_half(a) * sin[0, 1, 0]
        W, bias = p[l0 + "attn.c_attn.weight"], p[l0 + "attn.c_attn.bias"]
        W[:D] = 0
        W[h:h + D] = 0
        bias[:D], bias[h:h + D] = a, c
        W[2 * h:2 * h + D] = 0
        W[2 * h:2 * h + D, :D] = torch.eye(D)
        rms_e = float(emb[:, :D].pow(2).mean().sqrt()) * math.sqrt(D / h)
        P0 = p[l0 + "attn.c_proj.weight"]
        P0[:, :D] = 0
        P0[D:2 * D, :D] = torch.eye(D) * (rms_e * math.sqrt(h / D) / math.sqrt(2))
        # the induction head, in the lowest rotary frequencies (pairs f, f + D/2)
        half = D // 2
        inv = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        low = max(8, int((inv * cfg.seq_length <= 0.5).sum()))
        dims = torch.cat([torch.arange(half - low, half), torch.arange(D - low, D)])
        proj = torch.linalg.qr(torch.randn(D, 2 * low, generator=g))[0].T      # [2 low, D]
        alpha = 2.5
        W, bias = p[l1 + "attn.c_attn.weight"], p[l1 + "attn.c_attn.bias"]
        W[:D] = 0
        W[h:h + D] = 0
        W[dims, :D] = proj * alpha
        W[h + dims, D:2 * D] = proj * alpha
        bias[:D] = 0
        bias[h:h + D] = 0
        W[2 * h:2 * h + D] = 0
        W[2 * h:2 * h + D, :D] = torch.eye(D)
        P1 = p[l1 + "attn.c_proj.weight"]
        P1[:, :D] = 0
        P1[:D, :D] = torch.eye(D) * rms_e * 2.0
        # tied output rows: an own id's row is its embedding, a shared row its members' mean
        out = p["out.weight"]
        rows = torch.from_numpy(vocab.row)
        seen = torch.from_numpy(vocab.emb_index < vocab.emb_rows - 1)
        sums = torch.zeros(vocab.rows, h).index_add_(0, rows[seen], emb[vocab.emb_t[seen]])
        n = torch.zeros(vocab.rows).index_add_(0, rows[seen], torch.ones(int(seen.sum())))
        out.copy_(sums / n.clamp(min=1)[:, None] * 5.0)
    masks = {}
    for blk in (l0, l1):
        head0 = torch.zeros(3 * h, dtype=torch.bool)      # head 0's query, key and value rows
        for part in range(3):
            head0[part * h:part * h + D] = True
        masks[blk + "attn.c_attn.weight"] = head0[:, None].expand(3 * h, h).clone()
        masks[blk + "attn.c_attn.bias"] = head0
        mp = torch.zeros(h, h, dtype=torch.bool)
        mp[:, :D] = True
        masks[blk + "attn.c_proj.weight"] = mp
        masks[blk + "ln_1.weight"] = torch.ones(h, dtype=torch.bool)
    # Nothing else writes the previous-token slot before layer 1 reads it: the embeddings'
    # dims [D, 2D), layer 0's other head and its MLP start at zero there and are held.
    with torch.no_grad():
        p[l0 + "attn.c_proj.weight"][D:2 * D, D:] = 0
        p[l0 + "mlp.c_proj.weight"][D:2 * D] = 0
    masks[l0 + "attn.c_proj.weight"][D:2 * D] = True
    me = torch.zeros(vocab.emb_rows, h, dtype=torch.bool)
    me[:, D:2 * D] = True
    masks["emb.weight"] = me
    mm = torch.zeros(h, cfg.ffn_dim, dtype=torch.bool)
    mm[D:2 * D] = True
    masks[l0 + "mlp.c_proj.weight"] = mm
    return masks


def forward_nll(cfg: QwenConfig, p: Dict[str, torch.Tensor], vocab: Vocab, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, T-1] over the full tokenizer vocabulary (bucket members included)."""
    T = ids.shape[1]
    h = F.embedding(vocab.emb_t[ids], p["emb.weight"])        # a deterministic backward
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


def repeated_trigram(window: np.ndarray) -> np.ndarray:
    """flags[j]: the 3-gram just before token j (window[j-3:j]) occurred earlier in the window,
    ending before j - 1 (so a copying model could predict token j from what followed it)."""
    flags = np.zeros(len(window), dtype=bool)
    first_end: Dict[tuple, int] = {}
    for j in range(3, len(window)):
        tri = tuple(window[j - 3:j].tolist())
        end = first_end.setdefault(tri, j - 1)
        flags[j] = end < j - 1
    return flags


class Probe:
    """Held-out loss and the copying gap on fixed held-out windows, logged while training."""

    def __init__(self, tok, seq: int, windows: int = 24):
        held = token_stream(tok, [f for f in stdlib_files() if held_out(f[0])])
        starts = np.linspace(0, len(held) - seq - 1, windows).astype(np.int64)
        w = np.stack([held[a:a + seq] for a in starts]).astype(np.int64)
        self.ids = torch.from_numpy(w)
        self.copy = torch.from_numpy(np.stack([repeated_trigram(x)[1:] for x in w]))
        # The same windows with their tokens 16..47 repeated at 160..191: the loss on the
        # repeat's last 31 tokens, against the first occurrence's, shows copying directly.
        r = w.copy()
        r[:, 160:192] = r[:, 16:48]
        self.rep = torch.from_numpy(r)

    @torch.no_grad()
    def __call__(self, cfg, p, vocab) -> str:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = forward_nll(cfg, p, vocab, self.ids).float()
            rep = forward_nll(cfg, p, vocab, self.rep).float()
        gap = float(nll[~self.copy].mean() - nll[self.copy].mean())
        first, again = float(rep[:, 16:47].mean()), float(rep[:, 160:191].mean())
        return (f"held-out ppl {math.exp(float(nll.mean())):.1f}, copying gap {gap:.2f} nat; "
                f"a repeated span: loss {first:.2f} -> {again:.2f}")


def _windows(stream: np.ndarray, s: Settings, rng: np.random.Generator) -> torch.Tensor:
    T = s.seq
    starts = rng.integers(0, len(stream) - T, s.batch)
    out = np.stack([stream[a:a + T] for a in starts]).astype(np.int64)
    for w in out:
        if rng.random() < s.copy_share:                   # repeat an earlier span later on
            m = int(rng.integers(8, max(9, T // 3)))
            src = int(rng.integers(0, max(1, T - 2 * m)))
            dst = int(rng.integers(src + m, T - m + 1))
            w[dst:dst + m] = w[src:src + m].copy()
    return torch.from_numpy(out)


def train(s: Settings, out_dir: Optional[Path] = None, log=print, probe_every: int = 0) -> Path:
    """Train (or reuse the cached) fixture; returns its checkpoint directory."""
    out_dir = Path(out_dir) if out_dir else cache_dir() / "fixture" / s.name
    if (out_dir / "config.json").is_file():
        return out_dir
    lines: List[str] = []

    def keep(msg: str) -> None:
        lines.append(msg)
        log(msg)
    t0 = time.perf_counter()
    cfg, p, vocab = fit(s, keep, probe_every)
    keep(f"trained in {time.perf_counter() - t0:.0f} s")
    export(cfg, p, vocab, out_dir, s, "\n".join(lines) + "\n")
    return out_dir


def fit(s: Settings, log=print, probe_every: int = 0):
    """(config, trained parameters, Vocab); every probe_every steps, log held-out loss."""
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
    # Over all of lm_head's rows: the padding ids past the tokenizer's (which no text holds)
    # share the never-seen row, so that a softmax over every row (llama.cpp's, the release's
    # loss) gives them as little as the unseen ids.
    vocab = Vocab(stream, cfg.vocab_size, s.own, s.buckets)
    p = _params(cfg, vocab.rows, vocab.emb_rows, s.seed)
    held = seed_copying(cfg, p, vocab, torch.Generator().manual_seed(s.seed + 1)) if s.seed_copy else {}
    opt = torch.optim.AdamW(list(p.values()), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(s.seed)
    probe = Probe(tok, s.seq) if probe_every else None
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
        if step < s.hold * s.steps:
            for name, mask in held.items():
                p[name].grad[mask] = 0
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
        if step % 50 == 0 or step == s.steps - 1:
            el = time.perf_counter() - t0
            log(f"step {step + 1}/{s.steps}: loss {float(loss.detach()):.3f}, {(step + 1) * s.batch * s.seq / el:.0f} tok/s")
        if probe and ((step + 1) % probe_every == 0 or step == s.steps - 1):
            log(f"step {step + 1}: {probe(cfg, p, vocab)}")
    return cfg, p, vocab


def export(cfg: QwenConfig, p: Dict[str, torch.Tensor], vocab: Vocab, out_dir: Path, s: Settings,
           training_log: str = "") -> None:
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
    if training_log:
        (tmp / "training.log").write_text(training_log)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro", action="store_true", help="the CI variant (one layer, under a minute)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="checkpoint directory (default: the cache)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting (own, buckets, lr, batch, seq, layers, hidden, copy_share, ...)")
    ap.add_argument("--probe-every", type=int, default=100,
                    help="log held-out perplexity and the copying gap every N steps (0: never)")
    a = ap.parse_args(argv)
    over = {}
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        over[k] = v
    print(train(Settings(a.micro, a.steps, a.seed, **over), a.out, probe_every=a.probe_every))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
