"""Reusable parts of a model comparison, called as functions (``tools/compare.py`` orchestrates them).

- :func:`eval_config`, :func:`build_eval_model`, :func:`load_exported`, :func:`evaluate`: COCO box
  and mask AP of a detectron2 model or an exported end-to-end graph on a COCO JSON val split, with
  detectron2's ``inference_on_dataset`` and :class:`yolact_d2.evaluation.YolactCOCOEvaluator`
  (``COCOEvaluator``, mask re-scoring aware), as ``train_net.py --eval-only`` does.
- :func:`read_photos`, :func:`time_on_photos`: end-to-end latency of several models on the same
  photos, interleaved (:mod:`yolact_d2.benchmarking`).
- :func:`run_ap`: the AP a ``train_net.py`` run folder recorded at its last evaluation;
  :func:`resolve_weights`, :func:`checkpoint_iterations`: its checkpoint and budget.
- :func:`scaled_schedule_opts`: the opts that give a config another iteration budget.

User mistakes raise :class:`CompareError` (or another :class:`yolact_d2.errors.YolactUserError`)
with a one-line message naming the problem and the fix.
"""
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import YolactUserError

__all__ = [
    "CompareError", "METRICS", "TASKS", "scaled_schedule_opts", "resolve_weights", "checkpoint_iterations", "run_ap",
    "eval_config", "build_eval_model", "load_exported", "evaluate", "read_photos", "time_on_photos",
]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = (("bbox", "box"), ("segm", "mask"))


class CompareError(YolactUserError, ValueError):
    """A user mistake in a comparison (specs, report, README markers): one line naming the fix."""


# ----------------------------------------------------------------------------- budgets and run folders
def scaled_schedule_opts(cfg, iters: int) -> List[str]:
    """Opts that set ``SOLVER.MAX_ITER`` to ``iters`` and scale ``SOLVER.STEPS`` and
    ``SOLVER.WARMUP_ITERS`` by ``iters / MAX_ITER`` (steps that fall at 0 or at/after the end are
    dropped), so every model keeps its schedule's shape at the same budget.

    Raises:
        CompareError: ``iters`` < 1.
    """
    if iters < 1:
        raise CompareError(f"--iters {iters}: give a positive number of iterations")
    scale = iters / cfg.SOLVER.MAX_ITER
    steps = sorted({int(round(s * scale)) for s in cfg.SOLVER.STEPS} - {0})
    steps = [s for s in steps if s < iters]
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "(" + "".join(f"{s}," for s in steps) + ")",
            "SOLVER.WARMUP_ITERS", str(int(round(cfg.SOLVER.WARMUP_ITERS * scale)))]


def resolve_weights(weights: str) -> str:
    """A checkpoint file: ``weights`` itself, or a run folder's ``model_final.pth`` (else the one
    its ``last_checkpoint`` names).

    Raises:
        CompareError: nothing loadable there (named, with the fix).
    """
    p = Path(weights)
    if p.is_file():
        return str(p)
    if p.is_dir():
        if (p / "model_final.pth").is_file():
            return str(p / "model_final.pth")
        last = p / "last_checkpoint"
        if last.is_file() and (p / last.read_text().strip()).is_file():
            return str(p / last.read_text().strip())
    raise CompareError(f"weights {weights} not found: give a .pth file or a train_net.py output folder "
                       "with model_final.pth, or drop the option to train")


def checkpoint_iterations(path: str) -> Optional[int]:
    """Iterations a detectron2 training checkpoint was saved after (its ``iteration`` + 1), or None."""
    from .checkpointer import UnreadableCheckpointError, read_checkpoint

    if path.endswith(".pkl"):  # a converted model-zoo file: the count is unknown
        return None
    try:
        ckpt = read_checkpoint(path)
    except UnreadableCheckpointError:  # the weights' own load reports it
        return None
    it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
    return int(it) + 1 if it is not None else None


