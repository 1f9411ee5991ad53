#!/usr/bin/env python
"""YOLACT (and optionally YOLACT++) side by side with detectron2's Mask R-CNN: one command, one report.

Trains each model with train_net.py at the same budget (or takes given checkpoints), evaluates them
with detectron2's COCOEvaluator on the same val split, times them end to end in one process on the
same val photos (tools/benchmark.py), draws their predictions on the same photos, and writes
OUTPUT_DIR/report.md + report.json (+ speed_accuracy.png, predictions.png). Logic: yolact_d2/compare.py.

    # train both for 200 iterations on Penn-Fudan (../shared/data/pennfudan), then compare
    python tools/compare.py --iters 200 --output-dir output/compare
    # existing checkpoints or run folders instead of training
    python tools/compare.py --yolact-weights output/runs/norelu_s1 --mask-rcnn-weights output/runs/mrcnn_r18 \\
        --output-dir output/compare --update-readme README.md
    # the README table again from a finished report
    python tools/compare.py --from-report output/compare/report.json --readme-table
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    from yolact_d2.compare import DEFAULT_CONFIGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                   help="end-to-end graph of the YOLACT model (.onnx / .ts from tools/export_model.py --graph e2e): "
                        "evaluated and timed as one more row; skipped where yolact_d2.runtime is absent")
    p.add_argument("--benchmark-args", default="",
                   help="extra tools/benchmark.py arguments, one quoted string; runtimes it times besides "
                        "the models get timing-only rows")
    p.add_argument("--from-report", help="use this report.json instead of running (with --readme-table / --update-readme)")
    p.add_argument("--readme-table", action="store_true", help="print the README's Markdown block")
    p.add_argument("--update-readme", metavar="README", help="write the block between <!-- compare:begin/end --> of this file")
    return p.parse_args(argv)


def main(argv=None):
    import json

    from yolact_d2 import compare as C

    args = parse_args(argv)
    try:
        if args.from_report:
            if not Path(args.from_report).is_file():
                raise C.CompareError(f"{args.from_report} not found: give a report.json written by tools/compare.py")
            report = json.loads(Path(args.from_report).read_text())
        else:
            if args.with_yolact_plus and not args.yolact_plus_config:
                args.yolact_plus_config = C.DEFAULT_CONFIGS["yolact_plus"]
            specs = [C.ModelSpec("yolact", args.yolact_config, args.yolact_weights, args.yolact_opts),
                     C.ModelSpec("mask_rcnn", args.mask_rcnn_config, args.mask_rcnn_weights, args.mask_rcnn_opts)]
            if args.with_yolact_plus or args.yolact_plus_weights:
                specs.append(C.ModelSpec("yolact_plus", args.yolact_plus_config or C.DEFAULT_CONFIGS["yolact_plus"],
                                         args.yolact_plus_weights, args.yolact_plus_opts))
            data = C.Dataset.pennfudan()
            for name in ("train_json", "train_images", "val_json", "val_images"):
                if getattr(args, name):
                    setattr(data, name, getattr(args, name))
            command = shlex.join(["python", "tools/compare.py", *(sys.argv[1:] if argv is None else argv)])
            report = C.run_comparison(specs, data, args.output_dir, args.iters, args.opts, args.num_images,
                                      args.vis_images, args.score_thresh, args.threads,
                                      shlex.split(args.benchmark_args), command, args.exported)
        block = C.readme_block(report)
        if args.readme_table:
            print(block)
        if args.update_readme:
            C.update_readme(args.update_readme, block)
            print(f"updated the comparison block of {args.update_readme}")
    except C.CompareError as e:
        raise SystemExit(f"error: {e}") from None
    return report


if __name__ == "__main__":
    main()
