"""Writer for Labels layers: the label TIFF nucleus-predict writes (uint16 ImageJ, uint32 past 65535 ids)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..inference.outputs import write_label_tiff

DEFAULT_AXES = {2: "YX", 3: "ZYX", 4: "TZYX"}


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: ``data`` (a label image, or a stack of them) to ``path``, atomically. A stack keeps
    the axes it was read with (the reader's layer metadata ``axes``, e.g. ``"TYX"``), else z before y, x."""
    data = np.asarray(data)
    axes = (meta.get("metadata") or {}).get("axes")
    if not isinstance(axes, str) or len(axes) != data.ndim:
        axes = DEFAULT_AXES.get(data.ndim, "YX")
    write_label_tiff(path, data, axes=axes)
    return [path]
