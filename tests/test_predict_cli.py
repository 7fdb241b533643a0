"""``nucleus-predict`` end to end (real R101-FPN, random init, tiny_cfg) and the output writers."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from nucleus_seg.cli.predict import main
from nucleus_seg.inference.outputs import (
    coco_fragment,
    coco_results,
    overlay_image,
    submission_lines,
    submission_rows,
    write_coco_json,
    write_label_tiff,
    write_measurements_csv,
    write_overlay_png,
    write_submission_csv,
)
from nucleus_seg.utils.files import atomic_path
from nucleus_seg.utils.rle import rle_decode

pytestmark = pytest.mark.filterwarnings("ignore:MODEL.WEIGHTS is empty")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def coco_id(out, stem):
    """The integer COCO image id nucleus-predict gave ``stem`` (coco_images.json)."""
    images = json.loads((out / "coco_images.json").read_text())
    (image,) = [i for i in images if Path(i["file_name"]).stem == stem]
    return image["id"]


def check_outputs_agree(out, stem, image_shape, submission, coco, image_id=None):
    """Label TIFF, measurements CSV, Kaggle rows and COCO entries describe the same nuclei."""
    with tifffile.TiffFile(out / f"{stem}_labels.tif") as tif:
        labels = tif.asarray()
        assert tif.is_imagej and labels.dtype == np.uint16  # opens as a label image in Fiji and napari
    assert labels.shape == image_shape
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    n = len(ids)
    np.testing.assert_array_equal(ids, np.arange(1, n + 1))
    rows = read_csv(out / f"{stem}_measurements.csv")
    assert [int(r["id"]) for r in rows] == ids.tolist()
    assert [int(r["area"]) for r in rows] == areas.tolist()
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    mine = [r for r in submission if r["ImageId"] == stem]
    if n == 0:
        assert mine == [{"ImageId": stem, "EncodedPixels": ""}]
    else:
        decoded = [rle_decode(r["EncodedPixels"], image_shape) for r in mine]
        assert len(decoded) == n
        assert (np.sum(decoded, axis=0) <= 1).all()  # no pixel in two nuclei
        for k, mask in enumerate(decoded, start=1):
            np.testing.assert_array_equal(mask, labels == k)
    image_id = coco_id(out, stem) if image_id is None else image_id
    entries = [e for e in coco if e["image_id"] == image_id]
    assert [e["area"] for e in entries] == areas.tolist()
    assert [e["score"] for e in entries] == scores
    overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
    assert overlay.shape == (*image_shape, 3)
    return n


def test_writers_agree_and_read_back(tmp_path):
    labels = np.zeros((40, 50), np.int32)
    labels[2:10, 3:9] = 1
    labels[20:30, 30:45] = 2
    labels[29:35, 10:12] = 3
    raw = np.random.default_rng(0).integers(0, 4000, (40, 50), dtype=np.uint16)
    scores = np.array([0.9, 0.8, 0.55], np.float32)
    out = tmp_path
    write_label_tiff(out / "a_labels.tif", labels)
    write_measurements_csv(out / "a_measurements.csv", labels, raw, scores)
    write_overlay_png(out / "a_overlay.png", np.zeros((40, 50, 3), np.uint8), labels)
    write_submission_csv(out / "submission.csv", [submission_lines(submission_rows("a", labels)),
                                                  submission_lines(submission_rows("b", labels * 0))])
    results = coco_results("a", labels, scores)
    write_coco_json(out / "coco_results.json", [coco_fragment(results[:1]), "", coco_fragment(results[1:])])
    assert (out / "coco_results.json").read_text() == json.dumps(results)  # the pieces join to the whole list
    submission = read_csv(out / "submission.csv")
    coco = json.loads((out / "coco_results.json").read_text())
    assert check_outputs_agree(out, "a", (40, 50), submission, coco, image_id="a") == 3
    assert submission[-1] == {"ImageId": "b", "EncodedPixels": ""}
    assert (out / "submission.csv").read_text().splitlines()[-1] == "b,"
    row = read_csv(out / "a_measurements.csv")[0]
    assert float(row["mean_intensity"]) == pytest.approx(raw[2:10, 3:9].mean(), abs=1e-3)
    assert int(float(row["max_intensity"])) == raw[2:10, 3:9].max()
    assert (float(row["centroid_y"]), float(row["centroid_x"])) == (5.5, 5.5)
    assert coco[1]["bbox"] == [30.0, 20.0, 15.0, 10.0]  # XYWH
    from pycocotools import mask as mask_util
    np.testing.assert_array_equal(mask_util.decode(coco[2]["segmentation"]), labels == 3)
    assert sorted(os.listdir(out)) == ["a_labels.tif", "a_measurements.csv", "a_overlay.png",
                                       "coco_results.json", "submission.csv"]  # no temp files left


def test_a_calibrated_image_gets_a_calibrated_label_tiff_and_areas_in_square_micrometres(tmp_path):
    from nucleus_seg.data.io import pixel_size_um

    labels = np.zeros((40, 50), np.int32)
    labels[2:10, 3:9] = 1
    labels[20:30, 30:45] = 2
    raw = np.full((40, 50), 100, np.uint16)
    write_label_tiff(tmp_path / "a_labels.tif", labels, (0.5, 0.25))
    assert pixel_size_um(tmp_path / "a_labels.tif") == pytest.approx((0.5, 0.25))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a_labels.tif"), labels)
    write_measurements_csv(tmp_path / "a.csv", labels, raw, [0.9, 0.8], (0.5, 0.25))
    write_measurements_csv(tmp_path / "b.csv", labels, raw, [0.9, 0.8])
    calibrated, plain = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert [float(r["area_um2"]) for r in calibrated] == [48 * 0.125, 150 * 0.125]
    assert float(calibrated[1]["diameter_um"]) == pytest.approx(2 * np.sqrt(150 * 0.125 / np.pi), rel=1e-5)
    assert [{k: v for k, v in r.items() if not k.endswith("um2") and k != "diameter_um"} for r in calibrated] == plain
    assert "area_um2" not in plain[0]


@pytest.mark.parametrize("dtype,channels", [(np.uint16, 0), (np.uint8, 3), (np.int16, 2), (np.float32, 0)])
def test_the_csvs_areas_centroids_boxes_and_intensities_are_skimages_to_the_bit(dtype, channels):
    """Touching speckled regions in pieces, ids with gaps, a pixel, the image's border; intensities of every
    channel, negative ones too: the same columns, values and types as skimage's regionprops_table."""
    from skimage.measure import regionprops_table

    from nucleus_seg.inference.outputs import region_basics

    rng = np.random.default_rng(7)
    labels = np.zeros((70, 90), np.int32)
    for label in rng.choice(np.arange(1, 80), 25, replace=False):
        y, x, h, w = rng.integers(0, 68), rng.integers(0, 88), rng.integers(1, 16), rng.integers(1, 16)
        patch = labels[y:y + h, x:x + w]
        patch[rng.random(patch.shape) < rng.uniform(0.3, 1.0)] = label
    labels[69, 0], labels[0, 89] = 97, 98
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else np.finfo(dtype)
    shape = labels.shape + ((channels,) if channels else ())
    raw = rng.uniform(max(info.min, -3000), min(info.max, 60000), shape).astype(dtype)
    props = ("label", "area", "centroid", "bbox", "intensity_mean", "intensity_max")
    want = regionprops_table(labels, intensity_image=raw, properties=props)
    got = region_basics(labels, raw)
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].dtype.kind == want[key].dtype.kind, key
        assert type(got[key].tolist()[0]) is type(want[key].tolist()[0]), key
    empty = region_basics(np.zeros((5, 5), np.int32), raw[:5, :5])
    assert all(len(v) == 0 for v in empty.values())


