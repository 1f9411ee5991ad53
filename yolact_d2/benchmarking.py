"""Timing of a model's own inference call, split into stages inside that same call.

End to end means predictor-style: a decoded (H, W, 3) uint8 BGR numpy image goes in (input
conversion as detectron2's ``DefaultPredictor``: channel order, the test-time resize when the config
has one, HWC -> CHW tensor), ``[{"instances": Instances}]`` at the image's size comes out.

The stages of a call are timed while that call runs, so they add up to its wall time:

- network stages: forward hooks on the model's own modules (backbone bottom-up and FPN, YOLACT's
  prediction head, protonet and prior generator, R-CNN's RPN and ROI heads);
- ``preprocess_image``: a timed wrapper on the instance (a method, not a module);
- YOLACT's post-processing: the ``clock`` that ``YOLACT.inference`` passes to ``YOLACT.detect``
  (priors + class scores, box decoding, NMS, masks, re-scoring, output).

What no stage covers (Python glue, R-CNN's ``detector_postprocess``) is its own ``unattributed``
stage, never charged to another one. Under ``torch.compile`` per-module hooks would break the
compiled graph (or time an eager copy), so there the network is one stage, timed around the
compiled call; only the stages outside the graph are split.

Plain functions for other code (tools/benchmark.py, yolact_d2.compare): :class:`ModelBench` and
:class:`ExportedBench` (one timed call), :func:`time_interleaved` (several models on the same images),
:func:`time_predictor` (any ``predictor(image)`` callable), :func:`paired_ratio`,
:func:`stage_report`, :func:`time_nms`, :func:`time_mask_assembly`, :func:`environment`.
Detections are compared with :func:`yolact_d2.runtime.matched_detections`.
"""
import contextlib
import ctypes
import datetime
import gc
import inspect
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .paths import reference_root
from .runtime import matched_detections

__all__ = [
    "STAGE_LABELS", "COMPILED_NOTE", "StageClock", "InputAdapter", "ModelBench", "ExportedBench",
    "summarize", "paired_ratio", "stage_report", "time_interleaved", "time_predictor", "output_check",
    "peak_memory", "time_nms", "time_mask_assembly", "profile_onnx_graph", "GRAPH_STAGES", "save_stage_chart",
    "resolve_config", "load_model",
    "environment", "matched_detections",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
YOLACT_R50_REFERENCE = reference_root() / "yolact_resnet50_seed1.pth"  # $YOLACT_D2_SHARED/reference
MODEL_ZOO_PREFIX = "model_zoo:"

# Stage keys and labels in pipeline order (a model has the subset it runs).
STAGE_LABELS = {
    "input": "input: BGR->RGB, test resize, HWC->CHW tensor",
    "preprocess": "preprocess: normalise + resize / pad",
    "network": "network (compiled, one stage)",
    "backbone_bottom_up": "backbone bottom-up (ResNet)",
    "fpn": "FPN",
    "backbone": "backbone",
    "head": "prediction head",
    "protonet": "protonet",
    "rpn": "RPN (proposals)",
    "roi_heads": "ROI heads (box + mask)",
    "priors_scores": "priors + class scores",
    "box_decode": "box decoding + score filter",
    "nms": "NMS",
    "mask": "mask assembly + crop + upsample",
    "rescoring": "mask re-scoring",
    "output": "output boxes + Instances",
    "graph": "exported graph (resize ... masks, in the runtime)",
    "unattributed": "unattributed (time no stage covers)",
}
# Module stages found by attribute path; "_backbone" (the whole backbone) is split into
# bottom-up + FPN when the backbone has a bottom_up.
MODULE_STAGES = {
    "_backbone": "backbone", "backbone_bottom_up": "backbone.bottom_up", "head": "head",
    "protonet": "protonet", "priors_scores": "prior_generator", "rpn": "proposal_generator",
    "roi_heads": "roi_heads",
}
SMALL_INPUT_OPTS = {
    "YOLACT": ["MODEL.YOLACT.INPUT_SIZE", "160"], "other": ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "200"],
}
COMPILED_NOTE = ("torch.compile: no per-module breakdown (forward hooks would break the compiled graph); "
                 "the network is one stage, the post-processing outside it is split")


