"""Check a dataset before the first iteration: every image and annotation a run will read.

Training used to stop mid-run on a truncated JPEG (``OSError``), an image whose JSON size is wrong
(detectron2's ``SizeMismatchError``), a ``category_id`` missing from ``categories`` (a raw
``KeyError`` from ``load_coco_json``) or an empty segmentation. :func:`check_dataset` finds them
all first (as Ultralytics verifies every image and label before training):

* each image opens, and its size after EXIF orientation (as detectron2's ``read_image`` applies
  it) is the JSON's width x height;
* a JPEG ends with its end-of-image marker (not truncated); a full decode is optional
  (``DATASETS.CHECK.FULL_DECODE``);
* each annotation's ``category_id`` is one of the JSON's ``categories``;
* each non-crowd annotation has a non-empty segmentation.

Faults are fatal (one line naming the first few files or JSON annotation ids and the fix) when
they would change the result silently: a size mismatch, an unknown category id, and anything in a
TEST set (dropping validation images changes AP). In a TRAIN set an unreadable image and an empty
segmentation are dropped and counted in one warning, unless ``DATASETS.CHECK.STRICT``.

Image results are cached per file (absolute path, byte size, mtime) in a JSON file under the output
folder, written by the main process only, so a second run costs one ``stat`` per image.
"""
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from PIL import Image

from ..errors import DatasetError, MissingFileError

__all__ = [
    "CACHE_NAME", "ImageCheckCache", "inspect_image", "coco_json_faults", "check_json_categories", "check_dataset",
    "check_datasets",
]

logger = logging.getLogger(__name__)

CACHE_NAME = "dataset_check_cache.json"
_EXIF_ORIENTATION = 0x0112
_CACHE_VERSION = 1
_SHOWN = 3  # files or annotation ids named in one message


