"""The training / evaluation engine: the one ``Trainer`` and the one set-up of every entry point.

As detectron2 keeps ``DefaultTrainer`` and ``default_setup`` in ``detectron2/engine/defaults.py``
and its ``tools/train_net.py`` thin, ``train_net.py``, ``tools/main_job.py`` and
``tools/compare.py`` call what is here:

- :func:`build_config`: the config of a command line (file, overrides, dataset flags, device,
  dataset registration), nothing written;
- :func:`setup`: :func:`build_config`, then the loggers of ``detectron2``, ``fvcore`` and
  ``yolact_d2`` (to the console and ``OUTPUT_DIR/log.txt``, colour only on a terminal), the priors
  fitted at start (``MODEL.YOLACT.FIT_PRIORS``) and detectron2's ``default_setup``;
- :class:`Trainer`: detectron2's ``DefaultTrainer`` with the YOLACT data mapper, the checked
  training set, the mask re-scoring aware evaluator and the checkpoint metadata;
- :func:`main`: ``train_net.py``'s job (train, or ``--eval-only`` of weights or an exported graph).
"""
import argparse
import functools
import logging
import os
import time
from typing import Callable, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.engine import DefaultTrainer, HookBase, default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import CHECKPOINT_METADATA_KEY, TrainingMetadata, load_for_evaluation
from .checkpointer import TRAINING_MIN_SHARE, PeriodicCheckpointer, YolactCheckpointer, trained_weights
from .config import load_config
from .console import HelpFormatter, plain_files_and_pipes, quiet_console
from .data import YolactDatasetMapper
from .data.copy_paste import CopyPasteDatasetMapper, check_copy_paste_config
from .data.custom import apply_coco_json_datasets
from .data.dataset_check import check_datasets
from .data.dataset_mapper import check_annotations, check_dataset_classes, drop_degenerate_annotations
from .data.datasets import register_builtin_datasets
from .device import cpu_sync_batch_norm, ddp_on_cpu, resolve_device
from .diagnostics import log_dataset_prior_coverage, warn_small_batch_norm
from .errors import ConfigError, DatasetError, MissingFileError, YolactUserError
from .evaluation import YolactCOCOEvaluator
from .prior_fit import fit_priors_at_setup
from .tide import check_tide
from .schedule import StoppableTraining, apply_schedule_units, schedule_hooks

__all__ = ["Trainer", "TrainingClock", "argument_parser", "build_config", "setup", "main",
           "checked_dataset_dicts", "check_datasets_registered", "check_weights"]

logger = logging.getLogger(__name__)


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


class TrainingClock(HookBase):
    """Records the wall time of the training loop alone, from ``before_train`` to the end of the
    last step, so set-up (before) and the final evaluation (``EvalHook.after_train``, after) are
    not counted. ``trainer.training_seconds`` holds it (seconds, float) once training ended."""

    def before_train(self):
        self._start = time.perf_counter()
        self.trainer.training_seconds = 0.0

    def after_step(self):
        self.trainer.training_seconds = time.perf_counter() - self._start


