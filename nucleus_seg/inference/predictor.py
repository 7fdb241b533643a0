"""NucleusPredictor: detectron2's DefaultPredictor for microscopy, batched, tiled and size-aware.

Images of any bit depth and channel count are normalised exactly as in training
(``normalize_from_cfg``), optionally rescaled so nuclei have the diameter the model was trained on
(:mod:`.scale`), run through the model in batches (fp16 autocast on CUDA, bf16 on CPUs with
AMX/AVX512-BF16) and brought back to full resolution (:mod:`.masks`).

Speed on GPU comes from: one backbone pass per batch of same-size images; detectron2's per-image
NMS loops replaced, on this model only, by one exact batched NMS
(:func:`~nucleus_seg.modeling.fast_inference.speed_up_inference`); GroupNorm kept in half precision under
autocast; masks pasted only inside a small window around each box and kept on the device; and the next
batch normalised on a CPU thread while the GPU runs this one.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from tqdm import tqdm

from ..config import check_predict_settings, predict_batch_size, predict_streams
from ..data.io import check_image_shape, normalize_from_cfg
from ..modeling.compile import compile_backbone
from ..modeling.cuda_graphs import graph_backbone_at_inference
from ..modeling.fast_inference import speed_up_inference
from ..modeling.precision import inference_amp_dtype
from ..utils.env import usable_device
from .masks import Detections, detections_from_outputs, keep_scores, windows_to_label, windows_to_masks
from .model_settings import apply_settings, read_settings, scaled_cap, wanted_settings
from .postprocess import finish_detections, finish_labels, needs_image
from .scale import Diameter, ScaleChoice, choose_scale, diameter_to_scale, image_diameter, parse_diameter
from .significance import significant_detections
from .tiling import (
    LabelPrediction,
    Stitcher,
    Tile,
    TiledDetections,
    TileInstances,
    finalize_labels,
    label_prediction_to_instances,
    make_tiles,
    seam_warning,
)
from .tta import forward_flips

__all__ = ["CheckpointMismatch", "NucleusPredictor", "TileBatcher", "checkpoint_mismatch_message"]


class CheckpointMismatch(ValueError):
    """MODEL.WEIGHTS holds another model than the config builds (a partial load predicts garbage)."""


class _RecordingCheckpointer(DetectionCheckpointer):
    """Keeps what did not fit instead of only logging it (a partial load is an error for inference)."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible) -> None:
        self.incompatible = incompatible

    def _torch_load(self, f):
        """Memory-mapped: only the model's tensors are read (a trainer's checkpoint also holds the optimizer's
        state), without a copy of each (torch.load's unpickling took ~1 s of nucleus-predict's start on an
        H200 host); a file in the legacy format is loaded as before."""
        try:
            return torch.load(f, map_location=torch.device("cpu"), mmap=True)
        except RuntimeError:  # not a zip-format file: mmap needs one
            return super()._torch_load(f)


@contextmanager
def _skipped_weight_init() -> Iterator[None]:
    """``torch.nn.init``'s fills as no-ops while a model is built whose every parameter a checkpoint then
    replaces (a partial load is refused): R101-FPN's random init took 0.8 s of nucleus-predict's start, on the
    CPU, before any GPU work. Process-wide while it lasts (a model built on another thread meanwhile would
    keep uninitialised weights), so only around ``build_model``."""
    names = [name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, _leave_as_is)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _leave_as_is(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def checkpoint_mismatch_message(weights: str, incompatible) -> str:
    """One paragraph: what does not fit, and the config to use instead (the config.yaml saved beside it)."""
    parts = []
    for what, keys in (("parameters of this config's model are not in it", incompatible.missing_keys),
                       ("of its parameters are unknown to this config's model", incompatible.unexpected_keys),
                       ("parameters differ in shape", [k for k, *_ in incompatible.incorrect_shapes])):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {', '.join(sorted(keys)[:2])})")
    beside = Path(weights).parent / "config.yaml"
    use = f"--config-file {beside}" if "://" not in weights and beside.is_file() else "the config it was trained with"
    return f"MODEL.WEIGHTS {weights} does not fit this config: {'; '.join(parts)}. Use {use}."

logger = logging.getLogger(__name__)

ONE_PASS_TILES = 2  # an image up to this many tiles on a side goes through the model whole


def fits_one_pass(shape: Sequence[int], scale: float, tile: int) -> bool:
    """Whether an image of ``shape`` (original px) at model scale ``scale`` goes through the model whole: up to
    ``ONE_PASS_TILES`` tiles of ``tile`` model px on a side (larger: tile by tile). The one rule for the
    predictor, its tile batcher, ``nucleus-predict`` and the napari widget."""
    return max(shape[:2]) * scale <= ONE_PASS_TILES * tile


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with detectron2's own transform (what DefaultPredictor resizes with)."""
    height, width = image.shape[:2]
    if (height, width) == tuple(size):
        return image
    return T.ResizeTransform(height, width, size[0], size[1]).apply_image(image)


def _chunks(items: Sequence[Any], size: int, first: int | None = None) -> list[Sequence[Any]]:
    """``items`` in runs of ``size``, the first of ``first`` (when given and smaller)."""
    if not items:
        return []
    head = min(size, first or size)
    return [items[:head]] + [items[i:i + size] for i in range(head, len(items), size)]


# devices where predict_batch's first forward takes a quarter of a batch: the GPU starts on it while the threads
# prepare the next, full one (a first batch of 64 images held the GPU idle for its preparation and page-locked
# copy, 36% of the idle time of Cascade R-CNN's profile on an H200, session 29); on a CPU nothing overlaps
SMALL_FIRST_BATCH_DEVICES = ("cuda",)


# threads that prepare (normalise, resize) the next batch's images while the model runs this one; the first
# batch waits for all of its images (on an H200 at batch 32 one thread left the GPU idle ~45 ms per run for it)
PREPARE_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


