"""``nucleus-predict``: segment nuclei in image files and write label images, overlays and tables.

    nucleus-predict --config-file F --input FILE|DIR|GLOB [...] --output DIR [--diameter D|auto]
                    [--tile N] [--overlap N] [--batch N] [--score-thresh S]
                    [--formats labels,overlay,csv,submission,coco] [--resume] [KEY VALUE ...]

Per image: ``OUT/<stem>_labels.tif`` (uint16 ImageJ TIFF; uint32 past 65535 nuclei),
``OUT/<stem>_overlay.png`` (outlines on the normalised image), ``OUT/<stem>_measurements.csv``.
Per run: ``OUT/submission.csv`` (Kaggle DSB-2018) and ``OUT/coco_results.json``, built from every
image's label image, those skipped by ``--resume`` included. Images larger than the tile (after
the diameter rescale) are predicted tile by tile. An unreadable image is reported and skipped; the
run goes on and exits with status 1 listing the failures. Status 2: bad command line.
"""

from __future__ import annotations

import argparse
import glob
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger("nucleus_seg.predict")

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
FORMATS = ("labels", "overlay", "csv", "submission", "coco")
PER_IMAGE = {"labels": "_labels.tif", "overlay": "_overlay.png", "csv": "_measurements.csv"}
SUBMISSION_NAME = "submission.csv"
COCO_NAME = "coco_results.json"
_CFG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from ..utils.env import version_report

        print(version_report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleus-predict", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--config-file", help="YAML config (a bundled one by name, or a path)")
    parser.add_argument("--input", nargs="+", default=[], metavar="FILE|DIR|GLOB",
                        help="image files, folders (their images, not recursive) or quoted glob patterns")
    parser.add_argument("--output", help="output folder (created)")
    parser.add_argument("--diameter", help="nucleus diameter in px, 'auto' to estimate, 0 for no rescale "
                        "(default: NUCLEUS.PREDICT.DIAMETER)")
    parser.add_argument("--tile", type=int, help="tile size in model px (default: NUCLEUS.PREDICT.TILE_SIZE)")
    parser.add_argument("--overlap", type=int, help="tile overlap in model px; should exceed the largest "
                        "nucleus (default: NUCLEUS.PREDICT.TILE_OVERLAP)")
    parser.add_argument("--batch", type=int, help="images per forward pass (NUCLEUS.PREDICT.BATCH_SIZE)")
    parser.add_argument("--score-thresh", type=float, help="keep nuclei scoring at least this "
                        "(NUCLEUS.PREDICT.SCORE_THRESH)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    parser.add_argument("--resume", action="store_true",
                        help="skip images whose outputs exist (per-run files are still rebuilt from all)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine; images are "
                        "sharded across all of them, each written once (CPU: gloo processes)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 when several machines")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def _split_opts(inputs: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--input a b MODEL.WEIGHTS w``: argparse gives the overrides to --input; move them back."""
    for i, token in enumerate(inputs):
        if _CFG_KEY.match(token) and not Path(token).exists():
            return inputs[:i], inputs[i:] + opts
    return inputs, opts


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


@dataclass
class _Run:
    """What the per-run files need from every image, in input order."""

    out: Path
    formats: set[str]
    rows: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    coco: dict[str, list[dict]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)

    def path(self, stem: str, fmt: str) -> Path:
        return self.out / f"{stem}{PER_IMAGE[fmt]}"

    def done(self, stem: str) -> bool:
        """All requested per-image outputs exist, and the per-run files can be rebuilt from them."""
        needed = {f for f in self.formats if f in PER_IMAGE}
        if "submission" in self.formats or "coco" in self.formats:
            needed.add("labels")
        if "coco" in self.formats:
            needed.add("csv")
        return bool(needed) and all(self.path(stem, f).is_file() for f in needed)

    def collect(self, stem: str, labels: np.ndarray, scores: Sequence[float] | dict[int, float]) -> None:
        from ..engine.outputs import coco_results, submission_rows

        if "submission" in self.formats:
            self.rows[stem] = submission_rows(stem, labels)
        if "coco" in self.formats:
            self.coco[stem] = coco_results(stem, labels, scores)

    def write_image(self, stem: str, raw: np.ndarray, pred, cfg) -> None:
        from ..data.io import normalize_from_cfg
        from ..engine.outputs import write_label_tiff, write_measurements_csv, write_overlay_png

        if "labels" in self.formats:
            write_label_tiff(self.path(stem, "labels"), pred.labels)
        if "overlay" in self.formats:
            write_overlay_png(self.path(stem, "overlay"), normalize_from_cfg(raw, cfg), pred.labels)
        if "csv" in self.formats:
            write_measurements_csv(self.path(stem, "csv"), pred.labels, raw, pred.scores)
        self.collect(stem, pred.labels, pred.scores)
        self.written.add(stem)

    def reload(self, stem: str) -> None:
        """Per-run entries of an image skipped by --resume, from its label TIFF (and CSV scores)."""
        from ..data.io import read_label_image
        from ..engine.outputs import read_scores_csv

        if "submission" not in self.formats and "coco" not in self.formats:
            return
        labels = read_label_image(self.path(stem, "labels"))
        scores = read_scores_csv(self.path(stem, "csv")) if "coco" in self.formats else {}
        missing = sorted(set(np.unique(labels[labels > 0]).tolist()) - set(scores)) if scores else []
        if "coco" in self.formats and missing:
            raise ValueError(f"{self.path(stem, 'csv')}: no score for ids {missing[:5]} of "
                             f"{self.path(stem, 'labels')}")
        self.collect(stem, labels, scores)
        self.written.add(stem)

    def fail(self, path: Path, exc: BaseException) -> None:
        message = str(exc)
        reason = message if str(path) in message else f"{path}: {message or type(exc).__name__}"
        self.failures.append(reason)
        logger.error("%s", reason)


def _is_large(shape: tuple[int, ...], predictor, tile: int) -> bool:
    scale = predictor.input_scale()  # from NUCLEUS.PREDICT.DIAMETER; "auto" decides at scale 1
    return max(shape[:2]) * (1.0 if scale is None else scale) > tile


def _predict_small(predictor, run: _Run, batch: list[tuple[Path, np.ndarray]], bar) -> None:
    """One forward for the batch; if it fails, image by image so only the bad one is lost."""
    try:
        preds = predictor.predict_labels([raw for _, raw in batch])
    except Exception:  # noqa: BLE001 - isolated below, image by image
        if len(batch) == 1:
            raise
        for item in batch:
            _guarded(run, item[0], lambda item=item: _predict_small(predictor, run, [item], None))
        if bar is not None:
            bar.update(len(batch))
        return
    for (path, raw), pred in zip(batch, preds):
        _guarded(run, path, lambda path=path, raw=raw, pred=pred:
                 run.write_image(path.stem, raw, pred, predictor.cfg))
    if bar is not None:
        bar.update(len(batch))


def _guarded(run: _Run, path: Path, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one bad image must not end the run
        run.fail(path, exc)


def _predict_files(cfg, files: list[Path], run: _Run) -> None:
    """Predict ``files`` into ``run``: batches of small images, large ones tile by tile."""
    from tqdm import tqdm

    from ..data.io import read_image
    from ..engine.predictor import NucleusPredictor

    predictor = NucleusPredictor(cfg)
    tile = int(cfg.NUCLEUS.PREDICT.TILE_SIZE)
    pending: list[tuple[Path, np.ndarray]] = []
    bar = tqdm(total=len(files), desc="nucleus-predict", unit="img")
    for f in files:
        try:
            raw = read_image(f)
        except Exception as exc:  # noqa: BLE001 - reported, run goes on
            run.fail(f, exc)
            bar.update(1)
            continue
        if _is_large(raw.shape, predictor, tile):
            _guarded(run, f, lambda f=f, raw=raw: run.write_image(
                f.stem, raw, predictor.predict_large(raw, progress=True), predictor.cfg))
            bar.update(1)
            continue
        pending.append((f, raw))
        if len(pending) >= predictor.batch_size:
            _predict_small(predictor, run, pending, bar)
            pending = []
    if pending:
        _predict_small(predictor, run, pending, bar)
    bar.close()


def _shard_worker(cfg, files: list[Path], run: _Run, handoff: Path) -> None:
    """One rank of a sharded run: every world-th image (a large image stays whole on one rank), per-image
    outputs written by that rank; what the per-run files need goes to rank 0, which hands it over."""
    import pickle

    from detectron2.utils import comm

    mine = _Run(run.out, run.formats)
    _predict_files(cfg, files[comm.get_rank()::comm.get_world_size()], mine)
    parts = comm.gather((mine.rows, mine.coco, mine.failures, mine.written), dst=0)
    if comm.is_main_process():
        tmp = handoff.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(parts))
        tmp.replace(handoff)
    from ..utils.dist import close_process_group

    close_process_group()


def _predict_sharded(cfg, files: list[Path], run: _Run, args) -> None:
    """``--num-gpus N``: detectron2's launch() (NCCL on GPUs, gloo on CPU), images sharded across ranks.
    The per-run files are then written here from every rank's part, in input order, as in a 1-GPU run."""
    import os
    import pickle

    from detectron2.engine import launch

    handoff = run.out / f".nucleus-predict-{os.getpid()}.parts"
    launch(_shard_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(cfg, files, run, handoff))
    if args.machine_rank != 0:
        return  # machine 0 writes the per-run files
    try:
        parts = pickle.loads(handoff.read_bytes())
    finally:
        handoff.unlink(missing_ok=True)
    for rows, coco, failures, written in parts:
        run.rows.update(rows)
        run.coco.update(coco)
        run.failures.extend(failures)
        run.written.update(written)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # flags may also follow the KEY VALUE overrides
    inputs, opts = _split_opts(list(args.input), list(args.opts or []))
    if not args.config_file:
        parser.error("--config-file is required")
    if not inputs:
        parser.error("--input is required (files, folders or glob patterns)")
    if not args.output:
        parser.error("--output is required")
    if len(opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {opts}")
    formats = {f.strip() for f in args.formats.split(",") if f.strip()}
    if not formats or formats - set(FORMATS):
        parser.error(f"--formats: unknown {sorted(formats - set(FORMATS))}; choose from {', '.join(FORMATS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ..config import get_nucleus_cfg
    from ..engine.outputs import write_coco_json, write_submission_csv

    try:
        cfg = get_nucleus_cfg(args.config_file, opts)
    except Exception as exc:  # noqa: BLE001 - a bad YAML or key: say so, no traceback
        parser.error(f"config: {exc}")
    pred_cfg = cfg.NUCLEUS.PREDICT
    if args.diameter is not None:
        try:
            pred_cfg.DIAMETER = -1.0 if args.diameter.strip().lower() == "auto" else float(args.diameter)
        except ValueError:
            parser.error(f"--diameter: a number of pixels or 'auto', got {args.diameter!r}")
    for value, key in ((args.tile, "TILE_SIZE"), (args.overlap, "TILE_OVERLAP"), (args.batch, "BATCH_SIZE"),
                       (args.score_thresh, "SCORE_THRESH")):
        if value is not None:
            pred_cfg[key] = value
    # Only nuclei >= SCORE_THRESH reach any output: letting the box head drop the rest earlier gives
    # the same nuclei (NMS only ever suppresses a box by a higher-scoring one) for less mask-head work.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = max(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
                                                float(pred_cfg.SCORE_THRESH) - 1e-6)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = expand_inputs(inputs, skip_dir=out)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            parser.error(f"{stems[f.stem]} and {f} would write the same outputs ({f.stem}_*); "
                         "rename one or run them separately")
        stems[f.stem] = f
    run = _Run(out, formats, failures=list(problems))

    todo = []
    for f in files:
        if args.resume and run.done(f.stem):
            _guarded(run, f, lambda f=f: run.reload(f.stem))
        else:
            todo.append(f)
    if files and len(todo) < len(files):
        logger.info("--resume: %d of %d images already done", len(files) - len(todo), len(files))

    world = args.num_gpus * args.num_machines
    if todo and world > 1:
        _predict_sharded(cfg, todo, run, args)
    elif todo:
        _predict_files(cfg, todo, run)

    order = [f.stem for f in files]
    if "submission" in formats:
        write_submission_csv(out / SUBMISSION_NAME, [r for s in order for r in run.rows.get(s, [])])
    if "coco" in formats:
        write_coco_json(out / COCO_NAME, [r for s in order for r in run.coco.get(s, [])])
    written = sum(1 for s in order if s in run.written)
    print(f"nucleus-predict: {written} of {len(files)} images have outputs in {out}", file=sys.stderr)
    if run.failures:
        print(f"nucleus-predict: {len(run.failures)} failed:", file=sys.stderr)
        for reason in run.failures:
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
