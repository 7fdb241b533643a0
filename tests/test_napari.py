"""The napari plugin in a real (offscreen) viewer: the widget from the npe2 manifest segments the sample as
NucleusPredictor does, remembers its model, cancels between tiles; the reader, writer and sample data.

Qt runs with QT_QPA_PLATFORM=offscreen (set in conftest.py); the model is the CPU demo R101-FPN with seeded
random weights (fp32), so the label image is compared pixel for pixel with NucleusPredictor's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from detectron2.modeling import build_model

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.data.io import read_image, read_label_image
from nucleus_seg.inference.outputs import measure
from nucleus_seg.inference.predictor import NucleusPredictor
from nucleus_seg.napari._reader import napari_get_reader
from nucleus_seg.napari._widget import (
    SegmentNucleiWidget,
    layer_image,
    load_predictor,
    parse_diameter,
    settings_path,
)

SAMPLE = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample"
OPTS = ["NUCLEUS.PREDICT.AMP", "False", "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "60",
        "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="session", autouse=True)
def _opengl(opengl_display):
    """Every test here makes a viewer, whose canvas needs OpenGL (see conftest's opengl_display); session
    scope and autouse, so the display exists before pytest-qt's session QApplication connects to it."""


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[str, str]:
    """A small config YAML and seeded random weights, as a user would pick them in the widget."""
    tmp = tmp_path_factory.mktemp("napari_model")
    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_cpu_demo.yaml", OPTS)
    (tmp / "model.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, tmp / "random.pth")
    return str(tmp / "model.yaml"), str(tmp / "random.pth")


@pytest.fixture
def viewer_with_widget(make_napari_viewer, model_files, tmp_path, monkeypatch):
    """A viewer with the sample opened and the widget docked, both through the plugin's manifest."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    viewer = make_napari_viewer()
    viewer.open_sample("nucleus_seg", "dsb2018")
    _, widget = viewer.window.add_plugin_dock_widget("nucleus_seg", "Segment nuclei")
    widget._image.value = viewer.layers["DSB-2018 sample"]
    widget._config.value, widget._weights.value = model_files
    return viewer, widget


@pytest.mark.slow
def test_widget_segments_the_sample(viewer_with_widget, model_files, qtbot):
    viewer, widget = viewer_with_widget
    assert isinstance(widget, SegmentNucleiWidget)
    assert viewer.layers["DSB-2018 ground truth"].visible is False  # the sample's ground truth, hidden
    widget._diameter.value, widget._score.value = "0", 0.3
    widget._run.native.click()
    qtbot.waitUntil(lambda: "DSB-2018 sample nuclei" in viewer.layers, timeout=120_000)
    qtbot.waitUntil(lambda: widget._run.enabled, timeout=10_000)
    layer = viewer.layers["DSB-2018 sample nuclei"]

    image = read_image(SAMPLE / "image.tif")
    cfg = get_nucleus_cfg(model_files[0], ["MODEL.WEIGHTS", model_files[1]])
    want = NucleusPredictor(cfg).predict_labels([image], diameter=0, score_thresh=0.3)[0]
    assert want.labels.max() > 5 and np.array_equal(layer.data, want.labels)
    header, rows = measure(want.labels, image, want.scores)
    assert list(layer.features.columns) == ["index", *header]  # nucleus-predict's CSV columns
    assert layer.features["index"].tolist() == [row[0] for row in rows]
    assert widget._table.shape == (len(rows), len(header))
    assert widget._status.value == f"{len(rows)} nuclei in DSB-2018 sample"

    remembered = json.loads(settings_path().read_text())
    assert (remembered["config"], remembered["weights"]) == model_files
    assert remembered["score_thresh"] == pytest.approx(0.3)
    again = SegmentNucleiWidget(viewer)  # a later napari session starts with the same model
    assert (str(again._config.value), str(again._weights.value)) == model_files and again._diameter.value == "0"


@pytest.mark.slow
def test_cancel_stops_between_tile_batches(viewer_with_widget, qtbot):
    viewer, widget = viewer_with_widget
    widget._diameter.value, widget._tile.value = "0", 128  # 49 tiles of the 512 px sample, 7 batches of 8
    steps: list[tuple[int, int]] = []
    widget._run.native.click()
    widget.worker.yielded.connect(steps.append)
    widget.worker.yielded.connect(lambda step: step[0] > 0 and widget._cancel.native.click())
    with qtbot.waitSignal(widget.worker.finished, timeout=120_000):
        pass
    assert widget._status.value == "cancelled"
    assert "DSB-2018 sample nuclei" not in viewer.layers
    assert steps and steps[-1][0] < steps[-1][1] == 49  # stopped after the first batch, not at the end
    assert widget._run.enabled and not widget._cancel.enabled


def test_widget_reports_bad_input_on_its_status_line(viewer_with_widget):
    _, widget = viewer_with_widget
    widget._weights.value = "/no/such/weights.pth"
    widget._run.native.click()
    assert widget.worker is None and widget._status.value == "weights: no such file '/no/such/weights.pth'"
    widget._weights.value, widget._diameter.value = __file__, "big"
    widget._run.native.click()
    assert widget.worker is None and widget._status.value.startswith("diameter must be a number of pixels")
    assert parse_diameter(" Auto ") == "auto" and parse_diameter("17.5") == 17.5


def test_a_one_channel_layer_is_the_nuclear_channel_whatever_number_the_config_gives_it(model_files, tmp_path):
    """napari opens a composite as one layer per channel: a model whose config names channel 2 segments the
    2-D layer the user picked (it failed with "the image has 1 channel"), and reads channel 2 of an RGB layer."""
    config = tmp_path / "channel2.yaml"
    cfg = get_nucleus_cfg(model_files[0], ["INPUT.NORMALIZE.CHANNEL", "2"])
    config.write_text(cfg.dump())
    predictor, channel = load_predictor(str(config), model_files[1])
    assert channel == 2 and predictor.cfg.INPUT.NORMALIZE.CHANNEL == -1
    image = read_image(SAMPLE / "image.tif")[:128, :128]
    gray = image if image.ndim == 2 else image[..., 0]
    assert layer_image(gray, channel) is gray
    rgb = np.dstack([np.zeros_like(gray), np.zeros_like(gray), gray])
    np.testing.assert_array_equal(layer_image(rgb, channel), gray)
    got = predictor.predict_labels([layer_image(gray, channel)], diameter=0, score_thresh=0.3)[0]
    want = predictor.predict_labels([layer_image(rgb, channel)], diameter=0, score_thresh=0.3)[0]
    assert got.labels.max() > 0
    np.testing.assert_array_equal(got.labels, want.labels)


def test_label_tiffs_open_as_labels_and_labels_layers_save_as_label_tiffs(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    gt = read_label_image(SAMPLE / "labels.tif")
    layer = viewer.add_labels(gt, name="gt")
    path = tmp_path / "gt_labels.tif"
    layer.save(str(path), plugin="nucleus_seg")
    assert tifffile.imread(path).dtype == np.uint16 and np.array_equal(tifffile.imread(path), gt)
    opened = viewer.open(str(path), plugin="nucleus_seg")
    assert opened[0]._type_string == "labels" and np.array_equal(opened[0].data, gt)

    many = np.zeros((300, 300), np.int64)
    many.ravel()[:70000] = np.arange(1, 70001)  # past uint16: written as uint32, as nucleus-predict does
    viewer.add_labels(many, name="many").save(str(tmp_path / "many_labels.tif"), plugin="nucleus_seg")
    assert tifffile.imread(tmp_path / "many_labels.tif").dtype == np.uint32

    tifffile.imwrite(tmp_path / "float_labels.tif", np.zeros((8, 8), np.float32))
    assert napari_get_reader(str(tmp_path / "float_labels.tif")) is None  # an image, not labels: not ours
    assert napari_get_reader(str(SAMPLE / "labels.tif")) is not None

    movie = np.stack([gt, np.roll(gt, 5, axis=1), gt[::-1]]).astype(np.uint16)  # nucleus-predict's label stack
    tifffile.imwrite(tmp_path / "movie_labels.tif", movie, imagej=True, metadata={"axes": "TYX"})
    opened = viewer.open(str(tmp_path / "movie_labels.tif"), plugin="nucleus_seg")
    assert opened[0]._type_string == "labels" and np.array_equal(opened[0].data, movie)
    opened[0].save(str(tmp_path / "edited_labels.tif"), plugin="nucleus_seg")  # saved back as the time-lapse it was
    with tifffile.TiffFile(tmp_path / "edited_labels.tif") as tif:
        assert tif.series[0].axes == "TYX" and np.array_equal(tif.asarray(), movie)


def test_outline_files_open_as_shapes_over_their_image(make_napari_viewer, tmp_path):
    """nucleus-predict's ROI set and GeoJSON (and Fiji's own ROI sets) open as Shapes layers whose outlines sit on
    the pixel edges of the nuclei; a zip of anything else is left to other readers."""
    import zipfile

    from nucleus_seg.data.outlines import geojson_text, imagej_roi_zip, label_outlines

    gt = read_label_image(SAMPLE / "labels.tif")
    outlines = label_outlines(gt)
    (tmp_path / "sample_rois.zip").write_bytes(imagej_roi_zip(outlines))
    (tmp_path / "sample_nuclei.geojson").write_text(geojson_text(outlines, np.ones(gt.max())))
    viewer = make_napari_viewer()
    for name in ("sample_rois.zip", "sample_nuclei.geojson"):
        (layer,) = viewer.open(str(tmp_path / name), plugin="nucleus_seg")
        assert layer._type_string == "shapes"
        if name.endswith(".zip"):  # an ImageJ ROI: a nucleus' largest piece
            rings = [pieces[0][0] for _, pieces in sorted(outlines.items())]
        else:  # GeoJSON: every piece and hole
            rings = [ring for _, pieces in sorted(outlines.items()) for outer, holes in pieces
                     for ring in (outer, *holes)]
        assert len(layer.data) == len(rings)
        for vertices, ring in zip(layer.data, rings):
            np.testing.assert_allclose(vertices[:, ::-1] + 0.5, ring)  # (row, col) of pixel centres, corners
        assert list(layer.features["nucleus"])[:3] == [1, 2, 3]
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "not a ROI")
    assert napari_get_reader(str(tmp_path / "other.zip")) is None

