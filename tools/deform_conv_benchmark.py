#!/usr/bin/env python
"""Per-op speed of YOLACT++'s deformable convs: torchvision's deform_conv2d vs this project's CPU path.

    python tools/deform_conv_benchmark.py --config-file configs/yolact_plus_R_50_FPN_550.yaml --threads 1 2

Builds the config's ResNet (random weights), runs one image of INPUT_SIZE through it with hooks
on every deformable conv to find their input shapes (R-50 550: six shapes, res3 / res4 / res5 x
the stride-2 first block and the others), then times on each shape, in the same process and
interleaved call by call on the same tensors (offsets of a few pixels, so that samples leave the
grid and fall outside the map; a sigmoid mask):

* ``torchvision``: ``torchvision.ops.deform_conv2d`` (MODEL.YOLACT.DEFORM_CONV_IMPL torchvision);
* ``ours``: :func:`yolact_d2.deform_conv.deform_conv2d` on the CPU (``auto``), weight cache warm
  as in a model, its GEMM through oneDNN;
* ``ours, MKL GEMM``: the same with ``deform_conv2d(..., onednn_gemm=False)`` (``F.linear``),
  the evidence for that switch;
* ``plain 3x3 conv``: ``F.conv2d`` of the same shape, the cost a deformable conv cannot go below
  by much (same multiply-adds, no sampling);

at each ``--threads`` count, under ``torch.inference_mode``, in channels-last as the model runs. It
reports medians, ours / torchvision, the largest difference between the two outputs, and the sums
over the network's blocks (each shape times its block count). JSON: ``--output-json``.
"""
import argparse
import json
import os
import time
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate

from yolact_d2 import benchmarking as bm
from yolact_d2.console import HelpFormatter

IMPLS = ("torchvision", "ours", "ours, MKL GEMM", "plain 3x3 conv")