def test_the_csvs_eccentricity_is_skimages_for_every_kind_of_region():
    """Ellipses at every angle, a line (1), a pixel (0), a square, a region in two parts, ids with gaps."""
    from skimage.measure import regionprops_table

    from nucleus_seg.inference.outputs import eccentricities

    rng = np.random.default_rng(3)
    labels = np.zeros((200, 220), np.int32)
    yy, xx = np.mgrid[:200, :220]
    for k in range(1, 13):
        cy, cx, a, b, t = 20 + 15 * k, 20 + 14 * k, rng.uniform(3, 9), rng.uniform(2, 6), rng.uniform(0, np.pi)
        u, v = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t), -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        labels[((u / a) ** 2 + (v / b) ** 2 <= 1) & (labels == 0)] = 2 * k
    labels[5, 150:170] = 40
    labels[190, 5] = 41
    labels[0:4, 216:220] = 43
    labels[100:103, 200:203] = labels[110:112, 210:215] = 44
    table = regionprops_table(labels, properties=("label", "eccentricity"))
    got = eccentricities(labels, table["label"])
    np.testing.assert_allclose(got, table["eccentricity"], rtol=0, atol=1e-12)
    assert list(got[-4:-2]) == [1.0, 0.0]


@pytest.mark.parametrize("seed", range(3))
def test_the_csvs_axes_perimeter_and_circularity_are_skimages_and_imagejs(seed, tmp_path):
    """Axes and perimeters of touching speckled regions (pieces, holes, diagonal steps, the image's border) against
    skimage's regionprops; the CSV's circularity is 4 pi area / perimeter^2 capped at 1, as ImageJ's."""
    from skimage.measure import regionprops_table

    from nucleus_seg.inference.outputs import ellipse_axes, perimeters

    rng = np.random.default_rng(seed)
    labels = np.zeros((60, 70), np.int32)
    for label in rng.choice(np.arange(1, 60), 20, replace=False):
        y, x, h, w = rng.integers(0, 58), rng.integers(0, 68), rng.integers(1, 14), rng.integers(1, 14)
        patch = labels[y:y + h, x:x + w]
        patch[rng.random(patch.shape) < rng.uniform(0.3, 1.0)] = label
    labels[0, :] = 99  # a line along the border
    table = regionprops_table(labels, properties=("label", "perimeter", "axis_major_length", "axis_minor_length"))
    np.testing.assert_allclose(perimeters(labels, table["label"]), table["perimeter"], rtol=0, atol=1e-9)
    major, minor = ellipse_axes(labels, table["label"])
    np.testing.assert_allclose(major, table["axis_major_length"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(minor, table["axis_minor_length"], rtol=0, atol=1e-6)  # skimage: 2e-8 for 0
    write_measurements_csv(tmp_path / "m.csv", labels, np.ones(labels.shape, np.uint8), np.ones(99))
    rows = {int(r["id"]): r for r in read_csv(tmp_path / "m.csv")}
    for label, perimeter in zip(table["label"], table["perimeter"]):
        row = rows[int(label)]
        want = min(1.0, 4 * np.pi * int(row["area"]) / perimeter ** 2) if perimeter > 0 else 0.0
        assert float(row["circularity"]) == pytest.approx(want, abs=1e-4)
        assert float(row["perimeter"]) == pytest.approx(perimeter, abs=1e-4)


def test_the_csvs_solidity_is_skimages_to_the_bit_for_every_kind_of_region():
    """The convex areas behind the CSV's solidity, against skimage's hull images: random speckle (diagonal edges
    through pixel centres), dilated blobs, ids in several parts with gaps, a pixel, a line, regions on the border."""
    import cv2
    from skimage.measure import regionprops_table

    from nucleus_seg.inference.outputs import convex_areas

    rng = np.random.default_rng(5)
    checked = 0
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(4, 70, 2))
        speckle = rng.random((height, width)) < rng.uniform(0.05, 0.6)
        if trial % 3 == 0:
            labels = cv2.connectedComponents(speckle.astype(np.uint8), connectivity=8)[1]
        elif trial % 3 == 1:
            blobs = cv2.dilate(speckle.astype(np.uint8), np.ones((3, 3), np.uint8))
            labels = cv2.connectedComponents(blobs, connectivity=8)[1]
        else:
            labels = rng.integers(0, 7, (height, width)) * speckle  # ids in pieces, some missing
        labels[0, :] = 0 if trial % 2 else labels[0, :]
        table = regionprops_table(labels, properties=("label", "area", "area_convex", "solidity"))
        got = convex_areas(labels, table["label"])
        np.testing.assert_array_equal(got, table["area_convex"])
        np.testing.assert_array_equal(table["area"] / got, table["solidity"])
        shuffled = rng.permutation(len(got))
        np.testing.assert_array_equal(convex_areas(labels, table["label"][shuffled]), got[shuffled])
        checked += len(got)
    assert checked > 500
    line = np.zeros((9, 9), np.int32)
    line[4, 1:8], line[0, 0] = 1, 2
    np.testing.assert_array_equal(convex_areas(line, np.array([1, 2])), [7, 1])


def test_label_tiff_goes_uint32_past_65535_nuclei(tmp_path):
    labels = np.arange(300 * 300, dtype=np.int64).reshape(300, 300)
    write_label_tiff(tmp_path / "many.tif", labels)
    back = tifffile.imread(tmp_path / "many.tif")
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.csv"]


def test_overlay_outlines_each_nucleus():
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 1
    rgb = overlay_image(np.full((20, 20, 3), 7, np.uint8), labels)
    outline = (rgb == (255, 255, 0)).all(axis=2)
    assert outline[5, 5:15].all() and outline[5:15, 5].all() and not outline[10, 10] and not outline[0, 0]


def make_inputs(folder):
    from test_predictor import blobs

    folder.mkdir()
    tifffile.imwrite(folder / "gray16.tif", blobs((96, 112), np.uint16, seed=0))
    cv2.imwrite(str(folder / "rgb8.png"), blobs((80, 100), np.uint8, seed=1, channels=3))
    # past two tiles of 128 px on a side: tiled (3 tiles of 128); the others go through the model whole
    tifffile.imwrite(folder / "big.tif", blobs((100, 300), np.uint16, seed=2))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return {"gray16": (96, 112), "rgb8": (80, 100), "big": (100, 300)}


def test_cli_writes_every_good_image_and_fails_naming_the_corrupt_one(cli_cfg, tmp_path, capsys):
    shapes = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(out),
            "--tile", "96", "--overlap", "32", "--batch", "1", "--diameter", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 failed" in err
    # big.tif (10 tiles of 96 px: more than BATCHED_TILES batches of 1) went through predict_large, its tile
    # progress shown; gray16 and rgb8 (up to two tiles on a side) through the model whole
    assert "tiles" in err
    assert "gray16" not in err.split("failed:")[1]
    submission = read_csv(out / "submission.csv")
    coco = json.loads((out / "coco_results.json").read_text())
    # one row per nucleus, images in input order, every good image present
    assert list(dict.fromkeys(r["ImageId"] for r in submission)) == ["big", "gray16", "rgb8"]
    counts = {stem: check_outputs_agree(out, stem, shape, submission, coco) for stem, shape in shapes.items()}
    assert sum(counts.values()) > 0
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))  # nothing half-written

    # --resume: nothing is predicted again (no model is even built), per-run files are rebuilt alike
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "submission.csv").unlink()
    (out / "coco_results.json").unlink()
    os.remove(tmp_path / "in" / "broken.png")
    assert main(argv + ["--resume"]) == 0
    for name, mtime in before.items():
        if name not in ("submission.csv", "coco_results.json", "coco_images.json"):
            assert (out / name).stat().st_mtime_ns == mtime
    assert read_csv(out / "submission.csv") == submission
    assert json.loads((out / "coco_results.json").read_text()) == coco


