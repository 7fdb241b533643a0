"""Synthetic nucleus images with exact instance labels, written in the DSB-2018 layout.

No real training set can be downloaded here, so the model learns from this generator and is tested on
real DSB-2018 images. It therefore aims at *variety around the real look* rather than one look: every
image draws its own nucleus size (median radius log-uniform over 5-40 px, moderate spread inside the
image), elongation, density (empty, sparse to crowded, uniform or clustered), brightness spread,
background level, uneven illumination, vignetting, blur, photon budget (shot noise), read noise,
offset and gain. Inside an image there are dim nuclei near background, partly out-of-focus nuclei,
a bright subpopulation (G2 / pyknotic), small very bright mitotic figures (metaphase bars, anaphase
pairs, prometaphase clumps), nuclei cut by the border, touching and slightly overlapping nuclei
(additive light; labels stay disjoint, the top one owns the overlap), and unlabelled distractors:
out-of-plane "ghost" nuclei (very soft, dim), faint cytoplasm halos and small bright debris specks.

How it was compared with real data (image statistics only; the sample's labels were never looked at,
that image is the test): the shipped DSB sample (``data/sample/image.tif``) is uint16 0-235 with a dark
background (5th-95th percentile of Otsu-background pixels 11-41, median 21), nuclei mostly 50-95 with a
few saturated small mitotic figures (99.9th percentile 214), about 18 % of pixels above Otsu, Otsu
components of median equivalent radius ~11 px and eccentricity ~0.78, and 3x3 high-pass noise std ~5
grey levels in background and nuclei alike (read-noise-like). The same label-free measurements, taken
after the percentile normalisation the model sees, were run on 150 generated fields and the parameter
ranges adjusted until the sample sat inside the generated spread rather than at its edge; final quantile
of the sample among generated fields: foreground fraction 0.63, background level 0.59, Otsu component
radius 0.49, eccentricity 0.54, within-nucleus CV 0.44, background noise 0.70, nucleus noise 0.49,
nucleus level 0.10 (its bright mitotic tail pushes typical nuclei low after normalisation; the mapper's
contrast/gamma augmentation widens this further). What that changed: heavier bright tail (more and
larger mitotic figures, bright subpopulation), weaker chromatin texture, softer PSF range, read noise
relative to the nuclear signal, optional mild smoothing of noise (resampled releases), and "neighbour"
placement so touching nuclei are common. tests/test_synth.py keeps the automated part (the sample's
statistics must stay inside the 2nd-98th percentile), and previews were judged side by side with it.

Everything is deterministic per seed: image i of stream s uses ``default_rng([seed, s, i])``, so train
(stream 0) and val (stream 1) never share an image and N images are a prefix of N+1 images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
    import cv2

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
    import cv2

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


_TABLE = 128  # angular samples of each nucleus' boundary perturbation
_ITEM_FIELDS = ("x", "y", "a", "b", "theta", "irregular", "edge", "value", "profile", "tex_gain")


def _boundary_tables(rng: np.random.Generator, irregular: np.ndarray, k: int = 4) -> np.ndarray:
    """(n, _TABLE) radial factors 1 + sum_k A_k cos(k phi + phase_k), k = 2..k+1: irregular contours."""
    n = len(irregular)
    orders = np.arange(2, 2 + k)
    amps = irregular[:, None] * np.abs(rng.standard_normal((n, k))) / orders**1.1
    phases = rng.uniform(0, 2 * np.pi, (n, k))
    phi = np.linspace(-np.pi, np.pi, _TABLE, endpoint=False)
    waves = np.cos(orders[None, :, None] * phi[None, None, :] + phases[:, :, None])
    return (1.0 + np.einsum("nk,nkt->nt", amps, waves)).astype(np.float32)


def _render_batch(items: dict[str, np.ndarray], tables: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Render m nuclei on m size x size patches at once (vectorised: the per-nucleus Python cost was
    the generator's bottleneck). Returns (y0, x0, patch intensity, inside mask)."""
    f32 = np.float32
    x, y = items["x"].astype(f32), items["y"].astype(f32)
    x0 = np.floor(x).astype(np.int64) - size // 2
    y0 = np.floor(y).astype(np.int64) - size // 2
    off = np.arange(size, dtype=f32)
    dx = (x0.astype(f32)[:, None] + off - x[:, None])[:, None, :]
    dy = (y0.astype(f32)[:, None] + off - y[:, None])[:, :, None]
    c = np.cos(items["theta"]).astype(f32)[:, None, None]
    s = np.sin(items["theta"]).astype(f32)[:, None, None]
    un = (dx * c + dy * s) / items["a"].astype(f32)[:, None, None]
    vn = (dy * c - dx * s) / items["b"].astype(f32)[:, None, None]
    rho = np.sqrt(un * un + vn * vn) + f32(1e-6)
    idx = ((np.arctan2(vn, un) + f32(np.pi)) * f32(_TABLE / (2 * np.pi))).astype(np.int32) % _TABLE
    bound = np.take_along_axis(tables, idx.reshape(len(x), -1), axis=1).reshape(idx.shape)
    # signed distance to the boundary in px along the ray from the centre (exact for circles)
    dist = (bound / rho - f32(1.0)) * np.sqrt(dx * dx + dy * dy)
    soft = np.clip(dist / items["edge"].astype(f32)[:, None, None] + f32(0.5), 0.0, 1.0)
    rr = np.minimum(rho / bound, f32(1.0))
    prof = items["profile"].astype(f32)[:, None, None]
    amp = items["value"].astype(f32)[:, None, None] * np.maximum(1.0 + prof * (f32(0.5) - rr * rr), f32(0.05))
    return y0, x0, soft * amp, dist > 0, soft, dist


