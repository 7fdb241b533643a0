"""Every dataset name nucleus_seg knows, registered in detectron2's DatasetCatalog and MetadataCatalog.

Registration is by import (``import nucleus_seg`` registers the built-in names); loading is lazy. Names:

* ``nucleus_dsb2018_train`` / ``nucleus_dsb2018_val``: ``<root>/dsb2018/stage1_train`` split by
  Matterport's validation ids, so numbers compare with its nucleus sample.
* ``nucleus_synth_train`` / ``nucleus_synth_val``: generated on first use into
  ``<root>/nucleus_synth/<param-hash>/{train,val}`` (:func:`register_synth_datasets`; a config's
  ``NUCLEUS.SYNTH`` keys re-register them, :func:`register_datasets_from_cfg`).
* ``nucleus_dsb_sample``: the one real DSB image shipped with the package (test use only).
* a path: ``FOLDER`` (DSB layout or images/ + labels/), ``FOLDER@train`` / ``FOLDER@val`` (Matterport's split
  of a DSB folder) or a COCO ``.json``, registered under that very name when a config or CLI names it.
* ``NAME@xZ`` (e.g. ``nucleus_dsb_sample@x0.5``): any of the above with images and labels rescaled by Z,
  written on first use into ``<root>/nucleus_zoom/<hash>`` (:func:`register_zoomed_dataset`).

``<root>`` is ``$NUCLEUS_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``, read when a dataset is
first used (so setting the variable after import still works).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from tqdm import tqdm

from ..structures import gt_label_image
from ..utils.files import atomic_path, safe_name, write_json
from . import synth
from .cache import cache_key, write_cache
from .datasets import (
    FORMATS,
    coco_json_of,
    detect_format,
    load_coco_nucleus_json,
    load_dsb_dataset,
    load_label_image_dataset,
    load_label_image_pairs,
)
from .io import read_image
from .transforms import FastResizeTransform

logger = logging.getLogger(__name__)

__all__ = [
    "NUCLEUS_METADATA",
    "SAMPLE_DIR",
    "dataset_dirname",
    "datasets_root",
    "ensure_synth_dataset",
    "generate_synthetic_data",
    "register_all_builtin",
    "register_by_name",
    "register_datasets_from_cfg",
    "register_nucleus_dataset",
    "register_path_dataset",
    "register_synth_datasets",
    "register_zoomed_dataset",
    "split_zoom",
    "write_zoomed_dataset",
]

NUCLEUS_METADATA: dict[str, Any] = {
    "thing_classes": ["nucleus"],
    "thing_colors": [(0, 220, 90)],
    "evaluator_type": "nucleus",
}
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
DSB2018_SUBDIR = Path("dsb2018") / "stage1_train"
SYNTH_SUBDIR = "nucleus_synth"
SYNTH_PREFIX = "nucleus_synth_"
ZOOM_SUBDIR = "nucleus_zoom"
ZOOM_LIMITS = (0.05, 20.0)
_ZOOM_NAME = re.compile(r"^(?P<base>.+)@x(?P<zoom>\d+(?:\.\d*)?|\.\d+)$")
_SPLIT_STREAMS = {"train": 0, "val": 1}  # separate random streams: val never repeats a train image


def datasets_root() -> Path:
    """``$NUCLEUS_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return Path(os.environ.get("NUCLEUS_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets")


def _load_dsb2018(split: str) -> list[dict]:
    folder = datasets_root() / DSB2018_SUBDIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"DSB-2018 folder {folder} not found: unzip Kaggle's stage1_train.zip (BBBC038) there, or set "
            "NUCLEUS_DATASETS to the folder that holds dsb2018/stage1_train"
        )
    return load_dsb_dataset(folder, split=split)


