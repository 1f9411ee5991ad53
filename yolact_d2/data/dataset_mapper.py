"""Dataset mapper turning detectron2 dataset dicts into YOLACT training / test inputs."""
import copy
import logging
from typing import List, Optional

import numpy as np
import pycocotools.mask as mask_util
import torch

import detectron2.data.detection_utils as utils
import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.structures import BitMasks, BoxMode, Boxes, PolygonMasks

from .augmentations import build_yolact_train_augmentation
from ..errors import ConfigError, DatasetError, MissingFileError

__all__ = ["YolactDatasetMapper", "check_annotations", "check_dataset_classes", "drop_degenerate_annotations"]

logger = logging.getLogger(__name__)


def check_annotations(annos: List[dict], file_name: str, mask_format: str) -> None:
    """Fail early, with the fix in the message, on masks that ``mask_format`` cannot hold.

    Used per image by :class:`YolactDatasetMapper` and over a whole dataset by ``train_net.py``
    before training starts.

    Raises:
        DatasetError: a non-crowd annotation without "segmentation", an RLE mask with
            ``mask_format`` "polygon", or a segmentation that is neither polygons nor RLE;
            the message names ``file_name``.
    """
    for i, obj in enumerate(annos):
        if obj.get("iscrowd", 0):
            continue  # crowd masks are not used
        segm = obj.get("segmentation")
        if segm is None:
            raise DatasetError(
                f"{file_name}: annotation {i} has no 'segmentation'; YOLACT needs instance "
                "masks for every non-crowd object."
            )
        if isinstance(segm, dict):
            if mask_format == "polygon":
                raise DatasetError(
                    f"{file_name}: annotation {i} has an RLE mask but INPUT.MASK_FORMAT is "
                    '"polygon"; set INPUT.MASK_FORMAT: "bitmask" in the config (or pass '
                    "INPUT.MASK_FORMAT bitmask on the command line) to train on RLE masks."
                )
        elif not isinstance(segm, list):
            raise DatasetError(
                f"{file_name}: annotation {i} has a segmentation of type "
                f"{type(segm).__name__}; expected polygons (list) or COCO RLE (dict)."
            )


def check_dataset_classes(dataset_dicts: List[dict], dataset_names, thing_classes, num_classes: int, key: str) -> None:
    """Fail before training when the model's class count does not fit the data.

    Args:
        dataset_dicts: detectron2 dataset dicts (``category_id`` 0-based, as detectron2's loaders give).
        dataset_names: the datasets' names, for the message.
        thing_classes: the datasets' class names from their metadata, or None when they have none.
        num_classes: the model's foreground class count C; ``key`` is its config key.
    Raises:
        DatasetError: C differs from ``len(thing_classes)``, or an annotation's ``category_id`` lies
            outside [0, C) (the message names the image and the fix).
    """
    names = ", ".join(dataset_names)
    if thing_classes is not None and len(thing_classes) != num_classes:
        shown = ", ".join(thing_classes[:10]) + (", ..." if len(thing_classes) > 10 else "")
        raise DatasetError(
            f"dataset {names} has {len(thing_classes)} classes ({shown}) but {key} is {num_classes}; "
            f"set {key} {len(thing_classes)}"
        )
    for d in dataset_dicts:
        for obj in d.get("annotations", []):
            c = obj.get("category_id")
            if not isinstance(c, (int, np.integer)) or not 0 <= c < num_classes:
                raise DatasetError(
                    f"{d['file_name']} (dataset {names}): category_id {c} is outside [0, {num_classes}) of "
                    f"{key}; fix the annotation or set {key} to the dataset's class count"
                )


