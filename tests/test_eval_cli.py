"""``nucleus-eval``: label-folder mode end to end, file matching, errors, and the baseline mode."""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import tifffile

from nucleus_seg.cli.evaluate import main
from nucleus_seg.evaluation.matching import dsb_score
from nucleus_seg.evaluation.runner import match_key
from nucleus_seg.structures import label_image_to_annotations

DOCUMENTED_KEYS = {
    "dataset",
    "dsb_score",
    "ap50",
    "ap75",
    "precision50",
    "recall50",
    "f1_50",
    "f1_75",
    "pq",
    "mean_matched_iou",
    "tp50",
    "fp50",
    "fn50",
    "n_images",
    "n_gt",
    "n_pred",
    "per_image",
    "iou_curve",
    "coco",
    "missing_pred",
    "unmatched_pred",
}


def blobs(seed: int, shape=(48, 64), n=6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        label[y : y + rng.integers(4, 9), x : x + rng.integers(4, 9)] = k * 7  # ids with gaps
    return label


def perturb(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.roll(label, int(rng.integers(-1, 2)), axis=1)
    out[rng.random(label.shape) < 0.03] = 0
    return out


@pytest.fixture
def label_folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    pairs = {}
    for i, (gt_name, pred_name, dtype) in enumerate(
        [
            ("a.tif", "a_cp_masks.png", np.uint16),  # Cellpose naming, 16-bit PNG
            ("b_labels.tif", "b_pred.tif", np.uint32),  # 32-bit ids
            ("c.png", "c.ome.tif", np.uint8),
        ]
    ):
        gt, pred = blobs(i), perturb(blobs(i), 100 + i)
        for name, label, folder in ((gt_name, gt, gt_dir), (pred_name, pred, pred_dir)):
            if name.endswith(".png"):
                cv2.imwrite(str(folder / name), label.astype(np.uint16 if dtype != np.uint8 else np.uint8))
            else:
                tifffile.imwrite(folder / name, label.astype(dtype))
        pairs[gt_name] = (gt, pred)
    tifffile.imwrite(gt_dir / "lonely.tif", blobs(9).astype(np.uint16))
    cv2.imwrite(str(pred_dir / "stray_masks.png"), blobs(8).astype(np.uint8))
    (gt_dir / "notes.txt").write_text("not an image")
    return gt_dir, pred_dir, pairs


def test_label_mode_writes_metrics_and_figures(label_folders, tmp_path, capsys):
    gt_dir, pred_dir, pairs = label_folders
    out = tmp_path / "out"
    argv = ["--gt", str(gt_dir), "--pred", str(pred_dir), "--output", str(out), "--num-worst", "2"]
    assert main(argv + ["--matched-only"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= DOCUMENTED_KEYS
    assert metrics["n_images"] == 3
    expected = {name: dsb_score(gt, pred) for name, (gt, pred) in pairs.items()}
    got = {row["file_name"].rsplit("/", 1)[-1]: row["dsb_score"] for row in metrics["per_image"]}
    assert got == pytest.approx(expected)
    assert metrics["dsb_score"] == pytest.approx(np.mean(list(expected.values())))
    assert metrics["n_gt"] == sum(len(np.unique(gt)) - 1 for gt, _ in pairs.values())
    assert [p.rsplit("/", 1)[-1] for p in metrics["missing_pred"]] == ["lonely.tif"]
    assert [p.rsplit("/", 1)[-1] for p in metrics["unmatched_pred"]] == ["stray_masks.png"]
    assert metrics["coco"] is None  # label images carry no scores
    for row in metrics["per_image"]:
        assert {"file_name", "dsb_score", "ap50", "f1_50", "pq", "n_gt", "n_pred"} <= set(row)
    worst = sorted(expected, key=expected.get)[:2]
    pngs = sorted(p.name for p in out.glob("worst_*.png"))
    assert len(pngs) == 2 and all(w.split(".")[0] in png for w, png in zip(worst, pngs))
    for png in ["curves.png", *pngs]:
        image = cv2.imread(str(out / png))
        assert image is not None and image.shape[0] > 100 and image.std() > 0
    assert "dsb_score=" in capsys.readouterr().out


def test_label_mode_scores_outlines_from_fiji_and_qupath_as_their_label_images(label_folders, tmp_path, capsys):
    """Ground truth as a Fiji ROI set and as QuPath GeoJSON (sized by the prediction's label image), predictions as
    GeoJSON against outline ground truth (sized by --images): the scores of the label images they outline."""
    from nucleus_seg.data.outlines import geojson_text, imagej_roi_zip, label_outlines

    _, _, pairs = label_folders
    folders = {name: tmp_path / f"outlines_{name}" for name in ("gt", "pred", "images")}
    for folder in folders.values():
        folder.mkdir()
    for k, (_, (gt, pred)) in enumerate(sorted(pairs.items())):
        stem = f"img{k}"
        outlines = label_outlines(gt)
        if k == 0:
            (folders["gt"] / f"{stem}_rois.zip").write_bytes(imagej_roi_zip(outlines))  # blocks: one piece each
        else:
            (folders["gt"] / f"{stem}.geojson").write_text(geojson_text(outlines, np.ones(gt.max())))
        if k == 2:  # outlines on both sides: the image gives the size
            (folders["pred"] / f"{stem}_nuclei.geojson").write_text(
                geojson_text(label_outlines(pred), np.ones(max(pred.max(), 1))))
            cv2.imwrite(str(folders["images"] / f"{stem}.png"), np.zeros(gt.shape, np.uint8))
        else:
            tifffile.imwrite(folders["pred"] / f"{stem}_labels.tif", pred.astype(np.uint16))
    out = tmp_path / "out"
    argv = ["--gt", str(folders["gt"]), "--pred", str(folders["pred"]), "--output", str(out)]
    assert main([*argv, "--images", str(folders["images"])]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = [dsb_score(gt, pred) for _, (gt, pred) in sorted(pairs.items())]
    assert [row["dsb_score"] for row in sorted(metrics["per_image"], key=lambda r: r["image_id"])] == (
        pytest.approx(expected))
    assert main([*argv, "--output", str(tmp_path / "out2")]) == 1  # outlines on both sides, no image: named
    assert "img2.geojson: outlines need the size of their image" in capsys.readouterr().err


def test_a_ground_truth_image_without_prediction_scores_as_all_missed(label_folders, tmp_path, capsys):
    """It scored 1.0 with one of three predictions present (only a warning): missing work is not a pass."""
    gt_dir, pred_dir, pairs = label_folders
    out = tmp_path / "out"
    assert main(["--gt", str(gt_dir), "--pred", str(pred_dir), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 ground-truth images have no prediction" in err and "lonely.tif" in err
    metrics = json.loads((out / "metrics.json").read_text())
    expected = [dsb_score(gt, pred) for gt, pred in pairs.values()] + [0.0]
    assert metrics["n_images"] == 4 and metrics["dsb_score"] == pytest.approx(np.mean(expected))
    lonely = [r for r in metrics["per_image"] if r["file_name"].endswith("lonely.tif")][0]
    assert lonely["dsb_score"] == 0 and lonely["fn50"] == len(np.unique(blobs(9))) - 1 and lonely["n_pred"] == 0
    for name in ("b_labels.tif", "c.png"):  # one prediction for three ground-truth images
        (gt_dir / name).rename(tmp_path / name)
        (pred_dir / {"b_labels.tif": "b_pred.tif", "c.png": "c.ome.tif"}[name]).unlink()
    assert main(["--gt", str(gt_dir), "--pred", str(pred_dir), "--output", str(out)]) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["dsb_score"] < 0.5


def test_label_images_with_negative_ids_are_named(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "x.tif", blobs(0).astype(np.int16))
    tifffile.imwrite(tmp_path / "pred" / "x.tif", -blobs(0).astype(np.int16))
    assert main(["--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--output", str(tmp_path)]) == 1
    assert f"{tmp_path / 'pred' / 'x.tif'}: label image holds negative ids" in capsys.readouterr().err


def test_label_mode_nothing_matched_exits_nonzero(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "x1.tif", blobs(0).astype(np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "y1.tif", blobs(0).astype(np.uint16))
    assert (
        main(
            [
                "--gt",
                str(tmp_path / "gt"),
                "--pred",
                str(tmp_path / "pred"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "no file in" in err and "x1.tif" in err and "y1.tif" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_label_mode_names_files_that_do_not_fit(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "x.tif", blobs(0).astype(np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "x_pred.tif", np.zeros((10, 10), np.uint16))
    assert (
        main(["--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--output", str(tmp_path)]) == 1
    )
    err = capsys.readouterr().err
    assert "x_pred.tif" in err and "x.tif" in err and "10x10" in err
    tifffile.imwrite(tmp_path / "pred" / "x_masks.tif", np.zeros((10, 10), np.uint16))
    assert (
        main(["--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--output", str(tmp_path)]) == 1
    )
    assert "both match the name 'x'" in capsys.readouterr().err


def test_unknown_dataset_is_named(tmp_path, capsys):
    rc = main(["--baseline", "watershed", "--dataset", "no_such_nuclei", "--output", str(tmp_path)])
    assert rc == 1 and "no_such_nuclei" in capsys.readouterr().err


def test_command_line_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--gt", str(tmp_path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "name, key",
    [
        ("img_01.tif", "img_01"),
        ("img_01_cp_masks.png", "img_01"),
        ("img_01_labels.tiff", "img_01"),
        ("img_01_pred_masks.TIF", "img_01"),
        ("img_01.ome.tif", "img_01"),
        ("masks.png", "masks"),
        ("cell_mask.png", "cell"),
        ("img_01_rois.zip", "img_01"),
        ("img_01_nuclei.geojson", "img_01"),
    ],
)
def test_match_key_drops_tool_suffixes(name, key):
    assert match_key(name) == key


@pytest.mark.parametrize("composite", [False, True])
def test_baseline_mode_on_a_registered_dataset(tmp_path, capsys, composite):
    """``--baseline watershed`` runs the classical pipeline over a dataset and writes the same outputs; on
    composites of a cytoplasm marker and the nuclei, INPUT.NORMALIZE.CHANNEL gives it the nuclei alone."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    yy, xx = np.mgrid[:64, :80]
    dicts = []
    for i, centres in enumerate([[(20, 20), (20, 37), (45, 60)], [(30, 40)]]):
        label = np.zeros((64, 80), np.int32)
        for k, (cy, cx) in enumerate(centres, start=1):
            label[((yy - cy) ** 2 + (xx - cx) ** 2 <= 81) & (label == 0)] = k
        image = ((label > 0) * 160 + 30).astype(np.uint8)
        path = tmp_path / f"img{i}.png"
        if composite:  # a bright cell body around no nucleus in channel 0, the nuclei in channel 1
            cytoplasm = np.where((yy - 50) ** 2 + (xx - 15) ** 2 <= 120, 220, 20).astype(np.uint8)
            path = path.with_suffix(".tif")
            tifffile.imwrite(path, np.stack([cytoplasm, image]), imagej=True, metadata={"axes": "CYX"})
        else:
            cv2.imwrite(str(path), image)
        dicts.append({"file_name": str(path), "image_id": i, "height": 64, "width": 80,
                      "annotations": label_image_to_annotations(label)})
    name = f"nucleus_cli_test_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["nucleus"])
    try:
        out = tmp_path / "out"
        argv = ["--baseline", "watershed", "--dataset", name, "--output", str(out), "--num-worst", "1"]
        if composite:  # every channel at once: the cell body is found as a nucleus too
            assert main(argv + ["INPUT.NORMALIZE.CHANNEL", "-1"]) == 0
            assert json.loads((out / name / "metrics.json").read_text())["fp50"] > 0
        assert main(argv + (["INPUT.NORMALIZE.CHANNEL", "1"] if composite else [])) == 0
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["n_gt"] == 4
    assert metrics["tp50"] == 4 and metrics["fp50"] == 0  # clean disks: the baseline finds all, split
    assert metrics["coco"]["segm"]["AP50"] == pytest.approx(100.0)
    assert (out / name / "curves.png").is_file() and len(list((out / name).glob("worst_01_*.png"))) == 1
    assert f"{name}: dsb_score=" in capsys.readouterr().out


@contextmanager
def random_model_and_dataset(tmp_path, config: str, opts: list[str]):
    """A random-weight checkpoint of ``config`` and a registered one-image 16-bit dataset with two nuclei."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model

    from nucleus_seg.config import get_nucleus_cfg

    DetectionCheckpointer(build_model(get_nucleus_cfg(config, opts)), save_dir=str(tmp_path)).save("random")
    label = np.zeros((72, 96), np.int32)
    label[10:30, 10:34] = 1
    label[40:60, 50:80] = 2
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, (label > 0).astype(np.uint16) * 3000 + 200)
    anns = label_image_to_annotations(label)
    name = f"nucleus_model_test_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(
        name, lambda: [{"file_name": str(path), "image_id": 0, "height": 72, "width": 96, "annotations": anns}])
    MetadataCatalog.get(name).set(thing_classes=["nucleus"])
    try:
        yield name, tmp_path / "random.pth"
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.slow
def test_model_mode_runs_the_predictor_on_a_dataset(tmp_path, capsys):
    """``--config-file F MODEL.WEIGHTS W``: the real R101-FPN (random weights, saved as a checkpoint)
    through NucleusPredictor and NucleusEvaluator on a non-square 16-bit image."""
    opts = [
        "MODEL.RPN.PRE_NMS_TOPK_TEST",
        "200",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "100",
        "TEST.DETECTIONS_PER_IMAGE",
        "50",
        "NUCLEUS.PREDICT.SCORE_THRESH",
        "0.0",
    ]
    config = "configs/nucleus_R101_FPN_cpu_demo.yaml"
    with random_model_and_dataset(tmp_path, config, opts) as (name, weights):
        out = tmp_path / "out"
        rc = main(
            [
                "--config-file",
                config,
                "--dataset",
                name,
                "--output",
                str(out),
                "MODEL.WEIGHTS",
                str(weights),
                *opts,
            ]
        )
    assert rc == 0
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert (metrics["n_images"], metrics["n_gt"]) == (1, 2)
    assert metrics["n_pred"] <= 50  # TEST.DETECTIONS_PER_IMAGE
    assert metrics["coco"]["segm"]["AP"] is not None  # defined: there is ground truth
    assert {"AP", "AP@100", "AP@1000"} <= set(metrics["coco"]["segm"])
    assert (out / name / "curves.png").is_file()
    assert f"{name}: dsb_score=" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("scale_to_diameter", [False, True])
def test_tune_scores_every_setting_and_writes_the_best_as_a_config(tmp_path, scale_to_diameter):
    """``--tune DIR``: one pass per diameter (for one-size-band models: their own up to the top of their scale
    jitter) plus a flip-TTA pass, every threshold and boundary level scored on each; DIR/tuned.yaml carries the
    best row's settings, and evaluating with it scores exactly the row (MIN_SIGNIFICANCE applied at each
    threshold as the predictor applies it)."""
    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.evaluation.tune import TUNE_DIAMETERS, TUNE_THRESHOLDS, TUNE_TTA_MARGIN, tune_boundary_levels

    opts = ["MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
            "TEST.DETECTIONS_PER_IMAGE", "50", "NUCLEUS.PREDICT.AMP", "False",
            "INPUT.NUCLEUS.SCALE_TO_DIAMETER", str(scale_to_diameter), "NUCLEUS.PREDICT.TRAIN_DIAMETER", "20.0",
            "INPUT.NUCLEUS.SCALE_RANGE", "(0.7, 1.4)", "NUCLEUS.PREDICT.MIN_SIGNIFICANCE", "2.0"]
    config = "configs/nucleus_R101_FPN_cpu_demo.yaml"
    levels = tune_boundary_levels(get_nucleus_cfg(config, opts))
    assert levels[0] == 0.0 and levels[1] > 0
    with random_model_and_dataset(tmp_path, config, opts) as (name, weights):
        out = tmp_path / "tune"
        rc = main(["--config-file", config, "--dataset", name, "--tune", str(out),
                   "MODEL.WEIGHTS", str(weights), *opts])
        assert rc == 0
        rc = main(["--config-file", str(out / "tuned.yaml"), "--dataset", name, "--output", str(tmp_path / "ev")])
    assert rc == 0
    result = json.loads((out / "tune.json").read_text())
    rows = result["rows"]
    diameters = (20.0, 24.0, 28.0) if scale_to_diameter else TUNE_DIAMETERS
    single = [(r["train_diameter"], r["score_thresh"], r["boundary_level"]) for r in rows if not r["tta"]]
    assert sorted(single) == sorted((d, t, b) for d in diameters for t in TUNE_THRESHOLDS for b in levels)
    tta = [r for r in rows if r["tta"]]
    assert len(tta) == len(TUNE_THRESHOLDS) * len(levels) and len({r["train_diameter"] for r in tta}) == 1
    best = result["best"]
    top_single = max(r["dsb_score"] for r in rows if not r["tta"])
    assert best["dsb_score"] >= top_single  # never worse than the best single pass
    if best["tta"]:
        assert best["dsb_score"] > top_single + TUNE_TTA_MARGIN
    tuned = get_nucleus_cfg(str(out / "tuned.yaml"))
    assert best["score_thresh"] == tuned.NUCLEUS.PREDICT.SCORE_THRESH
    assert best["tta"] == tuned.NUCLEUS.PREDICT.TTA
    assert best["boundary_level"] == tuned.NUCLEUS.PREDICT.BOUNDARY_LEVEL
    assert (-1.0 if best["train_diameter"] > 0 else 0.0) == tuned.NUCLEUS.PREDICT.DIAMETER
    if best["train_diameter"] > 0:
        assert best["train_diameter"] == tuned.NUCLEUS.PREDICT.TRAIN_DIAMETER
    assert str(weights) == tuned.MODEL.WEIGHTS
    scored = json.loads((tmp_path / "ev" / name / "metrics.json").read_text())
    assert scored["dsb_score"] == pytest.approx(best["dsb_score"], abs=1e-9)
