"""Files the project reads and writes: which suffixes are images, safe names, atomic writes, strict JSON.

Every file nucleus_seg writes goes through :func:`atomic_path` (or its wrappers): a temp file in the same
folder, renamed over the target only when complete, so an interrupted run leaves the old file or the new
one, never half a file.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES", "LABEL_SUFFIXES", "TIFF_SUFFIXES", "atomic_path", "atomic_write", "check_writable",
    "safe_name", "to_json_safe", "write_json",
]

#: Image files nucleus_seg reads (lower case; compare with ``suffix.lower()``).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: Label images and masks: the lossless image formats (JPEG would blur ids into each other).
LABEL_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s not in (".jpg", ".jpeg"))
TIFF_SUFFIXES = (".tif", ".tiff")

_UNSAFE = re.compile(r"[^\w.@-]+")


def safe_name(name: str, max_length: int | None = None, default: str = "unnamed") -> str:
    """A file or folder name for ``name`` (a dataset name may be a path: it must not write into it)."""
    cleaned = _UNSAFE.sub("_", str(name)).strip("_")
    return (cleaned[:max_length] if max_length else cleaned) or default


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def to_json_safe(value: Any) -> Any:
    """Nested results as strict JSON values: numpy/torch scalars as numbers, NaN/inf as None (undefined,
    e.g. AP without ground truth), tuples as lists, dict keys as strings, anything else as its str."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy/torch 0-d
        value = value.item()
        if isinstance(value, (int, bool)):
            return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> Path:
    """``value`` as strict JSON (see :func:`to_json_safe`), atomically; returns the path."""
    atomic_write(path, json.dumps(to_json_safe(value), indent=indent) + "\n")
    return Path(path)


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` and prove a file can be written there, before any compute is spent.

    Raises ``PermissionError``/``OSError`` with one line naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nucleus_seg-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{what} {folder} is not writable ({exc.strerror or exc})") from exc
    return folder
