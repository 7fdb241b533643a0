"""The input scale: a nucleus diameter given by the user, or estimated from the model's own passes.

Models trained with ``INPUT.NUCLEUS.SCALE_TO_DIAMETER`` know one size band (``NUCLEUS.PREDICT.TRAIN_DIAMETER``),
so an image is rescaled by ``TRAIN_DIAMETER / diameter`` before it reaches them. ``"auto"`` estimates the
diameter as Cellpose does: the median size of the confident instances of a first pass.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import cv2
import numpy as np
import torch
from scipy import ndimage

from ..data.transforms import median_diameter
from .masks import Detections

__all__ = ["Diameter", "ScaleChoice", "choose_scale", "diameter_to_scale", "found_diameter", "image_diameter",
           "parse_diameter", "parse_diameter_um"]

logger = logging.getLogger(__name__)

Diameter = Union[float, str, None]
# "auto" for models that know one size band: a pass is trusted when the nuclei it finds, at the scale it ran,
# are about the training size (within CONSISTENT x), and the image's own blob size (image_diameter) is
# asked too, so one confident but wrong pass (texture read as nuclei at 5x the training size) is not the end
CONSISTENT = 1.35
RESCALE_TOLERANCE = 0.05  # a scale this close to one already run reuses that pass
REFINE_TOLERANCE = 0.1  # a chosen pass this close to its own estimate is not run again
AUTO_MAX_PASSES = 5
AUTO_PROBE_SCALES = (2.0, 0.5)  # tried when no pass found anything and the image gives no size either
SCALE_LIMITS = (1 / 16, 16.0)  # beyond this the estimate is refused as implausible, with a warning
# a pass whose confident instances are mostly noise (the significance rule would drop more than this share) found
# no nuclei: at a scale that magnifies camera noise into blobs, their size says nothing about the image's nuclei
NOISE_PASS_SHARE = 0.5


@dataclass
class ScaleChoice:
    """What "auto" decided for one image: the model-input scale, the diameter it implies (input px; None when
    nothing was found), the image-only estimate, whether the passes agreed, and every (scale, found) tried."""

    scale: float
    diameter: float | None
    image_diameter: float | None
    sure: bool
    tried: list[tuple[float, float | None]] = field(default_factory=list)


def diameter_to_scale(diameter: float, train_diameter: float) -> float:
    """Input rescale factor that makes nuclei of ``diameter`` px look like training ones."""
    if diameter <= 0 or train_diameter <= 0:
        return 1.0
    return train_diameter / diameter


_MICROMETRES = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(um|\u00b5m|\u03bcm|microns?)\s*$",
                          re.IGNORECASE)


def parse_diameter_um(value: Diameter) -> float | None:
    """The micrometres of a diameter written with its unit ("8um", "8 µm", "8 micron"), else None. Only
    ``nucleus-predict`` takes one: it reads each file's pixel size."""
    found = _MICROMETRES.match(value) if isinstance(value, str) else None
    if found is None:
        return None
    um = float(found.group(1))
    if not um > 0:
        raise ValueError(f"a diameter in micrometres must be above 0, got {value!r}")
    return um


def parse_diameter(value: Diameter) -> float | None:
    """A diameter in px from a number or a string; None for "auto" (and for the config's -1); 0 means the
    image is used as it is. Anything else is a ``ValueError`` saying what is accepted."""
    rule = f"diameter must be a number of pixels, 0 (no rescale) or 'auto', got {value!r}"
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        if parse_diameter_um(value) is not None:
            raise ValueError(f"{rule}: a diameter in micrometres needs the image's pixel size, which an array "
                             "does not carry (nucleus-predict reads it from each file); divide it by the pixel size")
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


