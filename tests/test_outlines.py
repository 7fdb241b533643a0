"""Outlines for Fiji (ImageJ ROI sets) and QuPath (GeoJSON): along pixel edges, exactly each nucleus' pixels."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from nucleus_seg.data.outlines import (
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


def disks(shape=(60, 80), seed=0) -> np.ndarray:
    """Separate round nuclei, one piece each and no holes (an ImageJ ROI holds one outer outline)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for label in range(1, 7):
        cy, cx, r = rng.uniform(6, shape[0] - 6), rng.uniform(6, shape[1] - 6), rng.uniform(2.5, 6)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = label
    return labels


def sequential(labels: np.ndarray) -> np.ndarray:
    """Ids 1..N in the order of the old ids (what reading outlines in file order gives)."""
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def test_outlines_read_back_as_the_label_image_they_were_written_from(tmp_path):
    """GeoJSON keeps every piece and hole: exact for any label image. An ImageJ ROI set keeps one outer outline
    per nucleus: exact for nuclei in one piece without holes (every pixel centre inside or outside, none on an
    edge), as a `.zip` and as one `.roi`."""
    from nucleus_seg.data.outlines import read_outline_labels

    for seed in range(4):
        labels = random_labels(seed)
        (tmp_path / "a.geojson").write_text(geojson_text(label_outlines(labels), np.ones(int(labels.max()))))
        np.testing.assert_array_equal(read_outline_labels(tmp_path / "a.geojson", labels.shape), sequential(labels))
    labels = disks()
    outlines = label_outlines(labels)
    (tmp_path / "a.zip").write_bytes(imagej_roi_zip(outlines))
    np.testing.assert_array_equal(read_outline_labels(tmp_path / "a.zip", labels.shape), labels)
    (tmp_path / "one.roi").write_bytes(imagej_roi(outlines[3][0][0], "0003"))
    np.testing.assert_array_equal(read_outline_labels(tmp_path / "one.roi", labels.shape), labels == 3)


def test_rois_of_every_kind_with_an_area_are_read_and_the_others_refused(tmp_path, caplog):
    """Fiji's polygon (sub-pixel, written by roifile), rectangle and oval ROIs; an overlap is named; a line, a
    composite and an outline off the image are errors naming the file."""
    roifile = pytest.importorskip("roifile")
    from nucleus_seg.data.io import ImageReadError
    from nucleus_seg.data.outlines import read_outline_labels

    rois = [roifile.ImagejRoi.frompoints(np.array([[2.0, 2.0], [12.0, 2.0], [12.0, 8.0], [2.0, 8.0]]) + 0.25),
            roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=20, top=3, right=26, bottom=7),
            roifile.ImagejRoi(roitype=roifile.ROI_TYPE.OVAL, left=30, top=10, right=50, bottom=30),
            roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=24, top=5, right=28, bottom=9)]
    for k, roi in enumerate(rois):
        roi.name = f"r{k}"
    roifile.roiwrite(tmp_path / "set.zip", rois)
    with caplog.at_level("WARNING"):
        labels = read_outline_labels(tmp_path / "set.zip", (40, 60))
    assert "overlap on 4 pixels" in caplog.text and "set.zip" in caplog.text
    expected = np.zeros((40, 60), np.int32)
    expected[2:8, 2:12] = 1  # corners 2.25..12.25: the centres 2.5..11.5
    expected[3:7, 20:26] = 2
    expected[5:9, 24:28] = 4  # the later rectangle keeps the shared pixels
    np.testing.assert_array_equal(np.where(labels == 3, 0, labels), expected)
    assert abs((labels == 3).sum() - np.pi * 10 * 10) < 12 and labels[20, 40] == 3 and labels[10, 30] == 0

    bad = {"line": roifile.ImagejRoi(roitype=roifile.ROI_TYPE.LINE, x1=1, y1=1, x2=9, y2=9),
           "far": roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=100, top=100, right=110, bottom=110)}
    for name, roi in bad.items():
        roi.tofile(tmp_path / f"{name}.roi")
        with pytest.raises(ImageReadError, match=f"{name}.roi.*(no area|covers no pixel)"):
            read_outline_labels(tmp_path / f"{name}.roi", (40, 60))
    composite = bytearray(imagej_roi(np.array([[1, 1], [1, 4], [4, 4], [4, 1]]), "c"))
    composite[36:40] = (8).to_bytes(4, "big")  # a shape ROI's size: several shapes in one
    (tmp_path / "composite.roi").write_bytes(bytes(composite))
    with pytest.raises(ImageReadError, match="composite.roi: a composite ROI"):
        read_outline_labels(tmp_path / "composite.roi", (40, 60))


def test_geojson_as_qupath_exports_it_cells_give_their_nuclei(tmp_path):
    from nucleus_seg.data.io import ImageReadError
    from nucleus_seg.data.outlines import read_outline_labels

    def square(x0, y0, x1, y1):
        return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]

    cell = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(0, 0, 20, 20)},
            "nucleusGeometry": {"type": "Polygon", "coordinates": square(5, 6, 9, 10)},
            "properties": {"objectType": "cell"}}
    detection = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(12, 1, 15, 3)},
                 "properties": {"objectType": "detection"}}
    (tmp_path / "list.geojson").write_text(json.dumps([cell, detection]))  # QuPath's "export as array"
    labels = read_outline_labels(tmp_path / "list.geojson", (24, 24))
    assert (labels == 1).sum() == 16 and labels[6:10, 5:9].min() == 1 and (labels == 2).sum() == 6
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}}
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [point]}))
    with pytest.raises(ImageReadError, match="points.geojson: feature 0 is a Point"):
        read_outline_labels(tmp_path / "points.geojson", (24, 24))
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(ImageReadError, match="bad.geojson: not GeoJSON"):
        read_outline_labels(tmp_path / "bad.geojson", (24, 24))
