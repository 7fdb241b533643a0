"""The Triton kernel of :mod:`.nms_bits` (imported only where Triton is installed)."""

import triton
import triton.language as tl

__all__ = ["suppression_bits_kernel"]


@triton.jit
def suppression_bits_kernel(boxes_ptr, out_ptr, n, n_bytes, threshold, BLOCK_J: tl.constexpr,
                            BLOCK_B: tl.constexpr):
    # one tile of one group's packed suppression matrix: rows j (candidates), bytes of 8 columns i (boxes before
    # them in the visiting order); bit b of byte k in row j: box 8k+b comes before box j and overlaps it
    g = tl.program_id(0)
    j0 = tl.program_id(1) * BLOCK_J
    b0 = tl.program_id(2) * BLOCK_B
    if b0 * 8 < j0 + BLOCK_J:  # else every column comes at or after every row: all zero, as allocated
        j = j0 + tl.arange(0, BLOCK_J)
        byte = b0 + tl.arange(0, BLOCK_B)
        i = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
        base = boxes_ptr + g.to(tl.int64) * n * 4
        in_j = j < n
        in_i = i < n
        x1j = tl.load(base + j * 4, mask=in_j, other=0.0)[:, None, None]
        y1j = tl.load(base + j * 4 + 1, mask=in_j, other=0.0)[:, None, None]
        x2j = tl.load(base + j * 4 + 2, mask=in_j, other=0.0)[:, None, None]
        y2j = tl.load(base + j * 4 + 3, mask=in_j, other=0.0)[:, None, None]
        x1i = tl.load(base + i * 4, mask=in_i, other=0.0)[None]
        y1i = tl.load(base + i * 4 + 1, mask=in_i, other=0.0)[None]
        x2i = tl.load(base + i * 4 + 2, mask=in_i, other=0.0)[None]
        y2i = tl.load(base + i * 4 + 3, mask=in_i, other=0.0)[None]
        # the arithmetic of batched_nms_keep's PyTorch path, operation for operation (no fused multiply-adds:
        # the launch turns them off), IEEE division
        area_j = (x2j - x1j) * (y2j - y1j)
        area_i = (x2i - x1i) * (y2i - y1i)
        w = tl.minimum(x2j, x2i) - tl.maximum(x1j, x1i)
        h = tl.minimum(y2j, y2i) - tl.maximum(y1j, y1i)
        inter = tl.maximum(w, 0.0) * tl.maximum(h, 0.0)
        iou = tl.math.div_rn(inter, area_j + area_i - inter)
        flag = (iou > threshold) & (i[None] < j[:, None, None]) & in_i[None]
        bits = tl.sum(flag.to(tl.int32) << tl.arange(0, 8)[None, None, :], axis=2)
        rows = out_ptr + g.to(tl.int64) * n * n_bytes + j[:, None] * n_bytes
        tl.store(rows + byte[None, :], bits.to(tl.uint8), mask=in_j[:, None] & (byte[None, :] < n_bytes))