# ----------------------------------------------------------------------------- statistics
def summarize(samples_s: Sequence[float]) -> Dict:
    """Median and spread of timings given in seconds, reported in milliseconds.

    Returns ``{"n"}`` for no samples, else ``n``, ``median_ms``, ``p10_ms``, ``p90_ms``, ``q1_ms``,
    ``q3_ms``, ``min_ms``, ``max_ms`` and ``samples_ms`` (each sample, rounded to 0.1 us).
    """
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0}
    p10, q1, med, q3, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
    return {
        "n": int(ms.size), "median_ms": float(med), "p10_ms": float(p10), "p90_ms": float(p90),
        "q1_ms": float(q1), "q3_ms": float(q3), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
        "samples_ms": [round(float(v), 4) for v in ms],
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-pair ratios ``numerator[i] / denominator[i]``.

    Pairs are runs adjacent in time (the same images, interleaved), so load changes on a shared
    machine hit both sides of a pair; less exposed to them than the ratio of the two medians.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(numerator) != len(denominator) or not len(numerator):
        raise ValueError(f"paired_ratio needs two equally long non-empty sequences, "
                         f"got {len(numerator)} and {len(denominator)}")
    return float(np.median(np.divide(numerator, denominator)))


def stage_report(seconds: Sequence[float], stage_samples: Sequence[Dict[str, float]], batch_size: int = 1) -> Dict:
    """Figures of one model from its timed calls.

    Args:
        seconds: wall time of each call (s). stage_samples: each call's stage times (s), keys of
            :data:`STAGE_LABELS`, ``unattributed`` included (they sum to the call's time); empty dicts
            for calls timed without stages. batch_size: images per call.
    Returns:
        ``end_to_end`` (:func:`summarize`), ``end_to_end_per_image_ms``, ``images_per_s``, ``stages``
        (per key: :func:`summarize` + ``label`` + ``share`` = its median over the sum of the stage
        medians, in pipeline order), ``stage_sum_ms`` and ``unattributed_share`` (median over the
        calls of unattributed / call time; None without stages).
    """
    e2e = summarize(seconds)
    out = {"end_to_end": e2e, "end_to_end_per_image_ms": e2e["median_ms"] / batch_size,
           "images_per_s": batch_size / (e2e["median_ms"] / 1e3), "stages": {}, "stage_sum_ms": None,
           "unattributed_share": None}
    present = {k for s in stage_samples for k in s}
    if not present:
        return out
    keys = [k for k in STAGE_LABELS if k in present] + sorted(present - set(STAGE_LABELS))
    stages = {k: {**summarize([s.get(k, 0.0) for s in stage_samples]), "label": STAGE_LABELS.get(k, k)} for k in keys}
    total = sum(v["median_ms"] for v in stages.values())
    for v in stages.values():
        v["share"] = v["median_ms"] / total if total > 0 else 0.0
    out.update(stages=stages, stage_sum_ms=total,
               unattributed_share=paired_ratio([s.get("unattributed", 0.0) for s in stage_samples], seconds))
    return out


# ----------------------------------------------------------------------------- clocks and hooks
class StageClock:
    """Wall time per named stage over one call; ``clock(name)`` is a context manager.

    ``sync`` runs before reading the clock at both ends of a stage (``torch.cuda.synchronize`` on
    CUDA, so that queued kernels are charged to the stage that launched them). Times add up when a
    stage is entered several times (once per image, for example).
    """

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync or (lambda: None)
        self.times: Dict[str, float] = {}

    def add(self, name: str, seconds: float):
        self.times[name] = self.times.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - start)


