#!/usr/bin/env python
"""Convert an original YOLACT / YOLACT++ checkpoint (dbolya/yolact layout) to yolact-d2's layout,
or re-save a weights file you trust in a form that loads without running code.

    python tools/convert_original_weights.py yolact_resnet50_54_800000.pth yolact_R_50_550.pth
    python tools/convert_original_weights.py --trust-pickle someones_model.pkl model.pth

The result is a detectron2 checkpoint ({"model": state_dict, "__author__": ...}) that
``MODEL.WEIGHTS`` loads without conversion. (Original files also load directly: the model converts
them on load; this tool just does it once, ahead of time.)

Every weights file is read without running code (yolact_d2/checkpointer.py); a file that asks for
more is refused. --trust-pickle unpickles SRC with no restriction: whatever code it holds RUNS. Use
it only on a file whose origin you trust, once, and use DST from then on (docs/checkpoints.md).
"""
import argparse
import pickle
import sys

import numpy as np
import torch

from yolact_d2.console import HelpFormatter
from yolact_d2.checkpoint import CheckpointLayoutError, convert_original_state_dict, detect_layout
from yolact_d2.checkpointer import read_checkpoint
from yolact_d2.errors import YolactUserError, run_main


def _trusted_load(path: str):
    """Unrestricted unpickling: runs any code in the file (the option says so)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614  (--trust-pickle)


def _tensors(state: dict, src: str) -> dict:
    """The tensors of a state dict (numpy arrays converted), refusing anything else."""
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise YolactUserError(f"{src}: entry {k} is a {type(v).__name__}, not a tensor; nothing was written")
        out[k] = v
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("src", help="original checkpoint (.pth state_dict), or with --trust-pickle any weights file")
    parser.add_argument("dst", help="output .pth in yolact-d2 layout")
    parser.add_argument("--num-classes", type=int, default=None, help="C, if it cannot be inferred")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read SRC with unrestricted unpickling (RUNS any code it holds) and write its tensors "
                             "as a file that loads safely; only for a file you trust")
    args = parser.parse_args(argv)
    try:
        data = _trusted_load(args.src) if args.trust_pickle else read_checkpoint(args.src)
    except OSError as e:
        raise YolactUserError(f"cannot read checkpoint {args.src}: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # only --trust-pickle gets here
        raise YolactUserError(f"{args.src} is not a readable checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise YolactUserError(f"{args.src} holds a {type(data).__name__}, not a dict of weights")
    state = data.get("model", data.get("blobs", data)) if args.trust_pickle else data
    if isinstance(state, dict) and detect_layout(state) == "original":
        try:
            converted = convert_original_state_dict(state, args.num_classes)
        except CheckpointLayoutError as e:
            raise YolactUserError(f"{args.src}: {e}") from None
        author = "yolact-d2 convert_original_weights"
    elif args.trust_pickle and isinstance(state, dict):
        converted = _tensors(state, args.src)  # another layout: saved as it is, the loader matches names
        author = f"yolact-d2 convert_original_weights --trust-pickle {args.src}"
    else:
        raise YolactUserError(
            f"{args.src} is not in the original YOLACT layout (keys backbone.layers.*, proto_net.*, ...)"
        )
    torch.save({"model": converted, "__author__": author}, args.dst)
    read_checkpoint(args.dst)  # what was written loads safely
    print(f"converted {len(converted)} tensors of {args.src} -> {args.dst}")


if __name__ == "__main__":
    run_main(main, "convert_original_weights.py")
