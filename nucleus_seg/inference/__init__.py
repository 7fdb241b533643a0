"""Inference: ``NucleusPredictor`` (:mod:`.predictor`) with its input scale (:mod:`.scale`), mask windows
(:mod:`.masks`), flip TTA (:mod:`.tta`) and tiling (:mod:`.tiling`); output writers (:mod:`.outputs`),
folder prediction (:mod:`.batch`) and the classical watershed baseline (:mod:`.baseline`)."""

from .predictor import NucleusPredictor

__all__ = ["NucleusPredictor"]
