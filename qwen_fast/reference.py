"""PyTorch reference of every op: the spec that kernels and tests are measured against.

Each function states where rounding happens, because that is where Qwen's release
semantics live (see qwen-spec.md §4). Inputs may be bf16, fp16 or fp32; the maths runs
in fp32 and rounds to the input dtype at exactly the points the release does.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen RMSNorm over the last dim.

    y = (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype) * weight

    The normalised value is rounded to x.dtype *before* the multiply by the weight, and the
    product is computed in x.dtype (one more rounding), exactly as the release's pure-torch path.
    """
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: h = residual + x (rounded to the dtype), returns (rms_norm(h), h).

    This is `h = h + attn(a); m = RMSNorm_2(h)` of a Qwen block in one pass.
    """
    h = residual + x
    return rms_norm(h, weight, eps), h


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias; x [..., K], weight [N, K], bias [N] or None -> [..., N].

    Products and sums in fp32, the bias added in fp32, then rounded once to x.dtype: what a
    bf16/fp16 GEMM with fp32 accumulation and a fused bias epilogue does. torch's own CPU
    F.linear in bf16/fp16 rounds the same way. Measured (torch 2.13, M in 1..128, K 2048/5504,
    with and without bias): it differs from this in at most 0.2% (bf16) / 0.6% (fp16) of the
    elements, by what fp32 sums in another order explain (within tests/tolerances.py's
    dot_product_bound: mostly one unit in the last place, up to ~20 where cancellation leaves a
    result far smaller than its terms); rounding before adding the bias would differ in ~30%.
    """
    y = torch.matmul(x.float(), weight.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX ("rotate half") RoPE, as the release applies it to q and k after the split.

    x: [B, T, H, D] (any float dtype); cos, sin: [B, T, R] fp32 with R <= D the rotary dim.
    The maths runs in fp32 and the result is rounded once to x.dtype; dims past R pass through.
    Rounding: x*cos and rotate_half(x)*sin are separate fp32 multiplies (each rounded), then one
    fp32 add, then the cast to x.dtype; a kernel that does the same is bit-identical.
    """
    r = cos.shape[-1]
    xr = x[..., :r].float()
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = xr * c + rotate_half(xr) * s
    if r < x.shape[-1]:
        out = torch.cat((out, x[..., r:].float()), dim=-1)
    return out.to(x.dtype)


def quantize_kv(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32,
                group: int | None = None):
    """int8 codes and scales of keys or values x [..., D], one scale per `group` consecutive
    elements of a row (a position of a head; group=None: the whole row, D): scale = max|x| / 127
    over the group, rounded UP to scale_dtype (1 for an all-zero group), q = round(x / scale) in
    [-127, 127] computed with the stored scale, so |x - scale * q| <= scale / 2 for every element
    (up to fp32 rounding of x / scale). Returns (q int8 [..., D], scale [..., D // group])."""
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"KV scales are float32 or float16, got {scale_dtype}")
    D = x.shape[-1]
    group = D if group is None else group
    if group < 1 or D % group:
        raise ValueError(f"the KV scale group ({group}) must divide head_dim ({D})")
    xf = x.float().unflatten(-1, (D // group, group))
    s = xf.abs().amax(-1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    if scale_dtype == torch.float16:
        from .gptq import fp16_round_up
        s = fp16_round_up(s)
    stored = s.to(scale_dtype)
    qv = torch.round(xf / stored.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return qv.flatten(-2), stored


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 scale * code of an int8 cache's codes [..., D] with scales [..., G] (D // G elements
    a scale): what attention reads."""
    G = scales.shape[-1]
    return (codes.float().unflatten(-1, (G, -1)) * scales.float()[..., None]).flatten(-2)


def rotary_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    page_table: torch.Tensor, token_seq: torch.Tensor,
                    token_pos: torch.Tensor, k_scales: torch.Tensor | None = None,
                    v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE of q and k with the keys and values written into a paged KV cache, as a model step does.

    q, k, v: [N, H, D], one row per token of the step (tokens of several sequences packed);
    cos, sin: [N, R] fp32; k_pages, v_pages: [num_pages, H, P, D]; page_table: [num_seqs,
    max_pages] int32; token_seq, token_pos: [N] int32, the sequence and absolute position of each
    token. Token i writes rotary_embedding(k[i]) and v[i] (copied, no rounding) to
    page page_table[token_seq[i], token_pos[i] // P], offset token_pos[i] % P, every head.
    Returns rotary_embedding(q, cos, sin) [N, H, D].

    An int8 cache (k_pages/v_pages int8, k_scales/v_scales [num_pages, H, P, G]: G scales a
    position and head, each for D // G consecutive elements) stores quantize_kv of the rotated key
    (rounded to q.dtype first, as the 16-bit cache holds it) and of the value, and their scales at
    the same place.
    """
    P = k_pages.shape[2]
    kr = rotary_embedding(k[None], cos[None], sin[None])[0]
    pos = token_pos.long()
    pages = page_table.long()[token_seq.long(), pos // P]
    if (k_scales is None) != (v_scales is None) or (k_scales is None) != (k_pages.dtype != torch.int8):
        raise ValueError("an int8 cache needs k_scales and v_scales, a 16/32-bit one neither")
    if k_scales is not None:
        for x, pg, sc in ((kr, k_pages, k_scales), (v, v_pages, v_scales)):
            qv, s = quantize_kv(x, sc.dtype, x.shape[-1] // sc.shape[-1])
            pg[pages, :, pos % P] = qv
            sc[pages, :, pos % P] = s
        return rotary_embedding(q[None], cos[None], sin[None])[0]
    k_pages[pages, :, pos % P] = kr
    v_pages[pages, :, pos % P] = v
    return rotary_embedding(q[None], cos[None], sin[None])[0]


def swiglu(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Qwen MLP activation: up * silu(gate), with gate = w2(x) and up = w1(x) (spec §3.2).

    Computed in the tensors' dtype with the release's two roundings (silu, then the product).
    For bf16/fp16, torch's CPU silu computes g / (1 + exp(-g)) in fp32 (a division, not
    g * sigmoid(g)) and rounds once to the dtype; the product of the two 16-bit values is exact in
    fp32 and rounded once. For fp32 both are plain fp32 ops. torch's exp here is SLEEF's expf_u10
    on its vector path and libm's expf on the scalar tail of each contiguous run.
    """
    return up * torch.nn.functional.silu(gate)


#: Bytes of fp32 scores the reference attention holds at once (it shrinks its query chunk to fit).
ATTENTION_SCORES_BYTES = 256 * 2**20


def attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
              page_table: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
              scale: float | None = None, k_scales: torch.Tensor | None = None,
              v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal multi-head attention over a paged KV cache.

    q: [N, H, D], one query per token of the step (tokens of several sequences packed);
    k_pages, v_pages: [num_pages, H, P, D]; page_table: [num_seqs, max_pages] int32;
    token_seq, token_pos: [N] int32. Token i sees the keys and values of its sequence
    s = token_seq[i] at positions 0 .. token_pos[i] (already holding this step's), key j on page
    page_table[s, j // P] at offset j % P. Scores, softmax and the weighted sum run in fp32; the
    output is rounded once to q.dtype (what flash-attention does on the GPU). Returns [N, H, D].
    Each sequence's queries run in chunks whose H x chunk x keys fp32 scores stay within
    ATTENTION_SCORES_BYTES, so that long prefills need bounded memory. An int8 cache
    (k_scales/v_scales [num_pages, H, P, G], see rotary_kv_cache) is read as scale * code in fp32
    (dequantize_kv).
    """
    N, H, D = q.shape
    P = k_pages.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty(N, H, D, dtype=torch.float32, device=q.device)
    seq = token_seq.long().to(q.device)
    pos = token_pos.long().to(q.device)
    for s in torch.unique(seq).tolist():
        rows = torch.nonzero(seq == s).flatten()
        n = int(pos[rows].max()) + 1                              # keys this sequence's queries read
        pages = page_table[s, :(n + P - 1) // P].long().to(q.device)
        if k_scales is not None:
            kf = dequantize_kv(k_pages[pages], k_scales[pages])              # [pages, H, P, D]
            vf = dequantize_kv(v_pages[pages], v_scales[pages])
        else:
            kf, vf = k_pages[pages].float(), v_pages[pages].float()
        kf = kf.transpose(0, 1).reshape(H, -1, D)[:, :n]                       # [H, n, D]
        vf = vf.transpose(0, 1).reshape(H, -1, D)[:, :n]
        chunk = max(1, ATTENTION_SCORES_BYTES // (4 * H * n))
        for r0 in range(0, rows.numel(), chunk):
            r = rows[r0:r0 + chunk]
            qc = q[r].float().transpose(0, 1)                     # [H, Nc, D]
            scores = torch.matmul(qc, kf.transpose(1, 2)) * scale  # [H, Nc, n]
            mask = torch.arange(n, device=q.device)[None, :] <= pos[r][:, None]   # [Nc, n]
            scores = scores.masked_fill(~mask[None], float("-inf"))
            out[r] = torch.matmul(torch.softmax(scores, dim=-1), vf).transpose(0, 1)
    return out.to(q.dtype)
