"""Tiles and the seam rule, on constructed instance sets (no model involved)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleus_seg.inference.tiling import (
    NucleusFilter,
    Stitcher,
    Tile,
    TiledDetections,
    TileInstances,
    finalize_labels,
    make_tiles,
    masks_to_prediction,
    tile_starts,
    without_edge_nuclei,
    without_small_nuclei,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 700), st.integers(16, 256), st.data())
def test_tiles_cover_overlap_and_cores_partition(size, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + tile, size) == size  # reaches the end, never beyond it
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # neighbours overlap by at least `overlap`
    tiles = make_tiles((size, 7), tile, overlap)
    owners = np.zeros(size, int)
    for t in tiles:
        assert t.y0 <= t.cy0 < t.cy1 <= t.y1  # the core lies inside its tile
        owners[t.cy0:t.cy1] += 1
    assert (owners == 1).all()  # cores partition the image


def test_bad_tiling_arguments_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 64, 64)


def disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def tile_view(tile: Tile, masks: list[np.ndarray], scores: list[float], jitter: list[float] | None = None):
    """What a detector run on `tile` reports for whole-image masks: each mask cut to the tile, its box
    the bounding box of what the tile sees (plus optional jitter, as a detector's boxes wobble)."""
    keep_masks, origins, kept_scores, boxes = [], [], [], []
    for k, m in enumerate(masks):
        cut = np.zeros_like(m)
        cut[tile.y0:tile.y1, tile.x0:tile.x1] = m[tile.y0:tile.y1, tile.x0:tile.x1]
        if not cut.any():
            continue
        ys, xs = np.nonzero(cut)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        d = 0.0 if jitter is None else jitter[k]
        boxes.append([x0 + d, y0, x1 + d, y1])
        origins.append([y0, x0])
        keep_masks.append(cut[y0:y1, x0:x1])
        kept_scores.append(scores[k])
    h = max((m.shape[0] for m in keep_masks), default=1)
    w = max((m.shape[1] for m in keep_masks), default=1)
    windows = np.zeros((len(keep_masks), h, w), bool)
    for i, m in enumerate(keep_masks):
        windows[i, :m.shape[0], :m.shape[1]] = m
    return TileInstances(windows, np.asarray(origins, int).reshape(-1, 2), np.asarray(kept_scores, np.float32),
                         np.asarray(boxes, np.float32).reshape(-1, 4))


def stitch(shape, tile, overlap, masks, scores, jitter_per_tile=None):
    stitcher = Stitcher(shape)
    for i, t in enumerate(make_tiles(shape, tile, overlap)):
        jitter = None if jitter_per_tile is None else jitter_per_tile[i]
        stitcher.add(t, tile_view(t, masks, scores, jitter))
    return stitcher, stitcher.finish()


def test_nucleus_crossing_a_seam_is_kept_once_and_whole():
    shape = (100, 160)  # tile 100, overlap 40: x tiles [0,100) and [60,160), core boundary x=80
    assert [(t.x0, t.x1, t.cx0, t.cx1) for t in make_tiles(shape, 100, 40)] == [(0, 100, 0, 80), (60, 160, 80, 160)]
    crossing = disk(shape, 50, 95, 9)  # spans x 86..104: cut by tile 0's right edge, whole in tile 1
    in_overlap = disk(shape, 20, 78, 8)  # spans x 70..86: whole in both tiles, centre in tile 0's core
    left = disk(shape, 70, 30, 8)
    right = disk(shape, 30, 130, 8)
    masks = [crossing, in_overlap, left, right]
    stitcher, pred = stitch(shape, 100, 40, masks, [0.9, 0.8, 0.7, 0.6])
    assert len(pred) == 4 and pred.labels.max() == 4  # no duplicates, nothing lost
    for m in masks:  # every nucleus is one label covering exactly its pixels: no halves
        ids = np.unique(pred.labels[m])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(pred.labels == ids[0], m)
    assert stitcher.num_cut == 0 and stitcher.num_duplicates == 0


def test_duplicate_across_a_core_boundary_keeps_the_higher_score():
    shape = (100, 160)
    nucleus = disk(shape, 50, 80, 8)  # centred on the core boundary x=80
    # the two tiles' boxes wobble so each tile thinks the centre is in its own core
    stitcher, pred = stitch(shape, 100, 40, [nucleus], [0.6], jitter_per_tile=[[-1.0], [+1.0]])
    assert stitcher.num_duplicates == 1
    assert len(pred) == 1
    np.testing.assert_array_equal(pred.labels == 1, nucleus)


def test_whole_instance_beats_a_cut_duplicate_even_with_a_lower_score():
    shape = (100, 160)
    tiles = make_tiles(shape, 100, 40)
    nucleus = disk(shape, 50, 92, 9)  # x 83..101: cut in tile 0
    stitcher = Stitcher(shape)
    cut_view = tile_view(tiles[0], [nucleus], [0.95])
    cut_view.boxes[:, 0] -= 30  # a box stretched left: tile 0 thinks the centre is in its core (x < 80)
    stitcher.add(tiles[0], cut_view)
    stitcher.add(tiles[1], tile_view(tiles[1], [nucleus], [0.5]))
    pred = stitcher.finish()
    assert len(pred) == 1 and pred.scores[0] == pytest.approx(0.5)
    np.testing.assert_array_equal(pred.labels == 1, nucleus)


def test_nucleus_larger_than_the_overlap_is_merged_from_its_pieces():
    shape = (60, 180)  # tile 100, overlap 20: x tiles [0,100) and [80,180), boundary x=90
    big = disk(shape, 30, 90, 25)  # 51 px across: no tile sees it whole
    stitcher, pred = stitch(shape, 100, 20, [big], [0.7])
    assert stitcher.num_merged == 1
    assert len(pred) == 1
    np.testing.assert_array_equal(pred.labels == 1, big)


def test_touching_nuclei_of_different_tiles_stay_apart():
    shape = (100, 160)
    a = disk(shape, 50, 72, 8)  # centre in tile 0's core
    b = disk(shape, 50, 88, 8)  # centre in tile 1's core; touches a at x=80
    b &= ~a
    _, pred = stitch(shape, 100, 40, [a, b], [0.6, 0.9])
    assert len(pred) == 2
    for m in (a, b):
        assert len(np.unique(pred.labels[m])) == 1


def test_one_tile_gives_the_untiled_label_image():
    rng = np.random.default_rng(3)
    shape = (90, 120)
    masks = [disk(shape, *rng.integers(5, 85, 2), rng.integers(3, 15)) for _ in range(30)]
    scores = rng.random(30).astype(np.float32)
    scores[5] = scores[6]  # a tie: order must still agree
    tile = make_tiles(shape, 128, 32)
    assert len(tile) == 1
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    inst = TileInstances(np.stack(masks), np.zeros((30, 2), int), scores, np.asarray(boxes, np.float32))
    stitcher = Stitcher(shape)
    stitcher.add(tile[0], inst)
    tiled = stitcher.finish()
    untiled = masks_to_prediction(np.stack(masks), scores, np.asarray(boxes))
    np.testing.assert_array_equal(tiled.labels, untiled.labels)
    np.testing.assert_array_equal(tiled.scores, untiled.scores)


def test_finalize_drops_empty_ids_and_orders_by_score():
    labels = np.array([[1, 1, 0],
                       [3, 0, 4]])
    pred = finalize_labels(labels, [0.2, 0.9, 0.5, 0.7], np.arange(16).reshape(4, 4))
    # id 2 has no pixels; the rest renumber by score: 4 (0.7) -> 1, 3 (0.5) -> 2, 1 (0.2) -> 3
    np.testing.assert_array_equal(pred.labels, [[3, 3, 0], [2, 0, 1]])
    np.testing.assert_allclose(pred.scores, [0.7, 0.5, 0.2])
    np.testing.assert_array_equal(pred.boxes[:, 0], [12, 8, 0])


def test_nuclei_touching_the_border_are_dropped_and_the_rest_keep_their_order():
    labels = np.array([[0, 1, 0, 0, 0, 0],
                       [0, 0, 2, 2, 0, 0],
                       [0, 3, 3, 0, 4, 0],
                       [0, 0, 0, 0, 4, 5],
                       [6, 0, 0, 0, 0, 0]])
    pred = finalize_labels(labels, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.arange(24).reshape(6, 4))
    kept = without_edge_nuclei(pred)
    # 1 (top row), 5 (right column) and 6 (left column, bottom row) go; 2, 3, 4 become 1, 2, 3
    np.testing.assert_array_equal(kept.labels, np.where(np.isin(labels, [2, 3, 4]), labels - 1, 0) * (labels > 0))
    np.testing.assert_allclose(kept.scores, [0.8, 0.7, 0.6])
    np.testing.assert_array_equal(kept.boxes[:, 0], [4, 8, 12])
    assert without_edge_nuclei(kept) is kept  # nothing touches the border any more
    empty = finalize_labels(np.zeros((3, 3), np.int32), [], np.zeros((0, 4)))
    assert without_edge_nuclei(empty) is empty
    small = without_small_nuclei(pred, 2)  # ids 1, 5 and 6 have one pixel
    np.testing.assert_array_equal(small.labels, np.where(np.isin(labels, [2, 3, 4]), labels - 1, 0) * (labels > 0))
    assert without_small_nuclei(pred, 0) is pred and without_small_nuclei(pred, 1) is pred
    both = NucleusFilter(exclude_edges=True, min_area=2)(pred)
    np.testing.assert_array_equal(both.labels, kept.labels)
    none = NucleusFilter(min_area=3)(pred)  # 2, 3 and 4 have two pixels each
    assert not none.labels.any() and len(none.scores) == 0


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("order", ["low score first", "high score first"])
def test_pixels_contested_across_a_seam_go_to_the_higher_score(order):
    """Two different nuclei either side of a seam that overlap a little: the shared pixels belong to the
    higher-scoring one whichever tile is stitched first."""
    shape = (64, 128)
    left, right = make_tiles(shape, 72, 16)  # x 0-72 and 56-128, cores split at x = 64
    low = _disk(shape, 32, 58, 9)  # centre in the left core, score 0.6
    high = _disk(shape, 32, 72, 9)  # centre in the right core, score 0.9
    contested = low & high
    assert 0 < contested.sum() < 0.5 * low.sum()  # touching nuclei, not one nucleus seen twice

    def instances(mask, score):
        ys, xs = np.nonzero(mask)
        box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
        return TileInstances(mask[None], np.zeros((1, 2), int), np.array([score]), box)

    stitcher = Stitcher(shape)
    parts = [(left, instances(low, 0.6)), (right, instances(high, 0.9))]
    for tile, inst in (parts if order == "low score first" else parts[::-1]):
        stitcher.add(tile, inst)
    pred = stitcher.finish()
    assert len(pred) == 2 and pred.scores[0] == pytest.approx(0.9)
    assert (pred.labels[contested] == 1).all()  # id 1: the 0.9 nucleus
    assert (pred.labels[low & ~high] == 2).all()


def test_tiled_detections_stitch_as_the_stitcher_and_the_writer_task_names_the_image_in_its_warning(tmp_path):
    """nucleus-predict's writer processes stitch TiledDetections (the tile batcher's output): the same label
    image as stitching on the fly, and the seam warning names the image it came from."""
    import tifffile

    from nucleus_seg.inference.batch import stitch_and_write

    shape = (60, 180)  # tile 100, overlap 20: a 51 px nucleus is cut by every tile
    masks, scores = [disk(shape, 30, 90, 25), disk(shape, 30, 20, 6)], [0.7, 0.9]
    tiles = make_tiles(shape, 100, 20)
    tiled = TiledDetections(shape, tiles, [tile_view(t, masks, scores) for t in tiles], edge_margin=1.0, overlap=20)
    stitcher, expected = stitch(shape, 100, 20, masks, scores)
    pred, num_cut = tiled.stitch()
    assert num_cut == stitcher.num_cut > 0 and len(pred) == 2
    np.testing.assert_array_equal(pred.labels, expected.labels)
    path = tmp_path / "plate_07.tif"
    entries, warning = stitch_and_write(tmp_path, {"labels"}, path, np.zeros(shape, np.uint16), tiled, None)
    assert warning.startswith(f"{path}: {num_cut} nuclei touched tile seams (larger than the 20 px overlap)")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "plate_07_labels.tif"), expected.labels)
    assert entries == (None, None, None)  # no per-run formats asked for
    _, no_warning = stitch_and_write(tmp_path, {"labels"}, path, np.zeros(shape, np.uint16), pred, None)
    assert no_warning is None  # a stitched prediction has nothing left to warn about
