"""COCO evaluation that scores boxes and masks separately (YOLACT++ mask re-scoring), with an
optional TIDE error breakdown (yolact_d2/tide.py)."""
import copy
import logging
import os

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

logger = logging.getLogger(__name__)

__all__ = ["YolactCOCOEvaluator"]


class YolactCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator``, except that when the model returns ``mask_scores``
    (YOLACT++ re-scoring: class confidence x predicted mask IoU), the ``segm`` task ranks
    detections by them while ``bbox`` keeps the class confidence (``scores``), as the original
    YOLACT++ evaluation does. Without ``mask_scores`` it is exactly ``COCOEvaluator``.

    ``coco_instances_results.json`` then holds the mask-scored results, each with its class
    confidence kept as ``box_score``.

    ``tide``: after the COCO evaluation, :func:`yolact_d2.tide.tide_breakdown` of that file
    against the dataset's COCO JSON (detectron2's cached conversion for datasets without one):
    ``tide.json`` and its figures in ``output_dir``, the table logged (main process; needs
    ``output_dir``). The returned results are COCOEvaluator's, unchanged.
    """

    def __init__(self, dataset_name, *args, tide: bool = False, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self._tide = tide

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if self._tide and results and self._output_dir and comm.is_main_process():
            from .tide import format_tide_table, tide_breakdown

            detections = os.path.join(self._output_dir, "coco_instances_results.json")
            breakdown = tide_breakdown(self._metadata.json_file, detections, self._output_dir)
            logger.info(format_tide_table(breakdown) + f"\n(written to {os.path.join(self._output_dir, 'tide.json')})")
        return results

    def process(self, inputs, outputs):
        start = len(self._predictions)
        super().process(inputs, outputs)
        for prediction, output in zip(self._predictions[start:], outputs):
            instances = output.get("instances")
            if instances is None or not instances.has("mask_scores") or "instances" not in prediction:
                continue
            # instances_to_coco_json keeps the order of the Instances, so results align one to one.
            for result, mask_score in zip(prediction["instances"], instances.mask_scores.tolist()):
                result["mask_score"] = mask_score

    def _eval_predictions(self, predictions, img_ids=None):
        results = [r for p in predictions for r in p.get("instances", [])]
        rescored = any("mask_score" in r for r in results)
        # COCOEvaluator infers the tasks from the results when none were given.
        tasks = set(self._tasks or self._tasks_from_predictions(results))
        if not rescored or "segm" not in tasks:
            return super()._eval_predictions(predictions, img_ids)
        original_tasks = self._tasks
        # COCOEvaluator maps category ids in place: each pass gets its own copy of the results.
        masked = copy.deepcopy(predictions)
        try:
            self._tasks = tuple(tasks - {"segm"})
            if self._tasks:
                super()._eval_predictions(predictions, img_ids)
            for p in masked:
                for r in p.get("instances", []):
                    r["box_score"] = r["score"]
                    r["score"] = r.get("mask_score", r["score"])
            self._tasks = ("segm",)
            super()._eval_predictions(masked, img_ids)
        finally:
            self._tasks = original_tasks
