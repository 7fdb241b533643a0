"""Images/s per core of NucleusDatasetMapper vs detectron2's DatasetMapper on the same dataset dicts.

Data loading feeds the GPU, so the number that matters is images/s per CPU core: everything runs in
one process with one thread (torch, OpenCV). The dicts are 512 px RGBA PNGs (the DSB-2018 layout)
with ~80 nuclei each, annotated as compressed COCO RLE, as nucleus_seg's loaders produce.
``read_normalize_ms_per_image`` is the share spent in io.read_image + io.normalize_image.

detectron2's mapper gets the equivalent geometric work: flip + shortest-edge resize over the same
scale range + 512 px crop, bitmask masks, boxes recomputed from masks. Ours runs twice: the full
training augmentation, and geometric only (no intensity/blur/noise) for a like-for-like figure.

    .venv/bin/python benchmarks/mapper_speed.py [--images 16] [--passes 3] [--nuclei 80] [--format rgba8]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch


def make_dicts(
    folder: Path, num: int, size: int, nuclei: int, fmt: str = "rgba8", seed: int = 0
) -> list[dict]:
    """Random non-overlapping elliptic nuclei on a noisy dark background + RLE annotations.

    ``fmt``: "rgba8" (8-bit RGBA PNG, as DSB-2018 stores them), "gray8" PNG or "gray16" TIFF.
    """
    import pycocotools.mask as mask_util
    import tifffile
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    dicts = []
    for i in range(num):
        label = np.zeros((size, size), np.int32)
        k = 0
        for _ in range(nuclei * 3):
            if k == nuclei:
                break
            cx, cy = rng.uniform(8, size - 8, 2)
            ax = rng.uniform(5, 14, 2)
            one = np.zeros_like(label, np.uint8)
            cv2.ellipse(one, (int(cx), int(cy)), (int(ax[0]), int(ax[1])), float(rng.uniform(0, 180)),
                        0, 360, 1, -1)
            if (label[one > 0] != 0).any():
                continue
            k += 1
            label[one > 0] = k
        image = rng.normal(20, 4, (size, size)) + (label > 0) * rng.uniform(80, 160)
        image = np.clip(image, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:03d}.{'tif' if fmt == 'gray16' else 'png'}"
        if fmt == "rgba8":
            rgba = np.dstack([image, image, image, np.full_like(image, 255)])
            cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        elif fmt == "gray8":
            cv2.imwrite(str(path), image)
        else:
            tifffile.imwrite(path, image.astype(np.uint16) * 200)
        annos = []
        for j in range(1, k + 1):
            rle = mask_util.encode(np.asfortranarray((label == j).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annos.append({"bbox": mask_util.toBbox(rle).tolist(), "bbox_mode": BoxMode.XYWH_ABS,
                          "segmentation": rle, "category_id": 0, "iscrowd": 0})
        dicts.append({"file_name": str(path), "image_id": i, "height": size, "width": size,
                      "annotations": annos})
    return dicts


def images_per_second(mapper, dicts: list[dict], passes: int) -> tuple[float, float]:
    """(images/s, mean instances per output) over ``passes`` runs through ``dicts`` after a warm-up."""
    import copy

    mapper(copy.deepcopy(dicts[0]))
    np.random.seed(0)
    count, instances = 0, 0
    start = time.perf_counter()
    for _ in range(passes):
        for d in dicts:
            out = mapper(d)
            count += 1
            instances += len(out["instances"])
    return count / (time.perf_counter() - start), instances / count


def read_normalize_ms(dicts: list[dict], passes: int) -> float:
    """The part both nucleus mappers share with inference: read_image + normalize_image."""
    from nucleus_seg.data.io import normalize_image, read_image

    start = time.perf_counter()
    for _ in range(passes):
        for d in dicts:
            normalize_image(read_image(d["file_name"]))
    return 1000 * (time.perf_counter() - start) / (passes * len(dicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--nuclei", type=int, default=80)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--format", choices=["rgba8", "gray8", "gray16"], default="rgba8",
                        help="how the images are stored (rgba8: DSB-2018's PNGs)")
    parser.add_argument("--save", help="append the JSON line to benchmarks/results/<SAVE>")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.data.mapper import NucleusDatasetMapper

    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml",
                          ["INPUT.NUCLEUS.CROP_SIZE", str(args.size)])
    lo, hi = cfg.INPUT.NUCLEUS.SCALE_RANGE
    from common import device_facts, emit

    results: dict = {"benchmark": "mapper_speed", "config": "configs/nucleus_R101_FPN_scratch.yaml",
                     "weights": "none (data loading only)", "variant": f"{args.format}, {args.size} px",
                     "size": args.size, "format": args.format,
                     "images": args.images, "passes": args.passes, "threads": 1, **device_facts()}
    with tempfile.TemporaryDirectory() as tmp:
        dicts = make_dicts(Path(tmp), args.images, args.size, args.nuclei, args.format)
        results["nuclei_per_image"] = float(np.mean([len(d["annotations"]) for d in dicts]))

        ours = NucleusDatasetMapper(cfg, is_train=True)
        geo = cfg.clone()
        geo.merge_from_list(["INPUT.NUCLEUS.BRIGHTNESS", 0.0, "INPUT.NUCLEUS.CONTRAST", 0.0,
                             "INPUT.NUCLEUS.GAMMA", (1.0, 1.0), "INPUT.NUCLEUS.BLUR_PROB", 0.0,
                             "INPUT.NUCLEUS.NOISE_PROB", 0.0])
        ours_geo = NucleusDatasetMapper(geo, is_train=True)
        d2 = DatasetMapper(
            is_train=True,
            augmentations=[
                T.RandomFlip(),
                T.ResizeShortestEdge((int(args.size * lo), int(args.size * hi)), 100000, "range"),
                T.RandomCrop("absolute", (args.size, args.size)),
            ],
            image_format="BGR", use_instance_mask=True, instance_mask_format="bitmask",
            recompute_boxes=True,
        )
        for name, mapper in (("nucleus_full_aug", ours), ("nucleus_geometric", ours_geo),
                             ("detectron2_DatasetMapper", d2)):
            ips, inst = images_per_second(mapper, dicts, args.passes)
            results[name] = {"images_per_s": round(ips, 2), "ms_per_image": round(1000 / ips, 2),
                             "instances_per_output": round(inst, 1)}
        results["read_normalize_ms_per_image"] = round(read_normalize_ms(dicts, args.passes), 2)
    results["speedup_full_vs_detectron2"] = round(
        results["nucleus_full_aug"]["images_per_s"] / results["detectron2_DatasetMapper"]["images_per_s"], 2)
    emit(results, args.save)


if __name__ == "__main__":
    main()