def test_cli_resume_redoes_only_missing_images_and_takes_globs_and_opts(cli_cfg, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint16))  # blank: no nuclei at all
    cv2.imwrite(str(tmp_path / "b.png"), np.full((48, 64), 200, np.uint8))
    out = tmp_path / "out"
    argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "*.tif"), str(tmp_path / "b.png"),
            "--output", str(out), "--formats", "labels,csv,submission", "NUCLEUS.PREDICT.SCORE_THRESH", "0.3"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_labels.tif", "a_measurements.csv", "b_labels.tif", "b_measurements.csv", "submission.csv"]
    first = (out / "b_labels.tif").stat().st_mtime_ns
    (out / "a_labels.tif").unlink()
    assert main(argv + ["--resume"]) == 0
    assert (out / "b_labels.tif").stat().st_mtime_ns == first
    assert (out / "a_labels.tif").exists()
    rows = read_csv(out / "submission.csv")
    assert {r["ImageId"] for r in rows} == {"a", "b"}


def test_cli_writes_outlines_for_fiji_and_qupath_on_request(cli_cfg, tmp_path):
    """--formats rois,geojson: per image an ImageJ ROI set and a GeoJSON file whose outlines enclose exactly the
    label image's nuclei, named by id, with the CSV's scores; the default formats write neither. A calibrated
    image (ImageJ metadata) gets a calibrated label TIFF and areas in square micrometres."""
    from test_outlines import pixels_inside
    from test_predictor import blobs

    from nucleus_seg.data.io import pixel_size_um

    tifffile.imwrite(tmp_path / "cells.tif", blobs((96, 112), np.uint16, seed=0), imagej=True,
                     resolution=(1 / 0.325, 1 / 0.325), metadata={"unit": "micron"})  # as Fiji saves it
    tifffile.imwrite(tmp_path / "blank.tif", np.zeros((64, 64), np.uint16))
    out = tmp_path / "out"
    argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "*.tif"), "--output", str(out),
            "--formats", "labels,csv,rois,geojson", "--diameter", "0"]
    assert main(argv) == 0
    for stem in ("cells", "blank"):
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        ids = sorted(set(np.unique(labels).tolist()) - {0})
        assert ids or stem == "blank"
        scores = {int(r["id"]): float(r["score"]) for r in read_csv(out / f"{stem}_measurements.csv")}
        archive = zipfile.ZipFile(out / f"{stem}_rois.zip")
        assert archive.namelist() == [f"{i:04d}.roi" for i in ids]
        features = json.loads((out / f"{stem}_nuclei.geojson").read_text())["features"]
        assert [int(f["properties"]["name"]) for f in features] == ids
        for feature, label in zip(features, ids):
            geometry = feature["geometry"]
            polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
            np.testing.assert_array_equal(pixels_inside(polygons, labels.shape), labels == label)
            assert feature["properties"]["measurements"]["score"] == pytest.approx(scores[label], abs=1e-6)
    assert pixel_size_um(out / "cells_labels.tif") == pytest.approx((0.325, 0.325))  # Fiji opens it calibrated
    rows = read_csv(out / "cells_measurements.csv")
    assert [float(r["area_um2"]) for r in rows] == pytest.approx([int(r["area"]) * 0.325 ** 2 for r in rows],
                                                                 rel=1e-5)  # 6 significant digits
    assert pixel_size_um(out / "blank_labels.tif") is None and "area_um2" not in (out / "blank_measurements.csv"
                                                                                  ).read_text()
    default = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "blank.tif"), "--output", str(tmp_path / "d")]
    assert main(default) == 0
    assert sorted(p.name for p in (tmp_path / "d").glob("blank_*")) == [
        "blank_labels.tif", "blank_measurements.csv", "blank_overlay.png"]


