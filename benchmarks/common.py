"""Shared pieces of the GPU benchmarks: device/version facts, the benchmark dataset, result lines."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NAMED = ("device", "config", "weights", "variant")  # what every result line names


def device_facts() -> dict:
    import detectron2
    import torch

    facts = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        facts["num_gpus"] = torch.cuda.device_count()
    else:
        facts["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return facts


def benchmark_dataset(root: Path, num: int, size: int = 512, seed: int = 1234, name: str = "bench_train") -> str:
    """Generate (once) and register a synthetic DSB-layout set of 8-bit images; returns its name.

    8-bit images keep vanilla detectron2's reader (PIL) on its ordinary path, so both sides read the same.
    """
    from nucleus_seg.data import register_nucleus_dataset
    from nucleus_seg.data.synth import write_dataset

    folder = root / f"{name}_{num}_{size}_{seed}"
    if not folder.exists():
        write_dataset(folder, num=num, size=size, seed=seed, bit_depth=8)
    register_nucleus_dataset(name, folder)
    return name


def emit(result: dict, save: str | None) -> None:
    """Print one JSON line; append it to benchmarks/results/<save> when asked (GPU runs)."""
    missing = [k for k in NAMED if k not in result]
    if missing:  # a result line that cannot be told apart from another run's is a bug in its script
        print(f"warning: benchmark line without {', '.join(missing)}", file=sys.stderr, flush=True)
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / save, "a") as f:
            f.write(line + "\n")


def inference_cfg(config_file: str, opts: list[str], detections: int, batch: int):
    """The inference benchmarks' config: always ``detections`` instances per image (whatever the weights),
    uint8 pixels fed as they are (so DefaultPredictor sees the same input), no diameter rescale, and every
    detection kept and every mask as the model made it (no significance rule, no boundary step: DefaultPredictor
    has neither)."""
    from nucleus_seg.config import get_nucleus_cfg

    cfg = get_nucleus_cfg(config_file, opts)
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.INPUT.NORMALIZE.METHOD = "none"
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = batch
    cfg.NUCLEUS.PREDICT.DIAMETER = 0.0
    cfg.NUCLEUS.PREDICT.MIN_SIGNIFICANCE = 0.0
    cfg.NUCLEUS.PREDICT.BOUNDARY_LEVEL = 0.0
    return cfg


def inference_images(root: Path, num: int) -> list:
    """``num`` 512x512 benchmark images as HxWx3 uint8 arrays."""
    import numpy as np
    from detectron2.data import DatasetCatalog

    from nucleus_seg.data.io import read_image

    name = benchmark_dataset(root, max(num, 16), name="bench_infer")
    images = [read_image(d["file_name"]) for d in DatasetCatalog.get(name)[:num]]
    return [np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2)) if g.ndim == 2 else g[..., :3] for g in images]


def weights_or_random_init(cfg, weights: str) -> str:
    """``weights``, or (when empty) a seeded random initialisation of ``cfg``'s model saved to a temporary file:
    timings only, both sides of a comparison load the same file."""
    if weights:
        return weights
    import atexit
    import shutil
    import tempfile

    import torch
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="random_init_")
    atexit.register(shutil.rmtree, folder, True)  # ~240 MB of R101 weights: gone when the benchmark ends
    path = os.path.join(folder, "random_init.pth")
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


def validation_sweep_parser(doc: str):
    """The arguments of a sweep of inference settings over labelled validation images (``significance_sweep``,
    ``boundary_sweep``): the model, the images, their photometric variants, where the line goes."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="MODEL.WEIGHTS (default: the config's)")
    parser.add_argument("--dataset", required=True, help="labelled validation set (name or DSB-layout folder)")
    parser.add_argument("--images", type=int, default=12, help="its first N images")
    parser.add_argument("--variants", default="noise_snr5", help="photometric variants besides clean (comma list)")
    parser.add_argument("--save", default="")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides (KEY VALUE)")
    return parser
