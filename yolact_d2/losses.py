"""YOLACT training targets and losses (paper Sec. 3; the original ``MultiBoxLoss``).

Per image, priors are matched to ground truth; then over the batch, normalised by the number of
positive priors N_pos:

- ``loss_cls``: softmax cross-entropy over positives and 3:1 online hard negatives, or with
  ``CLASS_LOSS: "sigmoid_focal"`` (original ``use_sigmoid_focal_loss``) the sigmoid focal loss
  over every non-ignored prior (see :func:`sigmoid_focal_class_loss`), or with
  ``"quality_focal"`` (not in the original) the quality focal loss whose positive targets are the
  IoU of the predicted box (see :func:`quality_focal_class_loss`);
- ``loss_box_reg``: 1.5 x smooth-L1 of SSD-coded boxes of positives;
- ``loss_mask``: 6.125 x BCE of assembled masks, cropped to the matched ground-truth box and
  normalised by that box's area on the prototype grid;
- ``loss_mask_iou`` (YOLACT++): 25 x smooth-L1 of the re-scoring net's IoU for the ground-truth
  class, on every trained mask (at most MASKS_TO_TRAIN per image, as ``loss_mask``) whose ground
  truth covers more than MIN_GT_AREA prototype cells, with no cap over the batch (the original's
  ``maskious_to_train = -1``);

and ``loss_sem_seg`` (1 x BCE-with-logits of a 1x1 conv on P3, per pixel, / batch size).
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks, pairwise_ioa
from detectron2.structures.boxes import matched_pairwise_iou
from torchvision.ops import box_iou, sigmoid_focal_loss

from .mask_assembly import assemble_masks, crop_masks
from .priors import build_box_coder, priors_to_boxes

__all__ = [
    "YolactLoss", "match_priors", "gt_masks_as_tensor", "sigmoid_focal_class_loss", "quality_focal_class_loss",
    "SIGMOID_CLASS_LOSSES",
]

# Class losses whose scores are an independent sigmoid per class (background logit unused).
SIGMOID_CLASS_LOSSES = ("sigmoid_focal", "quality_focal")


def match_priors(
    prior_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    crowd_boxes: Optional[torch.Tensor],
    num_classes: int,
    pos_thresh: float = 0.5,
    neg_thresh: float = 0.4,
    crowd_thresh: float = 0.7,
    return_gt_best_iou: bool = False,
):
    """Assign every prior a ground truth and a label (original ``match``).

    Args:
        prior_boxes: (A, 4) priors as (x0, y0, x1, y1) relative to the image.
        gt_boxes: (G, 4) ground-truth boxes, same units; gt_classes: (G,) in [0, C).
        crowd_boxes: (K, 4) crowd boxes (same units) or None.
    Returns:
        ``(labels, matched)``, each (A,): labels in [0, C) for positives (IoU >= pos_thresh or the
        prior a ground truth claimed), C for background (IoU < neg_thresh), -1 for ignored
        (in between, or a non-positive prior covered by a crowd box over ``crowd_thresh`` of its
        own area); matched = index of the prior's ground truth (0 when G = 0).
        With ``return_gt_best_iou`` also (G,) the best IoU of each ground truth with any prior
        (below ``pos_thresh``: its only positive is the prior it claims; for the diagnostics).
    """
    num_priors = prior_boxes.shape[0]
    device = prior_boxes.device
    if gt_boxes.shape[0] == 0:
        labels = torch.full((num_priors,), num_classes, dtype=torch.long, device=device)
        matched = torch.zeros(num_priors, dtype=torch.long, device=device)
        gt_best_iou = prior_boxes.new_zeros((0,))
    else:
        overlaps = box_iou(gt_boxes, prior_boxes)  # (G, A)
        gt_best_iou = overlaps.max(dim=1).values
        best_overlap, matched = overlaps.max(dim=0)
        # Every ground truth claims a prior, greedily by highest remaining IoU, so none goes unused.
        for _ in range(gt_boxes.shape[0]):
            best_prior_overlap, best_prior = overlaps.max(dim=1)
            j = best_prior_overlap.argmax()
            i = best_prior[j]
            overlaps[:, i] = -1
            overlaps[j, :] = -1
            best_overlap[i] = 2
            matched[i] = j
        labels = gt_classes[matched].clone()
        labels[best_overlap < pos_thresh] = -1
        labels[best_overlap < neg_thresh] = num_classes
    if crowd_boxes is not None and crowd_boxes.shape[0] > 0:
        # Share of each prior inside a crowd box (the original's crowd_iou, intersection over the prior).
        covered = pairwise_ioa(Boxes(crowd_boxes), Boxes(prior_boxes)).max(dim=0).values > crowd_thresh
        labels[((labels == num_classes) | (labels < 0)) & covered] = -1
    if return_gt_best_iou:
        return labels, matched, gt_best_iou
    return labels, matched


def sigmoid_focal_class_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Summed sigmoid focal loss of the original's ``focal_conf_sigmoid_loss`` (not normalised).

    Every prior with label >= 0 counts; ignored priors (label -1) do not. On the C foreground
    logits only (the background logit is unused), with one-hot targets for positives and all-zero
    targets for background (label C): per prior and class, with p = sigmoid(x),
    ``-alpha_t (1 - p_t)^gamma log(p_t)``, p_t = p and alpha_t = alpha for a target 1, p_t = 1 - p
    and alpha_t = 1 - alpha for a target 0 (Lin et al., ICCV 2017; torchvision's
    ``sigmoid_focal_loss``).

    Args:
        logits: (..., C + 1) class logits, background last.
        labels: (...) int64 in {-1, 0..C}: ignored, foreground class, background.
    Returns:
        scalar, the sum over priors and classes.
    """
    valid = labels >= 0
    x = logits[valid][:, :num_classes]
    targets = F.one_hot(labels[valid], num_classes + 1)[:, :num_classes].to(x.dtype)
    return sigmoid_focal_loss(x, targets, alpha=alpha, gamma=gamma, reduction="sum")


