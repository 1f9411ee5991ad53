"""Class names that travel with the weights, and a training set with recoverable faults.

One ``train_net.py --train-json`` run (module fixture, in this process: tests/README.md) trains a tiny model on a two-class COCO
JSON made of Penn-Fudan photos with faults the dataset check recovers from (a truncated JPEG, an
empty segmentation, sparse category ids) and evaluates it on two clean photos. The same model is
then drawn by the demo with a config that names no dataset, evaluated with ``--eval-only`` on a
dataset of another class count, and exported.
"""
import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import DATA, REPO, need
from helpers import run_script_in_process, train_net_in_process

NAMES = ["pedestrian", "bystander"]  # not COCO's first two, so a COCO fallback cannot pass
# A small, fast model on the small-data base config (as tests/test_custom_data.py).
SMALL = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.YOLACT.INPUT_SIZE", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
]


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_two_class_json(src_json, images, out_dir, files, ids=(1, 2)):
    """A COCO JSON of ``files`` (Penn-Fudan names) under ``out_dir`` whose person instances alternate
    between two categories ``ids`` named NAMES; the photos are copied next to it."""
    data = json.loads(src_json.read_text())
    keep = [im for im in data["images"] if im["file_name"] in files]
    image_ids = {im["id"] for im in keep}
    annos = [a for a in data["annotations"] if a["image_id"] in image_ids]
    for i, a in enumerate(annos):
        a["category_id"] = ids[i % 2]
    out_dir.mkdir(parents=True, exist_ok=True)
    for im in keep:
        shutil.copy(images / im["file_name"], out_dir / im["file_name"])
    cats = [{"id": ids[0], "name": NAMES[0]}, {"id": ids[1], "name": NAMES[1]}]
    return {"images": keep, "annotations": annos, "categories": cats}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output folder, completed train_net run, the TEST JSON's photo paths)."""
    root = need(DATA / "pennfudan")
    tmp = tmp_path_factory.mktemp("two_classes")
    photos = sorted(im["file_name"] for im in json.loads((root / "train.json").read_text())["images"])
    # Sparse category ids (7, 42): detectron2 maps them to 0, 1.
    train = make_two_class_json(root / "train.json", root / "images", tmp / "images", photos[:8], ids=(7, 42))
    test = make_two_class_json(root / "train.json", root / "images", tmp / "images", photos[8:10], ids=(7, 42))
    # Recoverable faults in TRAIN: a truncated JPEG and an empty segmentation.
    broken = tmp / "images" / photos[0]
    broken.write_bytes(broken.read_bytes()[:4000])
    train["annotations"][5]["segmentation"] = []
    (tmp / "train.json").write_text(json.dumps(train))
    (tmp / "test.json").write_text(json.dumps(test))
    out = tmp / "run"
    run = train_net_in_process(
        "--config-file", str(REPO / "configs/Base-YOLACT-SmallData.yaml"),
        "--train-json", str(tmp / "train.json"), "--train-images", str(tmp / "images"),
        "--val-json", str(tmp / "test.json"), "--val-images", str(tmp / "images"),
        *SMALL, "OUTPUT_DIR", str(out),
    )
    return out, run, [tmp / "images" / p for p in photos[8:10]], train["annotations"][5]["id"], photos[0]


@pytest.mark.slow
def test_recoverable_faults_train_and_evaluate_without_a_traceback(trained):
    out, run, _, empty_id, truncated = trained
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    log = (out / "log.txt").read_text()
    # One warning names both faults: the file and the JSON annotation id.
    warning = next(line for line in log.splitlines() if "dropped 1 image(s) that cannot be read" in line)
    assert truncated in warning and "truncated JPEG" in warning
    assert f"1 annotation(s) with an empty segmentation (JSON annotation ids {empty_id})" in warning
    assert "copypaste: Task: segm" in log  # evaluated on the TEST JSON
    assert (out / "dataset_check_cache.json").is_file()


def test_every_checkpoint_carries_the_names_and_input_format(trained):
    out = trained[0]
    state = torch.load(out / "model_final.pth", weights_only=False, map_location="cpu")
    assert state["yolact_d2_metadata"]["class_names"] == NAMES
    assert state["yolact_d2_metadata"]["input_format"] == "RGB"


