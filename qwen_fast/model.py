"""Qwen v1 forward pass with release semantics (qwen-spec.md §4), over a batched KV cache with
per-sequence lengths.

    h = wte[ids]
    per block:  a = RMSNorm_1(h); h = h + Attn(a);  m = RMSNorm_2(h); h = h + c_proj(w1 m * silu(w2 m))
    logits = lm_head(RMSNorm_f(h))

The residual add and the next RMSNorm are one fused op (same roundings as the release). Every op
goes through a per-op backend table, so a kernel can replace its reference one op at a time.
Sequences in a batch are independent: each has its own length, its own rotary positions
(starting at 0, no padding offsets) and its own dynamic-NTK alpha, chosen when the sequence is
prefilled from an empty cache and kept for all its decode steps, as the release does.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .config import QwenConfig, ntk_alpha
from .qweight import QuantWeight

OP_NAMES = ("rms_norm", "fused_add_rms_norm", "rotary_kv_cache", "swiglu", "attention", "linear")
BACKENDS = ("reference", "native", "auto")


def _reference_linear(x, weight, bias=None, *, out=None):
    # The release's projections are torch's own F.linear in the model dtype (fp32 sums, one
    # rounding: what reference.linear specifies for the kernel, at torch's speed); an int4/int8
    # weight is dequantized for the call (the dense reference on the dequantized weights).
    from .ops import _into
    if isinstance(weight, QuantWeight):
        weight = weight.dequantize(x.dtype).to(x.device)
    return _into(F.linear(x, weight, bias), out)


def resolve_ops(backend: str) -> Dict[str, Callable]:
    """Op name -> implementation. 'reference' = PyTorch everywhere; 'native' (= 'auto') = our
    C++/CUDA kernel where one exists for the op, the reference elsewhere. Every op takes the
    keyword out= (and fused_add_rms_norm residual_out=): the reference ones copy into it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from . import ops
    table = {name: functools.partial(getattr(ops, name), backend="reference")
             for name in OP_NAMES if name != "linear"}
    table["linear"] = _reference_linear
    if backend != "reference":
        if ops.HAVE_C:
            for name in OP_NAMES:
                fn = getattr(ops, name, None)
                if fn is not None:
                    table[name] = fn
    return table