def test_exclude_edges_and_min_area_leave_those_nuclei_out_of_every_output(cli_cfg, tmp_path):
    """The same run with --exclude-edges --min-area 40: each image's labels are the plain run's without the nuclei
    touching its border or under 40 px (a whole image and a tiled one, stitched by the writers), and every output
    agrees with them."""
    from nucleus_seg.inference.tiling import LabelPrediction, NucleusFilter

    shapes = make_inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").unlink()
    del shapes["rgb8"]
    (tmp_path / "in" / "rgb8.png").unlink()
    argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--tile", "96", "--overlap", "32",
            "--diameter", "0", "MODEL.WEIGHTS", str(random_weights(cli_cfg, tmp_path))]
    assert main([*argv, "--output", str(tmp_path / "all")]) == 0
    assert main([*argv, "--output", str(tmp_path / "inner"), "--exclude-edges", "--min-area", "40"]) == 0
    out = tmp_path / "inner"
    submission = read_csv(out / "submission.csv")
    coco = json.loads((out / "coco_results.json").read_text())
    dropped = 0
    for stem, shape in shapes.items():
        every = tifffile.imread(tmp_path / "all" / f"{stem}_labels.tif")
        rows = read_csv(tmp_path / "all" / f"{stem}_measurements.csv")
        scores = np.array([float(r["score"]) for r in rows], np.float32)
        want = NucleusFilter(True, 40)(LabelPrediction(every, scores, np.zeros((len(scores), 4), np.float32)))
        got = tifffile.imread(out / f"{stem}_labels.tif")
        np.testing.assert_array_equal(got, want.labels)
        edge = np.concatenate([got[0], got[-1], got[:, 0], got[:, -1]])
        assert not edge.any() and every.max() > got.max() > 0 and np.bincount(got.ravel())[1:].min() >= 40
        dropped += int(every.max()) - int(got.max())
        check_outputs_agree(out, stem, shape, submission, coco, image_id=coco_id(out, stem))
    assert dropped > 0


