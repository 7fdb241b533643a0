"""The README's napari screenshot: the "Segment nuclei" widget run on the DSB-2018 sample, offscreen.

    python scripts/napari_screenshot.py [--config CFG --weights W.pth] [--out docs/napari_widget.png]

Without --weights the model has seeded random weights (its nuclei are meaningless), and the caption
printed at the end says so. Runs with QT_QPA_PLATFORM=offscreen and, without a DISPLAY, a virtual X server
(Xvfb) for napari's OpenGL canvas, so it needs no screen.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from detectron2.modeling import build_model

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.napari._headless import ensure_display
from nucleus_seg.utils.files import atomic_write

DEFAULT_CONFIG = "configs/nucleus_R101_FPN_cpu_demo.yaml"


def window_with_canvas(viewer) -> np.ndarray:
    """The window grab with the canvas drawn in. Under the offscreen platform Qt's grab of the OpenGL canvas
    comes back black, so the canvas is rendered by vispy into its own framebuffer and pasted at its place
    (napari has no public call for that: ``_qt_viewer`` and ``_scene_canvas`` are its internals)."""
    from qtpy.QtCore import QPoint

    window = viewer.screenshot(canvas_only=False, flash=False)
    scene = viewer.window._qt_viewer.canvas._scene_canvas
    canvas = scene.render()
    widget = scene.native
    origin = widget.mapTo(viewer.window._qt_window, QPoint(0, 0))
    ratio = window.shape[1] / viewer.window._qt_window.width()  # device pixels per widget pixel
    x, y = round(origin.x() * ratio), round(origin.y() * ratio)
    h, w = round(widget.height() * ratio), round(widget.width() * ratio)
    if canvas.shape[:2] != (h, w):
        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    window[y:y + h, x:x + w] = canvas[:window.shape[0] - y, :window.shape[1] - x]
    return window


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--weights", help="trained checkpoint (default: seeded random weights)")
    parser.add_argument("--out", default="docs/napari_widget.png")
    parser.add_argument("--diameter", default="0", help="the widget's diameter field (default 0: as the image is)")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the segmentation")
    args = parser.parse_args(argv)
    # the random weights (~240 MB) and napari's settings live only as long as the run
    with tempfile.TemporaryDirectory(prefix="napari_screenshot_") as tmp:
        return screenshot(args, Path(tmp))


def screenshot(args: argparse.Namespace, tmp: Path) -> int:
    """Run the widget on the sample in an offscreen viewer and write the window grab to ``args.out``."""
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    ensure_display()
    import napari  # imported here: Qt reads QT_QPA_PLATFORM when napari first loads it
    from qtpy.QtWidgets import QApplication

    config, weights = args.config, args.weights
    if weights is None:
        cfg = get_nucleus_cfg(config, ["MODEL.DEVICE", "cpu"])
        torch.manual_seed(0)
        weights = str(tmp / "random.pth")
        torch.save({"model": build_model(cfg).state_dict()}, weights)
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "xdg")  # leave the user's remembered model alone

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    viewer.open_sample("nucleus_seg", "dsb2018")
    _, widget = viewer.window.add_plugin_dock_widget("nucleus_seg", "Segment nuclei")
    widget._image.value = viewer.layers["DSB-2018 sample"]
    widget._config.value, widget._weights.value = config, weights
    widget._diameter.value, widget._score.value = args.diameter, args.score_thresh
    widget.start()
    finished: list[bool] = []
    if widget.worker is not None:
        widget.worker.finished.connect(lambda: finished.append(True))
    deadline = time.monotonic() + args.timeout
    while widget.worker is not None and not finished and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(20):  # let the canvas and the table draw the result
        QApplication.processEvents()
        time.sleep(0.05)
    if "DSB-2018 sample nuclei" not in viewer.layers:
        print(f"napari_screenshot: no result ({widget._status.value})", file=sys.stderr)
        return 1
    viewer.layers.selection.active = viewer.layers["DSB-2018 sample nuclei"]
    viewer.reset_view()
    QApplication.processEvents()
    rgba = window_with_canvas(viewer)
    _, png = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    atomic_write(args.out, png.tobytes())
    model = f"weights {args.weights}" if args.weights else "seeded random weights (meaningless nuclei)"
    print(f"wrote {args.out}: {widget._status.value}; {Path(config).name}, {model}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