class KVCache:
    """Per-layer keys (after RoPE) and values: k[layer], v[layer] = [batch, heads, capacity, head_dim]
    (each head's positions contiguous, so that attention streams them; the release keeps
    [batch, seq, heads, head_dim], where consecutive positions of a head lie 4 KiB apart).

    lengths[b] is how many positions of sequence b are filled; alpha[b] its NTK alpha.
    The cache starts at `capacity` positions and grows with use (ensure) up to `max_capacity`
    (default: no growth), one layer at a time, so that a growth step needs only one layer's
    worth of extra memory; memory follows what the sequences use, not what they might use.
    """

    GRANULE = 64    # capacities are rounded up to a multiple of this many positions

    def __init__(self, cfg: QwenConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_capacity: Optional[int] = None):
        self.max_capacity = capacity if max_capacity is None else max_capacity
        if self.max_capacity > cfg.max_context:
            raise ValueError(f"KV cache capacity {self.max_capacity} exceeds the model's hard "
                             f"maximum of {cfg.max_context} tokens")
        if not 0 < capacity <= self.max_capacity:
            raise ValueError(f"KV cache capacity {capacity} must be in [1, {self.max_capacity}]")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        shape = (batch_size, cfg.num_attention_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.lengths: List[int] = [0] * batch_size
        self.alpha: List[int] = [1] * batch_size
        self.peak_bytes = self.nbytes()
        self.buffers: Optional[Dict[str, torch.Tensor]] = None   # QwenModel._decode_buffers

    @staticmethod
    def bytes_per_token(cfg: QwenConfig, dtype: torch.dtype) -> int:
        """Bytes of keys + values one position of one sequence takes (192 KiB for 1.8B bf16)."""
        return (2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
                * torch.empty((), dtype=dtype).element_size())

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def grow_slots(self, n: int) -> None:
        """Room for n sequences (n >= batch_size): the cached ones keep their slots."""
        old = self.batch_size
        if n <= old:
            return
        for kv in (self.k, self.v):
            for li, t in enumerate(kv):
                grown = torch.zeros((n,) + t.shape[1:], dtype=t.dtype, device=t.device)
                grown[:old] = t
                kv[li] = grown
        self.lengths += [0] * (n - old)
        self.alpha += [1] * (n - old)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def ensure(self, needed: int) -> None:
        """Make room for `needed` positions per sequence: at least double the capacity (so
        growth costs O(1) per token), never past max_capacity. New positions are zero."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise ValueError(f"{needed} positions exceed the KV cache capacity of {self.max_capacity}")
        new = max(needed, 2 * self.capacity)
        new = min(-(-new // self.GRANULE) * self.GRANULE, self.max_capacity)
        old = self.capacity
        for kv in (self.k, self.v):
            for li, t in enumerate(kv):
                grown = torch.zeros(t.shape[:2] + (new, t.shape[3]), dtype=t.dtype, device=t.device)
                grown[:, :, :old] = t
                kv[li] = grown
        self.peak_bytes = max(self.peak_bytes, self.nbytes())


class QwenModel:
    LOGITS_CHUNK = 256      # positions per lm_head call when all logits are asked for

    def __init__(self, cfg: QwenConfig, weights: Dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", backend: str = "reference"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend = backend
        self.ops = resolve_ops(backend)
        w = weights
        self.wte = w["transformer.wte.weight"]
        self.ln_f = w["transformer.ln_f.weight"]
        self.lm_head = w["lm_head.weight"]
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"transformer.h.{i}."
            self.layers.append({k: w[p + k] for k in (
                "ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "ln_2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")})
        # logn[p] = log_{seq_length}(p + 1) past seq_length, else 1 (the release's fp32 table).
        n = cfg.max_context
        self._logn = torch.tensor(
            [math.log(i, cfg.seq_length) if i > cfg.seq_length else 1.0 for i in range(1, n + 1)],
            dtype=torch.float32, device=self.device)
        self._rope_tables: Dict[int, tuple] = {}
        # Decode steps run each layer as one C++ call (_C.DecodeLayer, the same ops in the same
        # order) whenever every op of the table is the compiled one; False forces the Python loop.
        self.fused_decode = True
        self._decode_layers = None

    # ---- rotary tables -------------------------------------------------------------------
    def _rope_table(self, alpha: int, needed: int):
        """cos/sin [N, rotary_dim] fp32 for NTK alpha, built like the release's cache."""
        tab = self._rope_tables.get(alpha)
        if tab is None or tab[0].shape[0] < needed:
            dim = self.cfg.rotary_dim
            base = self.cfg.rotary_emb_base * alpha ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=self.device).float() / dim))
            n = max(2 * needed, 16)
            seq = torch.arange(n, device=self.device).type_as(inv_freq)
            freqs = torch.outer(seq, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            tab = (emb.cos(), emb.sin())
            self._rope_tables[alpha] = tab
        return tab

    def _rope(self, positions: torch.Tensor, alphas: Sequence[int]):
        """positions [B, T] -> cos, sin [B, T, rotary_dim] using each row's alpha."""
        need = int(positions.max()) + 1
        cos, sin = [], []
        for b, a in enumerate(alphas):
            c, s = self._rope_table(a, need)
            cos.append(c[positions[b]])
            sin.append(s[positions[b]])
        return torch.stack(cos), torch.stack(sin)

    # ---- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache,
                num_new: Optional[Sequence[int]] = None, all_logits: bool = False,
                logits_dtype: Optional[torch.dtype] = None,
                rows: Optional[Sequence[int]] = None,
                prompt_lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Append tokens to sequences of the cache and return logits.

        input_ids: [B, T] int64, row b right-padded with num_new[b] valid tokens (default T).
        rows: the cache sequence of each input row (default 0..B-1), so finished sequences
        can drop out of a batch. A sequence whose cache is empty is a prefill and picks its NTK
        alpha from its prompt length: prompt_lengths[b] when the prompt is prefilled in
        chunks, else num_new[b]. Returns [B, vocab] logits of each row's last valid token, or
        [B, T, vocab] for all positions when all_logits. Logits are rounded to the model dtype
        (as the release), then stored as logits_dtype (default: the model dtype); all_logits
        computes them LOGITS_CHUNK positions at a time into the output, so the only full-size
        tensor is the one returned.
        """
        cfg, ops = self.cfg, self.ops
        B, T = input_ids.shape
        rows = list(range(B)) if rows is None else [int(r) for r in rows]
        if len(rows) != B or len(set(rows)) != B or any(not 0 <= r < cache.batch_size for r in rows):
            raise ValueError(f"rows must name {B} distinct cache sequences in [0, {cache.batch_size}), got {rows}")
        n_new = [T] * B if num_new is None else [int(n) for n in num_new]
        if len(n_new) != B or any(n < 1 or n > T for n in n_new):
            raise ValueError(f"num_new must give 1..{T} tokens for each of {B} rows, got {n_new}")
        lengths = [cache.lengths[r] for r in rows]
        for b, r in enumerate(rows):
            if lengths[b] + n_new[b] > cache.max_capacity:
                raise ValueError(f"sequence {r}: {lengths[b]} cached + {n_new[b]} new tokens "
                                 f"exceed the KV cache capacity of {cache.max_capacity}")
            if lengths[b] == 0:
                n = n_new[b] if prompt_lengths is None else int(prompt_lengths[b])
                cache.alpha[r] = ntk_alpha(n, cfg.seq_length) if cfg.use_dynamic_ntk else 1
        alphas = [cache.alpha[r] for r in rows]
        cache.ensure(max(lengths[b] + n_new[b] for b in range(B)))
        ids = input_ids.to(self.device)
        # start stays on the CPU, where attention reads it (the CUDA kernel gets a copy).
        start = torch.tensor(lengths, dtype=torch.long)
        positions = start.to(self.device)[:, None] + torch.arange(T, device=self.device)[None, :]   # [B, T]
        positions = positions.clamp_(max=cache.capacity - 1)   # padding rows only
        cos, sin = self._rope(positions, alphas)
        logn = None
        if cfg.use_logn_attn and int(positions.max()) >= cfg.seq_length:
            logn = self._logn[positions].to(self.dtype)[:, :, None, None]      # [B, T, 1, 1]
        S = max(lengths[b] + n_new[b] for b in range(B))
        # Input rows i0..i1 that are cache rows r0.. in order: attention reads each run of the
        # cache as a view, so a batch whose finished rows dropped out copies nothing per step.
        runs = []
        for i, r in enumerate(rows):
            if runs and r == runs[-1][2] + (i - runs[-1][0]):
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, r])
        H, D = cfg.num_attention_heads, cfg.head_dim
        # Decode steps write every activation into buffers allocated once per cache (per
        # request); a prefill allocates its own, freed when it ends.
        ws = self._decode_buffers(cache, B) if T == 1 else {}
        buf = ws.get

        if T == 1:
            h = torch.index_select(self.wte, 0, ids.view(B), out=ws["h"].view(B, -1)).view(B, 1, -1)
        else:
            h = F.embedding(ids, self.wte)                                      # [B, T, hidden]
        x = ops["rms_norm"](h, self.layers[0]["ln_1.weight"], cfg.layer_norm_epsilon, out=buf("x"))
        linear = ops["linear"]
        fused = self._fused_layers() if T == 1 else None
        if fused is not None:
            from .ops import _stream
            bufs = [ws[k] for k in ("qkv", "q", "a", "o", "up", "gate", "act")]
            flat_runs = [v for run in runs for v in run]
            stream = _stream(h)
            for li, layer in enumerate(fused):
                nxt = self.layers[li + 1]["ln_1.weight"] if li + 1 < len(self.layers) else self.ln_f
                layer.step(h, x, bufs, cache.k[li], cache.v[li], cos, sin, rows, lengths, start,
                           flat_runs, S, logn, nxt, stream)
        for li, L in enumerate(self.layers if fused is None else ()):
            qkv = linear(x, L["attn.c_attn.weight"], L["attn.c_attn.bias"], out=buf("qkv"))
            q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
            kc, vc = cache.k[li], cache.v[li]
            # q rotated; k rotated and v copied into the cache, straight from qkv.
            q = ops["rotary_kv_cache"](q, k, v, cos, sin, kc, vc, rows, lengths, n_new, out=buf("q"))
            if logn is not None:
                q.mul_(logn)
            # [B, S, H, D] views of the [B, H, S, D] cache: each head's keys are contiguous.
            a = ws["a"] if ws else q.new_empty(B, T, H, D)
            for i0, i1, r0 in runs:
                ops["attention"](q[i0:i1], kc[r0:r0 + i1 - i0, :, :S].transpose(1, 2),
                                 vc[r0:r0 + i1 - i0, :, :S].transpose(1, 2), start[i0:i1],
                                 out=a[i0:i1])
            attn_out = linear(a.view(B, T, H * D), L["attn.c_proj.weight"], out=buf("o"))
            x, h = ops["fused_add_rms_norm"](attn_out, h, L["ln_2.weight"], cfg.layer_norm_epsilon,
                                             out=buf("x"), residual_out=h)
            up = linear(x, L["mlp.w1.weight"], out=buf("up"))
            gate = linear(x, L["mlp.w2.weight"], out=buf("gate"))
            act = ops["swiglu"](up, gate, out=buf("act"))
            mlp_out = linear(act, L["mlp.c_proj.weight"], out=buf("o"))
            nxt = self.layers[li + 1]["ln_1.weight"] if li + 1 < len(self.layers) else self.ln_f
            x, h = ops["fused_add_rms_norm"](mlp_out, h, nxt, cfg.layer_norm_epsilon,
                                             out=buf("x"), residual_out=h)
        for b, r in enumerate(rows):
            cache.lengths[r] += n_new[b]
        if all_logits:
            out = torch.empty(B, T, self.lm_head.shape[0], dtype=logits_dtype or self.dtype,
                              device=self.device)
            for t0 in range(0, T, self.LOGITS_CHUNK):
                out[:, t0:t0 + self.LOGITS_CHUNK] = ops["linear"](x[:, t0:t0 + self.LOGITS_CHUNK], self.lm_head)
            return out
        if T == 1:
            return ops["linear"](x[:, 0], self.lm_head)
        last = torch.tensor([n - 1 for n in n_new], device=self.device)
        return ops["linear"](x[torch.arange(B, device=self.device), last], self.lm_head)

    def _fused_layers(self):
        """The layers as _C.DecodeLayer objects (made once), or None when a decode step must run
        the Python loop: fused_decode off, or an op of the table that is not the compiled one
        (the reference backend, or a table a caller changed)."""
        from . import ops as ops_mod
        if not self.fused_decode or not ops_mod.HAVE_C or any(
                self.ops[name] is not getattr(ops_mod, name) for name in OP_NAMES):
            return None
        if self._decode_layers is None:
            def lin(w):
                if isinstance(w, QuantWeight):
                    return (w.data, w.bits, w.in_features, w.out_features, w.perm)
                return (w, 0, w.shape[1], w.shape[0], None)
            cfg = self.cfg
            self._decode_layers = [ops_mod._C.DecodeLayer(
                L["ln_1.weight"], lin(L["attn.c_attn.weight"]), L["attn.c_attn.bias"],
                lin(L["attn.c_proj.weight"]), L["ln_2.weight"], lin(L["mlp.w1.weight"]),
                lin(L["mlp.w2.weight"]), lin(L["mlp.c_proj.weight"]), cfg.num_attention_heads,
                cfg.head_dim, cfg.layer_norm_epsilon) for L in self.layers]
        return self._decode_layers

    def _decode_buffers(self, cache: KVCache, B: int) -> Dict[str, torch.Tensor]:
        """The activations of a decode step for rows [:B], views of buffers made once per cache
        for all its sequences (the logits are not among them: each step returns its own)."""
        if cache.buffers is None:
            cfg, n = self.cfg, cache.batch_size
            L = self.layers[0]
            sizes = {"h": cfg.hidden_size, "x": cfg.hidden_size, "o": cfg.hidden_size,
                     "qkv": L["attn.c_attn.weight"].shape[0], "up": L["mlp.w1.weight"].shape[0],
                     "gate": L["mlp.w2.weight"].shape[0], "act": L["mlp.w1.weight"].shape[0]}
            cache.buffers = {k: torch.empty(n, 1, v, dtype=self.dtype, device=self.device)
                             for k, v in sizes.items()}
            for k in ("q", "a"):
                cache.buffers[k] = torch.empty(n, 1, cfg.num_attention_heads, cfg.head_dim,
                                               dtype=self.dtype, device=self.device)
        return {k: t[:B] for k, t in cache.buffers.items()}
