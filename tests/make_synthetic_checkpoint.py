#!/usr/bin/env python
"""Write a random but well-scaled checkpoint in the ORIGINAL YOLACT/YOLACT++ layout (no weights can
be downloaded here): every tensor of ``original_checkpoint_layout.tsv`` for the named original
config, BatchNorm calibrated on a real photo, output layers scaled so that class scores and masks
are decisive. Used for benchmarks of models without a reference checkpoint (e.g. YOLACT++), the
same construction as the tests' (tests/helpers.py, independent of yolact_d2: the original's layout
table and tests/original_oracle.py). It lives beside the tests because it is built from their oracle.

    python tests/make_synthetic_checkpoint.py yolact_plus_resnet50_config output/yolact_plus_r50_synthetic.pth
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: helpers, conftest, original_oracle


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_name", help="original config name, e.g. yolact_plus_resnet50_config")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    from helpers import real_image_550, synthetic_original_checkpoint

    _, _, image = real_image_550()
    sd = synthetic_original_checkpoint(args.config_name, image)
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, args.dst)
    print(f"wrote {len(sd)} tensors ({args.config_name}, original layout) to {args.dst}")


if __name__ == "__main__":
    main()
