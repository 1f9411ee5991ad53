"""The one checkpointer of every entry point: loading that cannot run code, strict matching, and
saving that survives a crash or a full disk.

detectron2's ``DetectionCheckpointer`` unpickles ``.pkl`` files with ``pickle.load`` and leaves
``.pth`` files to ``torch.load``'s default; either can run code hidden in a downloaded file.
:class:`YolactCheckpointer` reads

- ``.pkl`` (detectron2 model zoo, converted Caffe2 / Detectron files) with an unpickler that
  resolves only the exact globals of :data:`PICKLE_GLOBALS` (numpy arrays, dtypes and scalars,
  ``OrderedDict``), then normalises them as detectron2 does;
- everything else (``.pth``: ours, the authors', torchvision's) with
  ``torch.load(..., weights_only=True)``.

A refused file ends with :class:`UnsafeCheckpointError` naming the global it asked for; a file
that is no checkpoint (cut short, random bytes) with :class:`UnreadableCheckpointError`.
``tools/convert_original_weights.py --trust-pickle`` re-saves a file one trusts in the safe form.

Writes (checkpoints and ``last_checkpoint``) go to a temporary file in the same folder that is
flushed, fsynced and renamed over the name: a file under a checkpoint's name is always complete.
A full disk ends with :class:`DiskFullError`; the earlier files stay as they were.

:func:`load_weights` is the one load of the entry points that need complete weights
(evaluation, the predictor, export, the benchmark, the comparison); :meth:`YolactCheckpointer.check_match`
is its strictness rule, also applied by the trainer with a lower bar (an ImageNet backbone fills
only the bottom-up part).
"""
import contextlib
import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
from typing import Dict, NamedTuple, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks

from .checkpoint import CheckpointLayoutError
from .errors import MissingFileError, YolactUserError

__all__ = [
    "trained_weights",
    "YolactCheckpointer", "PeriodicCheckpointer", "load_weights", "LoadedWeights", "read_checkpoint",
    "UnsafeCheckpointError", "UnreadableCheckpointError", "DiskFullError", "PICKLE_GLOBALS",
    "TRAINING_MIN_SHARE",
]

logger = logging.getLogger(__name__)

