"""Classical baseline: Otsu threshold + distance-transform watershed (no learning, no tuning on labels).

The floor a trained model must beat. Its defaults suit nuclei about 10-30 px across (the scale the
model is trained at, ``NUCLEUS.PREDICT.TRAIN_DIAMETER`` = 17 px); for other magnifications rescale the
image or pass ``min_distance``/``min_size`` for your nucleus size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from ..data.io import normalize_image
from ..structures import relabel_sequential


def watershed_segment(
    image: np.ndarray,
    sigma: float = 1.0,
    min_distance: int = 4,
    min_size: int = 15,
) -> np.ndarray:
    """Label image (int32, 0 = background) of nuclei in any microscopy image.

    Steps: ``normalize_image`` (percentile stretch, nuclei bright), Gaussian smoothing (``sigma`` px),
    Otsu foreground, holes filled and specks under ``min_size`` px dropped, then a watershed on the
    smoothed distance transform seeded at its maxima at least ``min_distance`` px apart, which splits
    touching round nuclei at their waist.
    """
    gray = normalize_image(image)[..., 0].astype(np.float32)
    if sigma > 0:
        gray = ndi.gaussian_filter(gray, sigma)
    if float(gray.max()) - float(gray.min()) < 1e-3:  # flat image: nothing to find
        return np.zeros(gray.shape, dtype=np.int32)
    foreground = gray > threshold_otsu(gray)
    foreground = ndi.binary_fill_holes(foreground)
    components, n = ndi.label(foreground)
    if n == 0:
        return np.zeros(gray.shape, dtype=np.int32)
    sizes = np.bincount(components.ravel())
    small = sizes < min_size
    small[0] = False
    foreground[small[components]] = False
    components[~foreground] = 0
    distance = ndi.distance_transform_edt(foreground)
    # smoothing merges the ridge plateaus of elongated nuclei into one peak each
    smooth = ndi.gaussian_filter(distance, 1.0)
    peaks = peak_local_max(
        smooth, min_distance=max(int(min_distance), 1), labels=components, exclude_border=False
    )
    markers = np.zeros(gray.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components with no peak (tiny or flat) still get one seed at their most interior pixel
    unseeded = np.setdiff1d(np.arange(1, n + 1), components[markers > 0])
    unseeded = unseeded[~small[unseeded]]
    if len(unseeded):
        positions = ndi.maximum_position(distance, components, unseeded)
        for offset, (y, x) in enumerate(positions):
            markers[y, x] = len(peaks) + 1 + offset
    label = watershed(-smooth, markers, mask=foreground)
    sizes = np.bincount(label.ravel())
    label[(sizes < min_size)[label] & (label > 0)] = 0
    return relabel_sequential(label).astype(np.int32)
