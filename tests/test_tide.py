"""TIDE error breakdown (yolact_d2/tide.py): hand-made detections whose errors are known, each
counted under its own type with the dAP worked out by hand (COCO's 101-point AP at IoU 0.5)."""
import json
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest

pytest.importorskip("tidecv")

from yolact_d2.tide import MAIN_ERRORS, format_tide_table, tide_breakdown  # noqa: E402

H, W = 200, 300
# Boxes [x, y, w, h] of three ground-truth objects, well apart.
A, B, C = [10, 10, 50, 50], [150, 100, 60, 60], [230, 20, 40, 40]


def rle(box):
    x, y, w, h = box
    m = np.zeros((H, W), np.uint8, order="F")
    m[y:y + h, x:x + w] = 1
    r = mask_util.encode(m)
    r["counts"] = r["counts"].decode()
    return r


def det(box, category, score, **extra):
    return dict(image_id=1, category_id=category, bbox=list(box), score=score, segmentation=rle(box), **extra)


def breakdown(tmp_path, objects, detections, **kwargs):
    """``objects``: (box, category) ground truths of one image; ``detections``: results."""
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W}],
          "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3],
                           "iscrowd": 0, "segmentation": rle(b)} for i, (b, c) in enumerate(objects)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(detections))
    return tide_breakdown(str(tmp_path / "gt.json"), str(tmp_path / "results.json"), **kwargs)


def only(b, task, error, value):
    """Every main error of ``task`` is 0 except ``error``, which is ``value`` (AP points)."""
    main = b[task]["main"]
    assert main[error] == pytest.approx(value, abs=0.05), main
    assert all(main[k] == pytest.approx(0, abs=1e-6) for k in MAIN_ERRORS if k != error), main


# 101-point interpolated AP of two objects found with precision 1 up to recall 0.5 and 2/3 at recall 1.
AP_HALF_THEN_TWO_THIRDS = 100 * (51 + 50 * 2 / 3) / 101


def test_each_error_type_is_counted_as_itself(tmp_path):
    """A wrong class, a duplicate, a background box, a poorly placed box and a missed object, each
    alone: its own dAP, the others 0."""
    # Wrong class: B found as class 1. Class 2 has AP 0 of the mean's two classes: -50.
    b = breakdown(tmp_path, [(A, 1), (B, 2)], [det(A, 1, 0.9), det(B, 1, 0.8)], plot=False)
    assert b["bbox"]["AP50"] == pytest.approx(50) and b["segm"]["AP50"] == pytest.approx(50)
    only(b, "bbox", "Cls", 50)
    only(b, "segm", "Cls", 50)
    # Duplicate of A (IoU 0.96) ranked before C: precision 2/3 at recall 1.
    shifted = [A[0] + 1] + A[1:]
    b = breakdown(tmp_path, [(A, 1), (C, 1)], [det(A, 1, 0.9), det(shifted, 1, 0.8), det(C, 1, 0.7)], plot=False)
    assert b["bbox"]["AP50"] == pytest.approx(AP_HALF_THEN_TWO_THIRDS, abs=0.05)
    only(b, "bbox", "Dupe", 100 - AP_HALF_THEN_TWO_THIRDS)
    # A box on background (B's place, nothing there) ranked first: precision 1/2 at every recall.
    b = breakdown(tmp_path, [(A, 1)], [det(B, 1, 0.9), det(A, 1, 0.8)], plot=False)
    assert b["bbox"]["AP50"] == pytest.approx(50, abs=0.05)
    only(b, "bbox", "Bkg", 50)
    # A's box moved by 25 px (IoU 1/3: between TIDE's background 0.1 and positive 0.5): AP 0.
    moved = [A[0] + 25] + A[1:]
    b = breakdown(tmp_path, [(A, 1)], [det(moved, 1, 0.9)], plot=False)
    assert b["bbox"]["AP50"] == pytest.approx(0)
    only(b, "bbox", "Loc", 100)
    # C never detected: recall stops at 0.5.
    b = breakdown(tmp_path, [(A, 1), (C, 1)], [det(A, 1, 0.9)], plot=False)
    assert b["bbox"]["AP50"] == pytest.approx(100 * 51 / 101, abs=0.05)
    only(b, "bbox", "Miss", 100 - 100 * 51 / 101)


def test_boxes_rank_by_class_confidence_and_masks_by_score(tmp_path, caplog):
    """YOLACT++ results (score = mask score, box_score = class confidence): a background box with the
    higher class confidence but the lower mask score is a background error of the boxes only.
    tide.json and the box figure are written; tidecv cannot draw a breakdown without any error
    (its pie chart divides by zero): the mask figure is left out with one warning, and the table
    lists both tasks."""
    caplog.set_level("WARNING", logger="yolact_d2")
    b = breakdown(tmp_path, [(A, 1)], [det(B, 1, 0.7, box_score=0.9), det(A, 1, 0.8, box_score=0.6)],
                  output_dir=str(tmp_path / "out"))
    only(b, "bbox", "Bkg", 50)
    assert b["segm"]["AP50"] == pytest.approx(100) and b["segm"]["main"]["Bkg"] == pytest.approx(0)
    assert json.loads((tmp_path / "out" / "tide.json").read_text()) == b
    assert (tmp_path / "out" / "tide_bbox.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "tide_segm.png").exists()
    assert "TIDE plot of segm not written (ZeroDivisionError" in caplog.text and "plot of bbox" not in caplog.text
    table = format_tide_table(b).splitlines()
    assert table[1].split() == ["task", "AP50", *MAIN_ERRORS, "FalsePos", "FalseNeg"]
    assert table[2].split()[:2] == ["bbox", "50.00"] and table[3].split()[:2] == ["segm", "100.00"]


def test_boxes_only_results_give_the_box_breakdown(tmp_path):
    """Results without masks (a Mask R-CNN config with MASK_ON False, a box detector): bbox only."""
    b = breakdown(tmp_path, [(A, 1)], [{k: v for k, v in det(A, 1, 0.9).items() if k != "segmentation"}],
                  plot=False)
    assert set(b) == {"bbox"} and b["bbox"]["AP50"] == pytest.approx(100)


def test_missing_tidecv_is_one_line_naming_the_install(monkeypatch):
    from detectron2.config import CfgNode

    from yolact_d2.errors import ConfigError
    from yolact_d2.tide import check_tide

    monkeypatch.setitem(sys.modules, "tidecv", None)  # import tidecv raises ImportError
    cfg = CfgNode({"TEST": CfgNode({"TIDE": True})})
    with pytest.raises(ConfigError, match="pip install --no-deps tidecv") as e:
        check_tide(cfg)
    assert "\n" not in str(e.value) and "TEST.TIDE" in str(e.value)
    check_tide(CfgNode({"TEST": CfgNode({"TIDE": False})}))  # off: tidecv is not needed
