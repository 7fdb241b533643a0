"""Version and provenance reporting (``--version`` of every entry point)."""

from __future__ import annotations

import importlib.metadata
import logging

import detectron2
import torch

from .._version import __version__

logger = logging.getLogger(__name__)


def detectron2_origin() -> str:
    """'repackaged wheel' for our pure build of sal-detectron2, else the user's own install."""
    try:
        version = importlib.metadata.version("detectron2")
    except importlib.metadata.PackageNotFoundError:
        return "not installed as a distribution (on sys.path)"
    if version.endswith("+pure"):
        return f"{version}, pure-Python wheel repackaged from sal-detectron2 (no _C ops)"
    return f"{version}, your own build"


def version_report() -> str:
    cuda = torch.cuda.is_available()
    gpu = f" ({torch.cuda.get_device_name(0)} x{torch.cuda.device_count()})" if cuda else ""
    return "\n".join([
        f"nucleus_seg {__version__}",
        f"detectron2 {detectron2.__version__} ({detectron2_origin()}) at {detectron2.__path__[0]}",
        f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {cuda}{gpu}",
    ])


def usable_device(requested: str) -> str:
    """``requested`` (a torch device string), or "cpu" with one log line when it names CUDA and this machine
    has none: detectron2's configs default to "cuda", which fails deep inside the model otherwise."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU (MODEL.DEVICE %s -> cpu)", requested)
        return "cpu"
    return requested
