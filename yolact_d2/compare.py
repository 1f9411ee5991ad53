"""YOLACT (and optionally YOLACT++) side by side with detectron2's Mask R-CNN on one dataset.

:func:`run_comparison` does, for each model, with the repository's own tools:

1. **train** with ``train_net.py`` in a subprocess (same trainer, same data, the same ``--iters``
   budget for every model: ``SOLVER.MAX_ITER`` and ``SOLVER.STEPS`` / ``WARMUP_ITERS`` scaled), or
   take a given checkpoint or run folder;
2. **evaluate** with ``train_net.main`` in ``--eval-only`` mode (detectron2's ``COCOEvaluator``
   through the trainer's ``test``) on the same val split; the returned dict is saved as
   ``<model>/eval/eval_results.json``;
3. **time** all models end to end in one process on the same val photos with
   ``tools/benchmark.py``'s ``main`` (imported, not copied): ``timing.json``;
4. **draw** each model's predictions on the same val photos with ``tools/visualize_predictions.py``
   and stack them into one picture, one row per model;
5. **report**: ``report.md`` (table of box / mask AP, AP50, AP75, APs/m/l, ms/image and images/s;
   speed/accuracy plot; pictures; exact commands; environment) and ``report.json`` (every figure).

:func:`markdown_table` renders the table of a ``report.json``; :func:`update_readme` writes it
between ``<!-- compare:begin -->`` and ``<!-- compare:end -->`` of the README.

User mistakes (missing dataset, unknown config, missing weights, failed training) raise
:class:`CompareError` with a one-line message naming the problem and the fix.
"""
import contextlib
import datetime
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import YolactUserError

__all__ = [
    "CompareError", "ModelSpec", "Dataset", "METRICS", "README_BEGIN", "README_END",
    "scaled_schedule_opts", "resolve_weights", "run_comparison", "markdown_table", "render_markdown",
    "update_readme", "parse_markdown_table",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = (("bbox", "box"), ("segm", "mask"))
README_BEGIN = "<!-- compare:begin -->"
README_END = "<!-- compare:end -->"
DEFAULT_CONFIGS = {
    "yolact": "configs/pennfudan/yolact_R_18_FPN_320.yaml",
    "mask_rcnn": "configs/pennfudan/mask_rcnn_R_18_FPN_320.yaml",
    "yolact_plus": "configs/pennfudan/yolact_plus_R_50_FPN_320.yaml",
}
LABELS = {"yolact": "YOLACT", "yolact_plus": "YOLACT++", "mask_rcnn": "Mask R-CNN"}


class CompareError(YolactUserError, ValueError):
    """A user mistake in a comparison (specs, report, README markers): one line naming the fix."""


@dataclass
class ModelSpec:
    """One compared model.

    Attributes:
        key: ``yolact``, ``yolact_plus`` or ``mask_rcnn`` (output sub-folder name).
        config: config file path (absolute or relative to the working directory / repository).
        weights: checkpoint file or train_net run folder to evaluate; ``None``: train first.
        opts: KEY VALUE config overrides used for training, evaluation, timing and pictures.
    """

    key: str
    config: str
    weights: Optional[str] = None
    opts: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)


