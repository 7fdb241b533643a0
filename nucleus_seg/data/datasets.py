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

Parsing ~29k DSB mask PNGs takes a while, so the dicts are cached as JSON keyed by the list of files
with their sizes and mtimes (any added, removed, or rewritten file invalidates it): inside the dataset
root when it is writable, else under ``~/.cache/nucleus_seg``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .io import ImageReadError, read_image, read_label_image, read_mask

logger = logging.getLogger(__name__)

__all__ = [
    "NUCLEUS_METADATA",
    "detect_format",
    "label_image_to_annotations",
    "load_coco_nucleus_json",
    "load_dsb_dataset",
    "load_label_image_dataset",
    "load_label_image_pairs",
    "mask_to_annotation",
    "register_nucleus_dataset",
]

FORMATS = ("dsb", "labels", "coco")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# Bump when the record layout or parsing rules change: old caches then miss instead of lying.
CACHE_VERSION = 1
CACHE_PREFIX = ".nucleus_seg_cache"

NUCLEUS_METADATA: dict[str, Any] = {
    "thing_classes": ["nucleus"],
    "thing_colors": [(0, 220, 90)],
    "evaluator_type": "nucleus",
}


# ---------------------------------------------------------------------------------------------------
# Masks -> annotations


def mask_to_annotation(mask: np.ndarray) -> dict[str, Any]:
    """One detectron2 annotation from an HxW boolean mask: RLE segmentation, bbox derived from it."""
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode

    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return _annotation_from_rle(rle, BoxMode.XYWH_ABS)


def _annotation_from_rle(rle: dict, box_mode: Any) -> dict[str, Any]:
    import pycocotools.mask as mask_util

    bbox = [float(v) for v in mask_util.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"bbox": bbox, "bbox_mode": box_mode, "segmentation": rle, "category_id": 0, "iscrowd": 0}


def label_image_to_annotations(label: np.ndarray) -> list[dict[str, Any]]:
    """Annotations for each nonzero id of a 2-D label image, in ascending id order.

    One id is one instance even when its pixels are split in pieces (the label's author said so).
    """
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode
    from scipy import ndimage

    if label.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {label.shape}")
    ids, inverse = np.unique(label, return_inverse=True)
    seq = inverse.reshape(label.shape).astype(np.int32)
    if ids[0] != 0:
        seq += 1  # no background pixel at all: every id is an instance
    annotations = []
    buf = np.zeros(label.shape, dtype=np.uint8, order="F")
    for k, box in enumerate(ndimage.find_objects(seq), start=1):
        if box is None:
            continue
        buf[box] = seq[box] == k
        annotations.append(_annotation_from_rle(mask_util.encode(buf), BoxMode.XYWH_ABS))
        buf[box] = 0
    return annotations


# ---------------------------------------------------------------------------------------------------
# Cache