def test_demo_with_a_config_naming_no_dataset_draws_the_checkpoints_names(trained, tmp_path, monkeypatch):
    out, run, photos, _, _ = trained
    assert run.returncode == 0, run.stderr[-3000:]
    # The saved config without its datasets: only the weights can name the classes.
    config = tmp_path / "no_dataset.yaml"
    config.write_text((out / "config.yaml").read_text())
    demo = _load(REPO / "demo" / "demo.py", "demo_for_names")
    cfg = demo.setup_cfg(str(config), ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "DATASETS.TRAIN_JSON", "",
                                       "DATASETS.TRAIN_IMAGES", "", "DATASETS.TEST_JSON", "", "DATASETS.TEST_IMAGES", "",
                                       "MODEL.WEIGHTS", str(out / "model_final.pth"),
                                       "MODEL.YOLACT.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "30"])
    assert not cfg.DATASETS.TRAIN and not cfg.DATASETS.TEST
    monkeypatch.syspath_prepend(str(REPO / "demo"))
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer
    from predictor import VisualizationDemo

    labels = []
    real = Visualizer.overlay_instances

    def record(self, *args, **kwargs):
        labels.extend(kwargs.get("labels") or [])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Visualizer, "overlay_instances", record)
    drawer = VisualizationDemo(cfg, confidence_threshold=0.0)
    photo = read_image(str(photos[0]), format="BGR")[::3, ::3]  # smaller: drawing 30 masks costs less
    instances, _ = drawer.run_on_image(np.ascontiguousarray(photo))
    assert len(instances) > 0 and len(labels) == len(instances)
    # Labels are "<name> <score>%": every one is a name of the checkpoint, and both classes are drawn.
    drawn = {label.rsplit(" ", 1)[0] for label in labels}
    assert drawn == set(NAMES), labels


def test_exported_file_carries_the_same_names(trained, tmp_path):
    out, run, _, _, _ = trained
    assert run.returncode == 0, run.stderr[-3000:]
    onnx_file = tmp_path / "two.onnx"
    # A config naming no dataset: the names come from the weights.
    export = run_script_in_process(REPO / "tools" / "export_model.py", [
        "--config-file", str(REPO / "configs/Base-YOLACT-SmallData.yaml"), "--output", str(onnx_file),
        "--graph", "raw",  # the raw graph's file holds the same metadata, and traces faster
        *SMALL, "MODEL.YOLACT.NUM_CLASSES", "2", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
        "MODEL.WEIGHTS", str(out / "model_final.pth")], cwd=REPO)
    assert export.returncode == 0, export.stderr[-2000:]
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    meta = json.loads(next(v for k, v in props.items() if "yolact" in k))
    assert meta["class_names"] == NAMES


def test_eval_only_on_a_dataset_of_another_class_count_is_one_line(trained):
    out, run, _, _, _ = trained
    assert run.returncode == 0, run.stderr[-3000:]
    run = train_net_in_process(
        "--config-file", str(REPO / "configs/pennfudan/yolact_R_18_FPN_320.yaml"), "--eval-only",
        *SMALL, "MODEL.YOLACT.NUM_CLASSES", "2", "DATASETS.TRAIN", "()", "MODEL.WEIGHTS", str(out / "model_final.pth"),
        "OUTPUT_DIR", str(out / "eval_other"),
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert last.startswith("error: dataset pennfudan_val has 1 classes [person] but ")
    assert "was trained on 2 [pedestrian, bystander]" in last


def test_a_stored_input_format_replaces_the_configs_with_one_warning(caplog):
    import logging

    from conftest import yolact_cfg
    from yolact_d2.checkpoint import adopt_input_format, checkpoint_metadata

    cfg = yolact_cfg()  # RGB, torchvision's mean / std in RGB order
    cfg.freeze()
    model = torch.nn.Module()
    model.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
    model.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
    bgr = {"yolact_d2_metadata": {"class_names": NAMES, "input_format": "BGR", "pixel_mean": [103.5, 116.3, 123.7],
                                  "pixel_std": [57.4, 57.1, 58.4]}}
    meta = checkpoint_metadata(bgr)
    assert meta["class_names"] == NAMES
    assert adopt_input_format(cfg, model, checkpoint_metadata({}), "old.pth") is cfg  # nothing stored: unchanged
    with caplog.at_level(logging.WARNING, logger="yolact_d2.checkpoint"):
        adopted = adopt_input_format(cfg, model, meta, "m.pth")
    assert adopted.INPUT.FORMAT == "BGR" and cfg.INPUT.FORMAT == "RGB"
    assert model.pixel_mean.flatten().tolist() == pytest.approx([103.5, 116.3, 123.7])
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("m.pth was trained with INPUT.FORMAT BGR")
    # A malformed entry is ignored rather than trusted.
    assert checkpoint_metadata({"yolact_d2_metadata": {"class_names": [1, 2], "input_format": "YUV"}}) == {}
