"""Configs are found by name in a checkout and in an installed wheel (nucleus_seg/configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_bundled_config_by_name_from_any_folder(tmp_path, monkeypatch):
    from nucleus_seg.config import get_nucleus_cfg

    monkeypatch.chdir(tmp_path)  # no configs/ here: the bundled one is found by its name
    cfg = get_nucleus_cfg("nucleus_R101_FPN_scratch.yaml", ["SOLVER.BASE_LR", "0.003"])
    assert cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8], [16], [32], [64], [128]]
    assert cfg.SOLVER.BASE_LR == 0.003
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        get_nucleus_cfg("no_such.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_every_shipped_config_builds_and_takes_a_training_step(name):
    """Each YAML loads, its model builds without detectron2._C and one training step gives finite losses
    (a head combination such as the recipe's Cascade R-CNN breaks here, not on a lent GPU)."""
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    from nucleus_seg.config import get_nucleus_cfg

    cfg = get_nucleus_cfg(name, ["MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
                                 "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    masks = torch.zeros(2, 96, 96, dtype=torch.bool)
    masks[0, 10:30, 12:34] = True
    masks[1, 50:80, 40:66] = True
    image = (masks.any(0).float() * 150 + 40).expand(3, -1, -1).clone()
    target = Instances((96, 96), gt_classes=torch.zeros(2, dtype=torch.int64),
                       gt_boxes=Boxes(torch.tensor([[12.0, 10, 34, 30], [40, 50, 66, 80]])), gt_masks=BitMasks(masks))
    with EventStorage():
        losses = model([{"image": image, "instances": target, "height": 96, "width": 96}])
    assert {"loss_mask", "loss_rpn_cls"} <= set(losses)
    if cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads":
        assert {f"loss_box_reg_stage{k}" for k in range(3)} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_coco_ap_is_measured_over_every_detection_a_config_keeps(name):
    """COCO's 100-detection cap truncates fields of 300+ nuclei: the largest NUCLEUS.EVAL.MAX_DETS must reach
    TEST.DETECTIONS_PER_IMAGE, and the prediction settings must be in range."""
    from nucleus_seg.config import check_predict_settings, get_nucleus_cfg

    cfg = get_nucleus_cfg(name)
    assert max(cfg.NUCLEUS.EVAL.MAX_DETS) >= cfg.TEST.DETECTIONS_PER_IMAGE
    check_predict_settings(cfg)


def test_batch_size_zero_means_16_on_a_gpu_and_8_on_the_cpu():
    from nucleus_seg.config import get_nucleus_cfg, predict_batch_size
    from nucleus_seg.inference.predictor import NucleusPredictor

    cfg = get_nucleus_cfg("nucleus_R18_FPN_cpu_demo.yaml", ["MODEL.DEVICE", "cpu"])
    assert cfg.NUCLEUS.PREDICT.BATCH_SIZE == 0  # the default
    assert predict_batch_size(cfg) == 8 and predict_batch_size(cfg, "cuda") == 16
    assert predict_batch_size(cfg, "cuda:1") == 16
    with pytest.warns(UserWarning, match="MODEL.WEIGHTS is empty"):
        assert NucleusPredictor(cfg).batch_size == 8
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 3  # given: used as it is, anywhere
    assert predict_batch_size(cfg) == predict_batch_size(cfg, "cuda") == 3


def test_streams_zero_means_two_on_a_gpu_and_one_on_the_cpu():
    from nucleus_seg.config import check_predict_settings, get_nucleus_cfg, predict_streams
    from nucleus_seg.inference.predictor import NucleusPredictor

    cfg = get_nucleus_cfg("nucleus_R18_FPN_cpu_demo.yaml", ["MODEL.DEVICE", "cpu"])
    assert cfg.NUCLEUS.PREDICT.STREAMS == 0  # the default
    assert predict_streams(cfg) == 1 and predict_streams(cfg, "cuda:0") == 2
    with pytest.warns(UserWarning, match="MODEL.WEIGHTS is empty"):
        assert NucleusPredictor(cfg).streams == 1
    cfg.NUCLEUS.PREDICT.STREAMS = 3  # given: used as it is, anywhere
    assert predict_streams(cfg) == predict_streams(cfg, "cuda") == 3
    cfg.NUCLEUS.PREDICT.STREAMS = -1
    with pytest.raises(ValueError, match="NUCLEUS.PREDICT.STREAMS must be at least 1"):
        check_predict_settings(cfg)


def test_out_of_range_prediction_settings_are_named():
    from nucleus_seg.config import check_predict_settings, get_nucleus_cfg

    for key, value in (("SCORE_THRESH", 5.0), ("DIAMETER", -3.0), ("TILE_SIZE", 0), ("TILE_OVERLAP", 512),
                       ("BATCH_SIZE", -1), ("DIAMETER_SCORE_THRESH", -0.1)):
        cfg = get_nucleus_cfg("nucleus_R101_FPN_scratch.yaml", [f"NUCLEUS.PREDICT.{key}", str(value)])
        with pytest.raises(ValueError, match=f"NUCLEUS.PREDICT.{key} "):
            check_predict_settings(cfg)
