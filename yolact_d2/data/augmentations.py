"""YOLACT's SSD-style training augmentation as detectron2 ``Augmentation`` / ``Transform`` classes.

The original pipeline (dbolya/yolact ``utils/augmentations.py``, ``SSDAugmentation``) is, in order:

1. photometric distortion (random brightness, contrast, saturation, hue),
2. expand (zoom out onto a canvas filled with the pixel mean),
3. random sample crop (SSD's "min-IoU" crop),
4. random horizontal mirror,
5. resize to a fixed ``INPUT_SIZE`` x ``INPUT_SIZE`` square (aspect ratio not kept).

detectron2 already provides the flip (:class:`detectron2.data.transforms.RandomFlip`), the resize
(:class:`detectron2.data.transforms.Resize`) and the crop sampling
(:class:`detectron2.data.transforms.MinIoURandomCrop`); they are reused here. This module adds only
what has no detectron2 equivalent:

* :class:`PhotometricDistortTransform` / :class:`RandomPhotometricDistort`: detectron2's
  ``RandomBrightness/RandomContrast/RandomSaturation`` are multiplicative blends that clip to uint8
  after every step, always applied; SSD adds a brightness offset, scales contrast about 0, edits
  saturation and hue in HSV, applies each step with probability 0.5 and never clips in between.
* :class:`ExpandTransform` / :class:`RandomExpand`: ``PadTransform`` pads with one scalar, the
  expand canvas needs the per-channel pixel mean.
* :class:`SSDRandomCrop`: detectron2's ``MinIoURandomCrop`` sampling, returning detectron2's
  ``CropTransform`` (polygons clipped by ``shapely``), but never cropping an image without boxes.

All geometric transforms here are axis-aligned scalings, translations and mirrors, so boxes (via
``apply_coords``), polygons and bitmasks (``apply_segmentation``) stay consistent with each other.
Coordinates are absolute pixels throughout, (x, y) order.
"""
import logging
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from numpy import random as npr

import detectron2.data.transforms as T
from detectron2.data.transforms import Augmentation, NoOpTransform, Transform

from ..errors import ConfigError

__all__ = [
    "YOLACT_CROP_MIN_IOUS",
    "SSD_CROP_MIN_IOUS",
    "PhotometricDistortTransform",
    "RandomPhotometricDistort",
    "ExpandTransform",
    "RandomExpand",
    "SSDRandomCrop",
    "build_yolact_train_augmentation",
]

logger = logging.getLogger(__name__)

# IoU thresholds of the crop's constrained modes. The original YOLACT code tests
# ``overlap.min() < min_iou and max_iou < overlap.max()`` with ``max_iou = inf``: the test is never
# true, so every constrained mode accepts any crop (the author kept this "bug" on purpose: fixing it
# halved mAP early in training). Thresholds of 0 reproduce that exactly with detectron2's sampler
# (1/6 no crop, 5/6 an unconstrained crop keeping at least one object centre).
YOLACT_CROP_MIN_IOUS = (0.0, 0.0, 0.0, 0.0)
# The thresholds the SSD paper (Sec. 2.2) and YOLACT's comments intend. Note detectron2's sampler
# requires *every* box to reach the threshold, which is rarely possible on crowded images.
SSD_CROP_MIN_IOUS = (0.1, 0.3, 0.7, 0.9)

_HSV_CODES = {
    "RGB": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB),
    "BGR": (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR),
}


def _check_color_format(image_format: str) -> None:
    if image_format not in _HSV_CODES:
        raise ConfigError(
            f"Photometric distortion needs a colour image in 'RGB' or 'BGR' order, got "
            f"INPUT.FORMAT={image_format!r}; set INPUT.SSD.PHOTOMETRIC: False for other formats."
        )