def test_a_diameter_in_micrometres_is_each_images_diameter_in_pixels_by_its_pixel_size(cli_cfg, tmp_path, capsys):
    """--diameter 12um on images of 0.5 and 0.25 um pixels predicts them as --diameter 24 and --diameter 48 do;
    an image without a pixel size fails, saying what to give instead; the other images are written."""
    from test_predictor import blobs

    weights = ["MODEL.WEIGHTS", str(random_weights(cli_cfg, tmp_path))]
    sizes = {"coarse": 0.5, "fine": 0.25}
    for stem, size in sizes.items():
        tifffile.imwrite(tmp_path / f"{stem}.tif", blobs((96, 112), np.uint16, seed=len(stem)), imagej=True,
                         resolution=(1 / size, 1 / size), metadata={"unit": "um"})
    tifffile.imwrite(tmp_path / "plain.tif", blobs((64, 64), np.uint16, seed=9))
    base = ["--config-file", str(cli_cfg), "--formats", "labels"]
    assert main([*base, "--input", str(tmp_path / "*.tif"), "--output", str(tmp_path / "um"), "--diameter",
                 "12um", *weights]) == 1
    assert "plain.tif: --diameter 12um needs the image's pixel size" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "um").iterdir()) == ["coarse_labels.tif", "fine_labels.tif"]
    for stem, size in sizes.items():
        out = tmp_path / stem
        assert main([*base, "--input", str(tmp_path / f"{stem}.tif"), "--output", str(out), "--diameter",
                     str(12 / size), *weights]) == 0
        got = tifffile.imread(tmp_path / "um" / f"{stem}_labels.tif")
        np.testing.assert_array_equal(got, tifffile.imread(out / f"{stem}_labels.tif"))
        assert got.max() > 0
    with pytest.raises(SystemExit) as exc:
        main([*base, "--input", str(tmp_path / "fine.tif"), "--output", str(tmp_path / "x"), "--diameter", "0um"])
    assert exc.value.code == 2 and "above 0" in capsys.readouterr().err


def test_cli_bad_command_lines(cli_cfg, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config-file", str(cli_cfg), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
              "--formats", "labels,pdf"])
    assert exc.value.code == 2 and "pdf" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    cv2.imwrite(str(tmp_path / "x" / "same.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "y" / "same.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(SystemExit) as exc:
        main(["--config-file", str(cli_cfg), "--input", str(tmp_path / "x"), str(tmp_path / "y"),
              "--output", str(tmp_path / "o")])
    assert exc.value.code == 2 and "same" in capsys.readouterr().err


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "nucleus_seg" in out and "detectron2" in out and "torch" in out


def random_weights(cfg_file, folder):
    """A checkpoint of the config's model with seeded random weights: every run predicts alike."""
    import torch
    from detectron2.modeling import build_model

    from nucleus_seg.config import get_nucleus_cfg

    torch.manual_seed(0)
    path = folder / "weights.pth"
    torch.save({"model": build_model(get_nucleus_cfg(str(cfg_file))).state_dict()}, path)
    return path


@pytest.mark.slow
def test_sharded_two_process_run_writes_what_one_process_writes(cli_cfg, tmp_path, capsys):
    """--num-gpus 2 through detectron2's launch (gloo ranks on CPU): each image is predicted by one rank,
    per-run files are assembled in input order, failures are gathered: the outputs equal a 1-process run."""
    weights = random_weights(cli_cfg, tmp_path)
    make_inputs(tmp_path / "in")
    runs = {}
    for gpus in (1, 2):
        out = tmp_path / f"out{gpus}"
        argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(out),
                "--tile", "128", "--overlap", "32", "--batch", "2", "--diameter", "0", "--num-gpus", str(gpus),
                "--exclude-edges", "MODEL.WEIGHTS", str(weights)]  # the ranks get every setting of the run
        assert main(argv) == 1  # broken.png fails in either case, named in the summary
        assert "broken.png" in capsys.readouterr().err.split("failed:")[1]
        runs[gpus] = out
    names = sorted(p.name for p in runs[1].iterdir())
    assert names == sorted(p.name for p in runs[2].iterdir())  # no hand-off file left behind
    for name in names:
        a, b = runs[1] / name, runs[2] / name
        if name.endswith(".tif"):
            assert np.array_equal(tifffile.imread(a), tifffile.imread(b)), name
        elif name.endswith(".png"):
            assert np.array_equal(cv2.imread(str(a)), cv2.imread(str(b))), name
        else:
            assert a.read_text() == b.read_text(), name
    assert read_csv(runs[2] / "submission.csv")  # and there is something to compare
    labels = tifffile.imread(runs[2] / "big_labels.tif")
    assert not np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).any()