@contextlib.contextmanager
def timed_modules(clock: StageClock, modules: Dict[str, torch.nn.Module]):
    """Charge each forward call of each module to its stage while the context is open (hooks are
    removed on exit)."""
    handles = []
    for name, module in modules.items():
        start = {}

        def pre_hook(_module, _args, _start=start):
            clock.sync()
            _start["t"] = time.perf_counter()

        def post_hook(_module, _args, _output, _start=start, _name=name):
            clock.sync()
            clock.add(_name, time.perf_counter() - _start["t"])

        handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def timed_methods(clock: StageClock, obj, methods: Dict[str, str]):
    """Shadow bound methods (name -> stage) of one instance with timed wrappers; restored on exit."""
    for method_name, stage in methods.items():
        def wrapper(*args, _original=getattr(obj, method_name), _stage=stage, **kwargs):
            with clock(_stage):
                return _original(*args, **kwargs)

        setattr(obj, method_name, wrapper)
    try:
        yield
    finally:
        for method_name in methods:
            delattr(obj, method_name)


def _module(model, path: str) -> Optional[torch.nn.Module]:
    for part in path.split("."):
        model = getattr(model, part, None)
    return model if isinstance(model, torch.nn.Module) else None


def is_compiled(model) -> bool:
    """A model whose network runs through ``torch.compile`` (``MODEL.YOLACT.COMPILE``, or a model
    wrapped by ``torch.compile`` itself)."""
    return bool(getattr(model, "compile_mode", None)) or hasattr(model, "_orig_mod")


# ----------------------------------------------------------------------------- one timed call
class InputAdapter:
    """Predictor-style input conversion: (H, W, 3) uint8 BGR -> ``{"image", "height", "width"}``.

    As ``DefaultPredictor``: channel order from ``INPUT.FORMAT``, then ``ResizeShortestEdge`` when
    ``INPUT.MIN_SIZE_TEST`` > 0 (YOLACT configs set 0: the model resizes). The tensor stays uint8:
    the models cast when they normalise, with the same numbers, and a uint8 copy to a GPU is 4x smaller.
    """

    def __init__(self, cfg):
        from detectron2.data import transforms as T

        self.rgb = cfg.INPUT.FORMAT == "RGB"
        size = cfg.INPUT.MIN_SIZE_TEST
        self.resize = T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST) if size > 0 else None

    def __call__(self, image_bgr: np.ndarray) -> Dict:
        height, width = image_bgr.shape[:2]
        image = image_bgr[:, :, ::-1] if self.rgb else image_bgr
        if self.resize is not None:
            image = self.resize.get_transform(image).apply_image(image)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}


