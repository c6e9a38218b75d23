"""GPTQ calibration of a whole checkpoint: the blocks are quantized in order, each on the inputs
that the blocks already quantized produce, and inside a block in the order the data flows
(attn.c_attn, then attn.c_proj, then mlp.w1 and mlp.w2 together, then mlp.c_proj), each on the
inputs that the block's already-quantized Linears produce ("true sequential", as AutoGPTQ).

The forward here is a plain dense fp32 one over whole calibration sequences (causal attention,
rotary at positions 0..T-1, sequences no longer than seq_length so that dynamic NTK and logn
scaling stay off, as the release runs such lengths); tests check it against the engine's logits.

    ids = calibration_ids(tokenizer, text, samples=128, seq_len=512, seed=0)
    packed = gptq_checkpoint(cfg, read, ids, bits=4, group_size=128)   # {prefix: pack_gptq dict}
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .gptq import QUANTIZED_LINEARS, dequantize_gptq
from .gptq_solver import accumulate_hessian, quantize_gptq
from .reference import rms_norm, rotate_half


def calibration_ids(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] token windows of the text, at offsets drawn with `seed` (the whole
    text in order when it holds fewer windows than asked: then every window, no repeats)."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window "
                         f"of {seq_len}; give a longer text or a smaller --seq-len")
    if n <= samples:
        return ids[:n * seq_len].view(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def rope_tables(cfg, T: int):
    """cos, sin [1, T, 1, head_dim] of rotary positions 0..T-1 (alpha 1), for block_forward."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    f = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().float()[None, :, None, :], emb.sin().float()[None, :, None, :]


def block_forward(cfg, L: Dict[str, torch.Tensor], h: torch.Tensor, rope,
                  collect: Optional[Callable[[str, torch.Tensor], None]] = None,
                  until: Optional[str] = None) -> Optional[torch.Tensor]:
    """One block on h [B, T, hidden] (fp32) with weights L (names without the block prefix);
    collect(linear, its input) for every quantized Linear. With ``until`` (a quantized
    Linear's name) it stops once that Linear's input is collected and returns None."""
    B, T, _ = h.shape
    H, D = cfg.num_attention_heads, cfg.head_dim
    eps = cfg.layer_norm_epsilon
    cos, sin = rope
    x = rms_norm(h, L["ln_1.weight"], eps)
    if collect:
        collect("attn.c_attn", x)
    if until == "attn.c_attn":
        return None
    qkv = F.linear(x, L["attn.c_attn.weight"], L["attn.c_attn.bias"])
    q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True)
    a = a.transpose(1, 2).reshape(B, T, H * D)
    if collect:
        collect("attn.c_proj", a)
    if until == "attn.c_proj":
        return None
    h = h + F.linear(a, L["attn.c_proj.weight"])
    x = rms_norm(h, L["ln_2.weight"], eps)
    if collect:
        collect("mlp.w1", x)
        collect("mlp.w2", x)
    if until in ("mlp.w1", "mlp.w2"):
        return None
    act = F.linear(x, L["mlp.w1.weight"]) * F.silu(F.linear(x, L["mlp.w2.weight"]))
    if collect:
        collect("mlp.c_proj", act)
    if until == "mlp.c_proj":
        return None
    return h + F.linear(act, L["mlp.c_proj.weight"])


#: The order Linears are quantized in inside a block (each step sees the earlier ones quantized).
STEPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))


def gptq_checkpoint(cfg, read: Callable[[str], torch.Tensor], ids: torch.Tensor, bits: int,
                    group_size: int, sym: bool = True, damp: float = 0.01,
                    act_order: bool = False, batch: int = 8,
                    progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, dict]:
    """{f"transformer.h.{i}.{linear}": pack_gptq dict} for every quantized Linear, calibrated
    on ids [samples, T]. read(name) gives a checkpoint tensor (any float dtype)."""
    assert set(sum(STEPS, ())) == set(QUANTIZED_LINEARS)
    if ids.shape[1] > cfg.seq_length:
        raise ValueError(f"calibration windows of {ids.shape[1]} tokens are longer than the "
                         f"model's seq_length {cfg.seq_length} (dynamic NTK would change them)")
    rope = rope_tables(cfg, ids.shape[1])
    wte = read("transformer.wte.weight").float()
    hs = [wte[ids[i:i + batch]] for i in range(0, ids.shape[0], batch)]     # block inputs
    del wte
    out: Dict[str, dict] = {}
    n = cfg.num_hidden_layers
    for li in range(n):
        p = f"transformer.h.{li}."
        L = {name[len(p):]: read(name).float() for name in _block_names(cfg, li)}
        for step in STEPS:
            hess: Dict[str, tuple] = {lin: (None, 0) for lin in step}

            def collect(lin, x):
                if lin in hess:
                    hess[lin] = accumulate_hessian(x, *hess[lin])
            for h in hs:                  # only as far as the step's inputs
                block_forward(cfg, L, h, rope, collect, until=step[-1])
            for lin in step:
                w = L[f"{lin}.weight"]
                packed = quantize_gptq(w, hess[lin][0], bits, group_size, sym, damp, act_order)
                out[p + lin] = packed
                L[f"{lin}.weight"] = dequantize_gptq(packed["qweight"], packed["qzeros"],
                                                     packed["scales"], packed["g_idx"], bits)
        hs = [block_forward(cfg, L, h, rope) for h in hs]      # the next block's inputs
        if progress is not None:
            progress(li + 1, n)
    return out


def _block_names(cfg, li: int):
    p = f"transformer.h.{li}."
    return [p + s for s in ("ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias",
                            "attn.c_proj.weight", "ln_2.weight", "mlp.w1.weight",
                            "mlp.w2.weight", "mlp.c_proj.weight")]
