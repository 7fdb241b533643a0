"""What every console script shares: ``--version``, config loading with one-line errors, KEY VALUE overrides."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode

from ..config import get_nucleus_cfg
from ..utils.env import version_report

__all__ = ["add_version", "console_parser", "load_config", "split_overrides"]

_CFG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print versions (nucleus_seg, detectron2, torch, "
                         "CUDA) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_report())
        parser.exit()


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version``: print what is installed (and where detectron2 came from), then exit."""
    parser.add_argument("--version", action=_VersionAction)
    return parser


def console_parser(prog: str, doc: str, epilog_from: int = 1) -> argparse.ArgumentParser:
    """A console script's parser from its module text: the first paragraph is the description, paragraphs
    ``epilog_from`` onwards (usage examples, outputs) the epilog, as written; ``--version`` added."""
    return add_version(argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", epilog_from)[epilog_from]))


def split_overrides(inputs: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--input a b MODEL.WEIGHTS w``: argparse gives the overrides to ``--input``; move them back."""
    for i, token in enumerate(inputs):
        if _CFG_KEY.match(token) and not Path(token).exists():
            return inputs[:i], inputs[i:] + opts
    return inputs, opts


def load_config(parser: argparse.ArgumentParser, config_file: str | None, opts: Sequence[str]) -> CfgNode:
    """The config, or ``parser.error`` (exit status 2) with one line naming the file or key at fault."""
    if len(opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {list(opts)}")
    try:
        return get_nucleus_cfg(config_file, opts)
    except Exception as exc:  # noqa: BLE001 - a bad YAML, key or value: say so, no traceback
        parser.error(f"--config-file {config_file}: {exc}")
        raise  # unreachable: parser.error exits
