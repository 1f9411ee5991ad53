"""TIDE error breakdown of an evaluation (Bolya et al., "TIDE: A General Toolbox for Identifying
Object Detection Errors", ECCV 2020), through the ``tidecv`` package.

:func:`tide_breakdown` reads the ground-truth COCO JSON of a dataset and the detections
``COCOEvaluator`` wrote (``coco_instances_results.json``) and splits the AP lost at IoU 0.5 into
the six main error types (the dAP: AP gained when every error of that type is fixed):

- ``Cls``: right place (IoU >= 0.5 with a ground truth), wrong class;
- ``Loc``: right class, poorly localised (0.1 <= IoU < 0.5);
- ``Both``: wrong class and poorly localised;
- ``Dupe``: right class and place, but the ground truth was already taken by a higher score;
- ``Bkg``: a detection on background (IoU < 0.1 with every ground truth);
- ``Miss``: a ground truth no detection accounts for;

plus the two special ones, ``FalsePos`` / ``FalseNeg`` (all false positives / negatives fixed).
Box errors rank detections by their class confidence (``box_score`` where YOLACT++ re-scoring
wrote one), mask errors by the results' ``score``, as :class:`~yolact_d2.evaluation.YolactCOCOEvaluator`
ranks them for AP. ``TEST.TIDE True`` runs it after every evaluation of ``train_net.py``.
"""
import json
import logging
import os

from pycocotools.coco import COCO

from .errors import ConfigError

__all__ = ["tide_breakdown", "check_tide", "format_tide_table", "MAIN_ERRORS", "SPECIAL_ERRORS", "TIDE_INSTALL"]

logger = logging.getLogger(__name__)

MAIN_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
SPECIAL_ERRORS = ("FalsePos", "FalseNeg")
# tidecv's own requirements pull numpy 2 and opencv-python, which break detectron2 0.7 (numpy<2)
# and the headless OpenCV of scripts/install.sh; its code runs on numpy 1.26 as it is.
TIDE_INSTALL = 'pip install --no-deps tidecv appdirs && pip install seaborn "pandas<2.3" "numpy<2"'


def _import_tide():
    try:
        from tidecv import TIDE, Data
    except ImportError as e:
        raise ConfigError(
            f"TEST.TIDE needs the tidecv package ({e}): {TIDE_INSTALL} (plain 'pip install tidecv' "
            "also upgrades numpy past detectron2's numpy<2)"
        ) from None
    return TIDE, Data


def check_tide(cfg) -> None:
    """Raise ConfigError (naming the install command) when ``TEST.TIDE`` is on and tidecv is missing."""
    if cfg.TEST.TIDE:
        _import_tide()


