"""End-to-end inference on numpy images: :class:`YolactPredictor`, YOLACT's ``DefaultPredictor``.

Example::

    from detectron2.config import get_cfg
    from yolact_d2 import add_yolact_config
    from yolact_d2.predictor import YolactPredictor

    cfg = get_cfg()
    add_yolact_config(cfg)
    cfg.merge_from_file("configs/yolact_R_50_FPN_550.yaml")
    cfg.MODEL.WEIGHTS = "yolact_resnet50_54_800000.pth"  # original layout is converted on load
    cfg.MODEL.DEVICE = "cpu"
    predictor = YolactPredictor(cfg)
    instances = predictor(cv2.imread("input.jpg"))["instances"]
"""
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from .checkpoint import adopt_checkpoint_metadata, checkpoint_metadata
from .checkpointer import load_weights
from .data.datasets import register_builtin_datasets
from .device import resolve_device
from .errors import ConfigError

__all__ = ["YolactPredictor", "resolve_metadata", "check_class_names"]

logger = logging.getLogger(__name__)

def _one_line(text: str, limit: int = 300) -> str:
    """First line of ``text``, cut to ``limit`` characters (for error messages of one line)."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """Check one image and return it as (H, W, 3) uint8 BGR (grey replicated, alpha dropped)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image as a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (0-255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]  # BGRA as cv2.IMREAD_UNCHANGED gives it: alpha is last
    return image


def check_class_names(cfg) -> None:
    """Raise ConfigError when ``MODEL.YOLACT.CLASS_NAMES`` is set with a length other than NUM_CLASSES."""
    names, num_classes = cfg.MODEL.YOLACT.CLASS_NAMES, cfg.MODEL.YOLACT.NUM_CLASSES
    if names and len(names) != num_classes:
        raise ConfigError(
            f"MODEL.YOLACT.CLASS_NAMES has {len(names)} names but MODEL.YOLACT.NUM_CLASSES is {num_classes}; "
            "give one name per class"
        )


def resolve_metadata(cfg, checkpoint_names: Optional[Sequence[str]] = None) -> Metadata:
    """Class names and colours for drawing and reporting, in this order of preference:

    1. ``MODEL.YOLACT.CLASS_NAMES`` when set;
    2. ``MetadataCatalog.get(cfg.DATASETS.TEST[0])`` (then the other TEST, then TRAIN datasets) when
       it names NUM_CLASSES ``thing_classes`` (a dataset of another class count is not the
       model's); one warning when ``checkpoint_names`` differ;
    3. ``checkpoint_names``, the names stored in the weights by training
       (:func:`yolact_d2.checkpoint.checkpoint_metadata`), when there are NUM_CLASSES of them;
    4. detectron2's COCO 80-class metadata when NUM_CLASSES <= 80, with one warning unless
       NUM_CLASSES is 80 (a checkpoint without names, e.g. a released or converted model);
    5. plain names "class 0", "class 1", ...

    Call it once, after the weights are read. Raises ConfigError: ``MODEL.YOLACT.CLASS_NAMES``
    with a length other than NUM_CLASSES.
    """
    num_classes = cfg.MODEL.YOLACT.NUM_CLASSES
    check_class_names(cfg)
    if cfg.MODEL.YOLACT.CLASS_NAMES:
        return Metadata(name="yolact_class_names", thing_classes=list(cfg.MODEL.YOLACT.CLASS_NAMES))
    stored = list(checkpoint_names) if checkpoint_names and len(checkpoint_names) == num_classes else None
    register_builtin_datasets()
    for dataset in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        metadata = MetadataCatalog.get(dataset)
        names = metadata.get("thing_classes", [])
        if len(names) == num_classes:
            if stored and list(names) != stored:
                logger.warning(
                    f"dataset {dataset} names the classes {_names(names)} but the checkpoint {_names(stored)}; "
                    "drawing the dataset's (set MODEL.YOLACT.CLASS_NAMES to choose)"
                )
            return metadata
    if stored:
        return Metadata(name="yolact_checkpoint_class_names", thing_classes=stored)
    coco = _get_builtin_metadata("coco")
    if num_classes <= len(coco["thing_classes"]):
        if num_classes != len(coco["thing_classes"]):
            logger.warning(
                f"no class names for this {num_classes}-class model (neither its config's datasets nor its "
                "checkpoint name them): drawing COCO's; set MODEL.YOLACT.CLASS_NAMES or DATASETS.TEST to the "
                "model's dataset"
            )
        return Metadata(name="coco_80_classes", **coco)
    return Metadata(name="yolact_demo", thing_classes=[f"class {i}" for i in range(num_classes)])


def _names(names, limit: int = 6) -> str:
    names = list(names)
    return "[" + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + "]"


