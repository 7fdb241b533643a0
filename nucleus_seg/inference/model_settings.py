"""Per-forward values of the model's test-time settings: the score floor and the detection caps.

detectron2 keeps them as attributes of the model's modules (the RPN's pre- and post-NMS counts, each box
predictor's score threshold and detections per image), set once from the config. The config's caps are for one
tile of ``NUCLEUS.PREDICT.TILE_SIZE`` px (training crops are that size): a 1024 px image in one pass kept at
most 500 nuclei where the four tiles covering it keep 2000, and dense fields hold more than 500, so an image
larger than a tile was cut silently. Here an input larger than a tile gets the caps in proportion to its area.

:func:`read_settings` takes the values the model has, :func:`wanted_settings` what one forward needs from them
and :func:`apply_settings` sets them; ``NucleusPredictor`` holds them while its forwards run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..modeling.fast_inference import final_box_predictor

__all__ = ["apply_settings", "read_settings", "scaled_cap", "wanted_settings"]

Settings = dict[tuple[object, str], object]  # (module, attribute) -> value


def _box_predictors(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every box predictor whose detections per image count (each Cascade R-CNN stage keeps the attribute)."""
    found = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if found is None:
        return []
    return list(found) if isinstance(found, torch.nn.ModuleList) else [found]


def read_settings(model: torch.nn.Module) -> Settings:
    """The model's current test-time values (what a forward changes and what is restored after it)."""
    values: Settings = {}
    rpn = getattr(model, "proposal_generator", None)
    for attr in ("pre_nms_topk", "post_nms_topk"):
        if isinstance(getattr(rpn, attr, None), dict):
            values[(rpn, attr)] = dict(getattr(rpn, attr))
    for predictor in _box_predictors(model):
        if hasattr(predictor, "test_topk_per_image"):
            values[(predictor, "test_topk_per_image")] = predictor.test_topk_per_image
    last = final_box_predictor(model)
    if hasattr(last, "test_score_thresh"):
        values[(last, "test_score_thresh")] = last.test_score_thresh
    return values


def scaled_cap(cap: int, factor: float) -> int:
    """``cap`` for an input ``factor`` tiles large (no change up to one tile; a negative cap means none)."""
    return cap if cap < 0 or factor <= 1.0 else math.ceil(cap * factor)


def wanted_settings(model: torch.nn.Module, base: Settings, score_thresh: float | None, tiles: float) -> Settings:
    """``base`` changed for one forward: inputs ``tiles`` tiles large get the caps in proportion, and with
    ``score_thresh`` the final predictor keeps scores >= it (detectron2 keeps scores > its threshold)."""
    wanted = dict(base)
    for (module, attr), value in base.items():
        if attr in ("pre_nms_topk", "post_nms_topk"):
            wanted[(module, attr)] = {**value, False: scaled_cap(value[False], tiles)}
        elif attr == "test_topk_per_image":
            wanted[(module, attr)] = scaled_cap(value, tiles)
        elif attr == "test_score_thresh" and score_thresh is not None:
            just_below = float(np.nextafter(np.float32(score_thresh), np.float32(-np.inf)))
            wanted[(module, attr)] = max(value, just_below)
    return wanted


def apply_settings(values: Settings) -> None:
    for (module, attr), value in values.items():
        setattr(module, attr, dict(value) if isinstance(value, dict) else value)