class ModelBench:
    """Timed predictor-style calls of one detectron2 model (eval mode), stages inside each call.

    ``bench(batch)`` runs the input conversion and the model's call once and returns
    ``(seconds, stage seconds, outputs)``; the stages sum to ``seconds`` (``unattributed`` is the
    rest). With ``stages=False`` the call runs without hooks or clock (stage dict empty): on a GPU
    the synchronisations at stage boundaries would otherwise be part of the end-to-end figure.

    Args:
        model: an ``nn.Module`` in eval mode taking detectron2's list of input dicts.
        cfg: its config (``INPUT.FORMAT``, ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``).
        device: "cpu" or "cuda" (CUDA is synchronised at the ends of the call and of each stage).
        amp: "none", "fp16" or "bf16" (``torch.autocast`` on CUDA).
    """

    def __init__(self, model, cfg, device: str = "cpu", amp: str = "none", stages: bool = True):
        self.model, self.adapter, self.amp, self.stages = model, InputAdapter(cfg), amp, stages
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.compiled = is_compiled(model)
        # YOLACT.inference(inputs, clock=...) is what model(inputs) runs in eval mode.
        inference = getattr(model, "inference", None)
        self.takes_clock = inference is not None and "clock" in inspect.signature(inference).parameters
        found = {k: _module(model, path) for k, path in MODULE_STAGES.items()}
        self.modules = {} if self.compiled else {k: m for k, m in found.items() if m is not None}

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.amp == "fp16" else torch.bfloat16)

    def _hooks(self, clock: StageClock):
        methods = {"preprocess_image": "preprocess"} if callable(getattr(self.model, "preprocess_image", None)) else {}
        if self.compiled and callable(getattr(self.model, "_forward_network", None)):
            methods["_forward_network"] = "network"  # around the compiled call, not inside it
        stack = contextlib.ExitStack()
        stack.enter_context(timed_modules(clock, self.modules))
        stack.enter_context(timed_methods(clock, self.model, methods))
        return stack

    def __call__(self, batch_bgr: Sequence[np.ndarray]) -> Tuple[float, Dict[str, float], list]:
        clock = StageClock(self.sync) if self.stages else None
        with torch.inference_mode(), self.autocast(), (self._hooks(clock) if clock else contextlib.nullcontext()):
            self.sync()
            start = time.perf_counter()
            if clock is None:
                outputs = self.model([self.adapter(im) for im in batch_bgr])
            else:
                with clock("input"):
                    inputs = [self.adapter(im) for im in batch_bgr]
                outputs = self.model.inference(inputs, clock=clock) if self.takes_clock else self.model(inputs)
            self.sync()
            seconds = time.perf_counter() - start
        if clock is None:
            return seconds, {}, outputs
        t = clock.times
        if "_backbone" in t:  # the whole backbone's hook contains the bottom-up's
            whole = t.pop("_backbone")
            if "backbone_bottom_up" in t:
                t["fpn"] = whole - t["backbone_bottom_up"]
            else:
                t["backbone"] = whole
        t["unattributed"] = seconds - sum(t.values())
        return seconds, t, outputs

    def reference(self, batch_bgr: Sequence[np.ndarray], capture: Optional[list] = None) -> list:
        """A plain ``model(inputs)`` call (untimed, no hooks). When ``capture`` is a list and the
        model is YOLACT, each image's NMS candidates and mask inputs are appended to it (copies):
        ``boxes`` (M, 4) relative x0y0x1y1, ``scores`` (M, C), ``coeffs`` (M, k), ``prototypes``
        (h, w, k), ``height``, ``width``."""
        model = self.model
        methods = {}
        if capture is not None and callable(getattr(model, "decode_candidates", None)):
            detect = model.detect

            def capturing_detect(box_deltas, class_scores, mask_coeffs, prototypes, prior_boxes, height, width, **kw):
                cand, boxes, fg = model.decode_candidates(box_deltas, class_scores, prior_boxes)
                capture.append({"boxes": boxes.clone(), "scores": fg.clone(), "coeffs": mask_coeffs[cand].clone(),
                                "prototypes": prototypes.clone(), "height": height, "width": width})
                return detect(box_deltas, class_scores, mask_coeffs, prototypes, prior_boxes, height, width, **kw)

            methods["detect"] = capturing_detect
        for name, fn in methods.items():
            setattr(model, name, fn)
        try:
            with torch.inference_mode(), self.autocast():
                return model([self.adapter(im) for im in batch_bgr])
        finally:
            for name in methods:
                delattr(model, name)


class ExportedBench:
    """Timed calls of an exported end-to-end graph (:class:`yolact_d2.runtime.ExportedPredictor`),
    interface as :class:`ModelBench`. Stages: ``graph`` (the runtime's call: preprocessing, network,
    Fast NMS, masks) and ``output`` (numpy -> Instances), timed inside ``predictor(image)``;
    ``unattributed`` is the image check. :meth:`reference` is the eager model's call."""

    def __init__(self, predictor, eager: ModelBench):
        self.predictor, self.eager, self.sync = predictor, eager, (lambda: None)

    def __call__(self, batch_bgr: Sequence[np.ndarray]) -> Tuple[float, Dict[str, float], list]:
        clock = StageClock()
        with timed_methods(clock, self.predictor, {"run": "graph", "_instances": "output"}):
            start = time.perf_counter()
            outputs = [self.predictor(im) for im in batch_bgr]
            seconds = time.perf_counter() - start
        clock.times["unattributed"] = seconds - sum(clock.times.values())
        return seconds, clock.times, outputs

    def reference(self, batch_bgr: Sequence[np.ndarray], capture: Optional[list] = None) -> list:
        return self.eager.reference(batch_bgr)


def output_check(outputs: list, reference: list) -> Dict:
    """Do a timed call's detections equal the reference call's? Per image
    :func:`yolact_d2.runtime.matched_detections` (class, score within 1e-3, box within 1 px, mask
    IoU >= 0.95). Returns ``matched``, ``reference_detections``, ``detections`` and ``matches``
    (every reference detection matched and no extra one)."""
    matched = sum(matched_detections(x["instances"], y["instances"]) for x, y in zip(outputs, reference))
    ref = sum(len(y["instances"]) for y in reference)
    ours = sum(len(x["instances"]) for x in outputs)
    return {"matched": matched, "reference_detections": ref, "detections": ours, "matches": matched == ref == ours}


