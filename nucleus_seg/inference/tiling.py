"""Tiles over a large image, and stitching per-tile instances into one label image as they come.

Seam rule (what :class:`Stitcher` does), with tiles that overlap by ``overlap`` px:

1. Each tile has a *core*: the tile minus half the overlap on every side it shares with a neighbour
   (the boundary between two neighbours is the middle of their overlap). Cores partition the image.
2. A tile keeps a detection only if the centre of its box lies in the tile's core. A nucleus smaller
   than the overlap lies wholly inside the tile whose core holds its centre, so it is kept once and
   whole; the partial views that neighbouring tiles have of it are dropped because their centres
   lie outside those tiles' cores.
3. A kept detection whose box touches a tile edge that is not an image edge is *cut* (only nuclei
   larger than the overlap can be). Cut instances of two tiles that are one nucleus (IoU >= 0.5
   inside the strip where the two tiles overlap) are merged into one instance (union of pixels,
   highest score); a warning says the overlap is too small.
4. Instances of different tiles that still cover the same nucleus (when the two tiles' boxes put
   the centre on either side of a core boundary) are duplicates if they share >= 50% of the
   smaller one's pixels: a whole instance beats a cut one, otherwise the higher score is kept and
   the other erased. Pixels merely contested between different nuclei go to the higher score.
5. Within one tile, instances are painted lowest score first (the highest wins each pixel), exactly
   as ``masks_to_label_image`` does, so one tile covering the image gives the untiled label image.

At the end, instances left with no pixels are dropped and ids are renumbered 1..N by descending
score. Only one label image is held; per-instance masks exist only as small windows of one tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

from ..structures import masks_to_label_image, paint_order

DUPLICATE_FRACTION = 0.5  # of the smaller instance's pixels shared: the same nucleus seen twice
MERGE_IOU = 0.5  # IoU of two cut fragments inside their tiles' shared strip: one nucleus


@dataclass(frozen=True)
class Tile:
    """A crop ``[y0:y1, x0:x1]`` of the image and its core ``[cy0:cy1, cx0:cx1]``."""

    y0: int
    x0: int
    y1: int
    x1: int
    cy0: int
    cx0: int
    cy1: int
    cx1: int
    image_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


@dataclass
class TileInstances:
    """One tile's detections in image coordinates; masks are small windows, not full images.

    ``masks[k]`` covers image rows ``origins[k, 0]:origins[k, 0] + masks.shape[1]`` and the columns
    likewise (parts outside the image are ignored); ``boxes`` are XYXY floats.
    """

    masks: np.ndarray  # (N, h, w) bool
    origins: np.ndarray  # (N, 2) int (y, x)
    scores: np.ndarray  # (N,) float
    boxes: np.ndarray  # (N, 4) float XYXY


@dataclass
class LabelPrediction:
    """Instances as one label image: id k (1..N) has ``scores[k-1]`` and ``boxes[k-1]`` (XYXY)."""

    labels: np.ndarray  # (H, W) int32, 0 = background
    scores: np.ndarray  # (N,) float32, descending
    boxes: np.ndarray  # (N, 4) float32 XYXY in image pixels

    def __len__(self) -> int:
        return len(self.scores)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of length ``tile`` covering ``[0, size)`` with neighbours overlapping
    by at least ``overlap``, spread evenly (so the spare room widens every overlap, not just the last).
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _core_bounds(starts: list[int], tile: int, size: int) -> list[int]:
    """Core boundaries: 0, the middles of consecutive tiles' overlaps, size."""
    middles = [(nxt + prev + tile) // 2 for prev, nxt in zip(starts[:-1], starts[1:])]
    return [0, *middles, size]


def make_tiles(image_shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles covering an image, with cores that partition it (see the module docstring)."""
    height, width = int(image_shape[0]), int(image_shape[1])
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    ycore, xcore = _core_bounds(ys, tile, height), _core_bounds(xs, tile, width)
    return [
        Tile(y, x, min(y + tile, height), min(x + tile, width),
             ycore[i], xcore[j], ycore[i + 1], xcore[j + 1], (height, width))
        for i, y in enumerate(ys) for j, x in enumerate(xs)
    ]


def _in_core(tile: Tile, boxes: np.ndarray) -> np.ndarray:
    """Box centres inside the tile's core; cores include the image's far edges (a centre can sit there)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    height, width = tile.image_shape
    in_x = (cx >= tile.cx0) & ((cx < tile.cx1) | ((tile.cx1 == width) & (cx <= width)))
    in_y = (cy >= tile.cy0) & ((cy < tile.cy1) | ((tile.cy1 == height) & (cy <= height)))
    return in_x & in_y


def _is_cut(tile: Tile, boxes: np.ndarray, margin: float) -> np.ndarray:
    """Boxes touching a tile edge that is not an image edge."""
    height, width = tile.image_shape
    cut = np.zeros(len(boxes), dtype=bool)
    if tile.x0 > 0:
        cut |= boxes[:, 0] <= tile.x0 + margin
    if tile.y0 > 0:
        cut |= boxes[:, 1] <= tile.y0 + margin
    if tile.x1 < width:
        cut |= boxes[:, 2] >= tile.x1 - margin
    if tile.y1 < height:
        cut |= boxes[:, 3] >= tile.y1 - margin
    return cut


def finalize_labels(labels: np.ndarray, scores: np.ndarray, boxes: np.ndarray) -> LabelPrediction:
    """Drop ids with no pixels and renumber 1..N by descending score (ties: lower id first).

    ``scores[k]``/``boxes[k]`` belong to id k+1 of ``labels``. Every path to a label image ends here,
    so tiled and untiled predictions number their instances the same way.
    """
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    count = np.bincount(labels.ravel(), minlength=len(scores) + 1)
    if len(count) > len(scores) + 1:
        raise ValueError(f"label image holds id {len(count) - 1} but only {len(scores)} scores were given")
    alive = np.flatnonzero(count[1:] > 0)
    order = alive[np.argsort(-scores[alive], kind="stable")]
    lut = np.zeros(len(scores) + 1, dtype=np.int32)
    lut[order + 1] = np.arange(1, len(order) + 1, dtype=np.int32)
    return LabelPrediction(lut[labels], scores[order], boxes[order])


def without_edge_nuclei(pred: LabelPrediction) -> LabelPrediction:
    """``pred`` without the nuclei that touch the image's border, renumbered 1..N in the same order: the border cut
    them, so their areas, shapes and intensities would bias the measurements (Cellpose's ``exclude_on_edges``,
    CellProfiler's "discard objects touching the border")."""
    labels = pred.labels
    if labels.size == 0:
        return pred
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return _without(pred, edge[edge > 0])


def without_small_nuclei(pred: LabelPrediction, min_area: int) -> LabelPrediction:
    """``pred`` without the nuclei of fewer than ``min_area`` pixels (fragments; Cellpose's ``min_size``),
    renumbered 1..N in the same order."""
    if min_area <= 1:
        return pred
    areas = np.bincount(pred.labels.ravel(), minlength=len(pred.scores) + 1)
    small = np.flatnonzero(areas < min_area)
    return _without(pred, small[small > 0])


def _without(pred: LabelPrediction, ids: np.ndarray) -> LabelPrediction:
    if ids.size == 0:
        return pred
    keep = np.arange(len(pred.scores) + 1, dtype=pred.labels.dtype)
    keep[ids] = 0
    return finalize_labels(keep[pred.labels], pred.scores, pred.boxes)


@dataclass(frozen=True)
class NucleusFilter:
    """Which nuclei reach a run's outputs: ``exclude_edges`` leaves out those touching the image's border,
    ``min_area`` those of fewer pixels (applied to the whole image, after stitching)."""

    exclude_edges: bool = False
    min_area: int = 0

    def __call__(self, pred: LabelPrediction) -> LabelPrediction:
        pred = without_small_nuclei(pred, self.min_area)
        return without_edge_nuclei(pred) if self.exclude_edges else pred


EVERY_NUCLEUS = NucleusFilter()


def masks_to_prediction(masks: np.ndarray, scores: np.ndarray, boxes: np.ndarray) -> LabelPrediction:
    """N full-image masks (e.g. ``Instances.pred_masks``) to a label prediction, highest score on top."""
    labels = masks_to_label_image(masks, scores)
    return finalize_labels(labels, scores, boxes)


class Stitcher:
    """Paints tiles' instances into one label image as they arrive (the seam rule is the module's)."""

    def __init__(self, image_shape: tuple[int, int], edge_margin: float = 1.0):
        self.labels = np.zeros(tuple(int(s) for s in image_shape), dtype=np.int32)
        self.edge_margin = edge_margin
        # per id (index 0 = background): score, XYXY box, painted pixel window, tile, cut flag
        self._scores: list[float] = [0.0]
        self._boxes: list[np.ndarray] = [np.zeros(4, np.float32)]
        self._windows: list[list[int]] = [[0, 0, 0, 0]]
        self._tiles: list[Tile | None] = [None]
        self._cut: list[bool] = [False]
        self.num_merged = 0
        self.num_duplicates = 0

    def add(self, tile: Tile, inst: TileInstances) -> None:
        """Keep this tile's share of ``inst`` and paint it (lowest score first)."""
        if len(inst.scores) == 0:
            return
        boxes = np.asarray(inst.boxes, dtype=np.float32)
        keep = _in_core(tile, boxes)
        cut = _is_cut(tile, boxes, self.edge_margin)
        index = np.flatnonzero(keep)
        first_id = len(self._scores)
        for k in index[paint_order(np.asarray(inst.scores)[index], len(index))]:
            self._paint(tile, first_id, inst.masks[k], inst.origins[k], float(inst.scores[k]),
                        boxes[k], bool(cut[k]))

    def _paint(self, tile: Tile, first_id: int, mask: np.ndarray, origin: np.ndarray, score: float,
               box: np.ndarray, cut: bool) -> None:
        height, width = self.labels.shape
        y0, x0 = int(origin[0]), int(origin[1])
        y1, x1 = min(y0 + mask.shape[0], height), min(x0 + mask.shape[1], width)
        mask = mask[max(0, -y0):y1 - y0, max(0, -x0):x1 - x0]
        y0, x0 = max(y0, 0), max(x0, 0)
        if not mask.any():
            return
        region = self.labels[y0:y1, x0:x1]
        if first_id == 1:  # the first tile: every id under it is its own, painted before with a lower score (as below)
            region[mask] = self._record(score, box, [y0, x0, y1, x1], tile, cut)
            return
        under = region[mask]
        others, shared = np.unique(under[under != 0], return_counts=True)
        new_id = None
        beaten: list[int] = []
        area = int(mask.sum())
        for other, count in zip(others.tolist(), shared.tolist()):
            if other >= first_id:  # same tile: painted earlier with a lower score, overwritten below
                continue
            if cut and self._cut[other] and self._fragments_match(tile, mask, y0, x0, other):
                new_id = other  # step 3: fragments of one large nucleus
                continue
            if count < DUPLICATE_FRACTION * min(area, self._area(other)):
                continue  # different nuclei that touch: pixels are contested below
            if (self._cut[other], score) > (cut, self._scores[other]):
                beaten.append(other)
            else:  # step 4: a duplicate of a better instance kept before
                self.num_duplicates += 1
                return
        for other in beaten:
            self._erase(other)
            self.num_duplicates += 1
        region = self.labels[y0:y1, x0:x1]
        under = region[mask]
        lut_scores = np.asarray(self._scores, dtype=np.float64)
        free = (under == 0) | (under >= first_id) | (lut_scores[under] < score)
        if new_id is None:
            new_id = self._record(score, box, [y0, x0, y1, x1], tile, cut)
        else:
            self.num_merged += 1
            self._scores[new_id] = max(self._scores[new_id], score)
            b = self._boxes[new_id]
            self._boxes[new_id] = np.concatenate([np.minimum(b[:2], box[:2]), np.maximum(b[2:], box[2:])])
            w = self._windows[new_id]
            self._windows[new_id] = [min(w[0], y0), min(w[1], x0), max(w[2], y1), max(w[3], x1)]
            free |= under == new_id
        ys, xs = np.nonzero(mask)
        region[ys[free], xs[free]] = new_id

    def _record(self, score: float, box: np.ndarray, window: list[int], tile: Tile, cut: bool) -> int:
        """A new instance's id, its score, box, painted window, tile and cut flag kept."""
        self._scores.append(score)
        self._boxes.append(box.astype(np.float32))
        self._windows.append(window)
        self._tiles.append(tile)
        self._cut.append(cut)
        return len(self._scores) - 1

    def _area(self, label: int) -> int:
        y0, x0, y1, x1 = self._windows[label]
        return int(np.count_nonzero(self.labels[y0:y1, x0:x1] == label))

    def _erase(self, label: int) -> None:
        y0, x0, y1, x1 = self._windows[label]
        region = self.labels[y0:y1, x0:x1]
        region[region == label] = 0

    def _fragments_match(self, tile: Tile, mask: np.ndarray, y0: int, x0: int, other: int) -> bool:
        """IoU of a new cut fragment and an earlier one inside the strip their two tiles share."""
        prev = self._tiles[other]
        sy0, sx0 = max(tile.y0, prev.y0), max(tile.x0, prev.x0)
        sy1, sx1 = min(tile.y1, prev.y1), min(tile.x1, prev.x1)
        if sy1 <= sy0 or sx1 <= sx0:
            return False
        new = np.zeros((sy1 - sy0, sx1 - sx0), dtype=bool)
        my0, mx0 = max(y0, sy0), max(x0, sx0)
        my1, mx1 = min(y0 + mask.shape[0], sy1), min(x0 + mask.shape[1], sx1)
        if my1 > my0 and mx1 > mx0:
            new[my0 - sy0:my1 - sy0, mx0 - sx0:mx1 - sx0] = mask[my0 - y0:my1 - y0, mx0 - x0:mx1 - x0]
        old = self.labels[sy0:sy1, sx0:sx1] == other
        union = np.count_nonzero(new | old)
        return union > 0 and np.count_nonzero(new & old) >= MERGE_IOU * union

    @property
    def num_cut(self) -> int:
        """Kept instances that touch a seam: nuclei larger than the overlap (raise it)."""
        return sum(self._cut)

    def finish(self) -> LabelPrediction:
        """The stitched label image, empty instances dropped, ids 1..N by descending score."""
        boxes = np.stack(self._boxes[1:]) if len(self._boxes) > 1 else np.zeros((0, 4), np.float32)
        return finalize_labels(self.labels, np.asarray(self._scores[1:], dtype=np.float32), boxes)


def seam_warning(num_cut: int, overlap: int, name: str = "") -> str:
    """What to tell the user when nuclei larger than the tile overlap were cut at seams."""
    where = f"{name}: " if name else ""
    return (f"{where}{num_cut} nuclei touched tile seams (larger than the {overlap} px overlap): their pieces were "
            "merged where they matched; a larger overlap gives cleaner results")


@dataclass
class TiledDetections:
    """One image's tile detections on the host, not yet stitched: small and picklable, so the stitching can
    run in a writer process while the model predicts the next tiles. ``overlap`` (model px) is for the
    seam warning."""

    image_shape: tuple[int, int]
    tiles: list[Tile]
    instances: list[TileInstances]
    edge_margin: float
    overlap: int

    def stitch(self) -> tuple[LabelPrediction, int]:
        """The label prediction, and how many kept instances were cut at a seam (see :func:`seam_warning`)."""
        stitcher = Stitcher(self.image_shape, edge_margin=self.edge_margin)
        for tile, inst in zip(self.tiles, self.instances):
            stitcher.add(tile, inst)
        return stitcher.finish(), stitcher.num_cut


def label_prediction_to_instances(pred: LabelPrediction, device: torch.device | str = "cpu") -> Instances:
    """detectron2 ``Instances`` (full-image masks, boxes, scores, class 0) of a label prediction."""
    height, width = pred.labels.shape
    inst = Instances((height, width))
    labels = torch.from_numpy(pred.labels).to(device)
    ids = torch.arange(1, len(pred) + 1, device=labels.device, dtype=labels.dtype)
    inst.pred_masks = labels[None] == ids[:, None, None]
    inst.pred_boxes = Boxes(torch.as_tensor(pred.boxes, dtype=torch.float32, device=labels.device))
    inst.scores = torch.as_tensor(pred.scores, dtype=torch.float32, device=labels.device)
    inst.pred_classes = torch.zeros(len(pred), dtype=torch.int64, device=labels.device)
    return inst
