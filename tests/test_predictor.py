"""NucleusPredictor with the real R101-FPN (random init, tiny_cfg) on CPU, and its mask pasting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.io import ImageReadError, normalize_from_cfg
from nucleus_seg.data.transforms import median_diameter
from nucleus_seg.inference.masks import paste_mask_windows, windows_to_label, windows_to_masks
from nucleus_seg.inference.predictor import NucleusPredictor
from nucleus_seg.inference.scale import AUTO_MAX_PASSES
from nucleus_seg.inference.tiling import LabelPrediction, masks_to_prediction
from nucleus_seg.modeling.precision import cpu_has_native_bfloat16
from nucleus_seg.structures import masks_to_label_image

pytestmark = pytest.mark.filterwarnings("ignore:MODEL.WEIGHTS is empty")


def blobs(shape, dtype=np.uint16, seed=0, channels=None):
    """Bright round nuclei on a dark, noisy background, in the dtype's range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image = rng.normal(0.1, 0.02, shape)
    for _ in range(8):
        cy, cx, r = rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10), rng.uniform(4, 9)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 0.7
    top = np.iinfo(dtype).max
    image = (np.clip(image, 0, 1) * top).astype(dtype)
    if channels:
        image = np.stack([image] * channels, axis=-1)
        if channels == 4:
            image[..., 3] = top  # opaque alpha
    return image


@pytest.fixture
def cfg(tiny_cfg):
    tiny_cfg.TEST.DETECTIONS_PER_IMAGE = 20  # CPU time goes into the mask head
    tiny_cfg.NUCLEUS.PREDICT.SCORE_THRESH = 0.1  # random weights score ~0.5: keep enough to compare
    tiny_cfg.NUCLEUS.PREDICT.DIAMETER_SCORE_THRESH = 0.1
    torch.manual_seed(0)  # the random init, so every run sees the same model
    return tiny_cfg


def record_input_sizes(predictor: NucleusPredictor) -> list[tuple[int, int]]:
    """The (H, W) of every image the model is run on, appended as the predictor runs."""
    sizes = []
    real = predictor.model.inference

    def spy(batched_inputs, *args, **kwargs):
        sizes.extend(tuple(x["image"].shape[1:]) for x in batched_inputs)
        return real(batched_inputs, *args, **kwargs)

    predictor.model.inference = spy
    return sizes


def kept_as_labels(inst, keep) -> LabelPrediction:
    """The label prediction made from the kept instances' full-image masks (the reference path)."""
    return masks_to_prediction(inst.pred_masks[keep].numpy(), inst.scores[keep].numpy(),
                               inst.pred_boxes.tensor[keep].numpy())


def random_soft_masks(n, seed=0, size=100):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * (size - 10)
    wh = torch.rand(n, 2, generator=g) * 40 + 0.5
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
    boxes[0] = torch.tensor([0.0, 0.0, size, size])  # one box over the whole image
    return probs, boxes


def test_window_paste_gives_detectron2s_pixels():
    from detectron2.layers.mask_ops import paste_masks_in_image

    probs, boxes = random_soft_masks(40)
    windows, oy, ox = paste_mask_windows(probs, boxes, (100, 90))
    ours = windows_to_masks(windows, oy, ox, (100, 90))
    ref = paste_masks_in_image(probs, boxes, (100, 90))
    assert torch.equal(ours, ref)
    assert ref.sum() > 0


def test_device_label_painting_matches_masks_to_label_image():
    probs, boxes = random_soft_masks(30, seed=1)
    scores = torch.rand(30, generator=torch.Generator().manual_seed(2))
    scores[3] = scores[4]  # ties paint in input order, as masks_to_label_image does
    windows, oy, ox = paste_mask_windows(probs, boxes, (100, 100))
    ours = windows_to_label(windows, oy, ox, scores, (100, 100))
    ref = masks_to_label_image(windows_to_masks(windows, oy, ox, (100, 100)).numpy(), scores.numpy())
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_median_diameter():
    assert median_diameter(np.array([np.pi * 25, np.pi * 100, np.pi * 100, 0])) == pytest.approx(20.0)
    assert median_diameter(np.array([])) is None


def check_instances(inst, shape):
    assert inst.image_size == shape
    n = len(inst)
    assert n > 0
    assert inst.pred_masks.shape == (n, *shape) and inst.pred_masks.dtype == torch.bool
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= shape[1]).all() and (boxes[:, 3] <= shape[0]).all()
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    for mask, box in zip(inst.pred_masks, boxes):  # every mask pixel lies in its box (+1 px sampling)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):
            assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() + 1
            assert ys.min() >= box[1].floor() - 1 and ys.max() <= box[3].ceil() + 1


def test_random_init_warns_and_runs_on_16bit_and_rgba(cfg):
    with pytest.warns(UserWarning, match="random weights"):
        predictor = NucleusPredictor(cfg)
    gray16 = blobs((96, 120), np.uint16)
    rgba = blobs((112, 80), np.uint8, seed=1, channels=4)
    check_instances(predictor(gray16)["instances"], (96, 120))
    check_instances(predictor(rgba)["instances"], (112, 80))
    batch = predictor.predict_batch([gray16, rgba, gray16])
    assert [o["instances"].image_size for o in batch] == [(96, 120), (112, 80), (96, 120)]
    single = predictor(gray16)["instances"]
    assert torch.equal(batch[2]["instances"].pred_masks, single.pred_masks)  # batching changes nothing
    assert torch.allclose(batch[2]["instances"].scores, single.scores, atol=1e-5)


def test_matches_default_predictor_on_the_same_weights(cfg, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor

    cfg.INPUT.NORMALIZE.METHOD = "none"
    cfg.INPUT.NORMALIZE.GRAY = False
    cfg.INPUT.NORMALIZE.INVERT = "never"
    theirs = DefaultPredictor(cfg)  # random init; its weights go to a checkpoint that ours loads
    DetectionCheckpointer(theirs.model, save_dir=str(tmp_path)).save("weights")
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    ours = NucleusPredictor(cfg)
    rgb = np.ascontiguousarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    a = ours(rgb)["instances"]
    b = theirs(rgb[..., ::-1].copy())["instances"]  # DefaultPredictor takes BGR
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_masks, b.pred_masks)


def test_missing_weights_file_is_named(cfg, tmp_path):
    cfg.MODEL.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        NucleusPredictor(cfg)


def test_tiled_equals_untiled_on_an_image_smaller_than_a_tile(cfg):
    predictor = NucleusPredictor(cfg)
    image = blobs((100, 124), np.uint16, seed=2)
    thresh = predictor.score_thresh
    inst = predictor(image)["instances"]
    keep = inst.scores >= thresh
    assert keep.any()
    untiled = kept_as_labels(inst, keep)
    tiled = predictor.predict_large(image, tile=128, overlap=32)
    labels_path = predictor.predict_labels([image])[0]
    assert len(untiled) > 0
    np.testing.assert_array_equal(tiled.labels, untiled.labels)
    np.testing.assert_array_equal(labels_path.labels, untiled.labels)
    np.testing.assert_array_equal(tiled.scores, untiled.scores)
    np.testing.assert_allclose(tiled.boxes, untiled.boxes)


def test_predict_large_streams_tiles_into_one_label_image(cfg):
    predictor = NucleusPredictor(cfg)
    seen = record_input_sizes(predictor)
    image = blobs((150, 230), np.uint16, seed=3)
    pred = predictor.predict_large(image, tile=96, overlap=32)
    # rows: 1 + ceil((150 - 96) / (96 - 32)) = 2, columns: 1 + ceil(134 / 64) = 4; all of the tile size
    assert seen == [(96, 96)] * 8
    assert pred.labels.shape == image.shape and pred.labels.dtype == np.int32
    n = len(pred)
    assert n > 0 and pred.labels.max() == n
    assert set(np.unique(pred.labels)) == set(range(n + 1))  # ids 1..N, each with pixels
    assert (np.diff(pred.scores) <= 0).all() and (pred.scores >= predictor.score_thresh).all()
    assert (pred.boxes[:, 2] <= 230).all() and (pred.boxes[:, 3] <= 150).all()


