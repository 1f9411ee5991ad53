"""Checkpoint conversion: the authors' original YOLACT/YOLACT++ layout and torchvision ImageNet ResNets.

The YOLACT model converts on load (a ``load_state_dict`` pre-hook calls :func:`upgrade_state_dict`),
so ``MODEL.WEIGHTS`` may point at ``yolact_resnet50_54_800000.pth`` or torchvision's
``resnet50-*.pth`` directly, with detectron2's ``DetectionCheckpointer``, ``DefaultPredictor`` and
``DefaultTrainer`` unchanged. ``tools/convert_original_weights.py`` writes converted files.
detectron2's MSRA ``.pkl`` backbones load through detectron2's own name matching (they need
``MODEL.RESNETS.STRIDE_IN_1X1: True`` and BGR 0-255 pixel mean / std 1, see the README).
"""
import logging
import re
from typing import Dict

import torch

from .errors import YolactUserError

__all__ = [
    "CheckpointLayoutError",
    "detect_layout",
    "convert_original_state_dict",
    "convert_torchvision_resnet_state_dict",
    "upgrade_state_dict",
    "CLASS_SPECIFIC_KEYS",
]


logger = logging.getLogger(__name__)

# Tensors whose shape depends on the number of classes: when fine-tuning a checkpoint on other
# classes they are skipped (and keep their initialisation) instead of refused.
CLASS_SPECIFIC_KEYS = (
    "head.cls_score.weight", "head.cls_score.bias", "sem_seg_head.weight", "sem_seg_head.bias",
    "mask_rescoring.layers.10.weight", "mask_rescoring.layers.10.bias",
)


class CheckpointLayoutError(YolactUserError, ValueError):
    """A checkpoint whose layout does not fit the model or cannot be converted (a user's mistake:
    entry points print it as one line)."""


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """Name the layout of a state dict.

    Returns:
        ``"original"`` (dbolya/yolact: ``backbone.layers.*``, ``proto_net.*``, ``prediction_layers.*``),
        ``"torchvision"`` (an ImageNet ResNet: ``layer1.*``, ``fc.*``), or ``"detectron2"`` otherwise.
    """
    keys = state_dict.keys()
    if any(k.startswith(("proto_net.", "prediction_layers.", "backbone.layers.", "fpn.lat_layers.")) for k in keys):
        return "original"
    if any(k.startswith("layer1.") for k in keys) and "conv1.weight" in state_dict:
        return "torchvision"
    return "detectron2"


def _resnet_key(rest: str) -> str:
    """Torchvision-style ResNet key inside ``layers`` (``{stage}.{block}.{name}``) -> detectron2 name.

    ``stage`` is 0-based (0 = res2); ``conv{k}``/``bn{k}`` -> ``conv{k}``/``conv{k}.norm``,
    ``downsample.{0,1}`` -> ``shortcut``/``shortcut.norm``; DCN ``conv2.conv_offset_mask`` and
    ``conv2.bias`` keep their names under ``conv2``.
    """
    m = re.fullmatch(r"(\d+)\.(\d+)\.(.+)", rest)
    if m is None:
        raise CheckpointLayoutError(f"unrecognised ResNet key 'layers.{rest}'")
    stage, block, name = int(m.group(1)) + 2, m.group(2), m.group(3)
    name = re.sub(r"^bn(\d)\.", r"conv\1.norm.", name)
    name = re.sub(r"^downsample\.0\.", "shortcut.", name)
    name = re.sub(r"^downsample\.1\.", "shortcut.norm.", name)
    return f"res{stage}.{block}.{name}"


def _stem_key(name: str) -> str:
    return re.sub(r"^bn1\.", "conv1.norm.", name)


