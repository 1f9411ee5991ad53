"""YOLACT training data: SSD-style augmentations and the dataset mapper."""
from .augmentations import (
    SSD_CROP_MIN_IOUS,
    YOLACT_CROP_MIN_IOUS,
    ExpandTransform,
    PhotometricDistortTransform,
    RandomExpand,
    RandomPhotometricDistort,
    SSDRandomCrop,
    build_yolact_train_augmentation,
)
from .copy_paste import CopyPasteDatasetMapper, paste_instances
from .dataset_mapper import YolactDatasetMapper

__all__ = [
    "SSD_CROP_MIN_IOUS",
    "YOLACT_CROP_MIN_IOUS",
    "ExpandTransform",
    "PhotometricDistortTransform",
    "RandomExpand",
    "RandomPhotometricDistort",
    "SSDRandomCrop",
    "build_yolact_train_augmentation",
    "YolactDatasetMapper",
    "CopyPasteDatasetMapper",
    "paste_instances",
]
