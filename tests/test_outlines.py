"""Outlines for Fiji (ImageJ ROI sets) and QuPath (GeoJSON): along pixel edges, exactly each nucleus' pixels."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from nucleus_seg.inference.outlines import (
    IMAGEJ_MAX_COORDINATE,
    geojson_text,
    imagej_roi,
    imagej_roi_zip,
    label_outlines,
    polygon_area,
)


def random_labels(seed: int, shape=(24, 30), ids=6) -> np.ndarray:
    """Speckled ids: pieces, holes, pixels touching only at corners, regions on the border, gaps in the ids."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for label in rng.choice(np.arange(1, 3 * ids), ids, replace=False):
        y0, x0 = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, 12), rng.integers(2, 12)
        patch = labels[y0:y0 + h, x0:x0 + w]
        patch[rng.random(patch.shape) < rng.uniform(0.4, 0.9)] = label
    return labels


def pixels_inside(polygons: list[list[np.ndarray]], shape) -> np.ndarray:
    """The pixels whose centres lie inside (outer ring, holes) polygons: centres never lie on a pixel edge."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    inside = np.zeros(len(centres), bool)
    for outer, *holes in polygons:
        piece = PolygonPath(np.asarray(outer, float)).contains_points(centres)
        for hole in holes:
            piece &= ~PolygonPath(np.asarray(hole, float)).contains_points(centres)
        inside |= piece
    return inside.reshape(shape)


@pytest.mark.parametrize("seed", range(12))
def test_outlines_run_along_pixel_edges_and_enclose_exactly_each_nucleus(seed):
    labels = random_labels(seed)
    outlines = label_outlines(labels)
    assert sorted(outlines) == sorted(set(np.unique(labels)) - {0})
    for label, pieces in outlines.items():
        mask = labels == label
        rings = [ring for outer, holes in pieces for ring in (outer, *holes)]
        for ring in rings:
            steps = np.diff(np.vstack([ring, ring[:1]]), axis=0)
            assert ((steps == 0).sum(axis=1) == 1).all()  # axis-parallel edges only: no diagonal
            assert ring.min() >= 0 and (ring.max(axis=0) <= labels.shape[::-1]).all()
        assert sum(polygon_area(o) - sum(map(polygon_area, hs)) for o, hs in pieces) == mask.sum()
        assert [polygon_area(o) for o, _ in pieces] == sorted((polygon_area(o) for o, _ in pieces), reverse=True)
        np.testing.assert_array_equal(pixels_inside([[o, *hs] for o, hs in pieces], labels.shape), mask)


def test_a_pixel_a_ring_and_a_nucleus_in_two_pieces():
    labels = np.zeros((8, 10), np.int32)
    labels[1, 1] = 1
    labels[3:7, 3:7] = 2
    labels[4:6, 4:6] = 0  # a hole
    labels[0:2, 8:10] = 3
    labels[5:7, 8:10] = 3
    labels[7, 8:10] = 3  # the second piece is the larger one
    outlines = label_outlines(labels)
    np.testing.assert_array_equal(outlines[1][0][0], [[1, 1], [1, 2], [2, 2], [2, 1]])
    (outer, holes), = outlines[2]
    assert polygon_area(outer) == 16 and [polygon_area(h) for h in holes] == [4]
    assert [polygon_area(o) for o, _ in outlines[3]] == [6, 4]


def test_imagej_roi_set_reads_back_in_roifile():
    """roifile (Christoph Gohlke's reader of ImageJ's format) reads each ROI as a traced polygon with our corners,
    named by label id, the largest piece of a nucleus in pieces."""
    roifile = pytest.importorskip("roifile")
    labels = random_labels(3, shape=(40, 60), ids=9)
    outlines = label_outlines(labels)
    archive = zipfile.ZipFile(io.BytesIO(imagej_roi_zip(outlines)))
    width = max(4, len(str(max(outlines))))
    assert archive.namelist() == [f"{label:0{width}d}.roi" for label in sorted(outlines)]
    for label in sorted(outlines):
        roi = roifile.ImagejRoi.frombytes(archive.read(f"{label:04d}.roi"))
        outer = outlines[label][0][0]
        assert roi.roitype == roifile.ROI_TYPE.TRACED and roi.name == f"{label:04d}"
        assert (roi.left, roi.top, roi.right, roi.bottom) == (*outer.min(axis=0), *outer.max(axis=0))
        np.testing.assert_array_equal(roi.integer_coordinates + [roi.left, roi.top], outer)
    assert imagej_roi_zip({}) and zipfile.ZipFile(io.BytesIO(imagej_roi_zip({}))).namelist() == []


def test_imagej_rois_refuse_coordinates_past_their_16_bits():
    far = np.array([[40000, 5], [40000, 6], [40001, 6], [40001, 5]])
    with pytest.raises(ValueError, match=f"up to {IMAGEJ_MAX_COORDINATE}.*GeoJSON"):
        imagej_roi(far, "0001")


def test_geojson_holds_every_piece_and_hole_with_its_score():
    labels = random_labels(5)
    outlines = label_outlines(labels)
    ids = sorted(outlines)
    scores = {label: 1 - label / 100 for label in ids}
    collection = json.loads(geojson_text(outlines, scores))
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(ids)
    for feature, label in zip(collection["features"], ids):
        props, geometry = feature["properties"], feature["geometry"]
        assert props["name"] == str(label) and props["objectType"] == "detection"
        assert props["classification"] == {"name": "Nucleus"} and props["measurements"]["score"] == scores[label]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        assert geometry["type"] == ("Polygon" if len(outlines[label]) == 1 else "MultiPolygon")
        assert all(ring[0] == ring[-1] for polygon in polygons for ring in polygon)  # closed, as GeoJSON wants
        np.testing.assert_array_equal(pixels_inside(polygons, labels.shape), labels == label)
    by_index = json.loads(geojson_text(outlines, [scores.get(k, 0.0) for k in range(1, max(ids) + 1)]))
    assert by_index == collection
