"""Nucleus datasets as detectron2 dataset dicts, and their registration in DatasetCatalog.

Three on-disk layouts are read:

* **dsb**: the Data Science Bowl 2018 layout, ``<root>/<id>/images/<id>.png`` plus
  ``<root>/<id>/masks/*.png`` with one binary mask per nucleus (what Matterport's sample reads, and
  what ``nucleus-synth`` writes).
* **labels**: ``<root>/images/<stem>.{png,tif,...}`` plus ``<root>/labels/<stem>.*`` (or ``masks/``),
  one 2-D instance label image per image (0 background, k instance k; 8/16/32-bit; ids need not be
  contiguous; one id is one instance even when its pixels are split in pieces).
* **coco**: a COCO instances JSON, read with detectron2's own ``load_coco_json``.

Every record has ``file_name``, ``image_id`` (int: position in the sorted listing of the whole
folder, so train and val ids never collide), ``image_name`` (the DSB id or file stem), ``height``,
``width`` and ``annotations``; each annotation has a compressed RLE ``segmentation`` (counts as str),
a ``bbox`` computed from the mask in ``BoxMode.XYWH_ABS``, ``category_id`` 0 and ``iscrowd`` 0.

Bad input, as documented per loader: unreadable files raise :class:`ImageReadError` naming the file;
size mismatches name both files; empty masks are dropped and overlapping pixels go to the first mask
in sorted file order (both logged with counts); an image without masks is kept as a negative example.

Parsed dicts are cached as JSON keyed by the files' sizes and mtimes (:mod:`.cache`). Registration of
these loaders under dataset names is in :mod:`.catalog`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data.datasets import load_coco_json
from tqdm import tqdm

from ..structures import label_image_to_annotations, rle_to_annotation
from ..utils.files import IMAGE_SUFFIXES, LABEL_SUFFIXES
from .cache import cached
from .io import ImageReadError, read_image, read_mask
from .outlines import OUTLINE_STEM_ENDINGS, OUTLINE_SUFFIXES, is_outline_file, read_annotation

logger = logging.getLogger(__name__)

__all__ = [
    "DSB2018_VAL_IMAGE_IDS",
    "FORMATS",
    "detect_format",
    "load_coco_nucleus_json",
    "load_dsb_dataset",
    "load_label_image_dataset",
    "load_label_image_pairs",
]

FORMATS = ("dsb", "labels", "coco")

# The validation ids of matterport/Mask_RCNN samples/nucleus/nucleus.py (VAL_IMAGE_IDS), copied verbatim
# so a DSB-2018 train/val split here is the same as there.
DSB2018_VAL_IMAGE_IDS: tuple[str, ...] = (
    "0c2550a23b8a0f29a7575de8c61690d3c31bc897dd5ba66caec201d201a278c2",
    "92f31f591929a30e4309ab75185c96ff4314ce0a7ead2ed2c2171897ad1da0c7",
    "1e488c42eb1a54a3e8412b1f12cde530f950f238d71078f2ede6a85a02168e1f",
    "c901794d1a421d52e5734500c0a2a8ca84651fb93b19cec2f411855e70cae339",
    "8e507d58f4c27cd2a82bee79fe27b069befd62a46fdaed20970a95a2ba819c7b",
    "60cb718759bff13f81c4055a7679e81326f78b6a193a2d856546097c949b20ff",
    "da5f98f2b8a64eee735a398de48ed42cd31bf17a6063db46a9e0783ac13cd844",
    "9ebcfaf2322932d464f15b5662cae4d669b2d785b8299556d73fffcae8365d32",
    "1b44d22643830cd4f23c9deadb0bd499fb392fb2cd9526d81547d93077d983df",
    "97126a9791f0c1176e4563ad679a301dac27c59011f579e808bbd6e9f4cd1034",
    "e81c758e1ca177b0942ecad62cf8d321ffc315376135bcbed3df932a6e5b40c0",
    "f29fd9c52e04403cd2c7d43b6fe2479292e53b2f61969d25256d2d2aca7c6a81",
    "0ea221716cf13710214dcd331a61cea48308c3940df1d28cfc7fd817c83714e1",
    "3ab9cab6212fabd723a2c5a1949c2ded19980398b56e6080978e796f45cbbc90",
    "ebc18868864ad075548cc1784f4f9a237bb98335f9645ee727dac8332a3e3716",
    "bb61fc17daf8bdd4e16fdcf50137a8d7762bec486ede9249d92e511fcb693676",
    "e1bcb583985325d0ef5f3ef52957d0371c96d4af767b13e48102bca9d5351a9b",
    "947c0d94c8213ac7aaa41c4efc95d854246550298259cf1bb489654d0e969050",
    "cbca32daaae36a872a11da4eaff65d1068ff3f154eedc9d3fc0c214a4e5d32bd",
    "f4c4db3df4ff0de90f44b027fc2e28c16bf7e5c75ea75b0a9762bbb7ac86e7a3",
    "4193474b2f1c72f735b13633b219d9cabdd43c21d9c2bb4dfc4809f104ba4c06",
    "f73e37957c74f554be132986f38b6f1d75339f636dfe2b681a0cf3f88d2733af",
    "a4c44fc5f5bf213e2be6091ccaed49d8bf039d78f6fbd9c4d7b7428cfcb2eda4",
    "cab4875269f44a701c5e58190a1d2f6fcb577ea79d842522dcab20ccb39b7ad2",
    "8ecdb93582b2d5270457b36651b62776256ade3aaa2d7432ae65c14f07432d49",
)

def _map(fn: Callable, items: list, num_workers: int | None, desc: str) -> list:
    """Ordered map with a progress bar, over a process pool when there is enough work for one."""
    workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
    show = len(items) > 20
    # daemonic processes (DataLoader workers, pool workers) may not start a pool of their own
    if workers <= 1 or len(items) < 16 or multiprocessing.current_process().daemon:
        return [fn(x) for x in tqdm(items, desc=desc, disable=not show)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, min(16, len(items) // (4 * workers)))
        return list(tqdm(pool.map(fn, items, chunksize=chunk), total=len(items), desc=desc, disable=not show))


def _is_visible_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir() and not entry.name.startswith(".")


def _list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        Path(e.path) for e in os.scandir(folder)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(tuple(suffixes))
    )


# ---------------------------------------------------------------------------------------------------
# DSB layout


def _dsb_sample_files(sample_dir: Path) -> tuple[Path, list[Path]]:
    """(image, sorted masks) of one DSB sample folder; raises for a missing or ambiguous image."""
    images_dir = sample_dir / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"{sample_dir}: no images/ folder (DSB layout is <root>/<id>/images/<id>.png + <id>/masks/*.png)"
        )
    candidates = _list_files(images_dir, IMAGE_SUFFIXES)
    preferred = [p for p in candidates if p.stem == sample_dir.name]
    if len(preferred) == 1:
        image = preferred[0]
    elif len(candidates) == 1:
        image = candidates[0]
    elif not candidates:
        raise FileNotFoundError(f"{images_dir}: no image file ({', '.join(IMAGE_SUFFIXES)})")
    else:
        names = ", ".join(p.name for p in (preferred or candidates))
        raise ValueError(f"{images_dir}: several candidate images for id {sample_dir.name} ({names})")
    return image, _list_files(sample_dir / "masks", LABEL_SUFFIXES)


def _parse_dsb_sample(item: tuple[Path, list[Path]]) -> tuple[dict, dict[str, int]]:
    """Record (no image_id yet) and counts of dropped-empty / overlap-trimmed masks for one sample."""
    image_path, mask_paths = item
    image = read_image(image_path)
    height, width = image.shape[:2]
    taken = np.zeros((height, width), dtype=bool)
    buf = np.zeros((height, width), dtype=np.uint8, order="F")
    stats = {"empty": 0, "overlapping": 0, "emptied": 0}
    annotations = []
    for mask_path in mask_paths:
        mask = read_mask(mask_path)
        if mask.shape != (height, width):
            raise ImageReadError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{image_path} size {width}x{height}"
            )
        x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
        if w == 0 or h == 0:
            stats["empty"] += 1
            continue
        box = (slice(y, y + h), slice(x, x + w))
        crop, free = mask[box], ~taken[box]
        own = crop & free
        if not own.all(where=crop):
            stats["overlapping"] += 1
            if not own.any():
                stats["emptied"] += 1
                continue
        taken[box] |= crop
        buf[box] = own
        annotations.append(rle_to_annotation(mask_util.encode(buf)))
        buf[box] = 0
    record = {
        "file_name": str(image_path),
        "image_name": image_path.parent.parent.name,
        "height": int(height),
        "width": int(width),
        "annotations": annotations,
    }
    return record, stats


def _log_counts(root: Path, records: Sequence[dict], stats: Iterable[dict[str, int]]) -> None:
    total = {"empty": 0, "overlapping": 0, "emptied": 0}
    for s in stats:
        for k in total:
            total[k] += s.get(k, 0)
    negatives = sum(1 for r in records if not r["annotations"])
    instances = sum(len(r["annotations"]) for r in records)
    logger.info("Parsed %s: %d images, %d instances", root, len(records), instances)
    if total["empty"]:
        logger.warning("%s: dropped %d empty masks", root, total["empty"])
    if total["overlapping"]:
        logger.warning(
            "%s: %d masks overlap earlier masks (sorted file order); overlapping pixels kept by the earlier "
            "one, %d masks left empty by that were dropped", root, total["overlapping"], total["emptied"],
        )
    if negatives:
        logger.info("%s: %d images have no nucleus and are kept as negative examples", root, negatives)


def load_dsb_dataset(
    root: str | os.PathLike,
    split: str | None = None,
    cache: bool = True,
    num_workers: int | None = None,
) -> list[dict]:
    """Dataset dicts of a DSB-2018-layout folder (``<root>/<id>/images/<id>.png`` + ``<id>/masks/*``).

    ``split`` None keeps every sample; "train"/"val" split by Matterport's 25 validation ids, so numbers
    compare with its nucleus sample. Rules: every visible sub-folder of root is a sample and must have
    ``images/`` holding ``<id>.<ext>`` or exactly one image (else an error naming the folder); a sample
    without ``masks/`` (or with an empty one) is kept with no annotations as a negative example; mask
    files are taken in sorted name order, empty ones dropped, and a pixel claimed by several masks goes to
    the first (both counted in the log); a mask whose size differs from the image is an error naming both.
    """
    root = Path(root)
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"DSB dataset folder {root} does not exist")
    sample_dirs = sorted((Path(e.path) for e in os.scandir(root) if _is_visible_dir(e)), key=lambda p: p.name)
    if not sample_dirs:
        raise FileNotFoundError(f"{root}: no sample folders (DSB layout is <root>/<id>/images/<id>.png)")
    items = [_dsb_sample_files(d) for d in sample_dirs]
    files = [f for image, masks in items for f in (image, *masks)]

    def parse() -> list[dict]:
        results = _map(_parse_dsb_sample, items, num_workers, desc=f"parsing {root.name}")
        records = [r for r, _ in results]
        for image_id, r in enumerate(records):
            r["image_id"] = image_id
        _log_counts(root, records, (s for _, s in results))
        return records

    return _select_split(cached("dsb", root, files, parse, cache), split, root)


def _select_split(records: list[dict], split: str | None, root: Path) -> list[dict]:
    if split is None:
        return records
    val_ids = set(DSB2018_VAL_IMAGE_IDS)
    selected = [r for r in records if (r["image_name"] in val_ids) == (split == "val")]
    found = sum(1 for r in records if r["image_name"] in val_ids)
    if found == 0:
        raise ValueError(
            f"{root}: none of Matterport's {len(val_ids)} DSB-2018 validation ids is present, so split "
            f"{split!r} is meaningless here; use split=None"
        )
    if found < len(val_ids):
        logger.warning("%s: only %d of the %d validation ids are present", root, found, len(val_ids))
    return selected


# ---------------------------------------------------------------------------------------------------
# Label-image layout


def _parse_label_pair(item: tuple[Path, Path]) -> dict:
    image_path, label_path = item
    image = read_image(image_path)
    label = read_annotation(label_path, image.shape[:2])  # outlines (Fiji, QuPath) are drawn on this image
    if label.shape != image.shape[:2]:
        raise ImageReadError(
            f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from image {image_path} "
            f"size {image.shape[1]}x{image.shape[0]}"
        )
    return {
        "file_name": str(image_path),
        "image_name": image_path.stem,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "annotations": label_image_to_annotations(label),
    }


def load_label_image_pairs(
    pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]], num_workers: int | None = None
) -> list[dict]:
    """Dataset dicts for explicit (image, label image) pairs; image_id is the position in ``pairs``."""
    items = [(Path(i), Path(lab)) for i, lab in pairs]
    records = _map(_parse_label_pair, items, num_workers, desc="parsing label images")
    for image_id, r in enumerate(records):
        r["image_id"] = image_id
    return records


def _annotation_stem(path: Path) -> str:
    stem = path.stem
    if is_outline_file(path):
        for ending in OUTLINE_STEM_ENDINGS:
            stem = stem.removesuffix(ending)
    return stem


def _stem_map(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in _list_files(folder, suffixes):
        stem = _annotation_stem(path)
        if stem in out:
            raise ValueError(f"{folder}: duplicate id {stem!r} ({out[stem].name} and {path.name})")
        out[stem] = path
    return out


def _label_folder(root: Path) -> Path:
    for name in ("labels", "masks"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root}: no labels/ or masks/ folder beside images/")


def load_label_image_dataset(
    root: str | os.PathLike, cache: bool = True, num_workers: int | None = None
) -> list[dict]:
    """Dataset dicts of ``<root>/images/<stem>.*`` with label images ``<root>/labels/<stem>.*`` (or masks/), or
    outlines drawn on the image: an ImageJ ROI set (``.zip``, ``.roi``) or QuPath GeoJSON, also named as
    nucleus-predict names its outline files (``<stem>_rois.zip``, ``<stem>_nuclei.geojson``).

    Stems must match one to one: two files with one stem in a folder, or an image without a label, is an
    error naming them; a label without an image is ignored with a warning. An all-zero label image is a
    negative example. Label images must be 2-D (a z-stack or multi-channel label is an error).
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{root}: no images/ folder (label layout is images/ + labels/ or masks/)")
    labels_dir = _label_folder(root)
    images = _stem_map(images_dir, IMAGE_SUFFIXES)
    labels = _stem_map(labels_dir, (*LABEL_SUFFIXES, *OUTLINE_SUFFIXES))
    if not images:
        raise FileNotFoundError(f"{images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    missing = sorted(set(images) - set(labels))
    if missing:
        shown = ", ".join(images[s].name for s in missing[:5])
        raise FileNotFoundError(
            f"{labels_dir}: no label image for {len(missing)} images of {images_dir} ({shown}"
            f"{', ...' if len(missing) > 5 else ''}); labels must have the image's file stem"
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        logger.warning("%s: %d label images without an image are ignored (%s)", labels_dir, len(orphans),
                       ", ".join(orphans[:5]))
    stems = sorted(images)
    pairs = [(images[s], labels[s]) for s in stems]
    files = [f for pair in pairs for f in pair]

    def parse() -> list[dict]:
        records = load_label_image_pairs(pairs, num_workers)
        logger.info("Parsed %s: %d images, %d instances", root, len(records),
                    sum(len(r["annotations"]) for r in records))
        return records

    return cached("labels", root, files, parse, cache)


# ---------------------------------------------------------------------------------------------------
# COCO JSON


def load_coco_nucleus_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> list[dict]:
    """COCO instances JSON through detectron2's ``load_coco_json``, every category mapped to nucleus (0).

    Multi-class nucleus sets (e.g. per cell type) are merged into the one class this model has; a note
    is logged when that happens.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {json_file} does not exist")
    try:
        records = load_coco_json(str(json_file), str(image_root))
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError, IndexError) as exc:
        # a JSON syntax error, or an object that is not a COCO instances file: pycocotools and detectron2
        # fail deep inside without naming the file
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
        raise ImageReadError(f"{json_file}: not a readable COCO instances file ({what})") from exc
    categories = {a["category_id"] for r in records for a in r.get("annotations", [])}
    if len(categories) > 1:
        logger.info("%s: %d categories merged into 'nucleus'", json_file, len(categories))
    for r in records:
        r.setdefault("image_name", Path(r["file_name"]).stem)
        for a in r.get("annotations", []):
            a["category_id"] = 0
    return records


def coco_json_of(root: Path) -> Path:
    """The COCO JSON a dataset path names: the file itself, or the one .json at the top of a folder."""
    if root.is_file():
        return root
    found = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{root}: COCO format needs exactly one *.json at the top (found {len(found)}); pass the file"
        )
    return found[0]


def detect_format(root: str | os.PathLike) -> str:
    """'coco' for a .json file or a folder holding one, 'labels' for images/ + labels|masks/, 'dsb' for
    sample folders holding images/."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "coco"
        raise ValueError(f"{root}: a file that is not a COCO .json; pass a dataset folder or a .json")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if (root / "images").is_dir() and ((root / "labels").is_dir() or (root / "masks").is_dir()):
        return "labels"
    for entry in os.scandir(root):
        if _is_visible_dir(entry) and os.path.isdir(os.path.join(entry.path, "images")):
            return "dsb"
    if any(root.glob("*.json")):
        return "coco"
    raise ValueError(
        f"{root}: unknown dataset layout; expected <id>/images/ + <id>/masks/ (dsb), images/ + labels/ "
        "(labels) or a COCO .json (coco)"
    )
