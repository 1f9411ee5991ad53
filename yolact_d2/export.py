"""Export YOLACT / YOLACT++ to ONNX and TorchScript: a raw graph and an end-to-end graph.

Two graphs, both traced from the eager model (same weights, same code paths where possible):

* **raw** (:class:`RawGraph`): ``images`` (N, 3, S, S) float32, normalised as the model's
  ``preprocess_image`` does (S = ``MODEL.YOLACT.INPUT_SIZE``; N is dynamic) ->
  ``box_deltas`` (N, A, 4) SSD-coded, ``class_scores`` (N, A, C + 1) background last,
  ``mask_coeffs`` (N, A, k) in [-1, 1], ``prototypes`` (N, h, w, k), ``priors`` (A, 4)
  (cx, cy, w, h) relative to the input, a constant. Same contract as ``YOLACT.forward_raw``.
* **end to end** (:class:`EndToEndGraph`): ``image`` (H, W, 3) uint8 BGR, any H and W (as
  ``cv2.imread`` gives it) -> ``boxes`` (D, 4) float32 XYXY pixels of the input image,
  ``scores`` (D,) float32 in [0, 1], ``classes`` (D,) int64 0-based, ``masks`` (D, H, W) uint8
  0/1 pasted on the image, highest score first, D <= ``DETECTIONS_PER_IMAGE``; YOLACT++ with
  re-scoring adds ``mask_scores`` (D,). Resize, normalisation, box decoding, Fast NMS and mask
  assembly, crop and paste all run inside the graph: no Python post-processing is needed.

Fast NMS in the graph has fixed shapes: per class the ``NMS_TOP_K`` best priors among ALL priors,
with the scores of priors that are not candidates (best foreground score <= SCORE_THRESH_TEST)
set to -1, so that they rank last, suppress nothing that counts and are dropped at the end. This
gives the eager model's detections (original ``Detect``): an above-threshold candidate is ranked,
suppressed and cut exactly as there; see :func:`yolact_d2.fast_nms.fast_nms_static`.

:func:`quantize_onnx` writes an int8 copy of an ONNX e2e graph (every ``Conv`` quantized by
onnxruntime's static quantization; its accuracy is measured as AP, it is not a parity graph).

Only ``NMS_TYPE: "fast"`` with per-class suppression is exported; other settings raise
:class:`ExportError`. YOLACT++'s deformable convolutions become ONNX ``DeformConv`` (opset 19,
run by onnxruntime and OpenVINO) through a symbolic registered here, since PyTorch's
exporter has none for torchvision's ``deform_conv2d``.
"""
import json
import logging
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ModulatedDeformConv
from .errors import YolactUserError
from .fast_nms import fast_nms_static
from .mask_assembly import assemble_masks, crop_masks
from .priors import feature_sizes, priors_to_boxes, to_pixel_boxes

__all__ = [
    "ExportError", "RawGraph", "EndToEndGraph", "export_model", "export_metadata", "quantize_onnx",
    "RAW_OUTPUTS", "E2E_OUTPUTS", "DEFAULT_OPSET",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFORM_CONV_OPSET = 19  # ONNX DeformConv (YOLACT++'s backbone)
RAW_OUTPUTS = ("box_deltas", "class_scores", "mask_coeffs", "prototypes", "priors")
E2E_OUTPUTS = ("boxes", "scores", "classes", "masks")
# ONNX metadata_props / TorchScript extra file carrying what a runtime needs besides the graph.
METADATA_KEY = "yolact_d2"


class ExportError(YolactUserError, ValueError):
    """A model or request that cannot be exported faithfully (the message says why and the fix)."""


def _check_exportable(model, graph: str, fmt: str, opset: int) -> None:
    if graph not in ("raw", "e2e"):
        raise ExportError(f"unknown graph {graph!r}; use 'raw' or 'e2e'")
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"unknown format {fmt!r}; use 'onnx' or 'torchscript'")
    if graph == "e2e":
        if model.nms_type != "fast":
            raise ExportError(
                f"MODEL.YOLACT.NMS_TYPE {model.nms_type!r} cannot be exported (data-dependent loops); "
                "export with MODEL.YOLACT.NMS_TYPE fast"
            )
        if model.nms_class_agnostic:
            raise ExportError(
                "MODEL.YOLACT.NMS_CLASS_AGNOSTIC True is not exported; use MODEL.YOLACT.NMS_CLASS_AGNOSTIC False"
            )
    if fmt == "onnx" and opset < DEFORM_CONV_OPSET and has_deformable_convs(model):
        raise ExportError(
            f"this model has deformable convolutions (YOLACT++): ONNX has DeformConv from opset "
            f"{DEFORM_CONV_OPSET}, not {opset}; export with --opset {DEFORM_CONV_OPSET} (the default for YOLACT++)"
        )