class YolactPredictor:
    """Build a YOLACT model from a config, load its weights, and run it on BGR numpy images.

    Like detectron2's ``DefaultPredictor``: images come in BGR order (as ``cv2.imread`` gives
    them) and are converted to ``cfg.INPUT.FORMAT``; the model itself resizes them to
    ``MODEL.YOLACT.INPUT_SIZE`` squared, so no resize happens here unless
    ``INPUT.MIN_SIZE_TEST`` > 0 (the YOLACT configs set 0). Inference runs on
    ``cfg.MODEL.DEVICE`` under ``torch.inference_mode()``: the returned tensors are inference
    tensors (no autograd, no in-place changes outside inference mode; ``.clone()`` them first).

    Weights (``cfg.MODEL.WEIGHTS``) are loaded with ``DetectionCheckpointer``; the original
    YOLACT layout and torchvision ResNets are converted on load. Loading is strict: every model
    parameter used at inference must come from the file, so a checkpoint of another model (e.g.
    Mask R-CNN, an ImageNet backbone only, or an unrelated dict) is refused. An empty
    ``MODEL.WEIGHTS`` keeps the random initialisation and logs a warning.

    Attributes:
        cfg: a frozen copy of the config.
        model: the YOLACT ``nn.Module`` in eval mode.
        metadata: class names and colours from :func:`resolve_metadata`, resolved once after the
            weights are read (names stored in the checkpoint by training count when the config's
            datasets name none).
        checkpoint_metadata: what training stored in the weights (``class_names``,
            ``input_format``, ``pixel_mean``, ``pixel_std``, ``priors``); ``{}`` for a file without it.
            A stored input format, normalisation or priors (fitted: ``MODEL.YOLACT.FIT_PRIORS``)
            other than the config's are used instead, with a warning.

    Device: ``device`` if given (``DeviceUnavailableError`` when it is a CUDA device and there is no
    GPU), else ``cfg.MODEL.DEVICE``, where a CUDA device on a machine without one falls back to the
    CPU with one warning line (:func:`yolact_d2.device.resolve_device`).

    Raises (constructor):
        MissingFileError: ``MODEL.WEIGHTS`` names a local file that does not exist.
        DeviceUnavailableError: an explicit CUDA ``device`` without a GPU.
        CheckpointLayoutError: the file is not a readable checkpoint, its tensors do not fit the
            model's shapes, or it leaves model parameters missing; the one-line message names
            the file and how many parameters it filled, or its stored priors are another count
            per location (:func:`yolact_d2.checkpoint.adopt_priors`).
        UnsafeCheckpointError: the file asks to run code when unpickled
            (:func:`yolact_d2.checkpointer.read_checkpoint`).
        ConfigError: ``INPUT.FORMAT`` is neither "RGB" nor "BGR", or an invalid model config.
    """

    def __init__(self, cfg, device: Optional[str] = None):
        self.cfg = cfg.clone()
        self.cfg.defrost()
        self.cfg.MODEL.DEVICE = resolve_device(device or self.cfg.MODEL.DEVICE, explicit=device is not None)
        self.cfg.freeze()
        if self.cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ConfigError(f"INPUT.FORMAT is {self.cfg.INPUT.FORMAT!r}; YolactPredictor supports 'RGB' or 'BGR'")
        check_class_names(self.cfg)  # before the slow load
        self.model = build_model(self.cfg)
        self.model.eval()
        # What training stored beside the tensors: class names, input format, priors (older files: none).
        self.checkpoint_metadata = checkpoint_metadata(self._load_weights(self.cfg.MODEL.WEIGHTS))
        if self.cfg.MODEL.WEIGHTS:  # its input format and priors (random weights: the config's)
            self.cfg = adopt_checkpoint_metadata(self.cfg, self.model, self.checkpoint_metadata, self.cfg.MODEL.WEIGHTS)
        self.input_format = self.cfg.INPUT.FORMAT
        self.metadata = resolve_metadata(self.cfg, self.checkpoint_metadata.get("class_names"))
        min_size = self.cfg.INPUT.MIN_SIZE_TEST
        # The model resizes to INPUT_SIZE itself; a resize here only when a config asks for one.
        self.aug = T.ResizeShortestEdge([min_size, min_size], self.cfg.INPUT.MAX_SIZE_TEST) if min_size > 0 else None

    def _load_weights(self, path: str) -> Dict:
        """Load ``path`` into the model, strictly (:func:`yolact_d2.checkpointer.load_weights`);
        returns the checkpoint's other keys (``Checkpointer.load``)."""
        if not path:
            logger.warning(
                "MODEL.WEIGHTS is empty: the model keeps its random initialisation and its "
                "predictions are meaningless (set MODEL.WEIGHTS to a YOLACT checkpoint)"
            )
            return {}
        return load_weights(self.model, path).extra

    def _prepare(self, image: np.ndarray) -> Dict:
        image = _as_bgr(image)
        height, width = image.shape[:2]
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        if self.aug is not None:
            image = self.aug.get_transform(image).apply_image(image)
        # A copy: the caller's array may be read-only (PIL-backed) or change later. uint8 stays
        # uint8 until the model moves it to its device (4x less to copy there).
        tensor = torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))
        return {"image": tensor, "height": height, "width": width}

    def __call__(self, image: np.ndarray) -> Dict[str, Instances]:
        """Detect instances in one image.

        Args:
            image: (H, W, 3) uint8 BGR, 0-255; also (H, W) or (H, W, 1) grey (replicated to 3
                channels) and (H, W, 4) BGRA (alpha dropped). Any H, W >= 1.
        Returns:
            ``{"instances": Instances}`` at (H, W): ``pred_boxes`` (pixels, XYXY float),
            ``scores`` ([0, 1]), ``pred_classes`` (0-based int64), ``pred_masks`` (bool, N x H x W),
            on ``cfg.MODEL.DEVICE``, highest score first.
        Raises:
            TypeError: ``image`` is not a numpy array.
            ValueError: not uint8, an unsupported shape, or an empty image.
        """
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> List[Dict[str, Instances]]:
        """Detect instances in several images, run through the model as one batch.

        Args:
            images: images as accepted by :meth:`__call__`; sizes may differ (each is resized to
                INPUT_SIZE inside the model). Memory grows with the batch: split large lists.
        Returns:
            one ``{"instances": Instances}`` per image, in order (see :meth:`__call__`); ``[]``
            for an empty list.
        Raises:
            TypeError, ValueError: as :meth:`__call__`, for the first bad image (with its index).
        """
        inputs = []
        for i, image in enumerate(images):
            try:
                inputs.append(self._prepare(image))
            except (TypeError, ValueError) as e:
                raise type(e)(f"image {i}: {e}") from e
        if not inputs:
            return []
        with torch.inference_mode():
            return self.model(inputs)
