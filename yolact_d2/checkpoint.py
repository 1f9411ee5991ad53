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
from typing import Dict, List, Optional

import torch

from .errors import YolactUserError

__all__ = [
    "CheckpointLayoutError",
    "load_for_evaluation",
    "detect_layout",
    "convert_original_state_dict",
    "convert_torchvision_resnet_state_dict",
    "upgrade_state_dict",
    "CLASS_SPECIFIC_KEYS",
    "CHECKPOINT_METADATA_KEY",
    "TrainingMetadata",
    "training_class_names",
    "checkpoint_metadata",
    "adopt_input_format",
    "adopt_priors",
    "adopt_checkpoint_metadata",
    "check_checkpoint_classes",
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


# ---------------------------------------------------------------------------------------------
# What a checkpoint written by training carries besides the tensors: the class names and the input
# format, so that the demo, evaluation and export of a model whose dataset existed only in the
# training process still draw and report its own classes (detectron2's checkpointer saves every
# "checkpointable" under its key; fvcore's ``Checkpointer.load`` returns the keys it did not use).
CHECKPOINT_METADATA_KEY = "yolact_d2_metadata"


def training_class_names(cfg) -> Optional[List[str]]:
    """The class names a model trained with ``cfg`` predicts: ``MODEL.YOLACT.CLASS_NAMES`` when set,
    else the ``thing_classes`` of ``DATASETS.TRAIN[0]``'s metadata; None when neither names them."""
    from detectron2.data import MetadataCatalog

    if cfg.MODEL.YOLACT.CLASS_NAMES:
        return list(cfg.MODEL.YOLACT.CLASS_NAMES)
    for name in cfg.DATASETS.TRAIN:
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names:
            return list(names)
    return None


class TrainingMetadata:
    """A checkpointable (``state_dict`` / ``load_state_dict``) holding what a runtime needs to read a
    model's output and feed it images: the class names, the input channel order and normalisation.

    Add it to a trainer's ``DetectionCheckpointer`` with ``add_checkpointable(CHECKPOINT_METADATA_KEY,
    TrainingMetadata(cfg))``: every file that checkpointer (and ``PeriodicCheckpointer``) writes
    then holds ``{"class_names": [C names] or None, "input_format": "RGB"|"BGR", "pixel_mean": [3],
    "pixel_std": [3], "priors": {...} or None}`` (0-255 scale, ``input_format`` channel order) under
    that key. ``priors`` (YOLACT only, :func:`training_priors`) are the ones the model trained with,
    fitted ones included (``MODEL.YOLACT.FIT_PRIORS``): the config file alone does not hold those.
    """

    def __init__(self, cfg):
        self.class_names = training_class_names(cfg)
        self.input_format = cfg.INPUT.FORMAT
        self.pixel_mean = [float(v) for v in cfg.MODEL.PIXEL_MEAN]
        self.pixel_std = [float(v) for v in cfg.MODEL.PIXEL_STD]
        self.priors = training_priors(cfg)

    def state_dict(self) -> Dict:
        return {"class_names": self.class_names, "input_format": self.input_format,
                "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std, "priors": self.priors}

    def load_state_dict(self, state: Dict) -> None:
        # --resume: the run's own config decides; a checkpoint of other classes only warns.
        names = state.get("class_names")
        if names and self.class_names and list(names) != list(self.class_names):
            logger.warning(f"resumed checkpoint names classes {_short(names)}; this run trains {_short(self.class_names)}")


def training_priors(cfg) -> Optional[Dict]:
    """The priors a YOLACT model built from ``cfg`` makes: ``{"anchor_scales": [levels][scales]
    (pixels at INPUT_SIZE), "anchor_aspect_ratios": [ratios] (width / height), "square_anchors":
    bool}``; None for another meta-architecture."""
    if cfg.MODEL.META_ARCHITECTURE != "YOLACT":
        return None
    y = cfg.MODEL.YOLACT
    return {"anchor_scales": [[float(s) for s in level] for level in y.ANCHOR_SCALES],
            "anchor_aspect_ratios": [float(a) for a in y.ANCHOR_ASPECT_RATIOS],
            "square_anchors": bool(y.SQUARE_ANCHORS)}


def _short(names, limit: int = 8) -> str:
    names = list(names)
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"


def checkpoint_metadata(extra: Optional[Dict]) -> Dict:
    """The metadata stored by :class:`TrainingMetadata` in the unused keys ``extra`` that
    ``Checkpointer.load`` returned; ``{}`` for a checkpoint without it (an older file, a released
    or converted model). Malformed entries (not a list of strings, an unknown format) are ignored."""
    meta = (extra or {}).get(CHECKPOINT_METADATA_KEY)
    if not isinstance(meta, dict):
        return {}
    out = {}
    names = meta.get("class_names")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        out["class_names"] = list(names)
    if meta.get("input_format") in ("RGB", "BGR"):
        out["input_format"] = meta["input_format"]
        for key in ("pixel_mean", "pixel_std"):
            if isinstance(meta.get(key), (list, tuple)) and len(meta[key]) == 3:
                out[key] = [float(v) for v in meta[key]]
    priors = meta.get("priors")
    if isinstance(priors, dict):
        scales, ratios = priors.get("anchor_scales"), priors.get("anchor_aspect_ratios")
        if (isinstance(scales, (list, tuple)) and scales and all(isinstance(lv, (list, tuple)) and lv for lv in scales)
                and isinstance(ratios, (list, tuple)) and ratios
                and all(isinstance(v, (int, float)) and v > 0 for v in [*ratios, *(s for lv in scales for s in lv)])
                and isinstance(priors.get("square_anchors"), bool)):
            out["priors"] = {"anchor_scales": [[float(s) for s in lv] for lv in scales],
                             "anchor_aspect_ratios": [float(a) for a in ratios],
                             "square_anchors": priors["square_anchors"]}
    return out


def adopt_input_format(cfg, model, meta: Dict, source: str):
    """Make ``cfg`` and ``model`` read images as the checkpoint's model was trained to.

    When ``meta`` (:func:`checkpoint_metadata`) names an input format or normalisation other than
    ``cfg``'s, logs one warning and returns a frozen copy of ``cfg`` with the checkpoint's
    ``INPUT.FORMAT`` / ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD``; the model's ``pixel_mean`` /
    ``pixel_std`` buffers (3, 1, 1) are set to them. Otherwise returns ``cfg`` unchanged.
    """
    want = {"INPUT.FORMAT": meta.get("input_format", cfg.INPUT.FORMAT),
            "MODEL.PIXEL_MEAN": meta.get("pixel_mean", [float(v) for v in cfg.MODEL.PIXEL_MEAN]),
            "MODEL.PIXEL_STD": meta.get("pixel_std", [float(v) for v in cfg.MODEL.PIXEL_STD])}
    have = {"INPUT.FORMAT": cfg.INPUT.FORMAT, "MODEL.PIXEL_MEAN": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "MODEL.PIXEL_STD": [float(v) for v in cfg.MODEL.PIXEL_STD]}
    changed = [k for k in want if want[k] != have[k]]
    if not changed:
        return cfg
    logger.warning(
        f"{source} was trained with " + ", ".join(f"{k} {want[k]}" for k in changed)
        + "; using those instead of the config's " + ", ".join(f"{have[k]}" for k in changed)
    )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.FORMAT = want["INPUT.FORMAT"]
    cfg.MODEL.PIXEL_MEAN = want["MODEL.PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = want["MODEL.PIXEL_STD"]
    cfg.freeze()
    for name in ("pixel_mean", "pixel_std"):
        buffer = getattr(model, name, None)
        if isinstance(buffer, torch.Tensor):
            buffer.copy_(torch.tensor(getattr(cfg.MODEL, name.upper()), dtype=buffer.dtype).view_as(buffer))
    return cfg


def adopt_priors(cfg, model, meta: Dict, source: str):
    """Make ``cfg`` and ``model`` use the priors the checkpoint's model was trained with.

    A model trained with ``MODEL.YOLACT.FIT_PRIORS`` learned boxes relative to priors fitted at the
    start of training; the config file names only the starting ones. When ``meta``
    (:func:`checkpoint_metadata`) holds priors other than ``cfg``'s, logs one warning, gives
    ``model`` a :class:`~yolact_d2.priors.PriorGenerator` of them and returns a frozen copy of
    ``cfg`` with them (``FIT_PRIORS`` False). Otherwise returns ``cfg`` unchanged.

    A checkpoint that stores no priors (written before checkpoints stored them, a converted or
    released one) keeps the config's; under ``FIT_PRIORS`` True one warning says so, since its
    boxes may be relative to fitted priors that only its run's OUTPUT_DIR/config.yaml holds.

    Raises:
        CheckpointLayoutError: the stored priors are another count per location than the model's
            (its head was built for the config's).
    """
    from .priors import PriorGenerator

    if cfg.MODEL.META_ARCHITECTURE != "YOLACT":
        return cfg
    y = cfg.MODEL.YOLACT
    stored, have = meta.get("priors"), training_priors(cfg)
    if stored is None:
        if y.FIT_PRIORS:  # most likely a file from before checkpoints stored priors: trained on the config's
            logger.warning(
                f"{source} stores no priors and the config fits them at training (MODEL.YOLACT.FIT_PRIORS True): "
                "using the config's ANCHOR_SCALES / ANCHOR_ASPECT_RATIOS; if it was trained with fitted priors, "
                "give its run's OUTPUT_DIR/config.yaml as --config-file")
        return cfg
    if stored == have:
        return cfg
    generator = PriorGenerator(stored["anchor_scales"], stored["anchor_aspect_ratios"], y.INPUT_SIZE,
                               stored["square_anchors"])
    if generator.num_priors_per_location != model.prior_generator.num_priors_per_location:
        raise CheckpointLayoutError(
            f"{source} was trained with {generator.num_priors_per_location} priors per location, the config makes "
            f"{model.prior_generator.num_priors_per_location}; use the training run's OUTPUT_DIR/config.yaml")
    changed = [(key.upper(), stored[key]) for key in stored if stored[key] != have[key]]
    logger.warning(f"{source} was trained with other priors than the config's (fitted ones: MODEL.YOLACT.FIT_PRIORS): "
                   + ", ".join(f"MODEL.YOLACT.{k} {v}" for k, v in changed) + "; using those instead of the config's")
    model.prior_generator = generator  # holds no tensor: priors are made on the input's device
    cfg = cfg.clone()
    cfg.defrost()
    y = cfg.MODEL.YOLACT
    y.ANCHOR_SCALES, y.ANCHOR_ASPECT_RATIOS = stored["anchor_scales"], stored["anchor_aspect_ratios"]
    y.SQUARE_ANCHORS, y.FIT_PRIORS = stored["square_anchors"], False
    cfg.freeze()
    return cfg


def adopt_checkpoint_metadata(cfg, model, meta: Dict, source: str):
    """:func:`adopt_input_format` then :func:`adopt_priors`: ``cfg`` (or a frozen copy) and ``model``
    as the checkpoint's model was trained, for every loader (evaluation, the predictor, export)."""
    return adopt_priors(adopt_input_format(cfg, model, meta, source), model, meta, source)


def check_checkpoint_classes(meta: Dict, dataset_names, source: str) -> None:
    """Before evaluating a checkpoint on ``dataset_names``: compare their classes with the names
    stored in the checkpoint (``meta`` from :func:`checkpoint_metadata`).

    A dataset without ``thing_classes`` gets the checkpoint's; one with the same count but other
    names gets one warning. Nothing happens for a checkpoint without names.

    Raises:
        DatasetError: a dataset whose class count differs from the checkpoint's (its scores would be
            read as other classes), one line naming both.
    """
    from detectron2.data import MetadataCatalog

    from .errors import DatasetError

    stored = meta.get("class_names")
    if not stored:
        return
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        names = metadata.get("thing_classes", None)
        if names is None:
            metadata.set(thing_classes=list(stored))
            logger.info(f"dataset {name} names no classes: using the checkpoint's {_short(stored)}")
        elif len(names) != len(stored):
            raise DatasetError(
                f"dataset {name} has {len(names)} classes {_short(names)} but {source} was trained on "
                f"{len(stored)} {_short(stored)}; evaluate it on a dataset of its classes"
            )
        elif list(names) != list(stored):
            logger.warning(f"dataset {name} names its classes {_short(names)}, {source} {_short(stored)}; "
                           "evaluating by class index")


def load_for_evaluation(model, cfg, weights: str, save_dir: str = "", resume: bool = False):
    """Load ``weights`` into ``model`` for evaluation on ``cfg.DATASETS.TEST``, as
    ``train_net.py --eval-only`` does: :func:`yolact_d2.checkpointer.load_weights` (safe and strict;
    with ``resume`` the last checkpoint of ``save_dir`` wins), then the names and input format stored
    in the checkpoint (:func:`checkpoint_metadata`, :func:`adopt_checkpoint_metadata`: input format
    and priors, :func:`check_checkpoint_classes`).

    Returns:
        ``cfg``, or a copy with the checkpoint's input format, normalisation and priors.
    Raises:
        What loading raises (CheckpointLayoutError, UnsafeCheckpointError, ...); DatasetError: a
            TEST set of another class count than the checkpoint's.
    """
    from .checkpointer import load_weights

    loaded = load_weights(model, weights, save_dir=save_dir, resume=resume)
    source = loaded.path or "the checkpoint"
    meta = checkpoint_metadata(loaded.extra)
    if loaded.path:  # random weights have no priors to adopt
        cfg = adopt_checkpoint_metadata(cfg, model, meta, source)
    check_checkpoint_classes(meta, cfg.DATASETS.TEST, source)
    return cfg
