"""NucleusDatasetMapper and its transforms: masks move with the image, boxes are the masks' extents."""

from __future__ import annotations

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import tifffile
import torch
from detectron2.structures import BitMasks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.io import ImageReadError, normalize_image, read_image
from nucleus_seg.data.mapper import AnnotationError, NucleusDatasetMapper, instance_label_layers
from nucleus_seg.data.transforms import FastResizeTransform, Rot90Transform, median_diameter
from nucleus_seg.structures import mask_to_annotation

NO_COLOUR = ["INPUT.NUCLEUS.BRIGHTNESS", 0.0, "INPUT.NUCLEUS.CONTRAST", 0.0,
             "INPUT.NUCLEUS.GAMMA", (1.0, 1.0),
             "INPUT.NUCLEUS.BLUR_PROB", 0.0, "INPUT.NUCLEUS.NOISE_PROB", 0.0]
RAW_INTENSITY = ["INPUT.NORMALIZE.METHOD", "none", "INPUT.NORMALIZE.INVERT", "never"]


def rle(mask: np.ndarray) -> dict:
    out = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    out["counts"] = out["counts"].decode("ascii")  # as JSON-loaded datasets hold it
    return out


def label_scene(h: int, w: int, n: int, seed: int, radius=(3, 9)) -> np.ndarray:
    """Label image of up to ``n`` non-overlapping (possibly touching) discs."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.int32)
    k = 0
    for _ in range(n * 4):
        if k == n:
            break
        r = int(rng.integers(*radius))
        one = np.zeros((h, w), np.uint8)
        cv2.circle(one, (int(rng.integers(0, w)), int(rng.integers(0, h))), r, 1, -1)
        free = one.astype(bool) & (label == 0)
        if free.sum() < 5:
            continue
        k += 1
        label[free] = k
    return label


def write_dict(tmp_path, name: str, image: np.ndarray, label: np.ndarray) -> dict:
    path = tmp_path / name
    if path.suffix == ".tif":
        tifffile.imwrite(path, image)
    else:
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA) if image.ndim == 3 else image)
    ids = [i for i in np.unique(label) if i]
    return {"file_name": str(path), "image_id": name, "height": label.shape[0], "width": label.shape[1],
            "annotations": [mask_to_annotation(label == i) for i in ids]}


def coded_image(label: np.ndarray) -> np.ndarray:
    """uint8 image whose value names the instance: 0 background, 10 + 3*id inside instance id."""
    return np.where(label > 0, 10 + 3 * label, 0).astype(np.uint8)


def make_mapper(opts=(), is_train=True) -> NucleusDatasetMapper:
    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml", [str(o) for o in opts])
    return NucleusDatasetMapper(cfg, is_train=is_train)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 90x130 field of ~40 touching discs, saved as an intensity-coded 8-bit PNG."""
    tmp = tmp_path_factory.mktemp("scene")
    label = label_scene(90, 130, 40, seed=1)
    return write_dict(tmp, "scene.png", coded_image(label), label), label


# ---------------------------------------------------------------------------------------------------
# RLE -> label layers


