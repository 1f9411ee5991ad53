"""Weights that cannot run code, one strict loader, checkpoints that survive a crash (yolact_d2/checkpointer.py).

Malicious files are made here: a ``.pkl`` and a ``.pth`` whose unpickling would run a shell command
that creates a marker file. Each entry point gets them, a truncated checkpoint, random bytes and a
checkpoint of another model; no marker may appear, and each ends with one line naming the file.
"""
import ast
import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import DATA, REPO, need
from helpers import CONFIG as RECIPE, TINY, run_script_in_process
from yolact_d2.checkpointer import (
    DiskFullError, PeriodicCheckpointer, UnreadableCheckpointError, UnsafeCheckpointError, YolactCheckpointer,
    read_checkpoint,
)

CONFIG = str(REPO / "configs/yolact_R_50_FPN_550.yaml")
SMALL = ["MODEL.YOLACT.INPUT_SIZE", "160", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.DEVICE", "cpu"]


class _Payload:
    """Unpickling this calls os.system (posix.system): it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _bad_files(folder: Path) -> dict:
    marker = folder / "PAYLOAD_RAN"
    files = {name: folder / name for name in ("evil.pkl", "evil.pth", "truncated.pth", "random.pth", "foreign.pth")}
    with open(files["evil.pkl"], "wb") as f:
        pickle.dump({"model": {"w": _Payload(marker)}, "__author__": "x"}, f, protocol=2)
    torch.save({"model": {"w": _Payload(marker)}}, files["evil.pth"])
    torch.save({"model": {"w": torch.zeros(20000)}}, folder / "whole.pth")
    whole = (folder / "whole.pth").read_bytes()
    files["truncated.pth"].write_bytes(whole[: len(whole) // 2])
    files["random.pth"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"model": {"not_a_yolact.weight": torch.zeros(3)}}, files["foreign.pth"])
    return files


EXPECTED = {"evil.pkl": "refused: loading it would call posix.system", "evil.pth": "refused: loading it would call posix.system",
            "truncated.pth": "is not a readable checkpoint", "random.pth": "is not a readable checkpoint",
            "foreign.pth": "does not fit this model: it fills 0 of"}


def test_the_unpickler_allows_exact_numpy_globals_only(tmp_path):
    """The .pkl allow-list holds exact (module, name) pairs: nothing module-wide, no builtins callable."""
    from yolact_d2.checkpointer import PICKLE_GLOBALS

    modules = {m for m, _ in PICKLE_GLOBALS}
    assert "builtins" not in modules and all(n and n != "*" for _, n in PICKLE_GLOBALS)
    for module, name in (("builtins", "eval"), ("numpy", "load"), ("numpy.core.multiarray", "fromstring"),
                         ("os", "system"), ("subprocess", "Popen")):
        path = tmp_path / f"{name}.pkl"
        # A pickle that asks for the global (protocol 0 GLOBAL opcode), whatever it would call.
        path.write_bytes(f"c{module}\n{name}\n.".encode())
        with pytest.raises(UnsafeCheckpointError, match=rf"{module}\.{name}"):
            read_checkpoint(str(path))


@pytest.mark.parametrize("protocol", [2, 5])
def test_model_zoo_and_caffe2_pkl_load_with_equal_tensors(tmp_path, protocol):
    """detectron2 model-zoo .pkl (numpy arrays under "model", numpy 1 and 2 pickles) and a Caffe2-style
    one (under "blobs", momenta dropped) load through the restricted unpickler into equal tensors."""
    from detectron2.modeling import build_model

    from conftest import yolact_cfg

    model = build_model(yolact_cfg(opts=SMALL))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    zoo, caffe2 = tmp_path / "zoo.pkl", tmp_path / "caffe2.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": OrderedDict(state), "__author__": "Detectron2 Model Zoo", "x": np.float32(1)}, f,
                    protocol=protocol)
    with open(caffe2, "wb") as f:
        pickle.dump({"blobs": {"a": np.ones(3, np.float32), "a_momentum": np.ones(3, np.float32)}}, f, protocol=protocol)
    target = build_model(yolact_cfg(opts=SMALL))
    YolactCheckpointer(target).load(str(zoo))
    loaded = target.state_dict()
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())
    data = YolactCheckpointer(target)._load_file(str(caffe2))
    assert set(data["model"]) == {"a"} and data["__author__"] == "Caffe2"


def test_torch_checkpoints_load_with_weights_only_and_resume_state_round_trips(tmp_path):
    """Our checkpoint with its trainer state (iteration, optimizer, scheduler, metadata) saves and loads
    back equal through the safe checkpointer; a torchvision ResNet state_dict loads."""
    torchvision = pytest.importorskip("torchvision")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [5])
    saver = YolactCheckpointer(model, str(tmp_path), optimizer=opt, scheduler=sched)
    saver.save("model_0000004", iteration=4, meta={"class_names": ["a", "b"], "priors": {"scales": [[24.0]]}})
    data = read_checkpoint(str(tmp_path / "model_0000004.pth"))
    assert data["iteration"] == 4 and data["meta"]["class_names"] == ["a", "b"]
    torch.testing.assert_close(data["optimizer"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    fresh = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    extra = YolactCheckpointer(fresh, str(tmp_path), optimizer=opt2).resume_or_load("", resume=True)
    assert extra["iteration"] == 4 and torch.equal(fresh.weight, model.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    assert "fc.weight" in read_checkpoint(str(r18))


def test_bad_files_are_refused_without_running_code(tmp_path):
    files = _bad_files(tmp_path)
    for name in ("evil.pkl", "evil.pth"):
        with pytest.raises(UnsafeCheckpointError) as e:
            read_checkpoint(str(files[name]))
        message = str(e.value)
        assert str(files[name]) in message and "posix.system" in message and "--trust-pickle" in message
        assert "\n" not in message and "weights_only=False" not in message
    for name in ("truncated.pth", "random.pth"):
        with pytest.raises(UnreadableCheckpointError, match="not a readable checkpoint"):
            read_checkpoint(str(files[name]))
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_trust_pickle_converts_a_trusted_file_once(tmp_path):
    """--trust-pickle re-saves a pickled .pkl of numpy arrays (with a harmless extra global) as a file the
    safe loader reads; without it the tool refuses the same file in one line."""
    src, dst = tmp_path / "old.pkl", tmp_path / "new.pth"
    with open(src, "wb") as f:  # a set is fine for pickle, but not among the weights' globals
        pickle.dump({"model": {"a.weight": np.arange(6, dtype=np.float32)}, "__author__": "x",
                     "tags": {"set": set()}, "fn": np.add}, f)
    tool = REPO / "tools/convert_original_weights.py"
    refused = run_script_in_process(tool, [str(src), str(dst)])
    assert refused.returncode != 0 and "numpy.core._multiarray_umath.add" in refused.stderr and "Traceback" not in refused.stderr
    done = run_script_in_process(tool, ["--trust-pickle", str(src), str(dst)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(read_checkpoint(str(dst))["model"]["a.weight"], torch.arange(6, dtype=torch.float32))


# ----------------------------------------------------------------------------- every entry point
ENTRY_POINTS = ["predictor", "train", "eval_only", "demo", "export", "benchmark", "compare"]


@pytest.fixture(scope="module")
def entry_point_runs(tmp_path_factory):
    """Every bad file through every entry point, in this process (one interpreter start for all)."""
    d = tmp_path_factory.mktemp("bad_weights")
    files = _bad_files(d)
    photo = d / "photo.jpg"
    cv2.imwrite(str(photo), np.full((96, 128, 3), 127, np.uint8))
    from conftest import yolact_cfg
    from yolact_d2.predictor import YolactPredictor

    runs = {}
    for name, path in files.items():
        w = str(path)
        cmds = {
            "train": (REPO / "train_net.py", ["--config-file", RECIPE, *TINY, "MODEL.WEIGHTS", w, "SOLVER.MAX_ITER", "1",
                                               "OUTPUT_DIR", str(d / "train")]),
            "eval_only": (REPO / "train_net.py", ["--config-file", CONFIG, "--eval-only", *SMALL, "DATASETS.TEST", "()",
                                                   "MODEL.WEIGHTS", w, "OUTPUT_DIR", str(d / "eval")]),
            "demo": (REPO / "demo/demo.py", ["--input", str(photo), "--output", str(d / "out.jpg"),
                                             "--opts", *SMALL, "MODEL.WEIGHTS", w]),
            "export": (REPO / "tools/export_model.py", ["--config-file", CONFIG, "--output", str(d / "m.onnx"),
                                                        *SMALL, "MODEL.WEIGHTS", w]),
            "benchmark": (REPO / "tools/benchmark.py", ["--config-file", CONFIG, "--weights", w, "--images", str(photo),
                                                        "--num-images", "1", "--opts", *SMALL]),
            "compare": (REPO / "tools/compare.py", ["--yolact-weights", w, "--mask-rcnn-weights", w,
                                                    "--output-dir", str(d / "compare")]),
        }
        for entry, (script, argv) in cmds.items():
            if entry in ("train", "compare") and not (DATA / "pennfudan").is_dir():
                continue
            runs[entry, name] = run_script_in_process(script, argv, cwd=d)
        try:
            YolactPredictor(yolact_cfg(opts=SMALL + ["MODEL.WEIGHTS", w]))
            runs["predictor", name] = "loaded"
        except Exception as e:  # the one-line message, as an entry point would print it
            runs["predictor", name] = subprocess.CompletedProcess([], 1, "", f"{type(e).__name__}: {e}\n")
    return d, runs


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_bad_weights_in_one_line(entry_point_runs, entry):
    """Malicious .pkl/.pth: no payload runs; they, a truncated file and random bytes end each entry point
    with one line naming the file and the problem, no traceback; a checkpoint of another model is
    refused by every entry point too (training: it fills 0% of the model)."""
    d, runs = entry_point_runs
    if not any(e == entry for e, _ in runs):
        pytest.skip("needs ../shared/data/pennfudan")
    assert not (d / "PAYLOAD_RAN").exists()
    for name, expected in EXPECTED.items():
        proc = runs[entry, name]
        assert proc != "loaded", f"{entry} accepted {name}"
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert name in last and expected in last, (name, last)
        assert "weights_only=False" not in proc.stderr


def test_no_unsafe_load_in_the_project():
    """Every torch.load in yolact_d2, tools, demo and train_net.py passes weights_only=True, and nothing
    unpickles but the restricted unpickler, except the one --trust-pickle function that says so."""
    files = [REPO / "train_net.py", *(REPO / "yolact_d2").rglob("*.py"), *(REPO / "tools").glob("*.py"),
             *(REPO / "demo").glob("*.py")]
    unsafe = []
    for path in files:
        tree = ast.parse(path.read_text())
        allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_trusted_load"
                   for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in allowed:
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") or \
                    name in ("np.load", "numpy.load") and kwargs.get("allow_pickle") == "True":
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert not unsafe, unsafe
    assert (REPO / "tools/convert_original_weights.py").read_text().count("def _trusted_load") == 1


# ----------------------------------------------------------------------------- saving
def _saver(tmp_path):
    model = torch.nn.Linear(200, 200)
    return model, YolactCheckpointer(model, str(tmp_path))


def test_a_save_that_fails_halfway_leaves_the_earlier_files(tmp_path, monkeypatch):
    """A writer that raises halfway (and one that hits ENOSPC) leaves no file under the new checkpoint's
    name, no temporary file, last_checkpoint and the earlier checkpoint unchanged; ENOSPC is one line
    naming the folder and the free space."""
    model, saver = _saver(tmp_path)
    saver.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_save = torch.save

    def half_then(error):
        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)  # half of it written, as when a process dies mid-write
            raise error
        return save

    for error in (RuntimeError("simulated crash while writing"), OSError(errno.ENOSPC, "No space left on device")):
        monkeypatch.setattr(torch, "save", half_then(error))
        with torch.no_grad():
            model.weight.add_(1)
        with pytest.raises(DiskFullError if isinstance(error, OSError) else RuntimeError) as e:
            saver.save("model_0000003")
        assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
        assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
        assert (tmp_path / "model_0000001.pth").read_bytes() == before
    message = str(e.value)
    assert str(tmp_path) in message and "MB free" in message and "\n" not in message


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_earlier_checkpoints_load(tmp_path, monkeypatch):
    """train_net.py whose second checkpoint save hits ENOSPC: one line, no traceback (detectron2's
    "Exception during training" record stays in log.txt); the first checkpoint is intact and named by
    last_checkpoint."""
    need(DATA / "pennfudan")
    out = tmp_path / "run"
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    proc = run_script_in_process(REPO / "train_net.py", ["--config-file", RECIPE, *TINY, "SOLVER.MAX_ITER", "4",
                                                         "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left in") and "model_0000003.pth" in last
    assert "Exception during training" in (out / "log.txt").read_text()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert read_checkpoint(str(out / "model_0000001.pth"))["iteration"] == 1
    assert not [n for n in os.listdir(out) if n.startswith(".incomplete-")]


def _one_image_json(folder: Path) -> list:
    """A one-photo Penn-Fudan training set: with no augmentation every batch is the same, so a resumed
    run can repeat the uninterrupted one exactly. (On real data it cannot: detectron2's sampler and the
    augmentations' random stream restart from the seed on --resume, as with the flip alone here,
    where the resumed weights differed by up to 0.6.)"""
    src = json.loads(need(DATA / "pennfudan" / "train.json").read_text())
    image = src["images"][0]
    one = dict(src, images=[image], annotations=[a for a in src["annotations"] if a["image_id"] == image["id"]])
    (folder / "one.json").write_text(json.dumps(one))
    return ["--train-json", str(folder / "one.json"), "--train-images", str(DATA / "pennfudan" / "images")]


def test_a_kill_mid_save_leaves_only_complete_files(tmp_path):
    """A process killed (os._exit: no clean-up, no finally) halfway through writing its second
    checkpoint leaves the first complete and named by last_checkpoint, and the half-written data
    only under a temporary name."""
    code = textwrap.dedent(f"""
        import os, torch
        from yolact_d2.checkpointer import YolactCheckpointer
        saver = YolactCheckpointer(torch.nn.Linear(300, 300), {str(tmp_path)!r})
        saver.save("model_0000001", iteration=1)
        real = torch.save
        def save(obj, f, *a, **k):
            real(obj, f, *a, **k)
            f.flush(); f.truncate(f.tell() // 2); f.flush()
            os._exit(137)
        torch.save = save
        saver.save("model_0000003", iteration=3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 137, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if not n.startswith(".")] == ["last_checkpoint", "model_0000001.pth"]
    assert len(names) == 3 and names[0].startswith(".incomplete-model_0000003.pth.")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert read_checkpoint(str(tmp_path / "model_0000001.pth"))["iteration"] == 1


@pytest.mark.slow
def test_resume_from_the_last_complete_checkpoint_repeats_the_run_left_alone(tmp_path):
    """--resume in a folder holding the first periodic checkpoint and what a killed save leaves (a
    temporary file) continues at the right iteration and learning rate and ends with weights
    bit-identical to the run left alone; the temporary file is removed; with
    SOLVER.CHECKPOINTS_TO_KEEP 1 the older periodic file is deleted, the one of the earlier run
    counted, and the last iteration writes model_final.pth alone."""
    import shutil

    data = _one_image_json(tmp_path)
    args = ["--config-file", RECIPE, *data, *TINY, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "0", "INPUT.SSD.ENABLED", "False",
            "INPUT.RANDOM_FLIP", "none", "SEED", "1"]
    alone, resumed = tmp_path / "alone", tmp_path / "resumed"
    whole = run_script_in_process(REPO / "train_net.py", [*args, "OUTPUT_DIR", str(alone)], cwd=REPO)
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed.mkdir()
    shutil.copy(alone / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    (resumed / ".incomplete-model_0000003.pth.x1y2").write_bytes(b"half a checkpoint")
    run = run_script_in_process(REPO / "train_net.py", ["--resume", *args, "SOLVER.CHECKPOINTS_TO_KEEP", "1",
                                                        "OUTPUT_DIR", str(resumed)], cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Starting training from iteration 2" in (resumed / "log.txt").read_text()
    assert sorted(n for n in os.listdir(resumed) if n.endswith(".pth") or n.startswith(".")) == \
        ["model_0000003.pth", "model_final.pth"]
    a, b = (read_checkpoint(str(out / "model_final.pth")) for out in (resumed, alone))
    assert a["iteration"] == b["iteration"] == 5
    # The step schedule went on from the checkpoint's place (lr after the drop at iteration 3).
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    last_a, last_b = (json.loads((out / "metrics.json").read_text().splitlines()[-1]) for out in (resumed, alone))
    assert last_a["iteration"] == 5 and last_a["lr"] == last_b["lr"] == pytest.approx(0.001)
    # (Their logged losses are medians over each run's own history, 4 vs 6 iterations: the weights say more.)
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_every_trainer_hook_saves_through_the_safe_checkpointer(tmp_path):
    """The trainer's checkpointer, the one its periodic hook holds, and that hook's class are the safe ones
    (detectron2 builds them inside DefaultTrainer.__init__; replacing one afterwards would miss the hook)."""
    need(DATA / "pennfudan")
    from detectron2.engine import hooks

    from yolact_d2.checkpoint import CHECKPOINT_METADATA_KEY
    from yolact_d2.config import load_config
    from yolact_d2.data.datasets import register_builtin_datasets
    from yolact_d2.engine import Trainer

    register_builtin_datasets()
    cfg = load_config(RECIPE, TINY + ["OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINTS_TO_KEEP", "2"])
    trainer = Trainer(cfg)
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert len(periodic) == 1 and isinstance(periodic[0], PeriodicCheckpointer)
    assert type(trainer.checkpointer) is YolactCheckpointer and periodic[0].checkpointer is trainer.checkpointer
    assert periodic[0].max_to_keep == 2 and CHECKPOINT_METADATA_KEY in trainer.checkpointer.checkpointables


def test_trained_weights_prefers_the_given_file_then_the_best_then_the_final(tmp_path, caplog):
    from yolact_d2.checkpointer import trained_weights

    caplog.set_level("INFO", logger="yolact_d2")
    assert trained_weights("given.pth", str(tmp_path)) == "given.pth"
    assert trained_weights("", str(tmp_path)) == "" and "holds no model_best.pth or model_final.pth" in caplog.text
    (tmp_path / "model_final.pth").write_bytes(b"")
    assert trained_weights("", str(tmp_path)) == str(tmp_path / "model_final.pth")
    (tmp_path / "model_best.pth").write_bytes(b"")
    assert trained_weights("", str(tmp_path)) == str(tmp_path / "model_best.pth")
    assert f"MODEL.WEIGHTS is empty: using {tmp_path / 'model_best.pth'} (the best periodic evaluation)" in caplog.text