def _prefetched(chunks: Sequence[Sequence[Any]], prepare: Callable[[Any], Any],
                pack: Callable[[list[Any]], Any] | None = None) -> Iterator[tuple[list[Any], Any]]:
    """Yield each chunk prepared, and ``pack`` of it (None without one), preparing and packing the next chunk on
    threads while the caller uses this one."""
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=PREPARE_THREADS) as pool:

        def submit(chunk: Sequence[Any]) -> tuple[list[Future], Future | None]:
            jobs = [pool.submit(prepare, x) for x in chunk]
            # queued after its chunk's jobs, so its waits never hold back a job it waits for
            packing = None if pack is None else pool.submit(lambda: pack([job.result() for job in jobs]))
            return jobs, packing

        jobs, packing = submit(chunks[0])
        for k in range(len(chunks)):
            ready = [job.result() for job in jobs]
            packed = None if packing is None else packing.result()
            if k + 1 < len(chunks):
                jobs, packing = submit(chunks[k + 1])
            yield ready, packed


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor sharing its memory (copied only if not contiguous). A read-only array (a memory
    map, a cached dataset image) is fine: the tensor is only read, so torch's warning that it could be written
    would only alarm the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def pinned_batch(arrays: Sequence[np.ndarray]) -> torch.Tensor | None:
    """Same-shape uint8 images stacked in page-locked host memory, for an asynchronous copy to the GPU; None when
    they differ. Made on a prefetch thread: a copy from pageable memory holds the host until it is done, and with it
    the GPU (~56 ms per 64 images of 512 px on an H200, in Cascade R-CNN's profile, session 25)."""
    if not arrays or len({(a.shape, a.dtype) for a in arrays}) != 1 or arrays[0].dtype != np.uint8:
        return None
    batch = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=True)
    np.stack(arrays, out=batch.numpy())
    return batch


def _scaled_tiles(shape: tuple[int, int], tile: int, overlap: int, scale: float) -> list[Tile]:
    """Tiles of an image of ``shape`` (original px) for model-input ``tile``/``overlap`` at ``scale``: cut from
    the original image, so their size there is the model tile / scale."""
    return make_tiles(shape, max(1, round(tile / scale)), max(0, round(overlap / scale)))


def _tile_crop(norm: np.ndarray, t: Tile, scale: float) -> np.ndarray:
    """Tile ``t`` of a normalised image, resized to the model input at ``scale``."""
    crop = norm[t.y0:t.y1, t.x0:t.x1]
    return _resize(crop, (max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))))


def _model_pixels(t: Tile, scale: float) -> int:
    """Model-input pixels of tile ``t`` at ``scale`` (as ``_tile_crop`` sizes it)."""
    return max(1, round((t.y1 - t.y0) * scale)) * max(1, round((t.x1 - t.x0) * scale))


def _edge_margin(scale: float) -> float:
    """How close to a tile edge (original px) a box counts as cut: one model pixel, at least one pixel."""
    return max(1.0, 1.0 / scale)


def _host_instances(dets: Sequence[Detections]) -> list[TileInstances]:
    """Tiles' detections on the host, as the stitcher takes them: each field of all of them in one copy, and one
    wait for the copies (a ``.cpu()`` per field and tile was four host syncs per image in ``nucleus-predict``)."""
    if not dets:
        return []
    if len({d.windows.shape[1:] for d in dets}) > 1:  # windows of several sizes: a batch per size
        return [_host_instances([d])[0] for d in dets]
    fields = (torch.cat([d.windows for d in dets]), torch.stack([torch.cat([d.oy for d in dets]),
                                                                 torch.cat([d.ox for d in dets])], dim=1),
              torch.cat([d.scores for d in dets]), torch.cat([d.boxes for d in dets]))
    # to page-locked memory without waiting, then one wait for the stream (on the CPU these are plain copies)
    host = [f.to("cpu", non_blocking=True) for f in fields]
    if dets[0].scores.is_cuda:
        torch.cuda.current_stream(dets[0].scores.device).synchronize()
    cuts = np.cumsum([len(d.scores) for d in dets])[:-1]
    return [TileInstances(*parts) for parts in zip(*(np.split(f.numpy(), cuts) for f in host))]


def _with_progress(steps: Iterator[tuple[int, int, LabelPrediction | None]], progress: bool) -> LabelPrediction:
    """The result of ``predict_large_steps``-style steps, with a tile progress bar when asked."""
    bar = tqdm(desc="tiles", unit="tile", disable=not progress, leave=False)
    for done, total, last in steps:
        bar.total = total
        bar.update(done - bar.n)
        result = last
    bar.close()
    return result


def use_channels_last(asked: bool | None, device: torch.device, amp: bool, built_here: bool) -> bool:
    """Whether the predictor lays its model out channels-last: only on a GPU; as asked, or by default (None) for a
    model it built that runs in half precision, where ``nhwc_group_norm`` and ``nhwc_roi_align`` take the layout
    without conversions. A model passed in keeps its trainer's layout; float32 keeps PyTorch's NCHW kernels."""
    if device.type != "cuda":
        return False
    return built_here and amp if asked is None else asked