def block_shapes(config_file: str, opts=()) -> List[Dict]:
    """The deformable convs of the config's ResNet: unique (name, channels, size, stride) with counts."""
    from detectron2.layers import ShapeSpec

    from yolact_d2.backbone import ModulatedDeformConv, build_yolact_resnet
    from yolact_d2.config import load_config

    cfg = load_config(config_file, opts)
    resnet = build_yolact_resnet(cfg, ShapeSpec(channels=3)).eval()
    seen: "OrderedDict[tuple, Dict]" = OrderedDict()

    def hook(module, args, name):
        x = args[0]
        key = (name.split(".")[0], x.shape[1], module.weight.shape[0], x.shape[2], x.shape[3], module.stride)
        entry = seen.setdefault(key, {"stage": key[0], "in_channels": key[1], "out_channels": key[2],
                                      "height": key[3], "width": key[4], "stride": module.stride,
                                      "padding": module.padding, "dilation": module.dilation, "blocks": []})
        entry["blocks"].append(name)

    handles = [m.register_forward_pre_hook(lambda mod, a, _n=n: hook(mod, a, _n))
               for n, m in resnet.named_modules() if isinstance(m, ModulatedDeformConv)]
    size = cfg.MODEL.YOLACT.INPUT_SIZE
    with torch.inference_mode():
        resnet(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    shapes = list(seen.values())
    for s in shapes:
        first = s["stride"] != 1
        s["name"] = f"{s['stage']} {'first block, stride ' + str(s['stride']) if first else 'other blocks'}"
    return shapes


def time_shape(shape: Dict, threads: int, repeat: int, batch: int, seed: int = 0) -> Dict:
    """Interleaved medians of the three implementations on one shape at ``threads``."""
    from yolact_d2.deform_conv import ColumnWeightCache, deform_conv2d

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    c, co, h, w, s = shape["in_channels"], shape["out_channels"], shape["height"], shape["width"], shape["stride"]
    p, d = shape["padding"], shape["dilation"]
    ho, wo = (h + 2 * p - 2 * d - 1) // s + 1, (w + 2 * p - 2 * d - 1) // s + 1
    x = torch.randn(batch, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    offset = (2 * torch.randn(batch, 18, ho, wo, generator=g)).contiguous(memory_format=torch.channels_last)
    mask = torch.sigmoid(torch.randn(batch, 9, ho, wo, generator=g)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(co, c, 3, 3, generator=g) / (3 * c ** 0.5)
    bias = torch.randn(co, generator=g)
    plain_weight = weight.contiguous(memory_format=torch.channels_last)
    cache = ColumnWeightCache()

    def mkl_gemm():
        return deform_conv2d(x, offset, weight, bias, stride=s, padding=p, dilation=d, mask=mask, weight_cache=cache,
                             onednn_gemm=False)

    calls = {
        "torchvision": lambda: torchvision.ops.deform_conv2d(x, offset, weight, bias, stride=s, padding=p,
                                                             dilation=d, mask=mask),
        "ours": lambda: deform_conv2d(x, offset, weight, bias, stride=s, padding=p, dilation=d, mask=mask,
                                      weight_cache=cache),
        "ours, MKL GEMM": mkl_gemm,
        "plain 3x3 conv": lambda: F.conv2d(x, plain_weight, bias, stride=s, padding=p, dilation=d),
    }
    samples = {k: [] for k in calls}
    with torch.inference_mode():
        diff = (calls["ours"]() - calls["torchvision"]()).abs().max().item()
        calls["plain 3x3 conv"]()
        for _ in range(repeat):
            for k, fn in calls.items():
                start = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - start)
    medians = {k: 1e3 * float(np.median(v)) for k, v in samples.items()}
    return {"threads": threads, "median_ms": medians,
            "p10_ms": {k: 1e3 * float(np.percentile(v, 10)) for k, v in samples.items()},
            "p90_ms": {k: 1e3 * float(np.percentile(v, 90)) for k, v in samples.items()},
            "ours_over_torchvision": medians["ours"] / medians["torchvision"],
            "ours_over_plain_conv": medians["ours"] / medians["plain 3x3 conv"],
            "onednn_over_mkl_gemm": medians["ours"] / medians["ours, MKL GEMM"],
            "max_abs_difference": diff, "output_shape": [batch, co, ho, wo]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config-file", default="configs/yolact_plus_R_50_FPN_550.yaml", help="a YOLACT++ config")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE overrides (e.g. MODEL.YOLACT.INPUT_SIZE 320)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values, in turn")
    p.add_argument("--repeat", type=int, default=15, help="timed calls per implementation, shape and thread count")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output-json", help="default: output/benchmark/deform_conv_ops.json")
    args = p.parse_args(argv)
    if min(args.threads + [args.repeat, args.batch_size]) < 1:
        p.error("--threads, --repeat and --batch-size must be >= 1")
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    path, _ = bm.resolve_config(args.config_file)
    shapes = block_shapes(path, args.opts)
    if not shapes:
        raise SystemExit(f"{args.config_file} has no deformable convs (MODEL.RESNETS.DEFORM_ON_PER_STAGE)")
    meta = bm.environment("cpu", argv)
    meta.update(repeat=args.repeat, batch_size=args.batch_size, thread_counts=args.threads)
    results, rows, totals = [], [], {}
    for t in args.threads:
        total = dict.fromkeys(IMPLS, 0.0)
        for shape in shapes:
            r = time_shape(shape, t, args.repeat, args.batch_size)
            results.append({**{k: v for k, v in shape.items() if k != "blocks"}, "count": len(shape["blocks"]),
                            "blocks": shape["blocks"], **r})
            m = r["median_ms"]
            for k in IMPLS:
                total[k] += m[k] * len(shape["blocks"])
            rows.append((t, shape["name"], f"{shape['in_channels']}x{shape['height']}x{shape['width']}",
                         len(shape["blocks"]), f"{m['torchvision']:.1f}", f"{m['ours']:.1f}", f"{m['ours, MKL GEMM']:.1f}",
                         f"{m['plain 3x3 conv']:.1f}",
                         f"{r['ours_over_torchvision']:.2f}x", f"{r['max_abs_difference']:.1e}"))
            print(f"  {t} thread(s) {shape['name']}: " + ", ".join(f"{k} {m[k]:.1f} ms" for k in IMPLS), flush=True)
        totals[str(t)] = {**total, "ours_over_torchvision": total["ours"] / total["torchvision"],
                          "ours_over_plain_conv": total["ours"] / total["plain 3x3 conv"],
                          "onednn_over_mkl_gemm": total["ours"] / total["ours, MKL GEMM"]}
        rows.append((t, "all deformable blocks (x count)", "", sum(len(s["blocks"]) for s in shapes),
                     f"{total['torchvision']:.1f}", f"{total['ours']:.1f}", f"{total['ours, MKL GEMM']:.1f}",
                     f"{total['plain 3x3 conv']:.1f}",
                     f"{totals[str(t)]['ours_over_torchvision']:.2f}x", ""))
    meta["loadavg_end"] = list(os.getloadavg())
    print(f"\n{args.config_file}, batch {args.batch_size}, {args.repeat} interleaved calls each, "
          f"{meta['cpu_count']} CPUs ({meta['cpu_model']}), load average {meta['loadavg_start'][0]:.2f} at start, "
          f"{meta['loadavg_end'][0]:.2f} at end")
    print(tabulate(rows, headers=["threads", "deformable conv", "input CxHxW", "blocks", "torchvision ms", "ours ms",
                                  "ours, MKL GEMM ms", "plain 3x3 ms", "ours / tv", "max |diff|"], disable_numparse=True,
                   colalign=("right", "left", "left") + ("right",) * 7))
    out = {"meta": meta, "config": args.config_file, "opts": args.opts, "shapes": results, "totals_ms": totals}
    json_path = args.output_json or os.path.join("output", "benchmark", "deform_conv_ops.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {json_path}")
    return out


if __name__ == "__main__":
    from yolact_d2.errors import run_main

    run_main(main, "deform_conv_benchmark.py")
