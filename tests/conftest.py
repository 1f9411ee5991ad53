"""Shared fixtures: paths to ../shared (skip when absent) and config/model builders."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"


def need(path: Path) -> Path:
    """Skip the calling test when ``path`` (under ../shared) is absent, as on a user's fresh clone."""
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path


def yolact_cfg(config="configs/yolact_R_50_FPN_550.yaml", opts=()):
    from detectron2.config import get_cfg

    from yolact_d2 import add_yolact_config

    cfg = get_cfg()
    add_yolact_config(cfg)
    cfg.merge_from_file(str(REPO / config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture(scope="session")
def reference_outputs():
    return torch.load(need(REFERENCE / "yolact_resnet50_seed1_outputs.pth"), weights_only=False)


@pytest.fixture(scope="session")
def reference_model():
    """YOLACT R-50 with the original-layout reference checkpoint loaded through detectron2's checkpointer."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    ckpt = need(REFERENCE / "yolact_resnet50_seed1.pth")
    model = build_model(yolact_cfg())
    DetectionCheckpointer(model).load(str(ckpt))
    return model.eval()