def synth_params_hash(params: dict[str, Any]) -> str:
    """Short stable hash naming the folder of one synthetic-dataset parameter set."""
    blob = json.dumps(dict(params, generator_version=synth.GENERATOR_VERSION), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` into a hidden temp folder beside ``folder`` and rename it into place, unless
    ``folder`` exists: concurrent DDP ranks or an interrupted run never leave half a dataset, the first
    rename wins and later ones discard their copy."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
            logger.info("%s was completed by another process meanwhile; keeping that one", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_synth_dataset(
    folder: str | os.PathLike, num: int, size: int, style: str, seed: int, stream: int,
    features: Iterable[str] | None = None,
) -> Path:
    """Generate a synthetic dataset (label-image layout: images/ + labels/) into ``folder`` unless it is
    already complete (written aside and renamed into place). The loader's cache is written with the
    images, so the first load needs no parse.
    """
    def build(tmp: Path) -> None:
        logger.info("Generating %d synthetic %s images (%d px) into %s", num, style, size, folder)
        records = synth.write_dataset(tmp, num, size=size, style=style, seed=seed, stream=stream,
                                      features=synth.FEATURES if features is None else features, layout="labels")
        files = [f for r in records for f in (Path(r["file_name"]), tmp / "labels" / f"{r['image_name']}.png")]
        write_cache("labels", tmp, cache_key("labels", tmp, files), records)  # the key a verified load makes

    return _build_once(Path(folder), build)


def register_synth_datasets(
    num_train: int = 200,
    num_val: int = 20,
    size: int = 512,
    style: str = "fluorescence",
    seed: int = 0,
    root: str | os.PathLike | None = None,
    features: Iterable[str] | None = None,
) -> None:
    """(Re)register ``nucleus_synth_train``/``_val`` with these generator parameters.

    The trainer calls this with ``cfg.NUCLEUS.SYNTH.*``. Images are generated on first use into
    ``<root>/nucleus_synth/<param-hash>/{train,val}`` (``root`` defaults to :func:`datasets_root`); train
    and val come from different random streams of the same seed. ``features`` picks the generator's
    version-2 features (default all; see :data:`~nucleus_seg.data.synth.FEATURES`).
    """
    if style not in synth.STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; expected one of {synth.STYLES}")
    for label, value in (("num_train", num_train), ("num_val", num_val), ("size", size)):
        if int(value) != value or value < (1 if label == "size" else 0):
            raise ValueError(f"{label} must be a {'positive' if label == 'size' else 'non-negative'} int")
    if size < 64:
        raise ValueError(f"size {size} is too small for synthetic nuclei; use >= 64")
    chosen = sorted(synth.check_features(synth.FEATURES if features is None else features))
    params = {"num_train": int(num_train), "num_val": int(num_val), "size": int(size), "style": style,
              "seed": int(seed), "features": chosen, "layout": "labels"}  # older DSB-layout sets hash apart
    fixed_root = None if root is None else Path(root)

    def folder_of(split: str) -> Path:
        base = (fixed_root or datasets_root()) / SYNTH_SUBDIR / synth_params_hash(params)
        return base / split

    def make_loader(split: str, num: int):
        def load() -> list[dict]:
            if num == 0:
                return []
            folder = ensure_synth_dataset(folder_of(split), num, size, style, seed, _SPLIT_STREAMS[split],
                                          chosen)
            _write_params(folder.parent, params)
            return load_label_image_dataset(folder)

        return load

    for split, num in (("train", num_train), ("val", num_val)):
        _register(f"nucleus_synth_{split}", make_loader(split, num), dataset_format="labels",
                  synth_params=dict(params, split=split))


def _write_params(folder: Path, params: dict[str, Any]) -> None:
    """Human-readable record of what a hashed folder holds (best effort)."""
    path = folder / "params.json"
    if path.is_file():
        return
    try:
        write_json(path, dict(params, generator_version=synth.GENERATOR_VERSION))
    except OSError as exc:
        logger.debug("Cannot write %s (%s)", path, exc)


def _load_sample() -> list[dict]:
    return load_label_image_pairs([(SAMPLE_DIR / "image.tif", SAMPLE_DIR / "labels.tif")], num_workers=0)


def register_all_builtin() -> None:
    """Register every built-in name (synthetic ones with default parameters)."""
    for split in ("train", "val"):
        _register(f"nucleus_dsb2018_{split}", lambda split=split: _load_dsb2018(split),
                  dataset_format="dsb", split=split)
    register_synth_datasets()
    _register("nucleus_dsb_sample", _load_sample, dataset_format="labels", dataset_root=str(SAMPLE_DIR))


# ---------------------------------------------------------------------------------------------------
# Zoomed views: a model's score at magnifications its test data does not have


def split_zoom(name: str) -> tuple[str, float | None]:
    """``"nucleus_dsb_sample@x0.5"`` -> ``("nucleus_dsb_sample", 0.5)``; a name without ``@xZ`` -> (name, None)."""
    match = _ZOOM_NAME.match(name)
    if not match:
        return name, None
    zoom = float(match["zoom"])
    if not ZOOM_LIMITS[0] <= zoom <= ZOOM_LIMITS[1]:
        raise ValueError(f"{name}: zoom {zoom:g} is outside {ZOOM_LIMITS[0]:g}-{ZOOM_LIMITS[1]:g}")
    return match["base"], zoom


def write_zoomed_dataset(records: Sequence[dict], zoom: float, folder: str | os.PathLike) -> None:
    """Write ``records``' images and instance labels rescaled by ``zoom`` in the label layout (TIFF, dtype
    and channels kept; images area-averaged when shrunk, bilinear when grown, labels nearest)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    stems: set[str] = set()
    for r in tqdm(records, desc=f"zoom x{zoom:g}", disable=len(records) < 20):
        image = read_image(r["file_name"])
        label = gt_label_image(r)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{r['file_name']}: image size {image.shape[:2]} differs from its record's "
                             f"{label.shape}")
        h, w = label.shape
        new_h, new_w = max(1, round(h * zoom)), max(1, round(w * zoom))
        if min(new_h, new_w) < 16:
            raise ValueError(f"{r['file_name']}: x{zoom:g} makes it {new_w}x{new_h} px, too small to score")
        resize = FastResizeTransform(h, w, new_h, new_w)
        dtype = image.dtype
        if dtype not in (np.uint8, np.uint16, np.float32):  # what cv2.resize takes
            image = image.astype(np.float32)
        image = resize.apply_image(image)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            image = np.clip(np.rint(image), info.min, info.max)
        stem = str(r.get("image_name") or Path(r["file_name"]).stem)
        stem = stem if stem not in stems else f"{stem}_{r.get('image_id', len(stems))}"
        stems.add(stem)
        with atomic_path(folder / "images" / f"{stem}.tif") as tmp:
            tifffile.imwrite(tmp, image.astype(dtype, copy=False))
        label = resize.apply_segmentation(label)
        with atomic_path(folder / "labels" / f"{stem}.tif") as tmp:
            tifffile.imwrite(tmp, label.astype(np.uint16 if label.max() < 2**16 else np.uint32))


def register_zoomed_dataset(name: str, base: str, zoom: float) -> None:
    """Register ``name`` as ``base`` (a registered dataset) rescaled by ``zoom``: how a model fares at
    another magnification (Cellpose-style ``diameter`` estimation is meant to hold it). Written on first
    use under ``<root>/nucleus_zoom/``, keyed by the base's files and their stat, so it never goes stale.
    """
    def load() -> list[dict]:
        records = DatasetCatalog.get(base)
        stats = []
        for r in records:
            st = os.stat(r["file_name"])
            stats.append((r["file_name"], st.st_mtime_ns, st.st_size))
        key = hashlib.sha1(json.dumps([base, zoom, stats]).encode()).hexdigest()[:12]
        folder = datasets_root() / ZOOM_SUBDIR / f"x{zoom:g}-{key}"

        def build(tmp: Path) -> None:
            logger.info("Writing %s: %d images of %s rescaled x%g into %s", name, len(records), base, zoom,
                        folder)
            write_zoomed_dataset(records, zoom, tmp)

        return load_label_image_dataset(_build_once(folder, build))

    _register(name, load, dataset_format="labels", zoom_of=base, zoom=zoom)


# ---------------------------------------------------------------------------------------------------
# Registration


def _register(name: str, loader: Callable[[], list[dict]], **metadata: Any) -> None:
    """Register (or replace) ``name`` with the nucleus metadata plus ``metadata``."""
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
            json_file = coco_json_of(root)
            return load_coco_nucleus_json(json_file, image_root or json_file.parent)

        meta = {"dataset_root": str(root), "dataset_format": fmt}
        if root.suffix.lower() == ".json":
            meta["json_file"] = str(root)
            meta["image_root"] = str(image_root or root.parent)
        _register(name, load_coco, **meta)


# ---------------------------------------------------------------------------------------------------
# Names from a config or the command line


def generate_synthetic_data(cfg: CfgNode) -> None:
    """Generate the config's synthetic datasets now, once, with every core.

    Called before launching several local processes: otherwise each one generates the same images at once
    (safe, the first complete copy wins, but N times the CPU work while the GPU waits).
    """
    register_datasets_from_cfg(cfg)
    for name in dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)):
        if name.startswith(SYNTH_PREFIX):
            DatasetCatalog.get(name)


def register_datasets_from_cfg(cfg: CfgNode) -> None:
    """(Re)register the synthetic datasets with cfg.NUCLEUS.SYNTH.* if the config uses them, then
    check that every configured dataset name exists, naming the missing one."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith(SYNTH_PREFIX) for n in names):
        s = cfg.NUCLEUS.SYNTH
        register_synth_datasets(num_train=s.NUM_TRAIN, num_val=s.NUM_VAL, size=s.SIZE, style=s.STYLE,
                                seed=s.SEED, features=s.FEATURES)
    registered = set(DatasetCatalog.list())
    for key, group in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in group:
            if name not in registered and not register_by_name(name, registered):
                nucleus = sorted(n for n in registered if n.startswith("nucleus_"))
                raise KeyError(
                    f"{key} names dataset {name!r}, which is not registered and is no existing folder or "
                    f"COCO JSON file (FOLDER or FOLDER@train / FOLDER@val; NAME@xZ rescales a dataset by Z). "
                    f"Register it with nucleus_seg.data.register_nucleus_dataset(name, folder) before "
                    f"training, or use one of {nucleus}"
                )


def register_by_name(name: str, registered: set[str]) -> bool:
    """Register a dataset its name describes: a path, or ``NAME@xZ`` (NAME registered or a path)."""
    base, zoom = split_zoom(name)
    if zoom is None:
        return register_path_dataset(name)
    if base not in registered and not register_path_dataset(base):
        return False
    register_zoomed_dataset(name, base, zoom)
    return True


def dataset_dirname(name: str) -> str:
    """A folder name for a dataset's outputs; path-named datasets must not write into their own path."""
    return safe_name(name, default="dataset")


def register_path_dataset(name: str) -> bool:
    """Command-line users name data by path: ``/data/stage1_train``, ``/data/stage1_train@val`` (a DSB
    split), ``/data/lab`` (label images) or ``/data/nuclei.json`` register under that very name."""
    root, at, split = name.rpartition("@") if "@" in name else (name, "", "")
    if not at or split not in ("train", "val"):
        root, split = name, ""
    if not Path(root).exists():
        return False
    register_nucleus_dataset(name, root, split=split or None)
    return True