def test_diameter_rescales_the_input_and_returns_full_resolution(cfg):
    predictor = NucleusPredictor(cfg)
    sizes = record_input_sizes(predictor)
    image = blobs((96, 128), np.uint16, seed=4)
    train = cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER
    inst = predictor(image, diameter=2 * train)["instances"]  # nuclei twice as big: halve the image
    assert sizes == [(48, 64)]
    check_instances(inst, (96, 128))

    # "auto": first pass as is, then again at TRAIN_DIAMETER / median diameter of confident nuclei
    sizes.clear()
    first = predictor(image, diameter=0)["instances"]
    confident = first.pred_masks[first.scores >= predictor.diameter_score_thresh]
    found = median_diameter(confident.sum(dim=(1, 2)).numpy())
    scale = float(np.clip(train / found, 0.25, 4.0))
    sizes.clear()
    auto = predictor(image, diameter="auto")["instances"]
    expected = (96, 128) if abs(scale - 1) <= 0.05 else (round(96 * scale), round(128 * scale))
    # a third pass only refines the estimate made on the rescaled second one
    assert sizes[:2] == [(96, 128), expected][: 1 if expected == (96, 128) else 2]
    assert len(sizes) <= AUTO_MAX_PASSES
    assert auto.image_size == (96, 128) and auto.pred_masks.shape[1:] == (96, 128)


def test_auto_diameter_without_confident_nuclei_keeps_the_first_pass(cfg):
    cfg.NUCLEUS.PREDICT.DIAMETER_SCORE_THRESH = 1.0  # nothing is confident enough to size (random weights)
    predictor = NucleusPredictor(cfg)
    sizes = record_input_sizes(predictor)
    image = blobs((64, 64), np.uint16, seed=5)
    with pytest.warns(UserWarning, match="image 0: diameter 'auto' is unsure") as caught:
        auto = predictor(image, diameter=-1)["instances"]
    # nothing at the input scale: tried at the scale the image's own blobs suggest, then gave up, saying so
    blob = predictor.last_scales[0].image_diameter
    assert blob and any("found nothing, nothing" in str(w.message) for w in caught)
    expected = round(64 * predictor.train_diameter / blob)
    assert sizes == [(64, 64), (expected, expected)]
    assert not predictor.last_scales[0].sure and predictor.last_scales[0].scale == 1.0
    plain = predictor(image, diameter=0)["instances"]
    assert torch.equal(auto.pred_masks, plain.pred_masks)


def test_bad_input_is_refused_clearly(cfg):
    predictor = NucleusPredictor(cfg)
    with pytest.raises(ImageReadError, match="split a stack of planes"):
        predictor(np.zeros((5, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="diameter"):
        predictor(np.zeros((32, 32), np.uint8), diameter="big")


def test_input_is_normalised_as_in_training(cfg):
    """A 16-bit image and its 8-bit normalised version give the same prediction."""
    predictor = NucleusPredictor(cfg)
    image = blobs((80, 96), np.uint16, seed=6)
    norm = normalize_from_cfg(image, cfg)
    cfg8 = cfg.clone()
    cfg8.INPUT.NORMALIZE.METHOD = "none"
    cfg8.INPUT.NORMALIZE.INVERT = "never"
    a = predictor(image)["instances"]
    predictor.cfg = cfg8  # same model, pass-through normalisation
    b = predictor(norm)["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_masks, b.pred_masks)


def random_proposals(sizes, levels, seed):
    """RPN outputs as detectron2 hands them to find_top_rpn_proposals: per level (B, n, 4) boxes, logits."""
    g = torch.Generator().manual_seed(seed)
    boxes, logits = [], []
    for n in levels:
        xy = torch.rand(len(sizes), n, 2, generator=g) * 120 - 10
        wh = torch.rand(len(sizes), n, 2, generator=g) * 40
        box = torch.cat([xy, xy + wh], dim=2)
        box[:, ::37, 2] = box[:, ::37, 0]  # some empty boxes
        logit = torch.randn(len(sizes), n, generator=g)
        logit[:, 5:9] = logit[:, 4:5]  # exact ties
        boxes.append(box)
        logits.append(logit)
    boxes[0][0, 3, 1] = float("nan")  # a diverged box is dropped, as detectron2 does
    return boxes, logits


@pytest.fixture(params=["serial", "fixed_point"])
def nms_path(request, monkeypatch):
    """Both NMS paths on this CPU: torchvision's serial kernel per group (the CPU default) and the GPU's
    parallel fixed point."""
    from nucleus_seg.modeling import fast_inference

    if request.param == "fixed_point":
        monkeypatch.setattr(fast_inference, "SERIAL_NMS_DEVICES", ())
    return request.param


@pytest.mark.parametrize("groups_per_chunk", [None, 10])
def test_both_nms_paths_keep_what_torchvision_keeps(nms_path, groups_per_chunk, monkeypatch):
    """Every group as torchvision's nms keeps it, also when the fixed point takes the groups a few at a time
    (an H200 batch of 32 images is several chunks: a loop variable reused across chunks once left every
    chunk after the first mostly unprocessed, and whole images without detections)."""
    import torchvision

    from nucleus_seg.modeling import fast_inference
    from nucleus_seg.modeling.fast_inference import batched_nms_keep

    if groups_per_chunk:
        monkeypatch.setattr(fast_inference, "NMS_CHUNK", groups_per_chunk * 400 * 400)

    g = torch.Generator().manual_seed(3)
    groups, n = 25, 400
    xy = torch.rand(groups, n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(groups, n, 2, generator=g) * 60], dim=2)
    scores = torch.rand(groups, n, generator=g)
    scores[:, 20:30] = scores[:, 19:20]  # exact ties: the visiting order must be torchvision's stable one
    valid = torch.rand(groups, n, generator=g) > 0.1
    valid[4] = False  # an empty group
    keep = batched_nms_keep(boxes, scores, valid, 0.5)
    for i in range(groups):
        idx = valid[i].nonzero().squeeze(1)
        want = torch.zeros(n, dtype=torch.bool)
        want[idx[torchvision.ops.nms(boxes[i, idx], scores[i, idx], 0.5)]] = True
        assert torch.equal(keep[i], want)
    assert keep[:4].sum() > 0 and keep[5:].sum(dim=1).min() > 0 and not keep[~valid].any()


@pytest.mark.parametrize("threshold", [0.7, 0.5, 1 / 3])
def test_nms_at_the_threshold_decides_as_torchvision(nms_path, threshold):
    """IoUs one float32 step either side of a threshold that float32 cannot hold (0.7): the fixed point compares
    float32 IoUs with the largest float32 at or below it, which decides as torchvision's float64 comparison."""
    import torchvision

    from nucleus_seg.modeling.fast_inference import batched_nms_keep

    side = torch.tensor(threshold * 10, dtype=torch.float32)
    heights = [side]
    for _ in range(40):  # box j covers the first box but for its height: IoU = height / 10, steps apart
        heights.append(torch.nextafter(heights[-1], torch.tensor(11.0)))
        heights.insert(0, torch.nextafter(heights[0], torch.tensor(0.0)))
    n = len(heights) + 1
    boxes = torch.zeros(n, n, 4)  # group j: the reference box and box j (each pair alone)
    scores = torch.zeros(n, n)
    valid = torch.zeros(n, n, dtype=torch.bool)
    for j, height in enumerate(heights, start=1):
        boxes[j, 0] = torch.tensor([0.0, 0.0, 10.0, 10.0])
        boxes[j, j] = torch.stack([torch.tensor(0.0), torch.tensor(0.0), torch.tensor(10.0), height])
        scores[j, 0], scores[j, j] = 1.0, 0.5
        valid[j, 0] = valid[j, j] = True
    keep = batched_nms_keep(boxes, scores, valid, threshold)
    outcomes = set()
    for j in range(1, n):
        idx = valid[j].nonzero().squeeze(1)
        want = torch.zeros(n, dtype=torch.bool)
        want[idx[torchvision.ops.nms(boxes[j, idx], scores[j, idx], threshold)]] = True
        assert torch.equal(keep[j], want), (j, heights[j - 1].item())
        outcomes.add(bool(want[j]))
    assert outcomes == {True, False}  # the steps straddle the threshold


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("levels", [(150, 60, 20), (900, 700, 300)])  # torchvision's offset trick / per level
def test_batched_rpn_proposals_equal_detectron2s(levels, training, nms_path):
    """At inference and in training (NUCLEUS.TRAIN.BATCHED_PROPOSALS, with the training counts): detectron2's
    proposals. A non-finite box is dropped at inference, as there; in training it is detectron2's divergence
    error, not a silently dropped box."""
    from types import SimpleNamespace

    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals

    from nucleus_seg.modeling.fast_inference import _fast_predict_proposals

    sizes = [(100, 110), (90, 120), (100, 110)]
    boxes, logits = random_proposals(sizes, levels, seed=len(levels) + levels[0])
    if training:
        boxes[0][0, 3, 1] = 5.0  # finite: a NaN stops training (below)
    pre, post = (700, 400) if training else (500, 300)
    rpn = SimpleNamespace(training=training, _decode_proposals=lambda anchors, deltas: boxes, min_box_size=0.0,
                          pre_nms_topk={training: pre, not training: 50},
                          post_nms_topk={training: post, not training: 10}, nms_thresh=0.7)
    ours = _fast_predict_proposals(rpn, None, logits, None, sizes)
    ref = find_top_rpn_proposals(boxes, logits, sizes, 0.7, pre, post, 0.0, training)
    for a, b in zip(ours, ref):
        assert a.image_size == b.image_size and len(a) == len(b) > 10
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
    if training:
        logits[1][2, 7] = float("inf")
        with pytest.raises(FloatingPointError, match="Training has diverged"):
            find_top_rpn_proposals(boxes, logits, sizes, 0.7, pre, post, 0.0, True)
        with pytest.raises(FloatingPointError, match="Training has diverged"):
            _fast_predict_proposals(rpn, None, logits, None, sizes)


@pytest.mark.parametrize("count,topk", [(300, 50), (1200, -1)])  # offset trick / per-class path on CPU
def test_batched_box_inference_equals_detectron2s(count, topk, nms_path):
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

    from nucleus_seg.modeling.fast_inference import batched_fast_rcnn_inference

    g = torch.Generator().manual_seed(count)
    sizes = [(100, 110), (80, 120)]
    counts = [count, count - 17]
    boxes, probs = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 120 - 10
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40], dim=1))
        fg = torch.rand(n, 1, generator=g)
        if count < 1000:  # ties; torchvision's per-class branch orders them by an unstable sort
            fg[10:14] = fg[9]
        probs.append(torch.cat([fg, 1 - fg], dim=1))
    ours, _ = batched_fast_rcnn_inference(boxes, probs, sizes, 0.05, 0.4, topk)
    ref, _ = fast_rcnn_inference(boxes, probs, sizes, 0.05, 0.4, topk)
    for a, b in zip(ours, ref):
        assert len(a) == len(b) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)


