"""PNG figures of an evaluation: metrics against IoU threshold, precision-recall, worst-image overlays."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.io import normalize_image
from ..structures import inner_boundaries
from ..utils.files import atomic_path
from .matching import label_overlap, match_pairs


def _figure(**kwargs) -> Figure:
    """A figure on its own Agg canvas: no pyplot state, no global backend switch, works headless."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def plot_curves(report: dict, path: str | os.PathLike) -> str:
    """Mean accuracy/precision/recall/F1 against IoU threshold, and COCO precision-recall when present.

    The left panel is what the DSB score averages (accuracy from IoU 0.5 to 0.95): a steep fall shows
    masks that find nuclei but trace their borders poorly. The right panel (model runs only: label
    images carry no scores) shows mask precision against recall over the detection score ranking.
    """
    curve = report["iou_curve"]
    pr = (report.get("pr_curves") or {}).get("segm")
    fig = _figure(figsize=(11 if pr else 5.5, 4.2))
    axes = fig.subplots(1, 2 if pr else 1, squeeze=False)
    ax = axes[0, 0]
    for key, style in (("accuracy", "-o"), ("precision", "--"), ("recall", "--"), ("f1", ":")):
        ax.plot(curve["thresholds"], curve[key], style, label=key)
    ax.set(
        xlabel="IoU threshold",
        ylabel="mean over images (accuracy = TP/(TP+FP+FN))",
        ylim=(0, 1.02),
        title=f"{report['dataset']}: DSB score {report['dsb_score']:.3f} (mean accuracy, IoU 0.5-0.95)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if pr:
        ax = axes[0, 1]
        recall = np.asarray(pr["recall"])
        for key, label in (("precision50", "IoU 0.50"), ("precision75", "IoU 0.75")):
            precision = np.asarray(pr[key], dtype=float)
            precision[precision < 0] = np.nan  # -1: recall level never reached
            ax.plot(recall, precision, label=label)
        ap = (report.get("coco") or {}).get("segm", {})
        ax.set(
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title=f"COCO mask AP50 {ap.get('AP50', float('nan')):.1f}, AP {ap.get('AP', float('nan')):.1f}",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return str(path)


def plot_overlay(
    gt: np.ndarray,
    pred: np.ndarray,
    path: str | os.PathLike,
    image: np.ndarray | None = None,
    title: str = "",
    iou_thresh: float = 0.5,
) -> str:
    """Ground-truth (green) and predicted (magenta) outlines over the image; misses are shaded.

    Ground-truth nuclei without a match at ``iou_thresh`` (FN) are shaded green, predictions without one
    (FP) magenta, so the failure mode of a bad image is visible at a glance.
    """
    if image is None:
        rgb = np.zeros((*gt.shape, 3), dtype=np.float32)
    else:
        rgb = normalize_image(image).astype(np.float32) / 255.0 * 0.8
    overlap = label_overlap(gt, pred)
    chosen = match_pairs(overlap, iou_thresh)
    fn_ids = np.setdiff1d(overlap.gt_ids, overlap.gt_ids[overlap.pair_gt[chosen]])
    fp_ids = np.setdiff1d(overlap.pred_ids, overlap.pred_ids[overlap.pair_pred[chosen]])
    green, magenta = np.array([0.1, 1.0, 0.2]), np.array([1.0, 0.2, 1.0])
    for ids, label, color in ((fn_ids, gt, green), (fp_ids, pred, magenta)):
        shade = np.isin(label, ids) & (label > 0)
        rgb[shade] = 0.6 * rgb[shade] + 0.4 * color
    rgb[inner_boundaries(gt)] = green
    rgb[inner_boundaries(pred)] = magenta
    height, width = gt.shape
    scale = 8.0 / max(height, width)
    fig = _figure(figsize=(max(width * scale, 3), max(height * scale, 3) + 0.4))
    ax = fig.add_axes([0, 0, 1, 1 - 0.4 / (max(height * scale, 3) + 0.4)])
    ax.imshow(np.clip(rgb, 0, 1), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(
        f"{title}\ngreen: ground truth, magenta: prediction; shaded: unmatched at IoU>{iou_thresh}",
        fontsize=8,
    )
    _save(fig, path, dpi=max(100, int(max(height, width) / 8)))
    return str(path)


def worst_rows(report: dict, n: int, key: str = "dsb_score") -> list[dict]:
    """The ``n`` per-image rows with the lowest ``key`` (ties by file name)."""
    rows: Sequence[dict] = report["per_image"]
    return sorted(rows, key=lambda r: (r[key], r["file_name"]))[: max(n, 0)]


def plot_before_after(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | os.PathLike,
                      titles: tuple[str, str] = ("before", "after")) -> str:
    """One row per ``(name, normalised image, labels before, labels after)``: the two models' outlines
    (magenta) side by side, with their counts."""
    fig = _figure(figsize=(8, 4 * len(rows)))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for row, (name, image, *labels) in enumerate(rows):
        gray = image if image.ndim == 2 else image[..., 0]
        for column, (title, label) in enumerate(zip(titles, labels)):
            rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0 * 0.8, 3, axis=2)
            rgb[inner_boundaries(label)] = (1.0, 0.2, 1.0)
            ax = axes[row, column]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(f"{name}: {title}, {len(np.unique(label)) - 1} nuclei", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path, dpi=100)
    return str(path)
