"""Your own COCO-format dataset from the config alone: ``DATASETS.TRAIN_JSON`` / ``TRAIN_IMAGES``
(and ``TEST_JSON`` / ``TEST_IMAGES``), or ``train_net.py --train-json ... --train-images ...``.

:func:`apply_coco_json_datasets` registers them with detectron2's ``register_coco_instances`` under
the names :data:`TRAIN_NAME` / :data:`TEST_NAME`, points ``DATASETS.TRAIN`` / ``DATASETS.TEST`` at
them, and takes ``MODEL.YOLACT.NUM_CLASSES`` (and ``MODEL.ROI_HEADS.NUM_CLASSES`` for detectron2's
own models) and the class names from the JSON's categories, and ``INPUT.MASK_FORMAT`` from its
masks (COCO RLE needs "bitmask"). The keys stay in the config that ``train_net.py`` saves to
``OUTPUT_DIR/config.yaml``, so the demo and evaluation given that file find the same class names.
"""
import json
import logging
from pathlib import Path
from typing import List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import ConfigError, DatasetError, MissingFileError

__all__ = ["TRAIN_NAME", "TEST_NAME", "read_coco_categories", "register_coco_json", "apply_coco_json_datasets"]

logger = logging.getLogger(__name__)

TRAIN_NAME = "coco_json_train"
TEST_NAME = "coco_json_test"


def read_coco_categories(json_file: str) -> Tuple[List[dict], bool]:
    """The ``categories`` of a COCO instances JSON (sorted by id) and whether any annotation has an
    RLE (dict) mask.

    Raises:
        MissingFileError: no such file (named).
        DatasetError: not JSON, or no ``categories`` / ``annotations`` lists (named, with the fix).
    """
    path = Path(json_file)
    if not path.is_file():
        raise MissingFileError(f"COCO JSON {json_file} not found (check DATASETS.TRAIN_JSON / TEST_JSON)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file} is not valid JSON ({e.msg} at line {e.lineno}); give a COCO instances file") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DatasetError(f"{json_file} has no 'categories' list; a COCO instances JSON names its classes there")
    if not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{json_file} has no 'annotations' list; give a COCO instances JSON with masks")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    rle = any(isinstance(a.get("segmentation"), dict) for a in data["annotations"])
    return cats, rle


def register_coco_json(name: str, json_file: str, image_root: str, thing_classes: List[str]) -> None:
    """``register_coco_instances`` of ``name`` with ``thing_classes`` in its metadata at once (the
    demo reads them without loading the data), replacing an earlier registration of ``name`` with
    other files and leaving one with the same files alone."""
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file") == str(json_file) and meta.get("image_root") == str(image_root):
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {"thing_classes": list(thing_classes)}, str(json_file), str(image_root))


def apply_coco_json_datasets(cfg) -> None:
    """Register the config's COCO JSON datasets and adapt ``cfg`` (not frozen) to them, in place.

    Does nothing when ``DATASETS.TRAIN_JSON`` and ``DATASETS.TEST_JSON`` are empty. Otherwise:
    ``DATASETS.TRAIN = (TRAIN_NAME,)`` and/or ``DATASETS.TEST = (TEST_NAME,)``; NUM_CLASSES = the
    number of categories; the names as ``thing_classes`` (set by detectron2's COCO loader);
    ``INPUT.MASK_FORMAT = "bitmask"`` when a mask is RLE. Logs what it set.

    Raises:
        ConfigError: a JSON without its image folder (or the reverse).
        DatasetError: train and test JSONs with different categories, or a malformed JSON (see
            :func:`read_coco_categories`).
        MissingFileError: a missing JSON or image folder, named.
    """
    d = cfg.DATASETS
    pairs = [("TRAIN", TRAIN_NAME, d.TRAIN_JSON, d.TRAIN_IMAGES), ("TEST", TEST_NAME, d.TEST_JSON, d.TEST_IMAGES)]
    categories = None
    for split, name, json_file, images in pairs:
        if not json_file and not images:
            continue
        if not json_file or not images:
            raise ConfigError(
                f"DATASETS.{split}_JSON and DATASETS.{split}_IMAGES go together; got {json_file!r} and {images!r}"
            )
        if not Path(images).is_dir():
            raise MissingFileError(f"image folder {images} (DATASETS.{split}_IMAGES) not found")
        cats, rle = read_coco_categories(json_file)
        names = [c["name"] for c in cats]
        if categories is not None and names != categories:
            raise DatasetError(
                f"DATASETS.TEST_JSON has categories {names} but DATASETS.TRAIN_JSON {categories}; "
                "both must list the same classes"
            )
        categories = names
        register_coco_json(name, json_file, images, names)
        setattr(d, split, (name,))
        if rle and cfg.INPUT.MASK_FORMAT != "bitmask":
            logger.info(f"{json_file} has RLE masks: INPUT.MASK_FORMAT set to 'bitmask'")
            cfg.INPUT.MASK_FORMAT = "bitmask"
    if categories is None:
        return
    cfg.MODEL.YOLACT.NUM_CLASSES = len(categories)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(categories)
    logger.info(f"COCO JSON datasets: {len(categories)} classes {categories}; NUM_CLASSES set to {len(categories)}")