class PhotometricDistortTransform(Transform):
    """SSD photometric distortion with fixed parameters; geometry is left unchanged.

    Applied to a float copy of the image, in this order (original ``PhotometricDistort``):
    ``img + brightness_delta``; ``img * contrast_alpha`` if ``contrast_first``; in HSV (hue in
    degrees [0, 360), saturation in [0, 1]) saturation ``* saturation_scale`` and hue
    ``+ hue_delta`` modulo 360; ``img * contrast_alpha`` if not ``contrast_first``. Intermediate
    values are not clipped (as in the original); the result is clipped to [0, 255] once at the end.

    Args:
        brightness_delta: added to every channel, in intensity units (0-255 scale); 0 = unchanged.
        contrast_alpha: multiplier of the intensities (about 0, not about the mean); 1 = unchanged.
        contrast_first: whether the contrast step comes before the HSV step (else after).
        saturation_scale: multiplier of HSV saturation; 1 = unchanged.
        hue_delta: hue shift in degrees; 0 = unchanged.
        image_format: channel order of the images it will see, "RGB" or "BGR" (cfg.INPUT.FORMAT).

    Raises:
        ValueError: ``image_format`` is not "RGB" or "BGR".
    """

    def __init__(
        self,
        brightness_delta: float = 0.0,
        contrast_alpha: float = 1.0,
        contrast_first: bool = True,
        saturation_scale: float = 1.0,
        hue_delta: float = 0.0,
        image_format: str = "RGB",
    ):
        super().__init__()
        _check_color_format(image_format)
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Distort an HxWx3 image (uint8, or float in 0-255); returns the same shape and dtype.

        uint8 results are rounded; all results are clipped to [0, 255].
        """
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"Photometric distortion expects an HxWx3 image, got shape {img.shape}"
            )
        out = img.astype(np.float32)  # always a copy
        if self.brightness_delta != 0:
            out += self.brightness_delta
        if self.contrast_first and self.contrast_alpha != 1:
            out *= self.contrast_alpha
        if self.saturation_scale != 1 or self.hue_delta != 0:
            to_hsv, from_hsv = _HSV_CODES[self.image_format]
            # float32 HSV in OpenCV: H in degrees [0, 360), S in [0, 1], V in the input's scale.
            hsv = cv2.cvtColor(out, to_hsv)
            hsv[:, :, 1] *= self.saturation_scale
            hsv[:, :, 0] = np.mod(hsv[:, :, 0] + self.hue_delta, 360.0)
            out = cv2.cvtColor(hsv, from_hsv)
        if not self.contrast_first and self.contrast_alpha != 1:
            out *= self.contrast_alpha
        np.clip(out, 0, 255, out=out)
        if img.dtype == np.uint8:
            return np.rint(out).astype(np.uint8)
        return out.astype(img.dtype)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Identity: colours only."""
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """Identity: colours only."""
        return segmentation

    def inverse(self) -> Transform:
        # Like detectron2's ColorTransform: geometry is unchanged, colour is not invertible.
        return NoOpTransform()


