"""Command-line users name datasets by path (FOLDER, FOLDER@train/@val, a COCO JSON)."""

from __future__ import annotations

import json

import pytest
from detectron2.data import DatasetCatalog

from nucleus_seg.cli.evaluate import main as eval_main
from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.synth import write_dataset
from nucleus_seg.engine.trainer import dataset_dirname, register_datasets_from_cfg


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
