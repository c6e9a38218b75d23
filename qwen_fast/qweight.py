"""int4 / int8 weights in our kernel layout (what csrc/cpu/quant_linear.cpp reads).

A ``QuantWeight`` holds one Linear's weight W [N, K] as W[n, k] = s[n, c] * (q[n, k] - z[n, c])
for the chunk c = k // 128 of its (permuted) input k. The outputs go in tiles of 16 (N padded
to a multiple of 16 with zero rows); ``data`` is uint8 [ceil(N / 16), C * record] for the
C = ceil(K / 128) chunks, one row per tile, each chunk's record being

    q of the tile's 16 outputs x 128 inputs, as 64-byte vectors of 16 lanes of 4 bytes:
        int8: 32 vectors, vector j, lane r = q[r, 4j .. 4j+3]                  (2048 bytes)
        int4: 16 vectors, vector j, lane r = q[r, 4j .. 4j+3] | q[r, 64+4j .. 64+4j+3] << 4
                                                                              (1024 bytes)
    16 fp16 scales s[r, c] (GPTQ's scales are fp16)                           (32 bytes)
    16 zeros z[r, c]: uint8 for int4, uint16 for int8 (GPTQ v1's real zeros
    reach 2^bits)                                                      (16 / 32 bytes)

(r is the output within the tile; K is padded to whole chunks with q = 0, which the kernel
multiplies by zeros.) One instruction (vpdpbusd) multiplies a vector by four activation bytes
broadcast to every lane, adding four products to each of 16 outputs, and the scales load as a
vector: the kernel needs no horizontal sums; it forms s * z in fp32, exactly (an fp16 scale times
an integer below 2^9 needs at most 20 bits). Bytes per weight: int4 0.5234 (4.19 bits: 4 + 24
bits of scale and zero per 128; llama.cpp's Q4_0 reads 4.5), int8 1.03 (8.25 bits). The first
layout stored s and s * z in fp32 (4.5 and 8.5 bits) and gave the same results bit for bit.
A GPTQ group (128, or -1 = all of K) covers whole chunks, so a chunk has one scale and one zero; a group size that is not a multiple of 128 is
refused. Act-order checkpoints (desc_act, g_idx not k // group) are permuted at load: the inputs
are sorted by group, ``perm`` [K] records the order, and the kernel reads x[..., perm] (gathered
while it quantizes the activations). Nothing here keeps a dequantized copy: ``dequantize`` builds
one on demand (the reference backend, tests).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

CHUNK = 128
TILE = 16


def zero_bytes(bits: int) -> int:
    """Bytes of one stored zero: uint8 for int4, uint16 for int8."""
    return 1 if bits == 4 else 2


def record_bytes(bits: int) -> int:
    """Bytes of one chunk's record: q, 16 fp16 scales, 16 zeros."""
    return TILE * CHUNK * bits // 8 + 2 * TILE + zero_bytes(bits) * TILE