def test_cascade_proposals_of_a_batch_equal_detectron2s_per_image_clip(cfg):
    """The cascade's next-stage proposals: clipped to each image as ``Boxes.clip`` does (images with different
    box counts and sizes, boxes past every edge), and a non-finite box still stops it with detectron2's error."""
    from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads

    from nucleus_seg.modeling.fast_inference import _fast_create_proposals_from_boxes

    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    heads = NucleusPredictor(cfg).model.roi_heads
    assert heads._create_proposals_from_boxes.__func__ is _fast_create_proposals_from_boxes
    g = torch.Generator().manual_seed(5)
    sizes = [(100, 110), (80, 120), (64, 64)]
    boxes = [torch.rand(n, 4, generator=g) * 200 - 50 for n in (30, 0, 17)]
    ours = heads._create_proposals_from_boxes(boxes, sizes)
    ref = CascadeROIHeads._create_proposals_from_boxes(heads, [b.clone() for b in boxes], sizes)
    assert [p.image_size for p in ours] == sizes
    for a, b in zip(ours, ref):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
    assert float(ours[0].proposal_boxes.tensor.max()) == 110.0 and float(ours[2].proposal_boxes.tensor.min()) == 0.0
    boxes[2][3, 1] = float("nan")
    with pytest.raises(AssertionError, match="infinite or NaN"):
        heads._create_proposals_from_boxes(boxes, sizes)


def test_cascade_later_stages_skip_proposals_that_cannot_reach_the_threshold(cfg):
    """Later stages run only on the proposals whose scores so far can still average above the final threshold
    (stage two above 2/3, stage three above 1/3); the detections are those of every proposal through every
    stage. At 1/3 or below every proposal goes through."""
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    cfg.NUCLEUS.PREDICT.DIAMETER = 0.0  # one pass per batch
    predictor = NucleusPredictor(cfg)
    heads = predictor.model.roi_heads
    images = [blobs((128, 128), np.uint16, seed=s) for s in (3, 4)]
    logits = []  # random weights score ~0.5: spread each stage's scores over (0, 1), most of them high
    hooks = [stage.cls_score.register_forward_hook(lambda module, args, out: logits.append(out[:, 0] - out[:, 1]))
             for stage in heads.box_predictor]
    predictor.predict_batch(images)
    with torch.no_grad():
        for stage, hook, logit in zip(heads.box_predictor, hooks, logits):
            hook.remove()
            spread = 3 / float(logit.std())
            stage.cls_score.weight.mul_(spread)
            stage.cls_score.bias.mul_(spread)
            stage.cls_score.bias[0] += 2 - float(logit.median()) * spread
    rois = []
    for k, head in enumerate(heads.box_head):
        head.register_forward_hook(lambda module, args, out, k=k: rois.append((k, out.shape[0])))

    def detect(thresh: float, early_exit: bool) -> tuple[list, list]:
        rois.clear()
        heads.cascade_early_exit = early_exit
        heads.box_predictor[-1].test_score_thresh = thresh  # what MODEL.ROI_HEADS.SCORE_THRESH_TEST sets
        return [x["instances"] for x in predictor.predict_batch(images)], list(rois)

    for thresh in (0.8, 0.95):
        ours, seen = detect(thresh, True)
        every, seen_every = detect(thresh, False)
        assert [n for _, n in seen_every] == [seen_every[0][1]] * 3
        assert seen[0] == seen_every[0] and seen[1][1] < seen[0][1] and seen[2][1] <= seen[1][1]
        assert sum(len(x) for x in every) > 0
        for a, b in zip(ours, every):
            assert len(a) == len(b) and bool((a.scores > thresh).all())
            assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4)
            assert torch.allclose(a.scores, b.scores, atol=1e-6)
            assert torch.equal(a.pred_masks, b.pred_masks)
    _, seen = detect(0.6, True)  # above 1/3: the third stage skips some
    assert seen[1][1] == seen[0][1] > seen[2][1]
    _, seen = detect(0.3, True)
    assert [n for _, n in seen] == [seen[0][1]] * 3
    nothing, seen = detect(1.01, True)  # no score reaches it: no proposal left for stages two and three
    assert [n for _, n in seen[1:]] == [0, 0] and [len(x) for x in nothing] == [0, 0]