def _degenerate(obj: dict) -> bool:
    # A non-crowd annotation that cannot train: zero-area box, or a mask without any pixel.
    box = BoxMode.convert(list(obj["bbox"]), obj["bbox_mode"], BoxMode.XYXY_ABS)
    if box[2] <= box[0] or box[3] <= box[1]:
        return True
    segm = obj.get("segmentation")
    if isinstance(segm, list):
        return not any(len(p) >= 6 for p in segm)  # a polygon needs 3 points
    if isinstance(segm, dict):
        rle = mask_util.frPyObjects(segm, *segm["size"]) if isinstance(segm.get("counts"), list) else segm
        return int(mask_util.area(rle)) == 0
    return False


def drop_degenerate_annotations(dataset_dicts: List[dict], dataset_names) -> List[dict]:
    """Copies of the dicts without the non-crowd annotations that cannot train (zero-area box, or a
    mask with no pixel); the count dropped is logged with an example image.

    Raises:
        DatasetError: no image keeps a usable (non-crowd, non-degenerate) instance, naming the datasets.
    """
    names = ", ".join(dataset_names)
    out, dropped, example = [], 0, None
    for d in dataset_dicts:
        annos = d.get("annotations", [])
        keep = [o for o in annos if o.get("iscrowd", 0) or not _degenerate(o)]
        if len(keep) != len(annos):
            dropped += len(annos) - len(keep)
            example = example or d["file_name"]
            d = dict(d, annotations=keep)
        out.append(d)
    if dropped:
        logger.warning(
            f"dataset {names}: dropped {dropped} degenerate instance(s) (zero-area box or empty mask), "
            f"e.g. in {example}"
        )
    if not any(not o.get("iscrowd", 0) for d in out for o in d.get("annotations", [])):
        raise DatasetError(
            f"dataset {names} has no usable instance ({len(out)} images; every annotation is a crowd region, "
            "degenerate or absent): check its annotations and category ids"
        )
    return out


def _xyxy(annos: List[dict]) -> np.ndarray:
    # (N, 4) float32 XYXY_ABS boxes of detectron2 annotations, N >= 0.
    if not annos:
        return np.zeros((0, 4), dtype=np.float32)
    return np.stack([BoxMode.convert(o["bbox"], o["bbox_mode"], BoxMode.XYXY_ABS) for o in annos]).astype(np.float32)