@dataclass
class Dataset:
    """A COCO instances dataset: train (needed only to train) and val JSON + image folders."""

    train_json: Optional[str]
    train_images: Optional[str]
    val_json: str
    val_images: str

    @classmethod
    def pennfudan(cls) -> "Dataset":
        """Penn-Fudan under the data root (``$YOLACT_D2_DATA``, else ``../shared/data``)."""
        from yolact_d2.data.datasets import default_data_root

        root = default_data_root() / "pennfudan"
        return cls(str(root / "train.json"), str(root / "images"), str(root / "val.json"), str(root / "images"))

    def check(self, need_train: bool) -> None:
        """Raises CompareError naming the first missing file or folder and the options that fix it."""
        pairs = [("--val-json", self.val_json, False), ("--val-images", self.val_images, True)]
        if need_train:
            pairs += [("--train-json", self.train_json, False), ("--train-images", self.train_images, True)]
        for flag, path, is_dir in pairs:
            ok = path and (Path(path).is_dir() if is_dir else Path(path).is_file())
            if not ok:
                raise CompareError(
                    f"dataset {'folder' if is_dir else 'file'} {path} not found: give {flag} (a COCO instances "
                    f"dataset), or put Penn-Fudan under ../shared/data/pennfudan or $YOLACT_D2_DATA/pennfudan")

    def val_file_names(self) -> List[str]:
        """Image file names of the val JSON, in its order."""
        with open(self.val_json) as f:
            return [im["file_name"] for im in json.load(f)["images"]]

    def num_classes(self) -> int:
        from yolact_d2.data.custom import read_coco_categories

        try:
            return len(read_coco_categories(self.val_json)[0])
        except (FileNotFoundError, ValueError) as e:
            raise CompareError(str(e)) from None


# ----------------------------------------------------------------------------- configs and weights
def resolve_config(path: str) -> str:
    """An existing config file: ``path`` as given, else relative to the repository root.

    Raises:
        CompareError: neither exists (named, with the fix).
    """
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return str(candidate)
    raise CompareError(f"config {path} not found: give an existing YAML file (e.g. {DEFAULT_CONFIGS['yolact']})")


def load_cfg(config: str, opts: Sequence[str] = ()):
    """The detectron2 config of ``config`` + ``opts`` (YOLACT keys added), not frozen.

    Raises:
        CompareError: an unknown key or bad value, named.
    """
    from detectron2.config import get_cfg

    from yolact_d2 import add_yolact_config

    cfg = get_cfg()
    add_yolact_config(cfg)
    try:
        cfg.merge_from_file(config)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:  # yacs: unknown key, bad value or type
        raise CompareError(f"config {config} / opts: {e.args[0] if e.args else e} (fix the key or value)") from None
    return cfg


def scaled_schedule_opts(cfg, iters: int) -> List[str]:
    """Opts that set ``SOLVER.MAX_ITER`` to ``iters`` and scale ``SOLVER.STEPS`` and
    ``SOLVER.WARMUP_ITERS`` by ``iters / MAX_ITER`` (steps that fall at 0 or at/after the end are
    dropped), so every model keeps its schedule's shape at the same budget."""
    if iters < 1:
        raise CompareError(f"--iters {iters}: give a positive number of iterations")
    scale = iters / cfg.SOLVER.MAX_ITER
    steps = sorted({int(round(s * scale)) for s in cfg.SOLVER.STEPS} - {0})
    steps = [s for s in steps if s < iters]
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "(" + "".join(f"{s}," for s in steps) + ")",
            "SOLVER.WARMUP_ITERS", str(int(round(cfg.SOLVER.WARMUP_ITERS * scale)))]


def resolve_weights(weights: str) -> str:
    """A checkpoint file: ``weights`` itself, or a run folder's ``model_final.pth`` (else the one
    its ``last_checkpoint`` names).

    Raises:
        CompareError: nothing loadable there (named, with the fix).
    """
    p = Path(weights)
    if p.is_file():
        return str(p)
    if p.is_dir():
        if (p / "model_final.pth").is_file():
            return str(p / "model_final.pth")
        last = p / "last_checkpoint"
        if last.is_file() and (p / last.read_text().strip()).is_file():
            return str(p / last.read_text().strip())
    raise CompareError(f"weights {weights} not found: give a .pth file or a train_net.py output folder "
                       "with model_final.pth, or drop the option to train")


def checkpoint_iterations(path: str) -> Optional[int]:
    """Iterations a detectron2 training checkpoint was saved after (its ``iteration`` + 1), or None."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # not a torch zip file (e.g. a converted .pkl): the count is unknown
        return None
    it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
    return int(it) + 1 if it is not None else None


# ----------------------------------------------------------------------------- the repository's tools
def _load_tool(name: str):
    """``tools/<name>.py`` as a module (tools/ is not a package)."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"yolact_d2_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_net():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_net

    return train_net


