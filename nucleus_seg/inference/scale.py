"""The input scale: a nucleus diameter given by the user, or estimated from the model's own passes.

Models trained with ``INPUT.NUCLEUS.SCALE_TO_DIAMETER`` know one size band (``NUCLEUS.PREDICT.TRAIN_DIAMETER``),
so an image is rescaled by ``TRAIN_DIAMETER / diameter`` before it reaches them. ``"auto"`` estimates the
diameter as Cellpose does: the median size of the confident instances of a first pass.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch

from ..data.transforms import median_diameter
from .masks import Detections

__all__ = ["Diameter", "auto_scale", "diameter_to_scale", "found_diameter", "parse_diameter", "refine_scale"]

logger = logging.getLogger(__name__)

Diameter = Union[float, str, None]
AUTO_SCALE_RANGE = (0.25, 4.0)  # an estimated diameter further off than this is more likely wrong
RESCALE_TOLERANCE = 0.05  # an auto scale this close to 1 reuses the first pass
# "auto" for models that know one size band: nuclei far from it are found poorly, so the estimate is
# refined from the rescaled pass (at most AUTO_MAX_PASSES in all), and a pass with no confident nucleus
# is retried at these scales before giving up
AUTO_REFINE_TOLERANCE = 0.1
AUTO_MAX_PASSES = 3
AUTO_PROBE_SCALES = (2.0, 0.5)


def diameter_to_scale(diameter: float, train_diameter: float) -> float:
    """Input rescale factor that makes nuclei of ``diameter`` px look like training ones."""
    if diameter <= 0 or train_diameter <= 0:
        return 1.0
    return train_diameter / diameter


def parse_diameter(value: Diameter) -> float | None:
    """A diameter in px from a number or a string; None for "auto" (and for the config's -1); 0 means the
    image is used as it is. Anything else is a ``ValueError`` saying what is accepted."""
    rule = f"diameter must be a number of pixels, 0 (no rescale) or 'auto', got {value!r}"
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(rule) from None
    value = float(value)
    if value == -1:
        return None
    if value < 0 or value != value:
        raise ValueError(rule)
    return value


def found_diameter(dets: Sequence[Detections], thresh: float) -> float | None:
    """Median diameter (input px) of the instances scoring at least ``thresh``; None when there are none."""
    areas = [d.windows[d.scores >= thresh].sum(dim=(1, 2)) for d in dets]
    return median_diameter(torch.cat(areas).cpu().numpy() if areas else np.zeros(0))


def auto_scale(found: float, train_diameter: float) -> float:
    """The scale for an estimated diameter, clipped to ``AUTO_SCALE_RANGE`` with a warning."""
    scale = diameter_to_scale(found, train_diameter)
    lo, hi = AUTO_SCALE_RANGE
    if not lo <= scale <= hi:
        warnings.warn(f"diameter 'auto': estimated {found:.1f} px, rescale x{scale:.2f} clipped to "
                      f"[{lo}, {hi}]; pass the diameter explicitly", UserWarning, stacklevel=4)
        scale = min(max(scale, lo), hi)
    logger.info("estimated nucleus diameter %.1f px, rescaling by %.3f", found, scale)
    return scale


def refine_scale(run_pass: Callable[[float], list[Detections]], dets: list[Detections], thresh: float,
                 train_diameter: float) -> tuple[float, list[Detections]]:
    """'auto' (Cellpose-style): the median diameter of the confident instances sets the scale.

    A model trained on one size band finds nuclei far from it poorly, so the estimate is refined from the
    rescaled pass, and a pass without confident nuclei is retried at AUTO_PROBE_SCALES; at most
    AUTO_MAX_PASSES passes in all. ``run_pass(scale)`` predicts at a scale. Returns (scale, detections at it).
    """
    first = dets
    used, passes, best = 1.0, 1, None
    probes = list(AUTO_PROBE_SCALES)
    while True:
        found = found_diameter(dets, thresh)
        if found is not None:
            best, probes = (used, dets), []
            want = auto_scale(found, train_diameter)
            if abs(want / used - 1.0) <= (RESCALE_TOLERANCE if passes == 1 else AUTO_REFINE_TOLERANCE):
                break
        elif probes:
            want = probes.pop(0)
        else:
            break
        if passes == AUTO_MAX_PASSES:
            break
        used, dets, passes = want, run_pass(want), passes + 1
    if best is None:
        warnings.warn("diameter 'auto': no confident nuclei at any probed scale; not rescaling",
                      UserWarning, stacklevel=4)
        return 1.0, first
    return best