class Trainer(StoppableTraining, DefaultTrainer):
    """DefaultTrainer with the YOLACT mapper (SSD augmentations, fixed square resize) for YOLACT
    models and :class:`YolactCOCOEvaluator` (COCOEvaluator, mask re-scoring aware) for all.

    After ``train()``: ``training_seconds`` (the loop alone, :class:`TrainingClock`) and
    detectron2's ``_last_eval_results`` (the final evaluation of its ``EvalHook``, ``{}`` when
    ``DATASETS.TEST`` is empty)."""

    def __init__(self, cfg):
        with ddp_on_cpu():  # detectron2 gives DDP a GPU id, which it refuses for a CPU model
            super().__init__(cfg)
        # Every checkpoint (PeriodicCheckpointer's, model_final.pth) carries the class names and
        # input format, for the demo, --eval-only and export of a model whose dataset is gone.
        self.checkpointer.add_checkpointable(CHECKPOINT_METADATA_KEY, TrainingMetadata(cfg))

    def build_hooks(self):
        # DefaultTrainer.__init__ builds detectron2's checkpointer and then calls this: the hooks
        # built below (periodic saves, model_final.pth) and resume use the safe one.
        self.checkpointer = YolactCheckpointer.replacing(self.checkpointer)
        keep = self.cfg.SOLVER.CHECKPOINTS_TO_KEEP or None
        built = [
            PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=keep)
            if isinstance(h, hooks.PeriodicCheckpointer) else h
            for h in super().build_hooks()
        ]
        # First, so its after_step comes before the other hooks' work of the last step.
        # The schedule's best checkpoint and early stop (yolact_d2/schedule.py); unchanged when off.
        return [TrainingClock()] + schedule_hooks(self, built)

    def resume_or_load(self, resume: bool = True):
        """detectron2's, refusing ``MODEL.WEIGHTS`` that fills less than
        :data:`~yolact_d2.checkpointer.TRAINING_MIN_SHARE` of the model (an ImageNet backbone is
        enough; a checkpoint of another model is not)."""
        resumed = resume and self.checkpointer.has_checkpoint()
        path = self.checkpointer.get_checkpoint_file() if resumed else self.cfg.MODEL.WEIGHTS
        super().resume_or_load(resume=resume)
        if path:
            self.checkpointer.check_match(path, TRAINING_MIN_SHARE)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = checked_dataset_dicts(cfg, cfg.DATASETS.TRAIN)
        mapper = None
        if cfg.MODEL.META_ARCHITECTURE == "YOLACT":
            if cfg.INPUT.COPY_PASTE.ENABLED:
                mapper = CopyPasteDatasetMapper(cfg, is_train=True, dataset_dicts=dataset)
            else:
                mapper = YolactDatasetMapper(cfg, is_train=True)
            if cfg.MODEL.YOLACT.DIAGNOSTICS.ENABLED and comm.is_main_process():
                log_dataset_prior_coverage(cfg, dataset, cfg.MODEL.YOLACT.DIAGNOSTICS.FORCED_ONLY_WARN)
                warn_small_batch_norm(cfg, comm.get_world_size())
        return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return YolactCOCOEvaluator(dataset_name, output_dir=output_folder or f"{cfg.OUTPUT_DIR}/inference",
                                   tide=cfg.TEST.TIDE)


def setup_loggers(output_dir: str, quiet: bool = False) -> None:
    """The loggers of ``yolact_d2``, ``fvcore`` and ``detectron2``: the console (this process's
    rank 0 only) and ``output_dir/log.txt``, colour codes only on a terminal; ``quiet``: the
    console shows only :data:`yolact_d2.console.QUIET_CONSOLE` and warnings."""
    rank = comm.get_rank()
    setup_logger(output=output_dir, distributed_rank=rank, name="yolact_d2")
    # detectron2's default_setup makes the other two with these same (cached) calls: made here
    # first, they are plain (and quiet) before it logs the environment and the config.
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    if quiet:
        quiet_console()
    plain_files_and_pipes()


def build_config(args, prepare: Optional[Callable] = None, loggers: Optional[str] = None):
    """The unfrozen config of a command line.

    ``args``: ``config_file``, ``opts`` and, where present, ``train_json`` / ``train_images`` /
    ``val_json`` / ``val_images`` (set ``DATASETS.TRAIN_JSON`` ...; registered as COCO JSON
    datasets) and ``device`` (sets ``MODEL.DEVICE`` and must exist; without it a CUDA
    ``MODEL.DEVICE`` falls back to the CPU with one warning). ``prepare(cfg)``, when given, runs
    on the loaded config before anything is logged: a caller's own
    OUTPUT_DIR and datasets (tools/main_job.py's photos). ``loggers``: None, nothing written and
    no logger set up; "full" or "quiet": :func:`setup_loggers` then, so that the dataset
    set-up's own lines reach ``OUTPUT_DIR/log.txt``. SyncBN is made CPU-safe; ``DATASETS.TRAIN``
    and ``TEST`` must be registered.

    Raises:
        ConfigError / MissingFileError: bad key or value, missing config file.
        DatasetError: an unregistered dataset name, a bad COCO JSON.
        DeviceUnavailableError: ``--device`` names a device this machine lacks.
    """
    cfg = load_config(args.config_file, args.opts)  # one-line ConfigError / MissingFileError
    for flag, key in (("train_json", "TRAIN_JSON"), ("train_images", "TRAIN_IMAGES"),
                      ("val_json", "TEST_JSON"), ("val_images", "TEST_IMAGES")):
        if getattr(args, flag, None):
            setattr(cfg.DATASETS, key, getattr(args, flag))
    if prepare is not None:
        prepare(cfg)
    if loggers:
        setup_loggers(cfg.OUTPUT_DIR, quiet=loggers == "quiet")
    device = getattr(args, "device", None)
    if device:
        cfg.MODEL.DEVICE = device
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE, explicit=bool(device))  # its warning is logged
    apply_coco_json_datasets(cfg)
    cpu_sync_batch_norm(cfg)
    register_builtin_datasets()
    check_datasets_registered(cfg)
    return cfg


