"""nucleus-export: TorchScript and ONNX networks with the numpy runner agree with NucleusPredictor on the real
sample; the runner needs no detectron2; the bioimage.io package validates and reproduces the runner.

The model is the CPU demo R101-FPN with seeded random weights (fp32). Random-init scores sit around 0.2-0.6,
so the comparisons use score threshold 0.2 (~170 nuclei on the sample) rather than the default 0.5 (~9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from nucleus_seg.cli.export import main as export_main
from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.io import check_image_shape, normalize_image, read_image, read_label_image
from nucleus_seg.evaluation.matching import dsb_score, label_overlap
from nucleus_seg.export import runner
from nucleus_seg.inference.masks import paste_mask_windows
from nucleus_seg.inference.predictor import NucleusPredictor

SAMPLE = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample"
THRESH = "0.2"
OPTS = ["NUCLEUS.PREDICT.AMP", "False", "NUCLEUS.PREDICT.DIAMETER", "0.0", "NUCLEUS.PREDICT.SCORE_THRESH", THRESH,
        "MODEL.RPN.POST_NMS_TOPK_TEST", "300", "TEST.DETECTIONS_PER_IMAGE", "200", "MODEL.DEVICE", "cpu"]
# runs a file with detectron2 and nucleus_seg unimportable, as on a machine that has neither
NO_DETECTRON2 = """
import runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("detectron2", "nucleus_seg"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"detectron2", "nucleus_seg", "torch"}))
"""


def _random_weights(config: str, path: Path, opts: list[str]) -> Path:
    torch.manual_seed(0)
    torch.save({"model": build_model(get_nucleus_cfg(config, opts)).state_dict()}, path)
    return path


def _agreement(want: np.ndarray, got: np.ndarray) -> dict:
    """Instance count ratio and median over the predictor's nuclei of the best IoU in ``got``."""
    overlap = label_overlap(want, got)
    best = np.zeros(overlap.n_gt)
    np.maximum.at(best, overlap.pair_gt, overlap.iou)
    return {"count_ratio": overlap.n_pred / max(1, overlap.n_gt), "median_iou": float(np.median(best)),
            "n_predictor": overlap.n_gt, "n_export": overlap.n_pred}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export through the CLI in all three formats, and the predictor's labels of the sample."""
    tmp = tmp_path_factory.mktemp("export")
    config = "configs/nucleus_R101_FPN_cpu_demo.yaml"
    weights = _random_weights(config, tmp / "random.pth", OPTS)
    start = time.perf_counter()
    status = export_main(["--config-file", config, "--format", "torchscript,onnx,bioimageio", "--output",
                          str(tmp / "model"), *OPTS, "MODEL.WEIGHTS", str(weights)])
    assert status == 0
    print(f"export (3 formats): {time.perf_counter() - start:.1f} s")
    cfg = get_nucleus_cfg(config, OPTS + ["MODEL.WEIGHTS", str(weights)])
    image = read_image(SAMPLE / "image.tif")
    return tmp / "model", NucleusPredictor(cfg).predict_labels([image])[0], image


