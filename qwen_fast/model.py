"""Qwen v1 forward pass with release semantics (qwen-spec.md §4) over the packed tokens of a step
(prefill chunks and decode tokens of several sequences in one pass over the weights), with their
keys and values in a paged KV cache (kv_cache.py).

    h = wte[ids]
    per block:  a = RMSNorm_1(h); h = h + Attn(a);  m = RMSNorm_2(h); h = h + c_proj(w1 m * silu(w2 m))
    logits = lm_head(RMSNorm_f(h))

The residual add and the next RMSNorm are one fused op (same roundings as the release). Every op
goes through a per-op backend table, so a kernel can replace its reference one op at a time.
Sequences in a step are independent: each has its own pages, its own rotary positions (starting
at 0, no padding) and its own dynamic-NTK alpha, chosen from its prompt's length when it is first
prefilled and kept for all its decode steps, as the release does.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .config import QwenConfig
from .kv_cache import PagePool, StepMetadata
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
        # Steps run each layer as one C++ call (_C.DecodeLayer, the same ops in the same order)
        # whenever every op of the table is the compiled one; False forces the Python loop.
        self.fused_decode = True
        self._decode_layers = None
        # The activation buffers of forward calls that bring none (an engine's runner brings its
        # own, so that engines sharing a model never share buffers).
        self.step_buffers = StepBuffers(8)

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

    def _rope(self, positions: torch.Tensor, alphas: Sequence[int], counts: Sequence[int]):
        """positions [N] (the packed tokens, sequence after sequence: counts[b] tokens of
        sequence b, whose NTK alpha is alphas[b]) -> cos, sin [N, rotary_dim]."""
        need = int(positions.max()) + 1
        if len(set(alphas)) == 1:
            c, s = self._rope_table(alphas[0], need)
            return c[positions], s[positions]
        cos, sin = [], []
        for a, p in zip(alphas, torch.split(positions, list(counts))):
            c, s = self._rope_table(a, need)
            cos.append(c[p])
            sin.append(s[p])
        return torch.cat(cos), torch.cat(sin)

    # ---- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, pool: PagePool, meta: StepMetadata,
                alphas: Sequence[int], logits_rows: Optional[Sequence[int]] = None,
                logits_dtype: Optional[torch.dtype] = None,
                buffers: Optional["StepBuffers"] = None) -> torch.Tensor:
        """One forward over a step's packed tokens, writing their keys and values into the pool.

        input_ids: [N] int64, the tokens of the step's sequences one after another
        (meta.counts[b] of sequence b: a prefill chunk, or one decode token); meta: the step's
        page table and per-token metadata (kv_cache.StepMetadata, shared by every layer, with
        each token's position on the host); alphas[b]: sequence b's dynamic-NTK alpha (chosen
        from its prompt's length when it was first prefilled, as the release does).
        Returns the logits [len(logits_rows), vocab] of the tokens logits_rows (default: every
        token, LOGITS_CHUNK at a time into the output, so that the only full-size tensor is the
        one returned), rounded to the model dtype (as the release), stored as logits_dtype
        (default: the model dtype). buffers: where a step's activations go (default: the
        model's own step_buffers).
        """
        cfg, ops = self.cfg, self.ops
        N = input_ids.shape[0]
        H, D = cfg.num_attention_heads, cfg.head_dim
        ids = input_ids.to(self.device)
        positions = meta.positions
        cos, sin = self._rope(positions, alphas, meta.counts)
        cos, sin = cos.to(self.device), sin.to(self.device)
        logn = None
        if cfg.use_logn_attn and int(positions.max()) >= cfg.seq_length:
            logn = self._logn[positions.to(self.device)].to(self.dtype)[:, None, None]   # [N, 1, 1]
        # Steps of up to buffers.rows tokens (decode) write every activation into buffers made
        # once; a longer step (prefill) allocates its own, freed when it ends.
        ws = self._buffers(N, buffers or self.step_buffers)
        h = torch.index_select(self.wte, 0, ids, out=ws["h"])                  # [N, hidden]
        x = ops["rms_norm"](h, self.layers[0]["ln_1.weight"], cfg.layer_norm_epsilon, out=ws["x"])
        linear = ops["linear"]
        fused = self._fused_layers()
        if fused is not None:
            from .ops import _stream
            bufs = [ws[k] for k in ("qkv", "q", "a", "o", "up", "gate", "act")]
            stream = _stream(h)
            for li, layer in enumerate(fused):
                nxt = self.layers[li + 1]["ln_1.weight"] if li + 1 < len(self.layers) else self.ln_f
                sc = (None, None) if pool.k_scales is None else \
                    (pool.k_scales[li], pool.v_scales[li])
                layer.step(h, x, bufs, pool.k[li], pool.v[li], cos, sin, meta.page_table,
                           meta.token_seq, meta.token_pos, meta.max_keys, logn, nxt, stream, *sc)
        for li, L in enumerate(self.layers if fused is None else ()):
            qkv = linear(x, L["attn.c_attn.weight"], L["attn.c_attn.bias"], out=ws["qkv"])
            q, k, v = qkv.view(N, 3, H, D).unbind(1)
            # q rotated; k rotated and v copied into the pages, straight from qkv.
            sc = {} if pool.k_scales is None else \
                {"k_scales": pool.k_scales[li], "v_scales": pool.v_scales[li]}
            q = ops["rotary_kv_cache"](q, k, v, cos, sin, pool.k[li], pool.v[li], meta.page_table,
                                       meta.token_seq, meta.token_pos, out=ws["q"], **sc)
            if logn is not None:
                q.mul_(logn)
            a = ops["attention"](q, pool.k[li], pool.v[li], meta.page_table, meta.token_seq,
                                 meta.token_pos, max_keys=meta.max_keys, out=ws["a"], **sc)
            attn_out = linear(a.view(N, H * D), L["attn.c_proj.weight"], out=ws["o"])
            x, h = ops["fused_add_rms_norm"](attn_out, h, L["ln_2.weight"], cfg.layer_norm_epsilon,
                                             out=ws["x"], residual_out=h)
            up = linear(x, L["mlp.w1.weight"], out=ws["up"])
            gate = linear(x, L["mlp.w2.weight"], out=ws["gate"])
            act = ops["swiglu"](up, gate, out=ws["act"])
            mlp_out = linear(act, L["mlp.c_proj.weight"], out=ws["o"])
            nxt = self.layers[li + 1]["ln_1.weight"] if li + 1 < len(self.layers) else self.ln_f
            x, h = ops["fused_add_rms_norm"](mlp_out, h, nxt, cfg.layer_norm_epsilon,
                                             out=ws["x"], residual_out=h)
        if logits_rows is not None:
            rows = x if list(logits_rows) == list(range(N)) else \
                x[torch.tensor(list(logits_rows), dtype=torch.long, device=self.device)]
            out = ops["linear"](rows, self.lm_head)
            return out if logits_dtype in (None, out.dtype) else out.to(logits_dtype)
        out = torch.empty(N, self.lm_head.shape[0], dtype=logits_dtype or self.dtype,
                          device=self.device)
        for t0 in range(0, N, self.LOGITS_CHUNK):
            out[t0:t0 + self.LOGITS_CHUNK] = ops["linear"](x[t0:t0 + self.LOGITS_CHUNK], self.lm_head)
        return out

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

    def _buffers(self, N: int, ws: "StepBuffers") -> Dict[str, torch.Tensor]:
        """The activations of a step of N tokens: views of ws's buffers (made on first use) when
        N fits (decode steps: nothing the size of an activation is allocated), else new tensors
        for this step (the logits are never among them: each step returns its own)."""
        cfg, L = self.cfg, self.layers[0]
        sizes = {"h": cfg.hidden_size, "x": cfg.hidden_size, "o": cfg.hidden_size,
                 "qkv": L["attn.c_attn.weight"].shape[0], "up": L["mlp.w1.weight"].shape[0],
                 "gate": L["mlp.w2.weight"].shape[0], "act": L["mlp.w1.weight"].shape[0]}
        H, D = cfg.num_attention_heads, cfg.head_dim

        def make(n):
            bufs = {k: torch.empty(n, v, dtype=self.dtype, device=self.device) for k, v in sizes.items()}
            for k in ("q", "a"):
                bufs[k] = torch.empty(n, H, D, dtype=self.dtype, device=self.device)
            return bufs
        if N > ws.rows:
            return make(N)
        if ws.bufs is None:
            ws.bufs = make(ws.rows)
        return {k: t[:N] for k, t in ws.bufs.items()}


class StepBuffers:
    """Activation buffers for steps of up to `rows` tokens, made on first use and kept (one set
    per engine runner: a step thread writes them, nothing else)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.bufs: Optional[Dict[str, torch.Tensor]] = None
