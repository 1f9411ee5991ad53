"""Shared fixtures: paths to ../shared (skip when absent) and config/model builders."""
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; YOLACT_D2_SHARED points elsewhere (e.g. a copy on a GPU machine);
# the deprecated YOLACT_D2_DATA still names data/ alone (yolact_d2/paths.py).
from yolact_d2.paths import data_root, shared_root  # noqa: E402

SHARED = shared_root()
REFERENCE = SHARED / "reference"
DATA = data_root()


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
    cfg.MODEL.DEVICE = "cpu"  # unless opts say otherwise
    cfg.merge_from_list(list(opts))
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


def matched_detections(inst, classes, scores, boxes, masks, score_field="scores"):
    """How many reference detections ``inst`` reproduces: same class, score within 1e-3, box within
    1 px, mask IoU >= 0.95 (the issue's criteria). ``masks``: (D, H, W) bool numpy/tensor."""
    ours_masks = inst.pred_masks.cpu().numpy()
    ours_scores = getattr(inst, score_field)
    masks = np.asarray(masks)
    matched = 0
    for i in range(len(scores)):
        candidates = (
            (inst.pred_classes == int(classes[i]))
            & ((ours_scores - float(scores[i])).abs() <= 1e-3)
            & ((inst.pred_boxes.tensor - torch.as_tensor(boxes[i]).float()).abs().max(dim=1).values <= 1.0)
        )
        for j in candidates.nonzero().flatten().tolist():
            inter = np.logical_and(ours_masks[j], masks[i]).sum()
            union = np.logical_or(ours_masks[j], masks[i]).sum()
            if (inter / union if union else 1.0) >= 0.95:
                matched += 1
                break
    return matched


# Module fixtures that train a model, export one or run entry points in subprocesses: a test that
# uses one is `slow` (pytest.ini), like the tests marked one by one.
SLOW_FIXTURES = {"run", "runs", "trained", "fitted_run", "demo_runs", "entry_point_runs",
                 "exported_files", "onnx_files", "e2e_file", "raw_file", "int8_file"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
