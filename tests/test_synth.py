"""The synthetic nucleus generator, its writer and ``nucleus-synth`` (issue 3)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from nucleus_seg.cli.synth import main as synth_main
from nucleus_seg.data import load_dsb_dataset
from nucleus_seg.data.io import normalize_image, read_image
from nucleus_seg.data.synth import MIN_LABEL_AREA, generate_image, image_rng


@pytest.fixture(scope="module")
def fluo_batch() -> list[tuple[np.ndarray, np.ndarray]]:
    """40 fluorescence fields of the default size (8- and 16-bit alternating)."""
    return [generate_image(image_rng(0, 0, i), 512, "fluorescence", 8 if i % 2 else 16) for i in range(40)]


def test_deterministic_per_seed_and_stream():
    a_img, a_lab = generate_image(image_rng(7, 0, 3), 128)
    b_img, b_lab = generate_image(image_rng(7, 0, 3), 128)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    for other in (image_rng(8, 0, 3), image_rng(7, 1, 3), image_rng(7, 0, 4)):
        assert not np.array_equal(generate_image(other, 128)[0], a_img)


@pytest.mark.parametrize("style,bit_depth,channels", [
    ("fluorescence", 8, None), ("fluorescence", 16, None), ("brightfield", 8, (None, 3)), ("he", 16, (3,)),
])
def test_output_types_and_labels(style, bit_depth, channels):
    for i in range(3):
        image, label = generate_image(image_rng(1, 0, i), (96, 128), style, bit_depth)
        assert image.dtype == (np.uint8 if bit_depth == 8 else np.uint16)
        assert image.shape[:2] == label.shape == (96, 128)
        assert (image.shape[2] if image.ndim == 3 else None) in (channels or (None,))
        assert label.dtype == np.int32
        ids = np.unique(label)
        ids = ids[ids != 0]
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # contiguous 1..N
        if len(ids):
            assert np.bincount(label.ravel())[1:].min() >= MIN_LABEL_AREA


def test_bad_arguments():
    rng = image_rng(0, 0, 0)
    with pytest.raises(ValueError, match="style"):
        generate_image(rng, 64, "phase")
    with pytest.raises(ValueError, match="bit_depth"):
        generate_image(rng, 64, bit_depth=12)
    with pytest.raises(ValueError, match="too small"):
        generate_image(rng, 8)


def test_variety_across_images(fluo_batch):
    counts, radii, elong = [], [], []
    border = touching = 0
    for _, label in fluo_batch:
        n = int(label.max())
        counts.append(n)
        if n == 0:
            continue
        areas = np.bincount(label.ravel())[1:]
        radii.append(float(np.sqrt(np.median(areas) / np.pi)))
        edge_ids = np.unique(np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]]))
        border += int(np.count_nonzero(edge_ids))
        # touching: a labelled pixel with a different non-zero id as right or lower neighbour
        right = (label[:, :-1] != label[:, 1:]) & (label[:, :-1] > 0) & (label[:, 1:] > 0)
        down = (label[:-1] != label[1:]) & (label[:-1] > 0) & (label[1:] > 0)
        touching += int(right.any() or down.any())
        for box, k in zip(ndimage.find_objects(label), range(1, n + 1)):
            ys, xs = np.nonzero(label[box] == k)
            if len(ys) > 30:
                ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
                elong.append(float(np.sqrt(ev[1] / max(ev[0], 1e-6))))
    assert min(counts) <= 5, "no empty or near-empty field"
    assert max(counts) >= 250, "no crowded field"
    assert min(radii) < 7 and max(radii) > 20, "median nucleus size does not vary across images"
    assert border >= 40, "too few nuclei cut by the image border"
    assert touching >= len(fluo_batch) // 2, "touching nuclei are rare"
    assert np.percentile(elong, 90) > 1.8 and np.percentile(elong, 10) < 1.15


def _image_stats(image: np.ndarray) -> dict[str, float]:
    """Label-free statistics of an image after the model's percentile normalisation."""
    from skimage.filters import threshold_otsu

    n = normalize_image(image, invert="never")[..., 0].astype(np.float64)
    fg = n > threshold_otsu(n)
    hp = n - ndimage.uniform_filter(n, 3)
    # blobs much larger than the typical one: touching nuclei that thresholding cannot separate
    lab, count = ndimage.label(fg)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= 30]
    merged = float((areas > 1.6 * np.median(areas)).mean()) if len(areas) >= 5 else np.nan
    return {"fg_fraction": fg.mean(), "bg_level": np.median(n[~fg]), "fg_level": np.median(n[fg]),
            "noise_bg": hp[~fg].std(), "noise_fg": hp[fg].std(), "merged_blob_fraction": merged}


def test_real_sample_statistics_fall_inside_the_generated_range(fluo_batch, dsb_sample):
    """The real DSB image (its pixels only, never its labels) must look like a plausible draw of the
    generator: each statistic inside the 2nd-98th percentile of generated fields."""
    real = _image_stats(dsb_sample[0])
    synth = [_image_stats(image) for image, label in fluo_batch if label.max() > 0]
    for key, value in real.items():
        lo, hi = np.nanpercentile([s[key] for s in synth], (2, 98))
        assert lo <= value <= hi, f"{key}: real {value:.3f} outside generated [{lo:.3f}, {hi:.3f}]"


def test_fluorescence_looks_like_fluorescence(fluo_batch):
    """Nuclei brighter than background, background dark, unlabelled bright debris present somewhere."""
    debris_fields = 0
    for image, label in fluo_batch:
        if label.max() == 0:
            continue
        img = image.astype(np.float64)
        assert np.median(img[label > 0]) > np.median(img[label == 0])
        far = ~ndimage.binary_dilation(label > 0, iterations=4)
        hot = img > np.percentile(img[label > 0], 90)
        debris_fields += int((hot & far).sum() >= 3)
    assert debris_fields >= 5