# ----------------------------------------------------------------------------- many calls
def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


@contextlib.contextmanager
def peak_memory(device: str, result: Dict):
    """Fill ``result`` with the peak memory increase (MB) of the code run inside the context.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU: peak RSS (VmHWM,
    reset at entry through /proc/self/clear_refs) above the RSS at entry; where VmHWM cannot be
    reset, the increase of ``ru_maxrss``, a lower bound (an earlier higher peak hides it).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        result.update(method="torch.cuda.max_memory_allocated",
                      peak_increase_mb=(torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # freed heap back to the OS: the base is live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    base_kb = _read_status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    yield
    peak_kb = _read_status_kb("VmHWM") if reset else None
    if peak_kb is not None and base_kb is not None:
        result.update(method="VmHWM - VmRSS (peak RSS reset via /proc/self/clear_refs)",
                      peak_increase_mb=(peak_kb - base_kb) / 1024)
    else:
        delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
        result.update(method="ru_maxrss delta (lower bound)", peak_increase_mb=delta / 1024)
    result["rss_before_mb"] = (base_kb or 0) / 1024


def time_interleaved(benches: Dict[str, Callable], batches: Sequence[Sequence[np.ndarray]], warmup: int = 1,
                     repeat: int = 1, device: str = "cpu",
                     on_first_pass: Optional[Callable[[str, int, list], None]] = None) -> Dict[str, Dict]:
    """Several models timed on the same batches, interleaved: per batch each model runs once, in an
    order that reverses every batch, so drift on a noisy machine is shared.

    Args:
        benches: label -> a callable ``bench(batch) -> (seconds, stage seconds, outputs)``
            (:class:`ModelBench`, :class:`ExportedBench`, or :func:`time_predictor`'s wrapper).
        batches: lists of (H, W, 3) uint8 BGR images.
        warmup: untimed passes (at least 1; the first call of each model gives its peak memory).
        repeat: timed passes over the batches.
        on_first_pass: called as ``(label, batch index, outputs)`` after each timed call of the first
            pass, outside the timing.
    Returns:
        label -> ``{"seconds": [...], "stages": [...], "memory": {...}}``, one entry per timed call
        in batch order within each pass.
    """
    out = {label: {"seconds": [], "stages": [], "memory": {}} for label in benches}
    labels = list(benches)
    for w in range(max(warmup, 1)):
        for label in labels:
            batch = batches[w % len(batches)]
            with peak_memory(device, out[label]["memory"]) if w == 0 else contextlib.nullcontext():
                benches[label](batch)
    k = 0
    for rep in range(repeat):
        for b, batch in enumerate(batches):
            for label in labels if k % 2 == 0 else labels[::-1]:
                seconds, stages, outputs = benches[label](batch)
                out[label]["seconds"].append(seconds)
                out[label]["stages"].append(stages)
                if rep == 0 and on_first_pass is not None:
                    on_first_pass(label, b, outputs)
            k += 1
    return out


def time_predictor(predictor: Callable[[np.ndarray], object], images_bgr: Sequence[np.ndarray], warmup: int = 1,
                   repeat: int = 1, device: str = "cpu") -> Dict:
    """End-to-end time of any ``predictor(image_bgr)`` (e.g. ``YolactPredictor``, ``DefaultPredictor``,
    ``ExportedPredictor``) over the images: :func:`summarize` of the per-image seconds (ms)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bench(batch):
        sync()
        start = time.perf_counter()
        outputs = [predictor(im) for im in batch]
        sync()
        return time.perf_counter() - start, {}, outputs

    runs = time_interleaved({"predictor": bench}, [[im] for im in images_bgr], warmup, repeat, device)
    return summarize(runs["predictor"]["seconds"])


# ----------------------------------------------------------------------------- micro-benchmarks
def _timer(stmt_fn: Callable[[], object], threads: int):
    # (its import of torch.utils.cpp_extension logs a CUDA_HOME line on CPU machines: yolact_d2.console)
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": stmt_fn}, num_threads=threads)


def time_nms(candidates: Sequence[Dict], iou_threshold: float, top_k: int, max_detections: int, class_agnostic: bool,
             number: int = 10, threads: int = 1) -> Dict:
    """Fast, Cluster-Fast and standard NMS (:func:`yolact_d2.fast_nms.multiclass_nms`) on the same
    candidates (``boxes`` (M, 4), ``scores`` (M, C) per image, from :meth:`ModelBench.reference`),
    each with ``torch.utils.benchmark.Timer`` (``number`` calls per image, ``threads`` threads).

    Returns per method ``kept_per_image`` and :func:`summarize` of the per-image mean call times,
    plus ``standard_over_fast`` and ``cluster_over_fast`` (ratios of the medians).
    """
    from .fast_nms import multiclass_nms

    out = {"iou_threshold": iou_threshold, "top_k": top_k, "max_detections": max_detections,
           "class_agnostic": class_agnostic, "repeat": number, "threads": threads,
           "timer": "torch.utils.benchmark.Timer.timeit",
           "candidates_per_image": [int(c["boxes"].shape[0]) for c in candidates], "methods": {}}
    for method in ("fast", "cluster", "standard"):
        calls = [lambda c=c, m=method: multiclass_nms(c["boxes"], c["scores"], iou_threshold, top_k, max_detections,
                                                      method=m, class_agnostic=class_agnostic) for c in candidates]
        kept = [int(call()[0].numel()) for call in calls]
        stats = summarize([_timer(call, threads).timeit(number).mean for call in calls])
        out["methods"][method] = {**stats, "kept_per_image": kept}
    fast = out["methods"]["fast"]["median_ms"]
    out["standard_over_fast"] = out["methods"]["standard"]["median_ms"] / fast
    out["cluster_over_fast"] = out["methods"]["cluster"]["median_ms"] / fast
    return out


def time_mask_assembly(candidate: Dict, mask_threshold: float, number: int = 10, threads: int = 1,
                       autocast=contextlib.nullcontext) -> Dict:
    """Mask assembly + crop + upsample for exactly 100 detections of one image, with
    ``torch.utils.benchmark.Timer`` (``number`` calls). The 100 highest-scoring candidates are used
    (cycled when fewer; random boxes and coefficients when none), so the workload does not depend on
    what NMS kept. Returns ``median_ms`` (mean of the calls), ``detections``, ``image_size``
    [H, W], ``prototype_size`` and ``source``."""
    from .mask_assembly import assemble_masks, crop_masks, upsample_masks

    c = candidate
    n = c["boxes"].shape[0]
    if n:
        order = c["scores"].max(dim=1).values.argsort(descending=True)
        order = order[torch.arange(100, device=order.device) % n]
        boxes, coeffs = c["boxes"][order], c["coeffs"][order]
        source = f"top-100 of {n} candidates" + (" (cycled)" if n < 100 else "")
    else:
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(100, 2, generator=g) * 0.6
        boxes = torch.cat([xy, xy + 0.1 + torch.rand(100, 2, generator=g) * 0.3], 1).to(c["prototypes"])
        coeffs = (torch.rand(100, c["prototypes"].shape[-1], generator=g) * 2 - 1).to(c["prototypes"])
        source = "random boxes and coefficients (no candidates)"
    p, h, w = c["prototypes"], c["height"], c["width"]

    def call():
        with torch.inference_mode(), autocast():
            upsample_masks(crop_masks(assemble_masks(p, coeffs), boxes), h, w, mask_threshold)

    m = _timer(call, threads).timeit(number)
    return {"median_ms": m.mean * 1e3, "repeat": number, "threads": threads,
            "timer": "torch.utils.benchmark.Timer.timeit", "detections": 100, "image_size": [h, w],
            "prototype_size": list(p.shape), "source": source}


# ----------------------------------------------------------------------------- exported graphs
# Stages inside an exported ONNX graph, by the module path in its node names (first match wins).
GRAPH_STAGES = {
    "/backbone/bottom_up": "backbone bottom-up (ResNet)",
    "/backbone/": "FPN (P3-P7)",
    "/head/": "prediction head",
    "/protonet/": "protonet",
    "": "resize in, box decoding, Fast NMS, masks, paste",
}


def graph_stage(node_name: str) -> str:
    """The GRAPH_STAGES key of an ONNX node name (e.g. "/raw/backbone/bottom_up/res2/...")."""
    return next(k for k in GRAPH_STAGES if k in node_name)



def profile_onnx_graph(path: str, images_bgr: Sequence[np.ndarray], threads: int) -> Dict:
    """Kernel time per stage inside an exported ONNX graph, from onnxruntime's profiler (a separate
    profiled session; each (H, W, 3) uint8 BGR image runs once untimed to warm the session, then once
    counted), by the node names the exporter gives (the module path, :data:`GRAPH_STAGES`).

    Returns ``kernel_ms_per_image`` and ``share`` per stage key, ``profiled_run_ms_per_image`` (the
    wall time of the counted runs, as the profiler's ``model_run`` events give it: the kernels run one
    after another inside it, so their sum stays within it, up to the per-node clock reads' error), and ``source``."""
    import json
    import tempfile

    import onnxruntime as ort

    n = len(images_bgr)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(2):  # warm-up pass (first-run allocations), then the counted pass
            for img in images_bgr:
                session.run(None, {name: np.ascontiguousarray(img)})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-n:]
    start = runs[0]["ts"]
    stages = {k: 0.0 for k in GRAPH_STAGES}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            stages[graph_stage(e["name"])] += e["dur"] / 1e3 / n
    total = sum(stages.values())
    return {"kernel_ms_per_image": stages, "share": {k: v / total for k, v in stages.items()} if total else {},
            "profiled_run_ms_per_image": sum(e["dur"] for e in runs) / 1e3 / n,
            "source": "onnxruntime profiler, kernel time by node name, second (warm) run of each image"}



