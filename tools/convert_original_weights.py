#!/usr/bin/env python
"""Convert an original YOLACT / YOLACT++ checkpoint (dbolya/yolact layout) to yolact-d2's layout.

    python tools/convert_original_weights.py yolact_resnet50_54_800000.pth yolact_R_50_550.pth

The result is a detectron2 checkpoint ({"model": state_dict, "__author__": ...}) that
``MODEL.WEIGHTS`` loads without conversion. (Original files also load directly: the model converts
them on load; this tool just does it once, ahead of time.)
"""
import argparse
import sys

import torch

from yolact_d2.console import HelpFormatter
from yolact_d2.checkpoint import CheckpointLayoutError, convert_original_state_dict, detect_layout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("src", help="original checkpoint (.pth state_dict)")
    parser.add_argument("dst", help="output .pth in yolact-d2 layout")
    parser.add_argument("--num-classes", type=int, default=None, help="C, if it cannot be inferred")
    args = parser.parse_args(argv)
    try:
        state_dict = torch.load(args.src, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        sys.exit(f"error: cannot read checkpoint {args.src}: {str(e).splitlines()[0]}")
    if not isinstance(state_dict, dict) or detect_layout(state_dict) != "original":
        sys.exit(f"error: {args.src} is not in the original YOLACT layout (keys backbone.layers.*, proto_net.*, ...)")
    try:
        converted = convert_original_state_dict(state_dict, args.num_classes)
    except CheckpointLayoutError as e:
        sys.exit(f"error: {args.src}: {e}")
    torch.save({"model": converted, "__author__": "yolact-d2 convert_original_weights"}, args.dst)
    print(f"converted {len(state_dict)} tensors of {args.src} -> {args.dst}")


if __name__ == "__main__":
    main()
