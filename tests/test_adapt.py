"""nucleus-adapt: ignore regions in the losses, pseudo-labels, and the whole loop on CPU without a label."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from nucleus_seg.data.mapper import NucleusDatasetMapper
from nucleus_seg.engine.adapt import (
    VIEWS,
    AdaptError,
    AdaptSettings,
    adapt,
    pseudo_labels,
    schedule_end_lr,
    unexplained_foreground,
)
from nucleus_seg.inference.tiling import LabelPrediction
from nucleus_seg.modeling.ignore import IGNORE_CLASS, ignore_regions_in_losses, split_ignored
from nucleus_seg.structures import mask_to_annotation

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample"


def _targets(real: list[list[float]], ignored: list[list[float]], size: int = 128) -> Instances:
    t = Instances((size, size))
    t.gt_boxes = Boxes(torch.tensor(real + ignored, dtype=torch.float32))
    t.gt_classes = torch.tensor([0] * len(real) + [IGNORE_CLASS] * len(ignored))
    return t


def test_split_ignored_takes_class_minus_one_out_of_the_targets():
    real, ignored = split_ignored([_targets([[0, 0, 10, 10]], [[20, 20, 40, 40], [50, 50, 60, 60]])])
    assert real[0].gt_classes.tolist() == [0]
    assert ignored[0].tensor.tolist() == [[20, 20, 40, 40], [50, 50, 60, 60]]


def test_anchors_and_proposals_inside_ignore_regions_are_neither_nucleus_nor_background(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    plain, patched = build_model(cfg), ignore_regions_in_losses(build_model(cfg))
    targets = [_targets([[10, 10, 40, 40]], [[70, 70, 110, 110]])]
    real_only = [_targets([[10, 10, 40, 40]], [])]
    inside = Boxes(torch.tensor([[72.0, 72, 100, 100], [80, 80, 108, 108]]))
    anchors = [inside, Boxes(torch.tensor([[12.0, 12, 38, 38], [0, 90, 20, 120]]))]
    torch.manual_seed(0)
    labels_plain, _ = plain.proposal_generator.label_and_sample_anchors(anchors, real_only)
    torch.manual_seed(0)
    labels_patched, _ = patched.proposal_generator.label_and_sample_anchors(anchors, targets)
    # without ignore regions the nuclei inside are background; with them, ignored; the rest is unchanged
    assert labels_plain[0].tolist() == [0, 0, 1, 0]
    assert labels_patched[0].tolist() == [-1, -1, 1, 0]

    proposal = Instances((128, 128))
    proposal.proposal_boxes = Boxes(torch.cat([inside.tensor, torch.tensor([[11.0, 11, 39, 39], [0, 90, 20, 120]])]))
    proposal.objectness_logits = torch.zeros(4)
    with EventStorage():
        sampled_plain = plain.roi_heads.label_and_sample_proposals([proposal], real_only)[0]
        sampled = patched.roi_heads.label_and_sample_proposals([proposal], targets)[0]
    background = patched.roi_heads.num_classes

    def inside_ignored(p: Instances) -> int:
        boxes = p.proposal_boxes.tensor[p.gt_classes == background]
        return int(((boxes[:, 0] >= 70) & (boxes[:, 1] >= 70)).sum())

    assert inside_ignored(sampled_plain) == 2 and inside_ignored(sampled) == 0
    assert IGNORE_CLASS not in sampled.gt_classes.tolist()
    assert (sampled.gt_classes == 0).sum() == (sampled_plain.gt_classes == 0).sum()  # nuclei kept


def test_the_mapper_keeps_crowd_annotations_as_ignore_regions_only_when_asked(tiny_cfg, dsb_sample):
    image, labels = dsb_sample
    ids = np.unique(labels[labels > 0])[:3]
    record = {"file_name": str(SAMPLE_DIR / "image.tif"), "height": 512, "width": 512, "image_id": 0,
              "annotations": [dict(mask_to_annotation(labels == i), iscrowd=int(i == ids[1])) for i in ids]}
    cfg = tiny_cfg.clone()
    cfg.INPUT.NUCLEUS.CROP_SIZE = 512
    cfg.INPUT.NUCLEUS.SCALE_RANGE = (1.0, 1.0)
    cfg.INPUT.NUCLEUS.SCALE_TO_DIAMETER = False
    classes = {}
    for flag in (False, True):
        cfg.INPUT.NUCLEUS.CROWD_AS_IGNORE = flag
        mapped = NucleusDatasetMapper(cfg, is_train=True)(record)
        classes[flag] = sorted(mapped["instances"].gt_classes.tolist())
    assert classes[False] == [0, 0]
    assert classes[True] == [IGNORE_CLASS, 0, 0]


class _Teacher:
    """Stands in for NucleusPredictor.predict_large with fixed detections per view; the image's corners are
    0, 1, 2, 3 (left to right, top to bottom), so its top-left pixel tells the flip."""

    VIEW_OF_CORNER = {0: (False, False), 1: (True, False), 2: (False, True)}

    def __init__(self, views: dict[tuple[bool, bool], tuple[np.ndarray, np.ndarray]]):
        self.views = views

    def predict_large(self, image, diameter=None, score_thresh=None):
        labels, scores = self.views[self.VIEW_OF_CORNER[int(image[0, 0])]]
        return LabelPrediction(labels, scores, np.zeros((len(scores), 4), np.float32))


def test_pseudo_labels_keep_confident_nuclei_the_flipped_views_agree_on_and_ignore_the_rest():
    image = np.zeros((40, 40), np.uint8)
    image[:20, 20:], image[20:, :20], image[20:, 20:] = 1, 2, 3
    base = np.zeros((40, 40), np.int32)
    base[2:8, 2:8] = 1  # score 0.95, in every view: a pseudo-label
    base[2:8, 12:18] = 2  # score 0.95, missing from one view: ignored
    base[12:18, 2:8] = 3  # score 0.5: not confident, ignored
    scores = np.array([0.95, 0.95, 0.5], np.float32)
    lr = base[:, ::-1].copy()
    ud = base[::-1].copy()
    ud[ud == 2] = 0
    extra = np.zeros_like(base)
    extra[30:36, 30:36] = 1  # only the left-right view sees this one: ignored
    lr_with_extra = np.where(extra[:, ::-1] > 0, 4, lr)
    teacher = _Teacher({(False, False): (base, scores), (True, False): (lr_with_extra, np.append(scores, 0.9)),
                        (False, True): (ud, scores)})
    settings = AdaptSettings(confident=0.8, uncertain=0.3, agree_iou=0.5, unexplained=False)
    found = pseudo_labels(teacher, image, settings)
    assert np.array_equal(found.labels > 0, base == 1)
    ignored = found.ignored > 0
    assert ignored[base == 2].all() and ignored[base == 3].all() and ignored[extra > 0].all()
    assert not ignored[base == 1].any()
    assert found.counts == (1, 3)
    # a later round keeps only what the previous teacher found too
    assert pseudo_labels(teacher, image, settings, previous=np.zeros_like(base)).counts[0] == 0


def test_voted_pseudo_label_outlines_keep_the_pixels_two_of_three_views_agree_on():
    image = np.zeros((40, 40), np.uint8)
    image[:20, 20:], image[20:, :20], image[20:, 20:] = 1, 2, 3
    base, shifted, other = (np.zeros((40, 40), np.int32) for _ in range(3))
    base[4:14, 4:14] = 1
    shifted[4:14, 6:16] = 3  # both flipped views see it two pixels to the right (and call it 3 and 5)
    other[4:14, 6:16] = 5
    scores = np.array([0.95], np.float32)
    views = {(False, False): (base, scores), (True, False): (shifted[:, ::-1], np.zeros(3, np.float32) + 0.95),
             (False, True): (other[::-1], np.zeros(5, np.float32) + 0.95)}
    plain = pseudo_labels(_Teacher(views), image, AdaptSettings(unexplained=False, vote_masks=False))
    voted = pseudo_labels(_Teacher(views), image, AdaptSettings(unexplained=False, vote_masks=True))
    assert np.array_equal(plain.labels > 0, base > 0)
    assert np.array_equal(voted.labels > 0, shifted > 0)  # columns 4-5 lost (one vote), 14-15 won (two)
    assert voted.counts[0] == 1 and not (voted.ignored[voted.labels > 0]).any()


def _disk(shape, y, x, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - y, xx - x) <= r


def test_bright_structure_no_detection_covers_is_found_but_not_the_rims_of_detected_nuclei():
    shape = (96, 96)
    detected, missed, speck = _disk(shape, 24, 24, 10), _disk(shape, 70, 64, 10), _disk(shape, 20, 80, 1)
    gray = np.where(detected | missed | speck, 200, 20).astype(np.uint8)
    covered = _disk(shape, 24, 24, 8.5)  # the detection's outline lies 1.5 px inside the bright disk
    pieces = unexplained_foreground(gray, covered, diameter=20)
    assert pieces.max() == 1  # one piece: the missed nucleus, not the rim around the detected one nor the speck
    inside = pieces > 0
    assert inside[_disk(shape, 70, 64, 7)].all() and not inside[detected].any() and not inside[speck].any()
    assert not unexplained_foreground(np.full(shape, 7, np.uint8), covered, 20).any()  # flat: nothing


def test_uneven_background_is_not_taken_for_missed_nuclei_when_the_confident_ones_set_the_level():
    shape = (128, 128)
    nucleus = _disk(shape, 30, 30, 10)
    ramp = np.linspace(20, 80, shape[1])[None, :]  # uneven illumination: Otsu alone cuts the ramp in two
    gray = np.clip(ramp + np.random.default_rng(0).normal(0, 5, shape) + 150 * nucleus, 0, 255).astype(np.uint8)
    covered = _disk(shape, 30, 30, 8.5)
    assert (unexplained_foreground(gray, covered, 20) > 0).mean() > 0.2  # Otsu's level alone: the bright half
    assert not unexplained_foreground(gray, covered, 20, nuclei=covered).any()
    assert not unexplained_foreground(gray, covered, 20, nuclei=np.zeros(shape, bool)).any()  # nothing to judge by


def test_the_student_learns_at_the_rate_the_starting_schedule_ended_at(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.GAMMA, cfg.SOLVER.MAX_ITER = 0.01, 0.1, 8000
    cfg.SOLVER.STEPS = (5900, 7200)
    assert schedule_end_lr(cfg) == pytest.approx(1e-4)
    cfg.SOLVER.STEPS = (5900, 9000)  # a decay past the last iteration never happened
    assert schedule_end_lr(cfg) == pytest.approx(1e-3)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    assert schedule_end_lr(cfg) == pytest.approx(1e-3)


class _ConsistentTeacher:
    """Finds ``labels`` in ``image`` whichever way it is flipped (stands in for NucleusPredictor)."""

    train_diameter = 20.0

    def __init__(self, image, labels, scores):
        self.image, self.labels, self.scores = image, labels, scores

    @staticmethod
    def flipped(array, view):
        return array[:, ::-1] if view[0] else array[::-1] if view[1] else array

    def predict_large(self, image, diameter=None, score_thresh=None):
        view = next(v for v in VIEWS if np.array_equal(self.flipped(self.image, v), image))
        labels = np.ascontiguousarray(self.flipped(self.labels, view))
        return LabelPrediction(labels, self.scores, np.zeros((len(self.scores), 4), np.float32))

    def normalize(self, image):
        return np.repeat(image[..., None], 3, axis=2)


def test_pseudo_labels_ignore_a_nucleus_the_teacher_missed_instead_of_teaching_it_as_background():
    shape = (96, 96)
    detected, missed = _disk(shape, 24, 24, 10), _disk(shape, 70, 64, 10)
    image = np.where(detected | missed, 200, 20).astype(np.uint8)
    teacher = _ConsistentTeacher(image, detected.astype(np.int32), np.array([0.95], np.float32))
    for unexplained, ignored in ((False, 0), (True, 1)):
        found = pseudo_labels(teacher, image, AdaptSettings(unexplained=unexplained))
        assert found.counts == (1, ignored)
        assert np.array_equal(found.labels > 0, detected)
    assert (found.ignored > 0)[_disk(shape, 70, 64, 7)].all()


@pytest.fixture
def random_weights(tiny_cfg, tmp_path) -> str:
    cfg = tiny_cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    path = tmp_path / "start.pth"
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


def test_adaptation_reads_the_images_only_and_leaves_a_usable_model(tiny_cfg, tmp_path, random_weights,
                                                                    synth_root):
    """The labels lie beside the image, named as the DSB layout names them; every file opened while adapting is
    audited, and none of them is a label. The adapted model then loads and predicts like any other."""
    lab = tmp_path / "lab"
    (lab / "masks").mkdir(parents=True)
    shutil.copy(SAMPLE_DIR / "image.tif", lab / "cells.tif")
    shutil.copy(SAMPLE_DIR / "labels.tif", lab / "cells_labels.tif")
    shutil.copy(SAMPLE_DIR / "labels.tif", lab / "masks" / "cells.tif")
    cfg = tiny_cfg.clone()
    cfg.MODEL.WEIGHTS = random_weights
    cfg.SOLVER.IMS_PER_BATCH = 1
    # a random model scores everything alike: thresholds low enough that it yields pseudo-labels at all
    settings = AdaptSettings(rounds=2, iters=1, synthetic=2, confident=0.05, uncertain=0.01, agree_iou=0.0,
                             overlays=1)
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, Path)) and recording:
            opened.append(str(args[0]))

    recording = True
    sys.addaudithook(audit)
    try:
        report = adapt(cfg, [lab / "cells.tif"], tmp_path / "adapted", settings)
    finally:
        recording = False
    lab_files = {str(Path(p).resolve()) for p in opened if Path(p).resolve().parent in (lab, lab / "masks")}
    assert lab_files == {str(lab / "cells.tif")}
    out = tmp_path / "adapted"
    assert {p.name for p in out.iterdir()} >= {"model_final.pth", "config.yaml", "adapt_report.json",
                                               "before_after.png", "round_1", "round_2"}
    data = json.loads((out / "round_1" / "data" / "pseudo.json").read_text())
    per_image = report["per_image"][0]["rounds"][0]
    # the one image listed twice (as often as the two synthetic ones), with the teacher's nuclei only
    assert [i["file_name"] for i in data["images"]] == ["images/cells.tif"] * 2
    assert len(data["annotations"]) == 2 * (per_image["pseudo_labels"] + per_image["ignore_regions"])
    assert per_image["pseudo_labels"] > 0 and [r["iterations"] for r in report["rounds"]] == [1, 1]
    assert json.loads((out / "adapt_report.json").read_text())["weights"] == str(out / "model_final.pth")
    from nucleus_seg import NucleusPredictor, get_nucleus_cfg

    adapted = get_nucleus_cfg(out / "config.yaml")
    assert str((out / "model_final.pth").resolve()) == adapted.MODEL.WEIGHTS
    NucleusPredictor(adapted).predict_labels([np.zeros((64, 64), np.uint8)])
    with pytest.raises(AdaptError, match="already holds an adaptation"):
        adapt(cfg, [lab / "cells.tif"], out, settings)


def test_nucleus_adapt_refuses_bad_command_lines_with_status_2(tmp_path, random_weights, capsys):
    from nucleus_seg.cli.adapt import main

    image = str(SAMPLE_DIR / "image.tif")
    base = ["--config-file", "configs/nucleus_R101_FPN_cpu_demo.yaml", "--output", str(tmp_path / "o")]
    cases = [
        (base, "--images is required"),
        (base + ["--images", image], "MODEL.WEIGHTS is empty"),
        (base + ["--images", str(tmp_path / "none*.tif"), "MODEL.WEIGHTS", random_weights], "matches no files"),
        (base + ["--images", image, "--minutes", "0", "MODEL.WEIGHTS", random_weights], "--minutes must be > 0"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    (tmp_path / "o" / "round_1").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--images", image, "MODEL.WEIGHTS", random_weights])
    assert exit_.value.code == 2 and "already holds an adaptation" in capsys.readouterr().err


@pytest.mark.parametrize("heads", ["StandardROIHeads", "CascadeROIHeads"])
def test_a_training_step_with_ignore_regions_runs_through_both_kinds_of_heads(tiny_cfg, heads):
    cfg = tiny_cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = heads
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = heads == "CascadeROIHeads"
    model = ignore_regions_in_losses(build_model(cfg))
    model.train()
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 10:40, 10:40] = masks[1, 70:110, 70:110] = True
    target = _targets([[10, 10, 40, 40]], [[70, 70, 110, 110]])
    target.gt_masks = BitMasks(masks)
    torch.manual_seed(0)
    with EventStorage():
        losses = model([{"image": torch.rand(3, 128, 128) * 255, "instances": target}])
    assert all(torch.isfinite(v) for v in losses.values())
    assert ("loss_cls_stage2" in losses) == (heads == "CascadeROIHeads")


def test_with_the_mask_loss_off_no_outline_is_taught_but_boxes_still_are(tiny_cfg):
    """What ``AdaptSettings(outlines=False)`` gives the student: NUCLEUS.TRAIN.MASK_LOSS_WEIGHT 0."""
    from nucleus_seg.engine.trainer import NucleusTrainer, set_mask_loss_weight

    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 10:40, 10:40] = True
    target = _targets([[10, 10, 40, 40]], [])
    target.gt_masks = BitMasks(masks)
    grads = {}
    for weight in (1.0, 0.0):
        cfg = tiny_cfg.clone()
        cfg.MODEL.DEVICE = "cpu"
        cfg.NUCLEUS.TRAIN.MASK_LOSS_WEIGHT = weight
        model = NucleusTrainer.build_model(cfg)
        model.train()
        torch.manual_seed(0)
        with EventStorage():
            losses = model([{"image": torch.rand(3, 128, 128) * 255, "instances": target}])
        sum(losses.values()).backward()
        head = model.roi_heads.mask_head
        grads[weight] = (float(losses["loss_mask"].detach()), any(p.grad is not None for p in head.parameters()),
                         all(p.requires_grad for p in head.parameters()))
        box_grads = [p.grad for p in model.roi_heads.box_predictor.parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in box_grads)  # detection is still taught
    assert grads[1.0][0] > 0 and grads[1.0][1] and grads[1.0][2]
    assert grads[0.0] == (0.0, False, False)
    with pytest.raises(ValueError, match="MASK_LOSS_WEIGHT -1"):
        set_mask_loss_weight(model, -1.0)


def test_large_rescaled_images_become_tiles_with_their_own_annotations(tmp_path):
    from nucleus_seg.engine.adapt import DATA_TILE, PseudoLabels, _coco_dataset, _tiles

    windows = _tiles((2100, 1500))
    assert len(windows) == 6 and max(w[0].stop - w[0].start for w in windows) <= DATA_TILE
    covered = np.zeros((2100, 1500), int)
    for rows, cols in windows:
        covered[rows, cols] += 1
    assert (covered == 1).all()
    labels = np.zeros((2100, 1500), np.int32)
    labels[100:130, 100:130] = 1  # in the first tile
    labels[690:710, 740:760] = 2  # where four tiles meet (rows split at 700, columns at 750): a piece in each
    ignored = np.zeros_like(labels)
    ignored[2000:2050, 1400:1450] = 1  # in the last tile
    path = _coco_dataset(tmp_path, [("big", np.zeros((2100, 1500), np.uint16),
                                     PseudoLabels(labels, ignored, labels))], repeats=1)
    data = json.loads(path.read_text())
    assert len(data["images"]) == 6
    per_image = {i["id"]: [a["iscrowd"] for a in data["annotations"] if a["image_id"] == i["id"]]
                 for i in data["images"]}
    assert sorted(len(v) for v in per_image.values()) == [0, 1, 1, 1, 1, 2]  # nucleus 1 + a piece in the first
    assert sum(v.count(1) for v in per_image.values()) == 1


def test_an_estimate_that_would_blow_an_image_up_skips_it_and_says_how_to_give_the_diameter(
        tiny_cfg, tmp_path, random_weights, monkeypatch):
    from nucleus_seg.inference.predictor import NucleusPredictor
    from nucleus_seg.inference.scale import ScaleChoice

    monkeypatch.setattr(NucleusPredictor, "estimate_diameter",
                        lambda self, image, name="image": ScaleChoice(14.0, 2.3, 2.8, True, []))
    cfg = tiny_cfg.clone()
    cfg.MODEL.WEIGHTS = random_weights
    cfg.NUCLEUS.PREDICT.DIAMETER = -1.0
    cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER = 32.0
    with pytest.raises(AdaptError, match=r"image: the diameter estimate \(2.3 px\) would rescale it x14.0 to 7168 px"
                                         r".*NUCLEUS.PREDICT.DIAMETER"):
        adapt(cfg, [SAMPLE_DIR / "image.tif"], tmp_path / "out", AdaptSettings(iters=1, synthetic=0))


def test_nucleus_adapt_names_a_bad_image_or_checkpoint_with_status_2(tmp_path, random_weights, capsys):
    from nucleus_seg.cli.adapt import main

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    image = str(SAMPLE_DIR / "image.tif")
    base = ["--config-file", "configs/nucleus_R101_FPN_cpu_demo.yaml", "--iters", "1"]
    assert main(base + ["--images", str(broken), "--output", str(tmp_path / "a"), "MODEL.WEIGHTS", random_weights]) == 2
    assert "broken.tif" in capsys.readouterr().err
    assert main(base + ["--images", image, "--output", str(tmp_path / "b"), "MODEL.WEIGHTS",
                        str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    r18 = ["--config-file", "configs/nucleus_R18_FPN_cpu_demo.yaml", "--iters", "1"]  # R101 weights do not fit
    assert main(r18 + ["--images", image, "--output", str(tmp_path / "c"), "MODEL.WEIGHTS", random_weights]) == 2
    assert "does not fit this config" in capsys.readouterr().err
