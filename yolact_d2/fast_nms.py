"""Non-maximum suppression for YOLACT: Fast NMS (paper Sec. 3.4), Cluster-Fast NMS, standard NMS.

All functions take the candidates of one image and return indices into them, so the caller
gathers boxes, coefficients and anything else it carries with one indexing op.
"""
from typing import Tuple

import torch
from torchvision.ops import batched_nms

__all__ = ["fast_nms", "cluster_fast_nms", "standard_nms", "multiclass_nms", "fast_nms_static"]


def _top_k_per_class(scores: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # scores (M, C) -> per class, the top_k scores (descending) and candidate indices, each (C, K).
    # topk, not a full sort: with ~17k candidates x 80 classes the sort dominated Fast NMS on CPU.
    return scores.t().topk(min(top_k, scores.shape[0]), dim=1, sorted=True)


def _overlaps_above(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """(B, n, 4) boxes sorted by score -> (B, n, n) bool, [b, i, j] = i < j and IoU(i, j) > threshold.

    Compares inter * (1 + t) > t * (area_i + area_j), the same test as IoU > t without a division,
    in two reused (B, n, n) buffers: fresh large temporaries (page faults) and the division made the
    straightforward version 3x slower on CPU, and this is the hot spot of Fast NMS.
    """
    x0, y0, x1, y1 = (c.unsqueeze(2) for c in boxes.unbind(dim=-1))  # each (B, n, 1)
    inter = torch.minimum(x1, x1.transpose(1, 2))
    tmp = torch.maximum(x0, x0.transpose(1, 2))
    inter.sub_(tmp).clamp_(min=0)
    torch.minimum(y1, y1.transpose(1, 2), out=tmp)
    tmp.sub_(torch.maximum(y0, y0.transpose(1, 2))).clamp_(min=0)
    inter.mul_(tmp).mul_(1.0 + iou_threshold)
    area = (x1 - x0) * (y1 - y0)
    torch.add(area, area.transpose(1, 2), out=tmp).mul_(iou_threshold)
    return torch.gt(inter, tmp).triu_(diagonal=1)


def overlaps_above_functional(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`_overlaps_above` without in-place ops or ``out=`` buffers, for traced export graphs.

    The same arithmetic in the same order, so the decisions are bit-identical to it.
    """
    x0, y0, x1, y1 = (c.unsqueeze(2) for c in boxes.unbind(dim=-1))  # each (B, n, 1)
    iw = (torch.minimum(x1, x1.transpose(1, 2)) - torch.maximum(x0, x0.transpose(1, 2))).clamp(min=0)
    ih = (torch.minimum(y1, y1.transpose(1, 2)) - torch.maximum(y0, y0.transpose(1, 2))).clamp(min=0)
    area = (x1 - x0) * (y1 - y0)
    over = (iw * ih) * (1.0 + iou_threshold) > (area + area.transpose(1, 2)) * iou_threshold
    return over.triu(diagonal=1)


def _suppressed_by_any(boxes: torch.Tensor, iou_threshold: float, chunk: int = 16) -> torch.Tensor:
    # Fast NMS: column j is dropped when any higher-scoring row i < j overlaps it, even a dropped one.
    # Classes go in chunks: small (chunk, n, n) buffers are reused by the allocator, 25% faster on CPU.
    return torch.cat([_overlaps_above(b, iou_threshold).any(dim=-2) for b in boxes.split(chunk)])


def _suppressed_by_kept(boxes: torch.Tensor, iou_threshold: float, max_iters: int = 200) -> torch.Tensor:
    # Cluster-NMS: iterate Fast NMS, letting only the rows kept so far suppress, until it settles;
    # the fixed point equals standard greedy NMS.
    overlaps = _overlaps_above(boxes, iou_threshold)
    keep = torch.ones(overlaps.shape[:-1], dtype=torch.bool, device=boxes.device)
    for _ in range(max_iters):
        new_keep = ~(overlaps & keep.unsqueeze(-1)).any(dim=-2)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return ~keep


def multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float = 0.5,
    top_k: int = 200,
    max_detections: int = 100,
    method: str = "fast",
    class_agnostic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMS over the candidates of one image.

    Args:
        boxes: (M, 4) candidate boxes (x0, y0, x1, y1), any unit.
        scores: (M, C) foreground class scores in [0, 1] (background column removed).
        iou_threshold: a candidate is suppressed above this IoU (0.5 in the paper).
        top_k: candidates per class (class-agnostic: in all) considered, highest scores first.
        max_detections: detections kept over all classes, highest scores first.
        method: "fast" (paper's Fast NMS: per class, upper-triangular IoU matrix, column max),
            "cluster" (Cluster-Fast NMS: Fast NMS iterated to the greedy-NMS result) or "standard"
            (torchvision ``batched_nms``).
        class_agnostic: one suppression over every class; each candidate keeps its best class.

    Returns:
        ``(index, classes, scores)``, each (D,), D <= max_detections, sorted by score descending:
        the candidate row of each detection, its 0-based class and its score.

    Raises:
        ValueError: an unknown ``method``.
    """
    if method not in ("fast", "cluster", "standard"):
        raise ValueError(f"unknown NMS method {method!r}; use 'fast', 'cluster' or 'standard'")
    num_classes = scores.shape[1]
    if scores.shape[0] == 0:  # no candidate passed the score threshold
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return empty, empty.clone(), scores.new_zeros(0)
    if class_agnostic:
        best, classes = scores.max(dim=1)
        sc, idx = best.topk(min(top_k, best.shape[0]), sorted=True)
        cls = classes[idx]
    else:
        sc, idx = _top_k_per_class(scores, top_k)  # (C, K)
        cls = torch.arange(num_classes, device=scores.device)[:, None].expand_as(idx)

    if method == "standard":
        idx, sc, cls = idx.reshape(-1), sc.reshape(-1), cls.reshape(-1)
        groups = torch.zeros_like(cls) if class_agnostic else cls
        keep = batched_nms(boxes[idx], sc, groups, iou_threshold)[:max_detections]
        return idx[keep], cls[keep], sc[keep]  # batched_nms sorts kept indices by score

    suppress = _suppressed_by_any if method == "fast" else _suppressed_by_kept
    boxes_k = boxes[idx] if not class_agnostic else boxes[idx][None]
    keep = ~suppress(boxes_k, iou_threshold).reshape(idx.shape)
    idx, sc, cls = idx[keep], sc[keep], cls[keep]
    sc, order = sc.sort(descending=True)
    order = order[:max_detections]
    return idx[order], cls[order], sc[:max_detections]


def fast_nms(boxes, scores, iou_threshold=0.5, top_k=200, max_detections=100):
    """Fast NMS of the YOLACT paper (Sec. 3.4); see :func:`multiclass_nms` for shapes."""
    return multiclass_nms(boxes, scores, iou_threshold, top_k, max_detections, method="fast")


def cluster_fast_nms(boxes, scores, iou_threshold=0.5, top_k=200, max_detections=100):
    """Cluster-Fast NMS (same result as greedy NMS, matrix ops only); see :func:`multiclass_nms`."""
    return multiclass_nms(boxes, scores, iou_threshold, top_k, max_detections, method="cluster")


def standard_nms(boxes, scores, iou_threshold=0.5, top_k=200, max_detections=100):
    """Greedy per-class NMS by torchvision ``batched_nms``; see :func:`multiclass_nms`."""
    return multiclass_nms(boxes, scores, iou_threshold, top_k, max_detections, method="standard")


def fast_nms_static(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, top_k: int = 200,
    max_detections: int = 100,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast NMS with shapes fixed by the arguments, for export graphs (no data-dependent shapes).

    Args:
        boxes: (A, 4) boxes (x0, y0, x1, y1) of every prior, any unit.
        scores: (A, C) foreground scores in [0, 1]; rows that are not candidates set to -1.
        iou_threshold, top_k, max_detections: as :func:`multiclass_nms`.
    Returns:
        ``(index, classes, scores)``, each (min(max_detections, C * K),), K = min(top_k, A),
        sorted by score descending; entries with a negative score are not detections. The
        entries with a score >= 0 equal :func:`multiclass_nms` ("fast", per class) run on the
        candidate rows only: -1 rows rank below every candidate, so they can only suppress
        other -1 rows.
    """
    k = min(top_k, scores.shape[0])
    sc, idx = scores.t().topk(k, dim=1, sorted=True)  # (C, K)
    # max over uint8, not any(): the exporter writes any() as a sum over an int64 copy.
    suppressed = overlaps_above_functional(boxes[idx], iou_threshold).to(torch.uint8).amax(dim=-2) > 0
    sc = torch.where(suppressed, torch.full_like(sc, -1.0), sc).reshape(-1)
    sc, flat = sc.topk(min(max_detections, sc.shape[0]), sorted=True)
    return idx.reshape(-1)[flat], torch.div(flat, k, rounding_mode="floor"), sc
