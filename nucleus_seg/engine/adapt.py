"""Label-free adaptation (``nucleus-adapt``): self-training on a lab's own unlabelled images.

Each round:

1. **Pseudo-labels.** The teacher (the starting model in round 1, then the last round's student) estimates each
   image's nucleus diameter, the image is rescaled so nuclei have the training diameter, and the teacher predicts
   it as it is and flipped left-right and up-down. A nucleus becomes a pseudo-label when it scores at least
   ``confident``, the flipped views find it again (mask IoU >= ``agree_iou``) and, after round 1, the previous
   round's teacher found it too; its outline is the pixels at least two of the three views give it. Everything
   else the teacher saw (scores >= ``uncertain``) is an *ignore region*: a COCO ``iscrowd`` annotation that the
   losses count neither as nucleus nor as background (:mod:`nucleus_seg.modeling.ignore`). So is bright image
   structure the teacher explained with nothing (the smoothed image above Otsu's level and halfway up to the
   confident nuclei, at least a quarter nucleus across, outside every detection): a nucleus the teacher missed
   must not be taught as background.
2. **Student.** The model is fine-tuned at the learning rate its schedule ended at on those images (with strong
   photometric augmentation) mixed half and half with fresh synthetic images, so it does not forget, through
   ``nucleus-train``'s own job (``--num-gpus``, time budget, checkpoints).

The images are the only input: no label file is read (a test audits every file opened). Outputs in
``OUTPUT``: ``model_final.pth`` and ``config.yaml`` (use them as any trained model), ``adapt_report.json``
(per round: pseudo-labels and ignore regions per image, diameters, iterations, minutes) and
``before_after.png``; each round's data and training run stay in ``round_<k>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from detectron2.config import CfgNode
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from ..data.io import normalize_from_cfg, read_image
from ..data.synth.scene import MAX_NUCLEI_PER_MPX
from ..data.transforms import FastResizeTransform
from ..evaluation.matching import label_overlap
from ..evaluation.plots import plot_before_after
from ..inference.predictor import NucleusPredictor
from ..inference.significance import typical_diameter
from ..structures import label_image_to_annotations
from ..utils.files import atomic_path, atomic_write, safe_name, write_json
from .job import run as run_training

__all__ = ["AdaptError", "AdaptSettings", "PseudoLabels", "adapt", "earlier_adaptation", "pseudo_labels",
           "schedule_end_lr", "unexplained_foreground"]

logger = logging.getLogger("nucleus_seg.adapt")

REPORT_FILE = "adapt_report.json"
VIEWS = ((False, False), (True, False), (False, True))  # (left-right, up-down) flips the teacher agrees over


MAX_SIDE = 4096  # px after the diameter rescale: an estimate that asks for more is more likely wrong than right


DATA_TILE = 1024  # px: larger rescaled images are cut into tiles, so no training sample decodes a whole field


def _input_scale(teacher: NucleusPredictor, image: np.ndarray, name: str, train_diameter: float,
                 ) -> tuple[float, float | None, bool]:
    """The model-input scale of ``image``, its nucleus diameter, and whether the scale was estimated (else the
    config's DIAMETER gave it)."""
    fixed = teacher.input_scale()
    if fixed is not None or train_diameter <= 0:
        diameter = float(teacher.cfg.NUCLEUS.PREDICT.DIAMETER)
        return (fixed or 1.0), (diameter if diameter > 0 else None), False
    choice = teacher.estimate_diameter(image, name)
    return float(choice.scale), choice.diameter, True


class AdaptError(RuntimeError):
    """Adaptation cannot go on (e.g. the teacher finds no confident nucleus in any image)."""


@dataclass
class AdaptSettings:
    """What ``nucleus-adapt``'s flags set; defaults chosen a priori, not fitted to any labelled image."""

    minutes: float = 5.0  # pseudo-labelling and training, all rounds (the pictures come after)
    rounds: int = 2
    iters: int = 0  # > 0: this many iterations per round instead of the time budget (tests, CPU)
    synthetic: int = 200  # synthetic training images mixed in, half of what the student sees
    confident: float = 0.8
    uncertain: float = 0.3
    agree_iou: float = 0.5
    unexplained: bool = True  # bright structure no detection covers is ignored too, not taught as background
    # each pseudo-label's outline by majority over the three views (the teacher's flip TTA, distilled), not the
    # plain view's alone. Chosen on four unseen synthetic targets (CPU demo model, session 28): mean gain +0.070
    # against +0.063, worst -0.004 against -0.013; on one H200 it also lost less on a noisy real image (session 22)
    vote_masks: bool = True
    # False: pseudo-labels teach where nuclei are, not their outlines (the student's mask loss is off, its mask
    # head frozen). On one H200 the outlines were what adaptation lost: matched IoU at 0.5 fell on a noisy image
    # while F1 held (benchmarks/README.md, session 22)
    outlines: bool = True
    # x the learning rate the starting model's schedule ended at (schedule_end_lr). At 10x (a tenth of BASE_LR
    # after two decays) one H200 run lost on every target; on the CPU demo model 10x took four noisy synthetic
    # fields 0.513 -> 0.207, 1x left them unchanged (benchmarks/README.md, session 21)
    lr_factor: float = 1.0
    num_gpus: int = 1
    procs_per_gpu: int = 1
    overlays: int = 4  # images in before_after.png
    # False: the control arm of a measurement, the same schedule on the synthetic images alone (what does
    # training on the user's images add beyond more training?)
    train_on_images: bool = True


@dataclass
class PseudoLabels:
    """One image's pseudo-labels (``labels``) and ignore regions (``ignored``), as label images."""

    labels: np.ndarray
    ignored: np.ndarray
    found: np.ndarray  # everything the teacher saw (the next round's stability check)

    @property
    def counts(self) -> tuple[int, int]:
        return int(len(np.unique(self.labels)) - 1), int(len(np.unique(self.ignored)) - 1)


@dataclass
class _Image:
    name: str
    path: Path
    scale: float = 1.0
    diameter: float | None = None
    rounds: list[dict] = field(default_factory=list)
    skipped: str = ""  # why the image was left out


def _flip(array: np.ndarray, view: tuple[bool, bool]) -> np.ndarray:
    if view[0]:
        array = array[:, ::-1]
    if view[1]:
        array = array[::-1]
    return np.ascontiguousarray(array)


def _best_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each instance id of label image ``a`` that touches ``b``: the id, its best mask IoU with an instance of
    ``b``, and that instance's id."""
    overlap = label_overlap(a, b)
    order = np.lexsort((overlap.iou, overlap.pair_gt))  # by instance of a, the best pair last
    ranked = overlap.pair_gt[order]
    best = order[np.append(ranked[1:] != ranked[:-1], True)] if len(order) else order
    return (overlap.gt_ids[overlap.pair_gt[best]], overlap.iou[best], overlap.pred_ids[overlap.pair_pred[best]])


def _best_iou(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    """For each instance id of label image ``a`` that touches ``b``, its best mask IoU with an instance of ``b``
    (an id missing from the dict touches nothing: IoU 0)."""
    ids, iou, _ = _best_matches(a, b)
    return dict(zip(ids.tolist(), iou.tolist()))


def unexplained_foreground(gray: np.ndarray, covered: np.ndarray, diameter: float,
                           nuclei: np.ndarray | None = None) -> np.ndarray:
    """Label image of the bright structure no detection covers (``covered``), in pieces at least a quarter
    ``diameter`` across (an opening drops the thin rims between a detection's outline and the threshold's, and
    specks). Bright: above Otsu's level of the image smoothed over ~1/16 nucleus and, when ``nuclei`` (a mask of
    the confident ones) is given, at least halfway from the background's median up to theirs: Otsu alone cuts an
    unevenly lit background in two."""
    smooth = ndi.gaussian_filter(gray.astype(np.float32), max(diameter / 16, 0.5))
    if float(smooth.max()) - float(smooth.min()) < 1e-3:
        return np.zeros(gray.shape, np.int32)
    level = threshold_otsu(smooth)
    if nuclei is not None:
        background = ~ndi.binary_dilation(covered, iterations=2)
        if not nuclei.any() or not background.any():  # nothing to judge brightness by
            return np.zeros(gray.shape, np.int32)
        level = max(level, 0.5 * (float(np.median(smooth[background])) + float(np.median(smooth[nuclei]))))
    free = (smooth > level) & ~ndi.binary_dilation(covered, iterations=1)
    free = ndi.binary_opening(free, structure=disk(max(1, round(diameter / 8))))
    pieces, _ = ndi.label(free)
    return pieces.astype(np.int32)


def _vote(labels: np.ndarray, others: list[np.ndarray], agree_iou: float) -> np.ndarray:
    """``labels`` with each instance's pixels those at least two of three views give it: the plain view
    (``labels``) and the two flipped ones (``others``, their instances renamed after the label they match best,
    at IoU >= ``agree_iou``)."""
    renamed = []
    for other in others:
        ids, iou, match = _best_matches(labels, other)
        agree = iou >= agree_iou
        lut = np.zeros(int(other.max()) + 1, np.int32)
        lut[match[agree]] = ids[agree]
        renamed.append(lut[other])
    first, second = renamed
    voted = np.where((labels > 0) & ((labels == first) | (labels == second)), labels, 0)
    return np.where((voted == 0) & (first > 0) & (first == second), first, voted).astype(np.int32)


def pseudo_labels(predictor: NucleusPredictor, image: np.ndarray, settings: AdaptSettings,
                  previous: np.ndarray | None = None) -> PseudoLabels:
    """The teacher's pseudo-labels of ``image`` (already at the training diameter; see the module text)."""
    views = []
    for view in VIEWS:
        found = predictor.predict_large(_flip(image, view), diameter=0, score_thresh=settings.uncertain)
        views.append((_flip(found.labels, view), found.scores))
    base, scores = views[0]
    keep = scores >= settings.confident
    # found again in every flipped view and (after round 1) by the previous teacher
    for other in [v for v, _ in views[1:]] + ([previous] if previous is not None else []):
        best = _best_iou(base, other)
        keep &= np.asarray([best.get(k, 0.0) >= settings.agree_iou for k in range(1, len(scores) + 1)], bool)
    lut = np.zeros(len(scores) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    labels = lut[base]
    ignored = np.where((base > 0) & (labels == 0), base, 0).astype(np.int32)
    # what a flipped view saw that the plain one did not is not sure either
    for other, _ in views[1:]:
        best = _best_iou(other, base)
        unmatched = [k for k, iou in best.items() if iou < settings.agree_iou]
        unmatched += sorted(set(np.unique(other[other > 0]).tolist()) - set(best))
        extra = np.isin(other, unmatched) & (ignored == 0) & (labels == 0)
        ignored[extra] = other[extra] + int(ignored.max())
    if settings.vote_masks and labels.any():
        labels = _vote(labels, [v for v, _ in views[1:]], settings.agree_iou)
        ignored[labels > 0] = 0
    if settings.unexplained:
        areas = torch.from_numpy(np.bincount(base.ravel())[1:])
        diameter = predictor.train_diameter if predictor.train_diameter > 0 else (
            typical_diameter(areas) if bool((areas > 0).any()) else 16.0)
        pieces = unexplained_foreground(predictor.normalize(image).max(axis=2), (labels > 0) | (ignored > 0),
                                        diameter, nuclei=labels > 0)
        ignored = np.where(pieces > 0, pieces + int(ignored.max()), ignored).astype(np.int32)
    return PseudoLabels(labels, ignored, base)


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-3:
        return image
    height, width = image.shape[:2]
    return FastResizeTransform(height, width, max(1, round(height * scale)), max(1, round(width * scale))
                               ).apply_image(image)


def _tiles(shape: tuple[int, ...], tile: int = DATA_TILE) -> list[tuple[slice, slice]]:
    """Non-overlapping windows of at most ``tile`` px covering an image (one window if it fits)."""
    rows = np.linspace(0, shape[0], -(-shape[0] // tile) + 1).round().astype(int)
    cols = np.linspace(0, shape[1], -(-shape[1] // tile) + 1).round().astype(int)
    return [(slice(y0, y1), slice(x0, x1)) for y0, y1 in zip(rows, rows[1:]) for x0, x1 in zip(cols, cols[1:])]


def _coco_dataset(folder: Path, entries: list[tuple[str, np.ndarray, PseudoLabels]], repeats: int) -> Path:
    """``folder/pseudo.json`` (COCO; ignore regions as iscrowd), each image (or each tile of a large one) listed
    ``repeats`` times."""
    images, annotations = [], []
    for name, image, pseudo in entries:
        windows = _tiles(image.shape)
        for t, window in enumerate(windows):
            file_name = f"images/{name}.tif" if len(windows) == 1 else f"images/{name}_tile{t:03d}.tif"
            crop = np.ascontiguousarray(image[window])
            with atomic_path(folder / file_name) as tmp:
                tifffile.imwrite(tmp, crop)
            annos = [dict(a, iscrowd=0) for a in label_image_to_annotations(pseudo.labels[window])]
            annos += [dict(a, iscrowd=1) for a in label_image_to_annotations(pseudo.ignored[window])]
            for _ in range(repeats):
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file_name, "height": int(crop.shape[0]),
                               "width": int(crop.shape[1])})
                for a in annos:
                    x, y, w, h = a["bbox"]
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                        "segmentation": a["segmentation"], "bbox": [x, y, w, h], "area": w * h,
                                        "iscrowd": a["iscrowd"]})
    return write_json(folder / "pseudo.json", {"images": images, "annotations": annotations,
                                               "categories": [{"id": 1, "name": "nucleus"}]}, indent=None)


def schedule_end_lr(cfg: CfgNode) -> float:
    """The learning rate ``cfg``'s schedule ends at: BASE_LR after every decay a multi-step schedule reaches
    (STEPS below MAX_ITER; a time budget shrinks both alike), a tenth of it for other schedules. Fine-tuning a
    converged model faster than that first throws away what the decays settled."""
    base = float(cfg.SOLVER.BASE_LR)
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        return 0.1 * base
    decays = sum(1 for step in cfg.SOLVER.STEPS if step < cfg.SOLVER.MAX_ITER)
    return base * float(cfg.SOLVER.GAMMA) ** decays


def _round_config(cfg: CfgNode, weights: str, dataset: Path, folder: Path, settings: AdaptSettings,
                  minutes: float) -> Path:
    """The student's training config for one round, written as ``folder/adapt_config.yaml``."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.DATASETS.TRAIN = ((str(dataset),) if settings.train_on_images else ()) + (
        ("nucleus_synth_train",) if settings.synthetic else ())
    if not cfg.DATASETS.TRAIN:
        raise AdaptError("nothing to train on: train_on_images is off and synthetic is 0")
    cfg.DATASETS.TEST = ()
    cfg.TEST.EVAL_PERIOD = 0
    cfg.NUCLEUS.SYNTH.NUM_TRAIN = max(1, settings.synthetic)
    cfg.NUCLEUS.SYNTH.NUM_VAL = 0
    cfg.SOLVER.BASE_LR = schedule_end_lr(cfg) * settings.lr_factor
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.MAX_ITER = settings.iters if settings.iters > 0 else 100_000  # the time budget shrinks it
    cfg.SOLVER.WARMUP_ITERS = min(int(cfg.SOLVER.WARMUP_ITERS), 20)
    cfg.SOLVER.CHECKPOINT_PERIOD = 1_000_000
    cfg.NUCLEUS.TRAIN.FINAL_ONLY = True
    cfg.NUCLEUS.TRAIN.TIME_BUDGET_MINUTES = 0.0 if settings.iters > 0 else max(0.2, minutes)
    cfg.NUCLEUS.TRAIN.TIME_BUDGET_START = 0.0
    cfg.INPUT.NUCLEUS.CROWD_AS_IGNORE = True
    if not settings.outlines:
        cfg.NUCLEUS.TRAIN.MASK_LOSS_WEIGHT = 0.0
    # strong photometric augmentation: the student sees harder views than the teacher labelled
    aug = cfg.INPUT.NUCLEUS
    aug.BLUR_PROB, aug.NOISE_PROB = max(aug.BLUR_PROB, 0.5), max(aug.NOISE_PROB, 0.5)
    aug.CONTRAST, aug.BRIGHTNESS = max(aug.CONTRAST, 0.5), max(aug.BRIGHTNESS, 0.3)
    cfg.OUTPUT_DIR = str(folder / "train")
    path = folder / "adapt_config.yaml"
    atomic_write(path, cfg.dump())
    return path


def _train(config: Path, settings: AdaptSettings) -> None:
    args = argparse.Namespace(config_file=str(config), opts=[], num_gpus=settings.num_gpus,
                              procs_per_gpu=settings.procs_per_gpu, num_machines=1, machine_rank=0,
                              dist_url="auto", resume=False, eval_only=False, overwrite=False)
    status = run_training(args)
    if status != 0:
        raise AdaptError(f"training round in {config.parent} failed with exit status {status} (see "
                         f"{config.parent / 'train' / 'log.txt'})")


def _predictor(cfg: CfgNode, weights: str) -> NucleusPredictor:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.NUCLEUS.PREDICT.TTA = False  # the views are made here
    return NucleusPredictor(cfg)


def _write_before_after(path: Path, cfg: CfgNode, before: str, after: str, images: list[_Image],
                        raws: dict[str, np.ndarray]) -> None:
    """Outlines of the starting and the adapted model on the given images, side by side."""
    found = {}
    for weights in (before, after):
        predictor = _predictor(cfg, weights)
        found[weights] = [predictor.predict_labels([raws[i.name]], names=[i.name])[0].labels for i in images]
        del predictor
    rows = [(i.name, normalize_from_cfg(raws[i.name], cfg), b, a)
            for i, b, a in zip(images, found[before], found[after])]
    plot_before_after(rows, path, titles=("before adaptation", "adapted"))


OUTPUT_FILES = (REPORT_FILE, "model_final.pth", "config.yaml", "before_after.png")


def earlier_adaptation(output: Path) -> list[Path]:
    """What an earlier adaptation left in ``output`` (refused unless overwritten)."""
    return sorted(output.glob("round_*")) + [output / f for f in OUTPUT_FILES if (output / f).exists()]


def adapt(cfg: CfgNode, image_paths: list[Path], output: str | Path,
          settings: AdaptSettings | None = None, overwrite: bool = False) -> dict:
    """Adapt ``cfg``'s model (``MODEL.WEIGHTS``) to ``image_paths`` without labels; returns the report
    (also ``OUTPUT/adapt_report.json``). The adapted model is ``OUTPUT/model_final.pth`` with
    ``OUTPUT/config.yaml``. An earlier adaptation in ``output`` is refused unless ``overwrite``."""
    settings = settings or AdaptSettings()
    output = Path(output)
    earlier = earlier_adaptation(output)
    if earlier and not overwrite:
        raise AdaptError(f"{output} already holds an adaptation ({earlier[0].name}): use another folder or "
                         "overwrite=True")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    started = time.time()
    deadline = started + 60.0 * settings.minutes
    if not cfg.MODEL.WEIGHTS:
        raise AdaptError("MODEL.WEIGHTS is empty: nucleus-adapt starts from a trained model")
    images = [_Image(safe_name(p.stem), p) for p in image_paths]
    names = [i.name for i in images]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise AdaptError(f"two input images are both called {clash!r}: rename one")
    raws = {i.name: read_image(i.path) for i in images}
    start_weights = weights = str(cfg.MODEL.WEIGHTS)
    train_diameter = float(cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER)
    report: dict = {"config_weights": start_weights, "images": [str(p) for p in image_paths],
                    "settings": asdict(settings), "rounds": []}
    previous: dict[str, np.ndarray] = {}
    for k in range(1, settings.rounds + 1):
        round_started = time.time()
        folder = output / f"round_{k}"
        teacher_weights = weights
        teacher = _predictor(cfg, weights)
        entries = []
        totals = np.zeros(2, int)  # pseudo-labels, ignore regions
        for item in [i for i in images if not i.skipped]:
            raw = raws[item.name]
            if k == 1:  # once: later rounds' labels must line up with these
                item.scale, item.diameter, estimated = _input_scale(teacher, raw, item.name, train_diameter)
                side = round(max(raw.shape[:2]) * item.scale)
                if estimated and side > MAX_SIDE:
                    item.skipped = (f"the diameter estimate ({item.diameter or 0:.1f} px) would rescale it "
                                    f"x{item.scale:.1f} to {side} px, which looks wrong; give the diameter with "
                                    "NUCLEUS.PREDICT.DIAMETER")
                    logger.warning("%s: skipped: %s", item.name, item.skipped)
                    continue
            scaled = _rescale(raw, item.scale)
            pseudo = pseudo_labels(teacher, scaled, settings, previous.get(item.name))
            n_pseudo, n_ignored = pseudo.counts
            per_mpx = (n_pseudo + n_ignored) / (scaled.shape[0] * scaled.shape[1] / 1e6)
            if k == 1 and per_mpx > MAX_NUCLEI_PER_MPX:
                item.skipped = (f"{per_mpx:.0f} nuclei per megapixel at x{item.scale:.2f}, denser than any field "
                                "nuclei make; the diameter estimate is probably wrong (give it with "
                                "NUCLEUS.PREDICT.DIAMETER)")
                logger.warning("%s: skipped: %s", item.name, item.skipped)
                continue
            previous[item.name] = pseudo.found
            entries.append((item.name, scaled, pseudo))
            totals += (n_pseudo, n_ignored)
            item.rounds.append({"round": k, "scale": item.scale, "diameter": item.diameter,
                                "pseudo_labels": n_pseudo, "ignore_regions": n_ignored})
            logger.info("round %d: %s at x%.2f: %d pseudo-labels, %d ignore regions", k, item.name, item.scale,
                        n_pseudo, n_ignored)
        if not entries:
            raise AdaptError("every image was skipped: " + "; ".join(f"{i.name}: {i.skipped}" for i in images))
        if totals[0] == 0:
            raise AdaptError(f"round {k}: the teacher found no confident nucleus (score >= {settings.confident}, "
                             "the same in flipped views) in any image: nothing to adapt to. Check the images "
                             "and the model, or lower --confident")
        samples = sum(len(_tiles(e[1].shape)) for e in entries)
        repeats = max(1, round(settings.synthetic / samples)) if settings.synthetic else 1
        dataset = _coco_dataset(folder / "data", entries, repeats)
        del teacher
        label_minutes = (time.time() - round_started) / 60
        minutes = (deadline - time.time()) / 60 / (settings.rounds - k + 1)
        config = _round_config(cfg, weights, dataset, folder, settings, minutes)
        logger.info("round %d: training the student on %d images (+%d synthetic), %s", k, len(images),
                    settings.synthetic, f"{settings.iters} iterations" if settings.iters else f"{minutes:.1f} min")
        train_started = time.time()
        _train(config, settings)
        weights = str(folder / "train" / "model_final.pth")
        final = folder / "train" / "final_metrics.json"
        iterations = json.loads(final.read_text()).get("iteration") if final.is_file() else None
        report["rounds"].append({
            "round": k, "teacher": teacher_weights, "student": weights, "pseudo_labels": int(totals[0]),
            "ignore_regions": int(totals[1]), "label_minutes": round(label_minutes, 3),
            "train_minutes": round((time.time() - train_started) / 60, 3), "iterations": iterations,
        })
    with atomic_path(output / "model_final.pth") as tmp:
        shutil.copyfile(weights, tmp)
    final_cfg = cfg.clone()
    final_cfg.defrost()
    final_cfg.MODEL.WEIGHTS = str((output / "model_final.pth").resolve())
    atomic_write(output / "config.yaml", final_cfg.dump())
    report["minutes"] = round((time.time() - started) / 60, 3)
    report["per_image"] = [{"name": i.name, "path": str(i.path), "rounds": i.rounds, "skipped": i.skipped}
                           for i in images]
    report["weights"] = str(output / "model_final.pth")
    if settings.overlays:
        _write_before_after(output / "before_after.png", cfg, start_weights, str(output / "model_final.pth"),
                            [i for i in images if not i.skipped][:settings.overlays], raws)
        report["before_after"] = str(output / "before_after.png")
    write_json(output / REPORT_FILE, report)
    return report
