"""nucleus_seg: Mask R-CNN (R101-FPN) nucleus instance segmentation as a Detectron2 plugin.

Importing the package registers the built-in nucleus datasets in detectron2's DatasetCatalog. The names a
user needs first are here: ``get_nucleus_cfg``, ``read_image`` and ``NucleusPredictor``.
"""

from .utils.logs import quiet_known_warnings

quiet_known_warnings()  # before detectron2 is imported: its import raises some of them

from . import data  # noqa: E402,F401  (registers the built-in datasets)
from ._version import __version__  # noqa: E402
from .config import add_nucleus_config, get_nucleus_cfg  # noqa: E402
from .data.io import read_image, read_label_image  # noqa: E402
from .inference.predictor import NucleusPredictor  # noqa: E402

__all__ = ["NucleusPredictor", "__version__", "add_nucleus_config", "get_nucleus_cfg", "read_image",
           "read_label_image"]