def test_writer_processes_write_what_the_predicting_process_writes(cli_cfg, tmp_path, capsys):
    """NUCLEUS.PREDICT.WRITERS 2 (each image's files written by spawned processes while the next batch is
    predicted), with STREAMS 2 (big.tif's tile batches two at a time on their own threads), leaves the same
    files and the same failures as doing it all in the predicting process: a read failure (broken.png) and a
    write failure in a worker (an obstacle where gray16's overlay goes)."""
    weights = random_weights(cli_cfg, tmp_path)
    make_inputs(tmp_path / "in")
    runs, failures = {}, {}
    for writers in (0, 2):
        out = tmp_path / f"out{writers}"
        (out / "gray16_overlay.png").mkdir(parents=True)  # the write of that file fails
        argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(out),
                "--tile", "128", "--overlap", "32", "--batch", "1", "--diameter", "0",
                "MODEL.WEIGHTS", str(weights), "NUCLEUS.PREDICT.WRITERS", str(writers),
                "NUCLEUS.PREDICT.STREAMS", "2" if writers else "1"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert ("by 2 writer processes" in err) == (writers == 2)
        summary = re.search(r"(\d+) of (\d+) images have outputs in .* \(([0-9.]+) s, ([0-9.]+) images/s\)", err)
        done, total, seconds, rate = (float(v) for v in summary.groups())  # the time it took, and the rate
        # the rate from the unrounded time: within what the time's 0.1 s rounding and the rate's 0.01 allow
        assert done < total and seconds > 0
        assert done / (seconds + 0.05) - 0.005 <= rate <= done / max(seconds - 0.05, 1e-9) + 0.005
        failures[writers] = sorted(line.strip().split(":")[0] for line in err.split("failed:")[1].strip().splitlines())
        runs[writers] = out
    assert failures[0] == failures[2] == sorted([str(tmp_path / "in" / "broken.png"),
                                                  str(tmp_path / "in" / "gray16.tif")])
    names = sorted(p.name for p in runs[0].iterdir())
    assert names == sorted(p.name for p in runs[2].iterdir())
    assert "rgb8_measurements.csv" in names and "big_overlay.png" in names
    for name in names:
        a, b = runs[0] / name, runs[2] / name
        if a.is_dir():
            continue
        assert a.read_bytes() == b.read_bytes(), name
    # gray16 failed, so the per-run files hold the other two images only
    assert {r["ImageId"] for r in read_csv(runs[2] / "submission.csv")} <= {"big", "rgb8"}


def test_coco_results_load_against_ground_truth_built_from_the_labels(cli_cfg, tmp_path):
    """Integer image ids, and coco_images.json is the ground truth's ``images`` list: COCO.loadRes takes the
    results (a file-stem id made loadRes refuse them: 'Results do not correspond to current coco set')."""
    from pycocotools.coco import COCO

    from nucleus_seg.evaluation.coco import dataset_dicts_to_coco
    from nucleus_seg.structures import label_image_to_annotations

    make_inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").unlink()
    out = tmp_path / "out"
    assert main(["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(out),
                 "--tile", "128", "--diameter", "0"]) == 0
    images = json.loads((out / "coco_images.json").read_text())
    assert [i["id"] for i in images] == [1, 2, 3]
    assert [i["file_name"] for i in images] == ["big.tif", "gray16.tif", "rgb8.png"]
    records = [{"image_id": i["id"], "file_name": i["file_name"], "height": i["height"], "width": i["width"],
                "annotations": label_image_to_annotations(
                    tifffile.imread(out / f"{Path(i['file_name']).stem}_labels.tif"))} for i in images]
    gt = COCO()
    gt.dataset = dataset_dicts_to_coco(records)
    gt.createIndex()
    results = json.loads((out / "coco_results.json").read_text())
    assert results and all(isinstance(r["image_id"], int) for r in results)
    loaded = gt.loadRes(results)
    assert len(loaded.getAnnIds()) == len(results)


def test_a_run_on_a_subset_keeps_the_other_images_and_an_empty_run_writes_nothing(cli_cfg, tmp_path, capsys):
    shapes = make_inputs(tmp_path / "in")
    (tmp_path / "in" / "broken.png").unlink()
    out = tmp_path / "out"
    base = ["--config-file", str(cli_cfg), "--output", str(out), "--tile", "128", "--diameter", "0",
            "MODEL.WEIGHTS", str(random_weights(cli_cfg, tmp_path))]
    assert main(base + ["--input", str(tmp_path / "in")]) == 0
    full = {n: (out / n).read_bytes() for n in ("submission.csv", "coco_results.json", "coco_images.json")}
    assert main(base + ["--input", str(tmp_path / "typo" / "*.tif")]) == 1  # matches nothing
    assert "matches no files" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in full} == full  # untouched
    assert main(base + ["--input", str(tmp_path / "in" / "gray16.tif")]) == 0  # a subset, predicted again
    assert {n: (out / n).read_bytes() for n in full} == full  # same weights: the same merged files
    submission = read_csv(out / "submission.csv")
    coco = json.loads((out / "coco_results.json").read_text())
    for stem, shape in shapes.items():
        check_outputs_agree(out, stem, shape, submission, coco)