def _cache_key(fmt: str, root: Path, files: Iterable[Path]) -> str:
    """sha1 of every file's relative path, size and mtime: any change to the dataset misses the cache."""
    h = hashlib.sha1(f"{fmt}:{CACHE_VERSION}".encode())
    for path in files:
        st = path.stat()
        h.update(f"\0{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nucleus_seg"


def _cache_paths(fmt: str, root: Path) -> list[Path]:
    """Where a cache may live: the dataset root first, the user cache as fallback."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / f"{CACHE_PREFIX}_{fmt}.json", _user_cache_dir() / f"{fmt}_{digest}.json"]


def _read_cache(fmt: str, root: Path, key: str) -> list[dict] | None:
    for path in _cache_paths(fmt, root):
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            logger.warning("Ignoring unreadable dataset cache %s (%s)", path, exc)
            continue
        if data.get("key") == key:
            logger.info("Loaded %d %s records of %s from cache %s", len(data["records"]), fmt, root, path)
            return _records_from_json(data["records"], root)
    return None


def _write_cache(fmt: str, root: Path, key: str, records: Sequence[dict]) -> Path | None:
    """Write atomically (temp file + rename) so a reader never sees half a cache."""
    payload = json.dumps({"key": key, "version": CACHE_VERSION, "records": _records_to_json(records, root)})
    for path in _cache_paths(fmt, root):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(payload)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            return path
        except OSError as exc:
            logger.debug("Cannot write dataset cache %s (%s)", path, exc)
    logger.warning("Could not write a dataset cache for %s anywhere; the next load parses again", root)
    return None


def _records_to_json(records: Sequence[dict], root: Path) -> list[dict]:
    out = []
    for r in records:
        r = dict(r, file_name=Path(r["file_name"]).relative_to(root).as_posix())
        r["annotations"] = [dict(a, bbox_mode=int(a["bbox_mode"])) for a in r["annotations"]]
        out.append(r)
    return out


def _records_from_json(records: list[dict], root: Path) -> list[dict]:
    from detectron2.structures import BoxMode

    for r in records:
        r["file_name"] = str(root / r["file_name"])
        for a in r["annotations"]:
            a["bbox_mode"] = BoxMode(a["bbox_mode"])
    return records


def _cached(
    fmt: str, root: Path, files: list[Path], parse: Callable[[], list[dict]], cache: bool
) -> list[dict]:
    if not cache:
        return parse()
    key = _cache_key(fmt, root, files)
    records = _read_cache(fmt, root, key)
    if records is None:
        records = parse()
        _write_cache(fmt, root, key, records)
    return records


def _map(fn: Callable, items: list, num_workers: int | None, desc: str) -> list:
    """Ordered map with a progress bar, over a process pool when there is enough work for one."""
    import multiprocessing

    from tqdm import tqdm

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
    return image, _list_files(sample_dir / "masks", MASK_SUFFIXES)


def _parse_dsb_sample(item: tuple[Path, list[Path]]) -> tuple[dict, dict[str, int]]:
    """Record (no image_id yet) and counts of dropped-empty / overlap-trimmed masks for one sample."""
    import cv2
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode

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
        annotations.append(_annotation_from_rle(mask_util.encode(buf), BoxMode.XYWH_ABS))
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

    return _select_split(_cached("dsb", root, files, parse, cache), split, root)


def _select_split(records: list[dict], split: str | None, root: Path) -> list[dict]:
    if split is None:
        return records
    from .builtin import DSB2018_VAL_IMAGE_IDS

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
    label = read_label_image(label_path)
    if label.shape != image.shape[:2]:
        raise ImageReadError(
            f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from image {image_path} "
            f"size {image.shape[1]}x{image.shape[0]}"
        )
    if label.min() < 0:
        raise ImageReadError(f"{label_path}: label image holds negative ids")
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


def _stem_map(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in _list_files(folder, suffixes):
        if path.stem in out:
            raise ValueError(f"{folder}: duplicate id {path.stem!r} ({out[path.stem].name} and {path.name})")
        out[path.stem] = path
    return out


def _label_folder(root: Path) -> Path:
    for name in ("labels", "masks"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root}: no labels/ or masks/ folder beside images/")


def load_label_image_dataset(
    root: str | os.PathLike, cache: bool = True, num_workers: int | None = None
) -> list[dict]:
    """Dataset dicts of ``<root>/images/<stem>.*`` with label images ``<root>/labels/<stem>.*`` (or masks/).

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
    labels = _stem_map(labels_dir, MASK_SUFFIXES)
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

    return _cached("labels", root, files, parse, cache)


# ---------------------------------------------------------------------------------------------------
# COCO JSON


def load_coco_nucleus_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> list[dict]:
    """COCO instances JSON through detectron2's ``load_coco_json``, every category mapped to nucleus (0).

    Multi-class nucleus sets (e.g. per cell type) are merged into the one class this model has; a note
    is logged when that happens.
    """
    from detectron2.data.datasets import load_coco_json

    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {json_file} does not exist")
    records = load_coco_json(str(json_file), str(image_root))
    categories = {a["category_id"] for r in records for a in r.get("annotations", [])}
    if len(categories) > 1:
        logger.info("%s: %d categories merged into 'nucleus'", json_file, len(categories))
    for r in records:
        r.setdefault("image_name", Path(r["file_name"]).stem)
        for a in r.get("annotations", []):
            a["category_id"] = 0
    return records


def _coco_json_of(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{root}: COCO format needs exactly one *.json at the top (found {len(found)}); pass the file"
        )
    return found[0]


# ---------------------------------------------------------------------------------------------------
# Registration


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


def _register(name: str, loader: Callable[[], list[dict]], **metadata: Any) -> None:
    """Register (or replace) ``name`` with the nucleus metadata plus ``metadata``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**NUCLEUS_METADATA, **metadata)


def register_nucleus_dataset(
    name: str,
    root: str | os.PathLike,
    fmt: str = "auto",
    split: str | None = None,
    image_root: str | os.PathLike | None = None,
    cache: bool = True,
) -> None:
    """Register a nucleus dataset in DatasetCatalog/MetadataCatalog (an existing ``name`` is replaced).

    ``fmt`` is "dsb", "labels", "coco" or "auto" (detected now from ``root``, which must then exist).
    ``split`` ("train"/"val", Matterport's validation ids) applies to DSB folders only. For COCO, ``root``
    is the .json or a folder holding exactly one; images are looked up under ``image_root``, by default
    the json's folder. Loading is lazy: a missing folder is reported when the dataset is first used.
    """
    root = Path(root)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS} or 'auto'")
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    if split is not None and fmt != "dsb":
        raise ValueError(f"split={split!r} selects DSB-2018 validation ids and needs fmt 'dsb', not {fmt!r}")
    if fmt == "dsb":
        _register(name, lambda: load_dsb_dataset(root, split=split, cache=cache),
                  dataset_root=str(root), dataset_format=fmt, split=split)
    elif fmt == "labels":
        _register(name, lambda: load_label_image_dataset(root, cache=cache),
                  dataset_root=str(root), dataset_format=fmt)
    else:

        def load_coco() -> list[dict]:
            json_file = _coco_json_of(root)
            return load_coco_nucleus_json(json_file, image_root or json_file.parent)

        meta = {"dataset_root": str(root), "dataset_format": fmt}
        if root.suffix.lower() == ".json":
            meta["json_file"] = str(root)
            meta["image_root"] = str(image_root or root.parent)
        _register(name, load_coco, **meta)