@pytest.mark.parametrize("heads", ["StandardROIHeads", "CascadeROIHeads"])
def test_fast_and_detectron2_inference_give_the_same_detections(cfg, heads, nms_path):
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000  # > 4000 box coordinates: torchvision's per-level branch
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 300
    cfg.MODEL.ROI_HEADS.NAME = heads
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = heads == "CascadeROIHeads"
    fast = NucleusPredictor(cfg)
    plain = NucleusPredictor(cfg, fast=False)
    plain.model.load_state_dict(fast.model.state_dict())
    image = blobs((128, 128), np.uint16, seed=7)
    a, b = fast(image)["instances"], plain(image)["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_masks, b.pred_masks)
    if heads == "CascadeROIHeads":  # the comparison is between the two paths
        from nucleus_seg.modeling.fast_inference import _fast_cascade_forward_box

        assert fast.model.roi_heads._forward_box.__func__ is _fast_cascade_forward_box
        assert "_forward_box" not in vars(plain.model.roi_heads)


def test_auto_diameter_tiled_and_untiled_agree(cfg):
    """Both paths estimate the size from the same first pass and rescale alike (one tile here)."""
    predictor = NucleusPredictor(cfg)
    image = blobs((60, 76), np.uint16, seed=8)
    untiled = predictor.predict_labels([image], diameter="auto")[0]
    tiled = predictor.predict_large(image, tile=512, overlap=64, diameter="auto")
    assert len(untiled) > 0
    np.testing.assert_array_equal(tiled.labels, untiled.labels)


def test_cpu_inference_runs_in_bfloat16_where_the_cpu_has_it(cfg):
    cfg.NUCLEUS.PREDICT.AMP = True
    predictor = NucleusPredictor(cfg)
    expected = torch.bfloat16 if cpu_has_native_bfloat16() else None
    assert predictor.amp_dtype == expected
    seen = []
    stem = predictor.model.backbone.bottom_up.stem.conv1
    stem.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    out = predictor(blobs((96, 96)))["instances"]
    assert seen == [expected or torch.float32]
    assert out.pred_masks.shape[1:] == (96, 96) and out.pred_masks.dtype == torch.bool
    assert out.scores.dtype == torch.float32  # outputs in full precision whatever ran inside
    cfg.NUCLEUS.PREDICT.AMP = False
    assert NucleusPredictor(cfg).amp_dtype is None


def test_inference_autocast_shares_no_weight_casts_between_threads(cfg, monkeypatch):
    """PyTorch's autocast weight-cast cache is one for all threads and emptied when any thread leaves autocast:
    with tile batches in flight on two threads (STREAMS 2, a CUDA stream each) a forward could use weights cast
    on the other stream. Every inference autocast region runs without it, on the tile batcher's threads too."""
    cfg.NUCLEUS.PREDICT.STREAMS = 2
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 2
    predictor = NucleusPredictor(cfg)
    predictor.amp, predictor.amp_dtype = True, torch.bfloat16  # what a GPU runs (float16 there)
    regions = []
    real = torch.autocast

    def recording(*args, **kwargs):
        regions.append(kwargs.get("cache_enabled", True) if kwargs.get("enabled", True) else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    batcher = predictor.tile_batcher(tile=64, overlap=16)
    done = batch_tiles(predictor, batcher, [blobs((100, 124), seed=2)])
    batcher.close()
    assert len(done) == 1 and len(done[0][1].stitch()[0]) > 0
    entered = [r for r in regions if r is not None]  # regions that switch autocast off hold no cache either
    assert len(entered) >= 3 and not any(entered)  # 6 tiles in batches of 2, each forward in its own region


def test_label_outputs_run_the_mask_head_only_on_kept_detections(cfg):
    predictor = NucleusPredictor(cfg)
    image = blobs((100, 124), np.uint16, seed=2)
    inst = predictor(image)["instances"]
    thresh = float(inst.scores.median())  # a threshold equal to a score: ">=" must keep that one
    keep = inst.scores >= thresh
    assert 0 < keep.sum() < len(inst)
    expected = kept_as_labels(inst, keep)
    rois = []
    predictor.model.roi_heads.mask_head.predictor.register_forward_hook(
        lambda module, args, out: rois.append(out.shape[0]))
    got = predictor.predict_labels([image], score_thresh=thresh)[0]
    assert rois == [int(keep.sum())]  # the mask head saw only the kept detections
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.scores, expected.scores)
    np.testing.assert_allclose(got.boxes, expected.boxes)
    assert predictor.model.roi_heads.box_predictor.test_score_thresh == cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST


def test_auto_diameter_does_not_depend_on_the_output_threshold(cfg):
    """nucleus-eval --tune scores every output threshold from one pass: that is exact only if the output
    threshold leaves the estimated scale alone, so labels at any threshold = one pass's instances filtered."""
    cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER = 30.0  # far from what the random model finds: a rescaled pass
    predictor = NucleusPredictor(cfg)
    sizes = record_input_sizes(predictor)
    image = blobs((96, 128), np.uint16, seed=4)
    inst = predictor(image, diameter="auto")["instances"]
    passes = list(sizes)
    thresh = float(inst.scores.median())  # above DIAMETER_SCORE_THRESH: it must not size the image
    assert thresh > predictor.diameter_score_thresh and len(passes) > 1
    sizes.clear()
    got = predictor.predict_labels([image], diameter="auto", score_thresh=thresh)[0]
    assert sizes == passes
    expected = kept_as_labels(inst, inst.scores >= thresh)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.scores, expected.scores)


def test_flip_boxes_is_its_own_inverse_and_mirrors():
    from nucleus_seg.inference.tta import FLIPS, flip_boxes

    boxes = torch.tensor([[2.0, 3.0, 10.0, 7.0], [0.0, 0.0, 40.0, 30.0]])
    for f in FLIPS:
        assert torch.equal(flip_boxes(flip_boxes(boxes, f, 30, 40), f, 30, 40), boxes)
    assert flip_boxes(boxes, (True, False), 30, 40)[0].tolist() == [30.0, 3.0, 38.0, 7.0]
    assert flip_boxes(boxes, (False, True), 30, 40)[0].tolist() == [2.0, 23.0, 10.0, 27.0]


def test_flip_fusion_averages_boxes_and_discounts_nuclei_seen_in_few_views():
    from nucleus_seg.inference.tta import fuse_flip_detections

    a = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    b = torch.tensor([[12.0, 10.0, 22.0, 20.0]])  # the same nucleus, 2 px off (IoU 0.67)
    lone = torch.tensor([[50.0, 50.0, 60.0, 60.0]])
    none = torch.zeros((0, 4))
    boxes, scores = fuse_flip_detections(
        [torch.cat([a, lone]), b, a, none],
        [torch.tensor([0.9, 0.8]), torch.tensor([0.9]), torch.tensor([0.6]), torch.zeros(0)], 0.5, 100)
    assert len(boxes) == 2
    # box: score-weighted mean of the three matching views; score: mean over 4 views of the best match
    assert torch.allclose(boxes[0], (0.9 * a[0] + 0.9 * b[0] + 0.6 * a[0]) / 2.4)
    assert scores[0].item() == pytest.approx((0.9 + 0.9 + 0.6 + 0.0) / 4)
    assert torch.equal(boxes[1], lone[0]) and scores[1].item() == pytest.approx(0.8 / 4)