def quality_focal_class_loss(
    logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor, num_classes: int, beta: float = 2.0
) -> torch.Tensor:
    """Summed quality focal loss (Li et al., "Generalized Focal Loss", NeurIPS 2020, Sec. 3.1).

    Not in the original YOLACT. The target of a positive prior's ground-truth class is the IoU
    of its predicted box with its ground-truth box (``quality``, no gradient) instead of 1, so
    that the class score ranks detections by localisation quality too; every other target is 0.
    Per prior with label >= 0 and class, with p = sigmoid(x) and target y in [0, 1]:
    ``|y - p|^beta * BCE(p, y)`` (no alpha). Ignored priors (label -1) do not count.

    Args:
        logits: (..., C + 1) class logits, background last.
        labels: (...) int64 in {-1, 0..C}: ignored, foreground class, background.
        quality: (...) float in [0, 1], the target of the ground-truth class on positives (values
            elsewhere unused).
        beta: the focusing exponent (MODEL.YOLACT.FOCAL_LOSS_GAMMA; 2 in the paper).
    Returns:
        scalar, the sum over priors and classes.
    """
    valid = labels >= 0
    x = logits[valid][:, :num_classes].float()
    lab = labels[valid]
    onehot = F.one_hot(lab, num_classes + 1)[:, :num_classes].to(x.dtype)
    targets = onehot * quality[valid].detach().to(x.dtype).clamp(0, 1)[:, None]
    p = torch.sigmoid(x)
    bce = F.binary_cross_entropy_with_logits(x, targets, reduction="none")
    return ((targets - p).abs().pow(beta) * bce).sum()


def gt_masks_as_tensor(instances: Instances) -> torch.Tensor:
    """``gt_masks`` (BitMasks, PolygonMasks or a tensor) -> (G, H, W) float at the image size."""
    masks = instances.gt_masks
    h, w = instances.image_size
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, h, w)
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    return masks.to(device=instances.gt_boxes.device, dtype=torch.float32)


