"""Shared fixtures: the real DSB-2018 sample and a CPU-sized config of the real R101-FPN model."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# napari and Qt tests render offscreen: no display is needed, and no window opens on a desktop
os.environ["QT_QPA_PLATFORM"] = "offscreen"

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample"


@pytest.fixture(scope="session")
def opengl_display():
    """An X display for OpenGL: Qt's offscreen platform creates GL contexts only through an X server's GLX,
    and napari's canvas needs one. Without a DISPLAY a virtual one (Xvfb) is started for the session;
    windows still go to the offscreen platform, so nothing opens on a screen either way."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("napari's canvas needs OpenGL, which Qt's offscreen platform takes from an X server: "
                    "install Xvfb (Debian: apt-get install xvfb; scripts/setup_env.sh does it as root)")
    # -noreset: the server stays as it is when its last client leaves (a reset rewrites -displayfd)
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-noreset", "-screen", "0", "1280x1024x24",
                             "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 20)
    number = os.read(read, 16).decode().strip() if ready else ""
    if not number:
        proc.kill()
        os.close(read)
        pytest.fail("Xvfb did not start within 20 s")
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        del os.environ["DISPLAY"]
        proc.terminate()
        proc.wait(timeout=10)
        os.close(read)  # open until the server ends, so it never writes into a closed pipe


@pytest.fixture(scope="session")
def dsb_sample() -> tuple[np.ndarray, np.ndarray]:
    """(image uint16 512x512, label image) of the real DSB-2018 sample (BSD-3, see its LICENSE)."""
    from nucleus_seg.data.io import read_image, read_label_image

    return read_image(SAMPLE_DIR / "image.tif"), read_label_image(SAMPLE_DIR / "labels.tif")


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
