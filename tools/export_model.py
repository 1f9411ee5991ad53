#!/usr/bin/env python
r"""Export a YOLACT model to ONNX or TorchScript (see yolact_d2/export.py for the two graphs).

    python tools/export_model.py --config-file configs/yolact_R_50_FPN_550.yaml --format onnx \
        --graph e2e --output output/export/yolact_R_50_550_e2e.onnx MODEL.WEIGHTS model.pth

    # int8 (onnxruntime static quantization of every Conv; needs training photos to calibrate)
    python tools/export_model.py --config-file ... --quantize int8 --calibration-images DIR MODEL.WEIGHTS model.pth

Prints one line per file written; a setting or path that cannot be exported is one line on stderr
(exit 2).
"""
import argparse
import logging
import os

import yolact_d2  # noqa: F401  (first: its warning filters, before detectron2 is imported)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from yolact_d2.config import load_config  # noqa: E402
from yolact_d2.console import HelpFormatter  # noqa: E402
from yolact_d2.checkpoint import adopt_checkpoint_metadata, checkpoint_metadata  # noqa: E402
from yolact_d2.checkpointer import load_weights, trained_weights  # noqa: E402
from yolact_d2.errors import MissingFileError, run_main  # noqa: E402
from yolact_d2.export import DEFAULT_OPSET, DEFORM_CONV_OPSET, ExportError, export_model, quantize_onnx  # noqa: E402
from yolact_d2.predictor import check_class_names, resolve_metadata  # noqa: E402

SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--graph", default="e2e", choices=["e2e", "raw", "both"],
                   help="e2e: uint8 image in, detections out; raw: normalised images in, network tensors out")
    p.add_argument("--output", default=None,
                   help="file (one graph) or folder (--graph both); default output/export/<config>_<graph><suffix>")
    p.add_argument("--sample-image", default=None,
                   help="image to trace with (default: a 480x640 grey image); other sizes work afterwards")
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}; {DEFORM_CONV_OPSET} for YOLACT++, whose DeformConv needs it)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: also write <output>_int8.onnx, every Conv quantized (ONNX e2e graph only)")
    p.add_argument("--calibration-images", default=None, metavar="DIR",
                   help="folder of training photos for the int8 calibration (sorted by name)")
    p.add_argument("--calibration-count", type=int, default=32, help="how many of them (default 32)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS m.pth")
    return p.parse_args(argv)


def load_model(cfg):
    """The config's model with its weights, and what training stored beside them
    (:func:`yolact_d2.checkpoint.checkpoint_metadata`: class names, input format; ``{}`` if none)."""
    model = build_model(cfg)
    meta = {}
    if cfg.MODEL.WEIGHTS:  # empty: random weights, which trained_weights has warned of
        meta = checkpoint_metadata(load_weights(model, cfg.MODEL.WEIGHTS).extra)
    return model.eval(), meta


def calibration_images(folder: str, count: int):
    """The first ``count`` images of ``folder`` (sorted by name) as (H, W, 3) uint8 BGR arrays."""
    if not folder:
        raise ExportError("--quantize int8 needs --calibration-images DIR (a folder of training photos)")
    if not os.path.isdir(folder):
        raise MissingFileError(f"--calibration-images folder {folder} not found")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))[:count]
    if not files:
        raise ExportError(f"--calibration-images {folder} holds no {'/'.join(IMAGE_SUFFIXES)} file")
    images = []
    for f in files:
        image = cv2.imread(os.path.join(folder, f), cv2.IMREAD_COLOR)
        if image is None:
            raise ExportError(f"calibration image {os.path.join(folder, f)} cannot be read; remove or replace it")
        images.append(image)
    return images


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quantize == "int8" and (args.format != "onnx" or args.graph == "raw"):
        raise ExportError("--quantize int8 writes an ONNX e2e graph; use --format onnx with --graph e2e or both")
    calibration = calibration_images(args.calibration_images, args.calibration_count) if args.quantize == "int8" else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # traced on the CPU; the graphs themselves are device-free
    # Empty MODEL.WEIGHTS (a train_net.py run's config.yaml): that run's model_best.pth or model_final.pth.
    cfg.MODEL.WEIGHTS = trained_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR)
    cfg.freeze()
    if args.sample_image:
        image = cv2.imread(args.sample_image, cv2.IMREAD_COLOR)
        if image is None:
            raise ExportError(f"--sample-image {args.sample_image} cannot be read as an image")
    else:
        image = np.full((480, 640, 3), 114, np.uint8)
    graphs = ["e2e", "raw"] if args.graph == "both" else [args.graph]
    name = os.path.splitext(os.path.basename(args.config_file))[0]
    check_class_names(cfg)
    model, meta = load_model(cfg)
    # The file records the model's own input format, names and priors: the weights' when the config's differ.
    if cfg.MODEL.WEIGHTS:
        cfg = adopt_checkpoint_metadata(cfg, model, meta, cfg.MODEL.WEIGHTS)
    names = list(resolve_metadata(cfg, meta.get("class_names")).thing_classes)[: cfg.MODEL.YOLACT.NUM_CLASSES]
    for graph in graphs:
        if args.output and (len(graphs) == 1):
            out = args.output
        else:
            out = os.path.join(args.output or "output/export", f"{name}_{graph}{SUFFIX[args.format]}")
        export_model(cfg, model, graph, args.format, out, torch.from_numpy(image), names, args.opset)
        print(f"wrote {out}")
        if calibration is not None and graph == "e2e":
            out_int8 = os.path.splitext(out)[0] + "_int8.onnx"
            quantize_onnx(out, out_int8, calibration)
            print(f"wrote {out_int8}")
    return 0


if __name__ == "__main__":
    run_main(main, "export_model.py")
