"""ROIAlign whose backward is one sparse matrix product: CPU training spent a fifth of each step in
torchvision's ``roi_align`` backward.

torchvision's CPU backward walks every sample point of every RoI and channel one at a time on one core:
on the `make demo` model (2 cores, R18-FPN, 256 px, batch 2) it was 125 ms of a 550 ms step, eight times its
own forward. ROIAlign is linear in the features, so its backward is the transpose of one sparse matrix (the
bilinear weights of every sample point, ``4 x RoIs x bins x samples`` entries), applied to the output
gradient by MKL's multithreaded sparse product: 3-6x faster, the same gradient to float rounding.

The forward is torchvision's own. One thing differs from detectron2's ``ROIAlign``: under autocast the boxes
stay float32 (detectron2 rounds them to the features' bfloat16/float16 first, though torchvision then computes
in float32): with bfloat16 on the CPU that misplaced every box edge past 256 px by up to a pixel, in training
(features pooled off the box their mask target is cut from) and in inference. In float32 nothing changes.
:func:`use_nucleus_roi_align` installs both on one model's poolers.
"""

from __future__ import annotations

import types

import torch
from torchvision.ops import roi_align

from .nhwc_roi_align import MAX_LEVELS, nhwc_roi_align, nhwc_roi_align_levels, nhwc_roi_align_usable
from .precision import HALF_DTYPES

__all__ = ["roi_align_weights", "sparse_backward_roi_align", "use_nucleus_roi_align"]


