"""yolact-d2: YOLACT and YOLACT++ real-time instance segmentation as a detectron2 plugin.

Importing the package registers ``META_ARCHITECTURE: "YOLACT"`` and the backbone
``build_yolact_resnet_fpn_backbone``; call :func:`add_yolact_config` on a config before merging a
YOLACT YAML file.
"""
from . import console  # noqa: F401  (first: the dependency warning filters, before detectron2 is imported)
from .backbone import build_yolact_resnet_fpn_backbone  # noqa: F401  (registers the backbone)
from .checkpoint import convert_original_state_dict, convert_torchvision_resnet_state_dict  # noqa: F401
from .config import add_yolact_config  # noqa: F401
from .meta_arch import YOLACT  # noqa: F401  (registers the meta-architecture)
from .predictor import YolactPredictor  # noqa: F401

__version__ = "0.1.0"
