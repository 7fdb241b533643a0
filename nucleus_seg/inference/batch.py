"""Predicting a folder of image files: input expansion, per-image outputs, per-run files, resume, sharding.

What ``nucleus-predict`` does, as a library call (:func:`predict_to_folder`). Per image:
``OUT/<stem>_labels.tif``, ``OUT/<stem>_overlay.png``, ``OUT/<stem>_measurements.csv`` (on request
``OUT/<stem>_rois.zip`` and ``OUT/<stem>_nuclei.geojson``, :mod:`nucleus_seg.data.outlines`). Per folder:
``OUT/submission.csv``, ``OUT/coco_results.json`` and ``OUT/coco_images.json`` (the COCO ``images`` list:
integer ids 1..N with their file names), built from every image's label image (those skipped by
``resume`` included) and merged with what the folder's files already hold for other images: a run on a
subset, or one that fails, never drops earlier images' entries; a run that matches no input writes nothing.
One bad image is reported and skipped; the run goes on.
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.utils import comm
from tqdm import tqdm

from ..data.io import normalize_from_cfg, pixel_size_um, read_image, read_label_image
from ..data.outlines import GEOJSON_ENDING, ROIS_ENDING, label_outlines
from ..data.stacks import PlaneStack, plane_stem, split_stack, stack_planes
from ..utils.dist import close_process_group, launch
from ..utils.env import usable_device
from ..utils.files import IMAGE_SUFFIXES, atomic_write, check_writable, write_json
from ..utils.rle import label_runs
from .outputs import (
    coco_fragment,
    coco_results,
    read_json_list,
    read_scores_csv,
    read_submission_csv,
    submission_lines,
    submission_rows,
    write_coco_json,
    write_geojson,
    write_imagej_rois,
    write_label_tiff,
    write_measurements_csv,
    write_overlay_png,
    write_submission_csv,
)
from .postprocess import finish_labels, needs_image
from .predictor import NucleusPredictor, fits_one_pass
from .tiling import EVERY_NUCLEUS, LabelPrediction, NucleusFilter, TiledDetections, seam_warning

__all__ = ["DEFAULT_FORMATS", "FORMATS", "PredictionRun", "expand_inputs", "predict_to_folder"]

logger = logging.getLogger(__name__)

FORMATS = ("labels", "overlay", "csv", "rois", "geojson", "submission", "coco")
DEFAULT_FORMATS = ("labels", "overlay", "csv", "submission", "coco")  # outlines for Fiji and QuPath on request
PER_IMAGE = {"labels": "_labels.tif", "overlay": "_overlay.png", "csv": "_measurements.csv",
             "rois": f"{ROIS_ENDING}.zip", "geojson": f"{GEOJSON_ENDING}.geojson"}
SUBMISSION_NAME = "submission.csv"
COCO_NAME = "coco_results.json"
COCO_IMAGES_NAME = "coco_images.json"
PLANES_FOLDER = ".planes"  # a stack's planes, as images of their own, while nucleus-predict runs (then removed)


def expand_inputs(specs: Sequence[str], skip_dir: Path | None = None) -> tuple[list[Path], list[str]]:
    """Image files named by files, folders and glob patterns (sorted, de-duplicated), and problems."""
    files: list[Path] = []
    problems: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_SUFFIXES)
            if skip_dir is not None and path.resolve() == skip_dir.resolve():  # our own outputs
                found = [p for p in found if not p.name.endswith(tuple(PER_IMAGE.values()))]
            if not found:
                problems.append(f"{spec}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
            if not found:
                problems.append(f"{spec}: pattern matches no files")
            files += found
        else:
            problems.append(f"{spec}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


# (submission CSV lines or None, COCO results as a JSON fragment or None, COCO image entry without its id or None),
# encoded by the writer process that made them: the per-run files are then joined, not formatted, at the run's end
ImageEntries = tuple


def output_path(out: Path, stem: str, fmt: str) -> Path:
    """Where an image's per-image output of format ``fmt`` goes."""
    return out / f"{stem}{PER_IMAGE[fmt]}"


def image_entries(formats: set[str], stem: str, labels: np.ndarray, scores: Sequence[float] | dict[int, float],
                  file_name: str, image_id: int) -> ImageEntries:
    """An image's submission rows and COCO results (``image_id``: its COCO id, given before the run), encoded."""
    runs = label_runs(labels) if {"submission", "coco"} <= formats else None  # one pass over the pixels for both
    rows = submission_lines(submission_rows(stem, labels, runs)) if "submission" in formats else None
    if "coco" not in formats:
        return rows, None, None
    image = {"file_name": file_name, "height": int(labels.shape[0]), "width": int(labels.shape[1])}
    return rows, coco_fragment(coco_results(image_id, labels, scores, runs=runs)), image