def test_runner_normalisation_is_the_package_one():
    rng = np.random.default_rng(0)
    images = [read_image(SAMPLE / "image.tif"), rng.normal(100, 30, (64, 80)).astype(np.float32),
              rng.integers(0, 255, (50, 60, 3), dtype=np.uint8), rng.integers(0, 4000, (40, 40, 4), dtype=np.uint16),
              255 - rng.integers(0, 60, (30, 30), dtype=np.uint8),
              np.dstack([rng.integers(0, 4000, (40, 40, 3), dtype=np.uint16), np.full((40, 40), 65535, np.uint16)])]
    settings = [dict(), dict(method="minmax"), dict(gray=False, invert="never"), dict(invert="always", low=2, high=98),
                dict(channel=0), dict(channel=2), dict(channel=3, gray=False)]
    for image in images:
        for s in settings:
            n = {"METHOD": s.get("method", "percentile"), "LOW": s.get("low", 1.0), "HIGH": s.get("high", 99.8),
                 "INVERT": s.get("invert", "auto"), "GRAY": s.get("gray", True), "CHANNEL": s.get("channel", -1)}
            channels = 1 if image.ndim == 2 else check_image_shape(image).shape[2]  # an opaque alpha is not one
            if n["CHANNEL"] >= channels:  # both refuse an image without the nuclear channel, naming the count
                refused = f"has {channels} channel.*no channel {n['CHANNEL']}"
                with pytest.raises(ValueError, match=refused):
                    normalize_image(image, channel=n["CHANNEL"])
                with pytest.raises(ValueError, match=refused):
                    runner.normalize(image, n)
                continue
            want = normalize_image(image, n["METHOD"], n["LOW"], n["HIGH"], n["INVERT"], n["GRAY"], n["CHANNEL"])
            np.testing.assert_array_equal(runner.normalize(image, n), want, err_msg=f"{image.dtype} {s}")
            if n["CHANNEL"] >= 0:  # that channel alone, as a one-channel image would be
                alone = image if image.ndim == 2 else image[..., n["CHANNEL"]]
                np.testing.assert_array_equal(want, normalize_image(alone, n["METHOD"], n["LOW"], n["HIGH"],
                                                                    n["INVERT"], n["GRAY"]))
    for image in (images[2], rng.integers(0, 255, (30, 30, 4), dtype=np.uint8)):  # every channel in the max
        assert np.array_equal(runner.normalize(image, {"METHOD": "none", "LOW": 1, "HIGH": 99, "INVERT": "auto",
                                                       "GRAY": True}), normalize_image(image, "none"))


def test_runner_resize_is_detectron2s_within_a_grey_level():
    image = normalize_image(read_image(SAMPLE / "image.tif"))[100:300, 50:290]
    for size in ((340, 410), (87, 101), (200, 120)):  # up, down (antialiased), mixed
        want = T.ResizeTransform(*image.shape[:2], *size).apply_image(image).astype(int)
        got = runner.resize(image, *size).astype(int)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, size


def test_runner_paste_is_the_predictors():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((40, 28, 28), dtype=np.float32))
    xy = rng.uniform(-10, 180, (40, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(2, 60, (40, 2))], axis=1).astype(np.float32))
    shape = (150, 170)
    boxes = torch.stack([boxes[:, 0].clamp(0, 170), boxes[:, 1].clamp(0, 150), boxes[:, 2].clamp(0, 170),
                         boxes[:, 3].clamp(0, 150)], dim=1)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0] + 0.5) & (boxes[:, 3] > boxes[:, 1] + 0.5)]
    windows, oy, ox = paste_mask_windows(masks[:len(boxes)], boxes, shape)
    for k, box in enumerate(boxes.numpy()):
        want = np.zeros(shape, bool)
        want[oy[k]:oy[k] + windows.shape[1], ox[k]:ox[k] + windows.shape[2]] = windows[k].numpy()
        window, y, x = runner.paste(masks[k].numpy(), box, shape)
        got = np.zeros(shape, bool)
        got[y:y + window.shape[0], x:x + window.shape[1]] = window
        assert np.count_nonzero(got != want) <= 1, k  # float32 rounding at exactly 0.5, at most


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_export_agrees_with_the_predictor_on_the_sample(exported, backend):
    folder, want, image = exported
    meta = json.loads((folder / "model.json").read_text())
    assert meta["weights"] == {"onnx": "model.onnx", "torchscript": "model.ts"} and meta["opset"] >= 16
    start = time.perf_counter()
    labels, scores = runner.Segmenter(folder, backend)(image)
    seconds = time.perf_counter() - start
    gt = read_label_image(SAMPLE / "labels.tif")
    stats = _agreement(want.labels, labels)
    dsb_predictor, dsb_export = dsb_score(gt, want.labels), dsb_score(gt, labels)
    print(f"{backend}: {stats}, DSB {dsb_predictor:.4f} vs {dsb_export:.4f}, {seconds:.1f} s")
    assert stats["n_predictor"] > 50  # a real comparison, not a handful of nuclei
    assert abs(stats["count_ratio"] - 1) <= 0.01
    assert stats["median_iou"] >= 0.98
    assert abs(dsb_predictor - dsb_export) <= 0.01
    assert len(scores) == labels.max() and np.all(np.diff(scores) <= 0)  # ids 1..N by descending score
    with pytest.raises(ValueError, match="below 0.2, the lowest score the exported graph keeps"):
        runner.Segmenter(folder, backend)(image, score_thresh=0.1)


