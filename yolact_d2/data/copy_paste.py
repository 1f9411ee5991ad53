"""Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method
for Instance Segmentation", CVPR 2021), on top of :class:`YolactDatasetMapper`.

Not in the original YOLACT; off by default (``INPUT.COPY_PASTE.ENABLED``). Each training image, with
probability ``PROB``, receives the objects of ``SOURCES`` other training images, one after the other:

1. the source image is mapped by the same YOLACT training pipeline (its own photometric distortion,
   flip and square resize), so both are ``INPUT_SIZE x INPUT_SIZE``;
2. a random subset of its objects is chosen (each with probability 0.5, at least one);
3. the source is scaled by ``s ~ U(SCALE)`` (``s <= 1``) and placed at a random offset inside the
   target (detectron2's ``ResizeTransform`` + ``PadTransform``, so image and masks move together);
4. the chosen objects' pixels replace the target's; every earlier mask loses the pasted pixels;
5. every box is recomputed as the tight box of its visible mask, and objects left empty or below
   ``INPUT.SSD.MIN_BOX_SIZE`` (fully or almost fully covered) are dropped.

Masks come out as ``BitMasks`` whatever ``INPUT.MASK_FORMAT`` is (pasting works on pixels).
"""
import logging
from typing import List, Optional, Tuple

import numpy as np
import torch
from numpy import random as npr

import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.data.common import DatasetFromList
from detectron2.structures import BitMasks, Instances

from .dataset_mapper import YolactDatasetMapper
from ..errors import ConfigError
from ..losses import gt_masks_as_tensor

__all__ = ["CopyPasteDatasetMapper", "paste_instances", "check_copy_paste_config"]

logger = logging.getLogger(__name__)

# Source images tried before giving up on one paste (a source may have no object left after its
# own augmentation, or be unreadable).
_SOURCE_TRIALS = 5


def check_copy_paste_config(cfg) -> None:
    """Raise :class:`ConfigError` (one line naming the key) on ``INPUT.COPY_PASTE`` values that
    cannot work: PROB outside [0, 1], SOURCES < 1, SCALE not 0 < min <= max <= 1, or copy-paste
    with a model other than YOLACT (only the YOLACT mapper pastes)."""
    cp = cfg.INPUT.COPY_PASTE
    if not cp.ENABLED:
        return
    if cfg.MODEL.META_ARCHITECTURE != "YOLACT":
        raise ConfigError(
            f"INPUT.COPY_PASTE.ENABLED needs MODEL.META_ARCHITECTURE YOLACT (got {cfg.MODEL.META_ARCHITECTURE}); "
            "set INPUT.COPY_PASTE.ENABLED False"
        )
    if not 0.0 <= float(cp.PROB) <= 1.0:
        raise ConfigError(f"INPUT.COPY_PASTE.PROB must be in [0, 1], got {cp.PROB}")
    if int(cp.SOURCES) < 1:
        raise ConfigError(f"INPUT.COPY_PASTE.SOURCES must be >= 1, got {cp.SOURCES}")
    lo, hi = (float(v) for v in cp.SCALE)
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"INPUT.COPY_PASTE.SCALE must be (min, max) with 0 < min <= max <= 1, got {tuple(cp.SCALE)}")


def _scaled_size(scale: float, h: int, w: int) -> Tuple[int, int]:
    # (height, width) in pixels of an h x w source scaled by `scale`, at least 1 x 1.
    return max(1, int(round(scale * h))), max(1, int(round(scale * w)))