def _corners(v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's bilinear rule along one axis: low and high index and their weights (coordinates
    below 0 read pixel 0; at or past the last pixel both corners are the last one)."""
    v = v.clamp(min=0)
    low = v.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(v), v - low.to(v.dtype))
    return low, high, 1 - frac, frac


def roi_align_weights(rois: torch.Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                      aligned: bool, batch: int, height: int, width: int) -> torch.Tensor:
    """The transpose of what torchvision's ``roi_align`` applies to each channel, as a sparse
    (batch x height x width) x (RoIs x bins) COO matrix (duplicates not summed): its sample points
    (``sampling_ratio`` per bin side, or ``ceil(roi size / bins)`` when 0), bilinear weights, points outside
    [-1, size] dropped, and each bin averaged over its sample count."""
    n, p = rois.shape[0], output_size
    rois = rois.float()
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy rule: RoIs at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / p, roi_h / p
    if sampling_ratio > 0:
        grid_h = torch.full((n,), sampling_ratio, dtype=torch.long, device=rois.device)
        grid_w = grid_h
    else:
        grid_h, grid_w = torch.ceil(roi_h / p).long(), torch.ceil(roi_w / p).long()
    count = (grid_h * grid_w).clamp(min=1).float()
    most_h, most_w = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    bins = torch.arange(p, device=rois.device, dtype=torch.float32)

    def axis(start, bin_size, grid, most, size):  # sample coordinates (n, p, most), and which are real
        steps = torch.arange(most, device=rois.device, dtype=torch.float32)
        v = (start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]
             + (steps[None, None, :] + 0.5) * bin_size[:, None, None] / grid.clamp(min=1)[:, None, None])
        real = (steps[None, None, :] < grid[:, None, None]) & (v >= -1.0) & (v <= size)
        return (*_corners(v, size), real)

    y_low, y_high, y_w_low, y_w_high, y_real = axis(y1, bin_h, grid_h, most_h, height)
    x_low, x_high, x_w_low, x_w_high, x_real = axis(x1, bin_w, grid_w, most_w, width)

    def ys(t):  # (n, p, most_h) -> (n, p, most_h, 1, 1)
        return t[:, :, :, None, None]

    def xs(t):  # (n, p, most_w) -> (n, 1, 1, p, most_w)
        return t[:, None, None, :, :]

    image = rois[:, 0].long()[:, None, None, None, None] * (height * width)
    rows = torch.stack([image + ys(y) * width + xs(x) for y in (y_low, y_high) for x in (x_low, x_high)])
    weights = torch.stack([ys(wy) * xs(wx) for wy in (y_w_low, y_w_high) for wx in (x_w_low, x_w_high)])
    weights = weights * (ys(y_real) & xs(x_real)) / count[:, None, None, None, None]
    cell = torch.arange(p, device=rois.device)
    cols = (torch.arange(n, device=rois.device)[:, None, None, None, None] * (p * p)
            + cell[None, :, None, None, None] * p + cell[None, None, None, :, None]).expand_as(rows[0])
    keep = weights != 0
    indices = torch.stack([rows[keep], cols.expand_as(rows)[keep]])
    return torch.sparse_coo_tensor(indices, weights[keep], (batch * height * width, n * p * p))


class _SparseBackwardROIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.settings = (output_size, spatial_scale, sampling_ratio, aligned, features.shape, features.dtype)
        with torch.autocast(features.device.type, enabled=False):
            out = roi_align(features.float(), rois.float(), output_size, spatial_scale, sampling_ratio, aligned)
        return out.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, aligned, shape, dtype = ctx.settings
        b, c, h, w = shape
        if rois.shape[0] == 0:
            return torch.zeros(shape, dtype=dtype, device=grad_out.device), None, None, None, None, None
        weights = roi_align_weights(rois, output_size, spatial_scale, sampling_ratio, aligned, b, h, w)
        # (bins, channels) -> (pixels, channels), as CSR for MKL's multithreaded product
        grad = weights.to_sparse_csr() @ grad_out.float().permute(0, 2, 3, 1).reshape(-1, c)
        return grad.reshape(b, h, w, c).permute(0, 3, 1, 2).to(dtype), None, None, None, None, None


def sparse_backward_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision's ``roi_align`` (same forward) with the sparse-product backward."""
    return _SparseBackwardROIAlign.apply(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def _float_nchw(features: torch.Tensor) -> torch.Tensor:
    """``features`` as contiguous float32, made once per feature tensor (kept on it, freed with it).

    torchvision's autocast wrapper of ``roi_align`` casts its input to float32 and its kernel then makes it NCHW,
    at every call: Cascade's three box stages and the mask head pool every FPN level four times per batch, and
    those copies were 14% of the GPU time of a channels-last model at batch 32 (one H200, session 24). The values
    are the ones the wrapper would compute with.
    """
    done = getattr(features, "_nucleus_float_nchw", None)
    if done is None:
        done = features.float().contiguous()
        features._nucleus_float_nchw = done
    return done


def _forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """detectron2's ``ROIAlign.forward`` with float32 boxes under autocast, and the sparse backward where it
    pays: CPU tensors that need a gradient (inference and GPU training keep torchvision's kernels)."""
    if input.is_quantized:
        input = input.dequantize()
    if input.dtype in HALF_DTYPES and torch.is_autocast_enabled(input.device.type):
        # detectron2 casts the boxes to the features' dtype, but autocast runs ROIAlign in float32 anyway: the
        # cast only rounded them (bfloat16 keeps 8 significant bits: a box edge between 256 and 512 px moved
        # by up to 1 px, 4 px past 1024; float16 a quarter pixel past 512)
        rois = rois.float()
        if not (input.requires_grad and torch.is_grad_enabled()):  # inference
            if nhwc_roi_align_usable(input):  # channels-last in, channels-last out, no copies
                return nhwc_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                      self.aligned)
            return roi_align(_float_nchw(input), rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                             self.aligned).to(input.dtype)
    else:
        rois = rois.to(dtype=input.dtype)
    sizes = (self.output_size,) * 2 if isinstance(self.output_size, int) else tuple(self.output_size)
    if input.device.type == "cpu" and input.requires_grad and torch.is_grad_enabled() and sizes[0] == sizes[1]:
        return sparse_backward_roi_align(input, rois, sizes[0], self.spatial_scale, self.sampling_ratio,
                                         self.aligned)
    return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


