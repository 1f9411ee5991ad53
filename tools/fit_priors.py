#!/usr/bin/env python
r"""Fit a config's priors (anchor scales per level, shared aspect ratios) to a training set's boxes
and print the config lines to use, with the coverage before and after (yolact_d2/prior_fit.py).

    python tools/fit_priors.py --config-file configs/pennfudan/yolact_R_18_FPN_320.yaml
    python tools/fit_priors.py --config-file configs/Base-YOLACT-SmallData.yaml DATASETS.TRAIN "('coco128',)"
    python tools/fit_priors.py --config-file configs/Base-YOLACT-SmallData.yaml \
        --train-json my/train.json --train-images my/images

The number of priors stays as configured. ``MODEL.YOLACT.FIT_PRIORS True`` in train_net.py does the
same fit at the start of training instead. A bad config or dataset is one line on stderr (exit 2).
"""
import argparse
import time

from yolact_d2.config import load_config
from yolact_d2.console import HelpFormatter
from yolact_d2.data.custom import apply_coco_json_datasets
from yolact_d2.diagnostics import format_coverage
from yolact_d2.errors import run_main
from yolact_d2.prior_fit import config_lines, fit_priors_to_dataset, training_dataset_dicts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--train-json", help="COCO instances JSON to fit to (sets DATASETS.TRAIN_JSON)")
    parser.add_argument("--train-images", help="its image folder (DATASETS.TRAIN_IMAGES)")
    parser.add_argument("--iterations", type=int, help="evolution steps (default MODEL.YOLACT.FIT_PRIORS_ITERATIONS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (default %(default)s)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    if args.train_json or args.train_images:
        cfg.DATASETS.TRAIN_JSON, cfg.DATASETS.TRAIN_IMAGES = args.train_json or "", args.train_images or ""
    apply_coco_json_datasets(cfg)
    dicts = training_dataset_dicts(cfg)
    start = time.perf_counter()
    fit, before, after = fit_priors_to_dataset(cfg, dicts, args.iterations, args.seed)
    seconds = time.perf_counter() - start
    print(format_coverage(before, f"Configured priors ({', '.join(cfg.DATASETS.TRAIN)}):"))
    print()
    title = f"Fitted priors (start: {fit.start}, {fit.evaluations} evaluations, {seconds:.1f} s):"
    print(format_coverage(after, title))
    print()
    print(f"Objects with a prior at IoU >= {after['pos_thresh']:g}: {fit.before[0]} -> {fit.after[0]} of "
          f"{fit.num_objects} (same prior count: {after['num_priors']})")
    print("Config lines (or MODEL.YOLACT.FIT_PRIORS True to fit at the start of training):")
    print(config_lines(fit.scales, fit.aspect_ratios))
    return 0


if __name__ == "__main__":
    run_main(main, "fit_priors.py")
