"""Nucleus training augmentations: detectron2 ``T.*`` where they exist, small custom ones where not.

Geometric transforms act on the image and on an instance label stack (``AugInput.sem_seg``,
HxWxL integer ids), so masks move with the image and are resampled nearest-neighbour. The crop comes
first and decides the scale, so every later step works on the crop only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = [
    "FastResizeTransform",
    "Rot90Transform",
    "RandomRot90",
    "RandomScaledNucleusCrop",
    "RandomIntensity",
    "RandomGaussianBlur",
    "RandomGaussianNoise",
    "RandomShotNoise",
    "build_nucleus_augmentation",
    "median_diameter",
]


def median_diameter(areas: np.ndarray) -> float | None:
    """Median equivalent-circle diameter of instance areas (px); None when there are none."""
    areas = np.asarray(areas, dtype=np.float64)
    areas = areas[areas > 0]
    if areas.size == 0:
        return None
    return float(np.median(np.sqrt(4.0 * areas / math.pi)))


TARGET_SCALE_LIMITS = (0.125, 8.0)  # bounds the work of one crop (window 64-4096 px for a 512 crop)


def nearest_resize(array: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest-neighbour resize of any dtype and channel count, sampling pixel centres.

    Same sampling as cv2.INTER_NEAREST_EXACT/PIL NEAREST, so masks stay aligned with a bilinear image.
    """
    h, w = array.shape[:2]
    rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.intp), w - 1)
    return array[rows[:, None], cols[None, :]]


class FastResizeTransform(T.ResizeTransform):
    """detectron2's ResizeTransform done with OpenCV (image) and index sampling (segmentation).

    detectron2's version goes through PIL, which cannot take integer label stacks, and is ~8x
    slower on uint8 images.
    """

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), (img.shape, self.h, self.w)
        shrink = self.new_h * self.new_w < self.h * self.w
        flag = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=flag)
        if img.ndim == 3 and out.ndim == 2:
            out = out[:, :, None]
        return out

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return nearest_resize(segmentation, self.new_h, self.new_w)

    def inverse(self) -> T.Transform:
        return FastResizeTransform(self.new_h, self.new_w, self.h, self.w)


class Rot90Transform(T.Transform):
    """Rotate by k*90 degrees counter-clockwise (np.rot90): exact, no resampling."""

    def __init__(self, k: int, h: int, w: int):
        super().__init__()
        self._set_attributes({"k": k % 4, "h": h, "w": w})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.rot90(img, self.k, axes=(0, 1))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return np.rot90(segmentation, self.k, axes=(0, 1))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def inverse(self) -> T.Transform:
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(-self.k, h, w)