def image_diameter(gray: np.ndarray, max_side: int = 1024) -> float | None:
    """Nucleus diameter (px) from the image alone: the characteristic scale of its bright blobs.

    Scale-normalised Laplacian of Gaussian over sigmas of 1-64 px; each strong blob centre votes with the
    sigma where its response peaks (a disk of radius r peaks at r/sqrt(2)), weighted by that response; the
    weighted median vote gives the diameter. Needs no model, so it holds where a model trained on one size
    band is lost (measured on the real sample rescaled x0.25-x5: within 0.80-1.14 of the labels' median).
    Large images are estimated on a downscaled copy, small nuclei there on a full-resolution centre crop.
    """
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim == 3:
        gray = gray.max(axis=2)
    factor = max(1.0, max(gray.shape) / max_side)
    if factor > 1:
        small = cv2.resize(gray, (max(8, round(gray.shape[1] / factor)), max(8, round(gray.shape[0] / factor))),
                           interpolation=cv2.INTER_AREA)
        found = _log_diameter(small)
        if found is not None and found >= 12:
            return found * factor
        y0, x0 = max(0, (gray.shape[0] - max_side) // 2), max(0, (gray.shape[1] - max_side) // 2)
        gray = gray[y0:y0 + max_side, x0:x0 + max_side]
    return _log_diameter(gray)


SIGMAS = 2.0 ** np.arange(0, 6.01, 0.25)  # the blob scales image_diameter looks at: 1-64 px
NOISE_K = 8.0  # a blob response counts only above this many times what the local noise alone would give


def _log_responses(g: np.ndarray) -> np.ndarray:
    """Scale-normalised LoG responses (len(SIGMAS), H, W), each sigma on a pyramid level where it is 1-3 px."""
    responses = []
    for sigma in SIGMAS:
        step = max(1, int(sigma // 2))
        level = g if step == 1 else cv2.resize(g, (max(4, g.shape[1] // step), max(4, g.shape[0] // step)),
                                               interpolation=cv2.INTER_AREA)
        s = sigma / step
        response = -cv2.Laplacian(cv2.GaussianBlur(level, (0, 0), s), cv2.CV_32F) * s * s
        if step > 1:
            response = cv2.resize(response, (g.shape[1], g.shape[0]), interpolation=cv2.INTER_LINEAR)
        responses.append(response)
    return np.stack(responses)


@functools.cache
def _unit_noise_response() -> np.ndarray:
    """Standard deviation of each sigma's response to white noise of standard deviation 1 (measured once)."""
    noise = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    return np.asarray([float(r.std()) for r in _log_responses(noise)], np.float32)


def _local_noise(g: np.ndarray) -> np.ndarray:
    """Per-pixel noise standard deviation from the Laplacian's local energy (white noise: sqrt(20) x its std;
    edges and texture count as noise too, which only makes the test below stricter)."""
    laplacian = cv2.Laplacian(g, cv2.CV_32F)
    return np.sqrt(cv2.GaussianBlur(laplacian * laplacian, (0, 0), 8.0) / 20.0)


def _log_diameter(gray: np.ndarray) -> float | None:
    """The weighted median blob scale. Responses the local noise alone could give are dropped first: under shot
    noise at SNR 5 the speckles outvoted the nuclei (synthetic fields: median estimate 0.21x the labels'
    diameter; with the noise test it equals the clean field's estimate on 16 of 22, and clean fields keep theirs)."""
    span = float(gray.max() - gray.min())
    if span <= 0:
        return None
    g = (gray - gray.min()) / span
    stack = _log_responses(g)
    noise_floor = NOISE_K * _local_noise(g)[None] * _unit_noise_response()[:, None, None]
    stack = np.where(stack > noise_floor, stack, 0.0)
    strongest = stack.max(axis=0)
    centres = (strongest == ndimage.maximum_filter(strongest, size=3)) & (
        strongest > max(float(np.percentile(strongest, 97)), 0.02))
    if not centres.any():
        return None
    votes, weights = SIGMAS[stack.argmax(axis=0)[centres]], strongest[centres]
    order = np.argsort(votes)
    cumulative = np.cumsum(weights[order])
    sigma = votes[order][np.searchsorted(cumulative, cumulative[-1] / 2)]
    return float(2 * math.sqrt(2) * sigma)


def _agree(a: float, b: float) -> bool:
    return abs(math.log(a / b)) <= math.log(CONSISTENT)


def _consistent(scale: float, found: float | None, train_diameter: float) -> bool:
    """A pass at ``scale`` that found nuclei of ``found`` input px saw them at about the training size."""
    return found is not None and abs(math.log(found * scale / train_diameter)) <= math.log(CONSISTENT)


def _found_text(scale: float, diameter: float | None, noisy: set[float]) -> str:
    return "only noise" if scale in noisy else "nothing" if diameter is None else f"{diameter:.1f} px"


def choose_scale(run_pass: Callable[[float], list[Detections]], first: list[Detections], thresh: float,
                 train_diameter: float, image_d: float | None, name: str = "image",
                 noise_share: Callable[[list[Detections]], float] | None = None) -> tuple[ScaleChoice, dict]:
    """'auto' (Cellpose-style, with a second opinion): the model's passes and the image's own blob size.

    Candidate scales come from the first pass's confident instances and from ``image_d``; each is run, and a
    pass counts when the nuclei it found were about the training size at the scale it ran (a model finds
    nuclei far from its size band poorly, and then reports the wrong size). The most consistent pass is
    refined once. Nothing found anywhere: the image is probed at AUTO_PROBE_SCALES. No pass consistent: the
    best guess is used and a warning names the image. ``noise_share(detections)``, when given, is the share of a
    pass's confident instances that do not stand out from the pixel noise: above NOISE_PASS_SHARE the pass counts
    as having found nothing. Returns the choice and ``{scale: detections}`` of every pass run (``run_pass(scale)``
    predicts at a scale).
    """
    passes: dict[float, list[Detections]] = {1.0: first}
    noisy: set[float] = set()

    def size(scale: float) -> float | None:
        if noise_share is not None and noise_share(passes[scale]) > NOISE_PASS_SHARE:
            noisy.add(scale)
            return None
        return found_diameter(passes[scale], thresh)

    def run(scale: float) -> float:
        for done in passes:
            if abs(scale / done - 1) <= RESCALE_TOLERANCE:
                return done
        if len(passes) < AUTO_MAX_PASSES:
            passes[scale] = run_pass(scale)
            return scale
        return min(passes, key=lambda s: abs(math.log(scale / s)))

    lo, hi = SCALE_LIMITS
    found = {1.0: size(1.0)}
    wanted = [train_diameter / found[1.0]] if found[1.0] else []
    if image_d and not (found[1.0] and _agree(found[1.0], image_d)):  # a second opinion only when it differs
        wanted.append(train_diameter / image_d)
    for scale in [s for s in wanted if lo <= s <= hi] or list(AUTO_PROBE_SCALES):
        used = run(scale)
        found.setdefault(used, size(used))
    good = [s for s, d in found.items() if _consistent(s, d, train_diameter)]
    if good:
        # texture read as small nuclei can look consistent at a large scale too: the image's blob size decides
        best = min(good, key=lambda s: (image_d is not None and not _agree(found[s], image_d),
                                        abs(math.log(found[s] * s / train_diameter))))
        want = train_diameter / found[best]
        if abs(want / best - 1) > REFINE_TOLERANCE and lo <= want <= hi:
            used = run(want)
            found.setdefault(used, size(used))
            if _consistent(used, found[used], train_diameter):
                best = used
        sure = True
    else:
        seen = {s: d for s, d in found.items() if d is not None}
        best = max(seen, key=lambda s: len(torch.cat([x.scores[x.scores >= thresh] for x in passes[s]])),
                   default=1.0) if seen else 1.0
        sure = False
        warnings.warn(
            f"{name}: diameter 'auto' is unsure (passes at scales {', '.join(f'x{s:.2f}' for s in sorted(found))} "
            f"found {', '.join(_found_text(s, d, noisy) for s, d in sorted(found.items()))}; "
            f"the image's blobs suggest {'nothing' if image_d is None else f'{image_d:.1f} px'}); predicting at "
            f"x{best:.2f}: pass --diameter if you know it", UserWarning, stacklevel=3)
    diameter = found[best] if found.get(best) is not None else (train_diameter / best if sure else image_d)
    logger.info("%s: nucleus diameter %s px (image blobs: %s), model input x%.3f", name,
                "?" if diameter is None else f"{diameter:.1f}", "?" if image_d is None else f"{image_d:.1f}", best)
    return ScaleChoice(best, diameter, image_d, sure, sorted(found.items())), passes
