"""The network part of the predictor as one traceable module: detectron2's model up to fixed-meaning tensors.

What is traced (through detectron2's ``TracingAdapter``): ``GeneralizedRCNN.inference(...,
do_postprocess=False)`` on one image, that is pixel mean/std and padding, backbone, RPN with its NMS, the
box head (standard or Cascade) with its NMS and score floor, and the mask head. Inputs and outputs:

    image   float32 (3, H, W), 0-255, channels in INPUT.FORMAT order (gray: three equal channels)
    boxes   float32 (N, 4) XYXY in image pixels, sorted by descending score
    scores  float32 (N,)
    classes int64 (N,) (always 0: nucleus)
    masks   float32 (N, 1, M, M) soft masks in box coordinates (M = 28)

Everything data-dependent around it (normalisation, rescale, mask pasting, label painting) stays outside,
in ``runner.py`` (numpy) or the bioimage.io wrapper, because detectron2's own versions are not traceable
(Python loops over instances, host-side sizes).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from torchvision.ops import box_iou

from ..data.io import normalize_from_cfg, read_image

SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "data" / "sample" / "image.tif"
OUTPUT_NAMES = ("boxes", "scores", "classes", "masks")
# an export is checked on the sample (traced there) and on a crop of another size: this share of the
# model's boxes must come out of the exported graph again (IoU >= 0.9), else the export is refused
CHECK_MATCH = 0.99


class ExportError(ValueError):
    """The export cannot be made as asked; the message names the file or option."""


class ExportCheckError(RuntimeError):
    """An exported graph does not reproduce the model (a tracing limit met by this config)."""


def export_cfg(cfg, score_floor: float | None = None):
    """A CPU copy of ``cfg`` whose box head drops scores below ``score_floor`` (default
    NUCLEUS.PREDICT.SCORE_THRESH) before the mask head, as nucleus-predict does: the same nuclei above
    it, far less work. The floor is baked into the graph; runners may only raise it."""
    cfg = cfg.clone()
    cfg.defrost()
    floor = float(cfg.NUCLEUS.PREDICT.SCORE_THRESH if score_floor is None else score_floor)
    # detectron2 keeps scores > SCORE_THRESH_TEST; the label outputs keep scores >= the floor
    just_below = float(np.nextafter(np.float32(floor), np.float32(-np.inf)))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = max(float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST), just_below)
    cfg.MODEL.DEVICE = "cpu"
    if cfg.INPUT.MIN_SIZE_TEST:
        raise ExportError(f"INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST}: exported models take images at their "
                          "own size (rescaling is by NUCLEUS.PREDICT.DIAMETER); set it to 0")
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ExportError("MODEL.WEIGHTS is empty: give the trained checkpoint to export (MODEL.WEIGHTS model.pth)")
    if "://" not in weights and not os.path.isfile(weights):
        raise ExportError(f"MODEL.WEIGHTS {weights}: no such checkpoint file")
    cfg.freeze()
    return cfg


def load_model(cfg) -> torch.nn.Module:
    """detectron2's own model with the checkpoint loaded: none of the predictor's speed-ups (batched NMS,
    half GroupNorm) are traced, they are exact replacements of what is."""
    model = build_model(cfg).eval()
    try:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike: name the file
        raise ExportError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: cannot be loaded as a checkpoint ({exc})") from exc
    return model


def _network(model: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    inst = model.inference([{"image": image}], do_postprocess=False)[0]
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes, inst.pred_masks


def example_image(cfg) -> torch.Tensor:
    """The shipped DSB-2018 sample as the network sees it: tracing records the path real nuclei take."""
    norm = normalize_from_cfg(read_image(SAMPLE_IMAGE), cfg)
    if cfg.INPUT.FORMAT == "BGR" and not cfg.INPUT.NORMALIZE.GRAY:
        norm = norm[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1))).float()


def check_images(example: torch.Tensor) -> list[torch.Tensor]:
    """The traced image and a crop of another shape (a graph with baked-in sizes fails on it)."""
    h, w = example.shape[1:]
    return [example, example[:, h // 10:h // 10 + max(64, h // 2), w // 5:w // 5 + max(64, (2 * w) // 3)].contiguous()]


def network_adapter(model: torch.nn.Module, example: torch.Tensor) -> TracingAdapter:
    """``model`` as a module from a (3, H, W) image to the four output tensors."""
    return TracingAdapter(model, example, _network).eval()


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """Tracing detectron2 warns on every Python int taken from a tensor, and torch on its deprecated
    exporters; the check after export is what tells whether the graph generalises, so they are noise."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


def reference_outputs(model: torch.nn.Module, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """The model's own network outputs on ``images``, to check every exported format against."""
    with torch.no_grad():
        return [_network(model, image) for image in images]


def check_export(references: list[tuple[torch.Tensor, ...]], run, images: list[torch.Tensor], what: str) -> dict:
    """Compare an exported graph (``run``: image -> four arrays) with the model's ``references`` on ``images``."""
    report = []
    for image, want in zip(images, references):
        got = [torch.as_tensor(np.asarray(a)) for a in run(image)]
        n_want, n_got = len(want[0]), len(got[0])
        matched = 1.0
        if n_want:
            matched = float((box_iou(want[0].float(), got[0].float()).amax(dim=1) >= 0.9).float().mean()) \
                if n_got else 0.0
        report.append({"shape": list(image.shape[1:]), "detections": n_want, "exported": n_got,
                       "matched": round(matched, 4)})
        if matched < CHECK_MATCH or abs(n_want - n_got) > max(1, 0.01 * n_want):
            raise ExportCheckError(f"{what}: the exported graph disagrees with the model on a {tuple(image.shape[1:])} "
                                   f"image ({n_got} detections vs {n_want}, {matched:.1%} of boxes found)")
    return {"images": report}
