"""The one engine (yolact_d2/engine.py, yolact_d2/console.py): what the entry points print on start,
and the main job's short console."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from helpers import run_script_in_process

ANSI = re.compile(r"\x1b\[")


@pytest.mark.slow
def test_entry_points_print_no_dependency_warning_on_start():
    """train_net.py, the demo, every tool and ``import yolact_d2`` start without torch's
    ``torch.jit.script`` FutureWarning or the CUDA_HOME line (yolact_d2/console.py, imported first).
    Real interpreters: the warnings come at import time, which an in-process run pays only once."""
    scripts = ["train_net.py", "demo/demo.py", *sorted(f"tools/{p.name}" for p in (REPO / "tools").glob("*.py"))]
    runs = [[s, "--help"] for s in scripts] + [["-c", "import yolact_d2; import detectron2.engine; print('usage: imported')"]]
    procs = [subprocess.Popen([sys.executable, *a], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for a in runs]
    for args, proc in zip(runs, procs):
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, (args, text[-2000:])
        assert "usage:" in text, (args, text[-2000:])
        assert "Warning" not in text and "CUDA_HOME" not in text, (args, text[-2000:])


@pytest.mark.slow
def test_main_job_console_is_short_and_evaluates_once(tmp_path):
    """Two iterations of the README's main job: a console for a person (set-up line, dataset
    summary, prior fit, iterations, one AP table per task, summary) under 100 lines with no
    colour codes when redirected; everything else in OUTPUT_DIR/log.txt; one evaluation."""
    out = tmp_path / "job"
    run = run_script_in_process(REPO / "tools/main_job.py", ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)],
                                cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    console = run.stdout + run.stderr
    lines = console.splitlines()
    assert len(lines) < 100, console
    assert not ANSI.search(console)
    assert sum(line.startswith("main job: ") for line in lines) == 1, console
    assert "Distribution of instances" in console and "Prior coverage of the training set" in console
    assert console.count("Evaluation results for bbox") == 1 and console.count("Evaluation results for segm") == 1
    assert "Average Precision" not in console and "Running with full config" not in console  # pycocotools, config
    log = (out / "log.txt").read_text()
    assert not ANSI.search(log)
    # The full record is in the log, with the evaluation there once: the trainer's own, reused.
    assert "Running with full config" in log and "Environment info" in log and "Model:" in log
    assert log.count("Evaluation results for bbox") == 1 and log.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2
    summary = json.loads((out / "main_job_summary.json").read_text())
    assert summary["iterations"] == 2 and summary["segm"] is not None and summary["bbox"] is not None
    assert 0 < summary["train_seconds"] and summary["eval_seconds"] > 0