def has_deformable_convs(model) -> bool:
    """True when ``model`` has YOLACT++'s deformable backbone convs (:class:`ModulatedDeformConv`)."""
    return any(isinstance(m, ModulatedDeformConv) for m in model.modules())


def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                            dil_h, dil_w, n_weight_grps, n_offset_grps, use_mask):
    """torchvision::deform_conv2d as ONNX DeformConv (opset 19): the same offset layout ((dy, dx)
    per kernel tap) and modulation mask, checked number for number against torchvision in the tests."""
    from torch.onnx import symbolic_helper as sym

    ints = [sym._get_const(v, "i", name) for v, name in (
        (stride_h, "stride_h"), (stride_w, "stride_w"), (pad_h, "pad_h"), (pad_w, "pad_w"), (dil_h, "dil_h"),
        (dil_w, "dil_w"), (n_weight_grps, "n_weight_grps"), (n_offset_grps, "n_offset_grps"))]
    sh, sw, ph, pw, dh, dw, groups, offset_groups = ints
    inputs = [input, weight, offset, bias] + ([mask] if sym._get_const(use_mask, "b", "use_mask") else [])
    return g.op("DeformConv", *inputs, strides_i=[sh, sw], pads_i=[ph, pw, ph, pw], dilations_i=[dh, dw],
                group_i=groups, offset_group_i=offset_groups)


def _register_deform_conv_symbolic(opset: int) -> None:
    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d_symbolic, opset)


