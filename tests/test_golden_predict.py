"""``nucleus-predict`` writes the same files as the recorded reference run (a fixed random-init model).

The reference outputs in ``tests/golden/predict/`` were written by this module's :func:`run_reference`
(``python tests/test_golden_predict.py --regenerate``) before the package was restructured; any change to
what a user gets (label pixels, scores, CSV columns, RLE, COCO entries) fails here. Regenerate them only
for an intended change of output, and say so in the commit.

The model is the real R101-FPN of the CPU demo config with seeded random weights, in fp32 (bfloat16
kernels differ between CPUs), all three images with ``--diameter auto`` and ``--tile 160``: the 512 px sample
(x0.75) is tiled by the batched tile path (its tiles stitched by the writers), the 256x320 crop, which "auto"
scales past one pass, is stitched by the predictor, and the 160 px crop goes through the model whole. Regenerated
when an image up to two tiles on a side went whole through ``nucleus-predict`` with detection caps in proportion
to its area (the 512 px sample was tiled at ``--tile 384`` before). fp32 convolutions may still round differently
on another instruction set, so the reference records the CPU capability it was made on and the comparison is
skipped elsewhere. On the
same instruction set another vendor's CPU (AMD vs the reference's Intel, both AVX512) gives the same label
images and text but scores apart in the 7th digit, so numbers in the text files are compared to a relative
1e-5 and everything else (labels, RLE, ids, columns) exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "predict"
SAMPLE = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample" / "image.tif"
TEXT_FILES = ("sample_measurements.csv", "crop_measurements.csv", "small_measurements.csv", "submission.csv",
              "coco_results.json", "coco_images.json")
LABEL_FILES = ("sample_labels.tif", "crop_labels.tif", "small_labels.tif")
REL_TOL = 1e-5  # fp32 rounding of scores between CPUs; a changed output moves far more


def _same_values(got, want) -> bool:
    """Equal JSON/CSV values: numbers to ``REL_TOL``, everything else exactly."""
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_values(got[k], want[k]) for k in got)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same_values(a, b) for a, b in zip(got, want))
    if isinstance(got, str) and isinstance(want, str):
        try:
            got, want = float(got), float(want)
        except ValueError:
            return got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)) and not isinstance(got, bool):
        return float(got) == float(want) or abs(got - want) <= REL_TOL * max(abs(got), abs(want))
    return got == want


def _parsed(path: Path):
    import csv

    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _environment() -> dict:
    import tifffile
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "tifffile": tifffile.__version__}


def run_reference(out: Path) -> None:
    """Write a seeded random-init checkpoint and two inputs, then run ``nucleus-predict`` into ``out``."""
    import tifffile
    import torch
    from detectron2.modeling import build_model

    from nucleus_seg.cli.predict import main
    from nucleus_seg.config import get_nucleus_cfg

    work = out / "work"
    (work / "images").mkdir(parents=True, exist_ok=True)
    image = tifffile.imread(SAMPLE)
    tifffile.imwrite(work / "images" / "sample.tif", image)
    tifffile.imwrite(work / "images" / "crop.tif", image[40:296, 100:420])
    tifffile.imwrite(work / "images" / "small.tif", image[300:460, 300:460])
    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_cpu_demo.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, work / "random.pth")
    status = main([
        "--config-file", "configs/nucleus_R101_FPN_cpu_demo.yaml", "--input", str(work / "images"),
        "--output", str(out), "--diameter", "auto", "--tile", "160",
        "MODEL.WEIGHTS", str(work / "random.pth"), "NUCLEUS.PREDICT.AMP", "False",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "300", "TEST.DETECTIONS_PER_IMAGE", "100",
    ])
    assert status == 0


@pytest.mark.slow
def test_predict_outputs_match_the_reference(tmp_path):
    import tifffile

    recorded = json.loads((GOLDEN / "environment.json").read_text())
    here = _environment()
    if here["cpu_capability"] != recorded["cpu_capability"] or here["torch"] != recorded["torch"]:
        pytest.skip(f"reference made with {recorded}, this machine has {here}: fp32 kernels may round apart")
    run_reference(tmp_path)
    for name in TEXT_FILES:
        assert _same_values(_parsed(tmp_path / name), _parsed(GOLDEN / name)), name
    for name in LABEL_FILES:
        got, want = tifffile.imread(tmp_path / name), tifffile.imread(GOLDEN / name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
        if here["tifffile"] == recorded["tifffile"]:
            assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), name
    # the reference is not trivially empty: both images have nuclei painted
    assert all(tifffile.imread(GOLDEN / name).max() > 0 for name in LABEL_FILES)


if __name__ == "__main__":  # python tests/test_golden_predict.py --regenerate
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit("usage: python tests/test_golden_predict.py --regenerate")
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_reference(Path(tmp))
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in TEXT_FILES + LABEL_FILES:
            shutil.copy(Path(tmp) / name, GOLDEN / name)
    (GOLDEN / "environment.json").write_text(json.dumps(_environment(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
