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


def rotary_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots, start, n_new) -> torch.Tensor:
    """RoPE of q and k with the keys and values appended to a KV cache, as a model step does.

    q, k, v: [B, T, H, D]; cos, sin: [B, T, R] fp32; k_cache, v_cache: [slots, H, S, D].
    For each row b: k_cache[slots[b], :, start[b] : start[b] + n_new[b]] = rotary_embedding(k)
    of its first n_new[b] tokens (head-major), v_cache likewise = v (copied, no rounding).
    Returns rotary_embedding(q, cos, sin) for every token, padding rows included.
    """
    kr = rotary_embedding(k, cos, sin)
    for b in range(q.shape[0]):
        s, s0, n = int(slots[b]), int(start[b]), int(n_new[b])
        k_cache[s, :, s0:s0 + n] = kr[b, :n].transpose(0, 1)
        v_cache[s, :, s0:s0 + n] = v[b, :n].transpose(0, 1)
    return rotary_embedding(q, cos, sin)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
              scale: float | None = None, query_chunk: int = 1024) -> torch.Tensor:
    """Causal multi-head attention over a KV cache with per-sequence lengths.

    q: [B, T, H, D] new queries; row b's query t sits at absolute position start[b] + t.
    k, v: [B, S, H, D] the cache, already holding this step's keys/values; row b's valid keys
    are 0 .. start[b] + T - 1 (bottom-right aligned causal mask, so chunked prefill is right).
    start: [B] int64. Scores, softmax and the weighted sum run in fp32; the output is rounded
    once to q.dtype (what flash-attention does on the GPU). Returns [B, T, H, D].
    Queries are processed in chunks of at most query_chunk, fewer when B x H x chunk x S fp32
    scores would pass ATTENTION_SCORES_BYTES, so that long prefills need bounded memory.
    """
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    S = k.shape[1]
    query_chunk = max(1, min(query_chunk, ATTENTION_SCORES_BYTES // (4 * B * H * S)))
    kf = k.float().permute(0, 2, 3, 1)          # [B, H, D, S]
    vf = v.float().permute(0, 2, 1, 3)          # [B, H, S, D]
    key_pos = torch.arange(S, device=q.device)
    start = start.to(q.device)
    outs = []
    for t0 in range(0, T, query_chunk):
        qc = q[:, t0:t0 + query_chunk].float().permute(0, 2, 1, 3)   # [B, H, Tc, D]
        tc = qc.shape[2]
        scores = torch.matmul(qc, kf) * scale                           # [B, H, Tc, S]
        q_pos = start[:, None] + torch.arange(t0, t0 + tc, device=q.device)[None, :]   # [B, Tc]
        mask = key_pos[None, None, :] <= q_pos[:, :, None]             # [B, Tc, S]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(probs, vf).permute(0, 2, 1, 3))        # [B, Tc, H, D]
    return torch.cat(outs, dim=1).to(q.dtype)
