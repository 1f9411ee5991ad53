#!/usr/bin/env python
"""YOLACT (and optionally YOLACT++) side by side with detectron2's Mask R-CNN: one command, one report.

For each model: train it with train_net.py in a subprocess at the same budget (or take a given
checkpoint or run folder); then, in this process, evaluate it with detectron2's COCOEvaluator on the
same val split (yolact_d2.compare.evaluate: inference_on_dataset, as train_net.py --eval-only), time
all models end to end interleaved on the same val photos (yolact_d2.benchmarking), draw their
predictions on the same photos, and write OUTPUT_DIR/report.md + report.json (+ speed_accuracy.png,
predictions.png, timing.json).

    # train both for 200 iterations on Penn-Fudan ($YOLACT_D2_SHARED/data/pennfudan), then compare
    python tools/compare.py --iters 200 --output-dir output/compare
    # existing checkpoints or run folders instead of training
    python tools/compare.py --yolact-weights output/runs/norelu_s1 --mask-rcnn-weights output/runs/mrcnn_r18 \\
        --output-dir output/compare --update-page docs/benchmarks.md
    # the docs table again from a finished report
    python tools/compare.py --from-report output/compare/report.json --readme-table
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from yolact_d2.compare import METRICS, TASKS, CompareError
from yolact_d2.console import HelpFormatter
from yolact_d2.errors import YolactUserError

REPO_ROOT = Path(__file__).resolve().parents[1]

README_BEGIN = "<!-- compare:begin -->"
README_END = "<!-- compare:end -->"
DEFAULT_CONFIGS = {
    "yolact": "configs/pennfudan/yolact_R_18_FPN_320.yaml",
    "mask_rcnn": "configs/pennfudan/mask_rcnn_R_18_FPN_320.yaml",
    "yolact_plus": "configs/pennfudan/yolact_plus_R_50_FPN_320.yaml",
}
LABELS = {"yolact": "YOLACT", "yolact_plus": "YOLACT++", "mask_rcnn": "Mask R-CNN"}


@dataclass(frozen=True)
class ModelSpec:
    """One compared model (immutable: a comparison never changes its caller's specs).

    Attributes:
        key: ``yolact``, ``yolact_plus`` or ``mask_rcnn`` (output sub-folder name).
        config: config file path (absolute or relative to the working directory / repository).
        weights: checkpoint file or train_net run folder to evaluate; ``None``: train first.
        opts: KEY VALUE config overrides of this model (training, evaluation, timing and pictures).
    """

    key: str
    config: str
    weights: Optional[str] = None
    opts: Tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "opts", tuple(str(o) for o in self.opts))

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)


@dataclass(frozen=True)
class Dataset:
    """A COCO instances dataset: train (needed only to train) and val JSON + image folders."""

    train_json: Optional[str]
    train_images: Optional[str]
    val_json: str
    val_images: str

    @classmethod
    def pennfudan(cls, **given) -> "Dataset":
        """Penn-Fudan under the data root (:func:`yolact_d2.paths.data_root`), with the ``given``
        fields (non-empty ones) instead."""
        from yolact_d2.paths import data_root

        root = data_root() / "pennfudan"
        fields = {"train_json": str(root / "train.json"), "train_images": str(root / "images"),
                  "val_json": str(root / "val.json"), "val_images": str(root / "images")}
        fields.update({k: str(v) for k, v in given.items() if v})
        return cls(**fields)

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
                    f"dataset), or put Penn-Fudan under ../shared/data/pennfudan or $YOLACT_D2_SHARED/data/pennfudan")

    def val_count(self) -> int:
        with open(self.val_json) as f:
            return len(json.load(f)["images"])


def resolve_config(path: str) -> str:
    """An existing config file: ``path`` as given, else relative to the repository root.

    Raises:
        CompareError: neither exists (named, with the fix).
    """
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return str(candidate)
    raise CompareError(f"config {path} not found: give an existing YAML file (e.g. {DEFAULT_CONFIGS['yolact']})")


def _cmd(argv: Sequence) -> str:
    return shlex.join([str(a) for a in argv])


def _rel(path) -> str:
    """A path relative to the working directory when it is below it or beside it (``../shared``):
    shorter commands that still work from the repository root."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith(os.path.join("..", "..")) else str(path)


def _shown(argv: Sequence) -> List[str]:
    return [_rel(a) if os.path.exists(str(a)) else str(a) for a in argv]


# ----------------------------------------------------------------------------- plan (no side effects)
def model_opts(spec: ModelSpec, common_opts: Sequence[str]) -> List[str]:
    """A new list: the common opts, then the model's own (the model's win)."""
    return [str(o) for o in common_opts] + list(spec.opts)


def training_command(spec: ModelSpec, data: Dataset, iters: Optional[int], common_opts: Sequence[str],
                     out_dir: Path) -> List[str]:
    """The ``train_net.py`` argv that trains ``spec`` into ``out_dir`` (``iters`` None: the config's
    own budget). Reads the config; changes nothing.

    Raises:
        ConfigError / MissingFileError: bad key or value, missing config (one line).
    """
    from yolact_d2.compare import scaled_schedule_opts
    from yolact_d2.config import load_config

    config = resolve_config(spec.config)
    opts = model_opts(spec, common_opts)
    schedule = scaled_schedule_opts(load_config(config, opts), iters) if iters else []
    return [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", config,
            "--train-json", str(data.train_json), "--train-images", str(data.train_images),
            "--val-json", str(data.val_json), "--val-images", str(data.val_images),
            *opts, *schedule, "OUTPUT_DIR", str(out_dir)]


def training_plan(specs: Sequence[ModelSpec], data: Dataset, out: Path, iters: Optional[int],
                  common_opts: Sequence[str]) -> Dict[str, List[str]]:
    """key -> the ``train_net.py`` argv of each spec without weights, in order."""
    return {s.key: training_command(s, data, iters, common_opts, out / s.key / "train") for s in specs if s.weights is None}


def _eval_command(spec: ModelSpec, config: str, data: Dataset, opts: Sequence[str], weights: Optional[str],
                  out_dir: Path, exported: Optional[str] = None) -> str:
    """The standalone ``train_net.py --eval-only`` command that gives the same evaluation (shown in the report)."""
    argv = ["--config-file", config, "--eval-only", "--val-json", data.val_json, "--val-images", data.val_images,
            *(["--exported", exported] if exported else []),
            *opts, *([] if exported else ["MODEL.WEIGHTS", weights]), "OUTPUT_DIR", str(out_dir)]
    return _cmd(["python", "train_net.py", *_shown(argv)])


def _timing_command(rows: List[Dict], images: Path, n: int, threads: int, exported: Optional[str]) -> str:
    """The standalone ``tools/benchmark.py`` command that times the first two models (and the
    exported graph) the same way, interleaved, on the same photos (shown in the report)."""
    argv = ["--images", str(images), "--num-images", str(n), "--warmup", "1", "--repeat", "1", "--threads", str(threads)]
    for j, r in enumerate(rows[:2]):
        prefix = "" if j == 0 else "vs-"
        argv += ["--vs" if j else "--config-file", r["config_path"], f"--{prefix}weights", r["weights"],
                 f"--{prefix}opts", *r["opts"], *r["class_opts"]]
    if exported:
        argv += ["--exported", exported]
    return _cmd(["python", "tools/benchmark.py", *_shown(argv)])


# ----------------------------------------------------------------------------- steps
def train(spec: ModelSpec, argv: List[str], out_dir: Path, iterations: int) -> Dict:
    """Run ``argv`` (from :func:`training_command`): train_net.py in a subprocess, its log (with
    ETA) on the console and in ``out_dir/log.txt``.

    Returns:
        {"command", "weights": model_final.pth, "iterations", "seconds"}.

    Raises:
        CompareError: the training failed (exit code and log named).
    """
    import time

    print(f"[compare] training {spec.label}: {_cmd(argv)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(argv, cwd=REPO_ROOT).returncode
    seconds = time.perf_counter() - start
    weights = out_dir / "model_final.pth"
    if rc != 0 or not weights.is_file():
        raise CompareError(f"training {spec.label} failed (exit code {rc}); read {out_dir / 'log.txt'} "
                           "and fix the config or opts it names")
    return {"command": _cmd(["python", "train_net.py", *_shown(argv[2:])]), "weights": str(weights),
            "iterations": iterations, "seconds": seconds}


def link_images(names: Sequence[str], val_images: str, folder: Path) -> None:
    """Symlinks to ``names`` (val photos) in ``folder``, for the report's standalone
    ``tools/benchmark.py --images`` command; the data itself is never copied."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name in names:
        os.symlink(os.path.abspath(os.path.join(val_images, name)), folder / os.path.basename(name))


def draw_row(bench, cfg, photos: Sequence, score_thresh: float, title: str, out_png: Path, tile_height: int = 320):
    """One row of tiles: the model's predictions (score > ``score_thresh``) on ``photos`` with
    detectron2's ``Visualizer`` and the val split's class names, ``title`` on the first tile.
    ``bench.reference`` is the model's plain predictor-style call. Returns the BGR image."""
    import cv2
    import numpy as np
    from detectron2.data import MetadataCatalog
    from detectron2.utils.visualizer import ColorMode, Visualizer

    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    tiles = []
    for _, bgr in photos:
        inst = bench.reference([bgr])[0]["instances"].to("cpu")
        inst = inst[inst.scores > score_thresh]
        tile = Visualizer(bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(inst).get_image()
        scale = tile_height / tile.shape[0]
        tiles.append(cv2.resize(tile, (int(round(tile.shape[1] * scale)), tile_height)))
    grid = np.concatenate(tiles, axis=1)[:, :, ::-1].copy()
    (tw, th), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 2)
    cv2.rectangle(grid, (0, 0), (tw + 12, th + 14), (0, 0, 0), -1)  # dark band: readable on any photo
    cv2.putText(grid, title, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    cv2.imwrite(str(out_png), grid)
    return grid


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
    the val split has no object of that size), then rows of timed-only runtimes (AP "-"; older reports)."""
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
    """The comparison block of docs/benchmarks.md: the table and where it came from."""
    env = report["environment"]
    return (f"{markdown_table(report)}\n\n"
            f"Regenerate: `{report['command']}` then `python tools/compare.py --from-report "
            f"<output-dir>/report.json --update-page docs/benchmarks.md`. Made {env['date'][:10]} on {env['cpu']} "
            f"({env['cpu_count']} cores, {env['threads']} threads, CPU, load average {env['loadavg'][0]:.1f} at the "
            f"start, torch {env['torch']}, detectron2 {env['detectron2']}); val: {report['dataset']['val_images_count']} photos of "
            f"`{_rel(report['dataset']['val_json'])}`; timing: {report['timing']['num_images']} of them, batch 1.")


def _notes(report: Dict) -> List[str]:
    keys = [r["key"] for r in report["models"]]
    notes = ["All models were timed in this process, interleaved photo by photo (yolact_d2.benchmarking; "
             "the tools/benchmark.py command below times the first two the same way)."]
    if "exported" in keys:
        notes.append("The exported graph was evaluated by the same evaluator (as train_net.py --eval-only --exported) "
                     "and timed interleaved with the models; it is not in the pictures.")
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
        "Each model's training (run by the comparison) and the standalone evaluation that gives the same AP:", "",
    ]
    for r in report["models"]:
        parts += [f"{r['label']}:", "", "```"]
        if r.get("train_command"):
            parts.append(r["train_command"])
        parts += [r["eval_command"], "```", ""]
    parts += ["Timing on the same photos, standalone:", "", "```", *report["timing"]["commands"], "```", ""]
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
        raise CompareError(f"{readme} not found: give the page to update with --update-page (docs/benchmarks.md)")
    text = p.read_text()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise CompareError(f"{readme} has no {README_BEGIN} ... {README_END} block: add the two markers "
                           "where the table belongs")
    p.write_text(text[: i + len(README_BEGIN)] + "\n" + block.strip() + "\n" + text[j:])


def _budget(trained: Optional[Dict], weights: str) -> str:
    from yolact_d2.compare import checkpoint_iterations

    if trained:
        return f"{trained['iterations']} iterations (trained here)"
    it = checkpoint_iterations(weights)
    return f"{it} iterations (checkpoint)" if it else "given checkpoint"


@contextlib.contextmanager
def _log_file(out: Path):
    """The evaluator's progress, ETA and AP lines on the console (detectron2's ``setup_logger``,
    once per process) and, while the block runs, in ``out/log.txt`` (removed after it, so a second
    comparison in the same process neither prints twice nor writes to the first one's file)."""
    import logging

    from detectron2.utils.logger import setup_logger

    names = ("detectron2", "yolact_d2")
    for name in names:
        setup_logger(name=name, abbrev_name="d2" if name == "detectron2" else name)  # cached: console once
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S"))
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def run_comparison(specs: Sequence[ModelSpec], data: Dataset, out_dir: str, iters: Optional[int] = None,
                   common_opts: Sequence[str] = (), num_images: int = 8, vis_images: int = 3,
                   score_thresh: float = 0.5, threads: int = 2, command: str = "",
                   exported: Optional[str] = None) -> Dict:
    """Train (where no weights are given), evaluate, time and draw ``specs`` on ``data``, then write
    ``out_dir/report.md`` and ``out_dir/report.json``. The arguments are not modified.

    Args:
        specs: YOLACT first, Mask R-CNN second, optionally YOLACT++ third.
        iters: training budget for every model trained here (None: each config's MAX_ITER).
        common_opts: KEY VALUE overrides for every model, before each model's own.
        num_images: val photos timed (the first ones of the val JSON); vis_images: photos drawn.
        exported: an end-to-end graph of the YOLACT model from ``tools/export_model.py`` (.onnx or
            .ts, or FILE@RUNTIME): evaluated and timed on the same photos as one more row (no picture).

    Returns:
        The report dict (also ``report.json``).

    Raises:
        YolactUserError (CompareError, ConfigError, ...): missing dataset / config / weights, bad
        opts, failed training or set-up.
    """
    import cv2
    import numpy as np
    import torch

    from yolact_d2 import benchmarking as bm
    from yolact_d2 import compare as C
    from yolact_d2.config import load_config

    if num_images < 1 or vis_images < 1:
        raise CompareError("--num-images and --vis-images must be >= 1")
    configs = {s.key: resolve_config(s.config) for s in specs}
    need_train = any(s.weights is None for s in specs)
    data.check(need_train)
    weights = {s.key: C.resolve_weights(s.weights) for s in specs if s.weights is not None}
    out = Path(out_dir).resolve()
    # Bad keys fail now, not after an hour of training (training_plan loads every config).
    plan = training_plan(specs, data, out, iters, common_opts)
    for s in specs:
        if s.weights is not None:
            C.eval_config(configs[s.key], model_opts(s, common_opts), data.val_json, data.val_images)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    predictor = C.load_exported(exported, threads) if exported else None
    env = environment(threads)

    trained = {}
    for step, s in enumerate(specs, 1):
        if s.key in plan:
            print(f"[compare] model {step}/{len(specs)}: training {s.label}", flush=True)
            budget = iters or load_config(configs[s.key], model_opts(s, common_opts)).SOLVER.MAX_ITER
            trained[s.key] = train(s, plan[s.key], out / s.key / "train", budget)
            weights[s.key] = trained[s.key]["weights"]

    with _log_file(out):
        rows, benches, models = [], {}, {}
        for s in specs:
            opts = model_opts(s, common_opts)
            cfg = C.eval_config(configs[s.key], opts, data.val_json, data.val_images)
            saved = Path(weights[s.key]).parent / "config.yaml"
            if cfg.MODEL.META_ARCHITECTURE == "YOLACT" and cfg.MODEL.YOLACT.FIT_PRIORS and saved.is_file():
                # The run's config holds the fitted priors; a checkpoint alone carries them too
                # (checkpoint.adopt_priors, with a warning).
                configs = {**configs, s.key: str(saved)}
                cfg = C.eval_config(configs[s.key], opts, data.val_json, data.val_images)
            print(f"[compare] evaluating {s.label} ({weights[s.key]}) on {data.val_json}", flush=True)
            model, cfg = C.build_eval_model(cfg, weights[s.key])
            ev = C.evaluate(model, cfg, str(out / s.key / "eval"))
            benches[s.label] = bm.ModelBench(model, cfg)
            models[s.key] = (benches[s.label], cfg)
            n_classes = cfg.MODEL.YOLACT.NUM_CLASSES  # eval_config set both heads' count from the val JSON
            rows.append({
                "key": s.key, "label": s.label, "config": _rel(configs[s.key]), "config_path": configs[s.key], "opts": opts,
                "class_opts": ["MODEL.YOLACT.NUM_CLASSES", str(n_classes), "MODEL.ROI_HEADS.NUM_CLASSES", str(n_classes)],
                "weights": weights[s.key], "budget": _budget(trained.get(s.key), weights[s.key]),
                "train_command": trained.get(s.key, {}).get("command"),
                "train_seconds": trained.get(s.key, {}).get("seconds"),
                "eval_command": _eval_command(s, configs[s.key], data, opts, weights[s.key], out / s.key / "eval"),
                "eval_results_json": ev["results_json"], "eval": ev["results"], "eval_seconds": ev["seconds"],
            })
        references = {}
        if predictor is not None:
            yolact = next(r for r in rows if r["key"] == "yolact")
            bench, cfg = models["yolact"]
            precision = getattr(predictor, "precision", "f32")
            label = f"{yolact['label']} ({predictor.runtime}" + (f" {precision})" if precision != "f32" else ")")
            print(f"[compare] evaluating {label} ({exported}) on {data.val_json}", flush=True)
            ev = C.evaluate(predictor, cfg, str(out / "exported" / "eval"))
            benches[label] = bm.ExportedBench(predictor, bench)
            references[label] = bench.reference
            rows.append({
                "key": "exported", "label": label, "config": yolact["config"], "config_path": yolact["config_path"],
                "opts": yolact["opts"], "class_opts": yolact["class_opts"], "weights": exported,
                "budget": "export of the YOLACT row", "train_command": None, "train_seconds": None,
                "eval_command": _eval_command(next(s for s in specs if s.key == "yolact"), configs["yolact"], data,
                                              yolact["opts"], None, out / "exported" / "eval", exported=exported),
                "eval_results_json": ev["results_json"], "eval": ev["results"], "eval_seconds": ev["seconds"],
                "exported_file": exported,
            })

        photos = C.read_photos(data.val_json, data.val_images, num_images)
        link_images([n for n, _ in photos], data.val_images, out / "timing_images")
        print(f"[compare] timing {' vs '.join(benches)} on {len(photos)} val photos, interleaved", flush=True)
        timing = C.time_on_photos(benches, [im for _, im in photos], references=references)
        timing_json = out / "timing.json"
        entries = []
        for r in rows:
            t = timing[r["label"]]
            r.update(ms_per_image=t["end_to_end_per_image_ms"], images_per_s=t["images_per_s"], timing_json=str(timing_json))
            entries.append({"label": r["label"], "config": r["config"], "opts": r["opts"], "weights": r["weights"],
                            **({"exported_file": exported} if r["key"] == "exported" else {}), **t})
        meta = bm.environment("cpu", shlex.split(command) if command else None)
        meta.update(images=[n for n, _ in photos], num_images=len(photos), warmup=1, repeat=1, batch_size=1)
        timing_json.write_text(json.dumps({"meta": meta, "models": entries}, indent=1))
        timing_command = _timing_command([r for r in rows if r["key"] != "exported"], out / "timing_images", len(photos),
                                         threads, exported)
        for r in rows:  # only for the standalone command
            r.pop("class_opts")

        rows_png = []
        vis = C.read_photos(data.val_json, data.val_images, vis_images)
        for s in specs:
            bench, cfg = models[s.key]
            rows_png.append(draw_row(bench, cfg, vis, score_thresh, s.label, out / f"predictions_{s.key}.png"))
        width = max(r.shape[1] for r in rows_png)
        rows_png = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows_png]
        cv2.imwrite(str(out / "predictions.png"), np.concatenate(rows_png, axis=0))

        env["loadavg_end"] = list(os.getloadavg())
        report = {
            "command": command, "output_dir": str(out), "environment": env, "models": rows, "timed_only": [],
            "dataset": {"train_json": data.train_json, "val_json": data.val_json, "val_images": data.val_images,
                        "val_images_count": data.val_count(), "num_classes": n_classes},
            "timing": {"num_images": len(photos), "images": [n for n, _ in photos], "json": [str(timing_json)],
                       "commands": [timing_command]},
            "pictures": {"score_thresh": score_thresh, "num_images": vis_images},
            "files": {"report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
                      "speed_accuracy_png": str(out / "speed_accuracy.png"), "predictions_png": str(out / "predictions.png")},
        }
        plot_speed_accuracy(rows, out / "speed_accuracy.png", env["device"])
        with open(out / "report.json", "w") as f:
            json.dump(report, f, indent=1)
        (out / "report.md").write_text(render_markdown(report))
        print("\n" + markdown_table(report) + f"\n\n[compare] wrote {out / 'report.md'} and {out / 'report.json'}", flush=True)
        return report


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default="output/compare")
    p.add_argument("--iters", type=int, help="training budget of every model trained here (SOLVER.MAX_ITER; "
                   "STEPS and WARMUP_ITERS scaled); default: each config's own")
    for key, flag in (("yolact", "yolact"), ("mask_rcnn", "mask-rcnn"), ("yolact_plus", "yolact-plus")):
        p.add_argument(f"--{flag}-config", default=None if key == "yolact_plus" else DEFAULT_CONFIGS[key],
                       help=f"default {DEFAULT_CONFIGS[key]}" + (" (only with --with-yolact-plus)" if key == "yolact_plus" else ""))
        p.add_argument(f"--{flag}-weights", help="checkpoint or train_net.py run folder (skips training)")
        p.add_argument(f"--{flag}-opts", nargs="*", default=[], help="KEY VALUE overrides of this model only")
    p.add_argument("--with-yolact-plus", action="store_true", help="add YOLACT++ as a third model")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides of every model (e.g. SOLVER.IMS_PER_BATCH 1)")
    p.add_argument("--train-json", help="COCO instances JSON to train on (default: Penn-Fudan train)")
    p.add_argument("--train-images")
    p.add_argument("--val-json", help="COCO instances JSON to evaluate on (default: Penn-Fudan val)")
    p.add_argument("--val-images")
    p.add_argument("--num-images", type=int, default=8, help="val photos timed")
    p.add_argument("--vis-images", type=int, default=3, help="val photos drawn")
    p.add_argument("--score-thresh", type=float, default=0.5, help="score above which predictions are drawn")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the evaluation and timing")
    p.add_argument("--exported", metavar="FILE",
                   help="end-to-end graph of the YOLACT model (.onnx / .ts from tools/export_model.py --graph e2e, "
                        "or FILE.onnx@openvino): evaluated and timed as one more row")
    p.add_argument("--from-report", help="use this report.json instead of running (with --readme-table / --update-page)")
    p.add_argument("--readme-table", action="store_true", help="print the docs page's Markdown block")
    p.add_argument("--update-page", "--update-readme", dest="update_readme", metavar="PAGE",
                   help="write the block between <!-- compare:begin/end --> of this page (docs/benchmarks.md)")
    return p.parse_args(argv)