def test_flip_tta_predictions_are_flip_equivariant(cfg):
    """Averaged over all four flips, the prediction of a mirrored image is the mirrored prediction."""
    cfg.NUCLEUS.PREDICT.TTA = True
    predictor = NucleusPredictor(cfg)
    image = blobs((96, 128), np.uint16, seed=3)
    a = predictor(image)["instances"]
    b = predictor(np.ascontiguousarray(image[:, ::-1]))["instances"]
    assert len(a) == len(b) > 0 and a.pred_masks.shape == (len(a), 96, 128)
    order_a, order_b = torch.argsort(a.scores), torch.argsort(b.scores)
    assert torch.allclose(a.scores[order_a], b.scores[order_b], atol=1e-4)
    mirrored = b.pred_boxes.tensor[order_b][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + \
        torch.tensor([128.0, 0, 128, 0])
    assert torch.allclose(a.pred_boxes.tensor[order_a], mirrored, atol=1e-2)
    masks_a, masks_b = a.pred_masks[order_a], b.pred_masks[order_b].flip(2)
    agree = (masks_a == masks_b).float().mean(dim=(1, 2))
    assert agree.min() > 0.995
    # label outputs go through the same path
    labels = predictor.predict_labels([image])[0]
    assert len(labels) == int((a.scores >= predictor.score_thresh).sum())


@pytest.mark.slow
def test_cascade_heads_keep_the_score_floor_exact_and_run_flip_tta(cfg):
    """Cascade R-CNN (a config away): its last stage's threshold is the one the label outputs move, and the
    flip TTA path fuses the cascade's final boxes."""
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    predictor = NucleusPredictor(cfg)
    stages = predictor.model.roi_heads.box_predictor
    assert isinstance(stages, torch.nn.ModuleList) and len(stages) == 3
    image = blobs((100, 124), np.uint16, seed=2)
    inst = predictor(image)["instances"]
    thresh = float(inst.scores.median())
    keep = inst.scores >= thresh
    assert 0 < keep.sum() < len(inst)
    rois = []
    predictor.model.roi_heads.mask_head.predictor.register_forward_hook(
        lambda module, args, out: rois.append(out.shape[0]))
    got = predictor.predict_labels([image], score_thresh=thresh)[0]
    assert rois == [int(keep.sum())]
    np.testing.assert_array_equal(got.labels, kept_as_labels(inst, keep).labels)
    assert stages[-1].test_score_thresh == cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST

    cfg.NUCLEUS.PREDICT.TTA = True
    tta = NucleusPredictor(cfg)
    tta.model.load_state_dict(predictor.model.state_dict())
    a = tta(image)["instances"]
    b = tta(np.ascontiguousarray(image[:, ::-1]))["instances"]
    assert len(a) == len(b) > 0
    assert torch.allclose(torch.sort(a.scores).values, torch.sort(b.scores).values, atol=1e-4)


def test_a_cuda_config_predicts_on_the_cpu_when_there_is_no_gpu(caplog):
    """The README's snippet with the scratch config (MODEL.DEVICE cuda, detectron2's default) on a CPU machine."""
    import logging

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml", ["NUCLEUS.PREDICT.AMP", "False",
                                                                     "TEST.DETECTIONS_PER_IMAGE", "20"])
    assert cfg.MODEL.DEVICE == "cuda"
    with caplog.at_level(logging.WARNING, logger="nucleus_seg"), pytest.warns(UserWarning, match="random weights"):
        predictor = NucleusPredictor(cfg)
    assert predictor.device.type == "cpu" and "running on the CPU" in caplog.text
    out = predictor(blobs((64, 64), np.uint16, seed=3))["instances"]
    assert out.image_size == (64, 64) and out.pred_masks.device.type == "cpu"


def test_weights_of_another_model_are_refused_naming_the_config_to_use(tmp_path):
    from detectron2.modeling import build_model

    from nucleus_seg.inference.predictor import CheckpointMismatch

    demo = get_nucleus_cfg("configs/nucleus_R101_FPN_cpu_demo.yaml")  # 2-fc box head
    torch.manual_seed(0)
    weights = tmp_path / "train" / "model_final.pth"
    weights.parent.mkdir()
    torch.save({"model": build_model(demo).state_dict()}, weights)
    (weights.parent / "config.yaml").write_text(demo.dump())
    scratch = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml", ["MODEL.DEVICE", "cpu",
                                                                         "MODEL.WEIGHTS", str(weights)])
    with pytest.raises(CheckpointMismatch) as exc:
        NucleusPredictor(scratch)  # 4-conv GN box head
    message = str(exc.value)
    assert str(weights) in message and f"--config-file {weights.parent / 'config.yaml'}" in message
    assert "box_head" in message
    NucleusPredictor(get_nucleus_cfg(str(weights.parent / "config.yaml"), ["MODEL.WEIGHTS", str(weights)]))


@pytest.mark.parametrize("zip_format", [True, False])
def test_the_checkpoint_sets_every_parameter_when_random_init_is_skipped(tmp_path, zip_format, monkeypatch):
    """With MODEL.WEIGHTS the model is built without torch.nn.init's fills and the checkpoint read memory-mapped
    (a legacy-format file read as before): every parameter and buffer is the checkpoint's, optimizer state
    alongside is no obstacle, and torch.nn.init works again afterwards."""
    from detectron2.modeling import build_model

    init_fill = torch.nn.init.kaiming_uniform_
    cfg = get_nucleus_cfg("configs/nucleus_R18_FPN_cpu_demo.yaml", ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(1)
    state = build_model(cfg).state_dict()
    weights = tmp_path / "model_final.pth"
    torch.save({"model": state, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}}, "iteration": 9},
               weights, _use_new_zipfile_serialization=zip_format)
    cfg.MODEL.WEIGHTS = str(weights)
    fills = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda *a, **k: fills.append(1) or init_fill(*a, **k))
    loaded = NucleusPredictor(cfg).model.state_dict()
    assert fills == []  # the convolutions' default init was skipped
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.nn.Linear(4, 4)
    assert fills == [1]  # and is back


def test_a_few_nan_pixels_do_not_blank_the_prediction(tiny_cfg):
    raw = blobs((96, 96), np.uint16, seed=5).astype(np.float32) / 65535
    spoilt = raw.copy()
    spoilt[[3, 40, 77], [9, 41, 90]] = np.nan
    tiny_cfg.NUCLEUS.PREDICT.SCORE_THRESH = 0.05
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        predictor = NucleusPredictor(tiny_cfg)
    clean = len(predictor(raw)["instances"])
    assert clean > 0
    assert len(predictor(spoilt)["instances"]) >= 0.8 * clean  # was 0: NaN made every pixel NaN


def test_boxes_are_brought_back_to_full_resolution_after_a_diameter_rescale(tiny_cfg):
    """predictor(image, diameter=2*D) sees the image at half size; its boxes must be twice those the model
    finds on that half-size input (deleting the rescale back left every box in the top-left quarter)."""
    from detectron2.data import transforms as T

    tiny_cfg.merge_from_list(["INPUT.NORMALIZE.METHOD", "none", "INPUT.NORMALIZE.INVERT", "never",
                              "NUCLEUS.PREDICT.SCORE_THRESH", "0.05"])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        predictor = NucleusPredictor(tiny_cfg)
    big = blobs((192, 160), np.uint8, seed=7, channels=3)
    half = T.ResizeTransform(192, 160, 96, 80).apply_image(big)  # what the model is given at scale 0.5
    d = predictor.train_diameter
    at_half = predictor(half, diameter=d)["instances"]
    at_full = predictor(big, diameter=2 * d)["instances"]
    assert len(at_half) > 0 and len(at_full) == len(at_half)
    assert at_full.image_size == (192, 160)
    torch.testing.assert_close(at_full.pred_boxes.tensor, at_half.pred_boxes.tensor * 2)
    torch.testing.assert_close(at_full.scores, at_half.scores)