def _binarised_resize(masks: torch.Tensor, size) -> torch.Tensor:
    # Ground truth on a coarser grid: bilinear (align_corners=False), then > 0.5, as the original.
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return (F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0] > 0.5).float()


def _bce(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Elementwise F.binary_cross_entropy(clamp(p, 0, 1), g) in float32, as the original (also under
    AMP), except that a NaN in
    ``p`` (a diverged network) gives NaN losses, so that detectron2 stops with its
    FloatingPointError, instead of the RuntimeError torch raises for inputs outside [0, 1]."""
    if not torch.isfinite(p).all():
        return p * g  # NaN where p is
    # CUDA autocast refuses binary_cross_entropy (unsafe in fp16): compute it in float32 outside
    # autocast, the same numbers as without AMP.
    with torch.autocast(device_type=p.device.type, enabled=False):
        return F.binary_cross_entropy(p.float().clamp(0, 1), g.float(), reduction="none")


class YolactLoss:
    """Computes the YOLACT losses from the network outputs; see the module docstring.

    Built from ``MODEL.YOLACT``: NUM_CLASSES, POS/NEG/CROWD_IOU_THRESH, NEG_POS_RATIO, the loss
    weights, MASKS_TO_TRAIN and MASK_RESCORING.*.
    """

    def __init__(self, cfg):
        y = cfg.MODEL.YOLACT
        self.num_classes = y.NUM_CLASSES
        self.pos_thresh, self.neg_thresh, self.crowd_thresh = y.POS_IOU_THRESH, y.NEG_IOU_THRESH, y.CROWD_IOU_THRESH
        self.neg_pos_ratio = y.NEG_POS_RATIO
        self.class_loss = y.CLASS_LOSS
        self.focal_alpha, self.focal_gamma = y.FOCAL_LOSS_ALPHA, y.FOCAL_LOSS_GAMMA
        self.class_weight, self.box_weight = y.CLASS_LOSS_WEIGHT, y.BOX_LOSS_WEIGHT
        self.mask_weight, self.sem_seg_weight = y.MASK_LOSS_WEIGHT, y.SEM_SEG_LOSS_WEIGHT
        self.masks_to_train = y.MASKS_TO_TRAIN
        self.mask_iou_weight = y.MASK_RESCORING.LOSS_WEIGHT
        self.mask_iou_min_area = y.MASK_RESCORING.MIN_GT_AREA
        self.box_coder = build_box_coder(y.BBOX_REG_WEIGHTS)

    def __call__(
        self,
        out: Dict[str, torch.Tensor],
        sem_seg_logits: torch.Tensor,
        gt_instances: List[Instances],
        crowd_boxes: List[Optional[Boxes]],
        mask_rescoring=None,
        stats: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Losses of one batch.

        Args:
            out: the meta-architecture's network outputs: ``box_deltas`` (N, A, 4),
                ``class_logits`` (N, A, C + 1), ``mask_coeffs`` (N, A, k), ``priors`` (A, 4)
                (cx, cy, w, h) relative, ``prototypes`` (N, h, w, k).
            sem_seg_logits: (N, C, h', w') semantic logits on P3.
            gt_instances: per image, ``gt_boxes`` in pixels of the network input (image_size),
                ``gt_classes`` in [0, C), ``gt_masks`` at the image size.
            crowd_boxes: per image, crowd ``Boxes`` in pixels, or None.
            mask_rescoring: the YOLACT++ re-scoring net (masks (P, 1, h, w) -> IoU (P, C)) or None.
            stats: a dict to fill with the matching's statistics (0-dim tensors, no gradient) for
                :class:`~yolact_d2.diagnostics.TrainingDiagnostics`: ``num_objects``,
                ``num_positive`` (positive priors), ``forced_only`` (objects with no prior at
                IoU >= POS_IOU_THRESH) and ``fg_prob_pos`` (mean ground-truth class probability
                on positives, NaN without any).
        Returns:
            ``loss_cls``, ``loss_box_reg``, ``loss_mask``, ``loss_sem_seg`` (+ ``loss_mask_iou``),
            scalars. When the batch has no positive prior they are normalised by 1, not 0.
        """
        logits, deltas, coeffs, protos = out["class_logits"], out["box_deltas"], out["mask_coeffs"], out["prototypes"]
        n, num_priors = logits.shape[:2]
        c = self.num_classes
        prior_boxes = priors_to_boxes(out["priors"])
        proto_h, proto_w = protos.shape[1:3]

        labels, box_targets, matched_boxes, gt_masks_proto, matched_idx, sem_targets = [], [], [], [], [], []
        gt_best_iou = []
        for i, inst in enumerate(gt_instances):
            h, w = inst.image_size
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=logits.device)
            gt = inst.gt_boxes.tensor / scale
            crowd = crowd_boxes[i].tensor.to(logits.device) / scale if crowd_boxes[i] is not None else None
            lab, idx, best = match_priors(
                prior_boxes, gt, inst.gt_classes, crowd, c, self.pos_thresh, self.neg_thresh, self.crowd_thresh,
                return_gt_best_iou=True,
            )
            gt_best_iou.append(best)
            labels.append(lab)
            matched_idx.append(idx)
            mb = gt[idx] if len(gt) else prior_boxes
            matched_boxes.append(mb)
            box_targets.append(self.box_coder.get_deltas(prior_boxes, mb))
            # Targets in float32 also under autocast (logits may be half precision).
            masks = gt_masks_as_tensor(inst) if len(inst) else logits.new_zeros((0, h, w), dtype=torch.float32)
            gt_masks_proto.append(_binarised_resize(masks, (proto_h, proto_w)))
            sem = logits.new_zeros((c,) + tuple(sem_seg_logits.shape[-2:]), dtype=torch.float32)
            if len(inst):
                small = _binarised_resize(masks, sem.shape[-2:])  # union of each class's masks
                sem.scatter_reduce_(0, inst.gt_classes[:, None, None].expand_as(small), small, "amax")
            sem_targets.append(sem)
        labels = torch.stack(labels)  # (N, A)
        pos = (labels >= 0) & (labels < c)
        num_pos = pos.sum()
        norm = num_pos.clamp(min=1).float()
        if stats is not None:
            with torch.no_grad():
                best = torch.cat(gt_best_iou)
                stats["num_objects"] = best.new_tensor(best.numel())
                stats["num_positive"] = num_pos
                stats["forced_only"] = (best < self.pos_thresh).sum()
                if num_pos > 0:
                    pos_logits = logits[pos].float()
                    probs = torch.sigmoid(pos_logits) if self.class_loss in SIGMOID_CLASS_LOSSES else pos_logits.softmax(-1)
                    stats["fg_prob_pos"] = probs.gather(1, labels[pos][:, None]).mean()
                else:
                    stats["fg_prob_pos"] = logits.new_tensor(float("nan"))

        losses = {}
        # Box regression on positives.
        box_targets = torch.stack(box_targets)
        losses["loss_box_reg"] = self.box_weight * F.smooth_l1_loss(
            deltas[pos], box_targets[pos], beta=1.0, reduction="sum"
        ) / norm

        if self.class_loss == "sigmoid_focal":
            loss_cls = sigmoid_focal_class_loss(logits, labels, c, self.focal_alpha, self.focal_gamma)
        elif self.class_loss == "quality_focal":
            quality = logits.new_zeros(labels.shape, dtype=torch.float32)
            if num_pos > 0:
                with torch.no_grad():
                    pred = self.box_coder.apply_deltas(deltas[pos].float(), prior_boxes.expand(n, -1, -1)[pos])
                    quality[pos] = matched_pairwise_iou(Boxes(pred), Boxes(torch.stack(matched_boxes)[pos].float()))
            loss_cls = quality_focal_class_loss(logits, labels, quality, c, self.focal_gamma)
        else:
            # Softmax cross-entropy with online hard-negative mining, per image, ranked by
            # background loss.
            with torch.no_grad():
                bg_loss = torch.logsumexp(logits, dim=-1) - logits[..., c]
                bg_loss[pos | (labels < 0)] = 0
                rank = bg_loss.sort(dim=1, descending=True)[1].sort(dim=1)[1]
                num_neg = (self.neg_pos_ratio * pos.sum(dim=1, keepdim=True)).clamp(max=num_priors - 1)
                neg = (rank < num_neg) & ~pos & (labels >= 0)
            selected = pos | neg
            loss_cls = F.cross_entropy(logits[selected], labels[selected], reduction="sum")
        losses["loss_cls"] = self.class_weight * loss_cls / norm

        # Masks: sigmoid(P C^T) cropped to the matched ground-truth box, BCE / box area.
        loss_mask = logits.new_zeros((), dtype=torch.float32)
        iou_inputs, iou_targets, iou_classes = [], [], []
        for i in range(n):
            pos_i = pos[i].nonzero().squeeze(1)
            if pos_i.numel() == 0:
                continue
            total = pos_i.numel()
            if total > self.masks_to_train:
                pos_i = pos_i[torch.randperm(total, device=pos_i.device)[: self.masks_to_train]]
            gt_idx = matched_idx[i][pos_i]
            boxes = matched_boxes[i][pos_i]
            target = gt_masks_proto[i][gt_idx]
            # In float32 also under autocast: in half precision sigmoid(P C^T) rounds to exactly 1
            # above ~0.998 and the BCE of a background pixel jumps to its clamp (measured: 40
            # instead of 11.5 in bfloat16).
            with torch.autocast(device_type=protos.device.type, enabled=False):
                pred = crop_masks(assemble_masks(protos[i].float(), coeffs[i, pos_i].float()), boxes.float())
            bce = _bce(pred, target).sum(dim=(1, 2))
            area = (boxes[:, 2] - boxes[:, 0]) * proto_w * (boxes[:, 3] - boxes[:, 1]) * proto_h
            loss_mask = loss_mask + (bce / area).sum() * (total / pos_i.numel())
            if mask_rescoring is not None:
                big = target.sum(dim=(1, 2)) > self.mask_iou_min_area
                binary = (pred[big] > 0.5).float()
                inter = (binary * target[big]).sum(dim=(1, 2))
                union = binary.sum(dim=(1, 2)) + target[big].sum(dim=(1, 2)) - inter
                iou_inputs.append(pred[big])  # not detached, as the original
                iou_targets.append(inter / union.clamp(min=1))
                iou_classes.append(gt_instances[i].gt_classes[gt_idx[big]])
        losses["loss_mask"] = self.mask_weight * loss_mask / norm

        sem_targets = torch.stack(sem_targets)
        losses["loss_sem_seg"] = self.sem_seg_weight * F.binary_cross_entropy_with_logits(
            sem_seg_logits, sem_targets, reduction="sum"
        ) / (sem_seg_logits.shape[-1] * sem_seg_logits.shape[-2]) / n

        if mask_rescoring is not None:
            if iou_inputs and sum(len(x) for x in iou_inputs):
                inputs, targets, classes = torch.cat(iou_inputs), torch.cat(iou_targets), torch.cat(iou_classes)
                pred_iou = mask_rescoring(inputs[:, None]).gather(1, classes[:, None]).squeeze(1)
                loss_iou = F.smooth_l1_loss(pred_iou, targets, reduction="sum")
            else:  # keep the graph connected so DDP sees every parameter used
                loss_iou = sum(p.sum() for p in mask_rescoring.parameters()) * 0.0
            losses["loss_mask_iou"] = self.mask_iou_weight * loss_iou / norm
        return losses
