"""Run an exported end-to-end YOLACT graph (see :mod:`yolact_d2.export`) and get detectron2 outputs.

:class:`ExportedPredictor` takes BGR numpy images like :class:`~yolact_d2.predictor.YolactPredictor`
and returns the same ``{"instances": Instances}``; called with detectron2's list of input dicts it
behaves as a model, so ``inference_on_dataset`` and the COCO evaluator run on it unchanged::

    predictor = ExportedPredictor("model_e2e.onnx")              # onnxruntime, 2 threads
    instances = predictor(cv2.imread("input.jpg"))["instances"]

Runtimes: "onnxruntime" (CPU execution provider) or "openvino" (CPU plugin) for ``.onnx`` files
and "torchscript" for ``.ts`` / ``.pt`` files. The class names, input format and thresholds come from the file itself.

A TorchScript file is a program: opening one runs its code, by design (not so ``.onnx``, which
holds operators only). Open only ``.ts`` files you made or trust; weights files, by contrast, are
read without running code (:mod:`yolact_d2.checkpointer`).

Precision: every runtime computes in float32 by default (an int8 file runs its quantized convs in
int8 and the rest in float32). OpenVINO's CPU plugin would otherwise pick bfloat16 by itself on
CPUs with AVX-512 BF16 or AMX, and so give other detections on other machines; ``precision="bf16"``
(or ``FILE@openvino:bf16`` in the tools) asks for it explicitly.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.structures import Boxes, Instances

from .errors import MissingFileError, YolactUserError
from .export import METADATA_KEY
from .predictor import _as_bgr, _one_line

__all__ = ["ExportedPredictor", "ExportedModelError", "runtime_for", "split_runtime", "matched_detections"]

RUNTIMES = ("onnxruntime", "openvino", "torchscript")
# Inference precisions: "f32" everywhere; "bf16" through OpenVINO on CPUs that have it.
PRECISIONS = ("f32", "bf16")

logger = logging.getLogger(__name__)


class ExportedModelError(YolactUserError, ValueError):
    """An exported file that cannot be used (the message names the file and the fix)."""


def runtime_for(path: str) -> str:
    """The runtime that reads ``path``: "onnxruntime" for ``.onnx``, "torchscript" for ``.ts``/``.pt``.

    Raises:
        ExportedModelError: any other suffix.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix in (".ts", ".pt", ".torchscript"):
        return "torchscript"
    raise ExportedModelError(
        f"{path}: unknown exported-model suffix {suffix!r}; use a .onnx or .ts file from tools/export_model.py"
    )


def split_runtime(spec: str) -> Tuple[str, str]:
    """``"FILE@RUNTIME[:PRECISION]"`` (as the tools' ``--exported`` take it, e.g. ``m.onnx@openvino``
    or ``m.onnx@openvino:bf16``) -> (FILE, "RUNTIME[:PRECISION]"), which :class:`ExportedPredictor`
    takes as its ``runtime`` (and checks the precision); a plain FILE -> (FILE, "auto"). Only a
    known runtime after the last "@" is split off, so other paths with "@" stay whole."""
    path, sep, runtime = spec.rpartition("@")
    return (path, runtime) if sep and runtime.partition(":")[0] in RUNTIMES else (spec, "auto")


def _openvino_deform_conv(node):
    """ONNX ``DeformConv`` (opset 19, YOLACT++'s backbone) as OpenVINO's ``DeformableConvolution``
    (opset 8), for OpenVINO's ONNX frontend, which has no rule for it (OpenVINO 2026.4).

    Same inputs as torchvision's ``deform_conv2d``: X (N, C, H, W), W (O, C/group, kh, kw), offset
    (N, 2*offset_group*kh*kw, H', W') as (dy, dx) pairs, optional B (O,) and mask (N,
    offset_group*kh*kw, H', W'). ``bilinear_interpolation_pad`` reproduces torchvision's sampling
    of points within one pixel outside the map (their in-map neighbours still count); OpenVINO's
    default treats them as zero. Bias is a separate add: the op has none.
    """
    import openvino.opset8 as ops

    count = node.get_input_size()
    x, weight, offset = node.get_input(0), node.get_input(1), node.get_input(2)
    pads = list(node.get_attribute("pads"))
    half = len(pads) // 2
    y = ops.deformable_convolution(
        x, offset, weight, list(node.get_attribute("strides")), pads[:half], pads[half:],
        list(node.get_attribute("dilations")), mask=node.get_input(4) if count > 4 else None,
        group=node.get_attribute("group"), deformable_group=node.get_attribute("offset_group"),
        bilinear_interpolation_pad=True,
    )
    if count > 3:  # bias (O,) -> (1, O, 1, 1)
        y = ops.add(y, ops.unsqueeze(node.get_input(3), ops.constant(np.array([0, 2, 3], np.int64))))
    return y.outputs()


