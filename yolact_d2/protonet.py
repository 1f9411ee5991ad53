"""The protonet: k prototype masks from P3 (YOLACT paper Sec. 3.2, Fig. 3)."""
import torch
from torch import nn

__all__ = ["ProtoNet"]


class ProtoNet(nn.Module):
    """FCN on P3: three 3x3 convs + ReLU, bilinear x2 upsampling + ReLU, a 3x3 conv + ReLU, and a
    1x1 conv to k channels + ReLU (the original ``proto_net``; its layer indices are kept so that
    ``layers.{0,2,4,8,10}`` are the convs).

    ``forward(p3)``: (N, C, h, w) -> prototypes (N, 2h, 2w, k), non-negative, channels last as the
    original returns them (138 x 138 x 32 at a 550 input).
    """

    def __init__(self, in_channels: int = 256, num_prototypes: int = 32, channels: int = None):
        super().__init__()
        channels = channels or in_channels  # 256, the FPN width, in every published model
        conv = lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2)  # noqa: E731
        self.layers = nn.Sequential(
            conv(in_channels, channels, 3), nn.ReLU(inplace=True),
            conv(channels, channels, 3), nn.ReLU(inplace=True),
            conv(channels, channels, 3), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.ReLU(inplace=True),
            conv(channels, channels, 3), nn.ReLU(inplace=True),
            conv(channels, num_prototypes, 1), nn.ReLU(inplace=True),
        )
        self.num_prototypes = num_prototypes

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        return self.layers(p3).permute(0, 2, 3, 1).contiguous()
