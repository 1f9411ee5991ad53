"""YOLACT priors (anchors) and their SSD centre-size box coding.

detectron2's ``DefaultAnchorGenerator`` places anchors at ``stride * (x + offset)`` in pixels and
defines aspect ratio as height / width; YOLACT places prior centres at ``(x + 0.5) / w`` relative
to the feature map (so non-divisible sizes such as 550 / 8 = 68.75 -> 69 cells shift them), uses
width / height ratios and, in v1, square priors. Those differences change the numbers, hence this
module.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from detectron2.modeling.box_regression import Box2BoxTransform

__all__ = ["PriorGenerator", "make_priors", "priors_to_boxes", "build_box_coder", "feature_sizes", "to_pixel_boxes"]


def make_priors(
    feature_sizes: Sequence[Tuple[int, int]],
    scales: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float],
    input_size: float,
    square: bool,
    device=None,
) -> torch.Tensor:
    """Priors of every level, in the order the prediction head emits its outputs.

    Args:
        feature_sizes: (h, w) of each level's feature map, P3 first.
        scales: per level, prior sizes in pixels at ``input_size``.
        aspect_ratios: width / height ratios a; w = s * sqrt(a), h = s / sqrt(a).
        input_size: side of the square network input in pixels (the original ``max_size``).
        square: h = w for every ratio (the v1 "square anchors" bug, kept for its checkpoints).

    Returns:
        (A, 4) float32 tensor of (cx, cy, w, h), all relative to the input (0..1 for centres).
        Order: level, then row y, column x, then scale, then ratio (original ``make_priors``).

    Raises:
        ValueError: when the number of levels of ``feature_sizes`` and ``scales`` differ.
    """
    if len(feature_sizes) != len(scales):
        raise ValueError(f"{len(feature_sizes)} feature levels but {len(scales)} lists of anchor scales")
    per_level = []
    for (h, w), level_scales in zip(feature_sizes, scales):
        wh = []
        for s in level_scales:
            for a in aspect_ratios:
                pw = s * math.sqrt(a) / input_size
                ph = pw if square else s / math.sqrt(a) / input_size
                wh.append((pw, ph))
        wh = torch.tensor(wh, dtype=torch.float32, device=device)  # (S*R, 2)
        cy = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        cx = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, wh.shape[0], 2)
        per_level.append(torch.cat([centres, wh.expand(h * w, -1, -1)], dim=-1).reshape(-1, 4))
    return torch.cat(per_level, dim=0)


def priors_to_boxes(priors: torch.Tensor) -> torch.Tensor:
    """(A, 4) (cx, cy, w, h) -> (A, 4) (x0, y0, x1, y1), same units."""
    return torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], dim=1)


def feature_sizes(input_size: int, levels: Sequence[int] = (3, 4, 5, 6, 7)) -> List[Tuple[int, int]]:
    """(h, w) of the FPN levels for a square input of ``input_size`` pixels, without running the
    network: every stride-2 conv (padding 1) and the ResNet max-pool round up, so P_l has
    ceil(S / 2^l) cells (550: 69, 35, 18, 9, 5; 320: 40, 20, 10, 5, 3). The model itself takes the
    sizes of its features; the exported graph's priors and the diagnostics use this."""
    return [(math.ceil(input_size / 2 ** lvl),) * 2 for lvl in levels]


def to_pixel_boxes(boxes: torch.Tensor, height, width) -> torch.Tensor:
    """Decoded boxes relative to the image -> pixels of a ``height`` x ``width`` output, as the
    original ``postprocess`` (``sanitize_coordinates``): scaled, corners ordered, clamped to the
    image. The one conversion of the eager model and the exported graph.

    Args:
        boxes: (D, 4) (x0, y0, x1, y1) relative, in [0, 1] inside the image.
        height, width: ints, or 0-d tensors (a traced graph's input size).
    Returns:
        (D, 4) (x0, y0, x1, y1) in pixels, 0 <= x0 <= x1 <= width, 0 <= y0 <= y1 <= height.
    """
    if torch.is_tensor(width):
        size = torch.stack([width, height, width, height]).to(boxes)
    else:
        size = boxes.new_tensor([width, height, width, height])
    boxes = boxes * size
    boxes = torch.cat([torch.min(boxes[:, :2], boxes[:, 2:]), torch.max(boxes[:, :2], boxes[:, 2:])], dim=1)
    return torch.min(boxes.clamp(min=0), size)


def build_box_coder(weights=(10.0, 10.0, 5.0, 5.0)) -> Box2BoxTransform:
    """SSD centre-size coding with variances (0.1, 0.2), as detectron2's ``Box2BoxTransform``.

    ``weights`` (10, 10, 5, 5) = 1 / variances. The scale clamp is disabled: the original decodes
    ``w = pw * exp(dw * 0.2)`` without one.
    """
    return Box2BoxTransform(weights=tuple(weights), scale_clamp=float("inf"))


class PriorGenerator(nn.Module):
    """Makes and caches priors for a given set of feature-map sizes (see :func:`make_priors`).

    ``num_priors_per_location`` = scales per level x aspect ratios (3 for v1, 9 for YOLACT++).
    """

    def __init__(self, scales, aspect_ratios, input_size: int, square: bool):
        super().__init__()
        counts = {len(s) for s in scales}
        if len(counts) != 1:
            raise ValueError(f"every level needs the same number of anchor scales, got {scales}")
        self.scales = [list(map(float, s)) for s in scales]
        self.aspect_ratios = [float(a) for a in aspect_ratios]
        self.input_size = float(input_size)
        self.square = bool(square)
        self.num_priors_per_location = counts.pop() * len(self.aspect_ratios)
        self._cache: Dict[tuple, torch.Tensor] = {}

    def forward(self, feature_sizes: List[Tuple[int, int]], device) -> torch.Tensor:
        key = (tuple(map(tuple, feature_sizes)), str(device))
        if key not in self._cache:
            self._cache[key] = make_priors(
                feature_sizes, self.scales, self.aspect_ratios, self.input_size, self.square, device
            )
        return self._cache[key]