# ----------------------------------------------------------------------------- configs, models, environment
def resolve_config(spec: str) -> Tuple[str, str]:
    """``(path, display name)`` of a config given as a path, ``model_zoo:NAME`` or a bare model-zoo
    name. Relative paths are tried from the working directory, then from the repository root.

    Raises:
        MissingFileError (a FileNotFoundError): neither a file nor a model-zoo config.
    """
    from detectron2 import model_zoo

    from .errors import MissingFileError

    if spec.startswith(MODEL_ZOO_PREFIX):
        name = spec[len(MODEL_ZOO_PREFIX):]
        try:
            return model_zoo.get_config_file(name), spec
        except RuntimeError as e:
            raise MissingFileError(f"{name!r} is not a detectron2 model-zoo config") from e
    for candidate in (Path(spec), REPO_ROOT / spec):
        if candidate.is_file():
            return str(candidate), spec
    try:
        return model_zoo.get_config_file(spec), MODEL_ZOO_PREFIX + spec
    except RuntimeError:
        raise MissingFileError(f"config {spec!r}: no such file, and not a detectron2 model-zoo name") from None


def arch_label(cfg) -> str:
    """A short human name for the model a config builds (YOLACT, YOLACT++, Mask R-CNN, ...)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "YOLACT":
        plus = cfg.MODEL.YOLACT.MASK_RESCORING.ENABLED or any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
        return "YOLACT++" if plus else "YOLACT"
    if arch == "GeneralizedRCNN":
        return "Mask R-CNN" if cfg.MODEL.MASK_ON else "Faster R-CNN"
    return arch


def default_weights(cfg) -> Optional[str]:
    """The reference original-layout checkpoint for YOLACT v1 R-50 COCO configs, when it is on disk
    (random init makes YOLACT's detection counts degenerate, so NMS and mask workloads too)."""
    y = cfg.MODEL.YOLACT
    v1 = not y.MASK_RESCORING.ENABLED and not any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    if cfg.MODEL.META_ARCHITECTURE == "YOLACT" and cfg.MODEL.RESNETS.DEPTH == 50 and v1 and y.NUM_CLASSES == 80:
        return str(YOLACT_R50_REFERENCE) if YOLACT_R50_REFERENCE.is_file() else None
    return None


def load_model(spec: str, opts: Sequence[str] = (), weights: Optional[str] = None, device: str = "cpu",
               seed: int = 0, small_inputs: bool = False, rcnn_score_thresh: Optional[float] = None) -> Dict:
    """Config and model (eval mode) of one benchmarked config, with its metadata.

    Args:
        spec: see :func:`resolve_config`. opts: KEY VALUE overrides (applied last). weights: a
            checkpoint; None: :func:`default_weights`, else random init; "random"/"none"/"": random
            init. seed: torch seed before building (the same random init on every run).
        small_inputs: :data:`SMALL_INPUT_OPTS` before ``opts`` (YOLACT at 160 px, R-CNN test size
            160 / max 200: a quick run).
        rcnn_score_thresh: ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` of non-YOLACT models.
    Returns:
        dict with ``cfg``, ``model``, ``is_yolact``, ``config`` (display name), ``config_path``,
        ``opts``, ``weights`` (path or "random init"), ``arch``, ``weights_mb``.
    """
    from detectron2.modeling import build_model

    from .checkpointer import load_weights
    from .config import load_config, merge_opts

    path, display = resolve_config(spec)
    cfg = load_config(path)  # YOLACT keys too: harmless for other configs, it only adds keys
    is_yolact = cfg.MODEL.META_ARCHITECTURE == "YOLACT"
    if not is_yolact and rcnn_score_thresh is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = rcnn_score_thresh
    merge_opts(cfg, (SMALL_INPUT_OPTS["YOLACT" if is_yolact else "other"] if small_inputs else []) + list(opts))
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    weights = None if weights in ("random", "none", "") else (weights or default_weights(cfg))
    torch.manual_seed(seed)
    model = build_model(cfg)
    if weights:
        load_weights(model, weights)
    model.eval()
    n_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"cfg": cfg, "model": model, "is_yolact": is_yolact, "config": display, "config_path": path,
            "opts": list(opts), "weights": weights or "random init", "arch": arch_label(cfg),
            "weights_mb": n_bytes / 2**20}