class RandomPhotometricDistort(Augmentation):
    """Draw :class:`PhotometricDistortTransform` parameters as the original ``PhotometricDistort``.

    Each of brightness, contrast, saturation and hue is applied independently with probability
    ``prob`` (original: 0.5), with ``brightness_delta ~ U(-32, 32)``,
    ``contrast_alpha ~ U(0.5, 1.5)``, ``saturation_scale ~ U(0.5, 1.5)``,
    ``hue_delta ~ U(-18, 18)`` degrees; contrast comes before or
    after the HSV step with probability 0.5. Random numbers come from ``numpy.random``.

    Args:
        brightness_delta: half-width of the brightness offset range, intensity units (0-255 scale).
        contrast_range: (low, high) of the contrast multiplier.
        saturation_range: (low, high) of the saturation multiplier.
        hue_delta: half-width of the hue shift range, degrees.
        prob: probability of applying each of the four steps.
        image_format: "RGB" or "BGR" (cfg.INPUT.FORMAT).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        prob: float = 0.5,
        image_format: str = "RGB",
    ):
        super().__init__()
        _check_color_format(image_format)  # fail when building, not on the first image
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        # Draw order follows the original: brightness, order coin, then the steps in their order.
        brightness = 0.0
        if npr.uniform() < self.prob:
            brightness = npr.uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = bool(npr.uniform() < 0.5)

        def contrast():
            if npr.uniform() < self.prob:
                return npr.uniform(*self.contrast_range)
            return 1.0

        alpha = contrast() if contrast_first else 1.0
        saturation = npr.uniform(*self.saturation_range) if npr.uniform() < self.prob else 1.0
        hue = npr.uniform(-self.hue_delta, self.hue_delta) if npr.uniform() < self.prob else 0.0
        if not contrast_first:
            alpha = contrast()
        return PhotometricDistortTransform(
            brightness_delta=float(brightness),
            contrast_alpha=float(alpha),
            contrast_first=contrast_first,
            saturation_scale=float(saturation),
            hue_delta=float(hue),
            image_format=self.image_format,
        )


class ExpandTransform(T.PadTransform):
    """Place the image on a larger canvas filled with a per-channel value (SSD "expand"/zoom out).

    The output is ``(orig_h + y0 + y1) x (orig_w + x0 + x1)``, the input pasted with its top-left
    corner at pixel (x0, y0). Coordinates move by (+x0, +y0); segmentation masks are padded with 0.
    Inherits ``apply_coords``, ``apply_segmentation`` and ``inverse`` (a crop) from detectron2's
    ``PadTransform``, which can only fill the image with one scalar.

    Args:
        x0, y0, x1, y1: canvas margins in pixels (left, top, right, bottom), all >= 0.
        orig_w, orig_h: size of the input image in pixels.
        fill: canvas colour, one value per channel in the image's channel order (e.g. the pixel mean
            in cfg.INPUT.FORMAT order), 0-255 scale; rounded to the nearest integer for uint8
            images.
    """

    def __init__(
        self,
        x0: int,
        y0: int,
        x1: int,
        y1: int,
        orig_w: Optional[int] = None,
        orig_h: Optional[int] = None,
        fill: Sequence[float] = (0.0, 0.0, 0.0),
    ):
        super().__init__(x0, y0, x1, y1, orig_w=orig_w, orig_h=orig_h, pad_value=0, seg_pad_value=0)
        self.fill = tuple(float(v) for v in fill)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Return the canvas: HxW or HxWxC input -> (H+y0+y1)x(W+x0+x1)[xC], same dtype."""
        h, w = img.shape[:2]
        fill = np.asarray(self.fill, dtype=np.float64)
        if img.ndim == 2:
            fill = fill.mean()
        elif fill.size not in (1, img.shape[2]):
            raise ValueError(
                f"Expand fill has {fill.size} values but the image has {img.shape[2]} channels"
            )
        if img.dtype == np.uint8:
            fill = np.clip(np.rint(fill), 0, 255)
        canvas = np.empty((h + self.y0 + self.y1, w + self.x0 + self.x1) + img.shape[2:], img.dtype)
        canvas[...] = fill
        canvas[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = img
        return canvas


class RandomExpand(Augmentation):
    """With probability ``prob``, zoom out: the original ``Expand`` augmentation.

    ``ratio ~ U(1, max_ratio)``; the canvas is ``int(h * ratio) x int(w * ratio)`` pixels and the
    image's top-left corner goes to ``(int(U(0, w*ratio - w)), int(U(0, h*ratio - h)))``.

    Args:
        max_ratio: largest canvas side / image side (cfg.INPUT.SSD.MAX_EXPAND, original 4), >= 1.
        fill: canvas colour per channel, image channel order, 0-255 (cfg.MODEL.PIXEL_MEAN).
        prob: probability of expanding (original 0.5).
    """

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[float] = (0.0, 0.0, 0.0), prob=0.5):
        super().__init__()
        if max_ratio < 1:
            raise ConfigError(f"INPUT.SSD.MAX_EXPAND must be >= 1, got {max_ratio}")
        fill = tuple(float(v) for v in fill)
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        if npr.uniform() >= self.prob:
            return NoOpTransform()
        h, w = image.shape[:2]
        ratio = npr.uniform(1.0, self.max_ratio)
        left = npr.uniform(0.0, w * ratio - w)
        top = npr.uniform(0.0, h * ratio - h)
        new_w, new_h = max(int(w * ratio), w), max(int(h * ratio), h)
        # min(): float rounding must not push the image past the canvas edge.
        x0, y0 = min(int(left), new_w - w), min(int(top), new_h - h)
        return ExpandTransform(
            x0, y0, new_w - w - x0, new_h - h - y0, orig_w=w, orig_h=h, fill=self.fill
        )


