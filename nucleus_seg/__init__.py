"""nucleus_seg: Mask R-CNN (R101-FPN) nucleus instance segmentation as a Detectron2 plugin.

Importing the package registers the built-in nucleus datasets in detectron2's DatasetCatalog. The names a
user needs first are here: ``get_nucleus_cfg``, ``read_image`` and ``NucleusPredictor``.
"""

from . import data  # noqa: F401  (registers the built-in datasets)
from ._version import __version__
from .config import add_nucleus_config, get_nucleus_cfg
from .data.io import read_image, read_label_image
from .inference.predictor import NucleusPredictor

__all__ = ["NucleusPredictor", "__version__", "add_nucleus_config", "get_nucleus_cfg", "read_image",
           "read_label_image"]
