"""YOLACT's backbone: a detectron2 ResNet (optionally with DCNv2 blocks) and the original P3-P7 FPN.

detectron2's own FPN differs from the original YOLACT FPN in ways that change the outputs:
nearest top-down upsampling (original: bilinear to the exact lower-level size), no ReLU after the
output convs (original: ReLU on P3-P5), and a max-pool or P5/C5-based P6 (original: 3x3 stride-2
convs on ReLU(P5) and P6). :class:`YolactFPN` reproduces the original.
"""
import copy
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .deform_conv import DEFORM_CONV_IMPLS, ColumnWeightCache, deform_conv2d
from .errors import ConfigError

__all__ = ["YolactFPN", "ModulatedDeformConv", "build_yolact_resnet", "build_yolact_resnet_fpn_backbone"]


class YolactFPN(Backbone):
    """P3-P7 feature pyramid of the original YOLACT (``yolact.py`` class ``FPN``).

    Lateral 1x1 convs on C3-C5; top-down pathway with bilinear upsampling (align_corners=False) to
    the exact size of the lower level; 3x3 output convs followed by ReLU on P3-P5; P6 and P7 are
    3x3 stride-2 convs (padding 1, no ReLU) on ReLU(P5) and on P6. No padding of the input to a
    multiple of 32, so a 550x550 input gives feature sizes 69, 35, 18, 9, 5.

    Options beyond the original (defaults reproduce it): ``norm`` (a detectron2 ``get_norm`` name,
    ``MODEL.FPN.NORM``) inside the lateral and output convs, which then have no bias, as
    detectron2's FPN; ``output_relu=False`` drops the ReLU on P3-P5 (original
    ``fpn.relu_pred_layers``). Both keep P3-P7 alive when training from scratch, where the plain
    ReLUs die (docs/small_data_recipe.md).

    ``forward(x)`` takes normalised images (N, 3, H, W) and returns ``{"p3": (N, 256, H/8, W/8),
    ..., "p7": (N, 256, H/128, W/128)}`` (sizes rounded up by each stride-2 conv).
    """

    def __init__(
        self, bottom_up: Backbone, in_features: List[str], out_channels: int = 256,
        norm: str = "", output_relu: bool = True,
    ):
        super().__init__()
        if len(in_features) != 3:
            raise ConfigError(f"YolactFPN needs three bottom-up features (C3, C4, C5), got {in_features}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        shapes = bottom_up.output_shape()
        for level, name in zip((3, 4, 5), self.in_features):
            self.add_module(f"lateral_p{level}", Conv2d(
                shapes[name].channels, out_channels, 1, bias=not norm, norm=get_norm(norm, out_channels)
            ))
            self.add_module(f"output_p{level}", Conv2d(
                out_channels, out_channels, 3, padding=1, bias=not norm, norm=get_norm(norm, out_channels)
            ))
        self.output_relu = output_relu
        self.p6 = Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        base_stride = shapes[self.in_features[0]].stride
        self._out_features = [f"p{i}" for i in range(3, 8)]
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._out_feature_strides = {f"p{i}": base_stride * 2 ** (i - 3) for i in range(3, 8)}

    @property
    def size_divisibility(self) -> int:
        return 0  # the original never pads its input

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up = self.bottom_up(x)
        c3, c4, c5 = (bottom_up[f] for f in self.in_features)
        p5 = self.lateral_p5(c5)
        p4 = self.lateral_p4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="bilinear", align_corners=False)
        p3 = self.lateral_p3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="bilinear", align_corners=False)
        p3, p4, p5 = self.output_p3(p3), self.output_p4(p4), self.output_p5(p5)
        if self.output_relu:
            p3, p4, p5 = F.relu(p3), F.relu(p4), F.relu(p5)
        p6 = self.p6(p5)
        p7 = self.p7(p6)
        return {"p3": p3, "p4": p4, "p5": p5, "p6": p6, "p7": p7}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