class SSDRandomCrop(T.MinIoURandomCrop):
    """SSD / YOLACT random sample crop: detectron2's ``MinIoURandomCrop`` sampling, own crop.

    Sampling (inherited, same as the original ``RandomSampleCrop``): pick a mode among "no crop",
    each of ``min_ious`` and "any crop" uniformly; try up to 50 windows of size
    ``U(0.3, 1) * (w, h)`` with h/w in [0.5, 2] at a random position, accept one whose IoU with
    every box is at least the mode's threshold and that contains at least one box centre.
    Deviation handled here: an image without boxes is
    not cropped (the original never crops those either; detectron2 would).
    Dropping the objects whose centre falls outside the window is the dataset mapper's job.

    Args:
        min_ious: IoU thresholds of the constrained modes; :data:`YOLACT_CROP_MIN_IOUS` (default)
            reproduces the original code, :data:`SSD_CROP_MIN_IOUS` the paper's intent.
        min_crop_size: smallest window side as a fraction of the image side.
        mode_trials, crop_trials: sampling attempts, as in detectron2.

    ``get_transform(image, boxes)`` takes ``boxes`` as an Nx4 float array, XYXY absolute pixels, of
    the non-crowd objects (crowd regions must not make a crop valid).
    """

    def __init__(
        self,
        min_ious: Sequence[float] = YOLACT_CROP_MIN_IOUS,
        min_crop_size: float = 0.3,
        mode_trials: int = 1000,
        crop_trials: int = 50,
    ):
        super().__init__(
            min_ious=tuple(min_ious),
            min_crop_size=min_crop_size,
            mode_trials=mode_trials,
            crop_trials=crop_trials,
        )

    def get_transform(self, image, boxes):
        if boxes is None or len(boxes) == 0:
            return NoOpTransform()
        tfm = super().get_transform(image, np.asarray(boxes, dtype=np.float32))
        # CropTransform (its polygons are clipped with shapely), NoOpTransform, or None if every trial failed (practically impossible: "no crop" is a mode)
        return tfm if tfm is not None else NoOpTransform()


def build_yolact_train_augmentation(
    cfg, *, crop_min_ious: Sequence[float] = YOLACT_CROP_MIN_IOUS
) -> List[Augmentation]:
    """The YOLACT training augmentations, in the original order, from a config.

    Config keys: INPUT.SSD.ENABLED (off: only flip and resize), INPUT.SSD.PHOTOMETRIC,
    INPUT.SSD.EXPAND with INPUT.SSD.MAX_EXPAND and MODEL.PIXEL_MEAN as canvas colour (in
    INPUT.FORMAT channel order, 0-255), INPUT.SSD.MIN_IOU_CROP, INPUT.RANDOM_FLIP ("horizontal",
    "vertical" or "none"; p = 0.5) and MODEL.YOLACT.INPUT_SIZE (final square side, pixels).

    Args:
        cfg: a detectron2 CfgNode with :func:`yolact_d2.config.add_yolact_config` applied.
        crop_min_ious: IoU thresholds of :class:`SSDRandomCrop`.

    Returns:
        list[Augmentation]: for ``T.AugmentationList``; the output image is always
        ``INPUT_SIZE x INPUT_SIZE``.

    Raises:
        ValueError: unknown INPUT.RANDOM_FLIP, MAX_EXPAND < 1, or photometric distortion with an
            INPUT.FORMAT other than "RGB"/"BGR".
    """
    size = int(cfg.MODEL.YOLACT.INPUT_SIZE)
    augs: List[Augmentation] = []
    ssd = cfg.INPUT.SSD
    if ssd.ENABLED:
        if ssd.PHOTOMETRIC:
            augs.append(RandomPhotometricDistort(image_format=cfg.INPUT.FORMAT))
        if ssd.EXPAND:
            augs.append(RandomExpand(max_ratio=float(ssd.MAX_EXPAND), fill=cfg.MODEL.PIXEL_MEAN))
        if ssd.MIN_IOU_CROP:
            augs.append(SSDRandomCrop(min_ious=crop_min_ious))
    flip = cfg.INPUT.RANDOM_FLIP
    if flip not in ("horizontal", "vertical", "none"):
        raise ConfigError(
            f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {flip!r}"
        )
    if flip != "none":
        augs.append(
            T.RandomFlip(prob=0.5, horizontal=flip == "horizontal", vertical=flip == "vertical")
        )
    # Fixed square, aspect ratio not kept (original Resize with preserve_aspect_ratio=False).
    augs.append(T.Resize((size, size)))
    logger.debug("YOLACT train augmentations: %s", augs)
    return augs
