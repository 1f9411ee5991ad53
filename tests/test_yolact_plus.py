"""YOLACT++: deformable blocks, 9 priors per location, mask re-scoring, original-layout checkpoints.

No YOLACT++ outputs of the original code are stored, so an independent functional forward of the
original network (tests/original_oracle.py) is first proven on the stored v1 outputs, then used as
the reference for a YOLACT++ checkpoint built here in the original layout.
"""
import math

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BottleneckBlock

import original_oracle as oracle
from conftest import REFERENCE, matched_detections, need, yolact_cfg
from helpers import PLUS_SCALES, V1_SCALES, real_image_550, rel_err, synthetic_original_checkpoint
from yolact_d2.backbone import ModulatedDeformConv, build_yolact_resnet

def test_oracle_reproduces_the_original_outputs(reference_outputs):
    sd = {k: v.float() for k, v in torch.load(need(REFERENCE / "yolact_resnet50_seed1.pth")).items()}
    with torch.no_grad():
        out = oracle.forward(sd, reference_outputs["input_550"], V1_SCALES, square=True)
    for k in ("loc", "conf", "mask", "priors", "proto"):
        assert rel_err(out[k], reference_outputs["raw"][k]) <= 1e-4, k


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "config_name, config_file, device, dtype, size",
    [("yolact_plus_resnet50_config", "configs/yolact_plus_R_50_FPN_550.yaml", "cpu", torch.float32, 550),
     # This random R-101 drifts ~1.3e-4 between float32 and float64 whoever computes it (the
     # oracle too): its layout is checked in float64, where any wiring error still shows, and at
     # 160 px (the wiring does not depend on the size; 550 px in float64 took 2 minutes).
     ("yolact_plus_base_config", "configs/yolact_plus_R_101_FPN_550.yaml", "cpu", torch.float64, 160),
     pytest.param("yolact_plus_resnet50_config", "configs/yolact_plus_R_50_FPN_550.yaml", "cuda", torch.float32, 550,
                  marks=CUDA),
     pytest.param("yolact_resnet50_config", "configs/yolact_R_50_FPN_550.yaml", "cuda", torch.float32, 550, marks=CUDA)],
)
@pytest.mark.slow
def test_checkpoint_reproduces_original(config_name, config_file, device, dtype, size):
    """Our model (on ``device``) vs the oracle (CPU) on an original-layout checkpoint."""
    plus = "plus" in config_name
    scales, square = (PLUS_SCALES, False) if plus else (V1_SCALES, True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 on CUDA
    _, rgb, image = real_image_550()
    sd = synthetic_original_checkpoint(config_name, image)  # BatchNorm calibrated at 550
    if size != 550:
        image = torch.nn.functional.interpolate(image, (size, size), mode="bilinear", align_corners=False)
    model = build_model(yolact_cfg(config_file, ["MODEL.DEVICE", device, "MODEL.YOLACT.INPUT_SIZE", str(size)])).eval()
    incompatible = model.load_state_dict(sd, strict=True)
    assert not incompatible.missing_keys
    sd_t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    with torch.no_grad():
        ours = {k: v.cpu() for k, v in model.to(dtype).forward_raw(image.to(device, dtype)).items()}
        ref = oracle.forward(sd_t, image.to(dtype), scales, square=square, input_size=size)
    cells = sum(math.ceil(size / 2 ** level) ** 2 for level in range(3, 8))  # 550: 69^2 + 35^2 + ... = 6416
    assert ours["priors"].shape == (cells * (9 if plus else 3), 4)
    assert size != 550 or ours["priors"].shape[0] == (57744 if plus else 19248)
    conf = torch.cat([ref["conf"][..., 1:], ref["conf"][..., :1]], dim=-1)
    pairs = {"box_deltas": ref["loc"], "class_scores": conf, "mask_coeffs": ref["mask"],
             "priors": ref["priors"], "prototypes": ref["proto"]}
    for k, v in pairs.items():
        assert rel_err(ours[k].to(dtype), v) <= 1e-4, (k, rel_err(ours[k].to(dtype), v))
    if config_name == "yolact_plus_base_config":
        return  # final detections once per device is enough (the R-101 raw check covers the layout)
    h, w = rgb.shape[:2]
    t = torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    with torch.no_grad():
        inst = model([{"image": t, "height": h, "width": w}])[0]["instances"].to("cpu")
        x = model.preprocess_image([{"image": t}]).cpu()
    ref_det = oracle.detect(sd, oracle.forward(sd, x, scales, square=square), h, w)
    n = len(ref_det["scores"])
    assert n >= 20 and len(inst) == n
    assert matched_detections(inst, ref_det["classes"], ref_det["scores"], ref_det["boxes"], ref_det["masks"]) >= 0.95 * n
    if plus:
        # Mask scores (class confidence x predicted IoU) are re-scored, box scores are not.
        assert matched_detections(inst, ref_det["classes"], ref_det["mask_scores"], ref_det["boxes"],
                                  ref_det["masks"], score_field="mask_scores") >= 0.95 * n
        assert not torch.allclose(inst.mask_scores, inst.scores)


def test_deformable_block_with_zero_offsets_and_unit_masks_is_the_plain_block():
    torch.manual_seed(0)
    plain = BottleneckBlock(64, 256, bottleneck_channels=64, stride=2, norm="BN").eval()
    deform = BottleneckBlock(64, 256, bottleneck_channels=64, stride=2, norm="BN").eval()
    deform.load_state_dict(plain.state_dict())
    old = deform.conv2
    deform.conv2 = ModulatedDeformConv(64, 64, 3, stride=2, padding=1, norm=get_norm("BN", 64)).eval()
    deform.conv2.weight.data.copy_(old.weight)
    deform.conv2.norm.load_state_dict(old.norm.state_dict())
    torch.nn.init.constant_(deform.conv2.conv_offset_mask.bias[18:], 40.0)  # sigmoid(40) == 1 in float32
    x = torch.randn(2, 64, 23, 31)
    assert torch.allclose(deform(x), plain(x), atol=1e-5, rtol=1e-5)
    # Non-zero offsets change the output, and the offsets receive gradients.
    torch.nn.init.normal_(deform.conv2.conv_offset_mask.weight, std=0.05)
    y = deform(x)
    assert not torch.allclose(y, plain(x), atol=1e-3)
    y.square().sum().backward()
    assert deform.conv2.conv_offset_mask.weight.grad.abs().sum() > 0


def test_deformable_blocks_sit_where_the_original_puts_them():
    model = build_model(yolact_cfg("configs/yolact_plus_R_101_FPN_550.yaml"))
    bottom_up = model.backbone.bottom_up
    deformable = {
        f"{name}.{i}" for name in ("res2", "res3", "res4", "res5")
        for i, block in enumerate(getattr(bottom_up, name)) if isinstance(block.conv2, ModulatedDeformConv)
    }
    expected = {"res3.0", "res3.3", "res5.0"} | {f"res4.{i}" for i in range(0, 23, 3)}
    assert deformable == expected


@pytest.mark.parametrize("opts, message", [
    (["MODEL.RESNETS.DEFORM_MODULATED", "False"], "DEFORM_MODULATED is False.*set MODEL.RESNETS.DEFORM_MODULATED True"),
    (["MODEL.RESNETS.DEFORM_NUM_GROUPS", "2"], "DEFORM_NUM_GROUPS is 2.*set MODEL.RESNETS.DEFORM_NUM_GROUPS 1"),
])
def test_deformable_options_the_model_cannot_honour_are_refused(opts, message):
    """detectron2's DCNv1 default or several offset groups would silently build another model
    than YOLACT++'s (DCNv2, one group): refused in one line naming the key. Without a deformable
    stage the same keys are unused and accepted."""
    from yolact_d2.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        build_yolact_resnet(yolact_cfg("configs/pennfudan/yolact_plus_R_50_FPN_320.yaml", opts), ShapeSpec(channels=3))
    assert "\n" not in str(e.value)
    build_yolact_resnet(yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml", opts), ShapeSpec(channels=3))


@CUDA
def test_deformable_conv_on_cuda_matches_cpu():
    torch.manual_seed(0)
    conv = ModulatedDeformConv(16, 32, 3, stride=1, padding=1)
    torch.nn.init.normal_(conv.conv_offset_mask.weight, std=0.1)
    x = torch.randn(2, 16, 20, 20)
    cpu = conv(x)
    gpu = conv.cuda()(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4, rtol=1e-4)