class RawGraph(nn.Module):
    """Normalised images in, the network's raw tensors out (see the module docstring).

    Args:
        model: a YOLACT model in eval mode (weights loaded).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        shapes = model.backbone.output_shape()
        sizes = feature_sizes(model.input_size, [int(math.log2(shapes[f].stride)) for f in model.in_features])
        self.register_buffer("priors", model.prior_generator(sizes, model.device).clone(), False)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.model._network(images)
        # "+ images[:0].sum()" (adds 0): a graph output must depend on the input for the tracer.
        return (out.box_deltas, self.model.class_scores(out.class_logits), out.mask_coeffs, out.prototypes,
                self.priors + images[:0].sum())


class EndToEndGraph(nn.Module):
    """A uint8 BGR image of any size in, final detections out (see the module docstring).

    Args:
        model: a YOLACT model in eval mode (weights loaded), ``NMS_TYPE`` "fast", per class.
        input_format: the model's ``INPUT.FORMAT`` ("BGR" or "RGB"); the graph's input is BGR
            either way and is flipped inside when the model wants RGB.
    """

    def __init__(self, model, input_format: str = "BGR"):
        super().__init__()
        if input_format not in ("BGR", "RGB"):
            raise ExportError(f"INPUT.FORMAT {input_format!r} cannot be exported; use BGR or RGB")
        self.raw = RawGraph(model)
        self.model = model
        self.flip_channels = input_format == "RGB"
        self.register_buffer("prior_boxes", priors_to_boxes(self.raw.priors), False)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        m = self.model
        height, width = image.shape[0], image.shape[1]
        x = image.permute(2, 0, 1).float()
        if self.flip_channels:
            x = x.flip(0)
        x = (x - m.pixel_mean) / m.pixel_std
        # Always resized: at S x S the bilinear resize (half-pixel centres) is the identity, so
        # this equals the eager model, which skips it there.
        x = F.interpolate(x[None], size=(m.input_size, m.input_size), mode="bilinear", align_corners=False)
        box_deltas, class_scores, mask_coeffs, prototypes, _ = self.raw(x)
        scores = class_scores[0, :, : m.num_classes]
        candidate = scores.max(dim=1).values > m.score_thresh
        scores = torch.where(candidate[:, None], scores, torch.full_like(scores, -1.0))
        boxes = m.box_coder.apply_deltas(box_deltas[0], self.prior_boxes)
        index, classes, det_scores = fast_nms_static(
            boxes, scores, m.nms_thresh, m.nms_top_k, m.max_detections
        )
        keep = (det_scores >= 0).nonzero()[:, 0]
        index, classes, det_scores = index[keep], classes[keep], det_scores[keep]
        boxes = boxes[index]
        soft = crop_masks(assemble_masks(prototypes[0], mask_coeffs[0][index]), boxes)
        pixel_boxes = to_pixel_boxes(boxes, height, width)
        # One blank mask appended and dropped again: resize (and re-scoring) refuse an empty batch.
        padded = torch.cat([soft, soft.new_zeros((1,) + soft.shape[1:])])
        up = F.interpolate(padded[None], size=(height, width), mode="bilinear", align_corners=False)
        # Threshold before dropping the batch axis and the blank mask: those copies are then uint8,
        # a quarter of the float bytes (the float copy took 136 ms per 100 masks at 640x426).
        masks = (up > m.mask_threshold).to(torch.uint8).squeeze(0)[:-1]
        outputs = (pixel_boxes, det_scores, classes, masks)
        if m.mask_rescoring is not None:  # the eager model's re-scoring, branch-free
            outputs += (det_scores * m.mask_rescoring.predict_iou(padded, classes, blank_appended=True),)
        return outputs


def export_metadata(cfg, model, graph: str, class_names: List[str]) -> Dict:
    """What a runtime needs besides the graph, stored inside the exported file as JSON.

    Returns:
        dict with ``graph`` ("raw" / "e2e"), ``input_size`` (S), ``input_format`` (the model's),
        ``pixel_mean`` / ``pixel_std`` (model's channel order), ``num_classes``, ``class_names``,
        ``outputs`` (names in order), ``score_thresh``, ``mask_threshold``, ``mask_rescoring``.
    """
    outputs = list(RAW_OUTPUTS if graph == "raw" else E2E_OUTPUTS)
    if graph == "e2e" and model.mask_rescoring is not None:
        outputs.append("mask_scores")
    return {
        "graph": graph,
        "input_size": int(model.input_size),
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "num_classes": int(model.num_classes),
        "class_names": list(class_names),
        "outputs": outputs,
        "score_thresh": float(model.score_thresh),
        "mask_threshold": float(model.mask_threshold),
        "mask_rescoring": model.mask_rescoring is not None,
    }


def _check_output_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ExportError(f"--output {path} is a folder; give a file name, e.g. {os.path.join(path, 'model.onnx')}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {folder} ({e.strerror}); choose a writable --output") from e
    if not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write to {folder}; choose a writable --output")


def export_model(cfg, model, graph: str, fmt: str, output: str, sample_image: torch.Tensor,
                 class_names: List[str], opset: Optional[int] = None) -> str:
    """Trace ``model`` into ``output`` as an ONNX or TorchScript file.

    Args:
        cfg: the model's config (INPUT.FORMAT, PIXEL_MEAN/STD are recorded).
        model: a YOLACT model in eval mode with its weights.
        graph: "raw" or "e2e" (see the module docstring).
        fmt: "onnx" or "torchscript".
        output: file to write (its folder is created).
        sample_image: (H, W, 3) uint8 BGR image to trace with; the graphs take other sizes too.
        class_names: NUM_CLASSES names, stored in the file.
        opset: ONNX opset; default 17, 19 for YOLACT++ (ONNX DeformConv needs 19).
    Returns:
        ``output``.
    Raises:
        ExportError: a setting that cannot be exported, or an output path that cannot be written.
    """
    if opset is None:
        opset = DEFORM_CONV_OPSET if has_deformable_convs(model) else DEFAULT_OPSET
    _check_exportable(model, graph, fmt, opset)
    _check_output_path(output)
    model = model.eval()
    wrapper = (RawGraph(model) if graph == "raw" else EndToEndGraph(model, cfg.INPUT.FORMAT)).eval()
    metadata = export_metadata(cfg, model, graph, class_names)
    output_names = metadata["outputs"]  # one list: the graph's names are the runtime's
    if graph == "raw":
        chw = sample_image.permute(2, 0, 1)  # BGR -> the model's INPUT.FORMAT, then its own preprocessing
        x = model.preprocess_image([{"image": chw.flip(0) if cfg.INPUT.FORMAT == "RGB" else chw}])
        input_names = ["images"]
        dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in output_names if n != "priors"}}
    else:
        x = sample_image.to(model.device)
        input_names = ["image"]
        dynamic = {"image": {0: "height", 1: "width"}, **{n: {0: "detections"} for n in output_names}}
        dynamic["masks"] = {0: "detections", 1: "height", 2: "width"}
    meta = json.dumps(metadata)
    with torch.no_grad(), warnings.catch_warnings():
        # fast_nms_static reads the prior count to fix its shapes: constants by design.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"yolact_d2\.fast_nms")
        if fmt == "onnx":
            import onnx

            if has_deformable_convs(model):
                _register_deform_conv_symbolic(opset)
            torch.onnx.export(
                wrapper, (x,), output, input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True,
            )
            proto = onnx.load(output)
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, meta
            onnx.save(proto, output)
        else:
            traced = torch.jit.trace(wrapper, (x,), check_trace=False)
            torch.jit.save(traced, output, _extra_files={METADATA_KEY: meta})
    logger.info(f"exported the {graph} graph as {fmt} to {output}")
    return output


def quantize_onnx(source: str, output: str, calibration_images: Sequence[np.ndarray]) -> str:
    """Write an int8 copy of an exported ONNX graph: every ``Conv`` quantized, the rest float32.

    onnxruntime's static quantization (``onnxruntime.quantization.quantize_static``): QDQ format,
    weights int8 per output channel, activations uint8 per tensor with ranges from a MinMax
    calibration on ``calibration_images``, ``reduce_range`` (7-bit weights) because this CPU class
    (AVX2 without VNNI) multiplies uint8 x int8 with a saturating instruction. Box decoding,
    Fast NMS and the masks stay float32. The detections differ from the float model's (not a parity
    graph): measure its AP with ``train_net.py --eval-only --exported``.

    Args:
        source: an end-to-end ONNX file written by :func:`export_model`.
        output: the int8 file to write.
        calibration_images: (H, W, 3) uint8 BGR images, as the graph takes them, ideally from
            the training set (32 gave the float model's AP on Penn-Fudan).
    Returns:
        ``output``; its stored metadata gains ``quantization`` (type, format, calibration count).
    Raises:
        ExportError: no calibration image, an image that is not (H, W, 3) uint8, a file without
            yolact-d2 metadata or with the raw graph, an output path that cannot be written, or
            onnxruntime's quantization tools missing.
    """
    import onnx

    try:
        from onnxruntime.quantization import (
            CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
        )
    except ImportError as e:  # e.g. ml_dtypes missing: scripts/install.sh installs it
        raise ExportError(f"onnxruntime's quantization tools cannot be imported ({e}); "
                          "pip install 'ml_dtypes>=0.4,<0.5' (numpy 1)") from e

    images = list(calibration_images)
    if not images:
        raise ExportError("int8 quantization needs calibration images; pass --calibration-images DIR (training photos)")
    for i, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ExportError(f"calibration image {i} is not an (H, W, 3) uint8 BGR array")
    _check_output_path(output)
    proto = onnx.load(source, load_external_data=False)
    entry = next((p for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        raise ExportError(f"{source} has no yolact-d2 metadata; quantize a file written by tools/export_model.py")
    metadata = json.loads(entry.value)
    if metadata["graph"] != "e2e":
        raise ExportError(f"{source} holds the raw graph; int8 quantization takes the e2e graph (--graph e2e)")
    feeds = [{proto.graph.input[0].name: image} for image in images]

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(
        source, output, _Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    metadata["quantization"] = {"type": "int8", "format": "QDQ", "ops": ["Conv"], "weights": "int8 per channel",
                                "activations": "uint8 per tensor, MinMax", "calibration_images": len(images)}
    proto = onnx.load(output)
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps(metadata)
    onnx.save(proto, output)
    logger.info(f"wrote the int8 graph to {output} ({len(images)} calibration images)")
    return output

