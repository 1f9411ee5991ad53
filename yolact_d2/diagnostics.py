"""Diagnostics of YOLACT training: a collapse named while it happens, prior coverage before it starts.

YOLACT trained from scratch can collapse silently (docs/small_data_recipe.md): the FPN's output ReLUs die,
P3-P5 become zero on every pixel, P6/P7 constants, the prototypes die with P3, and every photo gets
the same detections; or most objects have no prior at the positive IoU threshold and train only
their forced best-prior match. Neither shows in the losses until the run ends at AP 0.

- :class:`TrainingDiagnostics` turns what each training step already computed (the FPN levels, the
  prototypes, the prior matching) into scalars for detectron2's ``EventStorage`` (so metrics.json,
  TensorBoard and the console print them every 20 iterations) and warns once per run, naming the
  options that fix what it sees.
- :func:`prior_coverage` / :func:`dataset_prior_coverage` count, for a set of priors and the
  training set's boxes, the priors at IoU >= the positive threshold per object and the objects with
  none; train_net.py logs that table before the first iteration.
"""
import logging
import math
from collections import deque
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tabulate import tabulate
from torchvision.ops import box_iou

from detectron2.structures import BoxMode
from detectron2.utils.events import get_event_storage

from .errors import ConfigError
from .priors import feature_sizes, make_priors, priors_to_boxes  # noqa: F401 (feature_sizes: re-exported)

__all__ = [
    "DEAD_EPS",
    "dead_channel_share",
    "TrainingDiagnostics",
    "feature_sizes",
    "prior_coverage",
    "dataset_prior_coverage",
    "square_boxes",
    "format_coverage",
    "log_dataset_prior_coverage",
    "warn_small_batch_norm",
]

logger = logging.getLogger(__name__)

# A channel is dead on an image when its max - min over the image is below this: ReLU zeros and
# the constant P6/P7 computed from a dead P5 alike.
DEAD_EPS = 1e-6

_FIX_DEAD = (
    "train with MODEL.FPN.NORM 'GN', MODEL.YOLACT.HEAD_NORM 'GN', MODEL.YOLACT.PROTONET_NORM 'GN', "
    "MODEL.YOLACT.FPN_OUTPUT_RELU False and MODEL.YOLACT.PROTOTYPE_ACTIVATION 'none' "
    "(configs/Base-YOLACT-SmallData.yaml), or start from ImageNet / released weights"
)
_FIX_FORCED = (
    "use priors with their true aspect ratios and 3 scales per level (MODEL.YOLACT.SQUARE_ANCHORS False, "
    "ANCHOR_SCALES as configs/Base-YOLACT-SmallData.yaml), scales that fit the data's objects, or a "
    "lower MODEL.YOLACT.POS_IOU_THRESH (0.4)"
)