def record_batches(predictor: NucleusPredictor, fail_on: int | None = None,
                   fail_shape: tuple[int, ...] | None = None) -> list[list[tuple[int, ...]]]:
    """The input shapes of each forward the predictor runs, one list per forward; forward number ``fail_on``
    (0-based), or any forward of inputs of ``fail_shape``, raises instead (a GPU out of memory, say)."""
    batches = []
    real = predictor._forward

    def spy(arrays, *args, **kwargs):
        batches.append([a.shape for a in arrays])
        if len(batches) - 1 == fail_on or arrays[0].shape == fail_shape:
            raise RuntimeError("out of memory (injected)")
        return real(arrays, *args, **kwargs)

    predictor._forward = spy
    return batches


def batch_tiles(predictor: NucleusPredictor, batcher, images: list[np.ndarray]) -> list[tuple]:
    """Each image through the tile batcher at scale 1 (keys 0..N-1), flushed: every ``(key, result)``."""
    done = []
    for key, image in enumerate(images):
        done += batcher.add(key, predictor.normalize(image), 1.0)
    return done + batcher.flush()


@pytest.mark.parametrize("streams", [1, 2])
def test_tile_batcher_fills_batches_across_images_and_equals_predict_large(cfg, streams):
    """Tiles of consecutive images share forwards (full batches), tiles of another shape never share one
    (GroupNorm would see padding), and each image stitched from its TiledDetections equals predict_large;
    with two streams (two batches in flight, each on its own thread) too."""
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 5
    cfg.NUCLEUS.PREDICT.STREAMS = streams
    predictor = NucleusPredictor(cfg)
    images = [blobs((100, 124), seed=2), blobs((150, 230), seed=3), blobs((60, 200), seed=6)]
    expected = [predictor.predict_large(image, tile=96, overlap=32, diameter=0) for image in images]
    batches = record_batches(predictor)
    batcher = predictor.tile_batcher(tile=96, overlap=32)
    done = batch_tiles(predictor, batcher, images)
    batcher.close()
    assert [key for key, _ in done] == [0, 1, 2]
    # 4 + 8 tiles of 96x96, then 3 of 60x96: batches run across images, never across shapes (two stream
    # threads may start theirs in either order)
    expected_batches = [[(96, 96, 3)] * 5, [(96, 96, 3)] * 5, [(96, 96, 3)] * 2, [(60, 96, 3)] * 3]
    assert sorted(batches) == sorted(expected_batches)
    assert predictor.model.roi_heads.box_predictor.test_score_thresh == cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    for key, tiled in done:
        pred, num_cut = tiled.stitch()
        assert len(pred) > 0
        np.testing.assert_array_equal(pred.labels, expected[key].labels)
        # other batch company: the same detections, scores equal to float rounding on CPU
        np.testing.assert_allclose(pred.scores, expected[key].scores, rtol=1e-5)
        np.testing.assert_allclose(pred.boxes, expected[key].boxes, rtol=1e-5)


