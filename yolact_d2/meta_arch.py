"""The YOLACT / YOLACT++ meta-architecture, registered as ``META_ARCHITECTURE: "YOLACT"``."""
import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, Instances

from .checkpoint import upgrade_state_dict
from .diagnostics import TrainingDiagnostics
from .config import detections_per_image
from .errors import ConfigError
from .fast_nms import multiclass_nms
from .head import YolactHead, xavier_init_convs
from .losses import SIGMOID_CLASS_LOSSES, YolactLoss
from .mask_rescoring import FastMaskIoUNet
from .mask_assembly import assemble_masks, crop_masks, upsample_masks
from .priors import PriorGenerator, build_box_coder, priors_to_boxes, to_pixel_boxes
from .protonet import ProtoNet

__all__ = ["YOLACT", "NetworkOutputs"]


class NetworkOutputs(NamedTuple):
    """What :meth:`YOLACT._network` returns for N images of S x S (A priors over all levels).

    box_deltas (N, A, 4), class_logits (N, A, C + 1) background last, mask_coeffs (N, A, k) in
    [-1, 1], prototypes (N, h, w, k) on P3's grid, proto_features (N, 256, h, w) (P3, the
    semantic head's input), level_features: one (N, 256, h_l, w_l) map per head level.
    """

    box_deltas: torch.Tensor
    class_logits: torch.Tensor
    mask_coeffs: torch.Tensor
    prototypes: torch.Tensor
    proto_features: torch.Tensor
    level_features: List[torch.Tensor]