def convert_torchvision_resnet_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone.bottom_up.") -> Dict[str, torch.Tensor]:
    """torchvision ImageNet ResNet (``conv1``, ``bn1``, ``layer{1-4}``, ``fc``) -> detectron2 ResNet keys.

    Use with ``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision puts the stride in the 3x3 conv)
    and torchvision's RGB normalisation (pixel mean 123.675, 116.28, 103.53; std 58.395, 57.12,
    57.375), which the YOLACT configs use. ``fc.*`` is dropped. Values become float32.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc."):
            continue
        m = re.fullmatch(r"layer(\d)\.(.+)", k)
        new = _resnet_key(f"{int(m.group(1)) - 1}.{m.group(2)}") if m else "stem." + _stem_key(k)
        out[prefix + new] = v.float() if v.is_floating_point() else v
    return out


_FPN = {"lat_layers": ("lateral_p5", "lateral_p4", "lateral_p3"), "pred_layers": ("output_p5", "output_p4", "output_p3"), "downsample_layers": ("p6", "p7")}
_HEAD = {"upfeature.0": "conv", "bbox_layer": "bbox_pred", "conf_layer": "cls_score", "mask_layer": "coeff_pred"}


def convert_original_state_dict(state_dict: Dict[str, torch.Tensor], num_classes: int = None) -> Dict[str, torch.Tensor]:
    """The authors' checkpoint layout (``dbolya/yolact``, every published ResNet model) -> yolact-d2.

    Renames every key (see ``../shared/reference/original_checkpoint_layout.tsv`` for the source
    layout), casts float16 to float32 and moves the background class of ``conf_layer`` from first
    to last place in each prior's block of C + 1 channels (detectron2's convention).

    Args:
        state_dict: original ``state_dict`` (``torch.load`` of a ``.pth``).
        num_classes: C; inferred from ``semantic_seg_conv`` or ``maskiou_net`` when None.

    Raises:
        CheckpointLayoutError: a key of no known part (e.g. the DarkNet-53 backbone, unsupported),
            or C that cannot be inferred.
    """
    if any(k.startswith("backbone._preconv") for k in state_dict) or any(
        re.match(r"backbone\.layers\.\d+\.\d+\.\d+\.", k) for k in state_dict
    ):
        raise CheckpointLayoutError(
            "this is an original DarkNet-53 YOLACT checkpoint; yolact-d2 supports the ResNet models only"
        )
    if num_classes is None:
        for k in ("semantic_seg_conv.bias", "maskiou_net.maskiou_net.10.bias"):
            if k in state_dict:
                num_classes = state_dict[k].shape[0]
                break
        else:
            raise CheckpointLayoutError("cannot infer the number of classes; pass num_classes")
    out = {}
    for k, v in state_dict.items():
        v = v.float() if v.is_floating_point() else v
        part, _, rest = k.partition(".")
        if part == "backbone" and rest.startswith("layers."):
            new = "backbone.bottom_up." + _resnet_key(rest[len("layers."):])
        elif part == "backbone":
            new = "backbone.bottom_up.stem." + _stem_key(rest)
        elif part == "fpn":
            group, _, tail = rest.partition(".")
            index, _, param = tail.partition(".")
            new = f"backbone.{_FPN[group][int(index)]}.{param}"
        elif part == "proto_net":
            new = f"protonet.layers.{rest}"
        elif part == "prediction_layers" and rest.startswith("0."):
            layer, _, param = rest[2:].rpartition(".")
            new = f"head.{_HEAD[layer]}.{param}"
            if layer == "conf_layer":
                c1 = num_classes + 1
                v = v.reshape(-1, c1, *v.shape[1:])
                v = torch.cat([v[:, 1:], v[:, :1]], dim=1).reshape(-1, *v.shape[2:])
        elif part == "semantic_seg_conv":
            new = f"sem_seg_head.{rest}"
        elif part == "maskiou_net":
            new = f"mask_rescoring.layers.{rest[len('maskiou_net.'):]}" if rest.startswith("maskiou_net.") else None
        else:
            new = None
        if new is None:
            raise CheckpointLayoutError(f"original checkpoint key {k!r} belongs to no part yolact-d2 knows")
        out[new] = v
    return out


def upgrade_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook of the YOLACT model: converts foreign layouts in place.

    Original and torchvision checkpoints are converted, BatchNorm counters the model lacks
    (FrozenBN) are dropped, and every converted tensor is checked against the model's shape.
    Class-specific tensors (:data:`CLASS_SPECIFIC_KEYS`) of another class count are skipped with a
    warning that lists them, so a released 80-class checkpoint fine-tunes a model with other
    classes (detectron2-layout checkpoints get the same from detectron2's checkpointer, which
    skips every tensor of another shape with a warning).

    Raises:
        CheckpointLayoutError: an original checkpoint into a model built with a norm option
            (``module.non_original_options``), naming the option; a converted tensor whose shape
            differs from the model's, with the likely cause (e.g. a YOLACT++ checkpoint into a YOLACT config, or another class count).
    """
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    layout = detect_layout(own)
    if layout == "detectron2":
        return
    if layout == "original" and getattr(module, "non_original_options", None):
        opts = ", ".join(f"{k}={v!r}" for k, v in module.non_original_options.items())
        raise CheckpointLayoutError(
            f"an original YOLACT checkpoint has no parameters for {opts}: set it to '' to load it, "
            "or train that model from scratch / from ImageNet weights"
        )
    model_state = module.state_dict()
    if layout == "original":
        converted = convert_original_state_dict(own)  # C from the checkpoint: see the shape checks below
    else:
        converted = convert_torchvision_resnet_state_dict(own)
    for k in own:
        del state_dict[prefix + k]
    skipped = []
    for k, v in converted.items():
        if k.endswith("num_batches_tracked") and k not in model_state:
            continue
        if k in CLASS_SPECIFIC_KEYS and k in model_state and tuple(model_state[k].shape) != tuple(v.shape):
            skipped.append(f"{k} {tuple(v.shape)} -> {tuple(model_state[k].shape)}")
            continue
        if k in model_state and tuple(model_state[k].shape) != tuple(v.shape):
            raise CheckpointLayoutError(
                f"{layout} checkpoint does not fit this model: {k} is {tuple(v.shape)} in the checkpoint "
                f"but {tuple(model_state[k].shape)} in the model (check the config: YOLACT vs YOLACT++, "
                "ResNet depth, NUM_CLASSES)"
            )
        state_dict[prefix + k] = v
    if skipped:
        logger.warning(
            f"{layout} checkpoint has another number of classes than this model: skipped "
            f"{len(skipped)} class-specific tensors, which keep their initialisation (fine-tuning): "
            + "; ".join(skipped)
        )
