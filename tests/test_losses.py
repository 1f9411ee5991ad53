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


def test_losses_match_original_on_coco9(reference_model):
    ref = torch.load(need(REFERENCE / "yolact_resnet50_seed1_loss_coco9.pth"), weights_only=False)
    model = freeze_bn(reference_model)
    model.criterion.masks_to_train = 10**6  # the reference did not subsample positives
    try:
        # detectron2's training inputs: a 0-255 image in INPUT.FORMAT and Instances in pixels.
        image = ref["input_550"][0] * model.pixel_std + model.pixel_mean
        t = ref["targets"][0]
        inst = Instances((550, 550))
        inst.gt_boxes = Boxes(t[:, :4] * 550)
        inst.gt_classes = t[:, 4].long()
        inst.gt_masks = BitMasks(ref["gt_masks_550"])
        losses = model([{"image": image, "instances": inst}])
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