class RandomRot90(T.Augmentation):
    """Uniform k in {0,1,2,3}; with a flip this covers all 8 orientations (nuclei have none)."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        k = int(np.random.randint(4))
        if k == 0:
            return T.NoOpTransform()
        return Rot90Transform(k, image.shape[0], image.shape[1])


class RandomScaledNucleusCrop(T.Augmentation):
    """Rescale by a log-uniform factor and take a ``crop_size`` square, in one step.

    The crop window is chosen in the *source* image (``crop_size / scale`` wide), so only the window
    is resampled, never the whole image. With probability ``nucleus_prob`` the window contains the
    centre of a random nucleus box (dense training signal on sparse slides). Images smaller than the
    window are padded (at a random offset) to ``crop_size``.

    With ``target_diameter`` > 0 the scale is relative to the image's own nuclei (Cellpose's
    training): the image is first brought to a median nucleus diameter of ``target_diameter``
    (AugInput ``diameter``, px) and ``scale_range`` jitters around that. The model then spends its
    capacity on one size band, and the predictor's ``diameter`` setting brings every input to it.

    ``before_resize``: photometric augmentations (taking the image only) applied to the window in the
    source's own pixel grid, before the rescale: camera noise is per camera pixel, and inference resizes it
    together with the image (upscaled, its grains span several of the model's pixels).
    """

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (1.0, 1.0),
                 nucleus_prob: float = 0.9, target_diameter: float = 0.0,
                 before_resize: Sequence[T.Augmentation] = ()):
        super().__init__()
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"INPUT.NUCLEUS.SCALE_RANGE must be 0 < low <= high, got {scale_range}")
        if crop_size < 1:
            raise ValueError(f"INPUT.NUCLEUS.CROP_SIZE must be positive, got {crop_size}")
        if target_diameter < 0:
            raise ValueError(f"target_diameter (NUCLEUS.PREDICT.TRAIN_DIAMETER with "
                             f"INPUT.NUCLEUS.SCALE_TO_DIAMETER) must be >= 0, got {target_diameter}")
        self._init({"crop_size": int(crop_size), "scale_range": (lo, hi), "nucleus_prob": nucleus_prob,
                    "target_diameter": float(target_diameter), "before_resize": tuple(before_resize)})
        self.input_args = ("image", "boxes", "diameter") if target_diameter > 0 else ("image", "boxes")

    def get_transform(self, image: np.ndarray, boxes: np.ndarray | None,
                      diameter: float | None = None) -> T.Transform:
        h, w = image.shape[:2]
        lo, hi = self.scale_range
        scale = math.exp(np.random.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        if self.target_diameter > 0 and diameter:
            scale *= float(np.clip(self.target_diameter / diameter, *TARGET_SCALE_LIMITS))
        crop = self.crop_size
        win = max(1, int(round(crop / scale)))
        ch, cw = min(win, h), min(win, w)
        if boxes is not None and len(boxes) and self._rand_range() < self.nucleus_prob:
            bx = boxes[np.random.randint(len(boxes))]
            cx, cy = (bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2
            x0 = int(np.clip(math.floor(np.random.uniform(cx - cw, cx)), 0, w - cw))
            y0 = int(np.clip(math.floor(np.random.uniform(cy - ch, cy)), 0, h - ch))
        else:
            x0 = int(np.random.randint(w - cw + 1))
            y0 = int(np.random.randint(h - ch + 1))
        tfms: list[T.Transform] = [T.CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)]
        window = image[y0:y0 + ch, x0:x0 + cw]
        tfms += [t for t in (aug.get_transform(window) for aug in self.before_resize)
                 if not isinstance(t, T.NoOpTransform)]
        factor = crop / win
        oh = crop if ch == win else min(crop, max(1, int(round(ch * factor))))
        ow = crop if cw == win else min(crop, max(1, int(round(cw * factor))))
        if (oh, ow) != (ch, cw):
            tfms.append(FastResizeTransform(ch, cw, oh, ow))
        if oh < crop or ow < crop:
            px = int(np.random.randint(crop - ow + 1))
            py = int(np.random.randint(crop - oh + 1))
            tfms.append(T.PadTransform(px, py, crop - ow - px, crop - oh - py, orig_w=ow, orig_h=oh))
        return T.TransformList(tfms)


class LUTTransform(T.ColorTransform):
    """A 256-entry grey-level lookup table (uint8 images only)."""

    def __init__(self, lut: np.ndarray):
        lut = np.asarray(lut, dtype=np.uint8)
        super().__init__(op=lambda img: cv2.LUT(img, lut))
        self.lut = lut


class RandomIntensity(T.Augmentation):
    """Brightness (multiplicative), contrast (about the mean) and gamma as ONE uint8 lookup table.

    detectron2's RandomBrightness + RandomContrast do the same first two in float over the whole
    image (~4 ms at 512 px); one LUT pass is ~0.1 ms, and gamma comes for free.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0,
                 gamma: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self._init({"brightness": float(brightness), "contrast": float(contrast),
                    "gamma": (float(gamma[0]), float(gamma[1]))})

    def get_transform(self, image: np.ndarray) -> T.Transform:
        b = np.random.uniform(1 - self.brightness, 1 + self.brightness)
        c = np.random.uniform(1 - self.contrast, 1 + self.contrast)
        g_lo, g_hi = self.gamma
        g = math.exp(np.random.uniform(math.log(g_lo), math.log(g_hi))) if g_hi > g_lo else g_lo
        mean = float(image[::4, ::4].mean())  # a 1/16 sample is plenty for the contrast centre
        v = np.arange(256, dtype=np.float64) * b
        v = (v - mean * b) * c + mean * b
        v = 255.0 * (np.clip(v, 0, 255) / 255.0) ** g
        return LUTTransform(np.clip(v + 0.5, 0, 255).astype(np.uint8))


class RandomGaussianBlur(T.Augmentation):
    """Gaussian blur with sigma uniform in ``sigma_range``: out-of-focus planes."""

    def __init__(self, sigma_range: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        self._init({"sigma_range": (float(sigma_range[0]), float(sigma_range[1]))})

    def get_transform(self, image: np.ndarray) -> T.Transform:
        sigma = float(np.random.uniform(*self.sigma_range))
        return T.ColorTransform(op=lambda img: _gaussian_blur(img, sigma))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    out = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), sigma)
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


class RandomGaussianNoise(T.Augmentation):
    """Additive Gaussian noise, std uniform in ``std_range`` grey levels, the same in every channel
    (camera noise on a grey image; also 3x cheaper than per-channel noise)."""

    def __init__(self, std_range: tuple[float, float] = (2.0, 10.0)):
        super().__init__()
        self._init({"std_range": (float(std_range[0]), float(std_range[1]))})

    def get_transform(self, image: np.ndarray) -> T.Transform:
        std = float(np.random.uniform(*self.std_range))
        seed = int(np.random.randint(2**31))  # np.random is what detectron2 seeds per worker
        return T.ColorTransform(op=lambda img: _add_noise(img, std, seed))