def test_cli_writes_dsb_layout_with_preview(tmp_path, capsys):
    out = tmp_path / "synth"
    assert synth_main(["--out", str(out), "--num", "3", "--size", "96", "--seed", "4", "--bit-depth", "16",
                       "--preview"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    samples = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(samples) == 3
    for sample in samples:
        image = read_image(sample / "images" / f"{sample.name}.png")
        assert image.dtype == np.uint16 and image.shape == (96, 96)
    preview = cv2.imread(str(out / "preview.png"))
    assert preview.shape == (256, 4 * 256, 3)
    assert (preview[..., 2] > 200).any()  # outlines drawn
    records = load_dsb_dataset(out, cache=False)
    expected = [generate_image(image_rng(4, 0, i), 96, "fluorescence", 16) for i in range(3)]
    for record, (image, label) in zip(records, expected):
        np.testing.assert_array_equal(read_image(record["file_name"]), image)
        assert len(record["annotations"]) == label.max()
    # a second run into the same folder refuses instead of mixing datasets
    assert synth_main(["--out", str(out), "--num", "1"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_writes_label_layout(tmp_path):
    out = tmp_path / "synth"
    assert synth_main(["--out", str(out), "--num", "2", "--size", "96", "--seed", "4", "--layout", "labels"]) == 0
    for i in range(2):
        _, label = generate_image(image_rng(4, 0, i), 96, "fluorescence", 8)
        (path,) = (out / "labels").glob(f"*_{i:05d}.png")
        np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), label)


def test_cli_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        synth_main(["--version"])
    assert exc.value.code == 0 and "nucleus_seg" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synth_main(["--num", "2"])
    assert "--out is required" in capsys.readouterr().err


def test_preview_helper_writes_montage(tmp_path):
    from nucleus_seg.data.synth import write_preview

    pairs = [generate_image(image_rng(2, 0, i), 64) for i in range(5)]
    path = write_preview(tmp_path / "p.png", [p[0] for p in pairs], [p[1] for p in pairs], tile=32, columns=4)
    assert cv2.imread(str(path)).shape == (64, 128, 3)
    assert Path(path).stat().st_size > 0


def test_items_broadcasts_scalars_to_empty_arrays():
    """An image whose nuclei are all mitotic leaves no 'normal' nuclei: scalars must broadcast to length 0
    (this crashed generation of the 1500-image training set on the GPU node)."""
    from nucleus_seg.data.synth.render import _items

    items = _items(x=np.zeros(0), y=np.zeros(0), irregular=0.3, edge=np.zeros(0))
    assert all(v.shape == (0,) for v in items.values())
    items = _items(x=np.arange(3.0), irregular=0.3)
    assert items["irregular"].tolist() == [0.3, 0.3, 0.3] and items["x"].tolist() == [0.0, 1.0, 2.0]


def test_feature_switches():
    from nucleus_seg.data.synth import FEATURES

    rng = lambda: image_rng(0, 0, 7)  # noqa: E731
    full = generate_image(rng(), 128)
    assert all(np.array_equal(a, b) for a, b in zip(full, generate_image(rng(), 128, features=FEATURES)))
    v1 = generate_image(rng(), 128, features=())
    assert not np.array_equal(full[0], v1[0])
    with pytest.raises(ValueError, match="unknown generator feature"):
        generate_image(rng(), 128, features=("seams",))


def test_contact_mode_paints_pressed_nuclei_over_each_other_with_a_dim_seam():
    """Two overlapping discs of equal brightness: summed light makes a bright lens where they overlap;
    'contact' painting keeps the overlap at one nucleus' level, and a seam makes it dimmer there."""
    from nucleus_seg.data.synth.render import _TABLE, _items, _paint

    items = _items(x=[20.0, 34.0], y=20.0, a=9.0, b=9.0, edge=1.0, value=1.0)
    tables = np.ones((2, _TABLE), np.float32)
    out = {}
    for name, contact in (("add", None), ("over", (0.0, 1.0)), ("seam", (0.6, 1.0))):
        canvas, label = np.zeros((40, 56), np.float32), np.zeros((40, 56), np.int32)
        _paint(items, tables, canvas, label, np.zeros_like(canvas), contact=contact)
        out[name] = canvas
        assert set(np.unique(label)) == {0, 1, 2}
    lens = (slice(18, 23), slice(26, 29))  # inside both discs
    assert out["add"][lens].mean() > 1.8
    assert out["over"][lens].mean() == pytest.approx(1.0, abs=0.02)
    seam_row = out["seam"][20, 22:32]
    assert seam_row.min() < 0.8 < seam_row.max()


def test_daughter_pairs_are_two_touching_alike_nuclei():
    from nucleus_seg.data.synth.render import _daughter_pair

    rng = np.random.default_rng(0)
    for _ in range(20):
        pair = _daughter_pair(rng, {"x": 50.0, "y": 40.0, "a": 12.0, "b": 9.0, "theta": 0.3}, 0.05, 1.0,
                              1.0, 0.1, 1.0)
        assert len(pair["x"]) == 2
        gap = math.hypot(pair["x"][0] - pair["x"][1], pair["y"][0] - pair["y"][1])
        assert 0.8 * (pair["b"][0] + pair["b"][1]) < gap < 1.3 * (pair["b"][0] + pair["b"][1])
        assert pair["value"].min() > 1.0 and 0.7 < pair["a"][0] / pair["a"][1] < 1.4
