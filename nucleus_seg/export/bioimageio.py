"""A bioimage.io model package: the whole prediction (raw image in, label image out) as one TorchScript file.

bioimage.io consumers (deepImageJ, bioimageio.core, QuPath's bioimage.io support) run a weights file on
tensors and cannot call our numpy runner, so the package's weights are :class:`LabelModel`: a scripted
module holding the percentile normalisation, the traced network (``network.py``), mask pasting
(detectron2's grid) and label painting. What fits the spec and what does not:

* fits: input ``raw`` (batch 1, one channel, y, x of any size >= 64) as float32; output ``labels``
  (int32, same y/x) and ``scores`` (one per label id, a data-dependent index axis); preprocessing and
  postprocessing are inside the weights, so the RDF declares none;
* does not fit: instance ids are nominal data with no fixed set of values, which the spec cannot say
  (declared as int32 interval data); tiling: consumers that tile an image (deepImageJ with large images)
  cut nuclei at tile seams and number each tile's nuclei from 1, because the spec has no instance
  stitching; the diameter rescale ('auto' or a number) and the measurements table; colour images
  (one channel is declared: configs with INPUT.NORMALIZE.GRAY False are refused); and the ONNX weights,
  whose pre- and post-processing live in the runner, not in the graph.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..data.io import normalize_image, read_image
from ..inference.outputs import overlay_image
from ..utils.files import atomic_path, atomic_write
from .network import SAMPLE_IMAGE, ExportError, quiet_tracing

MIN_SIZE = 64
CITATIONS = (("He, Gkioxari, Dollar, Girshick: Mask R-CNN (ICCV 2017)", "10.1109/ICCV.2017.322"),
             ("Wu et al.: Detectron2", "https://github.com/facebookresearch/detectron2"))


class LabelModel(torch.nn.Module):
    """(1, 1, H, W) raw image -> ((1, 1, H, W) int32 labels, (1, N) scores of ids 1..N): NucleusPredictor's
    ``predict_labels`` at the image's own scale, as TorchScript (scripted around the traced network)."""

    def __init__(self, network: torch.jit.ScriptModule, method: str, low: float, high: float, invert: str,
                 score_thresh: float):
        super().__init__()
        self.network = network
        self.method = method
        self.low = low
        self.high = high
        self.invert = invert
        self.score_thresh = score_thresh

    def _percentile(self, values: torch.Tensor, q: float) -> torch.Tensor:
        """numpy's default (linear) percentile of sorted float64 values."""
        position = q / 100.0 * (values.numel() - 1)
        below = int(math.floor(position))
        above = min(below + 1, values.numel() - 1)
        return values[below] + (position - below) * (values[above] - values[below])

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """``normalize_image`` of a gray image in float32 arithmetic (uint8 values as floats)."""
        data = raw.double().flatten()
        if self.method == "percentile":
            ordered = torch.sort(data).values
            lo, hi = self._percentile(ordered, self.low), self._percentile(ordered, self.high)
        else:  # minmax
            lo, hi = data.min(), data.max()
        if bool(hi <= lo):
            hi = lo + 1.0
        out = torch.floor(((raw.float() - lo.float()) * (255.0 / (hi - lo)).float()).clamp(0.0, 255.0) + 0.5)
        if self.invert == "always" or (self.invert == "auto" and int((out >= 128).sum()) * 2 > out.numel()):
            out = 255.0 - out
        return out

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.normalize(raw[0, 0])
        height, width = image.shape[0], image.shape[1]
        boxes, scores, classes, masks = self.network(image[None].expand(3, height, width).contiguous())
        keep = (scores >= self.score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.zeros((height, width), dtype=torch.int64)
        paint_order: list[int] = torch.sort(scores, stable=True).indices.tolist()
        for k in paint_order:  # lowest score first: the best one wins each pixel
            if bool(keep[k]):
                x0, y0, x1, y1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
                top, left = max(int(torch.floor(y0)) - 1, 0), max(int(torch.floor(x0)) - 1, 0)
                bottom, right = min(int(torch.ceil(y1)) + 1, height), min(int(torch.ceil(x1)) + 1, width)
                ys = torch.arange(top, bottom, dtype=torch.float32) + 0.5
                xs = torch.arange(left, right, dtype=torch.float32) + 0.5
                gy = (ys - y0) / (y1 - y0) * 2 - 1
                gx = (xs - x0) / (x1 - x0) * 2 - 1
                grid = torch.stack([gx[None, :].expand(len(ys), len(xs)), gy[:, None].expand(len(ys), len(xs))], 2)
                window = F.grid_sample(masks[k:k + 1], grid[None], align_corners=False)[0, 0] >= 0.5
                region = labels[top:bottom, left:right]
                region[window] = k + 1
        area = torch.bincount(labels.flatten(), minlength=len(scores) + 1)
        alive = torch.nonzero(area[1:] > 0)[:, 0]
        order = alive[torch.sort(-scores[alive], stable=True).indices]
        lut = torch.zeros(len(scores) + 1, dtype=torch.int64)
        lut[order + 1] = torch.arange(1, len(order) + 1)
        return lut[labels].to(torch.int32)[None, None], scores[order][None]


def label_model(traced: torch.jit.ScriptModule, cfg, score_thresh: float) -> torch.jit.ScriptModule:
    """:class:`LabelModel` scripted for ``cfg``'s normalisation; ExportError where the package cannot fit."""
    norm = cfg.INPUT.NORMALIZE
    if not norm.GRAY or norm.METHOD not in ("percentile", "minmax"):
        raise ExportError("bioimageio: the package declares one gray channel with percentile or minmax "
                          f"normalisation; this config has INPUT.NORMALIZE.GRAY {norm.GRAY}, METHOD {norm.METHOD}")
    with quiet_tracing():
        return torch.jit.script(LabelModel(traced, norm.METHOD, float(norm.LOW), float(norm.HIGH), norm.INVERT,
                                           float(score_thresh)))


def _documentation(cfg, score_thresh: float) -> str:
    return f"""# Nucleus instance segmentation (nucleus_seg, Mask R-CNN R101-FPN)

Input: one 2-D gray image (any bit depth, as float32), nuclei bright or dark; it is normalised inside the
weights (percentiles {cfg.INPUT.NORMALIZE.LOW}-{cfg.INPUT.NORMALIZE.HIGH}, inverted when the background is
bright). Output `labels`: one int32 label image (0 background, 1..N nuclei by descending score), and
`scores` (score of id k at index k-1). Nuclei scoring below {score_thresh} are left out.

The image is segmented at its own scale: the model was trained on nuclei of about
{cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER:g} px diameter, so rescale images whose nuclei are far from that first.
Do not tile: nuclei cut by tile seams are not stitched back. For tiling, a diameter estimate and
measurement tables use `nucleus-predict` or the napari plugin of nucleus_seg.
"""


def write_package(out: Path, cfg, traced: torch.jit.ScriptModule, score_thresh: float,
                  author: str = "nucleus_seg") -> Path:
    """Write ``out/`` (rdf.yaml, weights, test tensors, cover, documentation) and validate it with
    bioimageio.spec; returns the rdf.yaml path. The weights are checked on the test input before writing."""
    import bioimageio.spec as spec  # the optional 'export' extra; heavy (pydantic models)
    from bioimageio.spec.model import v0_5

    out.mkdir(parents=True, exist_ok=True)
    module = label_model(traced, cfg, score_thresh)
    raw = read_image(SAMPLE_IMAGE).astype(np.float32)
    with torch.no_grad():
        labels, scores = module(torch.from_numpy(raw)[None, None])
    with atomic_path(out / "weights.pt") as tmp:
        torch.jit.save(module, str(tmp))
    for name, array in (("test_input.npy", raw[None, None]), ("test_labels.npy", labels.numpy()),
                        ("test_scores.npy", scores.numpy())):
        with atomic_path(out / name) as tmp:
            np.save(tmp, array)
    norm = normalize_image(raw.astype(np.uint16))
    cover = np.concatenate([norm, overlay_image(norm, labels[0, 0].numpy())], axis=1)  # 2:1, as the site shows
    atomic_write(out / "cover.png", cv2.imencode(".png", cv2.cvtColor(cover, cv2.COLOR_RGB2BGR))[1].tobytes())
    atomic_write(out / "README.md", _documentation(cfg, score_thresh))
    with spec.ValidationContext(root=out, perform_io_checks=True):  # file names relative to the package
        model = _describe(v0_5, author)
    rdf = out / "rdf.yaml"
    spec.save_bioimageio_yaml_only(model, rdf)
    summary = spec.load_description(rdf, perform_io_checks=True).validation_summary
    if summary.status not in ("valid-format", "passed"):
        raise ExportError(f"bioimageio: {rdf} does not validate: {summary.format()}")
    return rdf


def _describe(v0_5, author: str):
    """The model description (bioimage.io format 0.5) of the files :func:`write_package` wrote."""
    y, x = v0_5.AxisId("y"), v0_5.AxisId("x")
    size = v0_5.ParameterizedSize(min=MIN_SIZE, step=1)
    raw_id, labels_id, scores_id = v0_5.TensorId("raw"), v0_5.TensorId("labels"), v0_5.TensorId("scores")
    return v0_5.ModelDescr(
        name="nucleus_seg Mask R-CNN R101-FPN nuclei",
        description="Cell-nucleus instance segmentation (Mask R-CNN, ResNet-101-FPN, detectron2), "
                    "normalisation and label painting inside the TorchScript weights.",
        authors=[v0_5.Author(name=author)],
        cite=[v0_5.CiteEntry(text=text, **({"doi": ref} if ref.startswith("10.") else {"url": ref}))
              for text, ref in CITATIONS],
        license=v0_5.LicenseId("Apache-2.0"),
        documentation=v0_5.FileDescr(source="README.md"),
        covers=[v0_5.FileDescr(source="cover.png")],
        tags=["nuclei", "instance-segmentation", "mask-r-cnn", "fluorescence-light-microscopy", "2d", "pytorch"],
        inputs=[v0_5.InputTensorDescr(
            id=raw_id, description="2-D gray image, any range (normalised inside)",
            axes=[v0_5.BatchAxis(size=1), v0_5.ChannelAxis(channel_names=[v0_5.Identifier("gray")]),
                  v0_5.SpaceInputAxis(id=y, size=size), v0_5.SpaceInputAxis(id=x, size=size)],
            test_tensor=v0_5.FileDescr(source="test_input.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32"),
        )],
        outputs=[
            v0_5.OutputTensorDescr(
                id=labels_id, description="label image: 0 background, 1..N nuclei by descending score",
                axes=[v0_5.BatchAxis(size=1), v0_5.ChannelAxis(channel_names=[v0_5.Identifier("labels")]),
                      v0_5.SpaceOutputAxis(id=y, size=v0_5.SizeReference(tensor_id=raw_id, axis_id=y)),
                      v0_5.SpaceOutputAxis(id=x, size=v0_5.SizeReference(tensor_id=raw_id, axis_id=x))],
                test_tensor=v0_5.FileDescr(source="test_labels.npy"),
                data=v0_5.IntervalOrRatioDataDescr(type="int32"),
            ),
            v0_5.OutputTensorDescr(
                id=scores_id, description="score of label id k at index k-1",
                axes=[v0_5.BatchAxis(size=1),
                      v0_5.IndexOutputAxis(id=v0_5.AxisId("nucleus"), size=v0_5.DataDependentSize(min=1))],
                test_tensor=v0_5.FileDescr(source="test_scores.npy"),
                data=v0_5.IntervalOrRatioDataDescr(type="float32"),
            ),
        ],
        weights=v0_5.WeightsDescr(torchscript=v0_5.TorchscriptWeightsDescr(
            source="weights.pt", pytorch_version=v0_5.Version(torch.__version__.split("+")[0]))),
    )
