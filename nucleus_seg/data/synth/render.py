"""Painting nuclei: irregular elliptical contours with soft edges, texture, nucleoli, mitotic figures,
daughter pairs, out-of-focus ghosts and debris, into a float signal canvas and a disjoint label image."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .scene import MIN_LABEL_AREA, _log_uniform, _place_nuclei, _smooth_field

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
