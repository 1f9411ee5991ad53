"""Drawing helper of the demo: runs :class:`yolact_d2.predictor.YolactPredictor` and draws its output.

Kept apart from ``demo.py`` (argument handling) as in detectron2's own demo.
"""
from typing import Iterable, Iterator, Tuple

import numpy as np

from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from yolact_d2.predictor import YolactPredictor, resolve_metadata  # noqa: F401  (re-exported)

__all__ = ["VisualizationDemo", "resolve_metadata"]


class VisualizationDemo:
    """Predict and draw instances on BGR images or video frames.

    Args:
        cfg: a YOLACT config (see :class:`YolactPredictor` for what it loads and raises).
        confidence_threshold: instances scoring below it (in [0, 1]) are not drawn.
    """

    def __init__(self, cfg, confidence_threshold: float = 0.3):
        self.predictor = YolactPredictor(cfg)
        self.metadata = self.predictor.metadata  # resolved once, after the weights (and their names) were read
        self.confidence_threshold = confidence_threshold

    @classmethod
    def from_exported(cls, path: str, confidence_threshold: float = 0.3) -> "VisualizationDemo":
        """The demo on an exported end-to-end graph (:class:`yolact_d2.runtime.ExportedPredictor`;
        ``FILE.onnx@openvino`` picks OpenVINO); class names come from the file. Raises what
        ``ExportedPredictor`` raises."""
        from detectron2.data.catalog import Metadata

        from yolact_d2.runtime import ExportedPredictor

        demo = cls.__new__(cls)
        demo.predictor = ExportedPredictor.open(path)
        demo.metadata = Metadata(name=f"exported:{path}", thing_classes=demo.predictor.class_names)
        demo.confidence_threshold = confidence_threshold
        return demo

    def _filter(self, predictions) -> Instances:
        instances = predictions["instances"].to("cpu")
        return instances[instances.scores >= self.confidence_threshold]

    def run_on_image(self, image: np.ndarray) -> Tuple[Instances, VisImage]:
        """Predict on one (H, W, 3) uint8 BGR image; returns the kept instances (CPU) and the
        drawing (``VisImage``; ``get_image()`` gives (H, W, 3) uint8 RGB)."""
        instances = self._filter(self.predictor(image))
        visualizer = Visualizer(image[:, :, ::-1], self.metadata, instance_mode=ColorMode.IMAGE)
        return instances, visualizer.draw_instance_predictions(predictions=instances)

    def run_on_video(self, frames: Iterable[np.ndarray]) -> Iterator[Tuple[Instances, np.ndarray]]:
        """Predict on BGR frames one at a time; yields the kept instances and the drawn frame,
        (H, W, 3) uint8 BGR, with colours kept per tracked instance across frames."""
        visualizer = VideoVisualizer(self.metadata, ColorMode.IMAGE)
        for frame in frames:
            instances = self._filter(self.predictor(frame))
            drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield instances, np.ascontiguousarray(drawn.get_image()[:, :, ::-1])
