"""Command-line users name datasets by path (FOLDER, FOLDER@train/@val, a COCO JSON)."""

from __future__ import annotations

import json

import pytest
from detectron2.data import DatasetCatalog

from nucleus_seg.cli.evaluate import main as eval_main
from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.catalog import dataset_dirname, register_datasets_from_cfg
from nucleus_seg.data.synth import write_dataset


@pytest.fixture(scope="module")
def dsb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab") / "stage1_train"
    write_dataset(root, 3, size=96, seed=5, progress=False, workers=1)
    return root


def test_path_names_register_and_unknown_names_fail(dsb_folder):
    cfg = get_nucleus_cfg("nucleus_R101_FPN_cpu_demo.yaml")
    cfg.DATASETS.TRAIN = (str(dsb_folder),)
    cfg.DATASETS.TEST = (f"{dsb_folder}@val",)
    register_datasets_from_cfg(cfg)  # registration is lazy, as detectron2's; loading reads the folder
    assert len(DatasetCatalog.get(str(dsb_folder))) == 3
    with pytest.raises(ValueError, match="validation ids"):  # a split needs Matterport's 25 val ids
        DatasetCatalog.get(f"{dsb_folder}@val")
    cfg.DATASETS.TEST = (str(dsb_folder / "missing"),)
    with pytest.raises(KeyError, match="missing"):
        register_datasets_from_cfg(cfg)


def test_eval_on_a_path_dataset_writes_under_a_safe_folder(dsb_folder, tmp_path):
    out = tmp_path / "eval"
    code = eval_main(["--baseline", "watershed", "--config-file", "nucleus_R101_FPN_cpu_demo.yaml",
                      "--dataset", str(dsb_folder), "--output", str(out)])
    assert code == 0
    metrics = json.loads((out / dataset_dirname(str(dsb_folder)) / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and metrics["n_gt"] > 0
    assert "/" not in dataset_dirname(str(dsb_folder))


def test_zoomed_names_rescale_images_and_labels(dsb_folder, tmp_path, monkeypatch):
    """NAME@xZ: the base's nuclei, each Z^2 as large, on an image Z times the size; x1 is the base itself."""
    import numpy as np

    from nucleus_seg.data.io import read_image
    from nucleus_seg.structures import gt_label_image

    monkeypatch.setenv("NUCLEUS_DATASETS", str(tmp_path / "roots"))
    cfg = get_nucleus_cfg("nucleus_R101_FPN_cpu_demo.yaml")
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = (f"{dsb_folder}@x2", f"{dsb_folder}@x1", "nucleus_dsb_sample@x.5")
    register_datasets_from_cfg(cfg)  # the path base registers on the way
    base = sorted(DatasetCatalog.get(str(dsb_folder)), key=lambda r: r["image_name"])
    same = sorted(DatasetCatalog.get(f"{dsb_folder}@x1"), key=lambda r: r["image_name"])
    for b, s in zip(base, same, strict=True):
        assert np.array_equal(read_image(b["file_name"]), read_image(s["file_name"]))
        assert np.array_equal(gt_label_image(b) > 0, gt_label_image(s) > 0)
    double = sorted(DatasetCatalog.get(f"{dsb_folder}@x2"), key=lambda r: r["image_name"])
    for b, d in zip(base, double, strict=True):
        assert (d["height"], d["width"]) == (2 * b["height"], 2 * b["width"])
        areas_b = np.bincount(gt_label_image(b).ravel())[1:]
        areas_d = np.bincount(gt_label_image(d).ravel())[1:]
        assert len(d["annotations"]) == len(b["annotations"]) == len(areas_d)
        assert np.allclose(areas_d, 4 * areas_b, rtol=0.05, atol=4)
    half = DatasetCatalog.get("nucleus_dsb_sample@x.5")[0]
    assert (half["height"], half["width"]) == (256, 256)
    assert read_image(half["file_name"]).dtype == np.uint16  # the sample's dtype is kept
    cfg.DATASETS.TEST = (f"{dsb_folder / 'missing'}@x2",)
    with pytest.raises(KeyError, match="missing"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.TEST = ("nucleus_dsb_sample@x100",)
    with pytest.raises(ValueError, match="outside"):
        register_datasets_from_cfg(cfg)


@pytest.mark.parametrize("content", ['{"images": [', '[1, 2]',
                                     '{"images": [{"id": 1}], "annotations": [], "categories": []}',
                                     '{"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], '
                                     '"annotations": [{"id": 1, "image_id": 1}], "categories": [{"id": 1}]}'])
def test_a_malformed_coco_json_is_named(tmp_path, content, capsys):
    from nucleus_seg.data.catalog import register_nucleus_dataset
    from nucleus_seg.data.io import ImageReadError

    bad = tmp_path / "nuclei.json"
    bad.write_text(content)
    register_nucleus_dataset("bad_coco", bad)
    with pytest.raises(ImageReadError, match=str(bad)):
        DatasetCatalog.get("bad_coco")
    assert eval_main(["--baseline", "watershed", "--dataset", str(bad), "--output", str(tmp_path / "o")]) == 1
    assert str(bad) in capsys.readouterr().err


def test_nucleus_train_names_a_malformed_coco_json(tiny_cfg, tmp_path, capsys):
    from nucleus_seg.cli.train import main as train_main

    bad = tmp_path / "nuclei.json"
    bad.write_text('{"images": [')
    yaml = tmp_path / "c.yaml"
    yaml.write_text(tiny_cfg.dump())
    assert train_main(["--config-file", str(yaml), "DATASETS.TRAIN", f"('{bad}',)", "DATASETS.TEST", "()"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
