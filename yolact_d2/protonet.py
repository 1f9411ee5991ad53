"""The protonet: k prototype masks from P3 (YOLACT paper Sec. 3.2, Fig. 3)."""
import torch
from torch import nn

from detectron2.layers import Conv2d, get_norm

from .errors import ConfigError

__all__ = ["ProtoNet"]


class ProtoNet(nn.Module):
    """FCN on P3: three 3x3 convs + ReLU, bilinear x2 upsampling + ReLU, a 3x3 conv + ReLU, and a
    1x1 conv to k channels + ReLU (the original ``proto_net``; its layer indices are kept so that
    ``layers.{0,2,4,8,10}`` are the convs).

    ``forward(p3)``: (N, C, h, w) -> prototypes (N, 2h, 2w, k), non-negative with the ReLU, channels last as the
    original returns them (138 x 138 x 32 at a 550 input).

    Options (defaults = the original): ``norm`` (detectron2 ``get_norm`` name,
    ``MODEL.YOLACT.PROTONET_NORM``) inside the four 3x3 convs, which then have no bias;
    ``prototype_activation`` "relu" or "none" (``MODEL.YOLACT.PROTOTYPE_ACTIVATION``, original
    ``mask_proto_prototype_activation``): "none" replaces the final ReLU by an identity, so the
    prototypes take any real value and a prototype cannot die at zero. Layer indices stay the same.

    Raises:
        ValueError: an unknown ``prototype_activation``.
    """

    def __init__(
        self, in_channels: int = 256, num_prototypes: int = 32, channels: int = None,
        norm: str = "", prototype_activation: str = "relu",
    ):
        super().__init__()
        if prototype_activation not in ("relu", "none"):
            raise ConfigError(
                f"MODEL.YOLACT.PROTOTYPE_ACTIVATION is {prototype_activation!r}; use 'relu' or 'none'"
            )
        channels = channels or in_channels  # 256, the FPN width, in every published model

        def conv(i, o, k, norm=""):
            return Conv2d(i, o, k, padding=k // 2, bias=not norm, norm=get_norm(norm, o))

        self.layers = nn.Sequential(
            conv(in_channels, channels, 3, norm), nn.ReLU(inplace=True),
            conv(channels, channels, 3, norm), nn.ReLU(inplace=True),
            conv(channels, channels, 3, norm), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.ReLU(inplace=True),
            conv(channels, channels, 3, norm), nn.ReLU(inplace=True),
            conv(channels, num_prototypes, 1),
            nn.ReLU(inplace=True) if prototype_activation == "relu" else nn.Identity(),
        )
        self.num_prototypes = num_prototypes

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        return self.layers(p3).permute(0, 2, 3, 1).contiguous()
