"""YOLACT++ fast mask re-scoring network (YOLACT++ paper Sec. 3.2, original ``FastMaskIoUNet``)."""
import torch
from torch import nn

__all__ = ["FastMaskIoUNet"]


class FastMaskIoUNet(nn.Module):
    """6-layer FCN predicting, per class, the IoU of a predicted mask with its ground truth.

    Five 3x3 stride-2 convs without padding (8, 16, 32, 64, 128 channels), then a 1x1 conv to C
    channels, ReLU after every layer (the last one too, as the original), then global max pooling.
    Layer indices ``layers.{0,2,4,6,8,10}`` are the convs, as the original ``maskiou_net``.

    ``forward(masks)``: (P, 1, h, w) cropped soft masks on the prototype grid (138 x 138 at 550),
    values in [0, 1] -> (P, C) predicted mask IoU per class (>= 0; trained towards [0, 1]).
    """

    def __init__(self, num_classes: int, channels=(8, 16, 32, 64, 128)):
        super().__init__()
        layers, in_ch = [], 1
        for ch in channels:
            layers += [nn.Conv2d(in_ch, ch, 3, stride=2), nn.ReLU(inplace=True)]
            in_ch = ch
        layers += [nn.Conv2d(in_ch, num_classes, 1), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.layers(masks).amax(dim=(2, 3))

    def predict_iou(self, masks: torch.Tensor, classes: torch.Tensor, blank_appended: bool = False) -> torch.Tensor:
        """IoU predicted for each mask's own class: masks (D, h, w), classes (D,) -> (D,); D may be 0.
        ``blank_appended``: ``masks`` is (D + 1, h, w), already ending with the blank mask below
        (the exported graph appends it once for its resize too).

        One blank mask rides along and is dropped: a convolution refuses an empty batch, and a
        branch on D would be frozen into a traced graph (an export traced on an image without
        detections would then score every later image as empty). The eager model and the exported
        graph both run this code.
        """
        padded = masks if blank_appended else torch.cat([masks, masks.new_zeros((1,) + masks.shape[1:])])
        padded_classes = torch.cat([classes, classes.new_zeros(1)])
        return self(padded[:, None]).gather(1, padded_classes[:, None]).squeeze(1)[:-1]