def write_image_outputs(out: Path, formats: set[str], path: Path, raw: np.ndarray, labels: np.ndarray,
                        scores: Sequence[float] | dict[int, float], cfg, norm: np.ndarray | None = None,
                        image_id: int = 0) -> ImageEntries:
    """One image's files (label TIFF, overlay, measurements) and its per-run entries; a plain function, so a
    writer process can run it. ``norm``: ``raw`` normalised already (else the overlay normalises it)."""
    stem = path.stem
    pixel_size = pixel_size_um(path) if "labels" in formats or "csv" in formats else None
    if "labels" in formats:
        write_label_tiff(output_path(out, stem, "labels"), labels, pixel_size)
    if "overlay" in formats:
        write_overlay_png(output_path(out, stem, "overlay"), normalize_from_cfg(raw, cfg) if norm is None else norm,
                          labels)
    if "csv" in formats:
        write_measurements_csv(output_path(out, stem, "csv"), labels, raw, scores, pixel_size)
    if "rois" in formats or "geojson" in formats:
        outlines = label_outlines(labels)
        if "rois" in formats:
            write_imagej_rois(output_path(out, stem, "rois"), outlines)
        if "geojson" in formats:
            write_geojson(output_path(out, stem, "geojson"), outlines, scores)
    return image_entries(formats, stem, labels, scores, path.name, image_id)


def stitch_and_write(out: Path, formats: set[str], path: Path, raw: np.ndarray,
                     pred: LabelPrediction | TiledDetections, cfg, image_id: int = 0,
                     keep: NucleusFilter = EVERY_NUCLEUS) -> tuple[ImageEntries, str | None]:
    """A writer task: stitch the image's tiles if that is still to do, keep the nuclei ``keep`` keeps, write its
    files; returns its per-run entries and the seam warning, if any (logged by the predicting process, which has
    the user's log)."""
    warning = norm = None
    if isinstance(pred, TiledDetections):
        overlap = pred.overlap
        pred, num_cut = pred.stitch()
        warning = seam_warning(num_cut, overlap, str(path)) if num_cut else None
        p = cfg.NUCLEUS.PREDICT if cfg is not None else None
        steps = (p.MIN_SIGNIFICANCE, p.BOUNDARY_LEVEL, p.MIN_EDGE_SIGNIFICANCE) if p is not None else None
        if steps is not None and needs_image(*steps):  # as the predictor's own stitching
            norm = normalize_from_cfg(raw, cfg)  # the overlay reuses it
            pred = finish_labels(pred, norm, *steps)
    pred = keep(pred)
    return write_image_outputs(out, formats, path, raw, pred.labels, pred.scores, cfg, norm, image_id), warning


