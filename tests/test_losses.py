"""Training losses equal to the original MultiBoxLoss, and the matching rules."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from conftest import REFERENCE, need, yolact_cfg
from yolact_d2.losses import match_priors

ORIGINAL_NAMES = {"loss_box_reg": "B", "loss_cls": "C", "loss_mask": "M", "loss_sem_seg": "S"}


def freeze_bn(model):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def coco9_training_input(model, ref):
    """The loss reference as detectron2's training input: a 0-255 image in INPUT.FORMAT (the
    stored normalised input, un-normalised) and Instances in pixels."""
    t = ref["targets"][0]
    inst = Instances((550, 550))
    inst.gt_boxes = Boxes(t[:, :4] * 550)
    inst.gt_classes = t[:, 4].long()
    inst.gt_masks = BitMasks(ref["gt_masks_550"])
    return {"image": ref["input_550"][0] * model.pixel_std + model.pixel_mean, "instances": inst}


def test_losses_match_original_on_coco9(reference_model):
    ref = torch.load(need(REFERENCE / "yolact_resnet50_seed1_loss_coco9.pth"), weights_only=False)
    model = freeze_bn(reference_model)
    model.criterion.masks_to_train = 10**6  # the reference did not subsample positives
    try:
        losses = model([coco9_training_input(model, ref)])
    finally:
        model.criterion.masks_to_train = 100
        model.eval()
    assert set(losses) == set(ORIGINAL_NAMES)
    for name, value in losses.items():
        expected = ref["losses"][ORIGINAL_NAMES[name]]
        assert abs(value.item() - expected) / expected <= 1e-3, (name, value.item(), expected)


def test_matching_rules():
    priors = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.19, 0.2], [0.5, 0.5, 0.7, 0.7],
                           [0.52, 0.5, 0.72, 0.7], [0.8, 0.8, 0.9, 0.9], [0.05, 0.0, 0.25, 0.2]])
    gt = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.62, 0.62]])  # the second overlaps nothing well
    crowd = torch.tensor([[0.79, 0.79, 0.95, 0.95]])
    labels, matched = match_priors(priors, gt, torch.tensor([3, 7]), crowd, num_classes=10)
    assert labels[0] == 3 and labels[1] == 3  # IoU 1 and 0.95
    # The tiny box still claims its best prior (forced positive), whatever its IoU.
    assert (labels == 7).sum() == 1 and matched[labels == 7].item() == 1
    assert labels[4] == -1  # background prior inside a crowd box is ignored
    iou_5 = 0.15 * 0.2 / (2 * 0.04 - 0.15 * 0.2)  # 0.6: positive
    assert iou_5 >= 0.5 and labels[5] == 3
    labels, _ = match_priors(priors, gt[:0], torch.zeros(0, dtype=torch.long), None, num_classes=10)
    assert torch.all(labels == 10)  # no ground truth: all background


def test_crowd_boxes_ignore_the_priors_they_cover_by_the_brute_force_definition():
    """A non-positive prior is ignored (-1) exactly when some crowd box covers more than
    crowd_thresh of the prior's own area (the original's crowd_iou, intersection over the prior),
    checked prior by prior with plain Python arithmetic on 300 random priors and 4 crowds."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 0.8
    priors = torch.cat([xy, xy + 0.02 + torch.rand(300, 2, generator=g) * 0.2], 1)
    cxy = torch.rand(4, 2, generator=g) * 0.5
    crowd = torch.cat([cxy, cxy + 0.2 + torch.rand(4, 2, generator=g) * 0.3], 1)
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.35]])
    labels, _ = match_priors(priors, gt, torch.tensor([2]), crowd, num_classes=5, crowd_thresh=0.7)
    plain, _ = match_priors(priors, gt, torch.tensor([2]), None, num_classes=5)
    ignored_by_crowd = 0
    for i, (x0, y0, x1, y1) in enumerate(priors.tolist()):
        share = max(max(0.0, min(x1, c[2]) - max(x0, c[0])) * max(0.0, min(y1, c[3]) - max(y0, c[1]))
                    for c in crowd.tolist()) / ((x1 - x0) * (y1 - y0))
        want = -1 if plain[i] in (5, -1) and share > 0.7 else plain[i]
        assert labels[i] == want, (i, share)
        ignored_by_crowd += int(want == -1 and plain[i] == 5)
    assert ignored_by_crowd >= 10  # the case is exercised


