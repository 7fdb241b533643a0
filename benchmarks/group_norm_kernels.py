"""GroupNorm kernels at the shapes of an R101-FPN GN model's inference (batch 32, 512 px), one GPU.

Times PyTorch's GroupNorm on NCHW (what an NCHW half-precision model runs), PyTorch's GroupNorm fed a channels-last
tensor (it converts), and ``nucleus_seg.modeling.nhwc_group_norm`` at several statistics settings (tile size,
programs per batch; ``programs=inf`` is one tile per program, the kernel of session 23). Each shape is weighted by
how often the model runs it, so the totals say what one batch's GroupNorm layers cost. One JSON line.

    python benchmarks/group_norm_kernels.py [--batch 32] [--rois-per-image 2000] [--save FILE.jsonl]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_facts, emit  # noqa: E402

# (channels, side, layers per forward) of R101-FPN with GN everywhere, for a 512 px input; ROI heads separately
BACKBONE_SHAPES = [(64, 256, 1), (64, 128, 6), (256, 128, 4), (128, 64, 8), (512, 64, 5), (256, 32, 46),
                   (1024, 32, 24), (512, 16, 6), (2048, 16, 4), (256, 128, 2), (256, 64, 2), (256, 32, 2),
                   (256, 16, 2)]
GROUPS = 32


def shapes(batch: int, rois_per_image: int, masks_per_image: int) -> list[tuple[tuple[int, int, int, int], int]]:
    """((N, C, H, W), layers) per shape: backbone + FPN, the 4-conv box head (per cascade stage), the mask head."""
    merged: dict[tuple[int, int, int, int], int] = {}
    for c, side, count in BACKBONE_SHAPES:
        key = (batch, c, side, side)
        merged[key] = merged.get(key, 0) + count
    merged[(batch * rois_per_image, 256, 7, 7)] = 4
    merged[(batch * masks_per_image, 256, 14, 14)] = 4
    return list(merged.items())


def time_shape(shape, settings, do_bench) -> tuple[dict, dict]:
    """Milliseconds per call of each GroupNorm at one shape, and each setting's largest error against fp32."""
    import torch
    from torch.nn import functional as F

    import nucleus_seg.modeling.nhwc_group_norm as gn

    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, device="cuda") * 2 + 3).half()
    weight, bias = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    reference = F.group_norm(x.float(), GROUPS, weight, bias, 1e-5)
    wh, bh = weight.half(), bias.half()
    timings = {
        "torch_nchw": do_bench(lambda: F.group_norm(x, GROUPS, wh, bh, 1e-5)),
        "torch_on_channels_last": do_bench(lambda: F.group_norm(x_cl, GROUPS, wh, bh, 1e-5)),
    }
    errors = {}
    for tile, programs in settings:
        gn.STATS_TILE_ELEMENTS, gn.STATS_PROGRAMS = tile, (1 << 40) if programs == math.inf else programs
        name = f"nhwc_{tile}:{programs}"
        y = gn.nhwc_group_norm(x_cl, GROUPS, weight, bias, 1e-5)
        errors[name] = round(float((y.float() - reference).abs().max()), 5)
        timings[name] = do_bench(lambda: gn.nhwc_group_norm(x_cl, GROUPS, weight, bias, 1e-5))
    return timings, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rois-per-image", type=int, default=2000, help="box-head ROIs (POST_NMS_TOPK_TEST)")
    parser.add_argument("--masks-per-image", type=int, default=400, help="mask-head ROIs (detections)")
    parser.add_argument("--settings", default="4096:1024,4096:512,4096:4096,2048:1024,8192:1024,8192:inf",
                        help="statistics settings STATS_TILE_ELEMENTS:STATS_PROGRAMS, comma-separated")
    parser.add_argument("--save", default=None)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("group_norm_kernels.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    settings = [(int(t), math.inf if p == "inf" else int(p))
                for t, p in (item.split(":") for item in args.settings.split(","))]
    rows, totals = [], {}
    for shape, layers in shapes(args.batch, args.rois_per_image, args.masks_per_image):
        timings, errors = time_shape(shape, settings, do_bench)
        row = {"shape": list(shape), "layers": layers, "ms": {k: round(v, 4) for k, v in timings.items()},
               "max_abs_error": errors}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        for k, v in timings.items():
            totals[k] = totals.get(k, 0.0) + v * layers
        torch.cuda.empty_cache()
    result = {"benchmark": "group_norm_kernels", **device_facts(), "config": "R101-FPN GN shapes, 512 px",
              "weights": "none (random tensors)", "variant": "settings " + args.settings, "batch": args.batch,
              "rois_per_image": args.rois_per_image, "masks_per_image": args.masks_per_image,
              "total_ms_per_batch": {k: round(v, 2) for k, v in totals.items()}, "per_shape": rows}
    emit(result, args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
