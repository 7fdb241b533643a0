"""Scenes of the synthetic generator: how many nuclei, where, how big and how they look (per-image draws)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np

GENERATOR_VERSION = 2  # bump when output changes: cached synthetic datasets are keyed by it
# Version-2 additions, each switchable for ablations (none = version 1's images exactly):
# "contact": pressed neighbours painted over each other, often with a dim seam, instead of summed light;
# "daughters": pairs of small bright daughter nuclei side by side; "bright_tail": compact very bright
# nuclei that set the normalisation's top percentile.
FEATURES = ("contact", "daughters", "bright_tail")
STYLES = ("fluorescence", "brightfield", "he")
MIN_LABEL_AREA = 8  # px; smaller visible remnants (border slivers, hidden nuclei) stay unlabelled
MAX_NUCLEI_PER_MPX = 2400  # ~630 in 512x512, above DSB-2018's densest fields
# Ruifrok & Johnston stain optical-density vectors (RGB)
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)




def image_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of image ``index`` in ``stream``: independent of how many images are made."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int | None = None) -> Any:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def _smooth_field(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Zero-mean unit-std float32 noise with correlation length ~``scale`` px (cheap for any scale)."""
    if scale <= 2.0:
        field = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), max(scale, 0.5))
    else:
        sh, sw = max(2, round(h / scale) + 2), max(2, round(w / scale) + 2)
        small = rng.standard_normal((sh, sw), dtype=np.float32)
        field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; large sigmas go through a downscaled copy (same look, a fraction of the time)."""
    if sigma < 0.3:
        return image
    if sigma <= 6:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    f = int(sigma // 3)
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)



# ---------------------------------------------------------------------------------------------------
# Scene: where the nuclei are and what they look like


def _sample_scene(rng: np.random.Generator, h: int, w: int) -> dict[str, Any]:
    """Per-image parameters; the ranges are the generator's notion of 'all plausible DSB images'."""
    p: dict[str, Any] = {}
    u = rng.random()
    p["regime"] = "empty" if u < 0.03 else "near_empty" if u < 0.08 else "normal"
    p["r_med"] = float(_log_uniform(rng, 5.0, 40.0))
    p["r_sigma"] = rng.uniform(0.08, 0.28)  # log-normal spread of radii inside the image
    p["elong"] = 1.0 + float(_log_uniform(rng, 0.08, 1.0))  # mean axis ratio
    p["aligned"] = rng.random() < 0.25  # confluent monolayers: locally aligned nuclei
    p["irregular"] = float(_log_uniform(rng, 0.02, 0.12 if rng.random() < 0.85 else 0.22))
    # density as fraction of the field covered; half uniform, half log-uniform (many sparse fields)
    p["coverage"] = rng.uniform(0.05, 0.55) if rng.random() < 0.5 else float(_log_uniform(rng, 0.01, 0.4))
    p["p_cluster"] = rng.choice([0.0, rng.uniform(0.2, 0.8), 1.0], p=[0.4, 0.4, 0.2])
    p["p_touch"] = rng.choice([0.0, rng.uniform(0.1, 0.7)], p=[0.3, 0.7])
    p["overlap_max"] = rng.choice([0.0, rng.uniform(0.02, 0.2)], p=[0.3, 0.7])
    # appearance
    p["bright_sigma"] = rng.uniform(0.1, 0.6)  # log-normal spread of nucleus brightness
    p["p_bright"] = rng.choice([0.0, rng.uniform(0.02, 0.15)], p=[0.5, 0.5])  # G2 / pyknotic nuclei
    p["p_dim"] = rng.choice([0.0, rng.uniform(0.02, 0.2)], p=[0.4, 0.6])
    p["p_oof"] = rng.choice([0.0, rng.uniform(0.03, 0.3)], p=[0.35, 0.65])
    p["p_mitotic"] = rng.choice([0.0, float(_log_uniform(rng, 0.01, 0.15))], p=[0.25, 0.75])
    p["edge"] = rng.uniform(0.5, 1.4)  # px, width of the in-focus edge ramp
    p["profile"] = rng.uniform(-0.25, 0.5)  # centre-bright (+) or rim-bright (-) radial profile
    p["tex_fine"] = float(_log_uniform(rng, 0.02, 0.18))
    p["tex_coarse"] = float(_log_uniform(rng, 0.02, 0.2))
    p["nucleoli"] = rng.choice([0.0, rng.uniform(0.1, 0.5)], p=[0.6, 0.4])
    p["halo"] = rng.choice([0.0, float(_log_uniform(rng, 0.02, 0.15))], p=[0.65, 0.35])
    p["ghosts"] = rng.choice([0.0, rng.uniform(0.05, 0.4)], p=[0.55, 0.45])
    p["debris"] = rng.choice([0.0, float(_log_uniform(rng, 1.0, 40.0))], p=[0.4, 0.6])
    return p