@dataclass
class PredictionRun:
    """What the per-run files need from every image, in input order, and what went wrong."""

    out: Path
    formats: set[str]
    rows: dict[str, str] = field(default_factory=dict)  # submission CSV lines, by stem
    coco: dict[str, str] = field(default_factory=dict)  # COCO results (JSON fragments), by stem
    images: dict[str, dict] = field(default_factory=dict)  # COCO image entries (their ids in coco_ids), by stem
    coco_ids: dict[str, int] = field(default_factory=dict)  # COCO image id of each input, given before the run
    keep: NucleusFilter = EVERY_NUCLEUS  # which nuclei reach the outputs
    failures: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)

    def path(self, stem: str, fmt: str) -> Path:
        return output_path(self.out, stem, fmt)

    def done(self, stem: str) -> bool:
        """All requested per-image outputs exist, and the per-run files can be rebuilt from them."""
        needed = {f for f in self.formats if f in PER_IMAGE}
        if "submission" in self.formats or "coco" in self.formats:
            needed.add("labels")
        if "coco" in self.formats:
            needed.add("csv")
        return bool(needed) and all(self.path(stem, f).is_file() for f in needed)

    def collect(self, stem: str, labels: np.ndarray, scores: Sequence[float] | dict[int, float],
                file_name: str) -> None:
        self.add(stem, image_entries(self.formats, stem, labels, scores, file_name, self.coco_ids.get(stem, 0)))

    def add(self, stem: str, entries: ImageEntries) -> None:
        """What an image contributes to the per-run files; its outputs are complete."""
        rows, coco, image = entries
        if rows is not None:
            self.rows[stem] = rows
        if coco is not None:
            self.coco[stem], self.images[stem] = coco, image
        self.written.add(stem)

    def write_image(self, path: Path, raw: np.ndarray, pred: LabelPrediction | TiledDetections, cfg) -> None:
        self.add_written(path, stitch_and_write(self.out, self.formats, path, raw, pred, cfg,
                                                self.coco_ids.get(path.stem, 0), self.keep))

    def add_written(self, path: Path, written: tuple[ImageEntries, str | None]) -> None:
        """What a writer task returned for ``path``: its entries, and the warning to show."""
        entries, warning = written
        if warning:
            logger.warning("%s", warning)
        self.add(path.stem, entries)

    def reload(self, path: Path) -> None:
        """Per-run entries of an image skipped by resume, from its label TIFF (and CSV scores)."""
        stem = path.stem
        if "submission" not in self.formats and "coco" not in self.formats:
            return
        labels = read_label_image(self.path(stem, "labels"))
        scores = read_scores_csv(self.path(stem, "csv")) if "coco" in self.formats else {}
        missing = sorted(set(np.unique(labels[labels > 0]).tolist()) - set(scores)) if scores else []
        if "coco" in self.formats and missing:
            raise ValueError(f"{self.path(stem, 'csv')}: no score for ids {missing[:5]} of "
                             f"{self.path(stem, 'labels')}")
        self.collect(stem, labels, scores, path.name)

    def fail(self, path: Path, exc: BaseException) -> None:
        message = str(exc)
        reason = message if str(path) in message else f"{path}: {message or type(exc).__name__}"
        self.failures.append(reason)
        logger.error("%s", reason)

    def guarded(self, path: Path, fn: Callable[[], None]) -> None:
        """Run ``fn``; an exception is recorded as this image's failure and the run goes on."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one bad image must not end the run
            self.fail(path, exc)

    def merge(self, other: PredictionRun) -> None:
        self.rows.update(other.rows)
        self.coco.update(other.coco)
        self.images.update(other.images)
        self.failures.extend(other.failures)
        self.written.update(other.written)


def _is_large(shape: tuple[int, ...], predictor: NucleusPredictor, tile: int) -> bool:
    """Whether an image is tiled: past what ``NucleusPredictor`` sends through the model whole (up to
    ``ONE_PASS_TILES`` tiles on a side, with caps in proportion to its area)."""
    scale = predictor.input_scale()  # from NUCLEUS.PREDICT.DIAMETER; "auto" decides at scale 1
    return not fits_one_pass(shape, 1.0 if scale is None else scale, tile)


def _fills_a_forward(pending: list[tuple[Path, np.ndarray]], predictor: NucleusPredictor) -> bool:
    """Whether the images waiting for the model fill one forward: ``BATCH_SIZE`` images, or ``BATCH_SIZE``
    tiles' worth of model pixels (``NucleusPredictor.images_per_forward``)."""
    scale = predictor.input_scale() or 1.0  # "auto" decides per image; at scale 1 until then
    pixels = sum(raw.shape[0] * raw.shape[1] for _, raw in pending) * scale * scale
    return len(pending) >= predictor.batch_size or pixels >= predictor.pixels_per_forward


# each holds ~0.7 GB (its imports). A 1024 px image of 300 nuclei, every default output, took 167 ms of one core of
# an H100 host (session 33): 8 writers wrote 42 images/s, 12 wrote 62, 16 wrote 75 (nothing else running), while
# the model side of nucleus-predict made ~55 images/s at BATCH_SIZE 64: 8 writers had set the pace
MAX_WRITERS = 12