def _openvino_core():
    """An ``openvino.Core`` that reads yolact-d2's ONNX files, YOLACT++'s ``DeformConv`` included."""
    import openvino as ov
    from openvino.frontend.onnx import ConversionExtension

    core = ov.Core()
    core.add_extension(ConversionExtension("DeformConv", _openvino_deform_conv))
    return core


def openvino_has_bf16() -> bool:
    """True when OpenVINO's CPU plugin can run bfloat16 on this CPU (AVX-512 BF16 or AMX)."""
    return "BF16" in _openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_openvino(path: str, precision: str = "f32", threads: Optional[int] = None):
    """``path`` (an ONNX file) compiled for OpenVINO's CPU plugin at ``precision`` ("f32" or
    "bf16"), with :func:`_openvino_deform_conv` for YOLACT++.

    The precision is set explicitly: the plugin's default ``INFERENCE_PRECISION_HINT`` is bfloat16
    wherever the CPU has it, float32 elsewhere. An int8 (QDQ) file keeps its int8 convs either way.

    Raises:
        ExportedModelError: "bf16" on a CPU without bfloat16 (OpenVINO would fall back silently).
        Whatever OpenVINO raises for an unreadable file (the caller words it).
    """
    core = _openvino_core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in capabilities:
        raise ExportedModelError(
            f"precision bf16: this CPU has no bfloat16 support (OpenVINO lists {', '.join(capabilities)}); use f32"
        )
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(core.read_model(path), "CPU", config)