def _sample_scene_v2(rng: np.random.Generator, features: frozenset[str]) -> dict[str, Any]:
    """Version-2 parameters, drawn from their own stream (``rng`` is a spawn of the image's), so
    generating with ``features=()`` gives version 1's images bit for bit (ablations compare the two)."""
    q: dict[str, Any] = {"contact": None, "p_daughters": 0.0, "bright_tail": None}
    if "contact" in features and rng.random() < 0.65:
        # (seam depth, seam width px): pressed nuclei painted over each other, some with a dim seam
        q["contact"] = (rng.uniform(0.1, 0.7) if rng.random() < 0.7 else 0.0, rng.uniform(0.5, 1.5))
    if "daughters" in features and rng.random() < 0.5:
        q["p_daughters"] = rng.uniform(0.03, 0.15)
    if "bright_tail" in features and rng.random() < 0.6:
        # (fraction, brightness factor): compact very bright nuclei (prophase, apoptotic, G2) that set
        # the normalisation's top percentile, so typical nuclei sit low after it, as in real fields
        q["bright_tail"] = (float(_log_uniform(rng, 0.01, 0.08)), rng.uniform(2.0, 4.0))
    return q


def _nucleus_count(p: dict[str, Any], rng: np.random.Generator, h: int, w: int) -> int:
    if p["regime"] == "empty":
        return 0
    if p["regime"] == "near_empty":
        return int(rng.integers(1, 6))
    mean_area = math.pi * p["r_med"] ** 2 * math.exp(2 * p["r_sigma"] ** 2)
    n = p["coverage"] * h * w / mean_area
    return int(np.clip(round(n), 1, MAX_NUCLEI_PER_MPX * h * w / 1e6))


def _place_nuclei(rng: np.random.Generator, p: dict[str, Any], h: int, w: int) -> dict[str, np.ndarray]:
    """Nucleus geometry (centres, semi-axes, angle) by sequential placement with a circle test.

    Candidates closer than (r_i + r_j)(1 - overlap) to an accepted nucleus are rejected: overlap is drawn
    per candidate in [-0.05, overlap_max], giving gaps, touching pairs and slight overlaps; packing
    saturates by itself in crowded fields. Some candidates are placed right against an accepted nucleus.
    """
    n_target = _nucleus_count(p, rng, h, w)
    n_cand = 3 * n_target + 20 if n_target else 0
    r = p["r_med"] * np.exp(p["r_sigma"] * rng.standard_normal(n_cand))
    r = np.clip(r, 3.0, 60.0)
    aspect = np.clip(1.0 + (p["elong"] - 1.0) * np.exp(0.45 * rng.standard_normal(n_cand)), 1.0, 3.2)
    r_eff = r * (np.sqrt(aspect) + 1.0 / np.sqrt(aspect)) / 2
    # positions: uniform over the field plus a margin (nuclei cut by the border), or around clusters
    x = rng.uniform(-0.6, 0.6, n_cand) * r + rng.uniform(0, w, n_cand)
    y = rng.uniform(-0.6, 0.6, n_cand) * r + rng.uniform(0, h, n_cand)
    clustered = rng.random(n_cand) < p["p_cluster"]
    if clustered.any():
        k = int(rng.integers(1, 9))
        cx, cy = rng.uniform(0, w, k), rng.uniform(0, h, k)
        spread = p["r_med"] * rng.uniform(2.0, 9.0, k)
        which = rng.integers(0, k, n_cand)
        x = np.where(clustered, cx[which] + spread[which] * rng.standard_normal(n_cand), x)
        y = np.where(clustered, cy[which] + spread[which] * rng.standard_normal(n_cand), y)
    overlap = rng.uniform(-0.05, max(p["overlap_max"], -0.05) + 1e-6, n_cand)
    # "neighbour" candidates are put against a random accepted nucleus: touching pairs and chains
    touch = rng.random(n_cand) < p["p_touch"]
    angle = rng.uniform(0, 2 * np.pi, n_cand)
    pick = rng.random(n_cand)
    inside = (x > -r) & (x < w + r) & (y > -r) & (y < h + r)

    ax = np.empty(n_target, np.float64)
    ay, ar = np.empty_like(ax), np.empty_like(ax)
    keep = np.empty(n_target, np.int64)
    count = 0
    for i in range(n_cand):
        if count == n_target:
            break
        if touch[i] and count:
            j = int(pick[i] * count)
            d = (ar[j] + r_eff[i]) * (1.0 - overlap[i]) * 1.001
            x[i], y[i] = ax[j] + d * math.cos(angle[i]), ay[j] + d * math.sin(angle[i])
            if not (-r[i] < x[i] < w + r[i] and -r[i] < y[i] < h + r[i]):
                continue
        elif not inside[i]:
            continue
        if count:
            lim = (ar[:count] + r_eff[i]) * (1.0 - overlap[i])
            if np.any((ax[:count] - x[i]) ** 2 + (ay[:count] - y[i]) ** 2 < lim * lim):
                continue
        ax[count], ay[count], ar[count], keep[count] = x[i], y[i], r_eff[i], i
        count += 1
    keep = keep[:count]
    if p["aligned"]:
        theta = rng.uniform(0, np.pi) + 0.35 * rng.standard_normal(count)
    else:
        theta = rng.uniform(0, np.pi, count)
    sq = np.sqrt(aspect[keep])
    return {"x": x[keep], "y": y[keep], "a": r[keep] * sq, "b": r[keep] / sq, "theta": theta}


def check_features(features: Iterable[str]) -> frozenset[str]:
    """The set of version-2 features, or ValueError naming the unknown ones."""
    chosen = frozenset(features)
    unknown = sorted(chosen - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown generator feature(s) {unknown}; expected some of {list(FEATURES)}")
    return chosen
