"""Writing synthetic datasets (DSB layout or images/ + labels/) and preview montages."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ...structures import inner_boundaries, label_image_to_annotations
from ...utils.files import atomic_write
from ..io import normalize_image
from .generator import generate_image
from .scene import FEATURES, check_features, image_rng

# ---------------------------------------------------------------------------------------------------
# Writing datasets and previews


LAYOUTS = ("dsb", "labels")


def _write_png(path: Path, pixels: np.ndarray, params: list[int] | None = None) -> None:
    """A PNG through the one atomic-write helper (a folder nucleus-synth fills is never left with half files)."""
    ok, buf = cv2.imencode(".png", pixels, params or [])
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    atomic_write(path, buf.tobytes())


def sample_image_path(folder: str | os.PathLike, name: str, layout: str = "dsb") -> Path:
    """Where :func:`write_sample` puts a sample's image."""
    if layout == "dsb":
        return Path(folder) / name / "images" / f"{name}.png"
    if layout == "labels":
        return Path(folder) / "images" / f"{name}.png"
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def write_sample(folder: str | os.PathLike, name: str, image: np.ndarray, label: np.ndarray,
                 layout: str = "dsb") -> list[Path]:
    """Write one sample; returns its annotation files.

    ``dsb``: ``<folder>/<name>/images/<name>.png`` and one 1-bit PNG per id in ``masks/`` (in id order, so
    the loader's sorted order is the label order). ``labels``: ``<folder>/images/<name>.png`` and a 16-bit
    label PNG ``<folder>/labels/<name>.png`` (StarDist's layout): two files instead of one per nucleus
    (~175 at 512x512), and creating files is where generation time goes on slow disks.
    """
    image_path = sample_image_path(folder, name, layout)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    _write_png(image_path, pixels)
    if layout == "labels":
        if label.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"{name}: {label.max()} nuclei do not fit a 16-bit label image")
        path = Path(folder) / "labels" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        _write_png(path, label.astype(np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        return [path]
    sample = image_path.parent.parent
    paths: list[Path] = []
    boxes = ndimage.find_objects(label)
    if not boxes:
        return paths
    (sample / "masks").mkdir(exist_ok=True)
    width = max(4, len(str(len(boxes))))
    buf = np.zeros(label.shape, np.uint8)
    bilevel = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1]  # 1-bit: 2x faster to write
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        buf[box] = (label[box] == k) * np.uint8(255)
        path = sample / "masks" / f"{k:0{width}d}.png"
        _write_png(path, buf, bilevel)
        buf[box] = 0
        paths.append(path)
    return paths


def _write_one(job: tuple[Path, str, int, int, int, int, int, str, tuple[str, ...], str]) -> dict:
    """Generate, write and annotate one image (a process-pool task: everything derives from the seed)."""
    out_dir, name, index, size, seed, stream, bit_depth, style, features, layout = job
    image, label = generate_image(image_rng(seed, stream, index), size, style, bit_depth, features)
    write_sample(out_dir, name, image, label, layout)
    return {
        "file_name": str(sample_image_path(out_dir, name, layout)),
        "image_name": name,
        "image_id": index,
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "annotations": label_image_to_annotations(label),
    }


def write_dataset(
    out_dir: str | os.PathLike,
    num: int,
    size: int = 512,
    style: str = "fluorescence",
    seed: int = 0,
    bit_depth: int = 8,
    stream: int = 0,
    preview: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
    features: Iterable[str] = FEATURES,
    layout: str = "dsb",
) -> list[dict]:
    """Generate ``num`` images into an empty/new ``out_dir`` in ``layout`` (see :func:`write_sample`);
    return their dataset dicts (exactly what :func:`~nucleus_seg.data.datasets.load_dsb_dataset` or
    :func:`~nucleus_seg.data.datasets.load_label_image_dataset` reads back). ``preview`` names a PNG
    montage of the first 16 images with mask outlines.

    Writing one PNG per nucleus dominates the cost of the DSB layout (~5 images/s per core), so images are
    spread over ``workers`` processes (default: all cores, at most 16); the output does not depend on it.
    ``features`` as in :func:`generate_image`.
    """
    features = tuple(sorted(check_features(features)))
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pick a new folder for the synthetic dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(num - 1)))
    jobs = [(out_dir, f"synth_s{seed}_{stream}_{i:0{width}d}", i, size, seed, stream, bit_depth, style,
             features, layout) for i in range(num)]
    workers = min(workers or os.cpu_count() or 1, 16, max(num, 1))
    bar = dict(total=num, desc=f"synth {style}", disable=not progress or num < 5)
    if workers > 1 and num >= 8:
        with ProcessPoolExecutor(workers) as pool:
            records = list(tqdm(pool.map(_write_one, jobs, chunksize=4), **bar))
    else:
        records = [_write_one(job) for job in tqdm(jobs, **bar)]
    if preview is not None and records:
        shown = [generate_image(image_rng(seed, stream, i), size, style, bit_depth, features)
                 for i in range(min(num, 16))]
        write_preview(preview, [s[0] for s in shown], [s[1] for s in shown])
    return records


def write_preview(
    path: str | os.PathLike,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    tile: int = 256,
    columns: int = 4,
) -> Path:
    """PNG montage of images (percentile-normalised as the model sees them) with label outlines."""
    tiles = []
    for image, label in zip(images, labels):
        view = normalize_image(image, invert="never")
        view = cv2.resize(view, (tile, tile), interpolation=cv2.INTER_AREA)
        small = cv2.resize(label.astype(np.int32), (tile, tile), interpolation=cv2.INTER_NEAREST)
        view[inner_boundaries(small)] = (255, 60, 60)
        tiles.append(view)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    montage = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(path, cv2.cvtColor(montage, cv2.COLOR_RGB2BGR))
    return path