class ExportedPredictor:
    """Detections from an exported end-to-end graph, as detectron2 ``Instances``.

    Args:
        path: a ``.onnx`` or ``.ts`` file written by ``tools/export_model.py --graph e2e`` (a
            ``.ts`` file is a program: opening it runs its code, so open only your own or trusted ones).
        threads: intra-op threads of the runtime (onnxruntime ``intra_op_num_threads``,
            OpenVINO ``INFERENCE_NUM_THREADS``; TorchScript has only torch's process-wide pool,
            so its count is set for each call and the caller's restored after); None keeps the
            runtime's default. The process-wide ``torch.get_num_threads()`` is left alone.
        runtime: "auto" (by suffix, :func:`runtime_for`), "onnxruntime", "openvino" (an ``.onnx``
            file through OpenVINO's CPU plugin; needs ``pip install openvino``) or "torchscript";
            "RUNTIME:PRECISION" (as :func:`split_runtime` gives it) sets ``precision`` too.
        precision: "f32" (default, every runtime) or "bf16" (OpenVINO only, on a CPU with
            bfloat16 support): OpenVINO's ``INFERENCE_PRECISION_HINT``, set explicitly because
            its default is bfloat16 on such CPUs. bfloat16 keeps 8 significant bits (relative
            rounding 2^-8 = 0.4%): faster, with scores and boxes that differ from float32's in
            the second or third digit.

    Attributes:
        metadata: dict stored in the file (:func:`yolact_d2.export.export_metadata`):
            ``class_names``, ``input_format``, ``input_size``, ``outputs``, thresholds.
        runtime: the runtime in use.
        precision: the precision the runtime computes in ("f32" or "bf16"; read back from
            OpenVINO's compiled model).

    Raises:
        MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
        ExportedModelError: the file cannot be read by the runtime (corrupt, truncated, not a
            model), lacks yolact-d2's metadata, or holds the raw graph; an unknown precision, or
            "bf16" outside OpenVINO or on a CPU without bfloat16.
    """

    def __init__(self, path: str, threads: Optional[int] = 2, runtime: str = "auto", precision: Optional[str] = None):
        if not os.path.isfile(path):
            raise MissingFileError(f"exported model {path} not found (make one with tools/export_model.py)")
        self.path = path
        runtime, _, suffix = runtime.partition(":")
        if suffix and precision and suffix != precision:
            raise ExportedModelError(f"runtime {runtime}:{suffix} and precision {precision!r} disagree; give one")
        precision = precision or suffix or "f32"
        if precision not in PRECISIONS:
            raise ExportedModelError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.runtime = runtime_for(path) if runtime == "auto" else runtime
        if precision != "f32" and self.runtime != "openvino":
            raise ExportedModelError(
                f"precision {precision} runs through OpenVINO only ({self.runtime} computes in float32); "
                f"use {os.path.basename(path)}@openvino:{precision}, or precision f32"
            )
        self.precision = precision
        self.threads = threads
        fix = "re-export it with tools/export_model.py --graph e2e"
        if self.runtime == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise ExportedModelError(
                    "runtime 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from e

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            try:
                self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
                raise ExportedModelError(
                    f"{path} is not a readable ONNX model ({type(e).__name__}: {_one_line(e, 150)}); {fix}"
                ) from e
            meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            self._input_name = self._session.get_inputs()[0].name
        elif self.runtime == "openvino":
            try:
                import openvino  # noqa: F401 (a one-line error when it is missing)
            except ImportError as e:
                raise ExportedModelError("runtime 'openvino' needs the openvino package: pip install openvino") from e
            import onnx

            try:
                compiled = compile_openvino(path, precision, threads)
                props = onnx.load(path, load_external_data=False).metadata_props
            except ExportedModelError:
                raise
            except Exception as e:  # OpenVINO and onnx raise their own types for a bad file
                raise ExportedModelError(
                    f"{path} is not a readable ONNX model ({type(e).__name__}: {_one_line(e, 150)}); {fix}"
                ) from e
            self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32" / "bf16"
            logger.info("%s: OpenVINO CPU plugin, inference precision %s", path, self.precision)
            self._request = compiled.create_infer_request()
            self._ov_outputs = list(compiled.outputs)
            meta = next((p.value for p in props if p.key == METADATA_KEY), None)
        elif self.runtime == "torchscript":
            extra = {METADATA_KEY: ""}
            try:
                self._module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
            except Exception as e:  # torch.jit raises RuntimeError / ValueError for a bad archive
                raise ExportedModelError(
                    f"{path} is not a readable TorchScript model ({type(e).__name__}: {_one_line(e, 150)}); {fix}"
                ) from e
            self._module.eval()
            meta = extra[METADATA_KEY] or None
        else:
            raise ExportedModelError(
                f"unknown runtime {runtime!r}; use 'auto', 'onnxruntime', 'openvino' (.onnx) or 'torchscript'"
            )
        if not meta:
            raise ExportedModelError(f"{path} has no yolact-d2 metadata (not made by tools/export_model.py); {fix}")
        self.metadata = json.loads(meta)
        if self.metadata["graph"] != "e2e":
            raise ExportedModelError(f"{path} holds the raw graph (network outputs only); {fix}")
        self.class_names: List[str] = list(self.metadata["class_names"])

    @classmethod
    def open(cls, spec: str, threads: Optional[int] = None) -> "ExportedPredictor":
        """The predictor of an exported-model spec as the tools' ``--exported`` take it:
        ``FILE`` (runtime by suffix), ``FILE@RUNTIME`` or ``FILE@RUNTIME:PRECISION`` (e.g.
        ``model.onnx@openvino:bf16``; :func:`split_runtime`). ``threads``: the runtime's intra-op
        threads; None: ``torch.get_num_threads()``, the pool eager PyTorch would use. The one
        way every entry point (``train_net.py --exported``, the demo, ``tools/benchmark.py``,
        ``tools/compare.py``) opens an exported model. Raises what the constructor raises; a
        missing runtime package is an :class:`ExportedModelError` naming the ``pip install``."""
        path, runtime = split_runtime(spec)
        return cls(path, threads=torch.get_num_threads() if threads is None else threads, runtime=runtime)

    def run(self, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
        """The graph's outputs for one (H, W, 3) uint8 BGR image, by name (see the export docstring)."""
        image_bgr = np.ascontiguousarray(image_bgr)
        if self.runtime == "onnxruntime":
            outputs = self._session.run(None, {self._input_name: image_bgr})
        elif self.runtime == "openvino":
            result = self._request.infer({0: image_bgr})
            outputs = [np.asarray(result[o]) for o in self._ov_outputs]
        else:
            # TorchScript runs on torch's process-wide pool: the predictor's thread count holds
            # for its own calls only, and the caller's is restored.
            before = torch.get_num_threads()
            try:
                if self.threads:
                    torch.set_num_threads(self.threads)
                with torch.inference_mode():
                    outputs = [t.numpy() for t in self._module(torch.from_numpy(image_bgr))]
            finally:
                torch.set_num_threads(before)
        return dict(zip(self.metadata["outputs"], outputs))

    def _instances(self, out: Dict[str, np.ndarray], height: int, width: int) -> Instances:
        result = Instances((height, width))
        result.pred_boxes = Boxes(torch.from_numpy(out["boxes"]))
        result.scores = torch.from_numpy(out["scores"])
        result.pred_classes = torch.from_numpy(out["classes"]).long()
        result.pred_masks = torch.from_numpy(out["masks"].view(np.bool_))  # 0/1 uint8: a free view
        if "mask_scores" in out:
            result.mask_scores = torch.from_numpy(out["mask_scores"])
        return result

    def __call__(self, image):
        """One BGR numpy image -> ``{"instances": Instances}``, as ``YolactPredictor``; a list of
        detectron2 input dicts -> a list of them, as a model (for ``inference_on_dataset``).

        Raises:
            TypeError, ValueError: an image ``YolactPredictor`` refuses too; a detectron2 input
                whose ``height``/``width`` differ from its image (exported graphs answer at the
                input's size: set ``INPUT.MIN_SIZE_TEST 0``).
        """
        if isinstance(image, (list, tuple)):
            return self.predict_inputs(image)
        image = _as_bgr(image)
        return {"instances": self._instances(self.run(image), image.shape[0], image.shape[1])}

    def predict_inputs(self, batched_inputs: Sequence[Dict]) -> List[Dict[str, Instances]]:
        """detectron2 model interface: ``image`` (3, H, W) uint8 tensors in the model's INPUT.FORMAT."""
        results = []
        for x in batched_inputs:
            image = x["image"].permute(1, 2, 0).cpu().numpy()
            if self.metadata["input_format"] == "RGB":
                image = image[:, :, ::-1]
            h, w = image.shape[:2]
            if (int(x.get("height", h)), int(x.get("width", w))) != (h, w):
                raise ValueError(
                    f"{x.get('file_name', 'an input')}: the data loader resized the image to {w}x{h} but the "
                    f"output size is {x.get('width')}x{x.get('height')}; exported graphs answer at their input's "
                    "size, set INPUT.MIN_SIZE_TEST 0"
                )
            if image.dtype != np.uint8:
                image = np.clip(image, 0, 255).astype(np.uint8)
            results.append({"instances": self._instances(self.run(image), h, w)})
        return results


def matched_detections(ours: Instances, ref: Instances, score_tol: float = 1e-3, box_tol: float = 1.0,
                       mask_iou: float = 0.95) -> int:
    """How many of ``ref``'s detections ``ours`` reproduces (the export parity criteria).

    A detection of ``ref`` is matched when ``ours`` has one with the same class, a score within
    ``score_tol``, every box coordinate within ``box_tol`` pixels and a mask IoU >= ``mask_iou``.
    Both need ``pred_classes``, ``scores``, ``pred_boxes`` and ``pred_masks`` (bool, H x W).
    """
    if len(ours) == 0:
        return 0
    ours_boxes = ours.pred_boxes.tensor.float()
    ref_boxes = ref.pred_boxes.tensor.float().to(ours_boxes.device)
    ref_classes, ref_scores = ref.pred_classes.to(ours_boxes.device), ref.scores.float().to(ours_boxes.device)
    ref_masks = ref.pred_masks.to(ours_boxes.device)
    matched = 0
    for i in range(len(ref)):
        close = (
            (ours.pred_classes == ref_classes[i])
            & ((ours.scores.float() - ref_scores[i]).abs() <= score_tol)
            & ((ours_boxes - ref_boxes[i]).abs().max(dim=1).values <= box_tol)
        ).nonzero().flatten()
        for j in close.tolist():
            union = (ours.pred_masks[j] | ref_masks[i]).sum().item()
            if (ours.pred_masks[j] & ref_masks[i]).sum().item() / union >= mask_iou if union else True:
                matched += 1
                break
    return matched