def _ground_truth(Data, gt_json: str, task: str):
    """tidecv ``Data`` of a COCO instances JSON (pycocotools reads it: polygons and RLE alike)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading times
        coco = COCO(gt_json)
    data = Data(os.path.basename(gt_json), max_dets=100)
    for cat in coco.loadCats(coco.getCatIds()):
        data.add_class(cat["id"], cat["name"])
    for img in coco.loadImgs(coco.getImgIds()):
        data.add_image(img["id"], img.get("file_name", str(img["id"])))
    for ann in coco.loadAnns(coco.getAnnIds()):
        box = ann["bbox"] if task == "bbox" else None
        mask = coco.annToRLE(ann) if task == "segm" else None
        if ann.get("iscrowd", 0):
            data.add_ignore_region(ann["image_id"], ann["category_id"], box, mask)
        else:
            data.add_ground_truth(ann["image_id"], ann["category_id"], box, mask)
    return data


def _detections(Data, results: list, task: str):
    data = Data("detections")
    for r in results:
        if task == "bbox":
            data.add_detection(r["image_id"], r["category_id"], r.get("box_score", r["score"]), r["bbox"], None)
        elif "segmentation" in r:
            data.add_detection(r["image_id"], r["category_id"], r["score"], None, r["segmentation"])
    return data


def tide_breakdown(gt_json: str, results_json: str, output_dir: str = None, tasks=("bbox", "segm"),
                   plot: bool = True) -> dict:
    """TIDE's error breakdown of the detections in ``results_json`` (COCO results format, dataset
    category ids, as ``COCOEvaluator`` writes them) against ``gt_json`` (COCO instances JSON).

    Returns ``{task: {"AP50": float, "main": {Cls, Loc, Both, Dupe, Bkg, Miss}, "special":
    {FalsePos, FalseNeg}}}`` for each of ``tasks`` ("bbox", "segm"; "segm" only when the results
    have masks), every value in AP points (0-100) at IoU 0.5, TIDE's background threshold 0.1.
    With ``output_dir``: writes ``tide.json`` (that dict) and, when ``plot`` and tidecv's plotting
    works here (it needs matplotlib, seaborn, pandas and OpenCV), its summary figures
    ``tide_bbox.png`` / ``tide_segm.png``; a plotting failure is logged as one warning and the
    JSON is kept.

    Raises:
        ConfigError: tidecv is not installed (the message names the install command).
    """
    TIDE, Data = _import_tide()
    with open(results_json) as f:
        results = json.load(f)
    if not any("segmentation" in r for r in results):
        tasks = [t for t in tasks if t != "segm"]
    breakdown, tide_of = {}, {}
    for task in tasks:
        tide = TIDE(mode=TIDE.BOX if task == "bbox" else TIDE.MASK)
        run = tide.evaluate(_ground_truth(Data, gt_json, task), _detections(Data, results, task), name=task)
        errors = tide.get_all_errors()
        breakdown[task] = {
            "AP50": float(run.ap),
            "main": {k: float(errors["main"][task][k]) for k in MAIN_ERRORS},
            "special": {k: float(errors["special"][task][k]) for k in SPECIAL_ERRORS},
        }
        tide_of[task] = tide
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "tide.json"), "w") as f:
            json.dump(breakdown, f, indent=2)
        if plot:
            _plot(tide_of, output_dir)
    return breakdown


def _plot(tide_of: dict, output_dir: str) -> None:
    import warnings

    import cv2
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    level = cv2.getLogLevel()
    cv2.setLogLevel(2)  # errors only: its float image is written as uint8 with a warning
    for task, tide in tide_of.items():
        try:
            with warnings.catch_warnings():  # tidecv's seaborn and matplotlib deprecation warnings
                warnings.simplefilter("ignore")
                tide.plot(out_dir=output_dir)  # writes <run name>_<mode>_summary.png
            mode = "bbox" if task == "bbox" else "mask"
            written = os.path.join(output_dir, f"{task}_{mode}_summary.png")
            if os.path.isfile(written):
                os.replace(written, os.path.join(output_dir, f"tide_{task}.png"))
        except Exception as e:  # the breakdown stands without its figure
            logger.warning("TIDE plot of %s not written (%s: %s); tide.json has the numbers",
                           task, type(e).__name__, " ".join(str(e).split())[:200])
        finally:
            import matplotlib.pyplot as plt

            plt.close("all")
    cv2.setLogLevel(level)


def format_tide_table(breakdown: dict) -> str:
    """The breakdown as a small text table: one row per task, AP50 then each error's dAP."""
    columns = ("AP50",) + MAIN_ERRORS + SPECIAL_ERRORS
    lines = ["TIDE dAP (AP points lost at IoU 0.5 to each error type):",
             "task  " + " ".join(f"{c:>8}" for c in columns)]
    for task, b in breakdown.items():
        values = [b["AP50"]] + [b["main"][k] for k in MAIN_ERRORS] + [b["special"][k] for k in SPECIAL_ERRORS]
        lines.append(f"{task:<5} " + " ".join(f"{v:8.2f}" for v in values))
    return "\n".join(lines)
