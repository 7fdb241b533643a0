"""Nucleus datasets: readers (:mod:`.io`), loaders (:mod:`.datasets`), every registered name (:mod:`.catalog`),
the training mapper and augmentations (:mod:`.mapper`, :mod:`.transforms`) and the generator (:mod:`.synth`).

Importing this package registers the built-in dataset names in detectron2's DatasetCatalog.
"""

from .catalog import (
    NUCLEUS_METADATA,
    datasets_root,
    register_all_builtin,
    register_nucleus_dataset,
    register_synth_datasets,
)
from .datasets import (
    DSB2018_VAL_IMAGE_IDS,
    load_coco_nucleus_json,
    load_dsb_dataset,
    load_label_image_dataset,
    load_label_image_pairs,
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