@contextlib.contextmanager
def _scoped_log_handlers(names=("detectron2", "fvcore", "yolact_d2", "d2")):
    """Undo the handlers that train_net's set-up adds per call: without this, each evaluated model's
    log lines would also go to the earlier models' log files and print twice."""
    from detectron2.utils.logger import setup_logger

    before = {n: list(logging.getLogger(n).handlers) for n in names}
    try:
        yield
    finally:
        for n in names:
            lg = logging.getLogger(n)
            for h in [h for h in lg.handlers if h not in before[n]]:
                lg.removeHandler(h)
                h.close()
        setup_logger.cache_clear()  # lru_cache'd: a later call must add its handlers again


@contextlib.contextmanager
def _heartbeat(what: str, eta_s: Optional[float], every_s: float = 15.0):
    """Print '<what>: N s elapsed (ETA ...)' every ``every_s`` seconds while the block runs
    (tools/benchmark.py prints nothing until it is done)."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat():
        while not stop.wait(every_s):
            el = time.perf_counter() - start
            eta = f", about {max(eta_s - el, 0):.0f} s left" if eta_s else ""
            print(f"[compare] {what}: {el:.0f} s elapsed{eta}", flush=True)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _cmd(argv: Sequence[str]) -> str:
    return shlex.join([str(a) for a in argv])


def _rel(path) -> str:
    """A path relative to the working directory when it is below it or beside it (``../shared``):
    shorter commands that still work from the repository root."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith(os.path.join("..", "..")) else str(path)