@pytest.mark.parametrize("streams", [1, 2])
def test_tile_batches_out_of_gpu_memory_run_in_halves_and_every_image_comes_back(cfg, streams):
    """nucleus-predict's batcher when a forward of more than two tiles runs out of GPU memory (raised by the model
    here): every image comes back, stitched as predict_large has it, with later batches of two tiles."""
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 5
    cfg.NUCLEUS.PREDICT.STREAMS = streams
    predictor = NucleusPredictor(cfg)
    images = [blobs((100, 124), seed=2), blobs((150, 230), seed=3)]
    expected = [predictor.predict_large(image, tile=96, overlap=32, diameter=0) for image in images]
    sizes = record_input_sizes(predictor)
    spied = predictor.model.inference

    def inference(batched_inputs, *args, **kwargs):
        if len(batched_inputs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return spied(batched_inputs, *args, **kwargs)

    predictor.model.inference = inference
    batcher = predictor.tile_batcher(tile=96, overlap=32)
    with pytest.warns(UserWarning, match="GPU out of memory with 5 inputs of 96x96 px"):
        done = batch_tiles(predictor, batcher, images)
    batcher.close()
    assert sorted(key for key, _ in done) == [0, 1]
    assert predictor.batch_size == 2 and len(sizes) == 4 + 8  # every tile once
    for key, tiled in done:
        pred, _ = tiled.stitch()
        assert len(pred) > 0
        np.testing.assert_array_equal(pred.labels, expected[key].labels)


def test_a_failed_tile_batch_fails_only_the_images_in_it(cfg):
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 3
    predictor = NucleusPredictor(cfg)
    images = [blobs((150, 230), seed=3), blobs((100, 124), seed=2), blobs((100, 124), seed=5)]
    record_batches(predictor, fail_on=2)  # the batch holding image 0's last tiles and image 1's first
    batcher = predictor.tile_batcher(tile=96, overlap=32)
    done = batch_tiles(predictor, batcher, images)
    results = dict(done)
    assert sorted(results) == [0, 1, 2]  # every image comes back, once
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert len(results[2].stitch()[0]) > 0
    small = predictor.normalize(blobs((64, 64), seed=7))  # one tile: stays queued, short of a batch
    assert batcher.add("small", small, 1.0) == []
    with pytest.raises(ValueError, match="already queued"):
        batcher.add("small", small, 1.0)


def test_with_two_streams_a_failed_batch_fails_only_its_image(cfg):
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 3
    cfg.NUCLEUS.PREDICT.STREAMS = 2
    predictor = NucleusPredictor(cfg)
    images = [blobs((150, 230), seed=3), blobs((60, 200), seed=6), blobs((100, 124), seed=2)]
    record_batches(predictor, fail_shape=(60, 96, 3))  # image 1's tiles: one batch of their own
    batcher = predictor.tile_batcher(tile=96, overlap=32)
    done = batch_tiles(predictor, batcher, images)
    batcher.close()
    results = dict(done)
    assert sorted(results) == [0, 1, 2] and len(done) == 3
    assert isinstance(results[1], RuntimeError)
    assert len(results[0].stitch()[0]) > 0 and len(results[2].stitch()[0]) > 0


@pytest.mark.parametrize("boundary_level, min_edge", [(0.0, 0.0), (0.4, 0.0), (0.4, 5.0)])
def test_image_based_steps_give_the_same_labels_on_every_path(cfg, boundary_level, min_edge):
    """Random weights also outline patches of plain background: MIN_SIGNIFICANCE removes those, MIN_EDGE_SIGNIFICANCE
    those with no step at their edge, and BOUNDARY_LEVEL moves the others' boundaries on every path
    (predict_labels, predict_batch at the output threshold, predict_large) exactly as finish_labels treats the
    plain prediction."""
    from nucleus_seg.inference.postprocess import finish_labels

    image = blobs((100, 124), np.uint16, seed=2)
    torch.manual_seed(0)
    plain = NucleusPredictor(cfg)
    raw = plain.predict_labels([image])[0]
    norm = plain.normalize(image)
    expected = finish_labels(raw, norm, 5.0, boundary_level, min_edge)
    judged = finish_labels(raw, norm, 5.0, 0.0)
    edged = finish_labels(raw, norm, 5.0, 0.0, min_edge)
    assert 0 < len(judged) < len(raw) and len(expected) == len(edged)
    assert 0 < len(edged) < len(judged) if min_edge else edged.labels.tolist() == judged.labels.tolist()
    assert (expected.labels != edged.labels).any() == (boundary_level > 0)
    cfg.NUCLEUS.PREDICT.MIN_SIGNIFICANCE = 5.0
    cfg.NUCLEUS.PREDICT.MIN_EDGE_SIGNIFICANCE = min_edge
    cfg.NUCLEUS.PREDICT.BOUNDARY_LEVEL = boundary_level
    torch.manual_seed(0)
    predictor = NucleusPredictor(cfg)
    for pred in (predictor.predict_labels([image])[0], predictor.predict_large(image, tile=128, overlap=32)):
        np.testing.assert_array_equal(pred.labels, expected.labels)
        np.testing.assert_array_equal(pred.scores, expected.scores)
    inst = predictor(image)["instances"]
    np.testing.assert_array_equal(kept_as_labels(inst, inst.scores >= predictor.score_thresh).labels, expected.labels)
    for key, bad in (("MIN_SIGNIFICANCE", -1.0), ("MIN_EDGE_SIGNIFICANCE", -1.0), ("BOUNDARY_LEVEL", 1.0)):
        wrong = cfg.clone()
        wrong.NUCLEUS.PREDICT[key] = bad
        with pytest.raises(ValueError, match=key):
            NucleusPredictor(wrong)


def test_nucleus_predicts_writer_judges_batched_tiles_as_predict_large(cfg, tmp_path):
    """nucleus-predict stitches batched tiles in a writer: with MIN_SIGNIFICANCE, MIN_EDGE_SIGNIFICANCE and
    BOUNDARY_LEVEL its label TIFF is what predict_large gives (the same detections dropped, the same boundaries
    moved)."""
    import tifffile

    from nucleus_seg.inference.batch import stitch_and_write

    cfg.NUCLEUS.PREDICT.MIN_SIGNIFICANCE = 5.0
    cfg.NUCLEUS.PREDICT.MIN_EDGE_SIGNIFICANCE = 5.0
    cfg.NUCLEUS.PREDICT.BOUNDARY_LEVEL = 0.4
    predictor = NucleusPredictor(cfg)
    image = blobs((150, 230), seed=3)
    expected = predictor.predict_large(image, tile=96, overlap=32, diameter=0)
    predictor.min_significance = predictor.min_edge_significance = predictor.boundary_level = 0.0
    assert 0 < len(expected) < len(predictor.predict_large(image, tile=96, overlap=32, diameter=0))
    batcher = predictor.tile_batcher(tile=96, overlap=32)
    [(_, tiled)] = batch_tiles(predictor, batcher, [image])
    batcher.close()
    stitch_and_write(tmp_path, {"labels"}, tmp_path / "field.tif", image, tiled, cfg)
    [written] = list(tmp_path.glob("field*.tif"))
    np.testing.assert_array_equal(tifffile.imread(written), expected.labels)


def test_auto_trusts_no_pass_whose_instances_are_all_noise(cfg):
    """With MIN_SIGNIFICANCE beyond any instance, every pass of "auto" found only noise: the image is predicted
    unscaled and the warning says so (the wiring of the predictor's noise share into choose_scale)."""
    cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER = 17.0
    cfg.NUCLEUS.PREDICT.MIN_SIGNIFICANCE = 1e9
    image = blobs((100, 124), np.uint16, seed=2)
    predictor = NucleusPredictor(cfg)
    with pytest.warns(UserWarning, match="only noise"):
        choice = predictor.estimate_diameter(image, name="specks.tif")
    assert not choice.sure and choice.scale == 1.0
    predictor.min_significance = 0.0
    assert predictor._noise_share(predictor.normalize(image)) is None


def test_the_model_goes_channels_last_only_on_a_gpu_by_default_when_built_here_in_half_precision():
    from nucleus_seg.inference.predictor import use_channels_last

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_channels_last(None, gpu, amp=True, built_here=True)
    assert not use_channels_last(None, gpu, amp=False, built_here=True)  # float32: PyTorch's NCHW kernels
    assert not use_channels_last(None, gpu, amp=True, built_here=False)  # a model being trained keeps its layout
    assert use_channels_last(True, gpu, amp=False, built_here=False) and not use_channels_last(False, gpu, True, True)
    assert not any(use_channels_last(asked, cpu, True, True) for asked in (None, True))


def test_an_input_larger_than_a_tile_gets_the_caps_in_proportion_to_its_area(cfg):
    """The config's proposal and detection counts are for one tile (TILE_SIZE): a 1024 px image in one pass kept
    at most 500 nuclei where the tiles covering it keep 2000, and a dense field holds more. An input k tiles large
    gets k times the caps; up to one tile nothing changes, and the model's own values are back after each call."""
    from nucleus_seg.modeling.fast_inference import final_box_predictor

    cfg.NUCLEUS.PREDICT.TILE_SIZE, cfg.NUCLEUS.PREDICT.TILE_OVERLAP = 64, 16
    cfg.TEST.DETECTIONS_PER_IMAGE = 3  # random weights detect far more than this anywhere
    predictor = NucleusPredictor(cfg)
    rpn, box = predictor.model.proposal_generator, final_box_predictor(predictor.model)
    counts = {}
    for side in (64, 96, 128):
        counts[side] = len(predictor(blobs((side, side), np.uint16, seed=side), diameter=0)["instances"])
        assert box.test_topk_per_image == 3 and rpn.post_nms_topk[False] == 100 and rpn.pre_nms_topk[False] == 200
    assert counts == {64: 3, 96: 7, 128: 12}  # ceil(3 x area / 64^2)


def test_forwards_asking_for_other_caps_wait_for_the_model(cfg):
    """Two tile streams share one model: forwards asking for the same settings run together, one asking for
    others waits until the model is free (the settings are attributes of the model's modules)."""
    import threading

    from nucleus_seg.modeling.fast_inference import final_box_predictor

    predictor = NucleusPredictor(cfg)
    box = final_box_predictor(predictor.model)
    own = box.test_topk_per_image
    seen, done = [], threading.Event()

    def other_size():
        with predictor._model_settings(None, predictor.tile_area):
            seen.append(box.test_topk_per_image)
        done.set()

    with predictor._model_settings(None, 4 * predictor.tile_area):
        with predictor._model_settings(None, 4 * predictor.tile_area):  # the same settings: in at once
            assert box.test_topk_per_image == 4 * own
        thread = threading.Thread(target=other_size)
        thread.start()
        assert not done.wait(0.3)  # held back while the larger input's caps are in use
        assert box.test_topk_per_image == 4 * own and not seen
    thread.join(10)
    assert seen == [own] and box.test_topk_per_image == own


def test_a_small_first_batch_gives_the_same_outputs(cfg, monkeypatch):
    """On a GPU predict_batch's first forward takes a quarter of a batch (the GPU starts while the next, full one
    is prepared): the same detections as full batches from the start, which the CPU keeps."""
    from nucleus_seg.inference import predictor as module

    cfg.NUCLEUS.PREDICT.AMP = False
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 8
    predictor = NucleusPredictor(cfg)
    images = [blobs((96, 128), np.uint16, seed=s) for s in range(11)]
    sizes = []
    forward = predictor._forward
    monkeypatch.setattr(predictor, "_forward", lambda crops, *a, **k: sizes.append(len(crops)) or forward(crops, *a,
                                                                                                          **k))
    full = predictor.predict_batch(images, diameter=0)
    monkeypatch.setattr(module, "SMALL_FIRST_BATCH_DEVICES", ("cpu",))
    ramped = predictor.predict_batch(images, diameter=0)
    assert sizes == [8, 3, 2, 8, 1]
    assert sum(len(r["instances"]) for r in full) > 0
    for a, b in zip(full, ramped):  # another batch size rounds differently (matrix blocking): equal to ~1e-5
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b)
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, atol=1e-3, rtol=0)
        torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=0)
        assert (a.pred_masks != b.pred_masks).sum() <= 0.001 * a.pred_masks.sum()