def uncompressed(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1] if flat.size else 0]])))
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = counts[counts > 0].tolist() if flat.size else []
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 24), w=st.integers(1, 24), n=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["str", "bytes", "list", "array"]),
)
def test_label_layers_reproduce_every_mask(h, w, n, seed, kind):
    """Every instance's pixels in its layer equal pycocotools' decode of its RLE, overlaps included."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < rng.uniform(0, 0.6, (n, 1, 1))  # random, overlapping, some empty
    segms = []
    for m in masks:
        if kind == "list":
            segms.append(uncompressed(m))
        elif kind == "array":
            segms.append(m.astype(np.uint8))
        else:
            r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            segms.append(r if kind == "bytes" else dict(r, counts=r["counts"].decode()))
    labels, layer_of = instance_label_layers(segms, h, w)
    assert labels.shape[:2] == (h, w) and len(layer_of) == n
    for i, m in enumerate(masks):
        assert np.array_equal(labels[:, :, layer_of[i]] == i + 1, m), f"instance {i}"


def test_label_layers_separate_only_overlapping_instances():
    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros_like(a)
    b[5:12, 5:12] = True  # overlaps a
    c = np.zeros_like(a)
    c[14:18, 14:18] = True  # apart
    labels, layer_of = instance_label_layers([rle(a), rle(b), rle(c)], 20, 20)
    assert labels.shape[2] == 2
    assert layer_of[0] != layer_of[1] and layer_of[2] == 0


def test_label_layers_refuse_rle_of_another_size():
    m = np.ones((10, 12), bool)
    with pytest.raises(AnnotationError, match=r"img\.png: annotation 0 has an RLE of size \[10, 12\]"):
        instance_label_layers([rle(m)], 12, 10, source="img.png")
    with pytest.raises(AnnotationError, match="annotation 1 has an RLE covering"):
        instance_label_layers([rle(m), {"size": [10, 12], "counts": [3, 4]}], 10, 12, source="x")


# ---------------------------------------------------------------------------------------------------
# geometric transforms


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_coordinates_follow_the_pixels(k):
    image = np.zeros((7, 11), np.uint8)
    image[2, 9] = 1  # pixel (x=9, y=2), centre (9.5, 2.5)
    t = Rot90Transform(k, 7, 11)
    rotated = t.apply_image(image)
    y, x = np.argwhere(rotated)[0]
    assert np.allclose(t.apply_coords(np.array([[9.5, 2.5]])), [[x + 0.5, y + 0.5]])
    assert np.array_equal(t.inverse().apply_image(rotated), image)


@pytest.mark.parametrize("new_size", [(150, 200), (37, 49), (91, 67)])
def test_fast_resize_keeps_masks_on_the_image(new_size):
    """Nearest-neighbour labels sample the pixel centres the bilinear image does: each resized mask's
    centroid matches its bilinearly resized indicator's (cv2.INTER_NEAREST's corner sampling is off
    by ~0.5 px here)."""
    label = label_scene(60, 80, 15, seed=3, radius=(6, 12))
    nh, nw = new_size
    t = FastResizeTransform(60, 80, nh, nw)
    big = t.apply_segmentation(label)
    assert big.shape == (nh, nw) and big.dtype == label.dtype
    yy, xx = np.mgrid[:nh, :nw]
    offsets = []
    for k in range(1, label.max() + 1):
        weight = t.apply_image((label == k).astype(np.float32))
        centre = np.array([(weight * yy).sum(), (weight * xx).sum()]) / weight.sum()
        mask = big == k
        offsets.append(np.abs(centre - [yy[mask].mean(), xx[mask].mean()]).max())
    assert np.mean(offsets) < 0.3 and np.max(offsets) < 0.5


# ---------------------------------------------------------------------------------------------------
# the mapper


def check_instances(out: dict, crop: int, min_area: int) -> None:
    inst = out["instances"]
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, crop, crop)
    assert inst.image_size == (crop, crop)
    masks = inst.gt_masks
    assert isinstance(masks, BitMasks) and masks.tensor.shape == (len(inst), crop, crop)
    assert torch.equal(inst.gt_boxes.tensor, masks.get_bounding_boxes().tensor)
    assert bool((masks.tensor.sum(dim=(1, 2)) >= min_area).all())
    assert bool((inst.gt_classes == 0).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    crop=st.sampled_from([32, 64, 100, 160]),
    scale=st.sampled_from([(1.0, 1.0), (0.5, 2.0), (0.3, 0.6), (1.5, 3.0)]),
    min_area=st.sampled_from([1, 4, 30]),
    nucleus_prob=st.sampled_from([0.0, 0.9, 1.0]),
    colour=st.booleans(),
)
def test_augmented_boxes_are_mask_extents_and_small_remnants_dropped(
    scene, seed, crop, scale, min_area, nucleus_prob, colour
):
    d, label = scene
    opts = ["INPUT.NUCLEUS.CROP_SIZE", crop, "INPUT.NUCLEUS.SCALE_RANGE", scale,
            "INPUT.NUCLEUS.MIN_INSTANCE_AREA", min_area, "INPUT.NUCLEUS.CROP_NUCLEUS_PROB", nucleus_prob,
            *RAW_INTENSITY, *([] if colour else NO_COLOUR)]
    mapper = make_mapper(opts)
    np.random.seed(seed)
    out = mapper(d)
    check_instances(out, crop, min_area)
    assert len(d["annotations"]) == label.max()  # the dataset dict is left as it was
    if not colour:
        # masks sit on the pixels of their own nucleus: value 10 + 3*id names the instance
        image = out["image"][0].numpy()
        masks = out["instances"].gt_masks.tensor.numpy()
        exact = scale == (1.0, 1.0)
        # bilinear resampling blends pixels within ~1 source pixel (up to ceil(scale) output px) of an
        # instance's edge with its neighbours; only pixels further in keep the exact code
        edge = np.ones((3, 3), np.uint8)
        for m in masks:
            values = image[m]
            if not exact:
                inner = cv2.erode(m.astype(np.uint8), edge, iterations=int(np.ceil(scale[1]))).astype(bool)
                if values.size < 40 or not inner.any():
                    continue  # slivers and fragmented remnants are all edge
                values = image[inner]
            code = np.bincount(values).argmax()
            assert code >= 13 and (code - 10) % 3 == 0
            if exact:  # resampled edges blend; the resize test checks their alignment
                assert np.all(values == code)


def test_without_scale_every_whole_nucleus_is_kept_exactly(tmp_path, dsb_sample):
    """Real DSB image (16-bit), crop = image size, flips/rot90 only: the nuclei come out as they went in."""
    image, label = dsb_sample
    d = write_dict(tmp_path, "dsb.tif", image, label)
    mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 512, "INPUT.NUCLEUS.SCALE_RANGE", (1.0, 1.0),
                          "INPUT.NUCLEUS.MIN_INSTANCE_AREA", 1])
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(d)
        check_instances(out, 512, 1)
        got = sorted(out["instances"].gt_masks.tensor.sum(dim=(1, 2)).tolist())
        assert got == sorted(np.bincount(label.ravel())[1:][np.bincount(label.ravel())[1:] > 0].tolist())


def test_16bit_and_rgba_inputs_give_the_same_training_sample(tmp_path):
    label = label_scene(100, 120, 25, seed=5)
    gray8 = np.clip(np.where(label > 0, 140, 15) + (label % 7) * 10, 0, 255).astype(np.uint8)
    variants = {
        "gray8.png": gray8,
        "gray16.png": gray8.astype(np.uint16) * 257,
        "gray16.tif": gray8.astype(np.uint16) * 100 + 7,
        "rgba.png": np.dstack([gray8, gray8, gray8, np.full_like(gray8, 255)]),
    }
    mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 96])
    outs = {}
    for name, image in variants.items():
        d = write_dict(tmp_path, name, image, label)
        stored = read_image(d["file_name"])
        want = image if image.ndim == 2 else image[..., :3]  # a PNG's alpha is dropped as it is read
        assert stored.dtype == image.dtype and np.array_equal(stored, want)
        np.random.seed(11)
        outs[name] = mapper(d)
        check_instances(outs[name], 96, 4)
    ref = outs["gray8.png"]
    assert len(ref["instances"]) > 0
    for name, out in outs.items():
        assert torch.equal(out["instances"].gt_masks.tensor, ref["instances"].gt_masks.tensor), name
        diff = (out["image"].int() - ref["image"].int()).abs()
        assert int(diff.max()) <= 3, name


def test_crop_prefers_fields_with_nuclei(tmp_path):
    label = np.zeros((400, 400), np.int32)
    cv2.circle(label, (30, 370), 6, 1, -1)  # one nucleus in a corner of a big empty field
    d = write_dict(tmp_path, "sparse.png", coded_image(label), label)

    def hits(prob: float) -> int:
        mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 64, "INPUT.NUCLEUS.SCALE_RANGE", (1.0, 1.0),
                              "INPUT.NUCLEUS.CROP_NUCLEUS_PROB", prob, "INPUT.NUCLEUS.MIN_INSTANCE_AREA", 1])
        np.random.seed(0)
        return sum(len(mapper(d)["instances"]) for _ in range(30))

    assert hits(1.0) == 30
    assert hits(0.0) <= 5


def test_small_image_is_padded_and_loses_no_nucleus(tmp_path):
    label = label_scene(50, 70, 10, seed=2)
    d = write_dict(tmp_path, "small.png", coded_image(label), label)
    mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 128, "INPUT.NUCLEUS.SCALE_RANGE", (1.0, 1.0),
                          "INPUT.NUCLEUS.MIN_INSTANCE_AREA", 1, *RAW_INTENSITY, *NO_COLOUR])
    np.random.seed(3)
    out = mapper(d)
    check_instances(out, 128, 1)
    assert len(out["instances"]) == label.max()
    assert sorted(out["instances"].gt_masks.tensor.sum(dim=(1, 2)).tolist()) == sorted(
        np.bincount(label.ravel())[1:].tolist())
    assert int((out["image"][0] > 0).sum()) == int((label > 0).sum())  # padding is background


def test_field_without_nuclei_is_a_negative_example(tmp_path):
    path = tmp_path / "empty.png"
    cv2.imwrite(str(path), np.full((70, 50), 9, np.uint8))
    mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 64])
    out = mapper({"file_name": str(path), "image_id": 0, "height": 70, "width": 50, "annotations": []})
    check_instances(out, 64, 4)
    assert len(out["instances"]) == 0


def test_overlapping_instances_keep_all_their_pixels(tmp_path):
    a = np.zeros((64, 64), bool)
    a[10:30, 10:30] = True
    b = np.zeros_like(a)
    b[20:40, 20:40] = True
    image = ((a | b) * 200).astype(np.uint8)
    path = tmp_path / "overlap.png"
    cv2.imwrite(str(path), image)
    d = {"file_name": str(path), "image_id": 0, "height": 64, "width": 64,
         "annotations": [mask_to_annotation(a), mask_to_annotation(b)]}
    mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 64, "INPUT.NUCLEUS.SCALE_RANGE", (1.0, 1.0)])
    out = mapper(d)
    check_instances(out, 64, 4)
    assert out["instances"].gt_masks.tensor.sum(dim=(1, 2)).tolist() == [400, 400]
    assert int((out["instances"].gt_masks.tensor[0] & out["instances"].gt_masks.tensor[1]).sum()) == 100


def test_test_mode_normalises_only_and_keeps_original_size(tmp_path):
    label = label_scene(77, 93, 8, seed=4)
    image16 = (coded_image(label).astype(np.uint16) * 200 + 1000)
    d = write_dict(tmp_path, "test.tif", image16, label)
    out = make_mapper(is_train=False)(d)
    expected = normalize_image(image16)[:, :, ::-1].transpose(2, 0, 1)  # BGR, CHW
    assert out["height"] == 77 and out["width"] == 93
    assert np.array_equal(out["image"].numpy(), expected)
    assert "instances" not in out and "annotations" not in out


def test_bad_inputs_name_the_file(tmp_path):
    label = label_scene(40, 40, 3, seed=6)
    d = write_dict(tmp_path, "ok.png", coded_image(label), label)
    mapper = make_mapper(["INPUT.NUCLEUS.CROP_SIZE", 32])
    with pytest.raises(Exception, match=r"ok\.png"):
        mapper(dict(d, height=41))  # dict disagrees with the file
    with pytest.raises(ImageReadError, match=r"missing\.png: no such file"):
        mapper(dict(d, file_name=str(tmp_path / "missing.png")))
    broken = dict(d, annotations=[dict(d["annotations"][0], segmentation={"size": [40, 40], "counts": "o"})])
    with pytest.raises(AnnotationError, match=r"ok\.png: corrupt compressed RLE"):
        mapper(broken)
    no_mask = dict(d, annotations=[{k: v for k, v in d["annotations"][0].items() if k != "segmentation"}])
    with pytest.raises(AnnotationError, match=r"ok\.png: annotation 0 has no 'segmentation'"):
        mapper(no_mask)


@pytest.mark.parametrize("target", [12.0, 32.0])
def test_scale_to_diameter_brings_each_image_to_the_training_size(tmp_path, target):
    """SCALE_TO_DIAMETER: small-nucleus and large-nucleus fields both come out at TRAIN_DIAMETER."""
    opts = ["INPUT.NUCLEUS.CROP_SIZE", 192, "INPUT.NUCLEUS.SCALE_RANGE", (1.0, 1.0),
            "INPUT.NUCLEUS.SCALE_TO_DIAMETER", True, "NUCLEUS.PREDICT.TRAIN_DIAMETER", target,
            "INPUT.NUCLEUS.MIN_INSTANCE_AREA", 1, *RAW_INTENSITY, *NO_COLOUR]
    mapper = make_mapper(opts)
    for radius, count, name in (((3, 5), 400, "small.png"), ((12, 16), 40, "large.png")):
        label = label_scene(256, 256, count, seed=7, radius=radius)
        image = np.where(label > 0, 200, 10).astype(np.uint8)
        d = write_dict(tmp_path, name, image, label)
        found = []
        for seed in range(4):
            np.random.seed(seed)
            out = mapper(d)
            check_instances(out, 192, 1)
            # whole nuclei only (not cut by the crop): their median diameter is the target
            boxes = out["instances"].gt_boxes.tensor.numpy()
            inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 192) & (boxes[:, 3] < 192)
            areas = out["instances"].gt_masks.tensor.sum(dim=(1, 2)).numpy()[inside]
            found.append(median_diameter(areas))
        assert np.median(found) == pytest.approx(target, rel=0.2), (name, found)


def test_an_instance_of_exactly_the_minimum_area_is_kept():
    from nucleus_seg.data.mapper import instances_from_labels

    labels = np.zeros((20, 20, 1), np.int32)
    labels[2:4, 2:4, 0] = 1  # 4 px: exactly MIN_INSTANCE_AREA
    labels[10:13, 10, 0] = 2  # 3 px: below it
    labels[15:19, 15:19, 0] = 3
    inst = instances_from_labels(labels, np.zeros(3, np.int64), np.zeros(3, np.int64), min_area=4)
    assert inst.gt_masks.ids.tolist() == [1, 3]
    assert inst.gt_boxes.tensor.tolist() == [[2, 2, 4, 4], [15, 15, 19, 19]]


@pytest.mark.parametrize("snr", [3.0, 10.0])
def test_shot_noise_grows_with_the_signal_and_keeps_the_brightness(snr):
    """Poisson noise: on a field at grey level 120 (the bright level) the SNR is the one asked for; a dim
    field at 30 is 2x noisier relative to its level; the mean stays; an RGB grey image stays grey."""
    from detectron2.data import transforms as T

    from nucleus_seg.data.transforms import RandomShotNoise

    img = np.zeros((256, 256, 3), np.uint8)
    img[:, :128] = 120  # below 255 - 3 sigma at SNR 3: no clipping to bias the mean
    img[:, 128:] = 30
    np.random.seed(0)
    aug_input = T.AugInput(img.copy())
    T.AugmentationList([RandomShotNoise((snr, snr), read_noise=0.0)])(aug_input)
    out = aug_input.image
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    bright, dim = out[:, 8:120, 0].astype(float), out[:, 136:248, 0].astype(float)
    assert abs(bright.mean() - 120) < 2 and abs(dim.mean() - 30) < 1.5
    assert bright.mean() / bright.std() == pytest.approx(snr, rel=0.15)
    assert dim.mean() / dim.std() == pytest.approx(snr / 2, rel=0.15)  # 1/4 of the photons
    assert not np.array_equal(out, img)


def test_shot_noise_is_in_the_training_augmentation_only_when_asked():
    from nucleus_seg.data.transforms import RandomShotNoise, build_nucleus_augmentation

    cfg = get_nucleus_cfg()
    def has_shot_noise(c):
        return any(isinstance(getattr(a, "aug", a), RandomShotNoise) for a in build_nucleus_augmentation(c, True))
    assert not has_shot_noise(cfg)
    cfg.INPUT.NUCLEUS.SHOT_NOISE_PROB = 0.2
    assert has_shot_noise(cfg)


@pytest.mark.parametrize("before_rescale", [False, True])
def test_noise_before_the_rescale_is_upscaled_with_the_image(before_rescale):
    """NOISE_BEFORE_RESCALE puts the camera's noise in the image's own pixel grid: a crop upscaled x4 then
    carries grains ~4 px across (neighbouring pixels nearly equal), as an upscaled noisy image at inference
    does; otherwise the crop gets fresh per-pixel noise (neighbours differ by ~sqrt(2) x the noise)."""
    from detectron2.data import transforms as T

    from nucleus_seg.data.transforms import build_nucleus_augmentation

    cfg = get_nucleus_cfg(opts=NO_COLOUR + ["INPUT.NUCLEUS.FLIP", False, "INPUT.NUCLEUS.ROT90", False,
                                            "INPUT.NUCLEUS.SCALE_RANGE", (4.0, 4.0), "INPUT.NUCLEUS.CROP_SIZE", 128,
                                            "INPUT.NUCLEUS.SHOT_NOISE_PROB", 1.0,
                                            "INPUT.NUCLEUS.SHOT_NOISE_SNR", (5.0, 5.0),
                                            "INPUT.NUCLEUS.NOISE_BEFORE_RESCALE", before_rescale])
    np.random.seed(0)
    aug_input = T.AugInput(np.full((256, 256, 3), 120, np.uint8))
    T.AugmentationList(build_nucleus_augmentation(cfg, True))(aug_input)
    out = aug_input.image[..., 0].astype(float)
    assert out.shape == (128, 128)
    noise = out.std()
    neighbour = np.diff(out, axis=1).std()
    assert noise > 10  # SNR 5 at grey level 120: std ~24 per source pixel (less once upscaled and smoothed)
    if before_rescale:
        assert neighbour < 0.6 * noise
    else:
        assert neighbour == pytest.approx(np.sqrt(2) * noise, rel=0.1)


def test_stretched_shot_noise_looks_like_a_noisy_exposure_normalised():
    """SHOT_NOISE_STRETCH: noise on the already-stretched crop, stretched again by INPUT.NORMALIZE's
    percentiles, gives what normalising a noisy camera image gives (background lifted into mid-grey noise,
    less contrast); unstretched, the noise is clipped at black and the background stays dark."""
    from nucleus_seg.data.io import normalize_image
    from nucleus_seg.data.transforms import _shot_noise

    rng = np.random.default_rng(0)
    label = label_scene(256, 256, 40, seed=1, radius=(6, 12))
    raw = np.where(label > 0, 200.0, 10.0).astype(np.float32)  # a clean exposure: nuclei at 200 on 10
    clean = normalize_image(raw.astype(np.uint16))
    unit = raw / np.percentile(raw, 99.9)
    camera = rng.poisson(unit * 25.0) + rng.normal(0, 2.0, raw.shape) + 10  # SNR 5 at the bright level
    real = normalize_image(np.clip(camera, 0, None).astype(np.uint16)).astype(float)
    stretched = _shot_noise(clean, 5.0, 2.0, seed=3, stretch=(1.0, 99.8)).astype(float)
    clipped = _shot_noise(clean, 5.0, 2.0, seed=3).astype(float)
    bg, fg = label == 0, label > 0
    for name, image in (("stretched", stretched), ("real", real)):
        assert 20 < image[bg].mean() < 90, name
    assert abs(stretched[bg].mean() - real[bg].mean()) < 12
    assert abs((stretched[fg].mean() - stretched[bg].mean()) - (real[fg].mean() - real[bg].mean())) < 20
    assert clipped[bg].mean() < 12
