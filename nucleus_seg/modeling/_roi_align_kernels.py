"""The Triton kernels of :mod:`.nhwc_roi_align` (imported only where Triton is installed: Triton resolves the
helper a kernel calls from its module's globals)."""

import triton
import triton.language as tl

__all__ = ["roi_align_nhwc", "roi_align_nhwc_levels"]


@triton.jit
def pooled_bin(x_ptr, height, width, spatial_scale, rois_ptr, r, ph, pw, C: tl.constexpr, PH: tl.constexpr,
               PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr):
    # torchvision's roi_align_forward_kernel_impl for one output bin of ROI r, all C channels
    n = tl.load(rois_ptr + r * 5).to(tl.int64)
    offset = 0.5 if ALIGNED else 0.0
    start_w = tl.load(rois_ptr + r * 5 + 1) * spatial_scale - offset
    start_h = tl.load(rois_ptr + r * 5 + 2) * spatial_scale - offset
    roi_w = tl.load(rois_ptr + r * 5 + 3) * spatial_scale - offset - start_w
    roi_h = tl.load(rois_ptr + r * 5 + 4) * spatial_scale - offset - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    if SAMPLING > 0:
        grid_h = tl.full((), SAMPLING, tl.int32)
        grid_w = tl.full((), SAMPLING, tl.int32)
    else:
        grid_h = tl.ceil(roi_h / PH).to(tl.int32)
        grid_w = tl.ceil(roi_w / PW).to(tl.int32)
    count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    cols = tl.arange(0, C)
    image = x_ptr + n * height * width * C
    acc = tl.zeros((C,), tl.float32)
    for iy in range(0, grid_h):
        y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(0, grid_w):
            x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
            inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
            yc = tl.maximum(y, 0.0)
            xc = tl.maximum(x, 0.0)
            y_low = yc.to(tl.int32)
            x_low = xc.to(tl.int32)
            y_edge = y_low >= height - 1
            x_edge = x_low >= width - 1
            y_low = tl.where(y_edge, height - 1, y_low)
            x_low = tl.where(x_edge, width - 1, x_low)
            y_high = tl.where(y_edge, y_low, y_low + 1)
            x_high = tl.where(x_edge, x_low, x_low + 1)
            ly = tl.where(y_edge, 0.0, yc - y_low)
            lx = tl.where(x_edge, 0.0, xc - x_low)
            hy = 1.0 - ly
            hx = 1.0 - lx
            keep = tl.where(inside, 1.0, 0.0)
            v1 = tl.load(image + (y_low * width + x_low).to(tl.int64) * C + cols).to(tl.float32)
            v2 = tl.load(image + (y_low * width + x_high).to(tl.int64) * C + cols).to(tl.float32)
            v3 = tl.load(image + (y_high * width + x_low).to(tl.int64) * C + cols).to(tl.float32)
            v4 = tl.load(image + (y_high * width + x_high).to(tl.int64) * C + cols).to(tl.float32)
            acc += keep * (hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4)
    return acc / count


@triton.jit
def roi_align_nhwc(x_ptr, rois_ptr, out_ptr, height, width, spatial_scale, C: tl.constexpr, PH: tl.constexpr,
                   PW: tl.constexpr, SAMPLING: tl.constexpr, ALIGNED: tl.constexpr):
    # one program per (ROI, output bin)
    r = tl.program_id(0).to(tl.int64)
    ph = tl.program_id(1) // PW
    pw = tl.program_id(1) % PW
    value = pooled_bin(x_ptr, height, width, spatial_scale, rois_ptr, r, ph, pw, C, PH, PW, SAMPLING, ALIGNED)
    out = out_ptr + ((r * PH + ph) * PW + pw) * C + tl.arange(0, C)
    tl.store(out, value.to(out_ptr.dtype.element_ty))


@triton.jit
def roi_align_nhwc_levels(x0, x1, x2, x3, h0, h1, h2, h3, w0, w1, w2, w3, s0, s1, s2, s3, levels_ptr, rois_ptr,
                          out_ptr, C: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, SAMPLING: tl.constexpr,
                          ALIGNED: tl.constexpr):
    # one program per (ROI, output bin), from the level the ROI was assigned to
    r = tl.program_id(0).to(tl.int64)
    ph = tl.program_id(1) // PW
    pw = tl.program_id(1) % PW
    level = tl.load(levels_ptr + r)
    if level == 0:
        value = pooled_bin(x0, h0, w0, s0, rois_ptr, r, ph, pw, C, PH, PW, SAMPLING, ALIGNED)
    elif level == 1:
        value = pooled_bin(x1, h1, w1, s1, rois_ptr, r, ph, pw, C, PH, PW, SAMPLING, ALIGNED)
    elif level == 2:
        value = pooled_bin(x2, h2, w2, s2, rois_ptr, r, ph, pw, C, PH, PW, SAMPLING, ALIGNED)
    else:
        value = pooled_bin(x3, h3, w3, s3, rois_ptr, r, ph, pw, C, PH, PW, SAMPLING, ALIGNED)
    out = out_ptr + ((r * PH + ph) * PW + pw) * C + tl.arange(0, C)
    tl.store(out, value.to(out_ptr.dtype.element_ty))