def test_a_batch_out_of_gpu_memory_runs_again_in_halves_and_later_batches_are_smaller(cfg):
    """A forward that runs out of GPU memory (raised here by the model for more than one input: no GPU on this
    machine) runs again in halves; the run goes on at half the batch size, with one warning, and gives what
    one input per forward gives. A single input that does not fit still fails."""
    cfg.NUCLEUS.PREDICT.AMP = False
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 8
    cfg.NUCLEUS.PREDICT.TILE_SIZE, cfg.NUCLEUS.PREDICT.TILE_OVERLAP = 64, 16  # 96x128 px: 3 tiles' worth, 2 a forward
    predictor = NucleusPredictor(cfg)
    assert predictor.images_per_forward((96, 128)) == 2
    images = [blobs((96, 128), np.uint16, seed=s) for s in range(5)]
    sizes = record_input_sizes(predictor)
    spied = predictor.model.inference

    def out_of_memory_past(n):
        def inference(batched_inputs, *args, **kwargs):
            if len(batched_inputs) > n:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return spied(batched_inputs, *args, **kwargs)
        return inference

    predictor.model.inference = out_of_memory_past(1)
    with pytest.warns(UserWarning, match="GPU out of memory with 2 inputs of 128x96 px") as caught:
        got = predictor.predict_batch(images, diameter=0)
    assert len([w for w in caught if "out of memory" in str(w.message)]) == 1  # the second pair: no new halving
    assert predictor.batch_size == 3 and predictor.images_per_forward((96, 128)) == 1
    assert len(sizes) == 5  # every image once, alone (the failed forwards never reached the model)
    predictor.model.inference = spied
    again = predictor.predict_batch(images, diameter=0)  # one image per forward from the start
    assert sum(len(r["instances"]) for r in got) > 0
    for a, b in zip(got, again):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
    predictor.model.inference = out_of_memory_past(0)
    with pytest.raises(torch.OutOfMemoryError):
        predictor.predict_batch(images[:1], diameter=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a GPU")
def test_a_pinned_batch_gives_the_same_outputs_as_copying_each_image(cfg):
    from nucleus_seg.inference.predictor import pinned_batch

    cfg.MODEL.DEVICE = "cuda"
    predictor = NucleusPredictor(cfg)
    arrays = [predictor.normalize(blobs((96, 128), np.uint16, seed=s)) for s in range(3)]
    pinned = pinned_batch(arrays)
    assert pinned.is_pinned() and pinned_batch(arrays + [arrays[0][:64]]) is None  # sizes differ: none
    a, b = predictor._forward(arrays, 0.1, pinned), predictor._forward(arrays, 0.1)
    assert [len(x) for x in a] == [len(x) for x in b] and sum(len(x) for x in a) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor) and torch.equal(x.scores, y.scores)


def test_an_input_whose_nuclei_fill_the_cap_is_named_in_a_warning(cfg):
    """Detections at the cap, all scoring above the output threshold: nuclei past it were cut, silently until now."""
    import warnings

    cfg.TEST.DETECTIONS_PER_IMAGE = 3
    predictor = NucleusPredictor(cfg)
    image = blobs((96, 128), np.uint16, seed=7)
    with pytest.warns(UserWarning, match=r"dense\.tif: 3 nuclei scoring >= 0\.1, the most one pass keeps"):
        labels = predictor.predict_labels([image], diameter=0, names=["dense.tif"])[0]
    assert labels.labels.max() > 0
    cfg.TEST.DETECTIONS_PER_IMAGE = 1000  # past the 100 proposals: never reached
    roomy = NucleusPredictor(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(roomy.predict_labels([image], diameter=0, names=["dense.tif"])[0]) > 3
    assert not [w for w in caught if "the most one pass keeps" in str(w.message)]  # under the cap: no warning


def test_an_input_k_tiles_large_equals_default_predictor_with_k_times_the_caps(cfg, tmp_path):
    """What the caps in proportion mean, exactly: in fp32 an input of four tiles' area gives DefaultPredictor's
    result with four times the proposal and detection counts (with the config's own it keeps fewer nuclei)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor

    cfg.INPUT.NORMALIZE.METHOD = "none"
    cfg.INPUT.NORMALIZE.GRAY = False
    cfg.INPUT.NORMALIZE.INVERT = "never"
    cfg.NUCLEUS.PREDICT.TILE_SIZE, cfg.NUCLEUS.PREDICT.TILE_OVERLAP = 64, 16
    theirs = DefaultPredictor(cfg)
    DetectionCheckpointer(theirs.model, save_dir=str(tmp_path)).save("weights")
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    ours = NucleusPredictor(cfg)
    wide = cfg.clone()
    wide.MODEL.RPN.PRE_NMS_TOPK_TEST *= 4
    wide.MODEL.RPN.POST_NMS_TOPK_TEST *= 4
    wide.TEST.DETECTIONS_PER_IMAGE *= 4
    theirs_wide = DefaultPredictor(wide)
    rgb = np.ascontiguousarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    a = ours(rgb, diameter=0)["instances"]
    b = theirs_wide(rgb[..., ::-1].copy())["instances"]
    assert len(a) == len(b) > len(theirs(rgb[..., ::-1].copy())["instances"])
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("streams", [1, 2])
def test_a_one_pass_batcher_sends_small_images_whole_by_pixels_and_equals_predict_labels(cfg, streams):
    """nucleus-predict's batcher: an image up to two tiles on a side is one tile, the whole image, and a forward
    holds BATCH_SIZE tiles' worth of pixels (a 100x120 image is ~2.9 tiles of 64 px: one per forward at batch 4);
    stitched, each equals predict_labels; a larger image is still tiled."""
    cfg.NUCLEUS.PREDICT.TILE_SIZE, cfg.NUCLEUS.PREDICT.TILE_OVERLAP = 64, 16
    cfg.NUCLEUS.PREDICT.BATCH_SIZE = 4
    cfg.NUCLEUS.PREDICT.STREAMS = streams
    predictor = NucleusPredictor(cfg)
    images = [blobs((100, 120), seed=2), blobs((100, 120), seed=3), blobs((40, 50), seed=4)]
    expected = predictor.predict_labels(images, diameter=0)
    batches = record_batches(predictor)
    batcher = predictor.tile_batcher(one_pass=True)
    done = batch_tiles(predictor, batcher, images)
    assert len(batcher.tiles_for((100, 140), 1.0)) == 6  # past 128 px: tiled
    batcher.close()
    assert sorted(batches) == sorted([[(100, 120, 3)], [(100, 120, 3)], [(40, 50, 3)]])
    assert sorted(key for key, _ in done) == [0, 1, 2]
    for key, tiled in done:
        pred, _ = tiled.stitch()
        assert len(pred) > 0
        np.testing.assert_array_equal(pred.labels, expected[key].labels)
        np.testing.assert_allclose(pred.scores, expected[key].scores, rtol=1e-5)


def test_a_read_only_image_is_read_without_a_warning_or_a_copy():
    """A memory-mapped or cached image is read-only: torch's 'not writable' warning would only alarm the user (the
    tensor is only read). Run in a fresh interpreter: torch gives that warning once per process."""
    import subprocess
    import sys

    setup = ("import numpy as np, torch; from nucleus_seg.inference.predictor import host_tensor\n"
             "a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3); a.setflags(write=False)\n")
    helped = subprocess.run([sys.executable, "-W", "error", "-c", setup + (
        "t = host_tensor(a); assert t.data_ptr() == a.ctypes.data and t.tolist() == a.tolist()\n"
        "assert host_tensor(a[:, ::-1]).tolist() == a[:, ::-1].tolist()\n")], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    # the warning kept quiet (the same interpreter without the helper fails on it)
    bare = subprocess.run([sys.executable, "-W", "error", "-c", setup + "torch.from_numpy(a)\n"],
                          capture_output=True, text=True)
    assert bare.returncode != 0 and "not writable" in bare.stderr
