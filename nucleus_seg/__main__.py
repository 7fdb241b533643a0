"""``python -m nucleus_seg --version``: what is installed, and where detectron2 came from."""

from __future__ import annotations

import argparse

from .cli.common import add_version
from .utils.env import version_report


def main(argv: list[str] | None = None) -> int:
    parser = add_version(argparse.ArgumentParser(prog="python -m nucleus_seg", description=__doc__))
    parser.parse_args(argv)
    print(version_report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
