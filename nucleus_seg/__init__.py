"""nucleus_seg: Mask R-CNN (R101-FPN) nucleus instance segmentation as a Detectron2 plugin.

Importing the package registers the built-in nucleus datasets in detectron2's DatasetCatalog.
"""

__version__ = "0.1.0"

from . import data  # noqa: E402,F401  (registers datasets)
