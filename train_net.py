#!/usr/bin/env python
"""Train and evaluate YOLACT / YOLACT++ (and detectron2's own models, e.g. Mask R-CNN) with detectron2.

    python train_net.py --config-file configs/yolact_R_50_FPN_550.yaml --num-gpus 8
    python train_net.py --config-file configs/yolact_R_50_FPN_550.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/pennfudan/mask_rcnn_R_50_FPN.yaml   # Mask R-CNN, same tool
    python train_net.py --config-file configs/Base-YOLACT-SmallData.yaml \
        --train-json my/train.json --train-images my/images --val-json my/val.json --val-images my/images

Everything but the YOLACT data mapper and evaluator comes from detectron2's DefaultTrainer:
LR schedule, checkpointing (--resume), TensorBoard/metrics.json writers, DDP through launch().
"""
import logging
import os
import warnings

# Before detectron2 is imported: fvcore and detectron2 call torch.jit.script at import time, which
# torch deprecates with a FutureWarning per call that says nothing about this program. Only that
# message from that module is hidden; the project's own warnings stay.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
# default_setup's environment report imports torch.utils.cpp_extension, which logs "No CUDA runtime
# is found, using CUDA_HOME=..." on every CPU machine.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import torch  # noqa: E402

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from yolact_d2.config import load_config
from yolact_d2.data import YolactDatasetMapper
from yolact_d2.checkpoint import CHECKPOINT_METADATA_KEY, TrainingMetadata, load_for_evaluation
from yolact_d2.data.custom import apply_coco_json_datasets
from yolact_d2.data.dataset_check import check_datasets
from yolact_d2.data.dataset_mapper import check_annotations, check_dataset_classes, drop_degenerate_annotations
from yolact_d2.data.datasets import register_builtin_datasets
from yolact_d2.device import cpu_sync_batch_norm, ddp_on_cpu, resolve_device
from yolact_d2.diagnostics import log_dataset_prior_coverage, warn_small_batch_norm
from yolact_d2.errors import ConfigError, DatasetError, MissingFileError, YolactUserError
from yolact_d2.evaluation import YolactCOCOEvaluator
from yolact_d2.prior_fit import fit_priors_at_setup
from yolact_d2.runtime import ExportedPredictor, split_runtime


def checked_dataset_dicts(cfg, names):
    """Dataset dicts of ``names``, checked before training starts.

    Raises:
        MissingFileError: an image listed in the annotations but absent, named.
        DatasetError: a fault of the dataset check (``DATASETS.CHECK``, yolact_d2/data/dataset_check.py:
            size mismatch, unknown category id; unreadable images and empty segmentations are
            dropped with a warning unless STRICT), masks the mask format cannot hold
            (``check_annotations``), a class count or
            class id that does not fit the model's NUM_CLASSES (``check_dataset_classes``),
            naming the image, or no usable instance at all (``drop_degenerate_annotations``,
            which also drops and counts degenerate instances).
    """
    dicts = check_datasets(
        cfg, names, "TRAIN", writable=comm.is_main_process(),
        load=lambda n: get_detection_dataset_dicts(n, filter_empty=False, min_keypoints=0, proposal_files=None),
    )
    if cfg.MODEL.MASK_ON:
        dicts = drop_degenerate_annotations(dicts, names)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dicts = filter_images_with_only_crowd_annotations(dicts)
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise MissingFileError(
            f"{len(missing)} image(s) of {', '.join(names)} listed in the annotations are missing on disk, "
            f"first: {missing[0]} (fix the image root of the dataset registration)"
        )
    if cfg.MODEL.MASK_ON:
        for d in dicts:
            check_annotations(d.get("annotations", []), d["file_name"], cfg.INPUT.MASK_FORMAT)
    yolact = cfg.MODEL.META_ARCHITECTURE == "YOLACT"
    key = "MODEL.YOLACT.NUM_CLASSES" if yolact else "MODEL.ROI_HEADS.NUM_CLASSES"
    num_classes = cfg.MODEL.YOLACT.NUM_CLASSES if yolact else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    thing_classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
    check_dataset_classes(dicts, names, thing_classes, num_classes, key)
    return dicts


def check_datasets_registered(cfg) -> None:
    """Raise DatasetError naming the first name of DATASETS.TRAIN / TEST that is not registered."""
    for key in ("TRAIN", "TEST"):
        unknown = [n for n in getattr(cfg.DATASETS, key) if n not in DatasetCatalog.list()]
        if unknown:
            split, flags = ("train", "--train-json / --train-images") if key == "TRAIN" else ("val", "--val-json / --val-images")
            raise DatasetError(
                f"dataset {unknown[0]!r} (DATASETS.{key}) is not registered; use a registered name "
                f"(e.g. pennfudan_{split}, coco_2017_{split}) or give {flags}"
            )