def tile_bytes(bits: int, in_features: int) -> int:
    """Bytes of one tile of 16 outputs (one row of ``QuantWeight.data``)."""
    return -(-in_features // CHUNK) * record_bytes(bits)


class QuantWeight:
    """An int4/int8 Linear weight in the kernel layout (see the module docstring)."""

    def __init__(self, data: torch.Tensor, bits: int, in_features: int, out_features: int,
                 perm: Optional[torch.Tensor] = None):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        tiles, row = -(-out_features // TILE), tile_bytes(bits, in_features)
        if data.dtype != torch.uint8 or data.dim() != 2 or tuple(data.shape) != (tiles, row):
            raise ValueError(f"data must be a uint8 tensor [{tiles}, {row}] for {out_features} "
                             f"{bits}-bit outputs (tiles of {TILE}) of {in_features} inputs, got "
                             f"{data.dtype} {list(data.shape)}")
        if perm is not None and (perm.dtype != torch.int64 or perm.shape != (in_features,)):
            raise ValueError(f"perm must be an int64 tensor [{in_features}], got {perm.dtype} "
                             f"{list(perm.shape)}")
        self.data, self.bits, self.perm = data.contiguous(), bits, perm
        self.in_features, self.out_features = in_features, out_features

    # ---- shape-like attributes, so that code written for a dense [N, K] weight reads it -----
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

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

    def to(self, device) -> "QuantWeight":
        """The same weight with data and perm on `device` (a new QuantWeight)."""
        return QuantWeight(self.data.to(device), self.bits, self.in_features, self.out_features,
                           None if self.perm is None else self.perm.to(device))

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
        T = -(-N // TILE)
        s16 = scales[first].t().to(torch.float16)                              # [N, C]
        if not torch.equal(s16.float(), scales.float()[first].t()):
            raise ValueError("scales must be fp16 values (GPTQ stores them as fp16); these do not "
                             "round-trip through fp16")
        zmax = 255 if bits == 4 else 65535
        zr = zeros[first].t()
        if zr.is_floating_point() and not torch.equal(zr.round(), zr):
            raise ValueError(f"zeros must be integers, got {zr[zr.round() != zr][:3].tolist()}")
        zr = zr.to(torch.int64)
        if zr.numel() and (zr.min() < 0 or zr.max() > zmax):
            raise ValueError(f"zeros must be integers in [0, {zmax}] for {bits}-bit weights, got "
                             f"values in [{float(zr.min())}, {float(zr.max())}]")
        s = torch.zeros(T * TILE, chunks, dtype=torch.float16)
        s[:N] = s16
        z = torch.zeros(T * TILE, chunks, dtype=torch.int32)
        z[:N] = zr
        z = z.to(torch.uint8) if bits == 4 else z.to(torch.int16)   # int16 bits = uint16 < 2^16
        qp = torch.zeros(T * TILE, chunks * CHUNK, dtype=torch.uint8)
        qp[:N, :K] = q.to(torch.uint8)
        # [tile, r, chunk, j, b] -> [tile, chunk, j, r, b]: vector j, lane r, byte b
        if bits == 4:
            qc = qp.view(T, TILE, chunks, 2, 16, 4)
            qv = (qc[:, :, :, 0] | (qc[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)
        else:
            qv = qp.view(T, TILE, chunks, 32, 4).permute(0, 2, 3, 1, 4)

        def lanes(v):  # [T * 16, C] -> [T, C, 16 * itemsize] bytes
            return v.view(T, TILE, chunks).transpose(1, 2).contiguous().view(torch.uint8)

        data = torch.cat([qv.reshape(T, chunks, -1), lanes(s), lanes(z)], dim=2)
        return cls(data.reshape(T, -1), bits, K, N, perm)

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
        [r1 - r0, K] rows), block_rows (rounded down to whole tiles of 16) at a time: the temporaries stay small (lm_head is 151936
        rows) and the whole dense weight need never exist."""
        from .gptq import quantize_rtn, unpack_gptq

        if group_size is None:
            group_size = CHUNK if K % CHUNK == 0 else -1
        block_rows = max(TILE, block_rows - block_rows % TILE)  # whole tiles
        data = torch.empty(-(-N // TILE), tile_bytes(bits, K), dtype=torch.uint8)
        for r0 in range(0, N, block_rows):
            g = quantize_rtn(rows(r0, min(N, r0 + block_rows)), bits, group_size, sym)
            part = cls.from_components(*unpack_gptq(g["qweight"], g["qzeros"], g["scales"],
                                                    g["g_idx"], bits), bits)
            data[r0 // TILE:r0 // TILE + part.data.shape[0]] = part.data
        return cls(data, bits, K, N)

    # ---- reading back ---------------------------------------------------------------------
    def components(self):
        """(q [N, K] uint8 in the layout's input order, s [N, C] fp32, s*z [N, C] fp32)."""
        N, K, C = self.out_features, self.in_features, -(-self.in_features // CHUNK)
        T = self.data.shape[0]
        qb = TILE * CHUNK * self.bits // 8
        rec = self.data.view(T, C, record_bytes(self.bits))
        if self.bits == 4:
            qv = rec[:, :, :qb].reshape(T, C, 16, TILE, 4).permute(0, 3, 1, 2, 4)  # [T, r, C, j, b]
            q = torch.stack([qv & 15, qv >> 4], dim=3)                         # [T, r, C, 2, j, b]
        else:
            q = rec[:, :, :qb].reshape(T, C, 32, TILE, 4).permute(0, 3, 1, 2, 4)
        q = q.reshape(T * TILE, C * CHUNK)

        def rows(v, dtype):  # [T, C, 16 * itemsize] bytes -> [T * 16, C]
            return v.contiguous().view(dtype).transpose(1, 2).reshape(T * TILE, C)

        s = rows(rec[:, :, qb:qb + 2 * TILE], torch.float16).float()
        zb = rows(rec[:, :, qb + 2 * TILE:], torch.uint8 if self.bits == 4 else torch.int16)
        z = zb.to(torch.int32) & (0xFF if self.bits == 4 else 0xFFFF)
        sz = s * z.float()                                   # exact: see dequantize
        return q[:N, :K], s[:N], sz[:N]

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
