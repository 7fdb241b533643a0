"""NucleusEvaluator on detectron2 Instances over a registered tiny dataset, and the classical baseline."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Instances

from nucleus_seg.evaluation.evaluator import NucleusEvaluator, build_nucleus_evaluator, prediction_label_image
from nucleus_seg.inference.baseline import watershed_segment
from nucleus_seg.structures import gt_label_image, mask_to_annotation, masks_to_label_image, rles_to_label_image

H, W = 40, 48


def rect(y: int, x: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y : y + h, x : x + w] = True
    return m


# image 0: two touching nuclei; image 1: one nucleus; image 2: no nuclei
GT = {
    0: [rect(5, 5, 10, 10), rect(5, 15, 10, 10)],
    1: [rect(20, 20, 8, 12)],
    2: [],
}


def gt_dicts() -> list[dict]:
    return [{"file_name": f"/nonexistent/img{i}.png", "image_id": i, "height": H, "width": W,
             "annotations": [mask_to_annotation(m) for m in masks]} for i, masks in GT.items()]


@pytest.fixture
def tiny_dataset():
    name = f"nucleus_test_{uuid.uuid4().hex[:8]}"
    dicts = gt_dicts()
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["nucleus"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def instances(masks: list[np.ndarray], scores: list[float]) -> Instances:
    inst = Instances((H, W))
    m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.bool)
    inst.pred_masks = m
    inst.pred_boxes = BitMasks(m).get_bounding_boxes()
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
    return inst


def run(evaluator: NucleusEvaluator, outputs: dict[int, Instances]):
    evaluator.reset()
    for image_id, inst in outputs.items():
        evaluator.process(
            [{"image_id": image_id, "file_name": f"/nonexistent/img{image_id}.png", "height": H, "width": W}],
            [{"instances": inst}],
        )
    return evaluator.evaluate()


def test_evaluator_scores_instances(tiny_dataset, tmp_path):
    left, right = GT[0]
    big = rect(3, 3, 14, 14)  # low-score blob covering the left nucleus: must lose the overlap
    outputs = {
        # image 0: left exact (0.9) over a 0.6 blob covering it; right found at IoU 80/100 (0.8)
        0: instances([left, big, rect(5, 17, 10, 8)], [0.9, 0.6, 0.8]),
        # image 1: the only prediction that matches scores under the threshold: a miss
        1: instances([GT[1][0]], [0.3]),
        # image 2: no nuclei, no predictions: perfect
        2: instances([], []),
    }
    results = run(NucleusEvaluator(tiny_dataset, str(tmp_path), score_thresh=0.5, max_dets=(1, 100)), outputs)
    nucleus = results["nucleus"]
    # image 0: 2 GT, 3 predictions (blob keeps only its ring). At IoU 0.5..0.75 both GT match
    # (accuracy 2/3); at 0.80..0.95 only the exact one (accuracy 1/4).
    dsb0 = (6 * 2 / 3 + 4 * 1 / 4) / 10
    assert nucleus["dsb_score"] == pytest.approx((dsb0 + 0.0 + 1.0) / 3)
    assert (nucleus["tp50"], nucleus["fp50"], nucleus["fn50"]) == (2, 1, 1)
    assert (nucleus["n_images"], nucleus["n_gt"], nucleus["n_pred"]) == (3, 3, 3)
    assert nucleus["precision50"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert nucleus["recall50"] == pytest.approx((1 + 0 + 1) / 3)
    assert nucleus["pq"] == pytest.approx(((1 + 0.8) / (2 + 0.5) + 0 + 1) / 3)
    # COCO AP ranks every detection, including the 0.3 one; caps 1 and 100 both reported
    assert {"AP", "AP50", "AP75", "AP@1", "AP@100", "AR@1", "AR@100"} <= set(results["segm"])
    assert results["segm"]["AP@1"] < results["segm"]["AP@100"]
    # ranked 0.9 TP, 0.8 TP, 0.6 FP (duplicate of the left nucleus), 0.3 TP: precision 1 up to recall 2/3
    # (67 of COCO's 101 recall points), then 3/4
    assert results["segm"]["AP50"] == pytest.approx(100 * (67 + 34 * 0.75) / 101)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("dsb_score", "ap50", "f1_50", "pq", "n_images", "n_gt", "n_pred", "per_image", "coco"):
        assert key in metrics
    assert metrics["dsb_score"] == pytest.approx(nucleus["dsb_score"])
    per_image = {row["file_name"]: row for row in metrics["per_image"]}
    assert per_image["/nonexistent/img0.png"]["dsb_score"] == pytest.approx(dsb0)
    assert per_image["/nonexistent/img1.png"]["fn50"] == 1
    assert per_image["/nonexistent/img2.png"]["dsb_score"] == 1.0
    assert metrics["coco"]["segm"]["AP@100"] == pytest.approx(results["segm"]["AP@100"])


def test_prediction_label_image_is_rebuilt_from_stored_detections(tiny_dataset):
    left, _ = GT[0]
    masks, scores = [left, rect(3, 3, 14, 14), rect(30, 2, 4, 4)], [0.9, 0.6, 0.2]
    evaluator = NucleusEvaluator(tiny_dataset, None, score_thresh=0.5, coco=False)
    run(evaluator, {0: instances(masks, scores)})
    record = evaluator.records[0]
    rebuilt = prediction_label_image(record, 0.5)
    expected = masks_to_label_image(np.stack(masks[:2]), np.array(scores[:2]))
    assert np.array_equal(rebuilt, expected)
    assert len(record["detections"]) == 2  # coco=False keeps only the thresholded ones
    gt = gt_label_image(evaluator.gt_by_id[0])
    assert np.array_equal(gt, masks_to_label_image(np.stack(GT[0])))


def test_rles_to_label_image_paints_like_masks_to_label_image():
    rng = np.random.default_rng(0)
    masks = rng.random((6, H, W)) < 0.2
    scores = rng.random(6)
    rles = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    assert np.array_equal(rles_to_label_image(rles, H, W, scores), masks_to_label_image(masks, scores))
    assert np.array_equal(rles_to_label_image(rles, H, W), masks_to_label_image(masks))


def test_from_config_reads_nucleus_keys(tiny_dataset):
    from nucleus_seg.config import get_nucleus_cfg

    cfg = get_nucleus_cfg(
        opts=[
            "NUCLEUS.PREDICT.SCORE_THRESH",
            "0.25",
            "NUCLEUS.EVAL.MAX_DETS",
            "(50, 500)",
            "NUCLEUS.EVAL.COCO",
            "False",
        ]
    )
    evaluator = build_nucleus_evaluator(cfg, tiny_dataset, None)
    assert (evaluator.score_thresh, evaluator.max_dets, evaluator.coco) == (0.25, (50, 500), False)
    results = run(evaluator, {1: instances([GT[1][0]], [0.3])})  # 0.3 now passes the threshold
    assert results["nucleus"]["tp50"] == 1 and "segm" not in results


def test_evaluator_refuses_mismatched_sizes_and_unknown_images(tiny_dataset):
    evaluator = NucleusEvaluator(tiny_dataset)
    wrong = Instances((H // 2, W // 2))
    wrong.pred_masks = torch.zeros((0, H // 2, W // 2), dtype=torch.bool)
    wrong.scores = torch.zeros(0)
    with pytest.raises(ValueError, match="img0.png.*original resolution"):
        evaluator.process([{"image_id": 0, "file_name": "/nonexistent/img0.png"}], [{"instances": wrong}])
    with pytest.raises(KeyError, match="not in dataset"):
        evaluator.process([{"image_id": 99, "file_name": "x.png"}], [{"instances": wrong}])
    with pytest.raises(KeyError, match="not registered"):
        NucleusEvaluator("no_such_dataset_xyz")


def _ddp_worker(out_dir: str) -> None:
    """One rank of a 2-process gloo run: rank 0 sees images 0 and 2, rank 1 image 1."""
    from detectron2.utils import comm

    name = "nucleus_ddp_test"
    dicts = gt_dicts()
    DatasetCatalog.register(name, lambda: dicts)
    evaluator = NucleusEvaluator(name, out_dir, max_dets=(100,))
    rank = comm.get_rank()
    outputs = {0: instances(GT[0], [0.9, 0.8]), 2: instances([], [])} if rank == 0 else {1: instances([], [])}
    results = run(evaluator, outputs)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    from nucleus_seg.utils.dist import close_process_group

    close_process_group()


def test_evaluator_gathers_over_ddp_processes(tmp_path):
    """Under DDP every rank processes its share; only the main process computes and writes."""
    from nucleus_seg.utils.dist import launch  # detectron2's, with ranks that leave without teardown

    launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    main = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}
    assert (main["nucleus"]["n_images"], main["nucleus"]["n_gt"], main["nucleus"]["fn50"]) == (3, 3, 1)
    assert main["nucleus"]["dsb_score"] == pytest.approx((1 + 0 + 1) / 3)
    assert main["segm"]["AP@100"] == pytest.approx(100 * 67 / 101)  # exact masks: precision 1 to recall 2/3
    assert json.loads((tmp_path / "metrics.json").read_text())["n_images"] == 3


def test_evaluator_without_predictions_returns_empty(tiny_dataset):
    assert run(NucleusEvaluator(tiny_dataset), {}) == {}


# ----------------------------------------------------------------------------- classical baseline


def disks(centres, radius=9, shape=(64, 96)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    label = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        label[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & (label == 0)] = k
    return label


def test_watershed_splits_touching_nuclei_in_any_image_type():
    from nucleus_seg.evaluation.matching import matching_stats

    gt = disks([(30, 30), (30, 47), (12, 75)])  # the first two touch
    rng = np.random.default_rng(0)
    fluo = (gt > 0) * 900.0 + 100 + rng.normal(0, 20, gt.shape)  # 16-bit-ish fluorescence
    for image in (
        fluo.astype(np.uint16),
        (4000 - fluo).astype(np.float32),  # dark nuclei on bright
        np.repeat((fluo / 4).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2),
    ):
        label = watershed_segment(image)
        stats = matching_stats(gt, label, 0.7)
        assert (stats["tp"], stats["fp"], stats["fn"]) == (3, 0, 0)


def test_watershed_on_an_empty_image_finds_nothing():
    assert watershed_segment(np.zeros((32, 32), np.uint16)).max() == 0
    assert watershed_segment(np.full((16, 16), 7.0)).dtype == np.int32