# ----------------------------------------------------------------------------- steps
def train(spec: ModelSpec, data: Dataset, iters: Optional[int], out_dir: Path, common_opts: Sequence[str]) -> Dict:
    """Train ``spec`` with ``train_net.py`` in a subprocess (its log, with ETA, goes to the console
    and ``out_dir/log.txt``). ``iters`` None keeps the config's budget.

    Returns:
        {"command": str, "weights": path of model_final.pth, "iterations": int, "seconds": wall time}.

    Raises:
        CompareError: the training failed (exit code and log named).
    """
    cfg = load_cfg(spec.config, list(common_opts) + spec.opts)
    schedule = scaled_schedule_opts(cfg, iters) if iters else []
    argv = [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", spec.config,
            "--train-json", data.train_json, "--train-images", data.train_images,
            "--val-json", data.val_json, "--val-images", data.val_images,
            *common_opts, *spec.opts, *schedule, "OUTPUT_DIR", str(out_dir)]
    print(f"[compare] training {spec.label}: {_cmd(argv)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(argv, cwd=REPO_ROOT).returncode
    seconds = time.perf_counter() - start
    weights = out_dir / "model_final.pth"
    if rc != 0 or not weights.is_file():
        raise CompareError(f"training {spec.label} failed (exit code {rc}); read {out_dir / 'log.txt'} "
                           "and fix the config or opts it names")
    shown = ["python", "train_net.py", *[_rel(a) if os.path.exists(str(a)) else a for a in argv[2:]]]
    return {"command": _cmd(shown),
            "weights": str(weights), "iterations": iters or cfg.SOLVER.MAX_ITER, "seconds": seconds}


def evaluate(spec: ModelSpec, data: Dataset, weights: Optional[str], out_dir: Path, common_opts: Sequence[str],
             exported: Optional[str] = None) -> Dict:
    """COCO box and mask AP of ``weights`` on the val split: ``train_net.main`` with ``--eval-only``
    (the trainer's ``test``: detectron2's ``inference_on_dataset`` with the repository's
    ``YolactCOCOEvaluator``, which logs progress and ETA), in this process. With ``exported`` (an
    end-to-end graph of ``spec``'s model) it evaluates that graph instead (``--exported``).

    Returns:
        {"command": the equivalent train_net.py command line, "results": the evaluator's dict
        ({"bbox": {"AP": ..., ...}, "segm": {...}}, AP in percent; NaN where a size range has no
        object), "seconds": wall time}. The results are also written to
        ``out_dir/eval_results.json``.

    Raises:
        CompareError: the set-up failed (train_net's one-line message).
    """
    tn = _train_net()
    # Flags before the KEY VALUE opts: train_net's parser takes everything after the first opt as opts.
    argv = ["--config-file", spec.config, "--eval-only", "--val-json", data.val_json, "--val-images", data.val_images,
            *(["--exported", exported] if exported else []),
            *common_opts, *spec.opts, *([] if exported else ["MODEL.WEIGHTS", weights]), "OUTPUT_DIR", str(out_dir)]
    print(f"[compare] evaluating {spec.label} ({exported or weights}) on {data.val_json}", flush=True)
    start = time.perf_counter()
    try:
        with _scoped_log_handlers():
            results = tn.main(tn.argument_parser().parse_args(argv))
    except SystemExit as e:  # train_net's one-line set-up errors
        raise CompareError(f"evaluating {spec.label}: {e}") from None
    seconds = time.perf_counter() - start
    results = {task: {k: float(v) for k, v in metrics.items()} for task, metrics in results.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "eval_results.json", "w") as f:
        json.dump(results, f, indent=1)
    return {"command": _cmd(["python", "train_net.py", *[_rel(a) if os.path.exists(str(a)) else a for a in argv]]),
            "results": results, "seconds": seconds, "results_json": str(out_dir / "eval_results.json")}


def link_images(data: Dataset, n: int, folder: Path) -> List[str]:
    """Symlinks to the first ``n`` val photos in ``folder`` (tools/benchmark.py takes a folder);
    the data itself is never copied. Returns the linked file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    names = data.val_file_names()[:n]
    for name in names:
        os.symlink(os.path.abspath(os.path.join(data.val_images, name)), folder / os.path.basename(name))
    return [os.path.basename(nm) for nm in names]


def time_models(specs: List[ModelSpec], weights: Dict[str, str], images: Path, n: int, threads: int,
                num_classes: int, json_path: Path, eta_s: Optional[float], extra_args: Sequence[str] = (),
                exported: Optional[str] = None) -> Dict:
    """End-to-end latency of the models in one process on the same photos: ``tools/benchmark.py``'s
    ``main`` with the first model as ``--config-file`` and the second as ``--vs`` (interleaved per
    image); a third model (YOLACT++) gets a second benchmark run in the same process. ``exported``
    (a graph of the first model) joins the first run (``--exported``, interleaved too).

    Returns:
        {"runs": [benchmark result dicts], "commands": [command lines], "per_model": {key: the
        benchmark's model entry (``end_to_end_per_image_ms``, ``images_per_s``, ...)},
        "exported": the exported graph's entry or None, "extra": [other model entries beyond the
        compared ones]}.
    """
    bench = _load_tool("benchmark")
    with_exported = bool(exported)
    classes = ["MODEL.YOLACT.NUM_CLASSES", str(num_classes), "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes)]
    groups = [specs[:2]] + [[s] for s in specs[2:]]
    out = {"runs": [], "commands": [], "per_model": {}, "exported": None, "extra": []}
    for i, group in enumerate(groups):
        path = json_path if i == 0 else json_path.with_name(f"{json_path.stem}_{group[0].key}.json")
        argv = ["--images", str(images), "--num-images", str(n), "--warmup", "1", "--repeat", "1",
                "--threads", str(threads), "--nms-repeat", "1", "--mask-repeat", "1", "--output-json", str(path)]
        for j, s in enumerate(group):
            prefix = "" if j == 0 else "vs-"
            cfg = load_cfg(s.config, s.opts)
            argv += ["--vs" if j else "--config-file", s.config, f"--{prefix}weights", weights[s.key],
                     f"--{prefix}opts", *s.opts, *classes]
            if cfg.MODEL.META_ARCHITECTURE != "YOLACT":  # benchmark's own default would replace the config's
                argv += ["--mrcnn-score-thresh", str(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)]
        argv += list(extra_args)
        if i == 0 and with_exported:
            argv += ["--exported", exported]
        print(f"[compare] timing {' vs '.join(s.label for s in group)} on {n} val photos"
              + (f" (about {eta_s:.0f} s)" if eta_s else ""), flush=True)
        with _heartbeat("timing", eta_s):
            result = bench.main(argv)
        out["runs"].append(result)
        out["commands"].append(_cmd(["python", "tools/benchmark.py", *[_rel(a) if os.path.exists(str(a)) else a for a in argv]]))
        models = result["models"]
        for s, m in zip(group, models):
            out["per_model"][s.key] = {**m, "timing_json": str(path)}
        for m in models[len(group):]:
            if with_exported and i == 0 and m.get("exported_file") == exported:
                out["exported"] = {**m, "timing_json": str(path)}
            else:
                out["extra"].append({**m, "timing_json": str(path)})
    return out


def check_exported(path: str, threads: int) -> str:
    """The runtime that will run ``path`` (an end-to-end graph from ``tools/export_model.py``), checked
    by loading it with ``yolact_d2.runtime.ExportedPredictor`` before anything long starts.

    Raises:
        CompareError: missing or unusable file, or no runtime installed for it (named, with the fix).
    """
    from yolact_d2.runtime import ExportedPredictor

    try:
        return ExportedPredictor(path, threads=threads).runtime
    except ImportError as e:
        raise CompareError(f"--exported {path}: {e.name or e} is not installed (pip install onnxruntime for .onnx)") from None
    except (FileNotFoundError, ValueError) as e:
        raise CompareError(f"--exported {path}: {e}") from None


def draw_predictions(specs: List[ModelSpec], weights: Dict[str, str], n: int, score_thresh: float,
                     num_classes: int, out_png: Path) -> Dict:
    """One PNG: each model's val predictions (score > ``score_thresh``) on the same first ``n``
    val photos, one row per model, drawn by ``tools/visualize_predictions.py`` (detectron2's
    ``DefaultPredictor`` + ``Visualizer``). The val split must be registered (done by :func:`evaluate`).

    Returns:
        {"png": path, "commands": [command lines]}.
    """
    import cv2
    import numpy as np

    from yolact_d2.data.custom import TEST_NAME

    vis = _load_tool("visualize_predictions")
    rows, commands = [], []
    for s in specs:
        row_png = out_png.with_name(f"{out_png.stem}_{s.key}.png")
        argv = ["--config-file", s.config, "--weights", weights[s.key], "--dataset", TEST_NAME,
                "--num-images", str(n), "--score-thresh", str(score_thresh), "--title", s.label,
                "--output", str(row_png), *s.opts,
                "MODEL.YOLACT.NUM_CLASSES", str(num_classes), "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes)]
        vis.main(argv)
        commands.append(_cmd(["python", "tools/visualize_predictions.py", *[_rel(a) if os.path.exists(str(a)) else a for a in argv]]))
        rows.append(cv2.imread(str(row_png)))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    cv2.imwrite(str(out_png), np.concatenate(rows, axis=0))
    return {"png": str(out_png), "commands": commands}


def plot_speed_accuracy(rows: List[Dict], out_png: Path, device: str) -> str:
    """Scatter of mask AP (y) against images/s (x), one point per model labelled with its box /
    mask AP and ms/image. ``rows``: report model entries. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rank = {id(r): i for i, r in enumerate(sorted(rows, key=lambda r: r["images_per_s"]))}
    for r in rows:
        x, y = r["images_per_s"], r["eval"]["segm"]["AP"]
        ax.scatter([x], [y], s=60)
        i = rank[id(r)]
        # Labels alternate above / below from left to right: an exported graph sits at its model's AP.
        ax.annotate(f"{r['label']}\nbox {r['eval']['bbox']['AP']:.1f} / mask {y:.1f} AP, {r['ms_per_image']:.0f} ms",
                    (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -26), fontsize=8)
    xs = [r["images_per_s"] for r in rows]
    ys = [r["eval"]["segm"]["AP"] for r in rows]
    ax.set_xlim(0, max(xs) * 1.6 if xs else 1)
    ax.set_ylim(0, max(max(ys, default=0) * 1.4, 1.0))
    ax.set_xlabel(f"images/s (end to end, {device}, batch 1)")
    ax.set_ylabel("mask AP (COCO, val)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return str(out_png)


def environment(threads: int) -> Dict:
    """Device, threads, library versions and CPU of this run."""
    import detectron2
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "device": "cpu", "cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "detectron2": detectron2.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg": list(os.getloadavg()), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- report
def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


TABLE_HEADER = (["model", "budget"] + [f"box {m}" for m in METRICS] + [f"mask {m}" for m in METRICS]
                + ["ms/image", "images/s"])


def markdown_table(report: Dict) -> str:
    """The Markdown table of a report: one row per model (AP in percent, 1 decimal; "n/a" where
    the val split has no object of that size), then rows of timed-only runtimes (AP "-")."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for r in report["models"]:
        cells = [r["label"], r["budget"]]
        cells += [_fmt(r["eval"][task][m]) for task, _ in TASKS for m in METRICS]
        cells += [_fmt(r["ms_per_image"]), _fmt(r["images_per_s"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    for r in report.get("timed_only", []):
        cells = [r["label"], "timing only"] + ["-"] * (2 * len(METRICS)) + [_fmt(r["ms_per_image"]), _fmt(r["images_per_s"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_markdown_table(text: str) -> List[Dict[str, str]]:
    """Rows of the first table with :data:`TABLE_HEADER` in ``text``, as {column: cell} dicts."""
    lines = text.splitlines()
    header = "| " + " | ".join(TABLE_HEADER) + " |"
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(TABLE_HEADER, [c.strip() for c in line.strip().strip("|").split("|")])))
    return rows


def readme_block(report: Dict) -> str:
    """The README's comparison block: the table and where it came from."""
    env = report["environment"]
    return (f"{markdown_table(report)}\n\n"
            f"Regenerate: `{report['command']}` then `python tools/compare.py --from-report "
            f"<output-dir>/report.json --update-readme README.md`. Made {env['date'][:10]} on {env['cpu']} "
            f"({env['cpu_count']} cores, {env['threads']} threads, CPU, load average {env['loadavg'][0]:.1f} at the "
            f"start, torch {env['torch']}, detectron2 {env['detectron2']}); val: {report['dataset']['val_images_count']} photos of "
            f"`{_rel(report['dataset']['val_json'])}`; timing: {report['timing']['num_images']} of them, batch 1.")


def _notes(report: Dict) -> List[str]:
    keys = [r["key"] for r in report["models"]]
    notes = ["YOLACT and Mask R-CNN were timed interleaved photo by photo (tools/benchmark.py --vs)."]
    if "yolact_plus" in keys:
        notes.append("YOLACT++ was timed in a second tools/benchmark.py run in the same process, after them.")
    if "exported" in keys:
        notes.append("The exported graph was evaluated by the same evaluator (train_net.py --eval-only --exported) "
                     "and timed interleaved with them (tools/benchmark.py --exported); it is not in the pictures.")
    return notes


def render_markdown(report: Dict) -> str:
    """The whole ``report.md``."""
    env, out = report["environment"], Path(report["output_dir"])
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731  (links relative to report.md)
    parts = [
        "# YOLACT vs Mask R-CNN", "",
        f"Dataset: `{report['dataset']['val_json']}` ({report['dataset']['val_images_count']} val photos, "
        f"{report['dataset']['num_classes']} class(es)). COCO AP by detectron2's COCOEvaluator (percent); "
        f"speed: end-to-end median (decoded BGR photo -> Instances), {report['timing']['num_images']} val photos, "
        f"batch 1, all models in one process.", "",
        markdown_table(report), "",
        *[f"- {note}" for note in _notes(report)], "",
        f"![speed vs accuracy]({rel(report['files']['speed_accuracy_png'])})", "",
        f"Predictions on the same val photos (score > {report['pictures']['score_thresh']}), one row per model:", "",
        f"![predictions]({rel(report['files']['predictions_png'])})", "",
        "## Commands", "", "```", report["command"], "```", "",
    ]
    for r in report["models"]:
        parts += [f"{r['label']}:", "", "```"]
        if r.get("train_command"):
            parts.append(r["train_command"])
        parts += [r["eval_command"], "```", ""]
    parts += ["Timing and pictures:", "", "```", *report["timing"]["commands"], *report["pictures"]["commands"], "```", ""]
    parts += ["## Environment", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in env.items()]
    return "\n".join(parts) + "\n"


def update_readme(readme: str, block: str) -> None:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme`` by ``block``.

    Raises:
        CompareError: the file or a marker is missing (named, with the fix).
    """
    p = Path(readme)
    if not p.is_file():
        raise CompareError(f"{readme} not found: give the README to update with --update-readme")
    text = p.read_text()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise CompareError(f"{readme} has no {README_BEGIN} ... {README_END} block: add the two markers "
                           "where the table belongs")
    p.write_text(text[: i + len(README_BEGIN)] + "\n" + block.strip() + "\n" + text[j:])


def _budget(spec: ModelSpec, trained: Optional[Dict], weights: str) -> str:
    if trained:
        return f"{trained['iterations']} iterations (trained here)"
    it = checkpoint_iterations(weights)
    return f"{it} iterations (checkpoint)" if it else "given checkpoint"


def run_comparison(specs: List[ModelSpec], data: Dataset, out_dir: str, iters: Optional[int] = None,
                   common_opts: Sequence[str] = (), num_images: int = 8, vis_images: int = 3,
                   score_thresh: float = 0.5, threads: int = 2, benchmark_args: Sequence[str] = (),
                   command: str = "", exported: Optional[str] = None) -> Dict:
    """Train (where no weights are given), evaluate, time and draw ``specs`` on ``data``, then write
    ``out_dir/report.md`` and ``out_dir/report.json``.

    Args:
        specs: YOLACT first, Mask R-CNN second, optionally YOLACT++ third.
        iters: training budget for every model trained here (None: each config's MAX_ITER).
        common_opts: KEY VALUE overrides for every model (training and evaluation; e.g. batch size).
        num_images: val photos timed (the first ones of the val JSON); vis_images: photos drawn.
        benchmark_args: extra tools/benchmark.py arguments; runtimes it times besides the
            models get timing-only rows.
        exported: an end-to-end graph of the YOLACT model from ``tools/export_model.py`` (.onnx or
            .ts): evaluated and timed on the same photos as one more row (no picture).

    Returns:
        The report dict (also ``report.json``).

    Raises:
        CompareError: missing dataset / config / weights, failed training or set-up.
    """
    import torch

    if num_images < 1 or vis_images < 1:
        raise CompareError("--num-images and --vis-images must be >= 1")
    for s in specs:
        s.config = resolve_config(s.config)
        s.opts = list(common_opts) + list(s.opts)  # training, evaluation, timing and pictures alike
    common_opts = ()
    need_train = any(s.weights is None for s in specs)
    data.check(need_train)
    weights = {s.key: resolve_weights(s.weights) for s in specs if s.weights is not None}
    for s in specs:
        load_cfg(s.config, list(common_opts) + s.opts)  # bad keys fail now, not after an hour of training
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    if exported:
        check_exported(exported, threads)
    env = environment(threads)
    n_classes = data.num_classes()

    trained, evals = {}, {}
    for step, s in enumerate(specs, 1):
        if s.weights is None:
            print(f"[compare] model {step}/{len(specs)}: training {s.label}", flush=True)
            trained[s.key] = train(s, data, iters, out / s.key / "train", common_opts)
            weights[s.key] = trained[s.key]["weights"]
    for s in specs:
        evals[s.key] = evaluate(s, data, weights[s.key], out / s.key / "eval", common_opts)

    n_val = len(data.val_file_names())
    # Rough ETA of the timing: per model one warm-up and two runs (end-to-end, staged) per photo,
    # at the evaluation's seconds per photo.
    eta = sum(evals[s.key]["seconds"] / max(n_val, 1) for s in specs) * (2 * num_images + 1)
    images = link_images(data, num_images, out / "timing_images")
    timing = time_models(specs, weights, out / "timing_images", num_images, threads, n_classes,
                         out / "timing.json", eta, benchmark_args, exported)
    pictures = draw_predictions(specs, weights, vis_images, score_thresh, n_classes, out / "predictions.png")
    exported_row = None
    if exported:
        yolact = next(s for s in specs if s.key == "yolact")
        ev = evaluate(yolact, data, None, out / "exported" / "eval", common_opts, exported=exported)
        t = timing["exported"]
        exported_row = {
            "key": "exported", "label": t["label"], "config": _rel(yolact.config), "opts": yolact.opts,
            "weights": exported, "budget": "export of the YOLACT row", "train_command": None, "train_seconds": None,
            "eval_command": ev["command"], "eval_results_json": ev["results_json"], "eval": ev["results"],
            "ms_per_image": t["end_to_end_per_image_ms"], "images_per_s": t["images_per_s"], "timing_json": t["timing_json"],
        }
    rows = []
    for s in specs:
        t = timing["per_model"][s.key]
        rows.append({
            "key": s.key, "label": s.label, "config": _rel(s.config), "opts": list(common_opts) + s.opts,
            "weights": weights[s.key], "budget": _budget(s, trained.get(s.key), weights[s.key]),
            "train_command": trained.get(s.key, {}).get("command"),
            "train_seconds": trained.get(s.key, {}).get("seconds"),
            "eval_command": evals[s.key]["command"], "eval_results_json": evals[s.key]["results_json"],
            "eval": evals[s.key]["results"],
            "ms_per_image": t["end_to_end_per_image_ms"], "images_per_s": t["images_per_s"],
            "timing_json": t["timing_json"],
        })
    if exported_row:
        rows.append(exported_row)
    timed_only = [{"label": m["label"], "ms_per_image": m["end_to_end_per_image_ms"], "images_per_s": m["images_per_s"],
                   "timing_json": m["timing_json"]} for m in timing["extra"]]
    env["loadavg_end"] = list(os.getloadavg())
    report = {
        "command": command, "output_dir": str(out), "environment": env, "models": rows, "timed_only": timed_only,
        "dataset": {"train_json": data.train_json, "val_json": data.val_json, "val_images": data.val_images,
                    "val_images_count": n_val, "num_classes": n_classes},
        "timing": {"num_images": num_images, "images": images, "commands": timing["commands"],
                   "json": [r["outputs"]["json"] for r in timing["runs"]]},
        "pictures": {"score_thresh": score_thresh, "num_images": vis_images, "commands": pictures["commands"]},
        "files": {"report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
                  "speed_accuracy_png": str(out / "speed_accuracy.png"), "predictions_png": pictures["png"]},
    }
    plot_speed_accuracy(rows, out / "speed_accuracy.png", env["device"])
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=1)
    (out / "report.md").write_text(render_markdown(report))
    print("\n" + markdown_table(report) + f"\n\n[compare] wrote {out / 'report.md'} and {out / 'report.json'}", flush=True)
    return report
