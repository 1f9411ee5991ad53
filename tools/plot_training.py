#!/usr/bin/env python
r"""Loss curves of one or more detectron2 training runs (their ``metrics.json``) in one PNG.

    python tools/plot_training.py output/runs/a/metrics.json output/runs/b/metrics.json \
        --labels a b --output docs/training/a_vs_b.png

One panel per loss (``loss_*`` scalars and ``total_loss``), iteration on x, each run a line.
"""
import argparse
import json
import sys
from pathlib import Path


def read_metrics(path):
    """Rows of a detectron2 ``metrics.json`` (one JSON object per line) that carry an iteration.

    Raises:
        SystemExit: the file is missing or holds no training rows, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (give a run's OUTPUT_DIR/metrics.json)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "iteration" in r and "total_loss" in r]
    if not rows:
        raise SystemExit(f"error: {path} has no training rows with total_loss")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.json files")
    parser.add_argument("--labels", nargs="+", help="one label per file (default: the run folder's name)")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(m).parent.name for m in args.metrics]
    if len(labels) != len(args.metrics):
        raise SystemExit(f"error: {len(args.metrics)} metrics files but {len(labels)} labels")
    runs = [read_metrics(m) for m in args.metrics]
    keys = sorted({k for rows in runs for r in rows for k in r if k.startswith("loss_")}) + ["total_loss"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows_n = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for rows, label in zip(runs, labels):
            pts = [(r["iteration"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