def _paint(
    items: dict[str, np.ndarray], tables: np.ndarray, canvas: np.ndarray,
    label: np.ndarray | None = None, gain: np.ndarray | None = None,
    contact: tuple[float, float] | None = None,
) -> None:
    """Add items to ``canvas`` in item order (patches clipped at its edge); with ``label``, item i paints
    id i+1 over earlier ones, so the later item owns overlapping pixels, and its texture gain into ``gain``.

    ``contact`` = (seam depth, seam width px) paints each item *over* what is below (alpha = its soft
    coverage) instead of adding light, and darkens what is below in a band just outside its edge: pressed
    neighbours then meet at a dim seam rather than a bright lens of summed light.

    Items are rendered in batches of similar size (patch side set by the largest in the batch)."""
    n = len(items["x"])
    if n == 0:
        return
    h, w = canvas.shape
    reach = np.maximum(items["a"], items["b"]) * tables.max(axis=1) + items["edge"] + 1.0
    by_size = np.argsort(reach, kind="stable")
    rendered: list[tuple | None] = [None] * n
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and reach[by_size[stop]] <= 1.3 * reach[by_size[start]] and stop - start < 256:
            stop += 1
        sel = by_size[start:stop]
        size = 2 * int(math.ceil(reach[sel].max())) + 3
        y0, x0, patch, inside, soft, dist = _render_batch({k: v[sel] for k, v in items.items()}, tables[sel], size)
        for j, i in enumerate(sel):
            rendered[i] = (int(y0[j]), int(x0[j]), patch[j], inside[j], soft[j], dist[j])
        start = stop
    for i in range(n):
        y0, x0, patch, inside, soft, dist = rendered[i]
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + patch.shape[0], h), min(x0 + patch.shape[1], w)
        if ys >= ye or xs >= xe:
            continue
        box = (slice(ys, ye), slice(xs, xe))
        crop = (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
        if contact is None:
            canvas[box] += patch[crop]
        else:
            depth, width = contact
            d = np.minimum(dist[crop], 0.0) / np.float32(width)
            keep = (1.0 - soft[crop]) * (1.0 - np.float32(depth) * np.exp(-d * d))
            canvas[box] = canvas[box] * keep + patch[crop]
        if label is not None:
            own = inside[crop]
            label[box][own] = i + 1
            gain[box][own] = items["tex_gain"][i]


def _items(**fields: Any) -> dict[str, np.ndarray]:
    """Per-nucleus fields as equal-length arrays; scalars are broadcast (to zero length too)."""
    sizes = [np.size(v) for v in fields.values() if np.ndim(v) > 0]
    n = max(sizes) if sizes else 1
    return {k: np.broadcast_to(np.asarray(fields.get(k, 0.0), dtype=np.float64), (n,)).copy()
            for k in _ITEM_FIELDS}


def _concat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in _ITEM_FIELDS}


