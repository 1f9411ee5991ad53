"""Training details that must follow the original: weight decay on norms, the re-scoring net's init."""
import math

import pytest
import torch
from detectron2.modeling import build_model

from conftest import REPO, yolact_cfg

PAPER_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("yolact*.yaml"))


@pytest.mark.parametrize("config", PAPER_CONFIGS + ["configs/pascal_sbd/yolact_R_50_FPN_550.yaml"])
def test_paper_configs_decay_norms_as_the_original(config):
    cfg = yolact_cfg(config)
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == cfg.SOLVER.WEIGHT_DECAY == 0.0005


def test_rescoring_net_is_xavier_initialised():
    torch.manual_seed(0)
    model = build_model(yolact_cfg("configs/yolact_plus_R_50_FPN_550.yaml"))
    convs = [m for m in model.mask_rescoring.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        fan_in = conv.weight[0].numel()
        fan_out = conv.out_channels * conv.weight[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = conv.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound  # uniform(-bound, bound)
        assert torch.count_nonzero(conv.bias) == 0
