"""Built-in dataset names, registered when ``nucleus_seg`` is imported.

Roots come from ``$NUCLEUS_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``, read when a
dataset is first used (so setting the variable after import still works):

* ``nucleus_dsb2018_train`` / ``nucleus_dsb2018_val``: ``<root>/dsb2018/stage1_train`` split by
  Matterport's validation ids (below), so numbers compare with its nucleus sample.
* ``nucleus_synth_train`` / ``nucleus_synth_val``: generated on first use into
  ``<root>/nucleus_synth/<param-hash>/{train,val}`` (see :func:`register_synth_datasets`).
* ``nucleus_dsb_sample``: the one real DSB image shipped with the package (test use only).
* ``NAME@xZ`` (e.g. ``nucleus_dsb_sample@x0.5``): any dataset with images and labels rescaled by Z, written
  on first use into ``<root>/nucleus_zoom/<hash>`` (see :func:`register_zoomed_dataset`).
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

from .datasets import _register, load_dsb_dataset, load_label_image_dataset, load_label_image_pairs

logger = logging.getLogger(__name__)

__all__ = [
    "DSB2018_VAL_IMAGE_IDS",
    "SAMPLE_DIR",
    "datasets_root",
    "ensure_synth_dataset",
    "register_all_builtin",
    "register_synth_datasets",
    "register_zoomed_dataset",
    "split_zoom",
    "write_zoomed_dataset",
]

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

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
DSB2018_SUBDIR = Path("dsb2018") / "stage1_train"
SYNTH_SUBDIR = "nucleus_synth"
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
    from .synth import GENERATOR_VERSION

    blob = json.dumps(dict(params, generator_version=GENERATOR_VERSION), sort_keys=True)
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
    from .datasets import _cache_key, _write_cache
    from .synth import FEATURES, write_dataset

    def build(tmp: Path) -> None:
        logger.info("Generating %d synthetic %s images (%d px) into %s", num, style, size, folder)
        records = write_dataset(tmp, num, size=size, style=style, seed=seed, stream=stream,
                                features=FEATURES if features is None else features, layout="labels")
        files = [f for r in records for f in (Path(r["file_name"]), tmp / "labels" / f"{r['image_name']}.png")]
        _write_cache("labels", tmp, _cache_key("labels", tmp, files), records)  # the key a verified load makes

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
    from .synth import FEATURES, STYLES, check_features

    if style not in STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; expected one of {STYLES}")
    for label, value in (("num_train", num_train), ("num_val", num_val), ("size", size)):
        if int(value) != value or value < (1 if label == "size" else 0):
            raise ValueError(f"{label} must be a {'positive' if label == 'size' else 'non-negative'} int")
    if size < 64:
        raise ValueError(f"size {size} is too small for synthetic nuclei; use >= 64")
    chosen = sorted(check_features(FEATURES if features is None else features))
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
    """Human-readable record of what a hashed folder holds (best effort, atomic)."""
    path = folder / "params.json"
    if path.is_file():
        return
    tmp = folder / f".params-{uuid.uuid4().hex[:8]}.json"
    try:
        from .synth import GENERATOR_VERSION

        tmp.write_text(json.dumps(dict(params, generator_version=GENERATOR_VERSION), indent=1))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


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
    import tifffile
    from tqdm import tqdm

    from ..evaluation.evaluator import gt_label_image
    from .io import read_image
    from .transforms import FastResizeTransform

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
        tifffile.imwrite(folder / "images" / f"{stem}.tif", image.astype(dtype, copy=False))
        label = resize.apply_segmentation(label)
        tifffile.imwrite(folder / "labels" / f"{stem}.tif",
                         label.astype(np.uint16 if label.max() < 2**16 else np.uint32))


def register_zoomed_dataset(name: str, base: str, zoom: float) -> None:
    """Register ``name`` as ``base`` (a registered dataset) rescaled by ``zoom``: how a model fares at
    another magnification (Cellpose-style ``diameter`` estimation is meant to hold it). Written on first
    use under ``<root>/nucleus_zoom/``, keyed by the base's files and their stat, so it never goes stale.
    """
    from detectron2.data import DatasetCatalog

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
