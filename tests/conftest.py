"""Shared fixtures: the real DSB-2018 sample and a CPU-sized config of the real R101-FPN model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# Property tests run derandomized (the same examples every run), so a pass in CI is not luck and a failure
# reproduces; HYPOTHESIS_PROFILE=explore draws fresh examples when hunting for new bugs.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# napari and Qt tests render offscreen: no display is needed, and no window opens on a desktop
os.environ["QT_QPA_PLATFORM"] = "offscreen"

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample"


@pytest.fixture(scope="session")
def opengl_display() -> str:
    """An X display for napari's OpenGL canvas under Qt's offscreen platform: the current one, else a virtual
    one (Xvfb) for the rest of the session (``nucleus_seg.napari._headless``); skipped where neither exists."""
    from nucleus_seg.napari._headless import NoDisplayError, ensure_display

    try:
        return ensure_display()
    except NoDisplayError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def dsb_sample() -> tuple[np.ndarray, np.ndarray]:
    """(image uint16 512x512, label image) of the real DSB-2018 sample (BSD-3, see its LICENSE)."""
    from nucleus_seg.data.io import read_image, read_label_image

    return read_image(SAMPLE_DIR / "image.tif"), read_label_image(SAMPLE_DIR / "labels.tif")


@pytest.fixture
def real_training_batch(dsb_sample) -> list[dict]:
    """Two 128 px crops of the real sample with their nuclei, as detectron2's training inputs (uint8 CHW images,
    bitmask instances)."""
    import torch
    from detectron2.structures import BitMasks, Instances

    image, label = dsb_sample
    batch = []
    for y, x in ((0, 0), (200, 300)):
        crop, lab = image[y:y + 128, x:x + 128].astype("float32"), label[y:y + 128, x:x + 128]
        ids = torch.tensor(sorted(i for i in set(lab.ravel().tolist()) if i))
        instances = Instances((128, 128))
        instances.gt_masks = BitMasks(torch.from_numpy(lab)[None] == ids[:, None, None])
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        instances.gt_classes = torch.zeros(len(ids), dtype=torch.int64)
        pixels = torch.from_numpy((crop / crop.max() * 255).astype("uint8")).expand(3, -1, -1).clone()
        batch.append({"image": pixels, "instances": instances, "height": 128, "width": 128})
    return batch


@pytest.fixture
def tiny_cfg(tmp_path):
    """The CPU demo config made smaller still: real R101-FPN weights shapes, few proposals, 128 px crops."""
    from nucleus_seg.config import get_nucleus_cfg

    cfg = get_nucleus_cfg(
        "configs/nucleus_R101_FPN_cpu_demo.yaml",
        [
            "INPUT.NUCLEUS.CROP_SIZE", "128",
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "TEST.DETECTIONS_PER_IMAGE", "50",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"),
            # fp32 inference: tests compare outputs exactly (DefaultPredictor, tiled vs untiled, 1 vs N
            # ranks); bfloat16 CPU inference has its own test
            "NUCLEUS.PREDICT.AMP", "False",
        ],
    )
    return cfg


@pytest.fixture
def cli_cfg(tiny_cfg, tmp_path):
    """``tiny_cfg`` as a YAML file for the command-line tools (20 detections an image, kept from score 0.1)."""
    import torch

    torch.manual_seed(0)  # the CLI builds the model with random weights: the same ones every run
    tiny_cfg.TEST.DETECTIONS_PER_IMAGE = 20
    tiny_cfg.NUCLEUS.PREDICT.SCORE_THRESH = 0.1
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_cfg.dump())
    return path


@pytest.fixture
def synth_root(tmp_path_factory, monkeypatch):
    """Synthetic datasets are generated (once per session) under a temporary NUCLEUS_DATASETS."""
    root = tmp_path_factory.getbasetemp() / "nucleus_datasets"
    monkeypatch.setenv("NUCLEUS_DATASETS", str(root))
    return root
