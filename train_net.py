#!/usr/bin/env python
"""Train and evaluate YOLACT / YOLACT++ (and detectron2's own models, e.g. Mask R-CNN) with detectron2.

Everything but the YOLACT data mapper and evaluator comes from detectron2's DefaultTrainer: LR
schedule, checkpointing (--resume), TensorBoard / metrics.json writers, DDP through launch(). The
trainer and the set-up live in yolact_d2/engine.py.
"""
import yolact_d2  # noqa: F401  (first: its warning filters, then the registrations)
from detectron2.engine import launch

from yolact_d2.engine import argument_parser, main

EXAMPLES = """examples:
  python train_net.py --config-file configs/yolact_R_50_FPN_550.yaml --num-gpus 8 MODEL.WEIGHTS resnet50-19c8e357.pth
  python train_net.py --config-file configs/yolact_R_50_FPN_550.yaml --eval-only MODEL.WEIGHTS model.pth
  python train_net.py --config-file configs/pennfudan/mask_rcnn_R_18_FPN_320.yaml   # Mask R-CNN, same tool
  python train_net.py --config-file configs/pennfudan/yolact_R_18_FPN_320.yaml \\
      --train-json my/train.json --train-images my/images --val-json my/val.json --val-images my/images
  python train_net.py --config-file configs/yolact_R_50_FPN_550.yaml --num-gpus 8 --num-machines 2 \\
      --machine-rank 0 --dist-url tcp://10.0.0.1:29500   # machine 0 of 2 (machine 1: --machine-rank 1)
"""

if __name__ == "__main__":
    args = argument_parser(__doc__, EXAMPLES).parse_args()
    launch(
        main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,),
    )