def specs_from_args(args) -> List[ModelSpec]:
    specs = [ModelSpec("yolact", args.yolact_config, args.yolact_weights, args.yolact_opts),
             ModelSpec("mask_rcnn", args.mask_rcnn_config, args.mask_rcnn_weights, args.mask_rcnn_opts)]
    if args.with_yolact_plus or args.yolact_plus_weights:
        specs.append(ModelSpec("yolact_plus", args.yolact_plus_config or DEFAULT_CONFIGS["yolact_plus"],
                               args.yolact_plus_weights, args.yolact_plus_opts))
    return specs


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.from_report:
            if not Path(args.from_report).is_file():
                raise CompareError(f"{args.from_report} not found: give a report.json written by tools/compare.py")
            report = json.loads(Path(args.from_report).read_text())
        else:
            data = Dataset.pennfudan(train_json=args.train_json, train_images=args.train_images,
                                     val_json=args.val_json, val_images=args.val_images)
            command = _cmd(["python", "tools/compare.py", *(sys.argv[1:] if argv is None else argv)])
            report = run_comparison(specs_from_args(args), data, args.output_dir, args.iters, args.opts, args.num_images,
                                    args.vis_images, args.score_thresh, args.threads, command, args.exported)
        block = readme_block(report)
        if args.readme_table:
            print(block)
        if args.update_readme:
            update_readme(args.update_readme, block)
            print(f"updated the comparison block of {args.update_readme}")
    except YolactUserError as e:
        raise SystemExit("error: " + " ".join(str(e).split())) from None
    return report


if __name__ == "__main__":
    main()
