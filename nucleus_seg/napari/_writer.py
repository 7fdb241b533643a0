"""Writer for Labels layers: the label TIFF nucleus-predict writes (uint16 ImageJ, uint32 past 65535 ids)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..inference.outputs import write_label_tiff


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: ``data`` (a 2-D label image) to ``path``, atomically."""
    write_label_tiff(path, np.asarray(data))
    return [path]