def writer_count(cfg, world_size: int = 1) -> int:
    """``NUCLEUS.PREDICT.WRITERS``, with -1 resolved: on a GPU one process per core the predicting processes
    leave (two each: the model's and the file reader's; at most ``MAX_WRITERS``), none on the CPU, where the
    model already uses every core."""
    workers = int(cfg.NUCLEUS.PREDICT.WRITERS)
    if workers >= 0:
        return workers
    if cfg.MODEL.DEVICE == "cpu":
        return 0
    return max(0, min(MAX_WRITERS, (os.cpu_count() or 1) // max(1, world_size) - 2))


WRITER_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _writer_ready() -> None:
    """A writer process's first task: unpickling it has imported this module, and with it the writers."""


def _one_thread_each() -> None:
    """Writer process initializer: one thread for OpenCV too. Each writer is one of many processes: a thread
    pool of a core's worth in each (OpenCV, OpenMP) would oversubscribe the host."""
    import cv2

    cv2.setNumThreads(1)


def writer_context() -> multiprocessing.context.BaseContext:
    """How writer processes start: forked from a server process that imported this module once (``forkserver``,
    where the platform has it), else spawned. Neither copies this process's CUDA context or model. Spawned, each
    writer imported nucleus_seg itself: eight at once took 5-7 s on a 16-core H200 host and the first label file
    came 11 s after the start of a 21-24 s run of 256 images (session 26); forked from the server they start
    together after one import (~3 s on the 2-core CI machine, where four spawned ones took 8.5 s)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once this process's server runs: it has them already
    return context


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Processes started inside begin with one OpenMP/BLAS thread (the variables are read at import; a forkserver
    started inside passes them to every writer it forks)."""
    saved = {name: os.environ.get(name) for name in WRITER_THREAD_VARS}
    os.environ.update({name: "1" for name in WRITER_THREAD_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


PENDING_BYTES = 1 << 30  # images beyond 2 x writers may wait while together they hold less than this


def held_bytes(raw: np.ndarray, pred: LabelPrediction | TiledDetections) -> int:
    """What an image waiting for a writer holds in memory (its pixels and its prediction's arrays)."""
    if isinstance(pred, TiledDetections):
        held = sum(i.masks.nbytes + i.origins.nbytes + i.scores.nbytes + i.boxes.nbytes for i in pred.instances)
    else:
        held = pred.labels.nbytes + pred.scores.nbytes + pred.boxes.nbytes
    return int(raw.nbytes) + int(held)


class ImageWriter:
    """Each image's files, written by ``workers`` processes while the next batch is predicted (0: here).

    The model goes on while at most ``2 x workers`` images wait for a writer, or more that hold less than
    ``PENDING_BYTES`` together: it need not stop while the writers start up (the first 16 images used to stop it
    for seconds), and memory stays bounded when writing is slower than predicting.
    A failed write is that image's failure, as in the predicting process; a pool that breaks (a worker killed)
    fails its pending images and the rest are written here.
    """

    def __init__(self, run: PredictionRun, cfg, workers: int):
        self.run, self.cfg, self.workers = run, cfg, workers
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[Path, Future, int]] = deque()
        self.pending_bytes = 0
        self.waited = 0.0  # seconds the predicting process stood still for the writers (queue full, forks)
        self.early: deque[tuple[Path, np.ndarray, LabelPrediction | TiledDetections]] = deque()  # before the forks
        self.early_bytes = 0
        self._forking: threading.Thread | None = None
        self._fork_error: Exception | None = None

    def start(self) -> None:
        """Start the writer processes now, while this process builds and loads the model, instead of after the
        first batch (see :func:`writer_context`). A fork from the forkserver waits for the server's imports
        (~3 s), so the forks are asked for on a thread and this process goes on meanwhile."""
        if self.workers <= 0 or self.pool is not None:
            return
        context = writer_context()
        try:
            with _single_threaded_children():  # the variables reach each spawned writer, or the forkserver
                self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_one_thread_each)
                if context.get_start_method() == "forkserver":
                    from multiprocessing import forkserver  # POSIX only

                    forkserver.ensure_running()  # the server starts importing now
                    self._forking = threading.Thread(target=self._fork_all, name="nucleus-writers", daemon=True)
                    self._forking.start()
                else:
                    self._start_all()
        except (OSError, ValueError, BrokenProcessPool) as exc:  # no processes to be had here: write in this one
            self._no_writers(exc)
        else:
            logger.info("image files written by %d writer processes while the next batch is predicted",
                        self.workers)

    def _start_all(self) -> None:
        for _ in range(self.workers):  # one task per process starts them all
            self.pool.submit(_writer_ready)

    def _fork_all(self) -> None:
        try:
            self._start_all()
        except (OSError, ValueError, BrokenProcessPool) as exc:  # reported by the predicting thread
            self._fork_error = exc

    def _wait_for_forks(self) -> None:
        """Before this thread uses the pool: the forks asked for by ``start`` are done (or failed)."""
        if self._forking is not None:
            self._forking.join()
            self._forking = None
        if self._fork_error is not None and self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._no_writers(self._fork_error)

    def _no_writers(self, exc: Exception) -> None:
        logger.warning("no writer processes (%s): image files are written here", exc)
        self.pool, self.workers = None, 0

    def submit(self, path: Path, raw: np.ndarray, pred: LabelPrediction | TiledDetections) -> None:
        """Write ``path``'s files (stitching its tiles first, if it comes as ``TiledDetections``).

        While the writers are still being forked (the forkserver imports nucleus_seg first: ~1.4 s of a 3.5 s run
        on the 2-core machine, more on a GPU host with more writers), images wait here, up to ``PENDING_BYTES``,
        and the model goes on; they go to the writers, in order, with the first image after the forks."""
        self.start()
        if self._forking is not None and self._forking.is_alive():
            size = held_bytes(raw, pred)
            if self.early_bytes + size <= PENDING_BYTES:
                self.early.append((path, raw, pred))
                self.early_bytes += size
                return
        started = time.perf_counter()
        self._wait_for_forks()
        self.waited += time.perf_counter() - started
        self._hand_over_early()
        self._submit_now(path, raw, pred)

    def _hand_over_early(self) -> None:
        """The images kept while the writers were forked, to them now, in order."""
        while self.early:
            self._submit_now(*self.early.popleft())
        self.early_bytes = 0

    def _submit_now(self, path: Path, raw: np.ndarray, pred: LabelPrediction | TiledDetections) -> None:
        """:meth:`submit` once the writers are forked (or there are none)."""
        run = self.run
        if self.pool is not None:
            try:
                future = self.pool.submit(stitch_and_write, run.out, run.formats, path, raw, pred, self.cfg,
                                          run.coco_ids.get(path.stem, 0), run.keep)
            except BrokenProcessPool:
                logger.warning("the writer processes stopped: the remaining images are written here")
                self.pool, self.workers = None, 0
            else:
                size = held_bytes(raw, pred)
                self.pending.append((path, future, size))
                self.pending_bytes += size
                while self.pending and self.pending[0][1].done():  # written: entries in, memory out of the count
                    self._finish_oldest()
                if self._full():
                    started = time.perf_counter()
                    while self._full():
                        self._finish_oldest()
                    self.waited += time.perf_counter() - started
                return
        run.guarded(path, lambda: run.write_image(path, raw, pred, self.cfg))

    def _full(self) -> bool:
        return len(self.pending) > 2 * self.workers and self.pending_bytes > PENDING_BYTES

    def _finish_oldest(self) -> None:
        path, future, size = self.pending.popleft()
        self.pending_bytes -= size
        self.run.guarded(path, lambda: self.run.add_written(path, future.result()))

    def close(self, cancel: bool = False) -> None:
        """Wait for every pending image (``cancel``: drop those not started, e.g. on Ctrl-C)."""
        self._wait_for_forks()
        if not cancel:
            self._hand_over_early()
            if len(self.pending) > 2 * self.workers:  # predicting ran ahead: say what the wait is for
                logger.info("writing the files of the last %d images", len(self.pending))
            while self.pending:
                self._finish_oldest()
        if self.waited >= 1.0:  # the writers set the pace: more of them (or fewer formats) would be faster
            logger.info("the predicting process waited %.1f s for the %d writer processes (NUCLEUS.PREDICT.WRITERS)",
                        self.waited, self.workers)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel=exc_type is not None)


def _predict_small(predictor: NucleusPredictor, writer: ImageWriter, batch: list[tuple[Path, np.ndarray]]) -> None:
    """One forward for the batch; if it fails, image by image so only the bad one is lost."""
    try:
        preds = predictor.predict_labels([raw for _, raw in batch], names=[str(path) for path, _ in batch])
    except Exception:  # noqa: BLE001 - isolated below, image by image
        if len(batch) == 1:
            raise
        for item in batch:
            writer.run.guarded(item[0], lambda item=item: _predict_small(predictor, writer, [item]))
        return
    for (path, raw), pred in zip(batch, preds):
        writer.submit(path, raw, pred)


BATCHED_TILES = 4  # an image of more tiles than this many batches is predicted alone, stitched as it goes


def _read_ahead(files: list[Path], load: Callable[[Path], Any], depth: int = 2,
                ) -> Iterator[tuple[Path, Any, Exception | None]]:
    """``(path, load(path), None)`` for each file, or ``(path, None, error)``, loading the next ``depth`` files
    on a thread while the caller works on this one (reading and normalising release the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue: deque[tuple[Path, Future]] = deque()
        rest = iter(files)
        for path in itertools.islice(rest, depth):
            queue.append((path, pool.submit(load, path)))
        while queue:
            path, future = queue.popleft()
            following = next(rest, None)
            if following is not None:
                queue.append((following, pool.submit(load, following)))
            try:
                loaded = future.result()
            except Exception as exc:  # noqa: BLE001 - the caller reports it; the run goes on
                yield path, None, exc
            else:
                yield path, loaded, None


def predict_files(cfg, files: list[Path], run: PredictionRun, world_size: int = 1) -> None:
    """Predict ``files`` into ``run``; each image's files are written by writer processes
    (``NUCLEUS.PREDICT.WRITERS``) while the next images are predicted.

    Images up to ``ONE_PASS_TILES`` tiles on a side go through the model whole, as ``NucleusPredictor`` sends
    them (same-size images together, ``BATCH_SIZE`` tiles' worth of pixels per forward; a 1024 px image in one
    pass is ~2.3x fewer model pixels than its nine overlapping 512 px tiles); with a known diameter they go
    through the :class:`TileBatcher` as one tile each, painted by the writers. Larger ones are tiled, and
    tiles of consecutive images share batches (:class:`TileBatcher`); their stitching is left to the writer
    processes, so this process only reads (a thread reads and normalises the next files ahead) and feeds the
    model. An image of more than ``BATCHED_TILES`` batches of tiles is predicted alone, stitched as it goes.
    """
    on_device = cfg.clone()
    on_device.MODEL.DEVICE = usable_device(cfg.MODEL.DEVICE)  # what the predictor will run on
    workers = writer_count(on_device, world_size) if len(files) > 1 else 0
    with ImageWriter(run, on_device, workers) as writer:
        writer.start()  # the writers start up while the model is built
        predictor = NucleusPredictor(on_device)  # device resolved once: one fallback warning, not two
        tile = int(cfg.NUCLEUS.PREDICT.TILE_SIZE)
        batcher = predictor.tile_batcher(one_pass=True)
        fixed_scale = predictor.input_scale()  # None: "auto", estimated per image
        # with a known scale every image goes through the batcher, whole or in tiles: two batches in flight, the
        # painting left to the writers; "auto" (and a test-time resize) sends small images to predict_labels
        every_image_batched = fixed_scale is not None and predictor.aug is None
        raws: dict[Path, np.ndarray] = {}
        pending: list[tuple[Path, np.ndarray]] = []
        bar = tqdm(total=len(files), desc="nucleus-predict", unit="img")

        def load(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
            raw = read_image(path)
            batched = every_image_batched or _is_large(raw.shape, predictor, tile)
            return raw, predictor.normalize(raw) if batched else None

        def deliver(done: list[tuple[Path, Any]]) -> None:
            for path, result in done:
                raw = raws.pop(path)
                if isinstance(result, Exception):
                    run.fail(path, result)
                else:
                    writer.submit(path, raw, result)
                bar.update(1)

        try:
            for f, loaded, error in _read_ahead(files, load):
                if error is not None:
                    run.fail(f, error)
                    bar.update(1)
                    continue
                raw, norm = loaded
                if norm is None:
                    pending.append((f, raw))
                    if _fills_a_forward(pending, predictor):
                        deliver(batcher.drain())  # this thread runs the model next
                        _predict_small(predictor, writer, pending)
                        bar.update(len(pending))
                        pending = []
                    continue
                try:
                    scale = fixed_scale
                    if scale is None:  # "auto": this thread runs the model for the estimate
                        deliver(batcher.drain())
                        scale = predictor.large_image_scale(norm, name=str(f)).scale
                    if len(batcher.tiles_for(norm.shape[:2], scale)) > BATCHED_TILES * predictor.batch_size:
                        deliver(batcher.drain())
                        writer.submit(f, raw, predictor.predict_normalized_large(norm, scale, progress=True))
                        bar.update(1)
                        continue
                except Exception as exc:  # noqa: BLE001 - reported, run goes on
                    run.fail(f, exc)
                    bar.update(1)
                    continue
                raws[f] = raw
                deliver(batcher.add(f, norm, scale))
            deliver(batcher.flush())
        finally:
            batcher.close()
        if pending:
            _predict_small(predictor, writer, pending)
            bar.update(len(pending))
    bar.close()


def _diameter_groups(cfg, files: list[Path], run: PredictionRun, diameter_um: float | None,
                     ) -> list[tuple[Any, list[Path]]]:
    """``[(cfg, files)]``, or with ``diameter_um`` the files grouped by the diameter in pixels it is at their
    pixel size (TIFF metadata, :func:`~nucleus_seg.data.io.pixel_size_um`), each group's config predicting at
    that diameter (as ``--diameter`` in px would): a folder of several magnifications, each image at the scale
    the model was trained on. An image whose metadata gives no pixel size fails, naming what to do instead."""
    if not diameter_um:
        return [(cfg, files)] if files else []
    groups: dict[float, list[Path]] = {}
    for path in files:
        size = pixel_size_um(path)
        if size is None:
            run.fail(path, ValueError(
                f"{path}: --diameter {diameter_um:g}um needs the image's pixel size and its metadata gives none "
                "(ImageJ or OME TIFF; Fiji: Image > Properties); give --diameter in pixels or auto"))
            continue
        if abs(size[0] / size[1] - 1) > 0.05:
            logger.warning("%s: pixels of %.4g x %.4g um (not square): the diameter in px is taken at their mean",
                           path, size[1], size[0])
        groups.setdefault(round(diameter_um / math.sqrt(size[0] * size[1]), 6), []).append(path)
    out = []
    for pixels, group in groups.items():
        group_cfg = cfg.clone()
        group_cfg.NUCLEUS.PREDICT.DIAMETER = pixels
        logger.info("--diameter %gum: %d images at %.4g px", diameter_um, len(group), pixels)
        out.append((group_cfg, group))
    return out


def _shard_worker(cfg, files: list[Path], run: PredictionRun, handoff: Path) -> None:
    """One rank of a sharded run: every world-th image (a large image stays whole on one rank), per-image
    outputs written by that rank; what the per-run files need goes to rank 0, which hands it over."""
    mine = PredictionRun(run.out, run.formats, coco_ids=run.coco_ids, keep=run.keep)
    predict_files(cfg, files[comm.get_rank()::comm.get_world_size()], mine, comm.get_world_size())
    parts = comm.gather(mine, dst=0)
    if comm.is_main_process():
        atomic_write(handoff, pickle.dumps(parts))
    close_process_group()


def _predict_sharded(cfg, files: list[Path], run: PredictionRun, num_gpus: int, num_machines: int,
                     machine_rank: int, dist_url: str) -> None:
    """Images sharded across ``num_gpus x num_machines`` ranks (NCCL on GPUs, gloo on CPU); the per-run
    files are then written here from every rank's part, in input order, as in a 1-GPU run."""
    handoff = run.out / f".nucleus-predict-{os.getpid()}.parts"
    launch(_shard_worker, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
           args=(cfg, files, run, handoff))
    if machine_rank != 0:
        return  # machine 0 writes the per-run files
    try:
        parts = pickle.loads(handoff.read_bytes())
    finally:
        handoff.unlink(missing_ok=True)
    for part in parts:
        run.merge(part)


@dataclass
class FolderFiles:
    """The per-folder files as they were before this run: entries by image stem, in their order."""

    order: list[str] = field(default_factory=list)
    rows: dict[str, str] = field(default_factory=dict)  # submission CSV lines, as PredictionRun's
    coco: dict[str, str] = field(default_factory=dict)  # COCO results (JSON fragments), as PredictionRun's
    images: dict[str, dict] = field(default_factory=dict)  # with their ids

    @classmethod
    def read(cls, out: Path, formats: set[str]) -> FolderFiles:
        """What ``out`` holds; an existing file that cannot be read is an error naming it (before compute)."""
        old = cls()
        if "submission" in formats and (out / SUBMISSION_NAME).is_file():
            rows: dict[str, list[tuple[str, str]]] = {}
            for stem, rle in read_submission_csv(out / SUBMISSION_NAME):
                rows.setdefault(stem, []).append((stem, rle))
            old.order = list(rows)
            old.rows = {stem: submission_lines(r) for stem, r in rows.items()}
        results, images = out / COCO_NAME, out / COCO_IMAGES_NAME
        if "coco" in formats and (results.is_file() or images.is_file()):
            if not images.is_file():
                raise ValueError(f"{results} has no {COCO_IMAGES_NAME} beside it (an older nucleus-predict wrote "
                                 "it): move it away, or write this run into another folder")
            stem_of = {}
            for image in read_json_list(images, ("id", "file_name")):
                stem_of[image["id"]] = Path(image["file_name"]).stem
                old.images[stem_of[image["id"]]] = image
            entries: dict[str, list[dict]] = {}
            for entry in (read_json_list(results, ("image_id",)) if results.is_file() else []):
                if entry["image_id"] not in stem_of:
                    raise ValueError(f"{results}: image_id {entry['image_id']} is not in {images}")
                entries.setdefault(stem_of[entry["image_id"]], []).append(entry)
            old.coco = {stem: coco_fragment(e) for stem, e in entries.items()}
            old.order += [s for s in old.images if s not in old.order]
        return old

    def coco_ids(self, stems: list[str]) -> dict[str, int]:
        """COCO image ids for a run over ``stems``: an image already in the folder keeps its id, a new one takes
        the next free id in the per-run files' order (an image that then fails leaves its id unused)."""
        ids = {s: image["id"] for s, image in self.images.items()}
        next_id = max(ids.values(), default=0) + 1
        wanted = set(stems)
        for stem in self.order + [s for s in stems if s not in self.order]:
            if stem in wanted and stem not in ids:
                ids[stem], next_id = next_id, next_id + 1
        return {s: ids[s] for s in stems}


def _write_folder_files(out: Path, run: PredictionRun, old: FolderFiles, stems: list[str]) -> None:
    """submission.csv / coco_results.json / coco_images.json: this run's images replace their earlier
    entries, other images' entries are kept; new images follow in input order. The entries come encoded
    (:data:`ImageEntries`): this is a join, done after the last image, while the GPU has nothing to do."""
    order = old.order + [s for s in stems if s not in old.order]
    if "submission" in run.formats:
        write_submission_csv(out / SUBMISSION_NAME, (run.rows.get(s, old.rows.get(s, "")) for s in order))
    if "coco" in run.formats:
        images, fragments = [], []
        for stem in order:
            if stem in run.images:
                images.append({"id": run.coco_ids[stem], **run.images[stem]})
                fragments.append(run.coco[stem])
            elif stem in old.images:
                images.append(old.images[stem])
                fragments.append(old.coco.get(stem, ""))
        write_coco_json(out / COCO_NAME, fragments)
        write_json(out / COCO_IMAGES_NAME, sorted(images, key=lambda image: image["id"]))


def predict_to_folder(cfg, inputs: Sequence[str], output: str | os.PathLike, formats: Sequence[str] = DEFAULT_FORMATS,
                      resume: bool = False, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
                      dist_url: str = "auto", keep: NucleusFilter = EVERY_NUCLEUS, diameter_um: float | None = None,
                      ) -> tuple[list[Path], PredictionRun]:
    """Predict every image ``inputs`` name (files, folders, glob patterns) into ``output``; ``keep`` says which
    nuclei reach the outputs (:class:`.tiling.NucleusFilter`: not those touching the border, not the smallest);
    ``diameter_um``, the nuclei's diameter in micrometres, is each image's diameter in pixels by its own pixel
    size (:func:`_diameter_groups`).

    Returns the image files and the run (``written`` stems, ``failures``). Everything a usage error can be
    is checked before any compute: two inputs that would write the same outputs, an output folder that is
    not writable, per-folder files that cannot be merged (``ValueError`` / ``PermissionError``).
    """
    out = check_writable(output)
    files, problems = expand_inputs(inputs, skip_dir=out)
    stacks = {f: found for f in files if (found := stack_planes(f)) is not None}
    if stacks and num_machines > 1:
        raise ValueError(f"{next(iter(stacks))}: a stack of planes; run stacks on one machine (--num-gpus N is fine)")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{stems[f.stem]} and {f} would write the same outputs ({f.stem}_*); "
                             "rename one or run them separately")
        stems[f.stem] = f
    for f, (axes, sizes) in stacks.items():
        for index in np.ndindex(*sizes):
            stem = plane_stem(f.stem, axes, index, sizes)
            if stem in stems:
                raise ValueError(f"{stems[stem]} and a plane of {f} would write the same outputs ({stem}_*); "
                                 "rename one or run them separately")
            stems[stem] = f
    run = PredictionRun(out, set(formats), failures=list(problems), keep=keep)
    files, split = _split_stacks(files, stacks, out / PLANES_FOLDER, run)
    if not files:
        return files, run  # nothing matched: the folder's files stay as they are
    old = FolderFiles.read(out, run.formats)
    run.coco_ids = old.coco_ids([f.stem for f in files])
    todo = []
    for f in files:
        if resume and run.done(f.stem):
            run.guarded(f, lambda f=f: run.reload(f))
        else:
            todo.append(f)
    if len(todo) < len(files):
        logger.info("--resume: %d of %d images already done", len(files) - len(todo), len(files))
    for group_cfg, group in _diameter_groups(cfg, todo, run, diameter_um):
        if num_gpus * num_machines > 1:
            _predict_sharded(group_cfg, group, run, num_gpus, num_machines, machine_rank, dist_url)
        else:
            predict_files(group_cfg, group, run)
    _write_folder_files(out, run, old, [f.stem for f in files])
    for stack in split:
        _finish_stack(stack, run)
    shutil.rmtree(out / PLANES_FOLDER, ignore_errors=True)
    return files, run