@pytest.mark.slow
def test_image_without_instances_trains_and_gradients_flow():
    model = freeze_bn(build_model(yolact_cfg(opts=["MODEL.YOLACT.INPUT_SIZE", "160"])))
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 160, 160), generator=g).float()
    full = Instances((160, 160))
    full.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 90.0, 120.0]]))
    full.gt_classes = torch.tensor([5])
    m = torch.zeros(1, 160, 160, dtype=torch.bool)
    m[0, 30:110, 20:80] = True
    full.gt_masks = BitMasks(m)
    empty = Instances((160, 160))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = BitMasks(torch.zeros(0, 160, 160, dtype=torch.bool))
    losses = model([{"image": image, "instances": full}, {"image": image, "instances": empty}])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("head.cls_score.weight", "head.coeff_pred.weight", "protonet.layers.10.weight",
                 "sem_seg_head.weight", "backbone.bottom_up.res3.0.conv2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    only_empty = model([{"image": image, "instances": empty}])
    assert only_empty["loss_box_reg"] == 0 and only_empty["loss_mask"] == 0
    assert torch.isfinite(only_empty["loss_sem_seg"])


@pytest.mark.slow
def test_mask_iou_loss_follows_the_original_semantics():
    """YOLACT++'s mask-IoU loss on the coco9 reference, against a direct transcription of the
    reference README's formula (positives from the matching that reproduces B, C and M above)."""
    import torch.nn.functional as F
    from detectron2.checkpoint import DetectionCheckpointer

    from yolact_d2.losses import match_priors
    from yolact_d2.priors import priors_to_boxes

    ref = torch.load(need(REFERENCE / "yolact_resnet50_seed1_loss_coco9.pth"), weights_only=False)
    cfg = yolact_cfg(opts=["MODEL.YOLACT.MASK_RESCORING.ENABLED", "True", "MODEL.YOLACT.MASKS_TO_TRAIN", "100000"])
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(need(REFERENCE / "yolact_resnet50_seed1.pth")))
    freeze_bn(model)
    for p in model.mask_rescoring.parameters():  # decisive, non-trivial IoU predictions
        torch.nn.init.normal_(p, std=0.3)
    sample = coco9_training_input(model, ref)
    image, t = sample["image"], ref["targets"][0]
    losses = model([sample])
    assert abs(losses["loss_mask"].item() - ref["losses"]["M"]) / ref["losses"]["M"] <= 1e-3

    with torch.no_grad():
        out = model._forward_network(model.preprocess_image([{"image": image}]))
        labels, matched = match_priors(priors_to_boxes(out["priors"]), t[:, :4], t[:, 4].long(), None, 80)
        pos = ((labels >= 0) & (labels < 80)).nonzero().squeeze(1)
        proto = out["prototypes"][0]  # (138, 138, 32)
        masks = torch.sigmoid(proto @ out["mask_coeffs"][0, pos].t())  # (138, 138, P)
        boxes = t[matched[pos], :4]
        g = (F.interpolate(ref["gt_masks_550"][None].float(), (138, 138), mode="bilinear", align_corners=False)[0] > 0.5).float()
        g = g[matched[pos]].permute(1, 2, 0)  # (138, 138, P)
        x0 = (boxes[:, 0] * 138 - 1).clamp(min=0)
        x1 = (boxes[:, 2] * 138 + 1).clamp(max=138)
        y0 = (boxes[:, 1] * 138 - 1).clamp(min=0)
        y1 = (boxes[:, 3] * 138 + 1).clamp(max=138)
        c = torch.arange(138.0)
        crop = ((c[None, :, None] >= x0) & (c[None, :, None] < x1) & (c[:, None, None] >= y0) & (c[:, None, None] < y1))
        masks = masks * crop
        keep = g.sum(dim=(0, 1)) > 25
        binary = (masks[:, :, keep] > 0.5).float()
        inter = (binary * g[:, :, keep]).sum(dim=(0, 1))
        target = inter / (binary.sum(dim=(0, 1)) + g[:, :, keep].sum(dim=(0, 1)) - inter)
        pred = model.mask_rescoring(masks[:, :, keep].permute(2, 0, 1)[:, None])
        pred = pred.gather(1, t[matched[pos][keep], 4].long()[:, None]).squeeze(1)
        expected = 25 * F.smooth_l1_loss(pred, target, reduction="sum") / len(pos)
    assert expected > 0
    assert abs(losses["loss_mask_iou"].item() - expected.item()) / expected.item() <= 1e-4

    # Two images whose positives together exceed MASKS_TO_TRAIN (each alone does not): the original
    # has no cap over the batch (maskious_to_train = -1), so every mask counts and the loss is the
    # same as for one image (sums and N_pos both double).
    model.criterion.masks_to_train = len(pos) + 1
    assert int(keep.sum()) * 2 > model.criterion.masks_to_train
    pair = model([sample, sample])
    assert abs(pair["loss_mask_iou"].item() - expected.item()) / expected.item() <= 1e-4