def _one_kernel_levels(pooler, x: list[torch.Tensor]) -> bool:
    """Whether every FPN level can be pooled by one :func:`nhwc_roi_align_levels` call: half-precision
    channels-last levels under autocast, at most ``MAX_LEVELS``, every level pooler a detectron2 ``ROIAlign``."""
    from detectron2.layers import ROIAlign

    return (len(x) <= MAX_LEVELS and torch.is_autocast_enabled(x[0].device.type)
            and all(nhwc_roi_align_usable(f) and f.dtype == x[0].dtype and f.shape[1] == x[0].shape[1] for f in x)
            and all(type(p) is ROIAlign for p in pooler.level_poolers)
            and len({(p.output_size, p.sampling_ratio, p.aligned) for p in pooler.level_poolers}) == 1)


def _pooler_forward(self, x: list[torch.Tensor], box_lists: list) -> torch.Tensor:
    """detectron2's ``ROIPooler.forward``, with the pooled features channels-last when the levels are, at
    inference: detectron2 gathers every level's result into an NCHW tensor, which the head's first convolution
    then converts back. Where the levels allow (:func:`_one_kernel_levels`), all levels in one kernel: detectron2's
    per-level ``nonzero`` (a host sync each, four per pooler call, 16 per batch with Cascade R-CNN's three
    stages and the mask head) and the scatter of each level's result are gone."""
    from detectron2.layers import nonzero_tuple
    from detectron2.modeling.poolers import assign_boxes_to_levels, convert_boxes_to_pooler_format
    from detectron2.structures import Boxes

    if (torch.is_grad_enabled() or len(self.level_poolers) == 1 or not box_lists or len(x) != len(self.level_poolers)
            or not all(f.dim() == 4 and f.shape[1] > 1 and f.is_contiguous(memory_format=torch.channels_last)
                       for f in x)):
        return type(self).forward(self, x, box_lists)
    if _one_kernel_levels(self, x):
        flat = torch.cat([b.tensor for b in box_lists])
        counts = torch.tensor([len(b) for b in box_lists]).to(flat.device, non_blocking=True)
        image = torch.arange(len(box_lists), dtype=flat.dtype, device=flat.device).repeat_interleave(
            counts, output_size=len(flat))  # no sync: the size is given (detectron2's conversion syncs here)
        levels = assign_boxes_to_levels([Boxes(flat)], self.min_level, self.max_level, self.canonical_box_size,
                                        self.canonical_level)  # the same areas, taken once for the batch
        first = self.level_poolers[0]
        return nhwc_roi_align_levels(x, torch.cat([image[:, None], flat], dim=1), levels, first.output_size,
                                     [p.spatial_scale for p in self.level_poolers], first.sampling_ratio,
                                     first.aligned)
    boxes = convert_boxes_to_pooler_format(box_lists)
    levels = assign_boxes_to_levels(box_lists, self.min_level, self.max_level, self.canonical_box_size,
                                    self.canonical_level)  # clamped to the pooler's levels: every row is written
    output = torch.empty((len(boxes), x[0].shape[1], *self.output_size), dtype=x[0].dtype, device=x[0].device,
                         memory_format=torch.channels_last)
    for level, pooler in enumerate(self.level_poolers):
        inds = nonzero_tuple(levels == level)[0]
        output.index_put_((inds,), pooler(x[level], boxes[inds]))
    return output


def use_nucleus_roi_align(model: torch.nn.Module) -> int:
    """Install float32 boxes under autocast and the sparse CPU backward on every detectron2 ``ROIAlign`` of this
    model (training and inference), and channels-last pooled features at inference on its ``ROIPooler`` s;
    returns how many ROIAligns."""
    from detectron2.layers import ROIAlign
    from detectron2.modeling.poolers import ROIPooler

    found = 0
    for module in model.modules():
        if isinstance(module, ROIAlign):
            module.forward = types.MethodType(_forward, module)
            found += 1
        elif type(module) is ROIPooler:
            module.forward = types.MethodType(_pooler_forward, module)
    return found
