"""Logging for the command-line tools: short lines on the terminal, everything in ``OUTPUT_DIR/log.txt``.

detectron2's ``setup_logger`` prints the environment table, the full config and the model architecture
(~1,000 lines, with colour codes even when piped) before the first progress line, and lets third-party
notices through that mean nothing to a user. Here the terminal gets nucleus_seg's and detectron2's
INFO lines without those dumps (they go to the log file, and the config and model to their own files),
colour only on a terminal, and known import-time notices of detectron2 and torch are silenced.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

__all__ = ["HIDDEN_ON_CONSOLE", "quiet_known_warnings", "setup_logging"]

OURS = ("detectron2", "fvcore", "nucleus_seg", "d2.", "nucleus.")
#: Log messages that go to the log file only (their content is in config.yaml, model.txt or metrics.json).
HIDDEN_ON_CONSOLE = (
    "Environment info:", "Command line arguments:", "Contents of args.config_file", "Running with full config",
    "Full config saved to", "Model:\n", "copypaste:", "Rank of current process",
)
_TAG = "_nucleus_seg_handler"


def quiet_known_warnings() -> None:
    """Silence notices raised inside detectron2 and torch that a user can neither act on nor needs:
    detectron2's ``@torch.jit.script`` functions, its ``torch.meshgrid`` call, torch.fx's tracing note, and
    the "No CUDA runtime is found" line torch prints when a CUDA build runs on a CPU machine."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    for name in ("torch.fx._symbolic_trace", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is now (test runners swap it per test)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is FloatingPointError:
            return False  # a diverged run: nucleus-train explains it without detectron2's traceback
        if record.levelno >= logging.WARNING:
            return True
        return record.name.startswith(OURS) and not record.getMessage().startswith(HIDDEN_ON_CONSOLE)


class _OursFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith(OURS)


def _short_name(name: str) -> str:
    return name.replace("detectron2.", "d2.").replace("nucleus_seg.", "")


class _Formatter(logging.Formatter):
    def __init__(self, color: bool):
        super().__init__("[%(asctime)s %(short)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        record.short = _short_name(record.name)
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            prefix = "WARNING" if record.levelno == logging.WARNING else "ERROR"
            text = f"\x1b[31m{prefix}\x1b[0m {text}" if self.color else f"{prefix} {text}"
        return text


def setup_logging(output_dir: str | os.PathLike | None = None, rank: int = 0, console: bool = True) -> None:
    """Log nucleus_seg, detectron2 and fvcore: INFO to stderr (rank 0; others WARNING only), DEBUG and the
    dumps to ``output_dir/log.txt`` (``log.txt.rankN`` for other ranks). Calling it again replaces the
    handlers it added before."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    for name in ("detectron2", "fvcore", "nucleus_seg"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.propagate = True
        for handler in [h for h in logger.handlers if type(h).__module__.startswith("detectron2")]:
            logger.removeHandler(handler)  # an earlier detectron2 setup_logger's: one copy of each line
    handlers: list[logging.Handler] = []
    if console:
        stderr = _CurrentStderr()
        stderr.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        stderr.addFilter(_ConsoleFilter())
        stderr.setFormatter(_Formatter(color=sys.stderr.isatty()))
        handlers.append(stderr)
    if output_dir:
        path = Path(output_dir) / ("log.txt" if rank == 0 else f"log.txt.rank{rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path, mode="a", encoding="utf-8")
        file.setLevel(logging.DEBUG)
        file.addFilter(_OursFilter())
        file.setFormatter(_Formatter(color=False))
        handlers.append(file)
    for handler in handlers:
        setattr(handler, _TAG, True)
        root.addHandler(handler)