def test_bad_values_and_an_unwritable_output_fail_before_any_compute(cli_cfg, tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((16, 16), np.uint8))
    base = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "a.png")]
    for flags, named in ((["--tile", "0"], "--tile"), (["--score-thresh", "5"], "--score-thresh"),
                         (["--diameter", "-3"], "--diameter"), (["--overlap", "600"], "--overlap"),
                         (["--batch", "-1"], "--batch")):
        with pytest.raises(SystemExit) as exc:
            main(base + ["--output", str(tmp_path / "o")] + flags)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and named in err and "Traceback" not in err, flags
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(SystemExit) as exc:
        main(base + ["--output", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not writable" in err and str(tmp_path / "file" / "out") in err
    assert not (tmp_path / "o").exists()  # nothing was written for the refused runs


def test_auto_diameter_counts_the_same_nuclei_as_the_python_api(cli_cfg, tmp_path):
    """With DIAMETER_SCORE_THRESH below SCORE_THRESH (the R18 demo config: 0.5 and 0.6), nucleus-predict's
    box-head floor used to drop the nuclei the "auto" estimate counts between the two: its diameter, and so its
    labels, differed from NucleusPredictor's on the same image and config."""
    import torch
    from test_predictor import blobs

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference.predictor import NucleusPredictor

    weights = random_weights(cli_cfg, tmp_path)
    image = blobs((96, 112), np.uint16, seed=0)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "plate.tif", image)
    opts = ["MODEL.WEIGHTS", str(weights), "NUCLEUS.PREDICT.SCORE_THRESH", "0.5",
            "NUCLEUS.PREDICT.DIAMETER_SCORE_THRESH", "0.3", "NUCLEUS.PREDICT.DIAMETER", "-1.0"]
    assert main(["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--formats", "labels", *opts]) == 0
    torch.manual_seed(0)
    predictor = NucleusPredictor(get_nucleus_cfg(str(cli_cfg), opts))
    expected = predictor.predict_labels([image])[0]
    assert predictor.last_scales[0].scale != 1.0  # the estimate did rescale: what is compared matters
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "plate_labels.tif"), expected.labels)


def test_writer_processes_start_before_the_first_image(tmp_path):
    """``start()`` spawns every writer at once, so their imports (~4 s) overlap the model's build and load
    instead of stalling the first batch; closing stops them."""
    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference.batch import ImageWriter, PredictionRun

    writer = ImageWriter(PredictionRun(tmp_path, {"labels"}), get_nucleus_cfg(), 2)
    with writer:
        writer.start()  # returns while the forkserver imports; its forks are asked for on a thread
        writer._wait_for_forks()
        processes = list(writer.pool._processes.values())
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    assert writer.pool is None and not any(p.is_alive() for p in processes)


def test_images_wait_for_the_writers_beyond_twice_their_count_only_when_they_hold_much_memory(tmp_path, monkeypatch):
    """While the writers start up the model goes on: past ``2 x workers`` images the predicting process waits for
    the oldest only once the waiting images hold ``PENDING_BYTES``; written ones leave the count; every file is
    written either way."""
    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference import batch
    from nucleus_seg.inference.tiling import LabelPrediction

    raw = np.zeros((32, 32), np.uint16)
    pred = LabelPrediction(np.zeros((32, 32), np.int32), np.zeros(0, np.float32), np.zeros((0, 4), np.float32))
    size = batch.held_bytes(raw, pred)
    assert size == raw.nbytes + pred.labels.nbytes
    for budget in (10**9, 0):
        out = tmp_path / str(budget)
        out.mkdir()
        monkeypatch.setattr(batch, "PENDING_BYTES", budget)
        run = batch.PredictionRun(out, {"labels"})
        with batch.ImageWriter(run, get_nucleus_cfg(), 1) as writer:
            for i in range(8):
                writer.submit(out / f"im{i}.tif", raw, pred)
                assert writer.pending_bytes == size * len(writer.pending)
                assert budget or len(writer.pending) <= 2  # no memory to spare: twice the writers at most
        assert budget == 0 or writer.waited == 0  # the count alone never stops the model
        assert run.written == {f"im{i}" for i in range(8)} and len(list(out.glob("*_labels.tif"))) == 8


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no forkserver here")
def test_the_model_goes_on_while_the_writers_are_forked_and_they_then_write_every_image(tmp_path, monkeypatch):
    """Images handed over while the forkserver still imports wait in the predicting process (it used to stop there:
    ~1.4 s of a 3.5 s run here, likely most of a fresh process's first ~10 s on a GPU host); then the writers get
    them, in order, and write them all. The forks are held back here until three images are in."""
    import threading

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference import batch
    from nucleus_seg.inference.tiling import LabelPrediction

    forks_may_start = threading.Event()
    fork_all = batch.ImageWriter._fork_all

    def held_back(self):
        forks_may_start.wait(60)
        fork_all(self)

    monkeypatch.setattr(batch, "writer_context", lambda: multiprocessing.get_context("forkserver"))
    monkeypatch.setattr(batch.ImageWriter, "_fork_all", held_back)
    raw = np.zeros((16, 16), np.uint16)
    pred = LabelPrediction(np.ones((16, 16), np.int32), np.ones(1, np.float32), np.zeros((1, 4), np.float32))
    run = batch.PredictionRun(tmp_path, {"labels"})
    with batch.ImageWriter(run, get_nucleus_cfg(), 1) as writer:
        writer.start()
        for i in range(3):
            writer.submit(tmp_path / f"im{i}.tif", raw, pred)  # returns: the forks are still held back
        assert [path.name for path, _, _ in writer.early] == ["im0.tif", "im1.tif", "im2.tif"]
        assert writer.early_bytes == 3 * batch.held_bytes(raw, pred) and not writer.pending and not run.written
        forks_may_start.set()
        writer.submit(tmp_path / "im3.tif", raw, pred)  # held too while the forks run, or handed over after them
    assert not writer.early and not writer.pending  # closing waited for the forks and gave the writers every image
    assert run.written == {"im0", "im1", "im2", "im3"} and not run.failures
    assert len(list(tmp_path.glob("*_labels.tif"))) == 4


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no forkserver here")
def test_writers_that_cannot_be_forked_leave_the_writing_to_the_predicting_process(tmp_path, monkeypatch, caplog):
    """The forks are asked for on a thread (the forkserver imports first); one that fails there is reported where
    the pool is next used, and every image is still written."""
    import logging

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference import batch
    from nucleus_seg.inference.tiling import LabelPrediction

    def no_processes(self):
        raise OSError("no processes today")

    monkeypatch.setattr(batch, "writer_context", lambda: multiprocessing.get_context("forkserver"))
    monkeypatch.setattr(batch.ImageWriter, "_start_all", no_processes)
    raw = np.zeros((16, 16), np.uint16)
    pred = LabelPrediction(np.ones((16, 16), np.int32), np.ones(1, np.float32), np.zeros((1, 4), np.float32))
    run = batch.PredictionRun(tmp_path, {"labels"})
    with caplog.at_level(logging.WARNING, logger="nucleus_seg"), batch.ImageWriter(run, get_nucleus_cfg(), 2) as writer:
        writer.start()
        for i in range(3):
            writer.submit(tmp_path / f"im{i}.tif", raw, pred)
    assert writer.pool is None and writer.workers == 0
    assert "no writer processes (no processes today)" in caplog.text
    assert run.written == {"im0", "im1", "im2"} and not run.failures


