"""The synthetic nucleus generator: images with exact instance labels, the default training data.

:mod:`.generator` documents what it draws and how it was compared with real microscopy; :mod:`.scene`
(per-image parameters), :mod:`.render` (painting nuclei) and :mod:`.files` (writing datasets) do the work.
"""

from .files import LAYOUTS, sample_image_path, write_dataset, write_preview, write_sample
from .generator import generate_image
from .scene import FEATURES, GENERATOR_VERSION, MIN_LABEL_AREA, STYLES, check_features, image_rng

__all__ = [
    "FEATURES", "GENERATOR_VERSION", "LAYOUTS", "MIN_LABEL_AREA", "STYLES", "check_features", "generate_image",
    "image_rng", "sample_image_path", "write_dataset", "write_preview", "write_sample",
]