class ModulatedDeformConv(nn.Module):
    """Modulated deformable 3x3 conv (DCNv2) with its norm, a drop-in for a ResNet block's ``conv2``.

    ``conv_offset_mask`` (zero-initialised) predicts 3 * kh * kw channels per output position: the
    first two thirds are the (dy, dx) offsets in pixels, interleaved per kernel tap as
    ``torchvision.ops.deform_conv2d`` expects; the last third, after a sigmoid, is the modulation
    mask in (0, 1). The conv has a bias, as in the original YOLACT++ DCN module (the plain ResNet
    convs do not). No compiled extension of our own or of detectron2 is needed:
    :func:`yolact_d2.deform_conv.deform_conv2d` runs CPU tensors through its embedding-bag path
    (``impl="auto"``, ``MODEL.YOLACT.DEFORM_CONV_IMPL``; same numbers as torchvision, several times
    faster) and everything else, tracing and ONNX export included, through
    ``torchvision.ops.deform_conv2d``; ``impl="torchvision"`` always uses torchvision's op.

    Input (N, in_channels, H, W), output (N, out_channels, H', W') with the usual conv arithmetic.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1, norm=None,
                 impl: str = "auto"):
        super().__init__()
        if impl not in DEFORM_CONV_IMPLS:
            raise ConfigError(f"MODEL.YOLACT.DEFORM_CONV_IMPL must be one of {', '.join(DEFORM_CONV_IMPLS)}, got {impl!r}")
        self.impl = impl
        self.weight_cache = ColumnWeightCache()  # re-laid-out weight of the CPU path, kept between calls
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.conv_offset_mask = nn.Conv2d(
            in_channels, 3 * kernel_size * kernel_size, kernel_size, stride, padding, dilation, bias=True
        )
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1, o2, m = torch.chunk(self.conv_offset_mask(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        out = deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=torch.sigmoid(m), impl=self.impl, weight_cache=self.weight_cache,
        )
        return self.norm(out) if self.norm is not None else out


def build_yolact_resnet(cfg, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ResNet, with YOLACT++'s deformable blocks where the config asks for them.

    The bottleneck's 3x3 conv (``conv2``) of block i in a stage with
    ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` True becomes a :class:`ModulatedDeformConv` when
    ``i % MODEL.YOLACT.DEFORM_INTERVAL == 0`` (YOLACT++ R-101: interval 3, i.e. blocks 0, 3 of res3,
    0, 3, ..., 21 of res4 and 0 of res5; R-50: interval 1, every block of res3-res5).

    YOLACT++'s deformable convs are DCNv2 (modulated) with one offset group, the only kind the
    published checkpoints hold: ``MODEL.RESNETS.DEFORM_MODULATED`` must be True and
    ``DEFORM_NUM_GROUPS`` 1 whenever a stage is deformable. detectron2's defaults (False, i.e.
    DCNv1) would otherwise turn a config silently into another model.

    ``MODEL.YOLACT.DEFORM_CONV_IMPL`` picks the deformable conv's implementation ("auto": the
    embedding-bag CPU path of :mod:`yolact_d2.deform_conv` for CPU tensors; "torchvision").

    Raises:
        ConfigError (a ValueError): deformable blocks requested on a BasicBlock ResNet (R-18/34),
            an interval < 1, ``DEFORM_MODULATED`` False or ``DEFORM_NUM_GROUPS`` != 1 with a
            deformable stage, an unknown ``DEFORM_CONV_IMPL``.
    """
    r = cfg.MODEL.RESNETS
    deform = list(r.DEFORM_ON_PER_STAGE)
    interval = cfg.MODEL.YOLACT.DEFORM_INTERVAL
    if any(deform) and r.DEPTH in (18, 34):
        raise ConfigError("MODEL.RESNETS.DEFORM_ON_PER_STAGE needs a bottleneck ResNet (DEPTH 50 or 101)")
    if any(deform) and not r.DEFORM_MODULATED:
        raise ConfigError(
            "MODEL.RESNETS.DEFORM_MODULATED is False, but YOLACT++'s deformable convs are modulated "
            "(DCNv2); set MODEL.RESNETS.DEFORM_MODULATED True"
        )
    if any(deform) and r.DEFORM_NUM_GROUPS != 1:
        raise ConfigError(
            f"MODEL.RESNETS.DEFORM_NUM_GROUPS is {r.DEFORM_NUM_GROUPS}; YOLACT++'s deformable convs have one "
            "offset group: set MODEL.RESNETS.DEFORM_NUM_GROUPS 1"
        )
    if interval < 1:
        raise ConfigError(f"MODEL.YOLACT.DEFORM_INTERVAL must be >= 1, got {interval}")
    if cfg.MODEL.YOLACT.DEFORM_CONV_IMPL not in DEFORM_CONV_IMPLS:
        raise ConfigError(f"MODEL.YOLACT.DEFORM_CONV_IMPL must be one of {', '.join(DEFORM_CONV_IMPLS)}, "
                          f"got {cfg.MODEL.YOLACT.DEFORM_CONV_IMPL!r}")
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.defrost()
    # detectron2's DeformBottleneckBlock needs its compiled _C; build plain blocks, then swap conv2.
    plain_cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    resnet = build_resnet_backbone(plain_cfg, input_shape)
    norm = cfg.MODEL.RESNETS.NORM
    for stage_name, on in zip(("res2", "res3", "res4", "res5"), deform):
        if not on or not hasattr(resnet, stage_name):
            continue
        for i, block in enumerate(getattr(resnet, stage_name)):
            if i % interval:
                continue
            old = block.conv2
            block.conv2 = ModulatedDeformConv(
                old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0],
                old.padding[0], old.dilation[0], norm=get_norm(norm, old.out_channels),
                impl=cfg.MODEL.YOLACT.DEFORM_CONV_IMPL,
            )
    return resnet


@BACKBONE_REGISTRY.register()
def build_yolact_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``MODEL.BACKBONE.NAME: "build_yolact_resnet_fpn_backbone"``: ResNet (C3-C5) + :class:`YolactFPN`.

    Reads ``MODEL.RESNETS.*`` (``OUT_FEATURES`` must list the three FPN inputs, e.g. res3-res5) and
    ``MODEL.FPN.IN_FEATURES`` / ``MODEL.FPN.OUT_CHANNELS`` / ``MODEL.FPN.NORM`` and
    ``MODEL.YOLACT.FPN_OUTPUT_RELU``.
    """
    bottom_up = build_yolact_resnet(cfg, input_shape)
    return YolactFPN(
        bottom_up, cfg.MODEL.FPN.IN_FEATURES, cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM, output_relu=cfg.MODEL.YOLACT.FPN_OUTPUT_RELU,
    )
