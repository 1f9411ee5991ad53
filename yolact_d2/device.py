"""One device policy for every entry point, and what detectron2 lacks to train on several CPU processes.

:func:`resolve_device` is used by ``train_net.py``, ``demo/demo.py``, :class:`YolactPredictor` and
``tools/``: a configured CUDA device (detectron2's default ``MODEL.DEVICE`` is "cuda") on a machine
without one falls back to the CPU with one warning line; an explicit request (``--device cuda``)
fails with one line instead.
"""
import contextlib
import logging
from typing import List

import torch

from .errors import DeviceUnavailableError

__all__ = ["resolve_device", "cpu_sync_batch_norm", "create_ddp_model", "ddp_on_cpu"]

logger = logging.getLogger("yolact_d2")


def resolve_device(cfg_device: str, explicit: bool = False) -> str:
    """The device to run on for the requested ``cfg_device`` (e.g. "cuda", "cuda:1", "cpu").

    A CUDA device without a CUDA GPU: the CPU, after the warning "MODEL.DEVICE is 'cuda' but no
    CUDA GPU is available: running on the CPU (...)" on the ``yolact_d2`` logger; with
    ``explicit`` (the user asked for that device itself, e.g. ``--device cuda``) an error instead.
    Any other device is returned unchanged.

    Raises:
        DeviceUnavailableError: ``explicit`` and no CUDA GPU for a CUDA ``cfg_device``.
    """
    if not cfg_device.startswith("cuda") or torch.cuda.is_available():
        return cfg_device
    if explicit:
        raise DeviceUnavailableError(f"--device {cfg_device} but no CUDA GPU is available; use --device cpu")
    logger.warning(
        f"MODEL.DEVICE is {cfg_device!r} but no CUDA GPU is available: running on the CPU "
        "(set MODEL.DEVICE cpu to silence this)"
    )
    return "cpu"


def cpu_sync_batch_norm(cfg) -> List[str]:
    """On a CPU config, replace every ``*NORM: "SyncBN"`` by detectron2's "naiveSyncBN", in place.

    torch's ``SyncBatchNorm`` (detectron2's "SyncBN") refuses CPU tensors once a process group
    exists; ``NaiveSyncBatchNorm`` computes the same batch statistics over all processes with an
    all-reduce that Gloo runs. Same parameters and buffers, so checkpoints are interchangeable.
    Returns the keys changed (``cfg`` must not be frozen).
    """
    if cfg.MODEL.DEVICE != "cpu":
        return []
    changed = []

    def visit(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                visit(value, f"{prefix}{key}.")
            elif key.endswith("NORM") and value == "SyncBN":
                node[key] = "naiveSyncBN"
                changed.append(prefix + key)

    visit(cfg, "")
    if changed:
        logger.info(f"{', '.join(changed)}: SyncBN on the CPU runs as detectron2's naiveSyncBN (all-reduce over Gloo)")
    return changed


def create_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` (the model itself in one process, else
    ``DistributedDataParallel``), without ``device_ids`` for a CPU model: detectron2 passes
    ``device_ids=[local rank]``, which DDP refuses for CPU parameters."""
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    if comm.get_world_size() == 1:
        return model
    cpu = next(model.parameters()).device.type == "cpu"
    kwargs.setdefault("device_ids", None if cpu else [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


@contextlib.contextmanager
def ddp_on_cpu():
    """Within the block, detectron2's ``DefaultTrainer`` wraps the model with
    :func:`create_ddp_model`; used around ``DefaultTrainer.__init__``."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original