def run_ap(run_dir: str) -> Dict[str, Dict[str, float]]:
    """The AP of a ``train_net.py`` run folder's last evaluation, read from its ``metrics.json``
    (detectron2's ``JSONWriter``; the trainer stores the evaluator's dict as ``bbox/AP``, ...).

    Returns:
        ``{"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}``: percent, NaN where a size range
        has no object; the tasks the run evaluated.

    Raises:
        CompareError: no ``metrics.json`` with an evaluation in ``run_dir``.
    """
    path = Path(run_dir) / "metrics.json"
    last = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if any(k.startswith(("bbox/", "segm/")) for k in row):
                    last = row
    if not last:
        raise CompareError(f"{path}: no evaluation recorded; give a train_net.py run folder that evaluated "
                           "(TEST.EVAL_PERIOD or the end of training)")
    out: Dict[str, Dict[str, float]] = {}
    for task, _ in TASKS:
        if f"{task}/AP" in last:
            out[task] = {m: float(last.get(f"{task}/{m}", float("nan"))) for m in METRICS}
    return out


# ----------------------------------------------------------------------------- evaluation
def eval_config(config_file: str, opts: Sequence[str], val_json: str, val_images: str, device: str = "cpu"):
    """The frozen config that evaluates ``config_file`` + ``opts`` on a COCO JSON val split, as
    ``train_net.py --eval-only --val-json --val-images`` sets it up: the split registered as
    :data:`yolact_d2.data.custom.TEST_NAME` (``DATASETS.TEST``), ``NUM_CLASSES`` from its
    categories, ``MODEL.DEVICE`` resolved (CUDA falls back to the CPU with a warning), SyncBN made
    CPU-safe. ``opts`` is not modified.

    Raises:
        ConfigError / MissingFileError / DatasetError: bad key or value, missing file, bad JSON.
    """
    import argparse

    from .engine import build_config

    # No training set: only the val split is registered and evaluated.
    opts = [*opts, "DATASETS.TRAIN", "()", "DATASETS.TRAIN_JSON", "", "DATASETS.TRAIN_IMAGES", "",
            "MODEL.DEVICE", device]
    args = argparse.Namespace(config_file=config_file, opts=opts, val_json=str(val_json), val_images=str(val_images))
    cfg = build_config(args)
    cfg.freeze()
    return cfg


def build_eval_model(cfg, weights: str):
    """``(model in eval mode, cfg)``: detectron2's ``build_model(cfg)`` with ``weights`` loaded by
    ``DetectionCheckpointer``; a checkpoint trained on another input format gets it (``cfg`` then a
    copy, :func:`yolact_d2.checkpoint.adopt_checkpoint_metadata`; so do its priors), one of another class count than
    ``cfg.DATASETS.TEST`` is refused (DatasetError), as in ``train_net.py --eval-only``."""
    from detectron2.modeling import build_model

    from .checkpoint import load_for_evaluation

    model = build_model(cfg)
    cfg = load_for_evaluation(model, cfg, weights)
    return model.eval(), cfg


def load_exported(path: str, threads: int):
    """:meth:`yolact_d2.runtime.ExportedPredictor.open` of ``path`` (``FILE`` or ``FILE@RUNTIME``),
    its one-line errors prefixed with the ``--exported`` flag that gave the file.

    Raises:
        CompareError: missing or unusable file, or no runtime installed for it (named, with the fix).
    """
    from .runtime import ExportedPredictor

    try:
        return ExportedPredictor.open(path, threads=threads)
    except YolactUserError as e:
        raise CompareError(f"--exported {path}: {' '.join(str(e).split())}") from None