class YolactDatasetMapper:
    """Callable mapping one detectron2 dataset dict to a model input dict, like ``DatasetMapper``.

    Training (``is_train=True``), following the original ``SSDAugmentation`` + ``COCODetection``:

    1. read the image in ``image_format`` and check its size against the dict's height/width;
    2. run ``augmentations`` (default: :func:`build_yolact_train_augmentation`) on the image and
       the XYXY boxes of the non-crowd annotations;
    3. drop every annotation (crowd or not) whose box centre falls outside the final image, i.e.
       outside the crop window (original ``RandomSampleCrop`` rule);
    4. transform boxes, polygons and RLE masks with ``utils.transform_instance_annotations`` and
       build ``Instances`` with ``utils.annotations_to_instances``;
    5. if ``recompute_boxes``, replace each box by the tight box of its (cropped) mask, so that the
       box and mask of an object partly cut by the crop still agree;
    6. drop empty instances (``utils.filter_empty_instances``) and those narrower or shorter than
       ``min_box_size`` pixels (original ``discard_box_width/height``).

    Output dict (input keys other than "annotations" are kept):

    * "image": uint8 tensor 3xHxW in ``image_format`` channel order; H = W = INPUT_SIZE in training
      with the default augmentations, the original size in test mode.
    * "height", "width": size of the original image in pixels (for detectron2's postprocess).
    * "instances" (training only): ``Instances`` of the augmented image with "gt_boxes" (Boxes,
      XYXY absolute pixels of the augmented image), "gt_classes" (int64, the dict's
      "category_id"), "gt_masks" (``PolygonMasks`` for mask_format "polygon", ``BitMasks`` NxHxW
      bool for "bitmask"); possibly 0 instances (e.g. all objects cropped away), never an error.
    * "crowd_boxes" (training only): ``Boxes`` (Kx4, K >= 0) of the iscrowd=1 annotations, same
      coordinates, filtered like the instances; kept out of "instances" because the original
      uses them only to ignore priors in the loss.

    Test mode (``is_train=False``): the image only, not resized (the model resizes to INPUT_SIZE
    itself); annotations are dropped.

    In training an image that exists but cannot be decoded (truncated, corrupt) gives None, with one
    warning per file: detectron2's ``MapDataset`` then maps another image instead.

    Raises (from ``__call__``):
        MissingFileError: the image file does not exist (message names the path).
        DatasetError: an annotation's mask does not fit ``mask_format`` (an RLE dict with
            "polygon": set INPUT.MASK_FORMAT "bitmask"), or a non-crowd annotation has no
            "segmentation"; the message names the file.
        detectron2's SizeMismatchError: image size differs from the dict's height/width.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        mask_format: str = "polygon",
        min_box_size: float = 4.0,
        recompute_boxes: bool = True,
        drop_outside_centers: bool = True,
    ):
        """
        Args:
            is_train: training (augment, return instances) or test mode (image only).
            augmentations: ``Augmentation``/``Transform`` list, used in training only.
            image_format: format for ``read_image`` (cfg.INPUT.FORMAT), e.g. "RGB" or "BGR".
            mask_format: "polygon" or "bitmask" (cfg.INPUT.MASK_FORMAT).
            min_box_size: instances (and crowd boxes) with a side below this, in pixels of the
                augmented image, are dropped (cfg.INPUT.SSD.MIN_BOX_SIZE).
            recompute_boxes: set gt boxes to the tight boxes of the augmented masks.
            drop_outside_centers: drop objects whose box centre leaves the augmented image.
        """
        if mask_format not in ("polygon", "bitmask"):
            raise ConfigError(
                f"INPUT.MASK_FORMAT must be 'polygon' or 'bitmask', got {mask_format!r}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.mask_format = mask_format
        self.min_box_size = float(min_box_size)
        self.recompute_boxes = recompute_boxes
        self.drop_outside_centers = drop_outside_centers
        self._unreadable = set()  # training images that failed to decode, warned about once each
        mode = "training" if is_train else "inference"
        logger.info(f"[YolactDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_yolact_train_augmentation(cfg) if is_train else [],
            "image_format": cfg.INPUT.FORMAT,
            "mask_format": cfg.INPUT.MASK_FORMAT,
            "min_box_size": cfg.INPUT.SSD.MIN_BOX_SIZE,
        }

    # ------------------------------------------------------------------------------------------
    def _read_image(self, file_name: str) -> np.ndarray:
        try:
            return utils.read_image(file_name, format=self.image_format)
        except FileNotFoundError as e:
            raise MissingFileError(
                f"YolactDatasetMapper: image file not found: {file_name} "
                "(check the dataset's image_root / file_name)"
            ) from e

    @staticmethod
    def _center_inside(boxes: np.ndarray, transforms, image_shape) -> np.ndarray:
        """Bool per (N, 4) XYXY box of the input image: its centre, transformed, lies strictly inside."""
        if len(boxes) == 0:
            return np.zeros(0, dtype=bool)
        # Every transform here maps axis-aligned boxes to axis-aligned boxes affinely, so the
        # centre of the transformed box is the transformed centre.
        centers = transforms.apply_coords((boxes[:, :2] + boxes[:, 2:]) / 2.0)
        h, w = image_shape
        return (
            (centers[:, 0] > 0) & (centers[:, 0] < w) & (centers[:, 1] > 0) & (centers[:, 1] < h)
        )

    def _size_keep(self, boxes: torch.Tensor) -> torch.Tensor:
        wh = boxes[:, 2:] - boxes[:, :2]
        return (wh >= self.min_box_size).all(dim=1)

    # ------------------------------------------------------------------------------------------
    def __call__(self, dataset_dict: dict) -> dict:
        """Map one dataset dict (not modified) to a new dict; see the class docstring."""
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        annos = dataset_dict.pop("annotations", None) or []
        if self.is_train:
            check_annotations(annos, file_name, self.mask_format)

        try:
            image = self._read_image(file_name)
        except MissingFileError:
            raise
        except OSError as e:  # truncated or corrupt: PIL's OSError / UnidentifiedImageError
            if not self.is_train:
                raise
            # Safety net behind the dataset check (a file changed since, or a fault only a full
            # decode finds): detectron2's MapDataset retries another image when the mapper gives None.
            if file_name not in self._unreadable:
                self._unreadable.add(file_name)
                logger.warning(f"cannot read training image {file_name} ({type(e).__name__}: {e}); skipping it")
            return None
        utils.check_image_size(dataset_dict, image)
        dataset_dict.setdefault("height", image.shape[0])
        dataset_dict.setdefault("width", image.shape[1])
        dataset_dict.pop("sem_seg_file_name", None)

        if not self.is_train:
            dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            return dataset_dict

        gt_annos = [obj for obj in annos if not obj.get("iscrowd", 0)]
        crowd_annos = [obj for obj in annos if obj.get("iscrowd", 0)]
        gt_boxes, crowd_boxes = _xyxy(gt_annos), _xyxy(crowd_annos)
        aug_input = T.AugInput(image, boxes=gt_boxes if len(gt_boxes) else None, sem_seg=None)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w

        if self.drop_outside_centers:
            keep = self._center_inside(gt_boxes, transforms, image_shape)
            gt_annos = [o for o, k in zip(gt_annos, keep) if k]
            keep = self._center_inside(crowd_boxes, transforms, image_shape)
            crowd_boxes = crowd_boxes[keep]

        instances = self._build_instances(gt_annos, transforms, image_shape)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["instances"] = instances
        dataset_dict["crowd_boxes"] = self._crowd_boxes(crowd_boxes, transforms, image_shape)
        return dataset_dict

    def _build_instances(self, annos: List[dict], transforms, image_shape):
        h, w = image_shape
        out = []
        for obj in annos:
            obj = dict(obj)
            segm = obj["segmentation"]
            if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
                # Uncompressed RLE: pycocotools decodes only the compressed form.
                obj["segmentation"] = mask_util.frPyObjects(segm, *segm["size"])
            obj.pop("keypoints", None)  # YOLACT has no keypoints; avoids needing flip indices
            obj = utils.transform_instance_annotations(obj, transforms, image_shape)
            segm = obj["segmentation"]
            if isinstance(segm, list) and len(segm) == 0:
                continue  # every polygon was cropped away
            if isinstance(segm, np.ndarray) and not segm.flags.writeable:
                # PIL-resized masks are read-only views; torch warns on those.
                obj["segmentation"] = segm.copy()
            out.append(obj)

        instances = utils.annotations_to_instances(out, image_shape, mask_format=self.mask_format)
        if not instances.has("gt_masks"):  # no annotation left: keep the field, with 0 masks
            if self.mask_format == "polygon":
                instances.gt_masks = PolygonMasks([])
            else:
                instances.gt_masks = BitMasks(torch.zeros((0, h, w), dtype=torch.bool))
        if self.recompute_boxes and len(instances):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
            # Polygons may touch the border with sub-pixel overshoot after the resize.
            instances.gt_boxes.clip(image_shape)
        instances = utils.filter_empty_instances(instances)
        return instances[self._size_keep(instances.gt_boxes.tensor)]

    def _crowd_boxes(self, boxes: np.ndarray, transforms, image_shape) -> Boxes:
        # (K, 4) XYXY boxes of the input image -> Boxes of the augmented image, filtered.
        if len(boxes) == 0:
            return Boxes(torch.zeros((0, 4), dtype=torch.float32))
        boxes = Boxes(torch.as_tensor(transforms.apply_box(boxes), dtype=torch.float32))
        boxes.clip(image_shape)
        keep = boxes.nonempty() & self._size_keep(boxes.tensor)
        return boxes[keep]
