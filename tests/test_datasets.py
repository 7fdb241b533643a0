"""Dataset loaders, their cache, registration and the built-in names (issue 3)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import tifffile
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

import nucleus_seg  # noqa: F401  (registers the built-in names)
from nucleus_seg.data import (
    DSB2018_VAL_IMAGE_IDS,
    load_dsb_dataset,
    load_label_image_dataset,
    register_nucleus_dataset,
    register_synth_datasets,
)
from nucleus_seg.data import datasets as ds
from nucleus_seg.data.catalog import ensure_synth_dataset
from nucleus_seg.data.io import ImageReadError
from nucleus_seg.data.synth import write_dataset

SAMPLE_DIR = Path(nucleus_seg.__file__).resolve().parent / "data" / "sample"


def decode(record: dict) -> np.ndarray:
    """NxHxW bool masks of a record (RLE or polygons through pycocotools), annotation order."""
    h, w = record["height"], record["width"]
    masks = []
    for a in record["annotations"]:
        seg = a["segmentation"]
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        masks.append(mask_util.decode(rle).astype(bool))
    return np.stack(masks) if masks else np.zeros((0, h, w), bool)


def as_set(masks: np.ndarray) -> set[bytes]:
    return {np.packbits(m).tobytes() for m in masks}


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def make_sample(root: Path, name: str, masks: list[np.ndarray], shape=(24, 32), image=None) -> Path:
    """One DSB sample folder with 0/255 mask PNGs named m0.png, m1.png... in list order."""
    image = np.full(shape, 40, np.uint8) if image is None else image
    write_png(root / name / "images" / f"{name}.png", image)
    for k, m in enumerate(masks):
        write_png(root / name / "masks" / f"m{k}.png", m.astype(np.uint8) * 255)
    return root / name


def disk(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture(scope="module")
def synth_dsb(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("synth") / "dsb"
    return root, write_dataset(root, 4, size=96, seed=5, progress=False)


# --------------------------------------------------------------------------------------- round trips


def test_dsb_round_trip_matches_written_pngs(synth_dsb):
    root, written = synth_dsb
    records = load_dsb_dataset(root, cache=False, num_workers=0)
    assert [r["image_name"] for r in records] == sorted(p.name for p in root.iterdir() if p.is_dir())
    assert [r["image_id"] for r in records] == list(range(len(records)))
    assert sum(len(r["annotations"]) for r in records) > 10
    for record, expected in zip(records, written):
        assert record["file_name"] == expected["file_name"]
        mask_files = sorted((root / record["image_name"] / "masks").glob("*.png"))
        on_disk = np.stack([np.asarray(Image.open(p)) != 0 for p in mask_files])
        np.testing.assert_array_equal(decode(record), on_disk)
        for a, m in zip(record["annotations"], on_disk):
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and a["category_id"] == 0 and a["iscrowd"] == 0
            assert isinstance(a["segmentation"]["counts"], str)
        # what the writer returned is exactly what the loader reads back
        assert record["annotations"] == expected["annotations"]


def test_label_layout_writes_what_the_dsb_layout_writes_in_two_files_per_image(synth_dsb, tmp_path):
    root, written = synth_dsb
    labels_root = tmp_path / "labels_layout"
    records = write_dataset(labels_root, 4, size=96, seed=5, progress=False, layout="labels")
    assert sorted(p.name for p in labels_root.iterdir()) == ["images", "labels"]
    assert len(list((labels_root / "labels").iterdir())) == 4
    assert load_label_image_dataset(labels_root, cache=False, num_workers=0) == records
    for record, dsb in zip(records, written):
        assert record["annotations"] == dsb["annotations"] and record["image_name"] == dsb["image_name"]
        assert np.array_equal(cv2.imread(record["file_name"], cv2.IMREAD_UNCHANGED),
                              cv2.imread(dsb["file_name"], cv2.IMREAD_UNCHANGED))
    with pytest.raises(ValueError, match="layout"):
        write_dataset(tmp_path / "other", 1, size=96, layout="coco")


def test_parallel_parse_equals_serial(synth_dsb):
    root, _ = synth_dsb
    items = [ds._dsb_sample_files(d) for d in sorted(p for p in root.iterdir() if p.is_dir())] * 5
    serial = ds._map(ds._parse_dsb_sample, items, 0, "serial")
    parallel = ds._map(ds._parse_dsb_sample, items, 2, "parallel")
    assert [r for r, _ in serial] == [r for r, _ in parallel]


def test_label_and_coco_loaders_match_dsb(synth_dsb, tmp_path):
    root, _ = synth_dsb
    dsb = load_dsb_dataset(root, cache=False, num_workers=0)
    # label-image folder: mixed 16-bit PNG and 32-bit TIFF labels, ids scrambled (not contiguous)
    lab_root = tmp_path / "labels_layout"
    for i, r in enumerate(dsb):
        masks = decode(r)
        label = np.zeros((r["height"], r["width"]), np.uint32)
        for k, m in enumerate(masks):
            label[m] = 7 * k + 1000
        stem = r["image_name"]
        os.makedirs(lab_root / "images", exist_ok=True)
        os.makedirs(lab_root / "labels", exist_ok=True)
        Image.open(r["file_name"]).save(lab_root / "images" / f"{stem}.png")
        if i % 2:
            write_png(lab_root / "labels" / f"{stem}.png", label.astype(np.uint16))
        else:
            tifffile.imwrite(lab_root / "labels" / f"{stem}.tif", label)
    labels = load_label_image_dataset(lab_root, cache=False, num_workers=0)
    assert [r["image_name"] for r in labels] == [r["image_name"] for r in dsb]
    for a, b in zip(dsb, labels):
        assert (a["height"], a["width"]) == (b["height"], b["width"])
        assert as_set(decode(a)) == as_set(decode(b))
        assert sorted(x["bbox"] for x in a["annotations"]) == sorted(x["bbox"] for x in b["annotations"])

    # COCO JSON written by detectron2 from the DSB dataset, read back through load_coco_json
    from detectron2.data.datasets.coco import convert_to_coco_dict

    register_nucleus_dataset("test_dsb_for_coco", root, cache=False)
    coco = convert_to_coco_dict("test_dsb_for_coco")
    for img in coco["images"]:
        img["file_name"] = os.path.relpath(img["file_name"], root)
    json_file = tmp_path / "coco" / "instances.json"
    json_file.parent.mkdir()
    json_file.write_text(json.dumps(coco))
    register_nucleus_dataset("test_coco", json_file, image_root=root)
    assert MetadataCatalog.get("test_coco").evaluator_type == "nucleus"
    from_coco = DatasetCatalog.get("test_coco")
    assert len(from_coco) == len(dsb)
    for a, b in zip(dsb, from_coco):
        assert Path(b["file_name"]) == Path(a["file_name"])
        assert as_set(decode(a)) == as_set(decode(b))
        assert {x["category_id"] for x in b["annotations"]} == {0}


def test_register_detects_format_and_sets_metadata(synth_dsb, tmp_path):
    root, _ = synth_dsb
    assert ds.detect_format(root) == "dsb"
    register_nucleus_dataset("test_auto_dsb", root)
    meta = MetadataCatalog.get("test_auto_dsb")
    assert meta.thing_classes == ["nucleus"] and meta.evaluator_type == "nucleus"
    assert len(meta.thing_colors) == 1
    assert len(DatasetCatalog.get("test_auto_dsb")) == 4
    register_nucleus_dataset("test_auto_dsb", root)  # re-registering replaces, no error
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    assert ds.detect_format(tmp_path) == "labels"
    with pytest.raises(ValueError, match="split"):
        register_nucleus_dataset("test_bad_split", tmp_path, split="val")
    with pytest.raises(ValueError, match="unknown dataset format"):
        register_nucleus_dataset("test_bad_fmt", root, fmt="voc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        register_nucleus_dataset("test_missing", tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="unknown dataset layout"):
        ds.detect_format(tmp_path / "other")


# --------------------------------------------------------------------------------------- splits


def test_split_uses_matterport_val_ids(tmp_path):
    assert len(DSB2018_VAL_IMAGE_IDS) == 25 == len(set(DSB2018_VAL_IMAGE_IDS))
    assert all(len(i) == 64 and int(i, 16) >= 0 for i in DSB2018_VAL_IMAGE_IDS)
    m = [disk((24, 32), 12, 16, 5)]
    names = [DSB2018_VAL_IMAGE_IDS[0], DSB2018_VAL_IMAGE_IDS[7], "a" * 64, "f" * 64]
    for name in names:
        make_sample(tmp_path, name, m)
    val = load_dsb_dataset(tmp_path, split="val", num_workers=0)
    train = load_dsb_dataset(tmp_path, split="train", num_workers=0)
    everything = load_dsb_dataset(tmp_path, num_workers=0)
    assert {r["image_name"] for r in val} == set(names[:2])
    assert {r["image_name"] for r in train} == set(names[2:])
    assert len(everything) == 4
    assert not {r["image_id"] for r in val} & {r["image_id"] for r in train}
    with pytest.raises(ValueError, match="split must be"):
        load_dsb_dataset(tmp_path, split="test")


def test_split_without_any_val_id_is_an_error(tmp_path):
    make_sample(tmp_path, "x1", [disk((24, 32), 12, 16, 5)])
    with pytest.raises(ValueError, match="validation ids"):
        load_dsb_dataset(tmp_path, split="val", cache=False)


# --------------------------------------------------------------------------------------- bad input


def test_corrupt_image_and_mask_name_the_file(tmp_path):
    sample = make_sample(tmp_path / "a", "s1", [disk((24, 32), 12, 16, 5)])
    (sample / "images" / "s1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageReadError, match="s1.png"):
        load_dsb_dataset(tmp_path / "a", cache=False)
    sample = make_sample(tmp_path / "b", "s2", [disk((24, 32), 12, 16, 5)])
    (sample / "masks" / "m0.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="m0.png"):
        load_dsb_dataset(tmp_path / "b", cache=False)


def test_mask_size_mismatch_names_both_files(tmp_path):
    sample = make_sample(tmp_path, "s1", [disk((24, 32), 12, 16, 5)])
    write_png(sample / "masks" / "m0.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ImageReadError, match=r"m0\.png.*differs.*s1\.png"):
        load_dsb_dataset(tmp_path, cache=False)


def test_empty_masks_dropped_and_overlap_goes_to_first(tmp_path, caplog):
    a = disk((24, 32), 12, 10, 6)
    b = disk((24, 32), 12, 18, 6)
    make_sample(tmp_path, "s1", [a, np.zeros((24, 32), bool), b, a.copy()])
    with caplog.at_level(logging.INFO, logger="nucleus_seg.data.datasets"):
        (record,) = load_dsb_dataset(tmp_path, cache=False)
    masks = decode(record)
    assert len(masks) == 2  # empty dropped, the duplicate of `a` left empty by the overlap rule
    np.testing.assert_array_equal(masks[0], a)
    np.testing.assert_array_equal(masks[1], b & ~a)
    assert "dropped 1 empty masks" in caplog.text
    assert "2 masks overlap" in caplog.text


def test_mask_encodings_all_read_alike(tmp_path):
    m = disk((24, 32), 12, 16, 6)
    sample = make_sample(tmp_path, "s1", [])
    masks_dir = sample / "masks"
    masks_dir.mkdir()
    write_png(masks_dir / "a_255.png", m.astype(np.uint8) * 255)
    write_png(masks_dir / "b_01.png", m.astype(np.uint8))
    pal = Image.fromarray(m.astype(np.uint8), mode="P")
    pal.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)  # index 0 is *white*: only indices count
    pal.save(masks_dir / "c_palette.png")
    Image.fromarray(m).save(masks_dir / "d_1bit.png")
    write_png(masks_dir / "e_rgb.png", np.dstack([m * 255] * 3).astype(np.uint8))
    tifffile.imwrite(masks_dir / "f.tif", m.astype(np.uint16) * 65535)
    (record,) = load_dsb_dataset(tmp_path, cache=False)
    # each later mask overlaps the first fully, so only the first survives; check each alone instead
    assert len(record["annotations"]) == 1
    for path in sorted(masks_dir.iterdir()):
        np.testing.assert_array_equal(ds.read_mask(path), m, err_msg=path.name)


def test_image_without_masks_is_a_negative_and_odd_images_load(tmp_path):
    make_sample(tmp_path, "neg", [])
    rgba = np.dstack([np.full((24, 32), v, np.uint8) for v in (10, 20, 30, 255)])
    make_sample(tmp_path, "rgba", [disk((24, 32), 12, 16, 5)], image=rgba)
    make_sample(tmp_path, "u16", [disk((24, 32), 12, 16, 5)], image=np.full((24, 32), 4000, np.uint16))
    records = {r["image_name"]: r for r in load_dsb_dataset(tmp_path, cache=False)}
    assert records["neg"]["annotations"] == []
    assert (records["rgba"]["height"], records["rgba"]["width"]) == (24, 32)
    assert len(records["u16"]["annotations"]) == 1


def test_missing_or_ambiguous_images_folder(tmp_path):
    make_sample(tmp_path / "a", "ok", [disk((24, 32), 12, 16, 5)])
    (tmp_path / "a" / "stray" / "masks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"stray: no images/ folder"):
        load_dsb_dataset(tmp_path / "a")
    sample = make_sample(tmp_path / "b", "s1", [])
    write_png(sample / "images" / "other.png", np.zeros((24, 32), np.uint8))
    write_png(sample / "images" / "third.png", np.zeros((24, 32), np.uint8))
    (sample / "images" / "s1.png").unlink()
    with pytest.raises(ValueError, match="several candidate images"):
        load_dsb_dataset(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dsb_dataset(tmp_path / "nothing")


def test_label_layout_errors(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((24, 32), np.uint8))
    write_png(tmp_path / "images" / "b.png", np.zeros((24, 32), np.uint8))
    write_png(tmp_path / "labels" / "a.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"no label image for 1 images.*b\.png"):
        load_label_image_dataset(tmp_path, cache=False)
    tifffile.imwrite(tmp_path / "labels" / "b.tif", np.zeros((5, 24, 32), np.uint16))  # a z-stack
    with pytest.raises(ImageReadError, match=r"b\.tif.*not a 2-D image"):
        load_label_image_dataset(tmp_path, cache=False)
    tifffile.imwrite(tmp_path / "labels" / "a.tif", np.zeros((24, 32), np.uint16))
    with pytest.raises(ValueError, match=r"duplicate id 'a' \(a\.png and a\.tif\)"):
        load_label_image_dataset(tmp_path, cache=False)
    (tmp_path / "labels" / "a.tif").unlink()
    tifffile.imwrite(tmp_path / "labels" / "b.tif", np.zeros((20, 32), np.uint16))
    with pytest.raises(ImageReadError, match=r"b\.tif.*differs.*b\.png"):
        load_label_image_dataset(tmp_path, cache=False)
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        load_label_image_dataset(tmp_path / "labels")


def test_outlines_from_fiji_and_qupath_are_labels_of_the_image_they_were_drawn_on(tmp_path):
    """labels/ may hold ImageJ ROI sets and GeoJSON beside label images, named by the image's stem or as
    nucleus-predict names its outline files (corrected predictions are annotations as they are)."""
    from nucleus_seg.data.outlines import geojson_text, imagej_roi_zip, label_outlines

    label = np.zeros((24, 32), np.uint16)
    label[2:6, 2:7] = 1
    label[10:15, 12:20] = 2
    label[18:22, 25:30] = 3
    outlines = label_outlines(label)
    for stem in "abc":
        write_png(tmp_path / "images" / f"{stem}.png", np.zeros((24, 32), np.uint8))
    write_png(tmp_path / "labels" / "c.png", label)
    (tmp_path / "labels" / "a_rois.zip").write_bytes(imagej_roi_zip(outlines))
    (tmp_path / "labels" / "b.geojson").write_text(geojson_text(outlines, [1.0, 1.0, 1.0]))
    records = load_label_image_dataset(tmp_path, cache=False)
    assert [r["image_name"] for r in records] == ["a", "b", "c"]
    for record in records:
        masks = decode(record)
        assert len(masks) == 3
        for k, mask in enumerate(masks, start=1):
            np.testing.assert_array_equal(mask, label == k)
    (tmp_path / "labels" / "a.geojson").write_text(geojson_text(outlines, [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"duplicate id 'a' \(a.geojson and a_rois.zip\)"):
        load_label_image_dataset(tmp_path, cache=False)


def test_split_label_id_stays_one_instance(tmp_path):
    label = np.zeros((24, 32), np.uint16)
    label[2:6, 2:6] = 500  # one id in two pieces
    label[15:20, 20:25] = 500
    label[10:14, 10:14] = 3
    write_png(tmp_path / "images" / "x.png", np.zeros((24, 32), np.uint8))
    write_png(tmp_path / "labels" / "x.png", label)
    (record,) = load_label_image_dataset(tmp_path, cache=False)
    masks = decode(record)
    assert len(masks) == 2
    np.testing.assert_array_equal(masks[1], label == 500)  # ascending id order


# --------------------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    a, b = disk((24, 32), 8, 8, 4), disk((24, 32), 16, 22, 5)
    make_sample(tmp_path, "s1", [a, b])
    make_sample(tmp_path, "s2", [b])
    first = load_dsb_dataset(tmp_path, num_workers=0)
    assert (tmp_path / ".nucleus_seg_cache_dsb.json").is_file()

    def no_parse(item):
        raise AssertionError(f"parsed {item[0]} although the cache is valid")

    monkeypatch.setattr(ds, "_parse_dsb_sample", no_parse)
    cached = load_dsb_dataset(tmp_path, num_workers=0)
    assert cached == first
    assert load_dsb_dataset(tmp_path, split=None, num_workers=0)[1]["annotations"] == first[1]["annotations"]
    monkeypatch.undo()

    # rewriting one mask (new size and mtime) must miss the cache and show the new mask
    c = disk((24, 32), 12, 12, 3)
    write_png(tmp_path / "s2" / "masks" / "m0.png", c.astype(np.uint8) * 255)
    os.utime(tmp_path / "s2" / "masks" / "m0.png", ns=(1, 1))
    changed = load_dsb_dataset(tmp_path, num_workers=0)
    np.testing.assert_array_equal(decode(changed[1])[0], c)
    # an added mask too
    write_png(tmp_path / "s2" / "masks" / "m1.png", a.astype(np.uint8) * 255)
    assert len(load_dsb_dataset(tmp_path, num_workers=0)[1]["annotations"]) == 2
    # a moved dataset keeps its cache (paths are stored relative to the root)
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    monkeypatch.setattr(ds, "_parse_dsb_sample", no_parse)
    again = load_dsb_dataset(moved, num_workers=0)
    assert again[0]["file_name"] == str(moved / "s1" / "images" / "s1.png")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_cache_falls_back_to_user_cache_when_root_is_read_only(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    make_sample(root, "s1", [disk((24, 32), 12, 16, 5)])
    user_cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_cache))
    blocker = root / ".nucleus_seg_cache_dsb.json"
    blocker.mkdir()  # a directory where the cache file would go: unwritable even for root
    load_dsb_dataset(root, num_workers=0)
    written = list((user_cache / "nucleus_seg").glob("dsb_*.json"))
    assert len(written) == 1
    monkeypatch.setattr(ds, "_parse_dsb_sample", lambda item: pytest.fail("cache missed"))
    assert len(load_dsb_dataset(root, num_workers=0)) == 1


# --------------------------------------------------------------------------------------- built-ins


def test_builtin_names_registered_on_import():
    for name in ("nucleus_dsb2018_train", "nucleus_dsb2018_val", "nucleus_synth_train", "nucleus_synth_val",
                 "nucleus_dsb_sample"):
        assert name in DatasetCatalog.list(), name
        assert MetadataCatalog.get(name).evaluator_type == "nucleus"


def test_dsb2018_missing_folder_error_only_when_used(tmp_path, monkeypatch):
    monkeypatch.setenv("NUCLEUS_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"dsb2018[/\\]stage1_train not found"):
        DatasetCatalog.get("nucleus_dsb2018_val")


def test_dsb_sample_one_instance_per_label_id():
    (record,) = DatasetCatalog.get("nucleus_dsb_sample")
    label = tifffile.imread(SAMPLE_DIR / "labels.tif")
    ids = np.unique(label)[1:]
    masks = decode(record)
    assert (record["height"], record["width"]) == label.shape
    assert len(masks) == len(ids)
    for k, m in zip(ids, masks):
        np.testing.assert_array_equal(m, label == k)


def test_synth_builtin_generates_once_atomically(tmp_path):
    register_synth_datasets(num_train=3, num_val=2, size=80, seed=11, root=tmp_path)
    train = DatasetCatalog.get("nucleus_synth_train")
    val = DatasetCatalog.get("nucleus_synth_val")
    assert (len(train), len(val)) == (3, 2)
    (base,) = (tmp_path / "nucleus_synth").iterdir()
    assert sorted(p.name for p in base.iterdir()) == ["params.json", "train", "val"]
    assert json.loads((base / "params.json").read_text())["seed"] == 11
    images = [cv2.imread(r["file_name"], cv2.IMREAD_UNCHANGED) for r in train + val]
    assert not any(np.array_equal(images[i], images[j]) for i in range(5) for j in range(i + 1, 5))
    assert MetadataCatalog.get("nucleus_synth_val").synth_params["split"] == "val"
    # second use: same dicts, from the cache written at generation time, equal to a full parse, and the
    # cache is the one a verified load of the label layout hits
    assert DatasetCatalog.get("nucleus_synth_train") == train
    assert load_label_image_dataset(base / "train", cache=False, num_workers=0) == train
    assert sorted(p.name for p in (base / "train").iterdir()) == [".nucleus_seg_cache_labels.json", "images",
                                                                   "labels"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ds, "_parse_label_pair", lambda item: pytest.fail(f"parsed {item[0]} despite the cache"))
        assert load_label_image_dataset(base / "train", num_workers=0) == train
    # other parameters -> another folder; defaults restored afterwards for the other tests
    register_synth_datasets(num_train=1, num_val=0, size=80, seed=11, root=tmp_path)
    assert DatasetCatalog.get("nucleus_synth_val") == []
    assert len(DatasetCatalog.get("nucleus_synth_train")) == 1
    assert len(list((tmp_path / "nucleus_synth").iterdir())) == 2
    register_synth_datasets()
    with pytest.raises(ValueError, match="style"):
        register_synth_datasets(style="phase")


def _ensure_in_subprocess(folder: str) -> str:
    return str(ensure_synth_dataset(folder, 2, 64, "fluorescence", 1, 0))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_concurrent_generation_leaves_one_complete_dataset(tmp_path):
    folder = tmp_path / "h" / "train"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_ensure_in_subprocess, [str(folder)] * 2)
    assert results == [str(folder)] * 2
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["train"]  # no temp folder left
    assert len(load_label_image_dataset(folder, num_workers=0)) == 2


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    from nucleus_seg.data.synth import files as synth

    real = synth.write_sample
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "write_sample", interrupted)
    folder = tmp_path / "h" / "train"
    with pytest.raises(KeyboardInterrupt):
        ensure_synth_dataset(folder, 3, 64, "fluorescence", 0, 0)
    assert list((tmp_path / "h").iterdir()) == []