def inspect_image(path: str, full_decode: bool = False) -> Dict:
    """Open one image and return ``{"width", "height", "error"}``.

    ``width`` / ``height`` are pixels after EXIF orientation (orientations 5-8 swap the sides, as
    detectron2's ``read_image`` rotates them); ``error`` is None, or a short reason the image cannot
    be used ("cannot be opened: ...", "truncated JPEG: no end-of-image marker", "cannot be decoded:
    ..."). A JPEG is checked for its end-of-image marker (0xFFD9) in its last 64 bytes (padding may
    follow it); ``full_decode`` also decodes every pixel (finds corrupt data inside the file).
    Raises nothing for a bad image; FileNotFoundError for a missing one.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            fmt = image.format
            if full_decode:
                image.load()
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        verb = "decoded" if full_decode else "opened"
        return {"width": None, "height": None, "error": f"cannot be {verb}: {' '.join(str(e).split())[:100]}"}
    if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
        width, height = height, width
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            if b"\xff\xd9" not in f.read():
                return {"width": width, "height": height, "error": "truncated JPEG: no end-of-image marker"}
    return {"width": width, "height": height, "error": None}


class ImageCheckCache:
    """Results of :func:`inspect_image` keyed by absolute path, valid while the file's byte size and
    mtime stay the same. ``path`` None keeps them in memory only."""

    def __init__(self, path: Optional[str], writable: bool = True):
        self.path = path
        self.writable = writable  # False on the other ranks of a distributed run: rank 0 writes
        self.entries: Dict[str, Dict] = {}
        self.changed = False
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
                if data.get("version") == _CACHE_VERSION:
                    self.entries = data.get("images", {})
            except (OSError, ValueError, AttributeError):
                logger.info(f"dataset check cache {path} unreadable; checking every image again")

    def get(self, path: str, full_decode: bool) -> Dict:
        """Result for ``path`` (cached, or computed now). Raises FileNotFoundError for a missing file."""
        key = os.path.abspath(path)
        st = os.stat(key)
        entry = self.entries.get(key)
        if (entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns
                and (entry["full_decode"] or not full_decode)):
            return entry
        entry = dict(inspect_image(key, full_decode), size=st.st_size, mtime_ns=st.st_mtime_ns, full_decode=full_decode)
        self.entries[key] = entry
        self.changed = True
        return entry

    def save(self) -> None:
        """Write the cache (atomically: other processes may read it meanwhile). Errors only log."""
        if not self.path or not self.changed or not self.writable:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"version": _CACHE_VERSION, "images": self.entries}, f)
            os.replace(tmp, self.path)
            self.changed = False
        except OSError as e:
            logger.info(f"dataset check cache not written ({e}); the next run checks every image again")


def coco_json_faults(json_file: str) -> Dict[str, List[Dict]]:
    """:func:`_coco_json_faults`, read once per file version (the JSON may be large)."""
    st = os.stat(json_file)
    return _coco_json_faults(os.path.abspath(json_file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _coco_json_faults(json_file: str, size: int, mtime_ns: int) -> Dict[str, List[Dict]]:
    """Annotation faults of a COCO instances JSON that detectron2's loader would turn into a raw
    ``KeyError`` or a silently shifted annotation index.

    Returns:
        ``{"unknown_category": [...], "empty_segmentation": [...]}``, each a list of
        ``{"id": JSON annotation id, "category_id": ..., "file_name": image file or None}``:
        annotations whose ``category_id`` is not in ``categories``, and non-crowd annotations whose
        segmentation is missing or holds no coordinate (``[]``, ``[[]]``).
    """
    with open(json_file) as f:
        data = json.load(f)
    cat_ids = {c.get("id") for c in data.get("categories", [])}
    files = {im.get("id"): im.get("file_name") for im in data.get("images", [])}
    unknown, empty = [], []
    for a in data.get("annotations", []):
        item = {"id": a.get("id"), "category_id": a.get("category_id"), "file_name": files.get(a.get("image_id"))}
        if a.get("category_id") not in cat_ids:
            unknown.append(item)
        segm = a.get("segmentation")
        if not a.get("iscrowd", 0) and (not segm or (isinstance(segm, list) and not any(segm))):
            empty.append(item)
    return {"unknown_category": unknown, "empty_segmentation": empty}


def _first(items: Sequence, key=None) -> str:
    shown = [str(key(i) if key else i) for i in items[:_SHOWN]]
    return ", ".join(shown) + (", ..." if len(items) > _SHOWN else "")


def _no_segmentation(obj: Dict) -> bool:
    # detectron2's loader leaves out the key of an empty (falsy) segmentation.
    segm = obj.get("segmentation")
    return not obj.get("iscrowd", 0) and (not segm or (isinstance(segm, list) and not any(segm)))


def check_dataset(
    dicts: List[Dict],
    name: str,
    *,
    split: str,
    json_file: Optional[str] = None,
    strict: bool = False,
    full_decode: bool = False,
    cache: Optional[ImageCheckCache] = None,
    workers: int = 8,
) -> List[Dict]:
    """Check a dataset and return its dicts without the recoverable faults of a training set.

    Args:
        dicts: detectron2 dataset dicts of ``name`` (``file_name``, ``height``, ``width``,
            ``annotations``); not modified.
        split: "TRAIN" (unreadable images and empty segmentations are dropped and counted in one
            warning) or "TEST" (every fault is fatal).
        json_file: the COCO JSON ``dicts`` came from, if any: faults are then named by JSON
            annotation id. Unknown category ids must be found before loading, with
            :func:`coco_json_faults`, since detectron2's loader fails on them.
        strict: make the recoverable faults fatal too.
        full_decode: decode every image fully (slower; finds corruption inside a JPEG).
        cache: per-file results (:class:`ImageCheckCache`); None checks every image now.
        workers: threads opening images (the work is file reads and header parsing).
    Returns:
        the dicts to use: the same list when nothing was dropped, else copies without the dropped
        images and annotations.
    Raises:
        DatasetError: a fatal fault, one line naming the first few files / annotation ids and the fix.
        MissingFileError: images listed but absent (the first named).
    """
    cache = cache or ImageCheckCache(None)
    train = split == "TRAIN"
    where = f"dataset {name}" + (f" ({json_file})" if json_file else "")

    # Empty segmentations (detectron2 keeps such an annotation without its "segmentation" key).
    empty = [(d["file_name"], i) for d in dicts for i, o in enumerate(d.get("annotations", [])) if _no_segmentation(o)]
    if empty:
        ids = coco_json_faults(json_file)["empty_segmentation"] if json_file else []
        named = f"JSON annotation ids {_first(ids, lambda a: a['id'])}" if ids else f"in {_first(empty, lambda e: os.path.basename(e[0]))}"
        if not train or strict:
            fix = "give each annotation its polygon or RLE mask, or remove it"
            why = "" if train else " (a TEST set is checked in full: dropping annotations would change AP)"
            raise DatasetError(f"{where}: {len(empty)} annotation(s) with an empty segmentation{why}, {named}; {fix}")

    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise MissingFileError(
            f"{len(missing)} image(s) of {name} listed in the annotations are missing on disk, "
            f"first: {missing[0]} (fix the image root of the dataset registration)"
        )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda d: cache.get(d["file_name"], full_decode), dicts))

    mismatched = [(d, r) for d, r in zip(dicts, results) if not r["error"] and (
        ("width" in d and d["width"] != r["width"]) or ("height" in d and d["height"] != r["height"]))]
    if mismatched:
        shown = _first(mismatched, lambda x: f"{os.path.basename(x[0]['file_name'])} "
                       f"(JSON {x[0].get('width')}x{x[0].get('height')}, file {x[1]['width']}x{x[1]['height']})")
        raise DatasetError(
            f"{where}: {len(mismatched)} image(s) whose size (after EXIF orientation) differs from the JSON's "
            f"width x height: {shown}; correct the JSON's width/height or replace the image"
        )
    bad = [(d["file_name"], r["error"]) for d, r in zip(dicts, results) if r["error"]]
    if bad and (not train or strict):
        why = "" if train else " (a TEST set is checked in full: dropping images would change AP)"
        raise DatasetError(
            f"{where}: {len(bad)} image(s) cannot be used{why}: "
            f"{_first(bad, lambda b: f'{os.path.basename(b[0])} ({b[1]})')}; replace or remove them"
        )
    if not bad and not empty:
        return dicts

    bad_files = {f for f, _ in bad}
    out = []
    for d in dicts:
        if d["file_name"] in bad_files:
            continue
        annos = d.get("annotations", [])
        keep = [o for o in annos if not _no_segmentation(o)]
        out.append(d if len(keep) == len(annos) else dict(d, annotations=keep))
    parts = []
    if bad:
        parts.append(f"{len(bad)} image(s) that cannot be read ({_first(bad, lambda b: f'{os.path.basename(b[0])}: {b[1]}')})")
    if empty:
        parts.append(f"{len(empty)} annotation(s) with an empty segmentation ({named})")
    logger.warning(f"{where}: dropped " + " and ".join(parts) + "; set DATASETS.CHECK.STRICT True to stop instead")
    return out


def check_json_categories(json_file: str, name: str) -> None:
    """Raise DatasetError (one line, the first JSON annotation ids) when annotations of ``json_file``
    name a ``category_id`` missing from its ``categories``: fatal in TRAIN and TEST sets alike."""
    unknown = coco_json_faults(json_file)["unknown_category"]
    if unknown:
        ids = sorted({a["category_id"] for a in unknown}, key=str)
        raise DatasetError(
            f"dataset {name} ({json_file}): {len(unknown)} annotation(s) with a category_id not in 'categories' "
            f"(category ids {_first(ids)}; JSON annotation ids {_first(unknown, lambda a: a['id'])}); "
            "add those categories to 'categories' or correct the annotations' category_id"
        )


def check_datasets(cfg, names: Sequence[str], split: str, load, writable: bool = True) -> Optional[List[Dict]]:
    """Check the datasets ``names`` of a config (see :func:`check_dataset`) and return their dicts.

    Args:
        cfg: reads ``DATASETS.CHECK.*`` and ``OUTPUT_DIR`` (where the cache file goes).
        names: registered dataset names; those registered from a COCO JSON (``json_file`` in their
            metadata) get their category ids checked before they are loaded.
        split: "TRAIN" (``load(names)`` gives one list of dicts for all names, the one training
            reads; returned with the recoverable faults dropped) or "TEST" (each name's
            ``DatasetCatalog`` dicts are checked; returns None).
        load: ``names -> dicts`` for TRAIN (e.g. ``get_detection_dataset_dicts``); unused for TEST.
        writable: whether this process writes the cache (rank 0 of a distributed run).
    Raises:
        DatasetError: a fatal fault (see the module docstring).
        MissingFileError: a TEST set's JSON or an image that is not on disk.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    check = cfg.DATASETS.CHECK
    if not check.ENABLED:
        return load(names) if split == "TRAIN" else None
    jsons = {n: MetadataCatalog.get(n).get("json_file", None) for n in names}
    for n, json_file in jsons.items():
        if json_file and os.path.isfile(json_file):
            check_json_categories(json_file, n)
        elif json_file and split == "TEST":  # would otherwise fail only after training, with a traceback
            raise MissingFileError(
                f"dataset {n} (DATASETS.TEST): annotation file {json_file} not found; give the dataset's files "
                "(e.g. --val-json / --val-images) or set DATASETS.TEST to a dataset you have"
            )
    cache = ImageCheckCache(os.path.join(cfg.OUTPUT_DIR, CACHE_NAME) if cfg.OUTPUT_DIR else None, writable)
    try:
        if split == "TRAIN":
            json_file = jsons[names[0]] if len(names) == 1 else None
            return check_dataset(load(names), ", ".join(names), split="TRAIN", json_file=json_file,
                                 strict=check.STRICT, full_decode=check.FULL_DECODE, cache=cache)
        for n in names:
            check_dataset(DatasetCatalog.get(n), n, split="TEST", json_file=jsons[n], full_decode=check.FULL_DECODE,
                          cache=cache)
        return None
    finally:
        cache.save()
