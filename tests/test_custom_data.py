"""Your own COCO-format data with no Python: train_net.py --train-json/--train-images/--val-json/
--val-images, the class checks before training, and the demo finding the class names again."""
import importlib.util
import json

import pytest
import yaml

from conftest import DATA, REPO, need
from helpers import CONFIG, run_script_in_process
# train_net.py and the demo in this process (~5 s of imports less per run); their real subprocesses
# (one user mistake, one internal error each) are in test_errors.py and test_demo.py.
from helpers import train_net_in_process as train_net

# A small, fast model on the small-data base config (R-50 at 550 there). 64 FPN channels: with 32,
# GroupNorm(32) would see one value per group on the 1x1 P7 of a 128 px input at batch 1.
SMALL = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.YOLACT.INPUT_SIZE", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
]


def _load(path):
    spec = importlib.util.spec_from_file_location(f"yolact_demo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_evaluate_and_demo_on_a_coco_json_outside_the_repo(tmp_path):
    """train_net.py trains and evaluates on COCO JSON files given by flags (NUM_CLASSES and mask format set
    from them), and the demo finds the class names again from the saved config and weights."""
    root = need(DATA / "pennfudan")
    out = tmp_path / "run"
    run = train_net(
        "--config-file", str(REPO / "configs/Base-YOLACT-SmallData.yaml"),
        "--train-json", str(root / "train.json"), "--train-images", str(root / "images"),
        "--val-json", str(root / "val.json"), "--val-images", str(root / "images"),
        *SMALL, "OUTPUT_DIR", str(out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "NUM_CLASSES set to 1" in log and "RLE masks: INPUT.MASK_FORMAT set to 'bitmask'" in log
    assert "copypaste: Task: segm" in log  # detectron2's COCOEvaluator ran on the val JSON
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["MODEL"]["YOLACT"]["NUM_CLASSES"] == 1 and saved["INPUT"]["MASK_FORMAT"] == "bitmask"
    assert saved["DATASETS"]["TRAIN_JSON"] == str(root / "train.json")

    # The demo, given the saved config and the weights only, draws with the dataset's names.
    photo = root / "images" / json.loads((root / "val.json").read_text())["images"][0]["file_name"]
    demo = run_script_in_process(
        REPO / "demo/demo.py", ["--config-file", str(out / "config.yaml"), "--input", str(photo),
                                "--output", str(tmp_path / "demo"), "--opts", "MODEL.WEIGHTS", str(out / "model_final.pth")],
        cwd=REPO,
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "demo" / photo.name).is_file()
    from yolact_d2.predictor import resolve_metadata

    cfg = _load(REPO / "demo" / "demo.py").setup_cfg(str(out / "config.yaml"), ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert list(resolve_metadata(cfg).thing_classes) == ["person"]


def test_num_classes_that_does_not_fit_the_dataset_is_named(tmp_path):
    """A NUM_CLASSES that differs from the dataset's class count ends train_net.py with one line naming both
    and the fix."""
    need(DATA / "pennfudan")
    run = train_net("--config-file", CONFIG, "MODEL.YOLACT.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "1",
                    "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert last == ("error: dataset pennfudan_train has 1 classes (person) but MODEL.YOLACT.NUM_CLASSES is 3; "
                    "set MODEL.YOLACT.NUM_CLASSES 1")


def test_class_id_outside_num_classes_is_named():
    """check_dataset_classes names the image and the category id outside [0, NUM_CLASSES)."""
    from yolact_d2.data.dataset_mapper import check_dataset_classes

    dicts = [{"file_name": "a.jpg", "annotations": [{"category_id": 0}]},
             {"file_name": "b.jpg", "annotations": [{"category_id": 0}, {"category_id": 4}]}]
    check_dataset_classes(dicts[:1], ["mine"], None, 1, "MODEL.YOLACT.NUM_CLASSES")
    with pytest.raises(ValueError) as e:
        check_dataset_classes(dicts, ["mine"], None, 4, "MODEL.YOLACT.NUM_CLASSES")
    assert str(e.value) == ("b.jpg (dataset mine): category_id 4 is outside [0, 4) of MODEL.YOLACT.NUM_CLASSES; "
                            "fix the annotation or set MODEL.YOLACT.NUM_CLASSES to the dataset's class count")


def test_bad_coco_json_arguments_are_one_line_errors(tmp_path):
    """A missing COCO JSON, a JSON without its image folder and a JSON without categories are named on
    train_net.py's last stderr line."""
    need(DATA / "pennfudan")
    images = str(DATA / "pennfudan" / "images")
    missing = train_net("--config-file", CONFIG, "--train-json", str(tmp_path / "nope.json"), "--train-images", images)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: COCO JSON {tmp_path / 'nope.json'} not found")
    alone = train_net("--config-file", CONFIG, "--train-json", str(DATA / "pennfudan" / "train.json"))
    assert "DATASETS.TRAIN_JSON and DATASETS.TRAIN_IMAGES go together" in alone.stderr.strip().splitlines()[-1]
    (tmp_path / "bad.json").write_text(json.dumps({"images": [], "annotations": []}))
    bad = train_net("--config-file", CONFIG, "--train-json", str(tmp_path / "bad.json"), "--train-images", images)
    assert "has no 'categories' list" in bad.stderr.strip().splitlines()[-1]


def _resolve(opts):
    """The class names the demo and YolactPredictor use, for the SBD config with ``opts``."""
    from conftest import yolact_cfg
    from yolact_d2.predictor import resolve_metadata

    return resolve_metadata(yolact_cfg("configs/pascal_sbd/yolact_R_50_FPN_550.yaml", opts))


def test_demo_names_follow_the_model_not_coco(caplog):
    """The class names drawn follow the model's dataset (SBD), an explicit CLASS_NAMES override, else COCO's
    with a warning; a wrong name count is an error."""
    import logging

    from yolact_d2.data.datasets import SBD_CLASSES

    # A 20-class SBD model is drawn with SBD's names (registered with them, no data needed).
    assert list(_resolve([]).thing_classes) == SBD_CLASSES
    # An explicit override wins.
    names = [f"thing{i}" for i in range(20)]
    assert list(_resolve(["MODEL.YOLACT.CLASS_NAMES", str(names)]).thing_classes) == names
    # No names anywhere for a 20-class model: COCO's, with a warning naming the fix.
    with caplog.at_level(logging.WARNING, logger="yolact_d2.predictor"):
        meta = _resolve(["DATASETS.TEST", "()", "DATASETS.TRAIN", "()"])
    assert meta.thing_classes[0] == "person"
    assert any("MODEL.YOLACT.CLASS_NAMES" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="CLASS_NAMES has 2 names"):
        _resolve(["MODEL.YOLACT.CLASS_NAMES", "['a', 'b']"])


def test_degenerate_instances_are_dropped_and_counted(caplog):
    """Zero-area boxes and empty masks are dropped and counted (crowd regions kept); a dataset with no usable
    instance is an error."""
    import logging

    from detectron2.structures import BoxMode

    from yolact_d2.data.dataset_mapper import drop_degenerate_annotations

    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    good = {"bbox": [10, 10, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "segmentation": square, "category_id": 0}
    flat = dict(good, bbox=[10, 10, 0, 20])  # zero width
    empty = dict(good, segmentation=[[1.0, 2.0]])  # no polygon of 3 points
    crowd = dict(flat, iscrowd=1)  # crowd regions are kept as they are (they only ignore priors)
    dicts = [{"file_name": "a.jpg", "annotations": [good, flat]}, {"file_name": "b.jpg", "annotations": [empty, crowd]}]
    with caplog.at_level(logging.WARNING, logger="yolact_d2.data.dataset_mapper"):
        out = drop_degenerate_annotations(dicts, ["mine"])
    assert [len(d["annotations"]) for d in out] == [1, 1] and out[1]["annotations"][0]["iscrowd"] == 1
    assert len(dicts[0]["annotations"]) == 2  # the input is not modified
    assert "dataset mine: dropped 2 degenerate instance(s) (zero-area box or empty mask), e.g. in a.jpg" in caplog.text
    with pytest.raises(ValueError, match=r"^dataset mine has no usable instance \(1 images"):
        drop_degenerate_annotations(dicts[1:], ["mine"])


def test_a_dataset_without_usable_instances_stops_train_net(tmp_path):
    """A dataset whose every box is degenerate ends train_net.py with one line naming it."""
    root = need(DATA / "pennfudan")
    data = json.loads((root / "train.json").read_text())
    for a in data["annotations"]:
        a["bbox"][2] = 0.0  # every box degenerate
    (tmp_path / "flat.json").write_text(json.dumps(data))
    run = train_net("--config-file", CONFIG, "--train-json", str(tmp_path / "flat.json"), "--train-images",
                    str(root / "images"), "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out"))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert last.startswith("error: dataset coco_json_train has no usable instance (120 images")
