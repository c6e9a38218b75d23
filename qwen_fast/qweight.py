"""int4 / int8 weights in our kernel layout (what csrc/cpu/quant_linear.cpp reads).

A ``QuantWeight`` holds one Linear's weight W [N, K] as W[n, k] = s[n, c] * (q[n, k] - z[n, c])
for the chunk c = k // 128 of its (permuted) input k: one uint8 tensor ``data`` [N, row_bytes],
each row being

    q of the C = ceil(K / 128) chunks      int4: 64 bytes a chunk, byte i = q[128c + i] | q[128c + 64 + i] << 4
                                           int8: 128 bytes a chunk, q as uint8
    C fp32 scales s[n, c]
    C fp32 products s[n, c] * z[n, c]

(K is padded to whole chunks with q = 0, which the kernel multiplies by zeros.) Bytes per weight:
int4 0.5625 (4.5 bits: 4 + 64 bits of scale and offset per 128), int8 1.0625. A GPTQ group
(128, or -1 = all of K) covers whole chunks, so a chunk has one scale and one zero; a group size
that is not a multiple of 128 is refused. Act-order checkpoints (desc_act, g_idx not k // group)
are permuted at load: the inputs are sorted by group, ``perm`` [K] records the order, and the
kernel reads x[..., perm] (gathered while it quantizes the activations). Nothing here keeps a
dequantized copy: ``dequantize`` builds one on demand (the reference backend, tests).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

CHUNK = 128


class QuantWeight:
    """An int4/int8 Linear weight in the kernel layout (see the module docstring)."""

    def __init__(self, data: torch.Tensor, bits: int, in_features: int,
                 perm: Optional[torch.Tensor] = None):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        chunks = -(-in_features // CHUNK)
        row = chunks * (CHUNK * bits // 8) + 8 * chunks
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row:
            raise ValueError(f"data must be a uint8 tensor [N, {row}] for {bits}-bit rows of "
                             f"{in_features} inputs, got {data.dtype} {list(data.shape)}")
        if perm is not None and (perm.dtype != torch.int64 or perm.shape != (in_features,)):
            raise ValueError(f"perm must be an int64 tensor [{in_features}], got {perm.dtype} "
                             f"{list(perm.shape)}")
        self.data, self.bits, self.in_features, self.perm = data.contiguous(), bits, in_features, perm

    # ---- shape-like attributes, so that code written for a dense [N, K] weight reads it -----
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.in_features))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.data.numel()

    def element_size(self) -> int:
        return 1

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight reads (the layout's, scales included)."""
        return self.data.numel() + (0 if self.perm is None else self.perm.numel() * 8)

    def __repr__(self) -> str:
        return (f"QuantWeight(int{self.bits}, out_features={self.shape[0]}, "
                f"in_features={self.in_features}{', act-order' if self.perm is not None else ''})")

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def from_components(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                        g_idx: torch.Tensor, bits: int) -> "QuantWeight":
        """From unpacked GPTQ parts: q [N, K] integers in [0, 2^bits), the real zeros [G, N],
        scales [G, N] (fp16 as stored), g_idx [K] (group of each input)."""
        N, K = q.shape
        G = scales.shape[0]
        g_idx = g_idx.to(torch.int64)
        if zeros.shape != (G, N) or scales.shape != (G, N) or g_idx.shape != (K,):
            raise ValueError(f"zeros and scales must be [{G}, {N}] and g_idx [{K}], got "
                             f"{list(zeros.shape)}, {list(scales.shape)}, {list(g_idx.shape)}")
        perm = None
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(order, torch.arange(K)):
            perm = order
            q, g_idx = q[:, order], g_idx[order]
        # Every chunk of 128 (sorted) inputs must lie in one group: groups of whole chunks.
        chunks = -(-K // CHUNK)
        first = g_idx[torch.arange(chunks) * CHUNK]
        padded = torch.cat([g_idx, g_idx[-1:].expand(chunks * CHUNK - K)])
        if not torch.equal(padded.view(chunks, CHUNK), first[:, None].expand(chunks, CHUNK)):
            sizes = torch.bincount(g_idx).tolist()
            raise ValueError(f"the kernel needs groups of whole 128-input chunks (group size a "
                             f"multiple of 128, or -1); this weight's groups hold {sorted(set(sizes))} "
                             f"inputs")
        s = torch.empty(N, chunks).copy_(scales.float()[first].t())            # [N, C]
        sz = torch.empty(N, chunks).copy_(s * zeros.float()[first].t())       # exact: see dequantize
        qp = torch.zeros(N, chunks * CHUNK, dtype=torch.uint8)
        qp[:, :K] = q.to(torch.uint8)
        if bits == 4:
            qc = qp.view(N, chunks, 2, CHUNK // 2)
            packed = (qc[:, :, 0] | (qc[:, :, 1] << 4)).reshape(N, chunks * CHUNK // 2)
        else:
            packed = qp
        data = torch.cat([packed, s.view(torch.uint8), sz.view(torch.uint8)], dim=1)
        return cls(data, bits, K, perm)

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, group_size: Optional[int] = None,
                 sym: bool = True) -> "QuantWeight":
        """Round-to-nearest quantization of a dense [N, K] weight (quant.quantize_rtn: what
        ``qwen-fast quantize`` writes), in the kernel layout. group_size None: 128 where it
        divides K (Qwen's every matrix), else one group of all K."""
        return cls.quantize_rows(lambda r0, r1: w[r0:r1], w.shape[0], w.shape[1], bits,
                                 group_size, sym)

    @classmethod
    def quantize_rows(cls, rows: Callable[[int, int], torch.Tensor], N: int, K: int, bits: int,
                      group_size: Optional[int] = None, sym: bool = True,
                      block_rows: int = 8192) -> "QuantWeight":
        """As quantize, for a weight given a block of rows at a time (rows(r0, r1) -> the dense
        [r1 - r0, K] rows), block_rows at a time: the temporaries stay small (lm_head is 151936
        rows) and the whole dense weight need never exist."""
        from .quant import quantize_rtn, unpack_gptq

        if group_size is None:
            group_size = CHUNK if K % CHUNK == 0 else -1
        data = None
        for r0 in range(0, N, block_rows):
            g = quantize_rtn(rows(r0, min(N, r0 + block_rows)), bits, group_size, sym)
            part = cls.from_components(*unpack_gptq(g["qweight"], g["qzeros"], g["scales"],
                                                    g["g_idx"], bits), bits)
            if data is None:
                data = torch.empty(N, part.data.shape[1], dtype=torch.uint8)
            data[r0:r0 + part.data.shape[0]] = part.data
        return cls(data, bits, K)

    # ---- reading back ---------------------------------------------------------------------
    def components(self):
        """(q [N, K] uint8 in the layout's input order, s [N, C] fp32, s*z [N, C] fp32)."""
        N, K, C = self.shape[0], self.in_features, -(-self.in_features // CHUNK)
        qbytes = C * CHUNK * self.bits // 8
        packed = self.data[:, :qbytes]
        if self.bits == 4:
            pc = packed.view(N, C, CHUNK // 2)
            q = torch.stack([pc & 15, pc >> 4], dim=2).reshape(N, C * CHUNK)
        else:
            q = packed
        s = self.data[:, qbytes:qbytes + 4 * C].contiguous().view(torch.float32)
        sz = self.data[:, qbytes + 4 * C:].contiguous().view(torch.float32)
        return q[:, :K], s, sz

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense W [N, K] (inputs in their original order): s * q - s * z in fp32, which is
        s * (q - z) exactly (fp16 scales times integers below 2^9 need at most 20 bits), then
        rounded to dtype."""
        q, s, sz = self.components()
        idx = torch.arange(self.in_features) // CHUNK
        w = q.float() * s[:, idx] - sz[:, idx]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)