def test_an_image_up_to_two_tiles_on_a_side_gets_the_labels_of_the_python_api(cli_cfg, tmp_path):
    """nucleus-predict sends such an image through the model whole, as NucleusPredictor does (it used to tile it
    into nine overlapping tiles at 1024 px: 2.3x the model pixels, and labels that differed from the API's)."""
    import torch
    from test_predictor import blobs

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.inference.predictor import NucleusPredictor

    weights = random_weights(cli_cfg, tmp_path)
    images = {"a": blobs((150, 250), np.uint16, seed=4), "b": blobs((150, 250), np.uint16, seed=5)}
    (tmp_path / "in").mkdir()
    for name, image in images.items():
        tifffile.imwrite(tmp_path / "in" / f"{name}.tif", image)
    opts = ["MODEL.WEIGHTS", str(weights), "NUCLEUS.PREDICT.TILE_SIZE", "128", "NUCLEUS.PREDICT.DIAMETER", "0.0"]
    assert main(["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--formats", "labels", *opts]) == 0
    torch.manual_seed(0)
    predictor = NucleusPredictor(get_nucleus_cfg(str(cli_cfg), opts))
    seen = []
    real = predictor.model.inference
    predictor.model.inference = lambda inputs, **kw: seen.extend(x["image"].shape[1:] for x in inputs) or real(
        inputs, **kw)
    expected = predictor.predict_labels(list(images.values()))
    assert [tuple(s) for s in seen] == [(150, 250)] * 2  # whole, both in one forward (under 16 tiles of pixels)
    assert any(e.labels.max() > 0 for e in expected)
    for (name, _), want in zip(images.items(), expected):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / f"{name}_labels.tif"), want.labels)


def test_channel_picks_the_nuclear_stain_of_an_imagej_composite(cli_cfg, tmp_path, capsys):
    """``--channel 1`` on a two-channel ImageJ composite (stored channels first) gives the labels of that channel
    saved alone; the measurements keep one intensity column per channel; an image without the channel fails by
    name while the others are written."""
    from test_predictor import blobs

    weights = random_weights(cli_cfg, tmp_path)
    nuclei, cytoplasm = blobs((96, 112), np.uint16, seed=3), blobs((96, 112), np.uint16, seed=8)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "composite.tif", np.stack([cytoplasm, nuclei]), imagej=True,
                     metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "in" / "nuclei.tif", np.stack([nuclei, nuclei], axis=-1))
    tifffile.imwrite(tmp_path / "in" / "gray.tif", nuclei)  # one channel: it has no channel 1
    out = tmp_path / "out"
    argv = ["--config-file", str(cli_cfg), "--input", str(tmp_path / "in"), "--output", str(out), "--channel", "1",
            "--formats", "labels,csv", "MODEL.WEIGHTS", str(weights), "NUCLEUS.PREDICT.DIAMETER", "0.0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"gray\.tif: the image has 1 channel \(0-0\): it has no channel 1", err), err
    labels = tifffile.imread(out / "composite_labels.tif")
    np.testing.assert_array_equal(labels, tifffile.imread(out / "nuclei_labels.tif"))
    assert labels.max() > 0
    rows = read_csv(out / "composite_measurements.csv")
    assert {"mean_intensity_c0", "mean_intensity_c1"} <= set(rows[0])
    # the intensities are each channel's own: channel 1 is the nuclear stain the labels came from
    first = labels == 1
    assert float(rows[0]["mean_intensity_c1"]) == pytest.approx(nuclei[first].mean(), rel=1e-6)
    assert float(rows[0]["mean_intensity_c0"]) == pytest.approx(cytoplasm[first].mean(), rel=1e-6)
    with pytest.raises(SystemExit) as exc:
        main(argv[:-4] + ["--channel", "-2"])
    assert exc.value.code == 2 and "--channel -2" in capsys.readouterr().err