def dead_channel_share(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Share of (image, channel) pairs that are constant over the image (max - min < DEAD_EPS).

    Args:
        x: (N, C, H, W) feature maps, or (N, H, W, C) with ``channels_last`` (the prototypes).
    Returns:
        0-dim float tensor in [0, 1] on ``x``'s device; no gradient.
    """
    x = x.detach()
    flat = x.flatten(1, 2) if channels_last else x.flatten(2).transpose(1, 2)  # (N, HW, C)
    lo, hi = torch.aminmax(flat, dim=1)
    return ((hi - lo) < DEAD_EPS).float().mean()


class TrainingDiagnostics:
    """Per-step diagnostics of a YOLACT model in training; built by the model from
    ``MODEL.YOLACT.DIAGNOSTICS`` and called by its training forward with tensors it computed anyway.

    Scalars written (names prefixed ``[metric]`` so detectron2's console printer shows them):
    ``dead/p3`` ... ``dead/p7`` and ``dead/prototypes`` (share of dead channels, see
    :func:`dead_channel_share`), ``match/pos_per_object`` (priors labelled positive per
    ground-truth object in the batch), ``match/forced_only`` (share of objects with no prior at
    IoU >= POS_IOU_THRESH, whose only positive is the forced best-prior match) and
    ``match/fg_prob_pos`` (mean probability of the ground-truth class on positive priors).

    Outside an ``EventStorage`` (unit tests, a hand-written loop) nothing is written, but the
    warnings still work. A warning fires once per run and per kind (dead features, forced-only
    matches) when the mean of the last ``window`` steps passes its threshold.
    """

    def __init__(self, window: int = 20, dead_share_warn: float = 0.5, forced_only_warn: float = 0.5):
        if window < 1:
            raise ConfigError(f"MODEL.YOLACT.DIAGNOSTICS.WARN_WINDOW must be >= 1, got {window}")
        self.window = window
        self.dead_share_warn = dead_share_warn
        self.forced_only_warn = forced_only_warn
        self._history: Dict[str, deque] = {}
        self.warned: Dict[str, str] = {}  # kind -> message, once per run

    def __call__(
        self, level_features: Dict[str, torch.Tensor], prototypes: torch.Tensor, match: Dict[str, torch.Tensor]
    ) -> Dict[str, float]:
        """Record one training step.

        Args:
            level_features: name -> (N, C, h, w) FPN level fed to the head (e.g. "p3".."p7").
            prototypes: (N, h, w, k) protonet output.
            match: from :class:`~yolact_d2.losses.YolactLoss` (its ``stats`` argument):
                ``num_objects``, ``num_positive``, ``forced_only`` (counts, 0-dim) and
                ``fg_prob_pos`` (0-dim, NaN without positives).
        Returns:
            name -> value of this step, the names written to the event storage.
        """
        names, values = [], []
        for name, x in level_features.items():
            names.append(f"dead/{name}")
            values.append(dead_channel_share(x))
        names.append("dead/prototypes")
        values.append(dead_channel_share(prototypes, channels_last=True))
        objects = match["num_objects"].float()
        if objects.item() > 0:
            names += ["match/pos_per_object", "match/forced_only"]
            values += [match["num_positive"].float() / objects, match["forced_only"].float() / objects]
        if torch.isfinite(match["fg_prob_pos"]):
            names.append("match/fg_prob_pos")
            values.append(match["fg_prob_pos"].float())
        scalars = dict(zip(names, torch.stack([v.to(values[0].device) for v in values]).tolist()))
        try:
            storage = get_event_storage()
        except AssertionError:  # not inside a detectron2 training loop
            storage = None
        if storage is not None:
            storage.put_scalars(**{f"[metric]{k}": v for k, v in scalars.items()})
        self._check(scalars)
        return scalars

    def _mean(self, name: str, value: Optional[float]) -> Optional[float]:
        hist = self._history.setdefault(name, deque(maxlen=self.window))
        if value is not None:
            hist.append(value)
        return sum(hist) / len(hist) if len(hist) == self.window else None

    def _check(self, scalars: Dict[str, float]) -> None:
        dead = {}
        for name, value in scalars.items():
            if name.startswith("dead/"):
                mean = self._mean(name, value)
                if mean is not None and mean > self.dead_share_warn:
                    dead[name[5:]] = mean
        if dead and "dead" not in self.warned:
            what = ", ".join(f"{k} {100 * v:.0f}%" for k, v in dead.items())
            self._warn("dead", (
                f"YOLACT training is collapsing: channels constant over the image (dead) in {what} "
                f"over the last {self.window} iterations: they carry nothing about the photo, so what they feed "
                "(the head's detections, the masks) stops depending on it; "
                + _FIX_DEAD
            ))
        forced = self._mean("match/forced_only", scalars.get("match/forced_only"))
        if forced is not None and forced > self.forced_only_warn and "forced" not in self.warned:
            self._warn("forced", (
                f"{100 * forced:.0f}% of the ground-truth objects have no prior at IoU >= the positive "
                f"threshold (last {self.window} iterations) and train only their forced best match; "
                + _FIX_FORCED
            ))

    def _warn(self, kind: str, message: str) -> None:
        self.warned[kind] = message
        logger.warning(message)


# ----------------------------------------------------------------------------- prior coverage
def prior_coverage(boxes: Sequence[torch.Tensor], priors: torch.Tensor, pos_thresh: float) -> Dict[str, float]:
    """How well priors cover a set of objects.

    Args:
        boxes: per image, (G, 4) ground-truth boxes (x0, y0, x1, y1) relative to the square network
            input (0..1), i.e. in the frame the loss matches in.
        priors: (A, 4) (cx, cy, w, h) relative, as :func:`~yolact_d2.priors.make_priors` makes them.
        pos_thresh: the positive IoU threshold (MODEL.YOLACT.POS_IOU_THRESH).
    Returns:
        ``objects`` (count), ``priors_per_object`` (mean count of priors at IoU >= pos_thresh),
        ``objects_without`` (share in [0, 1] with none: only the forced best-prior match trains
        them) and ``median_best_iou`` (median over objects of the best prior's IoU); NaN for the
        last three when there are no objects.
    """
    prior_boxes = priors_to_boxes(priors)
    counts, best = [], []
    for b in boxes:
        if len(b) == 0:
            continue
        iou = box_iou(b.float(), prior_boxes)
        counts.append((iou >= pos_thresh).sum(dim=1))
        best.append(iou.max(dim=1).values)
    if not counts:
        return {"objects": 0, "priors_per_object": float("nan"), "objects_without": float("nan"),
                "median_best_iou": float("nan")}
    counts, best = torch.cat(counts), torch.cat(best)
    return {
        "objects": int(counts.numel()),
        "priors_per_object": counts.float().mean().item(),
        "objects_without": (counts == 0).float().mean().item(),
        "median_best_iou": best.median().item(),
    }


def dataset_prior_coverage(cfg, dataset_dicts: List[dict], max_images: int = 2000) -> Dict[str, float]:
    """:func:`prior_coverage` of the configured priors over a dataset's non-crowd boxes, each image
    stretched to the square ``MODEL.YOLACT.INPUT_SIZE`` input as the training resize does (without
    the random augmentations). At most ``max_images`` images, evenly spaced, are counted.

    Also returns ``num_priors``, ``input_size``, ``pos_thresh`` and ``images``.
    """
    y = cfg.MODEL.YOLACT
    levels = [int(f.lstrip("p")) for f in y.IN_FEATURES]
    priors = make_priors(feature_sizes(y.INPUT_SIZE, levels), y.ANCHOR_SCALES, y.ANCHOR_ASPECT_RATIOS,
                         y.INPUT_SIZE, y.SQUARE_ANCHORS)
    boxes, images = square_boxes(dataset_dicts, max_images)
    out = prior_coverage(boxes, priors, y.POS_IOU_THRESH)
    out.update(num_priors=int(priors.shape[0]), input_size=int(y.INPUT_SIZE), pos_thresh=float(y.POS_IOU_THRESH),
               images=images)
    return out


def square_boxes(dataset_dicts: List[dict], max_images: int = 2000):
    """The non-crowd boxes of at most ``max_images`` images (evenly spaced) of a dataset, relative
    to the image, i.e. in the square network input's frame after the training resize.

    Returns:
        (boxes, images): per image with such boxes, a (G, 4) float32 tensor (x0, y0, x1, y1) in
        0..1; and the number of images looked at.
    """
    step = max(1, math.ceil(len(dataset_dicts) / max_images))
    picked = dataset_dicts[::step]
    boxes = []
    for d in picked:
        annos = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        if not annos:
            continue
        xyxy = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos], np.float32)
        scale = np.array([d["width"], d["height"], d["width"], d["height"]], np.float32)
        boxes.append(torch.from_numpy(xyxy / scale))
    return boxes, len(picked)


def format_coverage(cov: Dict[str, float], title: str = "") -> str:
    """The coverage of :func:`dataset_prior_coverage` as a one-row table for the log."""
    row = [
        cov["num_priors"], cov["input_size"], cov["images"], cov["objects"],
        f"{cov['priors_per_object']:.2f}", f"{100 * cov['objects_without']:.0f}%", f"{cov['median_best_iou']:.2f}",
    ]
    headers = ["priors", "input", "images", "objects", f"priors at IoU>={cov['pos_thresh']:g} per object",
               "objects with none", "median best IoU"]
    table = tabulate([row], headers=headers, tablefmt="pipe")
    return f"{title}\n{table}" if title else table


def log_dataset_prior_coverage(cfg, dataset_dicts: List[dict], warn_share: float = 0.5) -> Dict[str, float]:
    """Log :func:`dataset_prior_coverage` as a table before training; warn when more than
    ``warn_share`` of the objects have no prior at the positive threshold."""
    cov = dataset_prior_coverage(cfg, dataset_dicts)
    logger.info(format_coverage(cov, "Prior coverage of the training set (boxes at the square input size):"))
    if cov["objects"] and cov["objects_without"] > warn_share:
        logger.warning(
            f"{100 * cov['objects_without']:.0f}% of the training objects have no prior at IoU >= "
            f"{cov['pos_thresh']:g} (median best IoU {cov['median_best_iou']:.2f}): they will train only their "
            "forced best-prior match; " + _FIX_FORCED
        )
    return cov


def warn_small_batch_norm(cfg, world_size: int = 1, min_images: Optional[int] = None) -> bool:
    """Warn (once, at start) when the ResNet's trainable BatchNorm sees fewer than ``min_images``
    images per GPU (default ``MODEL.YOLACT.DIAGNOSTICS.MIN_BN_IMAGES``, 6): its batch statistics are
    then noisy, and the original froze BN below 6.

    Returns True when it warned.
    """
    if min_images is None:
        min_images = cfg.MODEL.YOLACT.DIAGNOSTICS.MIN_BN_IMAGES
    per_gpu = cfg.SOLVER.IMS_PER_BATCH / max(1, world_size)
    if cfg.MODEL.RESNETS.NORM != "BN" or per_gpu >= min_images:
        return False
    logger.warning(
        f"MODEL.RESNETS.NORM is 'BN' with {per_gpu:g} images per GPU (SOLVER.IMS_PER_BATCH "
        f"{cfg.SOLVER.IMS_PER_BATCH} over {world_size} GPUs): BatchNorm statistics of fewer than {min_images} "
        "images are noisy; use 'FrozenBN' with pretrained weights, 'GN' from scratch, or 'SyncBN' across GPUs"
    )
    return True
