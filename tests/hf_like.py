"""An independent, deliberately naive transcription of the release forward (one sequence, no
cache, whole-sequence causal attention), used only to check qwen_fast.model.

It follows the release's own structure: a cos/sin cache built for max(2L, 16) positions from
an NTK-scaled base, the rotary slice taken from the end of the table, logn factors sliced at
key_len - q_len, attention as an explicit masked softmax, the MLP as c_proj(w1 x * silu(w2 x)).
"""
import math

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def forward(cfg, sd, ids, alpha=None):
    """ids: list[int]. Returns [L, vocab] logits in the weights' dtype. alpha None = dynamic NTK
    from the sequence length (what a prefill of all of ids does)."""
    L = len(ids)
    H, D = cfg.num_attention_heads, cfg.kv_channels
    if alpha is None:
        alpha = 1
        if cfg.use_dynamic_ntk:
            alpha = max(2 ** math.ceil(math.log(L / cfg.seq_length, 2) + 1) - 1, 1)
    dim = cfg.rotary_dim
    base = cfg.rotary_emb_base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    n = max(2 * L, 16)
    freqs = torch.outer(torch.arange(n).type_as(inv_freq), inv_freq)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[:L][:, None, :], emb.sin()[:L][:, None, :]   # [L, 1, dim]

    def rope(t):  # t [L, H, D]
        tf = t.float()
        rot = torch.cat((-tf[..., dim // 2:dim], tf[..., :dim // 2]), -1)
        return torch.cat((tf[..., :dim] * cos + rot * sin, tf[..., dim:]), -1).to(t.dtype)

    logn = torch.tensor([math.log(i, cfg.seq_length) if i > cfg.seq_length else 1
                         for i in range(1, 32768)], dtype=torch.float32)
    eps = cfg.layer_norm_epsilon
    h = sd["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        a = rms(h, sd[p + "ln_1.weight"], eps)
        mixed = F.linear(a, sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"])
        q, k, v = mixed.split(cfg.hidden_size, dim=-1)
        q, k, v = (t.reshape(L, H, D) for t in (q, k, v))
        q, k = rope(q), rope(k)
        if cfg.use_logn_attn:
            q = q * logn[0:L].type_as(q)[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(D)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(h.dtype)
        h = h + F.linear(o.reshape(L, H * D), sd[p + "attn.c_proj.weight"])
        m = rms(h, sd[p + "ln_2.weight"], eps)
        a1 = F.linear(m, sd[p + "mlp.w1.weight"])
        a2 = F.linear(m, sd[p + "mlp.w2.weight"])
        h = h + F.linear(a1 * F.silu(a2), sd[p + "mlp.c_proj.weight"])
    return F.linear(rms(h, sd["transformer.ln_f.weight"], eps), sd["lm_head.weight"])