# The (module, name) pairs a ``.pkl`` of weights needs, each exactly; nothing module-wide, no
# builtins. numpy 1.x and 2.x name their modules ``numpy.core`` and ``numpy._core``.
PICKLE_GLOBALS = frozenset(
    [("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
)

# Model entries a checkpoint may lack without harming inference: BatchNorm step counters (never
# read in eval mode) and the auxiliary semantic-segmentation head (used by the training loss only).
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_INFERENCE_OPTIONAL_PREFIXES = ("sem_seg_head.",)

# Training may start from a part of the model (an ImageNet ResNet fills the bottom-up backbone:
# 68% of YOLACT R-18's tensors, 86-88% of R-50's); a file matching less is for another model.
TRAINING_MIN_SHARE = 0.5

_TRUST_HINT = "python tools/convert_original_weights.py --trust-pickle {src} OUT.pth"


class UnsafeCheckpointError(YolactUserError, ValueError):
    """A weights file whose unpickling asks for a global no weights file needs (it could run code)."""


class UnreadableCheckpointError(CheckpointLayoutError):
    """A file that cannot be read as a checkpoint at all: cut short, corrupt, or another format."""


class DiskFullError(YolactUserError, OSError):
    """No space left in the output folder while a checkpoint was written (the file was not replaced)."""


class CheckpointMatchError(CheckpointLayoutError):
    """A checkpoint that fills too little of the model: made for another model or class count."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"GLOBAL {module}.{name}")


def _refused(path: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} was refused: loading it would call {name}, which no weights file needs (unpickling can run "
        f"code); ask its author for a plain weights file, or, only if you trust it, convert it once: "
        + _TRUST_HINT.format(src=path)
    )


def _unreadable(path: str, e: Exception) -> UnreadableCheckpointError:
    text = " ".join(str(e).split())[:160]
    return UnreadableCheckpointError(
        f"{path} is not a readable checkpoint ({type(e).__name__}: {text}): the file is cut short (an "
        "interrupted download or save) or not a weights file; use a complete copy"
    )


def read_checkpoint(path: str):
    """The object stored in a local weights file, read without running code.

    ``.pkl``: the restricted unpickler (:data:`PICKLE_GLOBALS`, ``encoding="latin1"`` as detectron2
    reads Python 2 pickles); anything else: ``torch.load(map_location="cpu", weights_only=True)``.

    Raises:
        UnsafeCheckpointError: the file asks for another global (named in the message).
        UnreadableCheckpointError: the file is no checkpoint (truncated, random bytes).
        OSError: the file cannot be opened (missing, permissions); once open, every failure is
            the contents' (UnreadableCheckpointError).
    """
    with open(path, "rb") as f:
        try:
            if path.endswith(".pkl"):
                return _RestrictedUnpickler(f, encoding="latin1").load()
            return torch.load(f, map_location="cpu", weights_only=True)
        except UnsafeCheckpointError as e:
            raise _refused(path, str(e).split()[-1]) from None
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))  # torch's weights_only refusal names it so
            if found and "weights only" in str(e).lower():
                raise _refused(path, found.group(1)) from None
            raise _unreadable(path, e) from None
        except Exception as e:  # zip reader (OSError too), pickle and numpy raise many types for a broken file
            raise _unreadable(path, e) from None


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _AtomicFile:
    """``open(path, mode)`` for writing, as a context manager: the data goes to a temporary file
    beside ``path``; on success it is flushed, fsynced and renamed over ``path``, on failure removed."""

    PREFIX = ".incomplete-"

    def __init__(self, path: str, mode: str):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(prefix=self.PREFIX + os.path.basename(path) + ".", dir=self.folder)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it 0600)
        self.file = os.fdopen(fd, mode)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        failed_here = False
        if exc is None:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self.tmp, self.path)
                return False
            except OSError as e:  # a full disk often shows only at flush / fsync
                exc, failed_here = e, True
        with contextlib.suppress(OSError):  # flushing what is left fails again on a full disk
            self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        if _is_disk_full(exc):
            free = shutil.disk_usage(self.folder).free / 2**20
            raise DiskFullError(
                f"no space left in {self.folder} while writing {os.path.basename(self.path)} ({free:.0f} MB free); "
                "the earlier checkpoints are intact: free space there, give another OUTPUT_DIR or keep fewer "
                "checkpoints (SOLVER.CHECKPOINTS_TO_KEEP), then --resume"
            ) from exc
        if failed_here:
            raise exc
        return False  # the writer's own exception goes on


class _AtomicWrites:
    """The checkpointer's path manager with write-mode ``open`` of local files made atomic
    (:class:`_AtomicFile`); everything else is the wrapped path manager's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open(self, path, mode="r", **kwargs):
        if "w" in mode and "://" not in path:
            return _AtomicFile(path, mode)
        return self._inner.open(path, mode, **kwargs)


class LoadedWeights(NamedTuple):
    """What :func:`load_weights` loaded: ``extra`` (the checkpoint's keys besides the model, e.g.
    the training metadata), ``matched`` / ``total`` (model tensors filled from the file / all the
    model's tensors, BatchNorm step counters left out) and ``path``."""

    extra: Dict
    matched: int
    total: int
    path: str


class YolactCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` that loads without running code (:func:`read_checkpoint`),
    keeps the incompatible keys of its last load (:attr:`incompatible`, for :meth:`check_match`) and
    writes atomically (:class:`_AtomicWrites`). Arguments as ``DetectionCheckpointer``."""

    incompatible = None

    def __init__(self, model, save_dir: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)

    @classmethod
    def replacing(cls, checkpointer: DetectionCheckpointer) -> "YolactCheckpointer":
        """The same model, folder, disk rank and checkpointables (trainer, optimizer, ...) as
        ``checkpointer`` (the one ``DefaultTrainer.__init__`` builds), read and written safely."""
        return cls(checkpointer.model, checkpointer.save_dir, save_to_disk=checkpointer.save_to_disk,
                   **checkpointer.checkpointables)

    def save(self, name: str, tag_last_checkpoint: bool = True, **kwargs) -> None:
        """fvcore's ``save`` (atomic here); ``tag_last_checkpoint=False`` leaves ``last_checkpoint``
        as it is (``model_best.pth``: ``--resume`` must not continue from it)."""
        self._tag = tag_last_checkpoint
        try:
            super().save(name, **kwargs)
        finally:
            self._tag = True

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if getattr(self, "_tag", True):
            super().tag_last_checkpoint(last_filename_basename)

    def _torch_load(self, f: str):
        return read_checkpoint(f)

    def _load_file(self, filename: str):
        if not filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)  # detectron2's URL query handling, then _torch_load
        data = read_checkpoint(filename)
        if filename.endswith(".pyth"):  # pycls, as detectron2 reads it
            state = data.get("model_state") if isinstance(data, dict) else None
            if state is None:
                raise UnreadableCheckpointError(f"{filename} is no pycls checkpoint (no 'model_state')")
            state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if not isinstance(data, dict):
            raise UnreadableCheckpointError(f"{filename} holds a {type(data).__name__}, not a dict of weights")
        if "model" in data and "__author__" in data:  # detectron2 model zoo, as detectron2 reads it
            return data
        data = data.get("blobs", data)  # Caffe2 / Detectron 1: detection models keep them under "blobs"
        return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def check_match(self, path: str, min_share: float = 1.0, optional_prefixes=()) -> LoadedWeights:
        """Count the model tensors the last load filled and refuse too few.

        Args:
            path: the file, for the message.
            min_share: the share (0-1] of the model's tensors (BatchNorm step counters and
                ``optional_prefixes`` left out) that must come from the file: 1.0 for inference.

        Raises:
            CheckpointMatchError: fewer matched, with the share and the likely cause.
        """
        state = self.model.state_dict()
        needed = [k for k in state if not k.endswith(_OPTIONAL_SUFFIXES) and not k.startswith(optional_prefixes)]
        inc = self.incompatible
        absent = set(inc.missing_keys) | {k for k, *_ in inc.incorrect_shapes} if inc is not None else set()
        missing = [k for k in needed if k in absent]
        matched = len(needed) - len(missing)
        if matched < min_share * len(needed):
            shapes = [k for k, *_ in inc.incorrect_shapes if k in missing] if inc is not None else []
            note = f", {len(shapes)} of them with another shape in the file (e.g. {shapes[0]})" if shapes else ""
            raise CheckpointMatchError(
                f"{path} does not fit this model: it fills {matched} of {len(needed)} model parameters "
                f"({100 * matched / max(len(needed), 1):.0f}%, {100 * min_share:.0f}% needed){note}; missing e.g. "
                f"{', '.join(missing[:3])}: it is made for another model (ResNet depth, YOLACT vs YOLACT++ or "
                "Mask R-CNN, NUM_CLASSES); give weights of this config"
            )
        return LoadedWeights({}, matched, len(needed), path)


def load_weights(model, path: str, *, save_dir: str = "", resume: bool = False,
                 min_share: float = 1.0) -> LoadedWeights:
    """Load ``path`` into ``model`` through :class:`YolactCheckpointer`, strictly: every tensor
    of the model but BatchNorm step counters and the training-only semantic-segmentation head must
    come from the file (``min_share`` lowers the bar). With ``resume``, ``save_dir``'s last
    checkpoint wins over ``path`` (``resume_or_load``). ``path`` "" without a checkpoint to resume
    leaves the model as it is (``matched`` 0).

    Raises:
        MissingFileError: a local ``path`` that does not exist.
        UnsafeCheckpointError, UnreadableCheckpointError: see :func:`read_checkpoint`.
        CheckpointMatchError: too few tensors matched (:meth:`YolactCheckpointer.check_match`).
        CheckpointLayoutError: an original-layout file of another model (the layout conversion).
    """
    checkpointer = YolactCheckpointer(model, save_dir=save_dir)
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    elif not path:
        return LoadedWeights({}, 0, 0, "")
    if "://" not in path and not os.path.isfile(path.split("?")[0]):
        raise MissingFileError(f"MODEL.WEIGHTS file {path} not found; give an existing checkpoint")
    try:
        extra = checkpointer.load(path)
    except CheckpointLayoutError as e:
        if path in str(e):
            raise
        raise CheckpointLayoutError(f"{path}: {e}") from None  # the layout conversion's, without the file
    found = checkpointer.check_match(path, min_share, _INFERENCE_OPTIONAL_PREFIXES)
    return found._replace(extra=extra)


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpoint hook, keeping at most ``max_to_keep`` periodic files
    (``SOLVER.CHECKPOINTS_TO_KEEP``; None: all, as detectron2) also across ``--resume``: the
    files already in the folder count, oldest deleted first (``model_final.pth`` is never
    deleted; bounded, the last iteration writes model_final.pth alone, not also its periodic
    copy). Temporary files left by a save that was killed are removed at the start."""

    def step(self, iteration: int, **kwargs) -> None:
        # Bounded: at the last iteration model_final.pth alone (a periodic file would be its copy).
        if self.max_to_keep and self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=int(iteration), **kwargs)
            return
        super().step(iteration, **kwargs)

    def before_train(self):
        super().before_train()
        folder = self.checkpointer.save_dir
        if not folder or not self.checkpointer.save_to_disk or not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            if name.startswith(_AtomicFile.PREFIX):
                logger.info(f"removing {name}, left by a save that did not finish")
                os.remove(os.path.join(folder, name))
        if self.max_to_keep:
            pattern = re.compile(re.escape(self.file_prefix) + r"_\d{7}\.pth$")
            self.recent_checkpoints = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if pattern.match(n)]


# What a run leaves in OUTPUT_DIR, in the order a model to evaluate or run is looked for.
TRAINED_WEIGHTS = ("model_best.pth", "model_final.pth")


def trained_weights(weights: str, output_dir: str) -> str:
    """The weights to evaluate, run or export: ``weights`` (``MODEL.WEIGHTS``) when given;
    otherwise ``output_dir``'s ``model_best.pth`` (the best periodic evaluation, SOLVER.BEST_CHECKPOINT),
    else its ``model_final.pth``, else "" (random weights). One log line says which file, or
    that there is none."""
    if weights:
        return weights
    for name in TRAINED_WEIGHTS:
        path = os.path.join(output_dir, name) if output_dir else ""
        if path and os.path.isfile(path):
            logger.info(f"MODEL.WEIGHTS is empty: using {path}" + (
                " (the best periodic evaluation)" if name == "model_best.pth" else ""))
            return path
    logger.warning(f"MODEL.WEIGHTS is empty and OUTPUT_DIR {output_dir or '(none)'} holds no "
                   f"{' or '.join(TRAINED_WEIGHTS)}: random weights")
    return ""