def paste_instances(
    image: np.ndarray,
    instances: Instances,
    src_image: np.ndarray,
    src_instances: Instances,
    chosen: np.ndarray,
    scale: float,
    offset: Tuple[int, int],
    min_box_size: float = 0.0,
) -> Tuple[np.ndarray, Instances]:
    """Paste the ``chosen`` objects of a source image onto a target image.

    Args:
        image: (H, W, 3) uint8 target image (channel order as the model's INPUT.FORMAT).
        instances: the target's ``Instances`` (``gt_boxes``, ``gt_classes``, ``gt_masks`` of any
            detectron2 mask type), image size (H, W).
        src_image: (H, W, 3) uint8 source image, the same size as ``image``.
        src_instances: the source's ``Instances``, image size (H, W).
        chosen: (M,) bool, which source objects to paste (M = len(src_instances)).
        scale: the source is resized to (round(scale * H), round(scale * W)) pixels, 0 < scale <= 1.
        offset: (x0, y0), pixels, the top-left corner of the scaled source in the target;
            0 <= x0 <= W - new width, 0 <= y0 <= H - new height.
        min_box_size: objects whose visible box is narrower or shorter than this (pixels) are dropped.

    Returns:
        (new image (H, W, 3) uint8, new ``Instances``): the target's objects first (their masks
        minus the pasted pixels), then the pasted ones; ``gt_masks`` as ``BitMasks`` (N, H, W);
        ``gt_boxes`` the tight XYXY box of each visible mask (pixel edges: a mask covering
        columns a..b has x1 = a, x2 = b + 1); objects with an empty mask or a box side below
        ``min_box_size`` dropped.

    Raises:
        ValueError: images of different sizes, or a scaled source that does not fit at ``offset``.
    """
    h, w = image.shape[:2]
    if src_image.shape[:2] != (h, w):
        raise ValueError(f"copy-paste needs images of one size, got {image.shape[:2]} and {src_image.shape[:2]}")
    nh, nw = _scaled_size(scale, h, w)
    x0, y0 = int(offset[0]), int(offset[1])
    if not (0 <= x0 <= w - nw and 0 <= y0 <= h - nh):
        raise ValueError(f"a source of {nw}x{nh} pixels does not fit a {w}x{h} image at offset {(x0, y0)}")
    tfm = T.TransformList([
        T.ResizeTransform(h, w, nh, nw),
        T.PadTransform(x0, y0, w - nw - x0, h - nh - y0, orig_w=nw, orig_h=nh),
    ])
    chosen = torch.as_tensor(chosen, dtype=torch.bool)
    dst_masks = gt_masks_as_tensor(instances) > 0.5
    # Each chosen source mask moved with its image (nearest-neighbour resize, zero padding).
    pasted = torch.zeros((int(chosen.sum()), h, w), dtype=torch.bool)
    for k, m in enumerate(gt_masks_as_tensor(src_instances)[chosen]):
        pasted[k] = torch.from_numpy(tfm.apply_segmentation(m.numpy().astype(np.uint8)).astype(bool))
    covered = pasted.any(dim=0)

    out_image = image.copy()
    where = covered.numpy()
    out_image[where] = tfm.apply_image(src_image)[where]

    masks = torch.cat([dst_masks & ~covered, pasted], dim=0)
    classes = torch.cat([instances.gt_classes, src_instances.gt_classes[chosen]])
    out = Instances((h, w))
    out.gt_masks = BitMasks(masks)
    out.gt_boxes = out.gt_masks.get_bounding_boxes()
    out.gt_classes = classes
    wh = out.gt_boxes.tensor[:, 2:] - out.gt_boxes.tensor[:, :2]
    keep = masks.flatten(1).any(dim=1) & (wh >= min_box_size).all(dim=1)
    return out_image, out[keep]


class CopyPasteDatasetMapper(YolactDatasetMapper):
    """:class:`YolactDatasetMapper` that pastes the objects of other training images onto each
    training image (module docstring; keys ``INPUT.COPY_PASTE.*``). Test mode is unchanged.

    The output dict is the parent's; its "instances" carry ``BitMasks``. Randomness comes from
    numpy's global generator, as detectron2's augmentations (seeded per loader worker).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        dataset_dicts: List[dict],
        prob: float = 1.0,
        sources: int = 1,
        scale: Tuple[float, float] = (0.5, 1.0),
        **kwargs,
    ):
        """
        Args:
            dataset_dicts: the training dataset dicts the sources are drawn from (held serialised,
                as detectron2's ``DatasetFromList``).
            prob: chance that an image receives pasted objects.
            sources: images pasted from, one after the other.
            scale: (min, max) of the source's scale factor, 0 < min <= max <= 1.
            kwargs: :class:`YolactDatasetMapper`'s arguments.
        """
        super().__init__(is_train, **kwargs)
        self.sources_pool = DatasetFromList(list(dataset_dicts), copy=False, serialize=True)
        self.prob = float(prob)
        self.sources = int(sources)
        self.scale = (float(scale[0]), float(scale[1]))

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_dicts: Optional[List[dict]] = None):
        check_copy_paste_config(cfg)
        if dataset_dicts is None:
            raise ConfigError("CopyPasteDatasetMapper needs the training dataset dicts (dataset_dicts=...)")
        args = super().from_config(cfg, is_train)
        cp = cfg.INPUT.COPY_PASTE
        args.update(dataset_dicts=dataset_dicts, prob=cp.PROB, sources=cp.SOURCES, scale=tuple(cp.SCALE))
        return args

    def _source(self) -> Optional[dict]:
        # A mapped random training image with at least one object, or None.
        for _ in range(_SOURCE_TRIALS):
            d = YolactDatasetMapper.__call__(self, self.sources_pool[npr.randint(len(self.sources_pool))])
            if d is not None and len(d["instances"]):
                return d
        return None

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        out = super().__call__(dataset_dict)
        if out is None or not self.is_train or npr.rand() >= self.prob:
            return out
        image = out["image"].permute(1, 2, 0).numpy()
        instances = out["instances"]
        h, w = image.shape[:2]
        for _ in range(self.sources):
            src = self._source()
            if src is None:
                continue
            src_image = src["image"].permute(1, 2, 0).numpy()
            if src_image.shape[:2] != (h, w):
                raise ConfigError(
                    "INPUT.COPY_PASTE needs training images of one size; the training augmentation gave "
                    f"{image.shape[:2]} and {src_image.shape[:2]} (keep its final square resize)"
                )
            n = len(src["instances"])
            chosen = npr.rand(n) < 0.5
            if not chosen.any():
                chosen[npr.randint(n)] = True
            s = npr.uniform(*self.scale)
            nh, nw = _scaled_size(s, h, w)
            offset = (npr.randint(w - nw + 1), npr.randint(h - nh + 1))
            image, instances = paste_instances(
                image, instances, src_image, src["instances"], chosen, s, offset, self.min_box_size
            )
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["instances"] = instances
        return out
