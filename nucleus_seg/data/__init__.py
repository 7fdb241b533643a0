"""Nucleus datasets: loaders, registration in DatasetCatalog, the mapper and the synthetic generator.

Importing this package registers the built-in dataset names (see :mod:`nucleus_seg.data.builtin`).
"""

from .builtin import DSB2018_VAL_IMAGE_IDS, datasets_root, register_all_builtin, register_synth_datasets
from .datasets import (
    NUCLEUS_METADATA,
    load_coco_nucleus_json,
    load_dsb_dataset,
    load_label_image_dataset,
    load_label_image_pairs,
    register_nucleus_dataset,
)

__all__ = [
    "DSB2018_VAL_IMAGE_IDS",
    "NUCLEUS_METADATA",
    "datasets_root",
    "load_coco_nucleus_json",
    "load_dsb_dataset",
    "load_label_image_dataset",
    "load_label_image_pairs",
    "register_nucleus_dataset",
    "register_synth_datasets",
]

register_all_builtin()