def evaluate(model: Callable, cfg, output_dir: Optional[str] = None) -> Dict:
    """COCO AP of ``model`` on ``cfg.DATASETS.TEST[0]``: detectron2's ``build_detection_test_loader``,
    ``inference_on_dataset`` and :class:`~yolact_d2.evaluation.YolactCOCOEvaluator` (which logs
    progress, ETA and the ``copypaste`` AP lines), as ``DefaultTrainer.test`` runs them.

    Args:
        model: an ``nn.Module`` in eval mode or a callable on detectron2's list of input dicts (an
            :class:`~yolact_d2.runtime.ExportedPredictor`).
        output_dir: where the evaluator writes ``inference/`` and this function
            ``eval_results.json``; None: nothing written.
    Returns:
        {"results": ``{"bbox": {"AP": ...}, "segm": {...}}`` (percent; NaN where a size range has no
        object), "seconds": wall time, "results_json": path or None}.
    """
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    from .evaluation import YolactCOCOEvaluator

    name = cfg.DATASETS.TEST[0]
    evaluator = YolactCOCOEvaluator(name, output_dir=os.path.join(output_dir, "inference") if output_dir else None)
    start = time.perf_counter()
    raw = inference_on_dataset(model, build_detection_test_loader(cfg, name), evaluator)
    print_csv_format(raw)
    seconds = time.perf_counter() - start
    results = {task: {k: float(v) for k, v in metrics.items()} for task, metrics in raw.items()}
    path = None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "eval_results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    return {"results": results, "seconds": seconds, "results_json": path}


# ----------------------------------------------------------------------------- timing
def read_photos(val_json: str, val_images: str, n: int) -> List[Tuple[str, "object"]]:
    """``(file name, (H, W, 3) uint8 BGR image)`` of the first ``n`` images of a COCO JSON, in its order.

    Raises:
        MissingFileError: an image that cannot be read, named.
    """
    import cv2

    from .errors import MissingFileError

    with open(val_json) as f:
        names = [im["file_name"] for im in json.load(f)["images"][:n]]
    out = []
    for name in names:
        image = cv2.imread(os.path.join(val_images, name))
        if image is None:
            raise MissingFileError(f"image {os.path.join(val_images, name)} of {val_json} cannot be read; fix the image folder")
        out.append((name, image))
    return out


def time_on_photos(benches: Dict[str, Callable], images: Sequence, warmup: int = 1, repeat: int = 1,
                   references: Optional[Dict[str, Callable]] = None) -> Dict[str, Dict]:
    """End-to-end latency of several models on the same photos in this process, interleaved photo
    by photo (:func:`yolact_d2.benchmarking.time_interleaved`, batch 1).

    Args:
        benches: label -> :class:`~yolact_d2.benchmarking.ModelBench` /
            :class:`~yolact_d2.benchmarking.ExportedBench`.
        images: (H, W, 3) uint8 BGR images.
        references: label -> ``reference(batch) -> outputs``: the detections of that label's timed
            calls are compared with these (:func:`yolact_d2.benchmarking.output_check`), untimed.
    Returns:
        label -> :func:`yolact_d2.benchmarking.stage_report` (``end_to_end`` in ms,
        ``end_to_end_per_image_ms``, ``images_per_s``, ``stages``) + ``memory`` +
        ``detections_per_image`` + ``output_check`` (labels in ``references`` only).
    """
    from . import benchmarking as bm

    batches = [[im] for im in images]
    references = references or {}
    checks: Dict[str, List[Dict]] = {k: [] for k in references}
    counts: Dict[str, List[int]] = {k: [] for k in benches}

    def first_pass(label, b, outputs):
        counts[label].append(sum(len(o["instances"]) for o in outputs))
        if label in references:
            checks[label].append(bm.output_check(outputs, references[label](batches[b])))

    runs = bm.time_interleaved(benches, batches, warmup, repeat, "cpu", first_pass)
    out = {}
    for label, run in runs.items():
        r = {**bm.stage_report(run["seconds"], run["stages"]), "memory": run["memory"],
             "detections_per_image": counts[label]}
        if label in checks:
            c = checks[label]
            r["output_check"] = {**{k: sum(x[k] for x in c) for k in ("matched", "reference_detections", "detections")},
                                 "matches": all(x["matches"] for x in c)}
        out[label] = r
    return out
