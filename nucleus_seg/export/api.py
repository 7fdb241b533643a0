"""``export_model``: one folder with the exported weights, their settings and the dependency-free runner.

    OUT/model.ts          TorchScript network (torch + torchvision)
    OUT/model.onnx        ONNX network (onnxruntime)
    OUT/model.json        what the runner needs: normalisation, channel order, score threshold and
                          baked-in floor, diameters; and the export check's numbers
    OUT/config.yaml       the full detectron2 config the weights belong to
    OUT/nucleus_runner.py this package's ``runner.py``, copied: pre- and post-processing in numpy
    OUT/bioimageio/       with format "bioimageio": a bioimage.io model package (see ``bioimageio.py``)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__
from ..utils.files import atomic_write
from .bioimageio import write_package
from .network import (
    ExportError,
    check_export,
    check_images,
    example_image,
    export_cfg,
    load_model,
    reference_outputs,
)
from .onnx import DEFAULT_OPSET, MIN_OPSET, export_onnx, run_onnx
from .torchscript import export_torchscript, run_torchscript

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "bioimageio")
WEIGHT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
META_NAME = "model.json"
RUNNER_NAME = "nucleus_runner.py"
RUNNER_SOURCE = Path(__file__).resolve().parent / "runner.py"


def runner_metadata(cfg, score_floor: float) -> dict:
    """The settings ``runner.py`` reads (``cfg`` as the predictor would use it)."""
    pred, norm = cfg.NUCLEUS.PREDICT, cfg.INPUT.NORMALIZE
    return {
        "nucleus_seg": __version__,
        "normalize": {"METHOD": norm.METHOD, "LOW": float(norm.LOW), "HIGH": float(norm.HIGH),
                      "INVERT": norm.INVERT, "GRAY": bool(norm.GRAY), "CHANNEL": int(norm.CHANNEL)},
        "input_format": cfg.INPUT.FORMAT,
        "score_thresh": max(float(pred.SCORE_THRESH), score_floor),
        "score_floor": score_floor,
        "train_diameter": float(pred.TRAIN_DIAMETER),
        "diameter": "auto" if float(pred.DIAMETER) < 0 else float(pred.DIAMETER),
        "diameter_score_thresh": float(pred.DIAMETER_SCORE_THRESH),
        "min_significance": float(pred.MIN_SIGNIFICANCE),
        "min_edge_significance": float(pred.MIN_EDGE_SIGNIFICANCE),
        "boundary_level": float(pred.BOUNDARY_LEVEL),
        "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),  # the graph's cap, whatever the image size
    }


def export_model(cfg, output: str | Path, formats: Sequence[str], opset: int | None = None,
                 score_floor: float | None = None) -> dict:
    """Export ``cfg``'s model (MODEL.WEIGHTS) to ``output`` in ``formats``; returns the metadata written.

    Each format is checked against the PyTorch model on the sample and on a crop of another size before it
    is kept (:func:`~nucleus_seg.export.network.check_export`); ExportError names what is wrong.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if not formats or unknown:
        raise ExportError(f"--format: unknown {unknown}; choose from {', '.join(FORMATS)}")
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: RoiAlign with aligned boxes needs opset >= {MIN_OPSET}")
    floor = float(cfg.NUCLEUS.PREDICT.SCORE_THRESH if score_floor is None else score_floor)
    cfg = export_cfg(cfg, floor)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg)
    example = example_image(cfg)
    images = check_images(example)
    references = reference_outputs(model, images)
    meta = runner_metadata(cfg, floor)
    meta.update(weights={}, checks={})
    if "torchscript" in formats or "bioimageio" in formats:
        start, path = time.perf_counter(), output / WEIGHT_FILES["torchscript"]
        traced = export_torchscript(model, example, path)
        meta["checks"]["torchscript"] = check_export(references, run_torchscript(traced), images, str(path))
        meta["weights"]["torchscript"] = path.name
        logger.info("wrote %s and checked it (%.1f s)", path, time.perf_counter() - start)
    if "onnx" in formats:
        start, path = time.perf_counter(), output / WEIGHT_FILES["onnx"]
        meta["opset"] = int(opset or DEFAULT_OPSET)
        export_onnx(model, example, path, meta["opset"])
        meta["checks"]["onnx"] = check_export(references, run_onnx(path), images, str(path))
        meta["weights"]["onnx"] = path.name
        logger.info("wrote %s and checked it (%.1f s)", path, time.perf_counter() - start)
    atomic_write(output / "config.yaml", cfg.dump())
    atomic_write(output / RUNNER_NAME, RUNNER_SOURCE.read_text())
    atomic_write(output / META_NAME, json.dumps(meta, indent=1) + "\n")
    if "bioimageio" in formats:
        start = time.perf_counter()
        rdf = write_package(output / "bioimageio", cfg, traced, meta["score_thresh"])
        meta["bioimageio"] = str(rdf)
        logger.info("wrote and validated %s (%.1f s)", rdf, time.perf_counter() - start)
    return meta