def setup(args, prepare: Optional[Callable] = None, quiet: bool = False):
    """The frozen config of a training or evaluation run, with its loggers and OUTPUT_DIR set up.

    :func:`build_config` with its loggers (:func:`setup_loggers`: console and ``OUTPUT_DIR/log.txt``);
    ``MODEL.YOLACT.FIT_PRIORS``: the priors fitted to the checked training set (``args.resume``:
    the run's saved ones; ``args.eval_only``: none), so the config.yaml that detectron2's
    ``default_setup`` then writes holds them; ``default_setup`` (the ``detectron2`` and ``fvcore``
    loggers, environment and config in the log, config.yaml, seed). Colour codes are kept only
    on a terminal. ``quiet``: the console shows only what :data:`yolact_d2.console.QUIET_CONSOLE`
    lists and warnings, from the first line on (``OUTPUT_DIR/log.txt`` keeps everything).
    ``prepare(cfg)``: see :func:`build_config`.
    Raises what :func:`build_config` and :func:`checked_dataset_dicts` raise.
    """
    cfg = build_config(args, prepare, loggers="quiet" if quiet else "full")
    # Fitted to the checked dataset, so a bad one stops with the check's message, not the fit's.
    train_dicts = functools.cache(lambda: checked_dataset_dicts(cfg, cfg.DATASETS.TRAIN))
    fit_priors_at_setup(cfg, resume=getattr(args, "resume", False), eval_only=getattr(args, "eval_only", False),
                        dataset_dicts=train_dicts)
    # SOLVER.MAX_EPOCHS / TEST.EVAL_PERIOD_EPOCHS to iterations, logged (yolact_d2/schedule.py).
    apply_schedule_units(cfg, train_dicts, eval_only=getattr(args, "eval_only", False))
    check_tide(cfg)  # TEST.TIDE without tidecv: one line now, not after training
    check_copy_paste_config(cfg)
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
    """``train_net.py``'s job, run in each process by detectron2's ``launch()``: train (``--resume``
    continues OUTPUT_DIR's schedule) and return the final evaluation when
    ``TEST.EXPECTED_RESULTS`` is set, or evaluate ``MODEL.WEIGHTS`` / an exported graph
    (``--eval-only [--exported FILE[@RUNTIME]]``) and return its results. The user's mistakes
    (config, files, data, checkpoint, device) end with ``SystemExit("error: ...")``, one line;
    anything else is a bug and keeps its traceback."""
    from .runtime import ExportedPredictor

    try:
        cfg = setup(args)
        if args.exported and not args.eval_only:
            raise ConfigError("--exported evaluates an exported model; add --eval-only")
        if not args.exported:
            check_weights(cfg, args.resume)
        # TEST sets are checked in full now: a fault there would otherwise surface after training.
        check_datasets(cfg, cfg.DATASETS.TEST, "TEST", load=None, writable=comm.is_main_process())
        if args.eval_only and args.exported:  # the exported graph is evaluated, not MODEL.WEIGHTS
            model = ExportedPredictor.open(args.exported)
        elif args.eval_only:
            model = Trainer.build_model(cfg)
            # With the names and input format training stored in the weights (none in older files).
            weights = cfg.MODEL.WEIGHTS if args.resume else trained_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR)
            cfg = load_for_evaluation(model, cfg, weights, cfg.OUTPUT_DIR, args.resume)
        else:
            trainer = Trainer(cfg)  # builds the model, the optimizer and the data loader
            trainer.resume_or_load(resume=args.resume)
            return trainer.train()  # a full disk while saving ends here too (DiskFullError)
    except YolactUserError as e:
        raise SystemExit("error: " + " ".join(str(e).split())) from None
    res = Trainer.test(cfg, model)
    verify_results(cfg, res)
    return res


def argument_parser(description: Optional[str] = None, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus the files of a COCO-format dataset, ``--device``
    and ``--exported``; ``description`` / ``epilog`` shown by ``--help`` as written."""
    parser = default_argument_parser(epilog)
    parser.description = description
    parser.formatter_class = HelpFormatter
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
        "(tools/export_model.py; .onnx through onnxruntime, FILE.onnx@openvino through OpenVINO (float32; "
        "@openvino:bf16 for bfloat16), .ts through TorchScript) instead of MODEL.WEIGHTS",
    )
    return parser
