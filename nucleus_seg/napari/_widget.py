"""The "Segment nuclei" dock widget: NucleusPredictor on an image layer, in a worker thread.

The model (config + weights) is remembered between napari runs in ``$XDG_CONFIG_HOME/nucleus_seg/napari.json``
(``~/.config`` by default). Prediction runs in napari's ``thread_worker``: an image more than two tiles on a
side goes tile batch by tile batch (``predict_large_steps``), so the progress bar moves and Cancel stops between
batches; a smaller image is one step, as in nucleus-predict. The result is a Labels layer
whose ``features`` and the table below hold the columns of nucleus-predict's ``_measurements.csv``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from pathlib import Path

import napari
import numpy as np
import torch
from magicgui.widgets import (
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
    create_widget,
)
from napari.qt.threading import thread_worker

from ..config import get_nucleus_cfg
from ..data.io import select_channel
from ..inference import scale
from ..inference.outputs import measure
from ..inference.predictor import NucleusPredictor, fits_one_pass
from ..inference.tiling import LabelPrediction
from ..utils.files import atomic_write

SETTINGS_KEYS = ("config", "weights", "diameter", "score_thresh", "tile")


def settings_path() -> Path:
    """Where the widget remembers its model: XDG's config folder, as other desktop tools do."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nucleus_seg" / "napari.json"


def load_settings() -> dict:
    """The remembered settings; {} when there are none or the file is unreadable (never an error)."""
    try:
        values = json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in values.items() if k in SETTINGS_KEYS} if isinstance(values, dict) else {}


def save_settings(values: dict) -> None:
    atomic_write(settings_path(), json.dumps({k: values[k] for k in SETTINGS_KEYS if k in values}, indent=1) + "\n")


def parse_diameter(text: str) -> float | str:
    """'auto', or a diameter in px (0: the image as it is); ValueError for anything else."""
    value = scale.parse_diameter(text)
    return "auto" if value is None else value


LoadedModel = tuple[NucleusPredictor, int]  # load_predictor's (predictor, the config's nuclear channel)


def load_predictor(config: str, weights: str) -> LoadedModel:
    """The predictor, and the nuclear channel its config names (INPUT.NORMALIZE.CHANNEL), which the widget
    applies itself (:func:`layer_image`): the predictor is built to read every channel of what it gets."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = get_nucleus_cfg(config, ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", device])
    channel = int(cfg.INPUT.NORMALIZE.CHANNEL)
    cfg.defrost()
    cfg.INPUT.NORMALIZE.CHANNEL = -1
    cfg.freeze()
    return NucleusPredictor(cfg), channel


def layer_image(image: np.ndarray, channel: int) -> np.ndarray:
    """What a layer gives the model. napari opens a composite as one layer per channel, so a one-channel (2-D)
    layer is the channel the user picked, whatever number the config gives the nuclear stain; of an RGB layer,
    that channel is read (all for -1). A four-channel layer is read as nucleus-predict reads its file: the fourth
    channel is a stain unless constant (an opaque alpha)."""
    return image if image.ndim == 2 or channel < 0 else select_channel(image, channel)


def segment_steps(predictor: NucleusPredictor, image: np.ndarray, diameter: float | str, score_thresh: float,
                  tile: int) -> Generator[tuple[int, int], None, LabelPrediction]:
    """Yields (done, total) between the steps a worker may stop at; returns the label prediction.

    As nucleus-predict: an image up to ``ONE_PASS_TILES`` tiles on a side (after the diameter rescale) in one
    pass, a larger one tile batch by tile batch.
    """
    scale = predictor.input_scale(diameter)
    if fits_one_pass(image.shape, 1.0 if scale is None else scale, tile):
        yield 0, 1
        return predictor.predict_labels([image], diameter=diameter, score_thresh=score_thresh)[0]
    overlap = min(int(predictor.cfg.NUCLEUS.PREDICT.TILE_OVERLAP), tile // 2)  # a small tile keeps a core
    for done, total, result in predictor.predict_large_steps(image, tile=tile, overlap=overlap, diameter=diameter,
                                                             score_thresh=score_thresh):
        if result is not None:
            return result
        yield done, total
    raise RuntimeError("predict_large_steps ended without a result")


def run_segmentation(
    model: LoadedModel | None, config: str, weights: str, image: np.ndarray, diameter: float | str,
    score_thresh: float, tile: int,
) -> Generator[tuple[int, int], None, tuple[LoadedModel, LabelPrediction]]:
    """The worker's body: load the model (:func:`load_predictor`) if it changed, then :func:`segment_steps`
    on the layer's image (:func:`layer_image`)."""
    if model is None:
        yield 0, 1
        model = load_predictor(config, weights)
    predictor, channel = model
    result = yield from segment_steps(predictor, layer_image(image, channel), diameter, score_thresh, tile)
    return model, result


