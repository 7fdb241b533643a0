"""A JSON cache of parsed dataset dicts: parsing ~29k DSB mask PNGs takes a while, reading JSON does not.

The key is every file's relative path, size and mtime (any added, removed or rewritten file misses the
cache). The cache lives in the dataset root when it is writable, else under ``~/.cache/nucleus_seg``, and
is written atomically, so a reader never sees half a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from detectron2.structures import BoxMode

from ..utils.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["CACHE_VERSION", "cache_key", "cache_paths", "cached", "write_cache"]

# Bump when the record layout or parsing rules change: old caches then miss instead of lying.
CACHE_VERSION = 1
CACHE_PREFIX = ".nucleus_seg_cache"


def cache_key(fmt: str, root: Path, files: Iterable[Path]) -> str:
    """sha1 of every file's relative path, size and mtime: any change to the dataset misses the cache."""
    h = hashlib.sha1(f"{fmt}:{CACHE_VERSION}".encode())
    for path in files:
        st = path.stat()
        h.update(f"\0{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nucleus_seg"


def cache_paths(fmt: str, root: Path) -> list[Path]:
    """Where a cache may live: the dataset root first, the user cache as fallback."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / f"{CACHE_PREFIX}_{fmt}.json", _user_cache_dir() / f"{fmt}_{digest}.json"]


def _read_cache(fmt: str, root: Path, key: str) -> list[dict] | None:
    for path in cache_paths(fmt, root):
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


def write_cache(fmt: str, root: Path, key: str, records: Sequence[dict]) -> Path | None:
    """Write the records' cache where it can be written (atomically); None if nowhere."""
    payload = json.dumps({"key": key, "version": CACHE_VERSION, "records": _records_to_json(records, root)})
    for path in cache_paths(fmt, root):
        try:
            atomic_write(path, payload)
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
    for r in records:
        r["file_name"] = str(root / r["file_name"])
        for a in r["annotations"]:
            a["bbox_mode"] = BoxMode(a["bbox_mode"])
    return records


def cached(
    fmt: str, root: Path, files: list[Path], parse: Callable[[], list[dict]], cache: bool
) -> list[dict]:
    """The records of ``files`` from the cache when none changed, else ``parse()``d and cached."""
    if not cache:
        return parse()
    key = cache_key(fmt, root, files)
    records = _read_cache(fmt, root, key)
    if records is None:
        records = parse()
        write_cache(fmt, root, key, records)
    return records

