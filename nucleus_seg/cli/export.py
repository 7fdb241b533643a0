"""``nucleus-export``: write a trained model as TorchScript, ONNX and/or a bioimage.io package that run
without detectron2, with the numpy runner (``nucleus_runner.py``) beside them.

    nucleus-export --config-file CFG --format torchscript,onnx,bioimageio --output DIR [--opset N]
                   [--score-floor S] MODEL.WEIGHTS model.pth [KEY VALUE ...]

Status 2: bad command line, config or checkpoint (one line naming it); 1: the export failed its check.
"""

from __future__ import annotations

import argparse
import sys

from ..export.api import FORMATS, export_model
from ..export.network import ExportCheckError, ExportError
from ..utils.logs import setup_logging
from .common import console_parser, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = console_parser("nucleus-export", __doc__)
    parser.add_argument("--config-file", required=True, help="YAML config (a bundled one by name, or a path)")
    parser.add_argument("--format", required=True, help=f"comma list of {', '.join(FORMATS)}")
    parser.add_argument("--output", required=True, help="output folder (created)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 17, at least 16)")
    parser.add_argument("--score-floor", type=float, help="lowest score the exported graph keeps; the runner "
                        "can raise it, not lower it (default NUCLEUS.PREDICT.SCORE_THRESH)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    setup_logging()
    cfg = load_config(parser, args.config_file, args.opts)
    try:
        meta = export_model(cfg, args.output, formats, opset=args.opset, score_floor=args.score_floor)
    except (ExportError, OSError) as exc:
        print(f"nucleus-export: error: {exc}", file=sys.stderr)
        return 2
    except ExportCheckError as exc:
        print(f"nucleus-export: error: {exc}", file=sys.stderr)
        return 1
    written = ", ".join(sorted(meta["weights"].values()))
    print(f"nucleus-export: wrote {written} and nucleus_runner.py to {args.output}", file=sys.stderr)
    if "bioimageio" in meta:
        print(f"nucleus-export: bioimage.io package in {meta['bioimageio']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