@pytest.mark.slow
def test_runner_runs_without_detectron2(exported, tmp_path):
    folder, want, image = exported
    np.save(tmp_path / "image.npy", image)
    script = tmp_path / "no_detectron2.py"
    script.write_text(NO_DETECTRON2)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for backend, out in (("onnx", tmp_path / "onnx.tif"), ("torchscript", tmp_path / "ts.npy")):
        done = subprocess.run([sys.executable, str(script), str(folder / "nucleus_runner.py"), str(folder),
                               str(tmp_path / "image.npy"), str(out), "--backend", backend],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        imported = done.stdout.strip().splitlines()[-1]
        assert "detectron2" not in imported and "nucleus_seg" not in imported, imported
        labels = tifffile.imread(out) if out.suffix == ".tif" else np.load(out)
        assert labels.dtype == np.uint16
        assert np.array_equal(labels, runner.Segmenter(folder, backend)(image)[0])
        assert _agreement(want.labels, labels)["median_iou"] >= 0.98


@pytest.mark.slow
def test_bioimageio_package_validates_and_reproduces_the_runner(exported, tmp_path):
    from bioimageio.spec import load_description

    folder, want, image = exported
    descr = load_description(folder / "bioimageio" / "rdf.yaml", perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format", descr.validation_summary.format()
    root = folder / "bioimageio"
    raw = np.load(root / str(descr.inputs[0].test_tensor.source))
    module = torch.jit.load(str(root / str(descr.weights.torchscript.source)))  # as bioimage.io consumers do
    with torch.no_grad():
        labels, scores = module(torch.from_numpy(raw))
    assert np.array_equal(labels.numpy(), np.load(root / str(descr.outputs[0].test_tensor.source)))
    assert labels.shape == (1, 1, *image.shape) and scores.shape == (1, int(labels.max()))
    stats = _agreement(want.labels, labels[0, 0].numpy())
    assert abs(stats["count_ratio"] - 1) <= 0.01 and stats["median_iou"] >= 0.98, stats


@pytest.mark.slow
def test_recipe_cascade_config_exports(tmp_path):
    """The recipe config (Cascade R-CNN heads, 40 px, diameter auto) exports to both formats, and the runner
    agrees with the predictor at the image's own scale (trimmed proposals to keep it short)."""
    config = "configs/nucleus_R101_FPN_synth_h100.yaml"
    opts = OPTS + ["MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "100"]
    weights = _random_weights(config, tmp_path / "random.pth", opts)
    assert export_main(["--config-file", config, "--format", "onnx,torchscript", "--output", str(tmp_path / "m"),
                        *opts, "MODEL.WEIGHTS", str(weights)]) == 0
    image = read_image(SAMPLE / "image.tif")
    cfg = get_nucleus_cfg(config, opts + ["MODEL.WEIGHTS", str(weights)])
    want = NucleusPredictor(cfg).predict_labels([image])[0]
    for backend in ("onnx", "torchscript"):
        stats = _agreement(want.labels, runner.Segmenter(tmp_path / "m", backend)(image, diameter=0)[0])
        print(f"cascade {backend}: {stats}")
        assert stats["n_predictor"] > 20
        assert abs(stats["count_ratio"] - 1) <= 0.01 and stats["median_iou"] >= 0.98, stats


@pytest.mark.slow
def test_an_empty_graph_output_gives_an_empty_label_image(tmp_path):
    """A score floor no detection reaches: the exported graph returns zero detections without failing (the
    ONNX GroupNorm of the mask head once could not). ResNet-50 backbone: the heads are what matter here."""
    config = "configs/nucleus_R101_FPN_cpu_demo.yaml"
    opts = OPTS + ["MODEL.RPN.POST_NMS_TOPK_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RESNETS.DEPTH", "50"]
    weights = _random_weights(config, tmp_path / "random.pth", opts)
    assert export_main(["--config-file", config, "--format", "onnx,torchscript", "--output", str(tmp_path / "m"),
                        "--score-floor", "0.999", *opts, "MODEL.WEIGHTS", str(weights)]) == 0
    for backend in ("onnx", "torchscript"):
        labels, scores = runner.Segmenter(tmp_path / "m", backend)(read_image(SAMPLE / "image.tif"))
        assert labels.shape == (512, 512) and labels.max() == 0 and len(scores) == 0, backend


@pytest.mark.parametrize("args, names", [
    (["--format", "onnx", "MODEL.WEIGHTS", "missing.pth"], "MODEL.WEIGHTS missing.pth"),
    (["--format", "tflite", "MODEL.WEIGHTS", "x.pth"], "--format"),
    (["--format", "onnx", "--opset", "13", "MODEL.WEIGHTS", "x.pth"], "--opset 13"),
    (["--format", "onnx"], "MODEL.WEIGHTS is empty"),
    (["--format", "onnx", "--config-file", "nope.yaml"], "--config-file nope.yaml"),
])
def test_cli_bad_input_is_one_line_and_status_2(args, names, tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    base = ["--config-file", "configs/nucleus_R101_FPN_cpu_demo.yaml", "--output", str(tmp_path / "out")]
    args = [str(tmp_path / a) if a == "x.pth" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(export_main(base + args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert names in err[-1], err


def test_cli_unreadable_checkpoint_names_it(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    status = export_main(["--config-file", "configs/nucleus_R101_FPN_cpu_demo.yaml", "--format", "onnx",
                          "--output", str(tmp_path / "out"), "MODEL.WEIGHTS", str(bad)])
    assert status == 2
    assert f"MODEL.WEIGHTS {bad}: cannot be loaded" in capsys.readouterr().err


def test_runner_typical_diameter_is_the_packages_on_an_even_count():
    """The ring and band widths come from the median instance: the lower one of an even count on both sides."""
    from nucleus_seg.inference.significance import typical_diameter

    area = np.array([0, 40, 10, 30, 20, 0])  # ids without pixels are left out
    assert runner._typical_diameter(area) == pytest.approx(typical_diameter(torch.from_numpy(area)))
    assert runner._typical_diameter(area) == pytest.approx(np.sqrt(4 * 20 / np.pi))


def test_runner_auto_scale_is_not_clipped_silently():
    """One pass's estimate is used as far as the package's limits; beyond them it is refused with a warning."""
    disc = lambda d: np.pi * d * d / 4  # noqa: E731
    assert runner.auto_scale([disc(8.0)] * 3 + [0], 40.0) == pytest.approx(5.0)  # x5: no clip at x4
    assert runner.auto_scale([], 40.0) == 1.0
    with pytest.warns(UserWarning, match="diameter 'auto' found 2.0 px"):
        assert runner.auto_scale([disc(2.0)], 40.0) == 1.0


def test_the_runner_names_a_pass_whose_nuclei_fill_the_graphs_cap():
    """The exported graph keeps at most TEST.DETECTIONS_PER_IMAGE whatever the image's size: a pass at that cap with
    every detection above the threshold may have lost nuclei, and says so (the graph's own outputs, not a model)."""
    import warnings

    segmenter = object.__new__(runner.Segmenter)
    segmenter.meta = {"detections_per_image": 3}
    boxes = np.array([[2, 2, 10, 10], [20, 20, 30, 30], [40, 5, 50, 15]], dtype=np.float32)
    masks = np.ones((3, 1, 28, 28), dtype=np.float32)
    norm = np.zeros((64, 64, 3), dtype=np.uint8)
    for scores, warned in (([0.9, 0.8, 0.7], True), ([0.9, 0.8, 0.3], False)):
        segmenter.net = lambda x, s=scores: [boxes, np.array(s, np.float32), np.zeros(3, np.int64), masks]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            windows, kept = segmenter.detect(norm, 1.0, 0.5)
        assert any("the most the exported graph keeps (TEST.DETECTIONS_PER_IMAGE 3)" in str(w.message)
                   for w in caught) == warned
        assert len(windows) == len(kept) == (3 if warned else 2)
