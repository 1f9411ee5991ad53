"""Same numbers as the authors' code: raw outputs and final detections vs ../shared/reference."""
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from conftest import DATA, matched_detections, need


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_forward_raw_matches_original(reference_model, reference_outputs):
    raw = reference_outputs["raw"]
    with torch.no_grad():
        out = reference_model.forward_raw(reference_outputs["input_550"])
    # The original puts background first; ours is last (detectron2's convention).
    conf = torch.cat([raw["conf"][..., 1:], raw["conf"][..., :1]], dim=-1)
    expected = {
        "box_deltas": raw["loc"], "class_scores": conf, "mask_coeffs": raw["mask"],
        "priors": raw["priors"], "prototypes": raw["proto"],
    }
    for name, ref in expected.items():
        assert out[name].shape == ref.shape, name
        assert rel_err(out[name], ref) <= 1e-4, (name, rel_err(out[name], ref))


def test_final_detections_match_original(reference_model, reference_outputs):
    path = need(DATA / "coco128" / "images" / reference_outputs["image"])
    bgr = cv2.imread(str(path))  # the reference decoded with OpenCV
    h, w = bgr.shape[:2]
    image = torch.as_tensor(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))  # RGB, as INPUT.FORMAT
    with torch.no_grad():
        inst = reference_model([{"image": image, "height": h, "width": w}])[0]["instances"]
    assert inst.image_size == (h, w) and inst.pred_masks.shape[1:] == (h, w)
    ref_masks = mask_util.decode(reference_outputs["masks_rle"]).transpose(2, 0, 1).astype(bool)
    n = len(reference_outputs["scores"])
    assert len(inst) == n
    matched = matched_detections(
        inst, reference_outputs["classes"], reference_outputs["scores"], reference_outputs["boxes"], ref_masks
    )
    assert matched >= 0.95 * n, f"{matched}/{n} original detections reproduced"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_original_and_cpu(reference_model, reference_outputs):
    """The same checkpoint on CUDA (fp32, TF32 off) reproduces the original's raw outputs, and
    fp16 autocast keeps the final detections close to fp32's."""
    import copy

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = copy.deepcopy(reference_model).cuda().eval()
    x = reference_outputs["input_550"].cuda()
    with torch.no_grad():
        out = model.forward_raw(x)
    raw = reference_outputs["raw"]
    conf = torch.cat([raw["conf"][..., 1:], raw["conf"][..., :1]], dim=-1)
    for name, ref in {"box_deltas": raw["loc"], "class_scores": conf, "mask_coeffs": raw["mask"],
                      "prototypes": raw["proto"]}.items():
        assert rel_err(out[name].cpu(), ref) <= 1e-4, name
    path = need(DATA / "coco128" / "images" / reference_outputs["image"])
    bgr = cv2.imread(str(path))
    image = torch.as_tensor(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        fp32 = model([{"image": image}])[0]["instances"].to("cpu")
        with torch.autocast("cuda", dtype=torch.float16):
            fp16 = model([{"image": image}])[0]["instances"].to("cpu")
    assert fp32.pred_masks.device.type == "cpu" and len(fp32) == len(reference_outputs["scores"])
    ref_masks = mask_util.decode(reference_outputs["masks_rle"]).transpose(2, 0, 1).astype(bool)
    args = (reference_outputs["classes"], reference_outputs["scores"], reference_outputs["boxes"], ref_masks)
    assert matched_detections(fp32, *args) >= 0.95 * len(fp32)
    # fp16 rounds scores at ~1e-3: compare its top detections with fp32's loosely.
    assert torch.allclose(fp16.scores[:20].float(), fp32.scores[:20], atol=1e-2)
