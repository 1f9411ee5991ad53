"""tools/compare.py: one tiny YOLACT-vs-Mask R-CNN comparison on Penn-Fudan (2 iterations each,
160 px, 6 train / 3 val photos, batch 1), its report checked against what detectron2's evaluator
logged in the training runs and what the timing wrote; README block and bad input; the tool's
plan leaves its arguments alone; the package imports no script."""
import ast
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import DATA, REPO, need

SCRIPT = REPO / "tools" / "compare.py"


@pytest.fixture(scope="module")
def tool():
    """tools/compare.py as a module (tools/ is not a package; only tests load it this way)."""
    spec = importlib.util.spec_from_file_location("compare_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(*args, env=None, timeout=600):
    # One OpenMP thread: two spin-waiting threads on a loaded 2-core machine cost far more than they give.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _subset(src, dst, n):
    data = json.loads(src.read_text())
    data["images"] = data["images"][:n]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dst.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(completed process, report.json dict, output dir, val JSON) of one tiny comparison."""
    pytest.importorskip("detectron2")
    root = need(DATA / "pennfudan")
    tmp = tmp_path_factory.mktemp("compare")
    train = _subset(root / "train.json", tmp / "train.json", 6)
    val = _subset(root / "val.json", tmp / "val.json", 3)
    out = tmp / "out"
    proc = _tool(
        "--iters", 2, "--train-json", train, "--train-images", root / "images", "--val-json", val,
        "--val-images", root / "images", "--num-images", 2, "--vis-images", 2, "--threads", 1, "--output-dir", out,
        "--opts", "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0,
        "--yolact-opts", "MODEL.YOLACT.INPUT_SIZE", 160,
        "--mask-rcnn-opts", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", 200,
        "INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 200,
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return proc, report, out, val


def _ok(run):
    proc, report, out, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report is not None
    return report, out


def _trainer_log_ap(log_txt):
    """{"bbox": [6 values], "segm": [...]} from the last "copypaste" lines that detectron2's
    evaluation (print_csv_format) wrote to a training run's log.txt."""
    lines = [ln.split("copypaste: ", 1)[1].strip() for ln in log_txt.read_text().splitlines() if "copypaste: " in ln]
    out = {}
    for i, ln in enumerate(lines):
        if ln.startswith("Task: "):
            assert lines[i + 1] == "AP,AP50,AP75,APs,APm,APl"
            out[ln[len("Task: "):]] = [float(v) for v in lines[i + 2].split(",")]
    return out


def _same(a, b, tol):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _cell(text):
    return float("nan") if text == "n/a" else float(text)


@pytest.mark.slow
def test_report_files(run):
    report, out = _ok(run)
    for name in ("report.md", "report.json", "speed_accuracy.png", "predictions.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    import cv2

    pic = cv2.imread(str(out / "predictions.png"))
    rows = [cv2.imread(str(out / f"predictions_{k}.png")) for k in ("yolact", "mask_rcnn")]
    # One row per model, stacked: the picture is as tall as both rows (+ a 4 px gap each).
    assert pic.shape[0] == sum(r.shape[0] + 4 for r in rows)
    assert cv2.imread(str(out / "speed_accuracy.png")) is not None
    md = (out / "report.md").read_text()
    assert "![speed vs accuracy](speed_accuracy.png)" in md and "![predictions](predictions.png)" in md
    assert [m["label"] for m in report["models"]] == ["YOLACT", "Mask R-CNN"]


def test_ap_matches_the_evaluator_of_the_training_runs(run, tool):
    """The AP in report.json and report.md equal what COCOEvaluator returned at the end of each
    model's train_net.py run (a different process, read back from its log); yolact_d2.compare.run_ap
    reads the same figures from the run folder."""
    from yolact_d2.compare import METRICS, run_ap

    report, out = _ok(run)
    table = {r["model"]: r for r in tool.parse_markdown_table((out / "report.md").read_text())}
    checked = []
    for m in report["models"]:
        logged = _trainer_log_ap(out / m["key"] / "train" / "log.txt")
        assert set(logged) == {"bbox", "segm"}
        recorded = run_ap(out / m["key"] / "train")
        for task, word in (("bbox", "box"), ("segm", "mask")):
            for name, value in zip(METRICS, logged[task]):
                assert _same(m["eval"][task][name], value, 1e-4), (m["label"], task, name)
                assert _same(recorded[task][name], value, 1e-4), (m["label"], task, name)
                assert _same(_cell(table[m["label"]][f"{word} {name}"]), value, 0.05 + 1e-9), (m["label"], task, name)
                checked.append(value)
        saved = json.loads((out / m["key"] / "eval" / "eval_results.json").read_text())
        assert saved["segm"]["AP"] == pytest.approx(m["eval"]["segm"]["AP"], nan_ok=True)
        assert m["budget"] == "2 iterations (trained here)"
    # Some values differ from 0 and from each other: a swapped column or model would show.
    assert len({v for v in checked if not math.isnan(v) and v > 0}) >= 2


def test_speed_matches_the_timing_json(run, tool):
    report, out = _ok(run)
    _, _, _, val = run
    timing = json.loads((out / "timing.json").read_text())
    table = {r["model"]: r for r in tool.parse_markdown_table((out / "report.md").read_text())}
    assert [t["label"] for t in timing["models"]] == ["YOLACT", "Mask R-CNN"]
    for m, t in zip(report["models"], timing["models"]):
        assert m["ms_per_image"] == pytest.approx(t["end_to_end_per_image_ms"])
        assert m["images_per_s"] == pytest.approx(t["images_per_s"])
        assert float(table[m["label"]]["ms/image"]) == pytest.approx(t["end_to_end_per_image_ms"], abs=0.05 + 1e-9)
        assert float(table[m["label"]]["images/s"]) == pytest.approx(t["images_per_s"], abs=0.005 + 1e-9)
        assert t["end_to_end"]["n"] == 2
    # Timed on the first val photos of the val JSON, both models on the same ones.
    first = [im["file_name"] for im in json.loads(val.read_text())["images"][:2]]
    assert sorted(timing["meta"]["images"]) == sorted(first)


def test_commands_and_environment(run):
    import detectron2
    import torch

    report, out = _ok(run)
    md = (out / "report.md").read_text()
    train_cmds = [ln for ln in md.splitlines() if ln.startswith("python train_net.py") and "--eval-only" not in ln]
    assert len(train_cmds) == 2 and all("SOLVER.MAX_ITER 2" in c for c in train_cmds)
    assert md.count("--eval-only") == 2 and "python tools/benchmark.py" in md
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["detectron2"] == detectron2.__version__
    assert env["threads"] == 1 and env["device"] == "cpu"
    assert f"| torch | {torch.__version__} |" in md


@pytest.mark.slow
def test_readme_table_and_update(run, tmp_path, tool):
    README_BEGIN, README_END, parse_markdown_table = tool.README_BEGIN, tool.README_END, tool.parse_markdown_table
    _, out = _ok(run)
    proc = _tool("--from-report", out / "report.json", "--readme-table")
    assert proc.returncode == 0, proc.stderr
    assert parse_markdown_table(proc.stdout) == parse_markdown_table((out / "report.md").read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    proc = _tool("--from-report", out / "report.json", "--update-page", readme)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith(f"# x\nbefore\n{README_BEGIN}\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text
    assert parse_markdown_table(text) == parse_markdown_table((out / "report.md").read_text())


def test_benchmarks_page_has_the_generated_block(tool):
    """The page --update-page writes (docs/benchmarks.md, where the comparison lives) has its block."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    block = text[text.index(tool.README_BEGIN):text.index(tool.README_END)]
    rows = tool.parse_markdown_table(block)
    assert {"YOLACT", "Mask R-CNN"} <= {r["model"] for r in rows}


def test_scaled_schedule():
    pytest.importorskip("detectron2")
    from yolact_d2.compare import scaled_schedule_opts
    from yolact_d2.config import load_config

    cfg = load_config(str(REPO / "configs/pennfudan/mask_rcnn_R_18_FPN_320.yaml"))  # 200 its, steps (160,), warm-up 20
    assert scaled_schedule_opts(cfg, 50) == ["SOLVER.MAX_ITER", "50", "SOLVER.STEPS", "(40,)", "SOLVER.WARMUP_ITERS", "5"]
    cfg.merge_from_list(scaled_schedule_opts(cfg, 2))  # a step at 2 of 2 is dropped; the result stays valid
    assert cfg.SOLVER.STEPS == () and cfg.SOLVER.MAX_ITER == 2


@pytest.mark.parametrize("args, expected", [
    (["--val-json", "/nonexistent/val.json"], r"^error: dataset file /nonexistent/val\.json not found: give --val-json"),
    (["--yolact-config", "configs/nope.yaml"], r"^error: config configs/nope\.yaml not found: give an existing YAML"),
    (["--opts", "MODEL.NO_SUCH_KEY", "1"], r"^error: options: .*MODEL\.NO_SUCH_KEY"),
    (["--yolact-weights", "/nonexistent/run"], r"^error: weights /nonexistent/run not found: give a \.pth file"),
    (["--exported", "/nonexistent/m.onnx"], r"^error: --exported /nonexistent/m\.onnx: .*not found.*tools/export_model\.py"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_naming_the_fix(args, expected, tmp_path):
    pytest.importorskip("detectron2")
    need(DATA / "pennfudan")
    proc = _tool(*args, "--iters", 1, "--output-dir", tmp_path / "o", timeout=120)
    assert proc.returncode != 0
    # Only the error line (library warnings printed on import may precede it).
    errors = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and re.search(expected, errors[0]), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_exported_graph_gets_its_own_evaluated_and_timed_row(run, tmp_path, tool):
    """--exported: the YOLACT checkpoint of the tiny run exported end to end (ONNX) is evaluated by
    the same evaluator and timed on the same photos; its AP is the eager model's (the graph gives
    the same detections). Skipped where onnxruntime is absent."""
    pytest.importorskip("onnxruntime")
    parse_markdown_table = tool.parse_markdown_table
    _, out = _ok(run)
    _, _, _, val = run
    onnx = tmp_path / "yolact_e2e.onnx"
    proc = subprocess.run(
        [sys.executable, "tools/export_model.py", "--config-file", "configs/pennfudan/yolact_R_18_FPN_320.yaml",
         "--format", "onnx", "--graph", "e2e", "--output", str(onnx),
         "MODEL.WEIGHTS", str(out / "yolact" / "train" / "model_final.pth"), "MODEL.YOLACT.INPUT_SIZE", "160",
         "MODEL.DEVICE", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out2 = tmp_path / "out"
    proc = _tool("--yolact-weights", out / "yolact" / "train", "--mask-rcnn-weights", out / "mask_rcnn" / "train",
                 "--exported", onnx, "--val-json", val, "--val-images", DATA / "pennfudan" / "images",
                 "--num-images", 2, "--vis-images", 1, "--threads", 1, "--output-dir", out2,
                 "--yolact-opts", "MODEL.YOLACT.INPUT_SIZE", 160,
                 "--mask-rcnn-opts", "INPUT.MIN_SIZE_TEST", 160, "INPUT.MAX_SIZE_TEST", 200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out2 / "report.json").read_text())
    row = next(m for m in report["models"] if m["key"] == "exported")
    eager = _trainer_log_ap(out / "yolact" / "train" / "log.txt")
    for task in ("bbox", "segm"):
        for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), eager[task]):
            assert _same(row["eval"][task][name], value, 0.5), (task, name)
    # Timed interleaved with the two models in the same run (timing.json), detections checked against eager.
    bench = json.loads((out2 / "timing.json").read_text())
    timing = next(m for m in bench["models"] if m.get("exported_file") == str(onnx))
    assert row["timing_json"] == str(out2 / "timing.json")
    assert "--exported" in row["eval_command"] and "MODEL.WEIGHTS" not in row["eval_command"]
    table = {r["model"]: r for r in parse_markdown_table((out2 / "report.md").read_text())}
    assert float(table[row["label"]]["ms/image"]) == pytest.approx(timing["end_to_end_per_image_ms"], abs=0.05 + 1e-9)
    assert float(table[row["label"]]["images/s"]) == pytest.approx(timing["images_per_s"], abs=0.005 + 1e-9)
    assert timing["end_to_end"]["n"] == 2


def test_plan_leaves_its_arguments_alone(tool, tmp_path):
    """run_comparison's training commands come from training_plan: the same specs twice give the
    same commands twice, and neither the specs nor the common opts change."""
    pytest.importorskip("detectron2")
    data = tool.Dataset("t.json", "img", "v.json", "img")
    common = ["SOLVER.IMS_PER_BATCH", "1"]
    specs = [tool.ModelSpec("yolact", tool.DEFAULT_CONFIGS["yolact"], None, ["MODEL.YOLACT.INPUT_SIZE", "160"]),
             tool.ModelSpec("mask_rcnn", tool.DEFAULT_CONFIGS["mask_rcnn"], "given.pth")]
    before = [(s.key, s.config, s.weights, tuple(s.opts)) for s in specs]
    first = tool.training_plan(specs, data, tmp_path, 2, common)
    second = tool.training_plan(specs, data, tmp_path, 2, common)
    assert first == second and list(first) == ["yolact"]  # given weights: not trained
    cmd = first["yolact"]
    assert cmd.count("SOLVER.IMS_PER_BATCH") == 1 and cmd.count("MODEL.YOLACT.INPUT_SIZE") == 1
    # The model's own opts after the common ones (they win), then the budget.
    assert cmd.index("SOLVER.IMS_PER_BATCH") < cmd.index("MODEL.YOLACT.INPUT_SIZE") < cmd.index("SOLVER.MAX_ITER")
    assert [(s.key, s.config, s.weights, tuple(s.opts)) for s in specs] == before
    assert common == ["SOLVER.IMS_PER_BATCH", "1"]


SCRIPTS = {"train_net", "tools", "demo"}
LOADERS = {"import_module", "__import__", "spec_from_file_location", "run_path", "run_module", "SourceFileLoader"}


def script_imports(source: str, filename: str = "<string>"):
    """Lines where ``source`` imports a script of the repository (``train_net``, ``tools``, ``demo``)
    or reaches one another way: a loader (importlib, runpy, ``__import__``) or ``sys.path`` changed.
    Returns ``[(line, what)]``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in SCRIPTS]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in SCRIPTS or node.module == "runpy":
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in LOADERS:
                found.append((node.lineno, name))
            # sys.path.insert / append / extend
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) and f.value.attr == "path" \
                    and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys":
                found.append((node.lineno, f"sys.path.{f.attr}"))
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                t = t.value if isinstance(t, ast.Subscript) else t
                if isinstance(t, ast.Attribute) and t.attr == "path" and getattr(t.value, "id", None) == "sys":
                    found.append((node.lineno, "sys.path assignment"))
        if isinstance(node, ast.Import) and any(a.name == "runpy" for a in node.names):
            found.append((node.lineno, "runpy"))
    return found


@pytest.mark.parametrize("source", [
    "import train_net", "from tools import benchmark", "import demo.demo", "from train_net import main",
    "import importlib\nimportlib.import_module('train_net')", "import importlib.util as u\nu.spec_from_file_location('b', 'tools/b.py')",
    "import runpy\nrunpy.run_path('tools/compare.py')", "import sys\nsys.path.insert(0, '..')", "import sys\nsys.path += ['..']",
    "x = __import__('tools.compare')",
])
def test_script_import_detector_catches(source):
    assert script_imports(source), source


def _script_names():
    """The repository's scripts: train_net.py and every file of demo/ and tools/ that runs as
    ``__main__`` (demo/predictor.py is the demo's module, as in detectron2's demo)."""
    paths = [REPO / "train_net.py", *sorted((REPO / "demo").glob("*.py")), *sorted((REPO / "tools").glob("*.py"))]
    return [p for p in paths if "__main__" in p.read_text()]


def test_no_script_imports_another_script():
    """train_net.py, demo/ and tools/ import the package, not each other (nor change sys.path to
    reach one): what two scripts share lives in yolact_d2/ (e.g. the Trainer, yolact_d2/engine.py)."""
    scripts = _script_names()
    assert {"train_net.py", "demo.py", "main_job.py", "compare.py"} <= {p.name for p in scripts}
    siblings = {p.stem for p in scripts}
    offenders = []
    for path in scripts:
        source = path.read_text()
        found = script_imports(source, str(path))
        # Run as a script, its folder is on sys.path: "import main_job" would reach tools/main_job.py.
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            found += [(node.lineno, n) for n in names if n.split(".")[0] in siblings]
        offenders += [f"{path.relative_to(REPO)}:{line}: {what}" for line, what in found]
    assert not offenders, "a script must not depend on another script: " + "; ".join(offenders)


def test_package_imports_no_script():
    """Nothing under yolact_d2/ imports train_net.py, tools/ or demo/, or loads them another way."""
    offenders = []
    for path in sorted((REPO / "yolact_d2").rglob("*.py")):
        offenders += [f"{path.relative_to(REPO)}:{line}: {what}" for line, what in script_imports(path.read_text(), str(path))]
    assert not offenders, "the package must not depend on the scripts around it: " + "; ".join(offenders)