class Trainer(DefaultTrainer):
    """DefaultTrainer with the YOLACT mapper (SSD augmentations, fixed square resize) for YOLACT
    models and :class:`YolactCOCOEvaluator` (COCOEvaluator, mask re-scoring aware) for all."""

    def __init__(self, cfg):
        with ddp_on_cpu():  # detectron2 gives DDP a GPU id, which it refuses for a CPU model
            super().__init__(cfg)
        # Every checkpoint (PeriodicCheckpointer's, model_final.pth) carries the class names and
        # input format, for the demo, --eval-only and export of a model whose dataset is gone.
        self.checkpointer.add_checkpointable(CHECKPOINT_METADATA_KEY, TrainingMetadata(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = checked_dataset_dicts(cfg, cfg.DATASETS.TRAIN)
        mapper = None
        if cfg.MODEL.META_ARCHITECTURE == "YOLACT":
            mapper = YolactDatasetMapper(cfg, is_train=True)
            if cfg.MODEL.YOLACT.DIAGNOSTICS.ENABLED and comm.is_main_process():
                log_dataset_prior_coverage(cfg, dataset, cfg.MODEL.YOLACT.DIAGNOSTICS.FORCED_ONLY_WARN)
                warn_small_batch_norm(cfg, comm.get_world_size())
        return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return YolactCOCOEvaluator(dataset_name, output_dir=output_folder or f"{cfg.OUTPUT_DIR}/inference")


def setup(args):
    cfg = load_config(args.config_file, args.opts)  # one-line ConfigError / MissingFileError
    for flag, key in (("train_json", "TRAIN_JSON"), ("train_images", "TRAIN_IMAGES"),
                      ("val_json", "TEST_JSON"), ("val_images", "TEST_IMAGES")):
        if getattr(args, flag, None):
            setattr(cfg.DATASETS, key, getattr(args, flag))
    # The plugin's own log lines (dataset set-up, diagnostics) to the console and OUTPUT_DIR/log.txt.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="yolact_d2")
    apply_coco_json_datasets(cfg)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE, explicit=bool(args.device))
    cpu_sync_batch_norm(cfg)
    register_builtin_datasets()
    check_datasets_registered(cfg)
    # MODEL.YOLACT.FIT_PRIORS: the fitted priors go into the config.yaml default_setup writes. Fitted
    # to the checked dataset, so a bad one stops with the check's message, not the fit's.
    fit_priors_at_setup(cfg, resume=args.resume, eval_only=args.eval_only,
                        dataset_dicts=lambda: checked_dataset_dicts(cfg, cfg.DATASETS.TRAIN))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def check_weights(cfg, resume: bool) -> None:
    """Raise MissingFileError when ``MODEL.WEIGHTS`` names a local file that does not exist and
    would be loaded (not when ``resume`` finds a checkpoint in OUTPUT_DIR, which replaces it)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights or os.path.isfile(weights):
        return
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    raise MissingFileError(f"MODEL.WEIGHTS file {weights} not found; give an existing checkpoint or MODEL.WEIGHTS \"\"")


def main(args):
    # The user's mistakes (config, files, data, checkpoint, device) end with one line; anything
    # else is a bug and keeps its traceback.
    try:
        cfg = setup(args)
        if args.exported and not args.eval_only:
            raise ConfigError("--exported evaluates an exported model; add --eval-only")
        if not args.exported:
            check_weights(cfg, args.resume)
        # TEST sets are checked in full now: a fault there would otherwise surface after training.
        check_datasets(cfg, cfg.DATASETS.TEST, "TEST", load=None, writable=comm.is_main_process())
        if args.eval_only and args.exported:  # the exported graph is evaluated, not MODEL.WEIGHTS
            path, runtime = split_runtime(args.exported)
            model = ExportedPredictor(path, threads=torch.get_num_threads(), runtime=runtime)
        elif args.eval_only:
            model = Trainer.build_model(cfg)
            # With the names and input format training stored in the weights (none in older files).
            cfg = load_for_evaluation(model, cfg, cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, args.resume)
        else:
            trainer = Trainer(cfg)  # builds the model, the optimizer and the data loader
            trainer.resume_or_load(resume=args.resume)
    except YolactUserError as e:
        raise SystemExit("error: " + " ".join(str(e).split())) from None
    if args.eval_only:
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    return trainer.train()


def argument_parser():
    """detectron2's ``default_argument_parser`` plus the files of a COCO-format dataset."""
    parser = default_argument_parser()
    parser.add_argument("--train-json", help="COCO instances JSON to train on (sets DATASETS.TRAIN_JSON)")
    parser.add_argument("--train-images", help="its image folder (DATASETS.TRAIN_IMAGES)")
    parser.add_argument("--val-json", help="COCO instances JSON to evaluate on (DATASETS.TEST_JSON)")
    parser.add_argument("--val-images", help="its image folder (DATASETS.TEST_IMAGES)")
    parser.add_argument(
        "--device", help="run on this device (sets MODEL.DEVICE), failing if it is absent; without it a "
        "CUDA MODEL.DEVICE falls back to the CPU with a warning when there is no GPU",
    )
    parser.add_argument(
        "--exported", metavar="FILE", help="with --eval-only: evaluate this exported end-to-end graph "
        "(tools/export_model.py; .onnx through onnxruntime, FILE.onnx@openvino through OpenVINO (float32; @openvino:bf16 for bfloat16), .ts through "
        "TorchScript) instead of MODEL.WEIGHTS",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,),
    )