class NucleusPredictor:
    """Drop-in for detectron2's ``DefaultPredictor`` that takes microscopy images as they are stored.

    ``predictor(image)`` returns ``{"instances": Instances}`` at the image's resolution, with
    ``pred_boxes``, ``scores``, ``pred_classes`` and ``pred_masks`` (NxHxW bool) on the model's
    device, as DefaultPredictor does. ``image`` is HxW or HxWxC (C 1-4, RGB(A) order as
    ``read_image`` returns it), 8/16-bit or float; as in training (the dataset mapper) it is
    normalised with ``normalize_from_cfg`` and put in ``INPUT.FORMAT`` channel order. With
    ``INPUT.NORMALIZE`` METHOD "none", GRAY False and INVERT "never", a uint8 RGB image reaches the
    model exactly as its BGR version reaches DefaultPredictor, so outputs match on the same weights
    (gray images, the default, need no flip). ``fast=False`` keeps detectron2's own per-image NMS
    and fp32 GroupNorm (``speed_up_inference`` gives the same detections, batched).
    """

    def __init__(self, cfg, *, model: torch.nn.Module | None = None, channels_last: bool | None = None,
                 fast: bool = True):
        """``model``: one already built and trained (training-time evaluation scores the model being trained
        exactly as ``nucleus-eval`` scores a checkpoint); by default it is built from ``cfg`` and
        ``MODEL.WEIGHTS`` is loaded. ``channels_last`` lays the model out channels-last on a GPU (the same
        detections, faster: GroupNorm through ``nhwc_group_norm``, convolutions without layout conversions); by
        default (None) a model built here runs so on a GPU under ``NUCLEUS.PREDICT.AMP``; one passed in, or one run
        in float32, keeps its layout."""
        self.cfg = cfg.clone()  # the model may modify it, as DefaultPredictor notes
        self.cfg.defrost()
        self.cfg.MODEL.DEVICE = usable_device(self.cfg.MODEL.DEVICE) if model is None else self.cfg.MODEL.DEVICE
        check_predict_settings(self.cfg)
        if len(self.cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(self.cfg.DATASETS.TEST[0])
        if model is not None:
            self.model = model
            self.device = next(model.parameters()).device
        else:
            with _skipped_weight_init() if self.cfg.MODEL.WEIGHTS else nullcontext():
                self.model = build_model(self.cfg)
            self.model.eval()
            self.device = torch.device(self.cfg.MODEL.DEVICE)
            self._load_weights(self.cfg.MODEL.WEIGHTS)
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT must be BGR or RGB, got {self.input_format!r}")
        if fast:  # same outputs, batched NMS and half-precision GroupNorm (see speed_up_inference)
            # a model being trained keeps the GroupNorm precision it trains with
            speed_up_inference(self.model, half_group_norm=model is None or self.cfg.NUCLEUS.TRAIN.HALF_GROUP_NORM)
        pred = self.cfg.NUCLEUS.PREDICT
        self.batch_size = predict_batch_size(self.cfg, self.device.type)
        self._batch_lock = threading.Lock()  # batch_size shrinks after running out of GPU memory
        self.amp_dtype = inference_amp_dtype(self.device) if pred.AMP else None
        self.amp = self.amp_dtype is not None
        self.score_thresh = float(pred.SCORE_THRESH)
        self.min_significance = float(pred.MIN_SIGNIFICANCE)
        self.boundary_level = float(pred.BOUNDARY_LEVEL)
        self.min_edge_significance = float(pred.MIN_EDGE_SIGNIFICANCE)
        self.diameter_score_thresh = float(pred.DIAMETER_SCORE_THRESH)
        self.train_diameter = float(pred.TRAIN_DIAMETER)
        self.tta = bool(pred.TTA)
        self.streams = predict_streams(self.cfg, self.device.type)
        self.tile_side = int(pred.TILE_SIZE)
        self.tile_area = self.tile_side ** 2  # the area the config's proposal and detection caps are for
        self.detections_per_image = int(self.cfg.TEST.DETECTIONS_PER_IMAGE)
        self._settings_free = threading.Condition()
        self._settings_users, self._settings_base, self._settings_held = 0, {}, {}
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.cfg.CUDNN_BENCHMARK)
        if use_channels_last(channels_last, self.device, self.amp, built_here=model is None):
            self.model.to(memory_format=torch.channels_last)
        if pred.COMPILE and model is None:  # a model passed in keeps what its trainer chose
            compile_backbone(self.model)
        elif pred.CUDA_GRAPHS and model is None and self.device.type == "cuda":
            graph_backbone_at_inference(self.model)
        if self.cfg.INPUT.MIN_SIZE_TEST:
            self.aug = T.ResizeShortestEdge(
                [self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MIN_SIZE_TEST], self.cfg.INPUT.MAX_SIZE_TEST
            )
        else:
            self.aug = None

    # ---- public API -------------------------------------------------------------------------------

    def __call__(self, original_image: np.ndarray, diameter: Diameter = None) -> dict[str, Instances]:
        """Predict one image: ``{"instances": Instances}`` at its original resolution."""
        return self.predict_batch([original_image], diameter=diameter)[0]

    def predict_batch(self, images: Sequence[np.ndarray], diameter: Diameter = None,
                      names: Sequence[str] | None = None) -> list[dict]:
        """``predictor(image)`` for many images, ``NUCLEUS.PREDICT.BATCH_SIZE`` per forward pass. ``names``
        (e.g. file names) are what warnings about an image call it."""
        out = []
        for found in self._detect(images, diameter, names=names):
            if isinstance(found, LabelPrediction):  # "auto" scaled it past one pass: predicted tile by tile
                out.append({"instances": label_prediction_to_instances(found, self.device)})
                continue
            inst = Instances(found.image_shape)
            inst.pred_boxes = Boxes(found.boxes)
            inst.scores = found.scores
            inst.pred_classes = found.classes
            inst.pred_masks = windows_to_masks(found.windows, found.oy, found.ox, found.image_shape)
            out.append({"instances": inst})
        return out

    def predict_labels(self, images: Sequence[np.ndarray], diameter: Diameter = None,
                       score_thresh: float | None = None, names: Sequence[str] | None = None,
                       ) -> list[LabelPrediction]:
        """One label image per input (instances scoring >= ``score_thresh``, highest score on top).

        Cheaper than ``predict_batch`` for label output: full-image masks are never made, the label
        image is painted on the device and only it comes back to the host.
        """
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        out = []
        for found in self._detect(images, diameter, score_thresh=thresh, names=names):
            if isinstance(found, LabelPrediction):
                out.append(found)
                continue
            labels = windows_to_label(found.windows, found.oy, found.ox, found.scores, found.image_shape)
            out.append(finalize_labels(labels.cpu().numpy(), found.scores.cpu().numpy(),
                                       found.boxes.cpu().numpy()))
        return out

    def estimate_diameter(self, image: np.ndarray, name: str = "image") -> ScaleChoice:
        """What ``diameter="auto"`` decides for ``image``: the model-input scale, the nucleus diameter (input
        px), the image-only estimate and whether the passes agreed (``sure``)."""
        norm = self.normalize(image)
        floor = self.diameter_score_thresh
        run_pass = self._auto_pass(norm, floor)
        return choose_scale(run_pass, run_pass(1.0), floor, self.train_diameter, image_diameter(norm), name,
                            self._noise_share(norm))[0]

    def predict_large(self, image: np.ndarray, tile: int | None = None, overlap: int | None = None,
                      diameter: Diameter = None, score_thresh: float | None = None,
                      progress: bool = False, name: str = "image") -> LabelPrediction:
        """Label image of an image of any size, predicted tile by tile and stitched on the fly.

        ``tile`` and ``overlap`` are in model pixels (after the diameter rescale); the overlap should
        exceed the largest nucleus. Memory: the image, its normalised copy and one label image, plus
        one batch of tiles; no per-instance full-image masks. The seam rule is in ``tiling``.
        """
        return _with_progress(self.predict_large_steps(image, tile, overlap, diameter, score_thresh, name), progress)

    def predict_normalized_large(self, norm: np.ndarray, scale: float, progress: bool = False) -> LabelPrediction:
        """``predict_large`` of an image already ``normalize``-d, at a known model-input ``scale`` (the
        config's tile, overlap and threshold)."""
        pred = self.cfg.NUCLEUS.PREDICT
        steps = self._stitched(norm, scale, int(pred.TILE_SIZE), int(pred.TILE_OVERLAP), self.score_thresh)
        return _with_progress(steps, progress)

    def predict_large_steps(self, image: np.ndarray, tile: int | None = None, overlap: int | None = None,
                            diameter: Diameter = None, score_thresh: float | None = None, name: str = "image",
                            ) -> Iterator[tuple[int, int, LabelPrediction | None]]:
        """``predict_large`` one batch of tiles at a time, for callers that show progress or may stop
        early (the napari widget): yields ``(tiles done, tiles in all, None)`` after each batch, and
        ``(total, total, result)`` last. Closing the generator stops the work between batches."""
        pred = self.cfg.NUCLEUS.PREDICT
        tile = int(pred.TILE_SIZE if tile is None else tile)
        overlap = int(pred.TILE_OVERLAP if overlap is None else overlap)
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        norm = self.normalize(image)
        scale = self.input_scale(diameter)
        self.last_scales = [None]
        if scale is None:
            choice = self.large_image_scale(norm, thresh, tile, overlap, name)
            self.last_scales, scale = [choice], choice.scale
        yield from self._stitched(norm, scale, tile, overlap, thresh)

    def large_image_scale(self, norm: np.ndarray, score_thresh: float | None = None, tile: int | None = None,
                          overlap: int | None = None, name: str = "image") -> ScaleChoice:
        """What "auto" decides for a large image (already ``normalize``-d): passes over up to four tiles."""
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        run_pass = self._auto_pass(norm, min(thresh, self.diameter_score_thresh), tile, overlap)
        return choose_scale(run_pass, run_pass(1.0), self.diameter_score_thresh, self.train_diameter,
                            image_diameter(norm), name, self._noise_share(norm))[0]

    def tile_batcher(self, tile: int | None = None, overlap: int | None = None,
                     score_thresh: float | None = None, one_pass: bool = False) -> TileBatcher:
        """A :class:`TileBatcher` over this model (tile, overlap and threshold default to the config's);
        ``one_pass``: images up to ``ONE_PASS_TILES`` tiles on a side go whole."""
        pred = self.cfg.NUCLEUS.PREDICT
        return TileBatcher(self, int(pred.TILE_SIZE if tile is None else tile),
                           int(pred.TILE_OVERLAP if overlap is None else overlap),
                           self.score_thresh if score_thresh is None else float(score_thresh), self.streams,
                           one_pass)

    def _noise_share(self, norm: np.ndarray) -> Callable[[list[Detections]], float] | None:
        """For "auto": the share of a pass's confident instances (``DIAMETER_SCORE_THRESH``) that
        ``MIN_SIGNIFICANCE`` would drop in ``norm``; None when the rule is off."""
        if self.min_significance <= 0:
            return None
        thresh = self.diameter_score_thresh

        def share(dets: list[Detections]) -> float:
            shown = sum(int((d.scores >= thresh).sum()) for d in dets)
            kept = sum(int((significant_detections(d, norm, self.min_significance, thresh).scores >= thresh).sum())
                       for d in dets)
            return 1 - kept / shown if shown else 0.0

        return share

    # ---- internals --------------------------------------------------------------------------------

    def _stitched(self, norm: np.ndarray, scale: float, tile: int, overlap: int, thresh: float,
                  ) -> Iterator[tuple[int, int, LabelPrediction | None]]:
        """The tiles of ``norm`` at ``scale``, predicted and stitched; progress as ``predict_large_steps``."""
        tiles = _scaled_tiles(norm.shape[:2], tile, overlap, scale)
        stitcher = Stitcher(norm.shape[:2], edge_margin=_edge_margin(scale))
        done = 0
        for dets, chunk in self._detect_tiles(norm, tiles, scale, thresh):
            for found, t in zip(_host_instances(dets), chunk):
                stitcher.add(t, found)
            done += len(chunk)
            if done < len(tiles):
                yield done, len(tiles), None
        if stitcher.num_cut:
            logger.warning("%s", seam_warning(stitcher.num_cut, overlap))
        yield len(tiles), len(tiles), finish_labels(stitcher.finish(), norm, self.min_significance,
                                                    self.boundary_level, self.min_edge_significance)

    def _fits_one_pass(self, shape: tuple[int, int], scale: float) -> bool:
        """Whether the image at ``scale`` goes through the model whole (else tile by tile: an image that
        "auto" upscales 5x must not be sent whole)."""
        return fits_one_pass(shape, scale, self.tile_side)

    def _auto_pass(self, norm: np.ndarray, floor: float, tile: int | None = None, overlap: int | None = None,
                   ) -> Callable[[float], list[Detections]]:
        """``run_pass(scale)`` for the diameter estimate: the whole image, or up to four tiles spread over it
        when the image at that scale is larger than one pass."""
        pred = self.cfg.NUCLEUS.PREDICT
        tile = int(pred.TILE_SIZE if tile is None else tile)
        overlap = int(pred.TILE_OVERLAP if overlap is None else overlap)
        shape = norm.shape[:2]

        def run_pass(scale: float) -> list[Detections]:
            if self._fits_one_pass(shape, scale):
                arrays = [_resize(norm, self._model_size(*shape, scale))]
                return detections_from_outputs(self._forward(arrays, floor), shape, floor)
            tiles = _scaled_tiles(shape, tile, overlap, scale)
            picks = [tiles[i] for i in np.unique(np.linspace(0, len(tiles) - 1, min(4, len(tiles))).round()
                                                 .astype(int))]
            return [d for ds, _ in self._detect_tiles(norm, picks, scale, floor) for d in ds]

        return run_pass

    # ---- internals --------------------------------------------------------------------------------

    def _load_weights(self, weights: str) -> None:
        if not weights:
            warnings.warn(
                "MODEL.WEIGHTS is empty: the model has random weights and its output is meaningless "
                "(set MODEL.WEIGHTS to a trained checkpoint)", UserWarning, stacklevel=3,
            )
            return
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"MODEL.WEIGHTS {weights}: no such checkpoint file")
        checkpointer = _RecordingCheckpointer(self.model)
        checkpointer.load(weights)
        found = checkpointer.incompatible
        if found is not None and (found.missing_keys or found.unexpected_keys or found.incorrect_shapes):
            raise CheckpointMismatch(checkpoint_mismatch_message(weights, found))

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 in the model's channel order, exactly as the training mapper makes it."""
        norm = normalize_from_cfg(check_image_shape(np.asarray(image)), self.cfg)
        if self.input_format == "RGB" or self.cfg.INPUT.NORMALIZE.GRAY:  # gray: all channels equal
            return norm
        return np.ascontiguousarray(norm[..., ::-1])

    def input_scale(self, diameter: Diameter = None) -> float | None:
        """Model-input scale for ``diameter`` (None: the config's); None means "auto" (estimate it)."""
        value = parse_diameter(self.cfg.NUCLEUS.PREDICT.DIAMETER if diameter is None else diameter)
        return None if value is None else diameter_to_scale(value, self.train_diameter)

    def images_per_forward(self, size: tuple[int, int]) -> int:
        """How many model inputs of ``size`` go through one forward: ``BATCH_SIZE`` tiles' worth of pixels, at
        most ``BATCH_SIZE`` images (a batch of 16 images of 1024 px would hold the activations of 64 tiles)."""
        return max(1, min(self.batch_size, self.pixels_per_forward // max(1, size[0] * size[1])))

    @property
    def pixels_per_forward(self) -> int:
        """Model pixels one forward holds: ``BATCH_SIZE`` tiles' worth."""
        return self.batch_size * self.tile_area

    def _model_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        if scale == 1.0 and self.aug is not None:  # DefaultPredictor's test-time resize
            return T.ResizeShortestEdge.get_output_shape(
                height, width, self.aug.short_edge_length[0], self.aug.max_size)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _detect(self, images: Sequence[np.ndarray], diameter: Diameter, score_thresh: float | None = None,
                names: Sequence[str] | None = None) -> list[Detections | LabelPrediction]:
        """Each image's detections; with "auto", an image the estimate scales past one pass comes back as a
        stitched ``LabelPrediction`` (``self.last_scales`` keeps each image's :class:`ScaleChoice`)."""
        scale = self.input_scale(diameter)
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]

        def prepare(image: np.ndarray, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
            norm = self.normalize(image)
            size = self._model_size(*norm.shape[:2], 1.0 if scale is None else scale)
            return norm, _resize(norm, size)

        # Images of one size go through together: padding a smaller image up to a larger one changes
        # GroupNorm's statistics, so mixed batches would depend on their company.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(np.shape(image)[:2]), []).append(i)
        at = 1.0 if scale is None else scale  # "auto" runs its first pass at scale 1
        chunks = []
        for shape, group in by_shape.items():
            size = self.images_per_forward(self._model_size(*shape, at))
            small_first = not chunks and self.device.type in SMALL_FIRST_BATCH_DEVICES
            chunks += _chunks(group, size, max(1, size // 4) if small_first else None)
        results: list[Detections | LabelPrediction | None] = [None] * len(images)
        self.last_scales: list[ScaleChoice | None] = [None] * len(images)
        norms: dict[int, np.ndarray] = {}
        # 'auto' passes keep what the diameter estimate needs as well as what the output keeps
        floor = score_thresh if scale is not None or score_thresh is None else min(
            score_thresh, self.diameter_score_thresh)
        pack = (lambda prepared: pinned_batch([p[1] for p in prepared])) if self.device.type == "cuda" else None
        for chunk, (prepared, packed) in zip(chunks, _prefetched(chunks, lambda i: prepare(images[i], scale), pack)):
            raws = self._forward([p[1] for p in prepared], floor, packed, [names[i] for i in chunk])
            dets = detections_from_outputs(raws, prepared[0][0].shape[:2], floor)
            for i, (norm, _), det in zip(chunk, prepared, dets):
                results[i] = det
                if scale is None or needs_image(self.min_significance, self.boundary_level, self.min_edge_significance):
                    norms[i] = norm
        for i, norm in (norms.items() if scale is None else ()):
            choice, passes = choose_scale(self._auto_pass(norm, floor), [results[i]], self.diameter_score_thresh,
                                          self.train_diameter, image_diameter(norm), names[i], self._noise_share(norm))
            self.last_scales[i] = choice
            if self._fits_one_pass(norm.shape[:2], choice.scale):
                det = passes[choice.scale][0]
                results[i] = det if floor == score_thresh else keep_scores(det, score_thresh)
            else:
                pred = self.cfg.NUCLEUS.PREDICT
                steps = self._stitched(norm, choice.scale, int(pred.TILE_SIZE), int(pred.TILE_OVERLAP),
                                       self.score_thresh if score_thresh is None else score_thresh)
                results[i] = [last for *_, last in steps][-1]  # post-processed as it was stitched
        if needs_image(self.min_significance, self.boundary_level, self.min_edge_significance):
            shown = self.score_thresh if score_thresh is None else score_thresh
            results = [finish_detections(r, norms[i], self.min_significance, self.boundary_level, shown,
                                         self.min_edge_significance)
                       if isinstance(r, Detections) else r for i, r in enumerate(results)]
        return results

    def _detect_tiles(self, norm: np.ndarray, tiles: Sequence[Tile], scale: float,
                      score_thresh: float | None) -> Iterator[tuple[list[Detections], Sequence[Tile]]]:
        """Detections of each tile, in full-image coordinates, one batch of tiles at a time."""
        chunks = _chunks(tiles, self.batch_size)
        pack = pinned_batch if self.device.type == "cuda" else None
        for chunk, (crops, packed) in zip(chunks, _prefetched(chunks, lambda t: _tile_crop(norm, t, scale), pack)):
            raws = self._forward(crops, score_thresh, packed)
            yield detections_from_outputs(raws, norm.shape[:2], score_thresh, frames=chunk), chunk

    @contextmanager
    def _model_settings(self, score_thresh: float | None, area: int) -> Iterator[None]:
        """The model's score floor and detection caps for one forward, held while it runs.

        Score floor: detections below ``score_thresh`` dropped before the mask head instead of after it. Label
        outputs keep only scores >= the threshold; greedy NMS never lets a lower-scoring box suppress a higher
        one, so filtering first keeps exactly the same detections above it, and the mask head (the costliest part
        at hundreds of detections) runs on those alone.

        Detection caps (:mod:`.model_settings`): an input of ``area`` model pixels larger than a tile gets the
        config's proposal and detection counts in proportion to its area, as the tiles covering it would.

        Forwards on several threads (TileBatcher streams) share the model: those asking for the same values run
        together; one asking for others waits until the model is free.
        """
        with self._settings_free:
            while True:
                base = self._settings_base if self._settings_users else read_settings(self.model)
                wanted = wanted_settings(self.model, base, score_thresh, area / self.tile_area)
                if not self._settings_users or wanted == self._settings_held:
                    break
                self._settings_free.wait()
            if not self._settings_users:
                self._settings_base, self._settings_held = base, wanted
                apply_settings(wanted)
            self._settings_users += 1
        try:
            yield
        finally:
            with self._settings_free:
                self._settings_users -= 1
                if not self._settings_users:
                    apply_settings(self._settings_base)
                    self._settings_free.notify_all()

    def _device_tensors(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 HxWx3 arrays as float CHW tensors on the model's device."""
        hosts = [host_tensor(a) for a in arrays]
        same_shape = len({h.shape for h in hosts}) == 1
        if same_shape and self.device.type == "cuda":  # each image copied into one device batch
            # pinning and stacking here, on the thread that feeds the GPU, cost ~17 and ~23 ms of its idle time on
            # an H200 host: prediction batches come pinned from the prefetch threads instead (pinned_batch)
            batch = torch.empty((len(hosts), *hosts[0].shape), device=self.device, dtype=hosts[0].dtype)
            for slot, host in zip(batch, hosts):
                slot.copy_(host, non_blocking=True)
            return list(batch.permute(0, 3, 1, 2).float())
        if same_shape:  # one copy for the whole batch
            return list(torch.stack(hosts).to(self.device).permute(0, 3, 1, 2).float())
        return [host.to(self.device).permute(2, 0, 1).float() for host in hosts]

    def _forward(self, arrays: Sequence[np.ndarray], score_thresh: float | None = None,
                 pinned: torch.Tensor | None = None, names: Sequence[str] | None = None) -> list[Instances]:
        """Raw model outputs (model-input frame, soft 28x28 masks) for uint8 HxWx3 arrays; with
        ``score_thresh`` only detections scoring at least that (see ``_model_settings``). ``pinned``: the same
        arrays as one :func:`pinned_batch`, copied to the GPU without holding the host. ``names``: what a warning
        about an input calls it.

        A batch the GPU has no memory for runs again in two halves, and later batches are half as large (a
        warning says so once per halving), as CSBDeep/StarDist add tiles on running out of memory: a batch size
        that fits a large GPU does not end a run on a smaller one. A single input that does not fit still fails."""
        try:
            return self._forward_once(arrays, score_thresh, pinned, names)
        except torch.OutOfMemoryError:
            if len(arrays) < 2:
                raise
        half = len(arrays) // 2
        self._halve_batch(arrays)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed forward's blocks, before the halves allocate theirs
        parts = [slice(0, half), slice(half, None)]
        return [found for part in parts for found in self._forward(
            arrays[part], score_thresh, None if pinned is None else pinned[part],
            None if names is None else names[part])]

    def _halve_batch(self, arrays: Sequence[np.ndarray]) -> None:
        """After a batch of ``arrays`` ran out of memory: half as many such inputs per forward (``BATCH_SIZE`` counts
        inputs smaller than a tile, and tiles' worth of pixels of larger ones)."""
        tiles = sum(a.shape[0] * a.shape[1] for a in arrays) / self.tile_area
        with self._batch_lock:  # two stream threads may run out at once: each halves at most once, never below 1
            smaller = max(1, min(self.batch_size, -(-max(len(arrays), int(tiles)) // 2)))  # half, rounded up
            if smaller >= self.batch_size:
                return
            self.batch_size = smaller
        warnings.warn(f"GPU out of memory with {len(arrays)} inputs of {arrays[0].shape[1]}x{arrays[0].shape[0]} px in "
                      f"one forward: they ran again in halves, and from now on NUCLEUS.PREDICT.BATCH_SIZE {smaller} "
                      "(set it there to start with it)", UserWarning, stacklevel=4)

    def _forward_once(self, arrays: Sequence[np.ndarray], score_thresh: float | None,
                      pinned: torch.Tensor | None, names: Sequence[str] | None) -> list[Instances]:
        """:meth:`_forward` without the retry."""
        if pinned is not None and self.device.type == "cuda":
            tensors = list(pinned.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float())
        else:
            tensors = self._device_tensors(arrays)
        # no weight-cast cache: PyTorch keeps one cache for all threads (it empties it when any thread leaves
        # autocast), so with two tile batches in flight (STREAMS 2, each on its own CUDA stream) one forward could
        # use half-precision weights cast on the other's stream, unsynchronised, or freed and reused meanwhile.
        # Nearly every weight is used once per forward, so the cache saved next to nothing.
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False) if self.amp
                    else nullcontext())
        # detectron2 pads a batch to its largest height and width: that is the area its anchors cover
        area = max(t.shape[1] for t in tensors) * max(t.shape[2] for t in tensors)
        with torch.no_grad(), autocast, self._model_settings(None if self.tta else score_thresh, area):
            if self.tta:
                outputs = forward_flips(self.model, tensors)
            else:
                inputs = [{"image": t, "height": t.shape[1], "width": t.shape[2]} for t in tensors]
                outputs = self.model.inference(inputs, do_postprocess=False)
        self._warn_if_capped(outputs, area, score_thresh, names)
        return outputs

    def _warn_if_capped(self, outputs: list[Instances], area: int, score_thresh: float | None,
                        names: Sequence[str] | None) -> None:
        """A warning naming each input whose detections filled the cap with nuclei the output keeps: more may have
        been cut (the lengths are known on the host; the lowest scores of the inputs at the cap come back in one
        copy, after the forward's work)."""
        cap = scaled_cap(self.detections_per_image, area / self.tile_area)
        full = [k for k, found in enumerate(outputs) if 0 < cap <= len(found)]
        if not full:
            return
        shown = self.score_thresh if score_thresh is None else score_thresh
        lowest = torch.stack([outputs[k].scores.min() for k in full]).tolist()
        for k, low in zip(full, lowest):
            found = outputs[k]
            if low >= shown:
                name = names[k] if names is not None else f"an input of {found.image_size[0]}x{found.image_size[1]} px"
                warnings.warn(
                    f"{name}: {len(found)} nuclei scoring >= {shown:g}, the most one pass keeps (TEST."
                    f"DETECTIONS_PER_IMAGE {self.detections_per_image} per {self.tile_side} px tile, {cap} at this "
                    "size): more may be missing; raise TEST.DETECTIONS_PER_IMAGE and MODEL.RPN.POST_NMS_TOPK_TEST",
                    UserWarning, stacklevel=4)


@dataclass
class _TiledImage:
    norm: np.ndarray
    scale: float
    tiles: list[Tile]
    found: list[TileInstances | None]


class TileBatcher:
    """Tiles of many images through the model in full batches, each image's detections handed back on the
    host, unstitched (:class:`~.tiling.TiledDetections`), as soon as its last tile is done.

    Each forward has a fixed cost on a GPU (host-side launches and syncs: ~50 ms on an H200, more than the
    model's work on 4 tiles), so tiles of consecutive images share batches: a 1024 px image at
    ``TILE_SIZE 576`` is 4 tiles, and at ``BATCH_SIZE 8`` two images go through one forward. Only tiles of one
    model-input shape share a batch (padding changes GroupNorm's statistics), so each tile's detections are
    exactly what ``predict_large`` gets for it. Stitching is left to the caller: ``nucleus-predict`` does it in
    its writer processes, off the process that feeds the GPU.
    """

    def __init__(self, predictor: NucleusPredictor, tile: int, overlap: int, score_thresh: float,
                 streams: int = 1, one_pass: bool = False):
        self.predictor, self.tile, self.overlap, self.score_thresh = predictor, tile, overlap, score_thresh
        # one_pass: an image up to ONE_PASS_TILES tiles on a side is one tile, the whole image, as predict_labels
        # sends it (nucleus-predict: its detections are painted by a writer process, and the next batch runs
        # while this one's are brought to the host)
        self.one_pass = one_pass
        self._images: dict[Any, _TiledImage] = {}
        self._queue: deque[tuple[Any, int]] = deque()  # (image key, tile index), in input order
        self._queued_pixels = 0  # model pixels of the queued tiles: a batch holds BATCH_SIZE tiles' worth
        # streams > 1: that many batches in flight, each forward on its own thread (and CUDA stream), so one
        # batch's host work (detectron2's Python, its syncs) overlaps another's kernels
        self.streams = max(1, int(streams))
        self._pool = ThreadPoolExecutor(self.streams) if self.streams > 1 else None
        self._cuda_streams = ([torch.cuda.Stream(device=predictor.device) for _ in range(self.streams)]
                              if self._pool is not None and predictor.device.type == "cuda" else [None])
        self._in_flight: deque[tuple[list[tuple[Any, int]], Future]] = deque()
        self._launched = 0

    def tiles_for(self, shape: tuple[int, int], scale: float) -> list[Tile]:
        """The tiles an image of ``shape`` (original px) is cut into at model scale ``scale``."""
        if self.one_pass and fits_one_pass(shape, scale, self.tile):
            return make_tiles(shape, max(shape), 0)  # one tile: the whole image
        return _scaled_tiles(shape, self.tile, self.overlap, scale)

    def add(self, key: Any, norm: np.ndarray, scale: float) -> list[tuple[Any, TiledDetections | Exception]]:
        """Queue a ``normalize``-d image (``key`` must be new) and run every full batch; returns the images
        finished by them. A batch that fails fails every image with a tile in it (the exception, as its
        result); the others go on."""
        if key in self._images:
            raise ValueError(f"{key}: already queued")
        tiles = self.tiles_for(norm.shape[:2], scale)
        self._images[key] = _TiledImage(norm, scale, tiles, [None] * len(tiles))
        self._queue.extend((key, i) for i in range(len(tiles)))
        self._queued_pixels += sum(_model_pixels(t, scale) for t in tiles)
        return self._run(lambda: len(self._queue) >= self.predictor.batch_size
                         or self._queued_pixels >= self.predictor.pixels_per_forward)

    def flush(self) -> list[tuple[Any, TiledDetections | Exception]]:
        """Run what is queued; every image added so far is returned by now."""
        return self._run(lambda: bool(self._queue)) + self.drain()

    def drain(self) -> list[tuple[Any, TiledDetections | Exception]]:
        """Wait for the batches in flight; call it before this thread runs the model itself (the score floor
        is the model's, shared by every forward running at the time)."""
        done = []
        while self._in_flight:
            done += self._finish_oldest()
        return done

    def close(self) -> None:
        """Stop the stream threads (after ``flush``; batches still in flight are waited for)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self, more: Callable[[], bool]) -> list[tuple[Any, TiledDetections | Exception]]:
        done = []
        while more():
            items, crops, frames = self._take_batch()
            if self._pool is None:
                try:
                    found = self._predict(items, crops, frames, None)
                except Exception as exc:  # noqa: BLE001 - those images fail, the run goes on
                    found = exc
                done += self._finish(items, found)
                continue
            if len(self._in_flight) >= self.streams:
                done += self._finish_oldest()
            stream = self._cuda_streams[self._launched % len(self._cuda_streams)]
            self._launched += 1
            self._in_flight.append((items, self._pool.submit(self._predict, items, crops, frames, stream)))
        return done

    def _finish_oldest(self) -> list[tuple[Any, TiledDetections | Exception]]:
        items, future = self._in_flight.popleft()
        try:
            found = future.result()
        except Exception as exc:  # noqa: BLE001 - those images fail, the run goes on
            found = exc
        return self._finish(items, found)

    def _take_batch(self) -> tuple[list[tuple[Any, int]], list[np.ndarray], dict[Any, tuple]]:
        """The next batch: up to ``batch_size`` queued tiles of one model-input shape, their crops, and each
        image's (shape, tiles) for the detections (taken here: a stream thread never reads ``_images``)."""
        items, crops = [], []
        while self._queue and (not crops or len(items) < self.predictor.images_per_forward(crops[0].shape[:2])):
            key, index = self._queue[0]
            image = self._images[key]
            crop = _tile_crop(image.norm, image.tiles[index], image.scale)
            if crops and crop.shape != crops[0].shape:
                break  # another model-input shape: next batch
            items.append(self._queue.popleft())
            crops.append(crop)
            self._queued_pixels -= crop.shape[0] * crop.shape[1]
        frames = {key: (self._images[key].norm.shape[:2], self._images[key].tiles) for key, _ in items}
        return items, crops, frames

    def _predict(self, items: list[tuple[Any, int]], crops: list[np.ndarray], frames: dict[Any, tuple],
                 stream) -> dict[tuple[Any, int], TileInstances]:
        """Each tile's detections on the host (runs on a stream thread when ``streams`` > 1)."""
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            raws = self.predictor._forward(crops, self.score_thresh,
                                           names=[f"{key} (tile {index + 1})" for key, index in items])
            # the tiles of images of one size together (whole images of one size: the whole batch): one
            # post-processing and one copy to the host for them, not one per image
            by_shape: dict[tuple[int, int], list[int]] = {}
            for k, (key, _) in enumerate(items):
                by_shape.setdefault(tuple(frames[key][0]), []).append(k)
            found = {}
            for shape, ks in by_shape.items():
                dets = detections_from_outputs([raws[k] for k in ks], shape, self.score_thresh,
                                               frames=[frames[items[k][0]][1][items[k][1]] for k in ks])
                for k, host in zip(ks, _host_instances(dets)):
                    found[items[k]] = host
            return found

    def _finish(self, items: list[tuple[Any, int]], found: dict | Exception,
                ) -> list[tuple[Any, TiledDetections | Exception]]:
        """Record a batch's detections; the images it completed (or failed) come back."""
        keys = [key for key in dict.fromkeys(key for key, _ in items) if key in self._images]  # not failed yet
        if isinstance(found, Exception):
            dropped = [(key, index) for key, index in self._queue if key in keys]
            self._queued_pixels -= sum(_model_pixels(self._images[key].tiles[index], self._images[key].scale)
                                       for key, index in dropped)
            for key in keys:
                del self._images[key]
            self._queue = deque(item for item in self._queue if item[0] not in keys)
            return [(key, found) for key in keys]
        done = []
        for key, index in items:
            if key in self._images:
                self._images[key].found[index] = found[key, index]
        for key in keys:
            image = self._images[key]
            if all(f is not None for f in image.found):
                del self._images[key]
                done.append((key, TiledDetections(image.norm.shape[:2], image.tiles, image.found,
                                                  _edge_margin(image.scale), self.overlap)))
        return done