@META_ARCH_REGISTRY.register()
class YOLACT(nn.Module):
    """YOLACT (Bolya et al., ICCV 2019) and YOLACT++ (TPAMI 2020) inside detectron2.

    Backbone (ResNet + P3-P7 FPN, ``MODEL.BACKBONE.NAME``), a protonet on P3 making k prototypes,
    one prediction head shared across levels (class scores, box deltas, k tanh coefficients per
    prior), Fast NMS, and masks assembled as sigmoid(P C^T), cropped to their boxes. YOLACT++ adds
    deformable backbone blocks, 3 scales per level and the fast mask re-scoring net.

    Inputs follow detectron2: a list of dicts with ``image`` (3, H, W) in ``INPUT.FORMAT``, 0-255,
    optional ``height``/``width`` (output size, default the image's), and in training
    ``instances`` (``gt_boxes`` in pixels of ``image``, ``gt_classes`` 0-based, ``gt_masks``).
    Images are normalised, then resized to ``MODEL.YOLACT.INPUT_SIZE`` squared (bilinear,
    align_corners=False, aspect not kept) on the model's device, as the original's
    ``FastBaseTransform``; the resize is skipped when the image already has that size.

    Inference returns ``[{"instances": Instances}]`` at (height, width) with ``pred_boxes``
    (pixels, float), ``scores`` (class confidence in [0, 1]), ``pred_classes`` (0-based) and
    ``pred_masks`` (bool, height x width); with mask re-scoring also ``mask_scores``.
    Original-layout checkpoints (``dbolya/yolact``) and torchvision ResNet checkpoints are
    converted when loaded (see :mod:`yolact_d2.checkpoint`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: YolactHead,
        protonet: ProtoNet,
        sem_seg_head: nn.Module,
        prior_generator: PriorGenerator,
        box_coder,
        criterion,
        num_classes: int,
        input_size: int,
        in_features: List[str],
        protonet_in_feature: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        mask_rescoring: Optional[FastMaskIoUNet] = None,
        diagnostics: Optional[TrainingDiagnostics] = None,
        score_thresh: float = 0.05,
        nms_type: str = "fast",
        nms_class_agnostic: bool = False,
        nms_thresh: float = 0.5,
        nms_top_k: int = 200,
        max_detections: int = 100,
        mask_threshold: float = 0.5,
        class_loss: str = "ohem",
        non_original_options: Optional[Dict[str, str]] = None,
        compile_mode: str = "",
        channels_last: bool = False,
    ):
        """Built from a config (``YOLACT(cfg)``, as ``build_model`` does, through
        :meth:`from_config`) or from its parts, as detectron2's ``RetinaNet``.

        Args:
            backbone: a detectron2 ``Backbone`` whose ``output_shape()`` has ``in_features`` and
                ``protonet_in_feature``; head, protonet, sem_seg_head (a 1x1 conv P3 -> C,
                training only), prior_generator, box_coder (``Box2BoxTransform``), criterion
                (``YolactLoss``-like callable), mask_rescoring (YOLACT++), diagnostics: the parts,
                used as given (their weights are not re-initialised here).
            num_classes: C; input_size: S, the square input side in pixels.
            pixel_mean, pixel_std: per input channel, 0-255 units.
            score_thresh, nms_type ("fast", "cluster", "standard"), nms_class_agnostic,
            nms_thresh, nms_top_k, max_detections, mask_threshold: detection settings (see
                ``add_yolact_config``); class_loss: "ohem" (softmax scores), "sigmoid_focal" or
                "quality_focal" (sigmoid scores).
            non_original_options: options that make an original checkpoint unusable (refused on load).
            compile_mode: ``torch.compile`` mode of the inference network ("" = eager);
            channels_last: run the convolutions in channels-last memory format.

        Raises:
            ConfigError: an unknown nms_type or class_loss, features the backbone lacks, or
                pixel_mean and pixel_std of different lengths.
        """
        super().__init__()
        if nms_type not in ("fast", "cluster", "standard"):
            raise ConfigError(f"MODEL.YOLACT.NMS_TYPE is {nms_type!r}; use 'fast', 'cluster' or 'standard'")
        if class_loss not in ("ohem",) + SIGMOID_CLASS_LOSSES:
            raise ConfigError(
                f"MODEL.YOLACT.CLASS_LOSS is {class_loss!r}; use 'ohem', 'sigmoid_focal' or 'quality_focal'"
            )
        if len(pixel_mean) != len(pixel_std):
            raise ConfigError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
        self.num_classes = num_classes
        self.input_size = input_size
        self.in_features = list(in_features)
        self.protonet_in_feature = protonet_in_feature
        self.score_thresh = score_thresh
        self.nms_type = nms_type
        self.nms_class_agnostic = nms_class_agnostic
        self.nms_thresh = nms_thresh
        self.nms_top_k = nms_top_k
        self.max_detections = max_detections
        self.mask_threshold = mask_threshold
        self.class_loss = class_loss
        self.backbone = backbone
        self.prior_generator = prior_generator
        self.head = head
        self.protonet = protonet
        self.non_original_options = dict(non_original_options or {})
        self.sem_seg_head = sem_seg_head
        self.box_coder = box_coder
        self.mask_rescoring = mask_rescoring
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.criterion = criterion
        self.diagnostics = diagnostics
        self.register_load_state_dict_pre_hook(upgrade_state_dict)
        self.compile_mode = compile_mode
        self._compiled = None
        self.channels_last = channels_last
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # 4-D weights only; loading keeps the format

    @classmethod
    def from_config(cls, cfg) -> Dict:
        """The constructor's arguments from ``MODEL.YOLACT.*`` and the detectron2 keys it uses.

        Builds and initialises the parts in the original's order (backbone, head with its Xavier
        init, protonet, semantic segmentation head, re-scoring net, then the original
        ``init_weights`` on FPN, protonet, semantic head and re-scoring net, then the focal-loss
        bias): with the same seed the same random numbers land in the same weights.

        Raises:
            ConfigError: features the backbone lacks, ANCHOR_SCALES levels != IN_FEATURES, and what
                the parts refuse (norms, deformable options, NMS type, class loss).
        """
        y = cfg.MODEL.YOLACT
        in_features = list(y.IN_FEATURES)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in in_features + [y.PROTONET_IN_FEATURE] if f not in shapes]
        if missing:
            raise ConfigError(f"MODEL.YOLACT features {missing} are not produced by the backbone ({list(shapes)})")
        prior_generator = PriorGenerator(y.ANCHOR_SCALES, y.ANCHOR_ASPECT_RATIOS, y.INPUT_SIZE, y.SQUARE_ANCHORS)
        if len(y.ANCHOR_SCALES) != len(in_features):
            raise ConfigError(
                f"MODEL.YOLACT.ANCHOR_SCALES has {len(y.ANCHOR_SCALES)} levels, IN_FEATURES {len(in_features)}"
            )
        head = YolactHead(
            shapes[in_features[0]].channels, prior_generator.num_priors_per_location, y.NUM_CLASSES,
            y.NUM_PROTOTYPES, norm=y.HEAD_NORM,
        )
        proto_channels = shapes[y.PROTONET_IN_FEATURE].channels
        protonet = ProtoNet(proto_channels, y.NUM_PROTOTYPES, norm=y.PROTONET_NORM,
                            prototype_activation=y.PROTOTYPE_ACTIVATION)
        # Auxiliary semantic segmentation on P3 (paper Sec. 3.5), used by the training loss only.
        sem_seg_head = nn.Conv2d(proto_channels, y.NUM_CLASSES, 1)
        mask_rescoring = FastMaskIoUNet(y.NUM_CLASSES) if y.MASK_RESCORING.ENABLED else None
        # The original's init_weights: Xavier for every non-backbone conv, the re-scoring net's too.
        fpn_convs = [m for n, m in backbone.named_modules() if not n.startswith("bottom_up")]
        rescoring = list(mask_rescoring.modules()) if mask_rescoring is not None else []
        xavier_init_convs(fpn_convs + list(protonet.modules()) + [sem_seg_head] + rescoring)
        if y.CLASS_LOSS in SIGMOID_CLASS_LOSSES:
            head.init_focal_bias(y.FOCAL_LOSS_PRIOR_PROB)
        d = y.DIAGNOSTICS
        return {
            "backbone": backbone,
            "head": head,
            "protonet": protonet,
            "sem_seg_head": sem_seg_head,
            "prior_generator": prior_generator,
            "box_coder": build_box_coder(y.BBOX_REG_WEIGHTS),
            "criterion": YolactLoss(cfg),
            "num_classes": y.NUM_CLASSES,
            "input_size": y.INPUT_SIZE,
            "in_features": in_features,
            "protonet_in_feature": y.PROTONET_IN_FEATURE,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "mask_rescoring": mask_rescoring,
            "diagnostics": TrainingDiagnostics(d.WARN_WINDOW, d.DEAD_SHARE_WARN, d.FORCED_ONLY_WARN) if d.ENABLED else None,
            "score_thresh": y.SCORE_THRESH_TEST,
            "nms_type": y.NMS_TYPE,
            "nms_class_agnostic": y.NMS_CLASS_AGNOSTIC,
            "nms_thresh": y.NMS_THRESH_TEST,
            "nms_top_k": y.NMS_TOP_K,
            "max_detections": detections_per_image(cfg),
            "mask_threshold": y.MASK_THRESHOLD,
            "class_loss": y.CLASS_LOSS,
            # Options that add parameters the published models lack: an original checkpoint is refused.
            "non_original_options": {k: v for k, v in (
                ("MODEL.FPN.NORM", cfg.MODEL.FPN.NORM),
                ("MODEL.YOLACT.HEAD_NORM", y.HEAD_NORM),
                ("MODEL.YOLACT.PROTONET_NORM", y.PROTONET_NORM),
            ) if v},
            "compile_mode": y.COMPILE,
            "channels_last": y.CHANNELS_LAST,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """Normalise and resize each ``image`` to (3, S, S), S = INPUT_SIZE; returns (N, 3, S, S).

        Raises:
            ValueError: an image that is not a (C, H, W) tensor with C = len(MODEL.PIXEL_MEAN).
        """
        out = []
        s = self.input_size
        for x in batched_inputs:
            img = x["image"]
            if not torch.is_tensor(img) or img.dim() != 3 or img.shape[0] != self.pixel_mean.shape[0]:
                shape = tuple(img.shape) if hasattr(img, "shape") else type(img).__name__
                raise ValueError(
                    f"YOLACT expects each 'image' as a ({self.pixel_mean.shape[0]}, H, W) tensor, got {shape}"
                )
            img = (img.to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
            if img.shape[-2:] != (s, s):
                img = F.interpolate(img[None], size=(s, s), mode="bilinear", align_corners=False)[0]
            out.append(img)
        images = torch.stack(out)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    # ------------------------------------------------------------------ network
    def _network(self, images: torch.Tensor) -> "NetworkOutputs":
        # Tensors only (no Python caches), so that torch.compile can capture it whole.
        features = self.backbone(images)
        level_features = [features[f] for f in self.in_features]
        box_deltas, class_logits, mask_coeffs = self.head(level_features)
        proto_features = features[self.protonet_in_feature]
        return NetworkOutputs(box_deltas, class_logits, mask_coeffs, self.protonet(proto_features), proto_features,
                              level_features)

    def _forward_network(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        network = self._network
        if self.compile_mode and not self.training:
            if self._compiled is None:
                self._compiled = torch.compile(self._network, mode=self.compile_mode)
            network = self._compiled
        out = network(images)
        sizes = [tuple(int(v) for v in f.shape[-2:]) for f in out.level_features]
        return {
            "level_features": dict(zip(self.in_features, out.level_features)),
            "box_deltas": out.box_deltas,
            "class_logits": out.class_logits,
            "mask_coeffs": out.mask_coeffs,
            "priors": self.prior_generator(sizes, images.device),
            "prototypes": out.prototypes,
            "proto_features": out.proto_features,
        }

    def class_scores(self, class_logits: torch.Tensor) -> torch.Tensor:
        """Class confidences from the head's logits, the one place scores are made.

        Args:
            class_logits: (..., C + 1) logits, background last.
        Returns:
            (..., C + 1) in [0, 1]. ``CLASS_LOSS`` "ohem": softmax over the C + 1 classes (the
            paper). "sigmoid_focal": an independent sigmoid per class, as the original with
            ``use_sigmoid_focal_loss``, and "quality_focal"; the background column is then untrained and
            unused.
        """
        if self.class_loss in SIGMOID_CLASS_LOSSES:
            return torch.sigmoid(class_logits)
        return F.softmax(class_logits, dim=-1)

    def forward_raw(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The network's outputs before detection.

        Args:
            images: (N, 3, H, W) normalised float images (550 x 550 for the published models).
        Returns:
            dict with ``box_deltas`` (N, A, 4) SSD-coded (variances 0.1, 0.2); ``class_scores``
            (N, A, C + 1) from :meth:`class_scores` (softmax, or sigmoid with the focal loss),
            background LAST; ``mask_coeffs`` (N, A, k) in [-1, 1];
            ``priors`` (A, 4) (cx, cy, w, h) relative to the input; ``prototypes`` (N, h, w, k)
            (138 x 138 x 32 at 550). A = 19248 for v1 at 550, 57744 for YOLACT++.
        """
        out = self._forward_network(images)
        return {
            "box_deltas": out["box_deltas"],
            "class_scores": self.class_scores(out["class_logits"]),
            "mask_coeffs": out["mask_coeffs"],
            "priors": out["priors"],
            "prototypes": out["prototypes"],
        }

    def forward(self, batched_inputs: List[Dict]):
        """Training: a dict of losses (``loss_cls``, ``loss_box_reg``, ``loss_mask``,
        ``loss_sem_seg``, and ``loss_mask_iou`` with re-scoring); with MODEL.YOLACT.DIAGNOSTICS
        on, the step's diagnostics go to the event storage (:mod:`yolact_d2.diagnostics`).
        Inference: see :meth:`inference`."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("YOLACT training inputs need 'instances' (use YolactDatasetMapper)")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        crowd_boxes = [x.get("crowd_boxes") for x in batched_inputs]
        out = self._forward_network(images)
        sem_seg_logits = self.sem_seg_head(out["proto_features"])
        stats = {} if self.diagnostics is not None else None
        losses = self.criterion(out, sem_seg_logits, gt_instances, crowd_boxes, self.mask_rescoring, stats=stats)
        if stats:  # empty when a replaced criterion ignores it
            self.diagnostics(out["level_features"], out["prototypes"], stats)
        return losses

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def inference(self, batched_inputs: List[Dict], clock=None) -> List[Dict[str, Instances]]:
        """Detections per image: ``[{"instances": Instances}]`` (see the class docstring).

        ``clock``: optional ``clock(stage_name)`` context-manager factory, passed to :meth:`detect`;
        ``yolact_d2.benchmarking`` times the post-processing of this very call with it.
        """
        clock = clock or _untimed
        images = self.preprocess_image(batched_inputs)
        out = self._forward_network(images)
        with clock("priors_scores"):
            scores = self.class_scores(out["class_logits"])
            prior_boxes = priors_to_boxes(out["priors"])
        results = []
        for i, x in enumerate(batched_inputs):
            height = int(x.get("height", x["image"].shape[-2]))
            width = int(x.get("width", x["image"].shape[-1]))
            results.append({"instances": self.detect(
                out["box_deltas"][i], scores[i], out["mask_coeffs"][i], out["prototypes"][i],
                prior_boxes, height, width, clock=clock,
            )})
        return results

    def decode_candidates(self, box_deltas, class_scores, prior_boxes):
        """Box decoding + score filter of one image: priors whose best foreground score is above
        SCORE_THRESH_TEST. Returns ``(index (M,), boxes (M, 4) relative x0y0x1y1, scores (M, C))``."""
        fg = class_scores[:, : self.num_classes]
        cand = (fg.max(dim=1).values > self.score_thresh).nonzero().squeeze(1)
        return cand, self.box_coder.apply_deltas(box_deltas[cand], prior_boxes[cand]), fg[cand]

    def detect(self, box_deltas, class_scores, mask_coeffs, prototypes, prior_boxes, height, width, clock=None) -> Instances:
        """Detections of one image from its raw outputs (original ``Detect`` + ``postprocess``).

        Args:
            box_deltas: (A, 4); class_scores: (A, C + 1) from :meth:`class_scores`, background last;
            mask_coeffs: (A, k); prototypes: (h, w, k); prior_boxes: (A, 4) relative (x0, y0, x1, y1).
            height, width: output image size in pixels.
            clock: optional ``clock(stage_name)`` context-manager factory; ``yolact_d2.benchmarking``
                times the stages of this very code with it.
        Returns:
            ``Instances`` of at most DETECTIONS_PER_IMAGE detections, highest score first.
        """
        clock = clock or _untimed
        with clock("box_decode"):
            cand, boxes, fg = self.decode_candidates(box_deltas, class_scores, prior_boxes)
        with clock("nms"):
            idx, classes, scores = multiclass_nms(
                boxes, fg, self.nms_thresh, self.nms_top_k, self.max_detections,
                method=self.nms_type, class_agnostic=self.nms_class_agnostic,
            )
            boxes = boxes[idx]
        with clock("mask"):
            masks = crop_masks(assemble_masks(prototypes, mask_coeffs[cand[idx]]), boxes)
        result = Instances((height, width))
        if self.mask_rescoring is not None:
            with clock("rescoring"):
                result.mask_scores = scores * self.mask_rescoring.predict_iou(masks, classes)
        with clock("output"):
            result.pred_boxes = Boxes(to_pixel_boxes(boxes, height, width))
            result.scores = scores
            result.pred_classes = classes
        with clock("mask"):
            result.pred_masks = upsample_masks(masks, height, width, self.mask_threshold)
        return result


def _untimed(stage: str):
    return contextlib.nullcontext()
