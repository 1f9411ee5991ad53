"""The prediction head shared across FPN levels (YOLACT paper Sec. 3.3, Fig. 4)."""
import math
from typing import List, Tuple

import torch
from torch import nn

from detectron2.layers import Conv2d, get_norm

from .errors import ConfigError

__all__ = ["YolactHead", "xavier_init_convs"]


def xavier_init_convs(modules) -> None:
    """The original's ``init_weights``: Xavier-uniform weights and zero biases for every
    ``nn.Conv2d`` among ``modules`` (an iterable of modules, visited in order: the order fixes
    which random numbers each conv draws)."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class YolactHead(nn.Module):
    """One 3x3 conv + ReLU shared by three 3x3 convs predicting, per prior, 4 box deltas, C + 1 class
    logits (background LAST, detectron2's convention; the original puts it first and the weight
    converter reorders it) and k mask coefficients (tanh, in [-1, 1]).

    The same module runs on every level (original ``share_prediction_module``). Output channels are
    prior-major: channel ``a * 4 + j`` is coordinate j of prior a at that location.

    ``forward(features)``: a list of L tensors (N, in_channels, h_l, w_l) -> a tuple
    ``(box_deltas (N, A, 4), class_logits (N, A, C + 1), mask_coeffs (N, A, k))`` where
    A = sum_l h_l * w_l * num_priors_per_location, ordered level, row, column, prior.

    ``norm`` ("" or "GN", ``MODEL.YOLACT.HEAD_NORM``) puts a GroupNorm inside the shared conv (then
    without bias). BatchNorm is refused: one module serves all five levels, and a batch statistic
    over them would mix feature maps of very different scales.

    Raises:
        ValueError: a norm other than "" or "GN".
    """

    def __init__(
        self, in_channels: int, num_priors_per_location: int, num_classes: int, num_prototypes: int,
        norm: str = "",
    ):
        super().__init__()
        if norm not in ("", "GN"):
            raise ConfigError(
                f"MODEL.YOLACT.HEAD_NORM is {norm!r}; use '' or 'GN' (the head is shared by all FPN "
                "levels, so a BatchNorm would mix their statistics)"
            )
        a = num_priors_per_location
        self.num_priors_per_location = a
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.conv = Conv2d(in_channels, in_channels, 3, padding=1, bias=not norm, norm=get_norm(norm, in_channels))
        self.bbox_pred = nn.Conv2d(in_channels, a * 4, 3, padding=1)
        self.cls_score = nn.Conv2d(in_channels, a * (num_classes + 1), 3, padding=1)
        self.coeff_pred = nn.Conv2d(in_channels, a * num_prototypes, 3, padding=1)
        xavier_init_convs(self.modules())

    def init_focal_bias(self, prior_prob: float) -> None:
        """Start every foreground probability sigmoid(logit) at ``prior_prob`` (in (0, 1)), as the
        original does with ``use_sigmoid_focal_loss`` (``focal_loss_init_pi``): foreground biases
        -log((1 - p) / p), the unused background bias +log((1 - p) / p).

        Raises:
            ValueError: ``prior_prob`` outside (0, 1).
        """
        if not 0.0 < prior_prob < 1.0:
            raise ConfigError(f"MODEL.YOLACT.FOCAL_LOSS_PRIOR_PROB must be in (0, 1), got {prior_prob}")
        b = math.log((1.0 - prior_prob) / prior_prob)
        with torch.no_grad():
            bias = self.cls_score.bias.view(self.num_priors_per_location, self.num_classes + 1)
            bias[:, : self.num_classes] = -b
            bias[:, self.num_classes] = b

    @staticmethod
    def _flatten(x: torch.Tensor, last: int) -> torch.Tensor:
        # (N, a * last, h, w) -> (N, h * w * a, last)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, last)

    def forward(self, features: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, logits, coeffs = [], [], []
        for x in features:
            x = torch.relu(self.conv(x))
            boxes.append(self._flatten(self.bbox_pred(x), 4))
            logits.append(self._flatten(self.cls_score(x), self.num_classes + 1))
            coeffs.append(self._flatten(self.coeff_pred(x), self.num_prototypes))
        return torch.cat(boxes, 1), torch.cat(logits, 1), torch.tanh(torch.cat(coeffs, 1))