def _path_text(edit: FileEdit) -> str:
    value = str(edit.value) if edit.value is not None else ""
    return "" if value in ("", ".") else value


class SegmentNucleiWidget(Container):
    """Image layer + model + diameter, score threshold and tile size -> Labels layer and measurements."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = napari_viewer
        saved = load_settings()
        self._image = create_widget(annotation=napari.layers.Image, label="image")
        self._config = FileEdit(label="config", mode="r", filter="*.yaml", value=saved.get("config", ""),
                                tooltip="the model's YAML config (a nucleus_seg config)")
        self._weights = FileEdit(label="weights", mode="r", filter="*.pth", value=saved.get("weights", ""),
                                 tooltip="the trained checkpoint (model_final.pth, model_best.pth)")
        self._diameter = LineEdit(label="diameter", value=str(saved.get("diameter", "auto")),
                                  tooltip="nucleus diameter in px, 'auto' to estimate it, 0 for no rescale")
        self._score = FloatSpinBox(label="score threshold", min=0.0, max=1.0, step=0.05,
                                   value=float(saved.get("score_thresh", 0.5)))
        self._tile = SpinBox(label="tile size", min=128, max=8192, step=64, value=int(saved.get("tile", 512)),
                             tooltip="images over two tiles on a side (model px) are predicted tile by tile")
        self._run = PushButton(text="Segment")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self._status = Label(value="")
        self._table = Table(label="measurements")
        self.extend([self._image, self._config, self._weights, self._diameter, self._score, self._tile,
                     self._run, self._cancel, self._progress, self._status, self._table])
        self._run.changed.connect(self.start)
        self._cancel.changed.connect(self.cancel)
        self._model: LoadedModel | None = None
        self._model_key: tuple[str, str] | None = None
        self.worker = None

    def start(self) -> None:
        """Check the inputs (a problem goes to the status line) and start the worker."""
        layer = self._image.value
        config, weights = _path_text(self._config), _path_text(self._weights)
        try:
            if layer is None:
                raise ValueError("no image layer: open an image first (File > Open Sample > nucleus_seg)")
            image = np.asarray(layer.data)
            if image.ndim != 2 and not (layer.rgb and image.ndim == 3):
                raise ValueError(f"{layer.name}: a 2-D image (gray or RGB) is needed, got shape {image.shape}")
            if not Path(config).is_file():
                raise ValueError(f"config: no such file {config!r}")
            if not Path(weights).is_file():
                raise ValueError(f"weights: no such file {weights!r}")
            diameter = parse_diameter(self._diameter.value)
        except ValueError as exc:
            self._status.value = str(exc)
            return
        save_settings({"config": config, "weights": weights, "diameter": self._diameter.value.strip(),
                       "score_thresh": float(self._score.value), "tile": int(self._tile.value)})
        key = (config, weights)
        model = self._model if key == self._model_key else None
        self.worker = thread_worker(run_segmentation)(model, config, weights, image, diameter,
                                                      float(self._score.value), int(self._tile.value))
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(lambda value: self._on_done(value, key, layer, image))
        self.worker.errored.connect(self._on_error)
        self.worker.aborted.connect(self._on_cancelled)
        self.worker.finished.connect(self._on_finished)
        self._run.enabled, self._cancel.enabled = False, True
        self._progress.max, self._progress.value = 1, 0
        self._status.value = f"segmenting {layer.name}..."
        self.worker.start()

    def cancel(self) -> None:
        """Ask the worker to stop at its next step (between tile batches)."""
        if self.worker is not None:
            self.worker.quit()
            self._status.value = "cancelling..."

    def _on_progress(self, step: tuple[int, int]) -> None:
        self._progress.max, self._progress.value = max(1, step[1]), step[0]

    def _on_done(self, value: tuple[LoadedModel, LabelPrediction], key: tuple[str, str], layer,
                 image: np.ndarray) -> None:
        self._model, self._model_key = value[0], key
        pred = value[1]
        header, rows = measure(pred.labels, image, pred.scores)
        name = f"{layer.name} nuclei"
        if name in self._viewer.layers:
            out = self._viewer.layers[name]
            out.data = pred.labels
        else:
            out = self._viewer.add_labels(pred.labels, name=name, scale=layer.scale[-2:],
                                          translate=layer.translate[-2:])
        columns = {h: [row[i] for row in rows] for i, h in enumerate(header)}
        out.features = {"index": columns["id"], **columns}  # napari maps rows to label values by "index"
        self._table.value = {"data": rows, "index": columns["id"], "columns": header}
        self._progress.value = self._progress.max
        self._status.value = f"{len(rows)} nuclei in {layer.name}"

    def _on_error(self, exc: Exception) -> None:
        self._status.value = f"failed: {exc}"

    def _on_cancelled(self) -> None:
        self._status.value = "cancelled"

    def _on_finished(self) -> None:
        self._run.enabled, self._cancel.enabled = True, False
