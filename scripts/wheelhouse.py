#!/usr/bin/env python3
"""Build an offline wheelhouse for an air-gapped GPU node: every wheel nucleus_seg needs, for a target
Python and platform, including the pure detectron2 wheel and nucleus_seg's own.

GPU nodes bring their own CUDA build of torch, so ``--no-torch`` leaves torch/torchvision out; ``--exclude``
leaves out other packages the node already has. ``--pack`` writes one ``.tar.xz`` with the wheels
re-zipped uncompressed inside, which xz then shrinks ~35% below the wheels' own deflate: a smaller
transfer to the node. Install on the node (no network):

    tar xJf wheelhouse.tar.xz && python -m pip install --no-index --find-links wheelhouse nucleus_seg
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = {"torch", "torchvision", "torchaudio", "triton"}
# Pure-Python dependencies published only as sdists: built into wheels here, since a download for
# another platform accepts wheels only.
SDIST_ONLY = ["fvcore>=0.1.5", "antlr4-python3-runtime==4.9.*"]  # the latter for omegaconf 2.x


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_project(path: Path) -> str:
    return _canon(path.name.split("-")[0])


def platform_tags(platform: str) -> list[str]:
    """pip matches --platform exactly, so list every manylinux tag the target glibc accepts."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    major, minor, arch = int(m[1]), int(m[2]), m[3]
    tags = [f"manylinux_{major}_{n}_{arch}" for n in range(minor, 4, -1)]
    if minor >= 17:
        tags.append(f"manylinux2014_{arch}")
    if minor >= 12:
        tags.append(f"manylinux2010_{arch}")
    return [*tags, f"manylinux1_{arch}"]


def _requirement_name(req: str) -> str:
    """The canonical project name of a requirement string such as ``setuptools<81``."""
    return _canon(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])


def requirements(no_torch: bool) -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    if no_torch:
        reqs = [r for r in reqs if _requirement_name(r) not in TORCH]
    return reqs


def capped_exclusions(excluded: set[str], reqs: list[str]) -> list[str]:
    """The requirements an ``--exclude`` drops although nucleus_seg caps their version (``<``, ``==``, ``~=``):
    the node's own copy may be newer, and then the offline install fails (setuptools 81 did, 2026-12-02)."""
    return [r for r in reqs if _requirement_name(r) in excluded and re.search(r"<|==|~=", r.split(";")[0])]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: command failed: {' '.join(cmd)}")


def pack(out: Path) -> Path:
    """Re-zip wheels uncompressed (contents and RECORD unchanged) and xz the folder."""
    archive = out.with_name(out.name + ".tar.xz")
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for wheel in sorted(out.glob("*.whl")):
            stored = wheel.with_suffix(".stored")
            with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zout:
                for info in zin.infolist():
                    zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_STORED)
            tar.add(stored, arcname=f"{out.name}/{wheel.name}")
            stored.unlink()
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="target Python version, e.g. 3.12")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64", help="target platform tag")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "wheelhouse")
    parser.add_argument("--no-torch", action="store_true", help="leave torch/torchvision out (node has its own)")
    parser.add_argument("--exclude", default="", help="comma-separated projects the node already has")
    parser.add_argument("--constraint", type=Path, help="pip constraints for the download (e.g. opencv<5)")
    parser.add_argument("--pack", action="store_true", help="also write OUT.tar.xz for transfer")
    args = parser.parse_args(argv)
    excluded = {_canon(x) for x in args.exclude.split(",") if x.strip()}
    capped = capped_exclusions(excluded, requirements(False))
    if capped:
        parser.error(f"--exclude drops {', '.join(capped)}: nucleus_seg caps the version, a node's newer copy "
                     "fails the offline install; leave it in the wheelhouse")

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    d2_dir = ROOT / "build" / "wheels"
    run([sys.executable, str(ROOT / "scripts" / "build_detectron2_wheel.py"), "--out", str(d2_dir)])
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)])
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), *SDIST_ONLY])
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(out),
           "--python-version", args.python, "--implementation", "cp", "--find-links", str(d2_dir),
           "--find-links", str(out)]
    for tag in platform_tags(args.platform):
        cmd += ["--platform", tag]
    if args.constraint:
        cmd += ["-c", str(args.constraint)]
    run(cmd + requirements(args.no_torch))
    excluded |= TORCH if args.no_torch else set()
    for wheel in out.glob("*.whl"):
        if _wheel_project(wheel) in excluded:
            wheel.unlink()
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {out}")
    if args.pack:
        archive = pack(out)
        print(f"packed: {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    print(f"install offline: python -m pip install --no-index --find-links {out.name} nucleus_seg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
