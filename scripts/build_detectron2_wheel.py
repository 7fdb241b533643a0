#!/usr/bin/env python3
"""Build a pure-Python ``detectron2`` wheel from the PyPI artefact ``sal-detectron2==0.7.2``.

detectron2 is not published on PyPI. ``sal-detectron2`` is a wheel of upstream detectron2 main
(mid-2024, Apache-2.0), mis-tagged ``cp310-none-any``, with a cp310-only ``_C`` extension and a stray
top-level ``tools`` package. Everything nucleus_seg uses is pure Python, so we repackage it:
drop ``_C*.so`` and ``tools/``, rename to ``detectron2``, version ``0.7.2+pure``, tag
``py3-none-any``, relax the ``numpy<2`` pin, add the runtime deps the artefact forgot (fvcore, iopath),
and write a correct RECORD. Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE_NAME = "sal-detectron2"
SOURCE_VERSION = "0.7.2"
SOURCE_FILE = "sal_detectron2-0.7.2-cp310-none-any.whl"
SOURCE_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
VERSION = "0.7.2+pure"
WHEEL_NAME = f"detectron2-{VERSION}-py3-none-any.whl"
DIST_INFO = f"detectron2-{VERSION}.dist-info"

# Runtime requirements of the pure-Python package. Versus the artefact: numpy unpinned (detectron2
# runs on numpy 2), fvcore/iopath added (imported everywhere, missing from the artefact's metadata),
# black/hydra-core dropped (only LazyConfig pretty-printing uses black; nothing imports hydra).
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "numpy",
    "omegaconf>=2.1,<2.4",
    "packaging",
    "fvcore>=0.1.5",
    "iopath>=0.1.7",
]

FROM_SOURCE_HELP = (
    "Install detectron2 from source instead (needs a C++ compiler and a matching torch):\n"
    "    pip install 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "then rerun the set-up; it keeps a detectron2 that already imports."
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def download_source(dest: Path) -> Path:
    """Fetch the artefact with pip (the only network path we rely on)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.10", "--implementation", "cp", "--abi", "none",
        "--platform", "any", f"{SOURCE_NAME}=={SOURCE_VERSION}", "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SOURCE_FILE
    if proc.returncode != 0 or not path.exists():
        sys.exit(
            f"error: could not download {SOURCE_NAME}=={SOURCE_VERSION} from the package index:\n"
            f"{proc.stderr.strip()[-2000:]}\n\n{FROM_SOURCE_HELP}"
        )
    return path


def _metadata(original: str) -> str:
    body = original.split("\n\n", 1)[1] if "\n\n" in original else ""
    lines = [
        "Metadata-Version: 2.1",
        "Name: detectron2",
        f"Version: {VERSION}",
        "Summary: Detectron2 (upstream main, mid-2024) repackaged as pure Python without its _C "
        f"extension, from {SOURCE_NAME}=={SOURCE_VERSION}, by nucleus_seg",
        "Home-page: https://github.com/facebookresearch/detectron2",
        "Author: FAIR",
        "License: Apache-2.0",
        "Requires-Python: >=3.8",
        "License-File: LICENSE",
        *[f"Requires-Dist: {req}" for req in REQUIRES],
    ]
    return "\n".join(lines) + "\n\n" + body


def repackage(source: Path, out_dir: Path) -> Path:
    """Write the pure wheel into ``out_dir`` and return its path."""
    if _sha256(source) != SOURCE_SHA256:
        sys.exit(f"error: {source} has sha256 {_sha256(source)}, expected {SOURCE_SHA256}; refusing it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / WHEEL_NAME
    old_info = f"sal_detectron2-{SOURCE_VERSION}.dist-info/"
    records: list[str] = []
    buf = io.BytesIO()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zout:

        def add(name: str, data: bytes) -> None:
            zout.writestr(zipfile.ZipInfo(name, date_time=(2024, 8, 2, 0, 0, 0)), data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")

        for info in sorted(zin.infolist(), key=lambda i: i.filename):
            name = info.filename
            if name.endswith("/") or name.startswith(("tools/", old_info)):
                continue
            if name.startswith("detectron2/_C") and name.endswith(".so"):
                continue
            add(name, zin.read(name))
        add(f"{DIST_INFO}/LICENSE", zin.read(old_info + "LICENSE"))
        add(f"{DIST_INFO}/METADATA", _metadata(zin.read(old_info + "METADATA").decode()).encode())
        wheel = "Wheel-Version: 1.0\nGenerator: nucleus_seg build_detectron2_wheel\n"
        add(f"{DIST_INFO}/WHEEL", (wheel + "Root-Is-Purelib: true\nTag: py3-none-any\n").encode())
        add(f"{DIST_INFO}/top_level.txt", b"detectron2\n")
        record_name = f"{DIST_INFO}/RECORD"
        records.append(f"{record_name},,")
        zout.writestr(zipfile.ZipInfo(record_name, date_time=(2024, 8, 2, 0, 0, 0)), "\n".join(records) + "\n")
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(target)  # atomic: an interrupted build leaves no half wheel behind
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/wheels"), help="folder for the wheel")
    parser.add_argument("--source", type=Path, help=f"an already downloaded {SOURCE_FILE}")
    args = parser.parse_args(argv)
    existing = args.out / WHEEL_NAME
    if existing.exists() and args.source is None:
        print(existing)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or download_source(Path(tmp))
        print(repackage(source, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