def _split_stacks(files: list[Path], stacks: dict[Path, tuple], folder: Path, run: PredictionRun,
                  ) -> tuple[list[Path], list[PlaneStack]]:
    """``files`` with each stack replaced by its plane files (:func:`~nucleus_seg.data.stacks.split_stack`); a
    stack that cannot be read fails, the run goes on."""
    if not stacks:
        return files, []
    expanded, split = [], []
    for f in files:
        if f not in stacks:
            expanded.append(f)
            continue
        try:
            stack = split_stack(f, folder)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            run.fail(f, exc)
            continue
        axes, sizes = stacks[f]
        logger.info("%s: a stack of %s planes (%s), each predicted as an image", f, "x".join(map(str, sizes)), axes)
        split.append(stack)
        expanded += stack.planes
    return expanded, split


def _finish_stack(stack: PlaneStack, run: PredictionRun) -> None:
    """After the run: a failed plane is named by its stack, and the planes' label images become one label stack,
    ``<stack stem>_labels.tif``, with the stack's T and Z axes (Fiji opens it as a hyperstack; each plane keeps its
    own numbering from 1), when every plane has one."""
    failed = set()
    for k, reason in enumerate(run.failures):
        for plane in stack.planes:
            if str(plane) in reason:
                failed.add(plane)
                run.failures[k] = reason.replace(str(plane), f"{stack.path} (plane {plane.stem[len(stack.stem) + 1:]})")
    if "labels" not in run.formats:
        return
    missing = [p for p in stack.planes if p in failed or not run.path(p.stem, "labels").is_file()]
    if missing:
        logger.warning("%s: %d of %d planes have no label image: no label stack written", stack.path, len(missing),
                       len(stack.planes))
        return
    planes = np.stack([read_label_image(run.path(p.stem, "labels")) for p in stack.planes])
    planes = planes.reshape(*stack.sizes, *planes.shape[1:])
    # ImageJ's hyperstack axes: time first, then one z axis (any other plane axis counts as z)
    times = [k for k, axis in enumerate(stack.axes) if axis == "T"]
    others = [k for k, axis in enumerate(stack.axes) if axis != "T"]
    planes = planes.transpose(*times, *others, len(stack.axes), len(stack.axes) + 1)
    depth = [math.prod(stack.sizes[k] for k in others)] if others else []
    planes = planes.reshape(*(stack.sizes[k] for k in times), *depth, *planes.shape[-2:])
    axes = "T" * len(times) + "Z" * len(depth) + "YX"
    write_label_tiff(run.path(stack.stem, "labels"), planes, pixel_size_um(stack.path), axes=axes)