def environment(device: str = "cpu", argv: Optional[Sequence[str]] = None) -> Dict:
    """The machine and software of a run (without ``torch.utils.cpp_extension``): device and its
    name, CPU model and count, threads, library versions, command, time and load average."""
    import detectron2
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu, "cpu_model": cpu,
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "detectron2": detectron2.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "command": " ".join([sys.executable] + sys.argv) if argv is None else " ".join(argv),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        # Other processes share the CPU: the load average tells how noisy the figures are.
        "loadavg_start": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- chart
def save_stage_chart(reports: Sequence[Dict], path: str):
    """Horizontal bars of the stage medians (one panel per model with stages, pipeline order top to
    bottom, p10-p90 as error bars), written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [r for r in reports if r["stages"]]
    if not reports:
        return
    heights = [0.45 * len(r["stages"]) + 1.2 for r in reports]
    fig, axes = plt.subplots(len(reports), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, r in zip(axes[:, 0], reports):
        st = list(r["stages"].values())
        med = np.array([s["median_ms"] for s in st])
        err = np.array([[m - s["p10_ms"], s["p90_ms"] - m] for m, s in zip(med, st)]).T.clip(min=0)
        y = np.arange(len(st))
        ax.barh(y, med, xerr=err, color="tab:blue", ecolor="gray", capsize=2)
        ax.set_yticks(y, [s["label"] for s in st])
        ax.invert_yaxis()
        ends = np.maximum(med, [s["p90_ms"] for s in st])  # label right of the error bar
        for yi, m, x, s in zip(y, med, ends, st):
            ax.text(x, yi, f"  {m:.1f} ms ({100 * s['share']:.0f}%)", va="center", fontsize=8)
        ax.set_xlim(0, max(ends.max() * 1.35, 1e-3))
        ax.set_xlabel("median ms" + (" per batch" if r.get("batch_size", 1) > 1 else ""))
        ax.set_title(f"{r['label']} [{r['config']}]\nstages (in the timed calls) sum {r['stage_sum_ms']:.0f} ms, "
                     f"end-to-end median {r['end_to_end']['median_ms']:.0f} ms", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
