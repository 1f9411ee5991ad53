#!/usr/bin/env python
r"""One PNG of a trained model's predictions on the first photos of a registered dataset.

    python tools/visualize_predictions.py --config-file configs/pennfudan/yolact_R_18_FPN_320.yaml \
        --weights output/pennfudan/yolact_R_18_FPN_320/model_final.pth --num-images 4 \
        --output docs/training/yolact_val.png

Works for any detectron2 model train_net.py trains (YOLACT or Mask R-CNN): detectron2's
``DefaultPredictor`` and ``Visualizer``; detections above ``--score-thresh`` are drawn with the
dataset's class names, one tile per photo, tiles side by side.
"""
import argparse
from pathlib import Path

from yolact_d2.console import HelpFormatter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", default=None, help="registered dataset (default: the config's DATASETS.TEST[0])")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--tile-height", type=int, default=320)
    parser.add_argument("--title", default=None, help="text written on the first tile (default: the config's name)")
    parser.add_argument("--output", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    import cv2
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from yolact_d2.config import load_config
    from yolact_d2.data.datasets import register_builtin_datasets

    if not Path(args.weights).is_file():
        raise SystemExit(f"error: weights {args.weights} not found (train first, or give MODEL.WEIGHTS of a run)")
    register_builtin_datasets()
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu"])
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(dataset)
    tiles = []
    for d in DatasetCatalog.get(dataset)[: args.num_images]:
        bgr = cv2.imread(d["file_name"])
        inst = predictor(bgr)["instances"].to("cpu")
        inst = inst[inst.scores > args.score_thresh]
        vis = Visualizer(bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(inst)
        tile = vis.get_image()
        scale = args.tile_height / tile.shape[0]
        tiles.append(cv2.resize(tile, (int(round(tile.shape[1] * scale)), args.tile_height)))
    grid = np.concatenate(tiles, axis=1)[:, :, ::-1].copy()
    title = args.title if args.title is not None else Path(args.config_file).stem
    (tw, th), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 2)
    cv2.rectangle(grid, (0, 0), (tw + 12, th + 14), (0, 0, 0), -1)  # dark band: readable on any photo
    cv2.putText(grid, title, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.output, grid)
    print(f"wrote {args.output} ({len(tiles)} photos of {dataset}, score > {args.score_thresh})")


if __name__ == "__main__":
    from yolact_d2.errors import run_main

    run_main(main, "visualize_predictions.py")