def _render_nuclei(
    rng: np.random.Generator, p: dict[str, Any], h: int, w: int, floor: float,
    extra: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(signal canvas, label image) of the labelled nuclei: intensity relative to a median nucleus = 1.

    ``extra`` draws the version-2 features (``p["bright_tail"]``, ``p["p_daughters"]``)."""
    extra = extra if extra is not None else rng.spawn(1)[0]
    geo = _place_nuclei(rng, p, h, w)
    n = len(geo["x"])
    if n == 0:
        return np.zeros((h, w), np.float32), np.zeros((h, w), np.int32)
    bright = np.exp(p["bright_sigma"] * rng.standard_normal(n))
    hot = rng.random(n) < p["p_bright"]
    bright[hot] *= rng.uniform(1.6, 2.8, int(hot.sum()))
    dim = (rng.random(n) < p["p_dim"]) & ~hot
    bright[dim] *= rng.uniform(0.15, 0.45, int(dim.sum()))
    oof = rng.random(n) < p["p_oof"]
    mitotic = (rng.random(n) < p["p_mitotic"]) & ~oof
    edge = p["edge"] * rng.uniform(0.8, 1.25, n)
    edge[oof] = rng.uniform(2.0, 6.0, int(oof.sum())) * np.sqrt(np.clip(geo["b"][oof] / 8, 0.5, 2.0))
    bright[oof] *= rng.uniform(0.45, 0.9, int(oof.sum()))
    bright = np.maximum(bright, floor * rng.uniform(1.0, 1.5, n))
    tex_gain = rng.uniform(0.5, 1.5, n)
    tex_gain[oof] *= 0.3
    normal = ~mitotic
    profile = np.full(n, np.nan)
    profile[normal] = p["profile"] + 0.15 * rng.standard_normal(int(normal.sum()))
    if p.get("bright_tail"):
        frac, factor = p["bright_tail"]
        hot2 = (extra.random(n) < frac) & normal & ~oof
        k = int(hot2.sum())
        bright[hot2] = np.maximum(bright[hot2], 1.0) * factor * extra.uniform(0.8, 1.25, k)
        shrink = extra.uniform(0.65, 0.95, k)
        geo = dict(geo, a=geo["a"].copy(), b=geo["b"].copy())
        geo["a"][hot2] *= shrink
        geo["b"][hot2] *= shrink
        tex_gain[hot2] *= extra.uniform(1.0, 2.5, k)  # condensed, speckled chromatin
    daughters = (extra.random(n) < p.get("p_daughters", 0.0)) & normal & ~oof
    single = normal & ~daughters
    parts = [_items(x=geo["x"][single], y=geo["y"][single], a=geo["a"][single], b=geo["b"][single],
                    theta=geo["theta"][single], irregular=p["irregular"], edge=edge[single],
                    value=bright[single], profile=profile[single], tex_gain=tex_gain[single])]
    for i in np.flatnonzero(daughters):
        parts.append(_daughter_pair(extra, {k: v[i] for k, v in geo.items()}, p["irregular"], edge[i],
                                    bright[i], profile[i], tex_gain[i]))
    for i in np.flatnonzero(mitotic):
        parts.append(_mitotic_figure(rng, geo["x"][i], geo["y"][i], geo["a"][i], geo["b"][i],
                                     geo["theta"][i], bright[i]))
    items = _concat(*parts)
    order = rng.permutation(len(items["x"]))  # painting order = z-order: the later nucleus owns an overlap
    items = {k: v[order] for k, v in items.items()}
    tables = _boundary_tables(rng, items["irregular"])

    canvas = np.zeros((h, w), np.float32)
    label = np.zeros((h, w), np.int32)
    gain = np.zeros((h, w), np.float32)
    _paint(items, tables, canvas, label, gain, contact=p.get("contact"))

    # chromatin texture (fine + coarse, optional dark nucleoli), strength per nucleus via the gain map
    r_med = p["r_med"]
    tex = (p["tex_fine"] * _smooth_field(rng, h, w, max(0.7, r_med / 10))
           + p["tex_coarse"] * _smooth_field(rng, h, w, max(1.5, r_med / 3)))
    if p["nucleoli"]:
        tex -= p["nucleoli"] * np.clip(_smooth_field(rng, h, w, max(1.5, r_med / 5)) - 1.3, 0, 1.2)
    canvas *= np.maximum(1.0 + gain * tex, 0.1)
    if p["ghosts"]:
        _render_ghosts(rng, canvas, p, int(rng.poisson(p["ghosts"] * n + 1)))
    # drop tiny visible remnants and renumber 1..N in painting order (no sort: a lookup table)
    areas = np.bincount(label.ravel())
    keep = areas >= MIN_LABEL_AREA
    keep[0] = False
    lut = np.zeros(len(areas), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return canvas, lut[label]


def _mitotic_figure(
    rng: np.random.Generator, x: float, y: float, a: float, b: float, theta: float, bright: float
) -> dict[str, np.ndarray]:
    """A condensed, very bright mitotic figure: metaphase bar, anaphase pair of bars, or a small round
    prometaphase clump. Anaphase halves are separate nuclei (as most DSB annotators labelled them)."""
    r = math.sqrt(a * b)
    common = {"value": bright * rng.uniform(2.0, 6.0), "irregular": rng.uniform(0.04, 0.15),
              "edge": rng.uniform(0.4, 0.8), "profile": 0.0, "tex_gain": rng.uniform(1.0, 2.0)}
    kind = rng.random()
    if kind < 0.3:  # prometaphase: small, round, lumpy
        rr = max(2.5, r * rng.uniform(0.5, 0.75))
        return _items(x=x, y=y, a=rr, b=rr * rng.uniform(0.75, 1.0), theta=theta, **common)
    length = max(3.0, r * rng.uniform(0.8, 1.3))
    width = max(1.6, length / rng.uniform(1.8, 3.5))
    if kind < 0.75:  # metaphase plate seen edge-on: a bar
        return _items(x=x, y=y, a=length, b=width, theta=theta, **common)
    gap = width * rng.uniform(1.5, 3.5)  # anaphase: two bars moving apart across the plate
    ox, oy = -math.sin(theta) * gap, math.cos(theta) * gap
    return _items(x=[x + ox, x - ox], y=[y + oy, y - oy], a=[length, length * rng.uniform(0.85, 1.1)],
                  b=width, theta=theta, **common)


def _daughter_pair(
    rng: np.random.Generator, geo: dict[str, float], irregular: float, edge: float, bright: float,
    profile: float, tex_gain: float,
) -> dict[str, np.ndarray]:
    """Two daughter nuclei just after division in place of one nucleus: smaller, brighter, alike, and
    pressed together flat side to flat side (labelled as two, as DSB annotators did)."""
    r = math.sqrt(geo["a"] * geo["b"]) * rng.uniform(0.55, 0.75)
    aspect = rng.uniform(1.05, 1.6)
    phi = rng.uniform(0, np.pi)  # axis through both centres; each daughter is flattened across it
    d = r / math.sqrt(aspect) * rng.uniform(0.9, 1.15)  # half the centre distance: touching, +- a px
    ox, oy = d * math.cos(phi), d * math.sin(phi)
    value = bright * rng.uniform(1.1, 1.8)
    return _items(x=[geo["x"] + ox, geo["x"] - ox], y=[geo["y"] + oy, geo["y"] - oy],
                  a=r * math.sqrt(aspect) * rng.uniform(0.9, 1.1, 2), b=r / math.sqrt(aspect),
                  theta=phi + np.pi / 2 + rng.normal(0, 0.15, 2), irregular=irregular, edge=edge,
                  value=value * rng.uniform(0.9, 1.1, 2), profile=profile, tex_gain=tex_gain)


def _render_ghosts(rng: np.random.Generator, canvas: np.ndarray, p: dict[str, Any], count: int) -> None:
    """Nuclei of another focal plane: dim, very soft blobs that are not labelled."""
    h, w = canvas.shape
    r = p["r_med"] * np.exp(0.25 * rng.standard_normal(count))
    asp = np.sqrt(1.0 + (p["elong"] - 1.0) * rng.random(count))
    items = _items(x=rng.uniform(0, w, count), y=rng.uniform(0, h, count), a=r * asp, b=r / asp,
                   theta=rng.uniform(0, np.pi, count), edge=np.maximum(3.0, r * rng.uniform(0.6, 1.2, count)),
                   value=rng.uniform(0.06, 0.25, count))
    _paint(items, np.ones((count, _TABLE), np.float32), canvas)


def _add_debris(rng: np.random.Generator, canvas: np.ndarray, mean_count: float) -> None:
    """Small bright specks and clumps (dust, dead-cell fragments): unlabelled, at most ~15 px."""
    h, w = canvas.shape
    for _ in range(int(rng.poisson(mean_count))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        for _ in range(int(rng.integers(1, 4))):
            sx, sy = x + rng.normal(0, 2.5), y + rng.normal(0, 2.5)
            sigma, amp = rng.uniform(0.5, 1.6), float(_log_uniform(rng, 0.3, 5.0))
            x0, x1 = max(0, int(sx - 4 * sigma)), min(w, int(sx + 4 * sigma) + 2)
            y0, y1 = max(0, int(sy - 4 * sigma)), min(h, int(sy + 4 * sigma) + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            gx = np.exp(-0.5 * ((np.arange(x0, x1) - sx) / sigma) ** 2)
            gy = np.exp(-0.5 * ((np.arange(y0, y1) - sy) / sigma) ** 2)
            canvas[y0:y1, x0:x1] += (amp * gy[:, None] * gx[None, :]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Optics and camera


def _illumination(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(uneven-background field around 1, vignetting factor <= 1)."""
    bg = 1.0 + rng.uniform(0.0, 0.45) * _smooth_field(rng, h, w, max(h, w) / rng.uniform(1.5, 5.0))
    vignette = np.ones((h, w), np.float32)
    if rng.random() < 0.55:
        yy = (np.arange(h, dtype=np.float32)[:, None] - h * rng.uniform(0.3, 0.7)) / (h / 2)
        xx = (np.arange(w, dtype=np.float32)[None, :] - w * rng.uniform(0.3, 0.7)) / (w / 2)
        vignette = np.clip(1.0 - rng.uniform(0.05, 0.4) * (xx * xx + yy * yy) / 2, 0.3, 1.0)
    return np.maximum(bg, 0.05).astype(np.float32), vignette.astype(np.float32)


def _photon_noise(rng: np.random.Generator, expected: np.ndarray, photons: float) -> np.ndarray:
    """Shot noise for ``expected`` (relative units) at ``photons`` per unit, back in relative units.

    Heteroscedastic Gaussian limit of Poisson (variance = mean, Foi et al. 2008's Poisson-Gaussian
    model): numpy's exact Poisson sampler costs ~20 ms per 512x512 image, half the time budget.
    """
    lam = expected * np.float32(photons)
    noisy = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
    return np.maximum(noisy, 0) * np.float32(1.0 / photons)


def _to_dtype(image: np.ndarray, white: float, bit_depth: int) -> np.ndarray:
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.clip(image + 0.5, 0, white).astype(dtype)


def _white_level(rng: np.random.Generator, bit_depth: int) -> float:
    """8-bit uses the full 255; 16-bit files hold 8- to 16-bit camera ranges (the DSB sample peaks at
    235 in a uint16 file)."""
    return 255.0 if bit_depth == 8 else float(np.round(_log_uniform(rng, 255, 65535)))


def _fluorescence(
    rng: np.random.Generator, signal: np.ndarray, floor_info: dict, bit_depth: int
) -> np.ndarray:
    h, w = signal.shape
    bg_field, vignette = _illumination(rng, h, w)
    expected = (signal + floor_info["background"] * bg_field) * vignette
    noisy = _photon_noise(rng, np.maximum(expected, 0), floor_info["photons"])
    white = _white_level(rng, bit_depth)
    gain = white * float(_log_uniform(rng, 0.06, 0.6))  # grey level of a median nucleus
    offset = white * (rng.uniform(0.0, 0.06) if rng.random() < 0.6 else 0.0)
    read = gain * float(_log_uniform(rng, 0.005, 0.15))  # camera read noise, relative to a nucleus
    out = noisy * np.float32(gain) + np.float32(offset) + read * rng.standard_normal((h, w), dtype=np.float32)
    if rng.random() < 0.35:  # resampled / compressed releases: spatially correlated noise
        out = _blur(out, rng.uniform(0.4, 0.9))
    if rng.random() < 0.2:  # some datasets were gamma-adjusted before release
        out = white * np.clip(out / white, 0, None) ** np.float32(rng.uniform(0.6, 1.5))
    return _to_dtype(out, white, bit_depth)


def _brightfield(rng: np.random.Generator, density: np.ndarray, bit_depth: int) -> np.ndarray:
    """Transmitted light: dark stained nuclei on a bright, slightly uneven field, gray or tinted RGB."""
    h, w = density.shape
    bg_field, vignette = _illumination(rng, h, w)
    k = -math.log(rng.uniform(0.3, 0.8))  # transmission of a median nucleus
    tint = np.ones(3, np.float32) if rng.random() < 0.5 else rng.uniform(0.6, 1.3, 3).astype(np.float32)
    light = (1.0 - 0.1 * (bg_field - 1.0)) * vignette
    trans = np.exp(-k * density[..., None] * tint[None, None, :])
    expected = light[..., None] * trans
    noisy = _photon_noise(rng, expected, float(_log_uniform(rng, 200, 5000)))
    white = _white_level(rng, bit_depth)
    out = noisy * np.float32(white * rng.uniform(0.7, 0.95))
    image = _to_dtype(out, white, bit_depth)
    return image[..., 0] if (tint == 1).all() else image


def _he(rng: np.random.Generator, density: np.ndarray, bit_depth: int) -> np.ndarray:
    """H&E-like RGB: hematoxylin nuclei on eosin-stained tissue with white gaps (Beer-Lambert mixing)."""
    h, w = density.shape
    _, vignette = _illumination(rng, h, w)
    tissue = np.clip(0.6 + 0.5 * _smooth_field(rng, h, w, rng.uniform(8, 40)), 0, None)
    gaps = np.clip((_smooth_field(rng, h, w, rng.uniform(20, 60)) - rng.uniform(0.8, 2.5)) * 4, 0, 1)
    tissue *= 1.0 - 0.9 * gaps  # lumen / tears: white, with soft borders
    od_h = density * rng.uniform(0.4, 1.1) + 0.05 * tissue
    od_e = tissue * rng.uniform(0.1, 0.5)
    h_vec = _HEMATOXYLIN + rng.normal(0, 0.04, 3).astype(np.float32)
    e_vec = _EOSIN + rng.normal(0, 0.04, 3).astype(np.float32)
    od = od_h[..., None] * h_vec + od_e[..., None] * e_vec
    expected = vignette[..., None] * np.exp(-np.log(10) * od)
    noisy = _photon_noise(rng, expected, float(_log_uniform(rng, 200, 5000)))
    white = _white_level(rng, bit_depth)
    return _to_dtype(noisy * np.float32(white * rng.uniform(0.8, 0.97)), white, bit_depth)


def check_features(features: Iterable[str]) -> frozenset[str]:
    """The set of version-2 features, or ValueError naming the unknown ones."""
    chosen = frozenset(features)
    unknown = sorted(chosen - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown generator feature(s) {unknown}; expected some of {list(FEATURES)}")
    return chosen


def generate_image(
    rng: np.random.Generator,
    size: int | tuple[int, int] = 512,
    style: str = "fluorescence",
    bit_depth: int = 8,
    features: Iterable[str] = FEATURES,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic field: (image, label) with image HxW (HxWx3 for colour styles) uint8 or uint16 and
    label HxW int32 (0 background, 1..N nuclei, disjoint). ``features`` picks the version-2 additions
    (all by default; none gives version 1's images)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    features = check_features(features)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(h, w) < 16:
        raise ValueError(f"image size {h}x{w} is too small")
    extra = rng.spawn(1)[0]  # version-2 draws: the main stream stays version 1's
    p = _sample_scene(rng, h, w)
    p.update(_sample_scene_v2(extra, features))
    # camera first: dim nuclei are drawn relative to the noise they must stand out of
    background = float(_log_uniform(rng, 0.02, 0.9))
    photons = float(_log_uniform(rng, 20, 5000))
    noise_rel = math.sqrt((background + 0.05) / photons)
    floor = max(0.12, 3.0 * noise_rel)
    signal, label = _render_nuclei(rng, p, h, w, floor, extra)
    if p["halo"]:  # faint cytoplasm autofluorescence / stain around nuclei
        around = _blur((label > 0).astype(np.float32), p["r_med"] * rng.uniform(0.5, 1.0))
        signal += p["halo"] * around * (1.0 + 0.5 * _smooth_field(rng, h, w, p["r_med"]))
    if p["debris"]:
        _add_debris(rng, signal, p["debris"] * h * w / 512**2)
    signal = _blur(signal, float(_log_uniform(rng, 0.5, 2.8)))  # the microscope's PSF
    if style == "fluorescence":
        image = _fluorescence(rng, signal, {"background": background, "photons": photons}, bit_depth)
    elif style == "brightfield":
        image = _brightfield(rng, signal, bit_depth)
    else:
        image = _he(rng, signal, bit_depth)
    return image, label


# ---------------------------------------------------------------------------------------------------
# Writing datasets and previews


LAYOUTS = ("dsb", "labels")


def sample_image_path(folder: str | os.PathLike, name: str, layout: str = "dsb") -> Path:
    """Where :func:`write_sample` puts a sample's image."""
    if layout == "dsb":
        return Path(folder) / name / "images" / f"{name}.png"
    if layout == "labels":
        return Path(folder) / "images" / f"{name}.png"
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def write_sample(folder: str | os.PathLike, name: str, image: np.ndarray, label: np.ndarray,
                 layout: str = "dsb") -> list[Path]:
    """Write one sample; returns its annotation files.

    ``dsb``: ``<folder>/<name>/images/<name>.png`` and one 1-bit PNG per id in ``masks/`` (in id order, so
    the loader's sorted order is the label order). ``labels``: ``<folder>/images/<name>.png`` and a 16-bit
    label PNG ``<folder>/labels/<name>.png`` (StarDist's layout): two files instead of one per nucleus
    (~175 at 512x512), and creating files is where generation time goes on slow disks.
    """
    import cv2
    from scipy import ndimage

    image_path = sample_image_path(folder, name, layout)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(image_path), pixels):
        raise OSError(f"cannot write {image_path}")
    if layout == "labels":
        if label.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"{name}: {label.max()} nuclei do not fit a 16-bit label image")
        path = Path(folder) / "labels" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        if not cv2.imwrite(str(path), label.astype(np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise OSError(f"cannot write {path}")
        return [path]
    sample = image_path.parent.parent
    paths: list[Path] = []
    boxes = ndimage.find_objects(label)
    if not boxes:
        return paths
    (sample / "masks").mkdir(exist_ok=True)
    width = max(4, len(str(len(boxes))))
    buf = np.zeros(label.shape, np.uint8)
    bilevel = [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 1]  # 1-bit: 2x faster to write
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        buf[box] = (label[box] == k) * np.uint8(255)
        path = sample / "masks" / f"{k:0{width}d}.png"
        if not cv2.imwrite(str(path), buf, bilevel):
            raise OSError(f"cannot write {path}")
        buf[box] = 0
        paths.append(path)
    return paths


def _write_one(job: tuple[Path, str, int, int, int, int, int, str, tuple[str, ...], str]) -> dict:
    """Generate, write and annotate one image (a process-pool task: everything derives from the seed)."""
    from .datasets import label_image_to_annotations

    out_dir, name, index, size, seed, stream, bit_depth, style, features, layout = job
    image, label = generate_image(image_rng(seed, stream, index), size, style, bit_depth, features)
    write_sample(out_dir, name, image, label, layout)
    return {
        "file_name": str(sample_image_path(out_dir, name, layout)),
        "image_name": name,
        "image_id": index,
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "annotations": label_image_to_annotations(label),
    }


def write_dataset(
    out_dir: str | os.PathLike,
    num: int,
    size: int = 512,
    style: str = "fluorescence",
    seed: int = 0,
    bit_depth: int = 8,
    stream: int = 0,
    preview: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
    features: Iterable[str] = FEATURES,
    layout: str = "dsb",
) -> list[dict]:
    """Generate ``num`` images into an empty/new ``out_dir`` in ``layout`` (see :func:`write_sample`);
    return their dataset dicts (exactly what :func:`~nucleus_seg.data.datasets.load_dsb_dataset` or
    :func:`~nucleus_seg.data.datasets.load_label_image_dataset` reads back). ``preview`` names a PNG
    montage of the first 16 images with mask outlines.

    Writing one PNG per nucleus dominates the cost of the DSB layout (~5 images/s per core), so images are
    spread over ``workers`` processes (default: all cores, at most 16); the output does not depend on it.
    ``features`` as in :func:`generate_image`.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    features = tuple(sorted(check_features(features)))
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; pick a new folder for the synthetic dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(num - 1)))
    jobs = [(out_dir, f"synth_s{seed}_{stream}_{i:0{width}d}", i, size, seed, stream, bit_depth, style,
             features, layout) for i in range(num)]
    workers = min(workers or os.cpu_count() or 1, 16, max(num, 1))
    bar = dict(total=num, desc=f"synth {style}", disable=not progress or num < 5)
    if workers > 1 and num >= 8:
        with ProcessPoolExecutor(workers) as pool:
            records = list(tqdm(pool.map(_write_one, jobs, chunksize=4), **bar))
    else:
        records = [_write_one(job) for job in tqdm(jobs, **bar)]
    if preview is not None and records:
        shown = [generate_image(image_rng(seed, stream, i), size, style, bit_depth, features)
                 for i in range(min(num, 16))]
        write_preview(preview, [s[0] for s in shown], [s[1] for s in shown])
    return records


def write_preview(
    path: str | os.PathLike,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    tile: int = 256,
    columns: int = 4,
) -> Path:
    """PNG montage of images (percentile-normalised as the model sees them) with label outlines."""
    import cv2
    from skimage.segmentation import find_boundaries

    from .io import normalize_image

    tiles = []
    for image, label in zip(images, labels):
        view = normalize_image(image, invert="never")
        view = cv2.resize(view, (tile, tile), interpolation=cv2.INTER_AREA)
        small = cv2.resize(label.astype(np.int32), (tile, tile), interpolation=cv2.INTER_NEAREST)
        view[find_boundaries(small, mode="inner")] = (255, 60, 60)
        tiles.append(view)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    montage = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(montage, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write preview {path}")
    return path