def _add_noise(img: np.ndarray, std: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(img.shape[:2], dtype=np.float32)
    noise *= std
    if img.ndim == 3:
        noise = cv2.merge([noise] * img.shape[2])
    out = cv2.add(np.ascontiguousarray(img), noise, dtype=cv2.CV_8U)  # rounds and saturates
    return out.reshape(img.shape)


class RandomShotNoise(T.Augmentation):
    """Photon (Poisson) noise plus camera read noise, as a short exposure gives it: the image's bright level
    (99.9th percentile) gets a shot-noise SNR drawn log-uniformly from ``snr_range`` (SNR 5 = 25 photons),
    darker pixels proportionally fewer photons, so the noise grows with the signal (RandomGaussianNoise's
    does not). The same noise goes into every channel (a grey image stored as RGB stays grey).

    ``stretch`` (low, high percentiles): the noisy image is stretched again the way inference normalises a
    noisy exposure (``INPUT.NORMALIZE``), instead of clipping the noise at black: a noisy camera image's
    background comes out as mid-grey noise and its nuclei with less contrast, which clipped noise on the
    already-stretched training image never shows."""

    def __init__(self, snr_range: tuple[float, float] = (3.0, 20.0), read_noise: float = 2.0,
                 stretch: tuple[float, float] | None = None):
        super().__init__()
        self._init({"snr_range": (float(snr_range[0]), float(snr_range[1])), "read_noise": float(read_noise),
                    "stretch": None if stretch is None else (float(stretch[0]), float(stretch[1]))})

    def get_transform(self, image: np.ndarray) -> T.Transform:
        lo, hi = self.snr_range
        snr = math.exp(np.random.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        seed = int(np.random.randint(2**31))
        return T.ColorTransform(op=lambda img: _shot_noise(img, snr, self.read_noise, seed, self.stretch))


def _shot_noise(img: np.ndarray, snr: float, read_noise: float, seed: int,
                stretch: tuple[float, float] | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grey = (img if img.ndim == 2 else img.max(axis=2)).astype(np.float32)
    top = float(np.percentile(grey[::2, ::2], 99.9)) or 1.0
    photons_per_level = snr * snr / top
    photons = rng.poisson(grey * photons_per_level).astype(np.float32)
    photons += rng.normal(0.0, read_noise, grey.shape).astype(np.float32)  # read noise, in photons
    noisy_grey = photons / photons_per_level
    delta = noisy_grey - grey  # zero mean: the exposure's brightness is kept
    noisy = img.astype(np.float32) + (delta[..., None] if img.ndim == 3 else delta)
    if stretch is not None:
        low, high = np.percentile(noisy_grey[::2, ::2], stretch)
        noisy = (noisy - low) * np.float32(255.0 / max(float(high - low), 1e-3))
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def build_nucleus_augmentation(cfg, is_train: bool) -> list[T.Augmentation]:
    """The nucleus augmentation list from ``cfg.INPUT.NUCLEUS`` (training) or detectron2's test resize.

    Order matters for speed: crop+scale first (everything after works on the crop), geometric before
    photometric.
    """
    if not is_train:
        return utils.build_augmentation(cfg, is_train=False)  # ResizeShortestEdge; MIN_SIZE_TEST 0 = none
    n = cfg.INPUT.NUCLEUS
    noise: list[T.Augmentation] = []
    if n.NOISE_PROB > 0:
        noise.append(T.RandomApply(RandomGaussianNoise(tuple(n.NOISE_STD)), prob=n.NOISE_PROB))
    if n.SHOT_NOISE_PROB > 0:
        stretch = (cfg.INPUT.NORMALIZE.LOW, cfg.INPUT.NORMALIZE.HIGH) if n.SHOT_NOISE_STRETCH else None
        noise.append(T.RandomApply(RandomShotNoise(tuple(n.SHOT_NOISE_SNR), stretch=stretch),
                                   prob=n.SHOT_NOISE_PROB))
    source_noise = bool(n.NOISE_BEFORE_RESCALE)
    augs: list[T.Augmentation] = [
        RandomScaledNucleusCrop(n.CROP_SIZE, tuple(n.SCALE_RANGE), n.CROP_NUCLEUS_PROB,
                                target_diameter=cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER if n.SCALE_TO_DIAMETER else 0.0,
                                before_resize=noise if source_noise else ())
    ]
    if n.FLIP:
        augs += [T.RandomFlip(0.5, horizontal=True, vertical=False),
                 T.RandomFlip(0.5, horizontal=False, vertical=True)]
    if n.ROT90:
        augs.append(RandomRot90())
    if n.BRIGHTNESS or n.CONTRAST or tuple(n.GAMMA) != (1.0, 1.0):
        augs.append(RandomIntensity(n.BRIGHTNESS, n.CONTRAST, tuple(n.GAMMA)))
    if n.BLUR_PROB > 0:
        augs.append(T.RandomApply(RandomGaussianBlur(tuple(n.BLUR_SIGMA)), prob=n.BLUR_PROB))
    if not source_noise:
        augs += noise
    return augs
