"""Priors fitted to a dataset's boxes (``MODEL.YOLACT.FIT_PRIORS``, ``tools/fit_priors.py``).

YOLACT's priors are fixed by hand: per FPN level a few scales (pixels at ``INPUT_SIZE``) and aspect
ratios shared by every level (:func:`~yolact_d2.priors.make_priors`). This module re-fits those
numbers to the training set's boxes while keeping their count, so the prediction head's shapes (and
checkpoints) stay valid.

What it builds on (ideas, no code):

- YOLOv2 (Redmon & Farhadi, 2017, Sec. "Dimension clusters") chose anchors by k-means on the
  training boxes' sizes. Here the k-means runs in log space and respects YOLACT's layout: each
  object is assigned to the level whose configured scales are nearest in log-scale, the scales of a
  level are a 1-D k-means of its objects' log sqrt(w h), and the shared ratios a 1-D k-means of all
  objects' log(w / h).
- YOLOv5's AutoAnchor (Ultralytics) measures the anchors' "best possible recall" before training and
  refines k-means anchors by a short mutation-and-select evolution. Here the measure is the coverage
  :mod:`yolact_d2.diagnostics` logs: objects with a prior at IoU >= ``POS_IOU_THRESH`` (the exact IoU
  with the priors on their grid, not a shape ratio), then the sum of each object's best IoU (the
  quantity YOLOv2's k-means minimises as 1 - IoU); the positives per object are reported.

The search is seeded and deterministic; with several processes rank 0 fits and broadcasts
(:func:`fit_priors_at_setup`). The result is never worse than the configured priors: they are one of
the starting points and a candidate is only kept when it covers at least as many objects.
"""
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .diagnostics import dataset_prior_coverage, format_coverage, square_boxes
from .errors import ConfigError, DatasetError
from .priors import feature_sizes

__all__ = ["CoverageCounter", "PriorFit", "fit_priors", "fit_priors_to_dataset", "fit_priors_at_setup",
           "training_dataset_dicts", "config_lines"]

logger = logging.getLogger(__name__)

# Search bounds: a level's scales stay within this factor of its configured smallest / largest
# scale, the ratios within [1 / MAX_RATIO, MAX_RATIO]. They bound the candidate (object, cell)
# pairs the counter precomputes.
SCALE_RANGE = 2.0
MAX_RATIO = 8.0


class CoverageCounter:
    """Exact count of the priors at IoU >= ``pos_thresh`` per object, for any prior sizes within
    bounds, without building every prior.

    A prior of level l sits at a cell centre ``((x + 0.5) / w, (y + 0.5) / h)`` with one of the
    level's (pw, ph) sizes (:func:`~yolact_d2.priors.make_priors`). IoU >= t needs (i) the areas
    within a factor t of each other, and (ii) a centre offset |dx| <= K w_g, |dy| <= K h_g with
    K = (1 / c^2 - 1) / 2, c = 2t / (1 + t) (from I >= t/(1+t) (A_g + A_p) >= c sqrt(A_g A_p) and
    I_x <= min(w_g, w_p), I_x <= (w_g + w_p) / 2 - |dx|). The (object, cell) pairs meeting both for
    some size within the bounds are listed once; each count then computes only their IoUs.

    Args:
        boxes: (G, 4) float (x0, y0, x1, y1) relative to the square input (0..1), G > 0, all with
            positive width and height.
        sizes: (h, w) of each level's feature map, P3 first.
        pos_thresh: the positive IoU threshold, in (0, 1).
        area_bounds: per level, (min, max) prior area (relative units squared) the search can reach.
    """

    def __init__(self, boxes: torch.Tensor, sizes: Sequence[Tuple[int, int]], pos_thresh: float,
                 area_bounds: Sequence[Tuple[float, float]]):
        if not 0 < pos_thresh < 1:
            raise ConfigError(f"MODEL.YOLACT.POS_IOU_THRESH must be in (0, 1) to fit priors, got {pos_thresh}")
        b = boxes.double()
        self.num_objects = int(b.shape[0])
        self.t = float(pos_thresh)
        c = 2 * self.t / (1 + self.t)
        reach = (1 / c ** 2 - 1) / 2 + 1e-9
        wg, hg = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        gx, gy, area = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, wg * hg
        gi, lv, cx, cy = [], [], [], []
        for level, ((h, w), (amin, amax)) in enumerate(zip(sizes, area_bounds)):
            ok = (area * self.t <= amax * (1 + 1e-9)) & (area / self.t >= amin * (1 - 1e-9))
            for g in ok.nonzero().flatten().tolist():
                x0 = max(0, math.ceil((gx[g] - reach * wg[g]).item() * w - 0.5))
                x1 = min(w - 1, math.floor((gx[g] + reach * wg[g]).item() * w - 0.5))
                y0 = max(0, math.ceil((gy[g] - reach * hg[g]).item() * h - 0.5))
                y1 = min(h - 1, math.floor((gy[g] + reach * hg[g]).item() * h - 0.5))
                if x1 < x0 or y1 < y0:
                    continue
                yy, xx = torch.meshgrid(torch.arange(y0, y1 + 1), torch.arange(x0, x1 + 1), indexing="ij")
                cx.append((xx.flatten().double() + 0.5) / w)
                cy.append((yy.flatten().double() + 0.5) / h)
                gi.append(torch.full((xx.numel(),), g, dtype=torch.long))
                lv.append(torch.full((xx.numel(),), level, dtype=torch.long))
        cat = (lambda x, dtype: torch.cat(x) if x else torch.zeros(0, dtype=dtype))  # noqa: E731
        self.gi, self.level = cat(gi, torch.long), cat(lv, torch.long)
        self.cx, self.cy = cat(cx, torch.float64)[:, None], cat(cy, torch.float64)[:, None]
        self.g, self.ga = b[self.gi], area[self.gi][:, None]

    @property
    def num_pairs(self) -> int:
        """Candidate (object, cell) pairs over all levels (the cost of one count)."""
        return int(self.gi.numel())

    def counts(self, wh: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Priors at IoU >= pos_thresh per object, and the best IoU of each object's candidates.

        Args:
            wh: per level, (K, 2) float (pw, ph) prior sizes relative to the input (K the same on
                every level), inside the area bounds given at construction (outside them the count
                may miss priors).
        Returns:
            (G,) int64 counts; (G,) float64 best IoU over the candidate pairs (exact whenever it
            is >= pos_thresh, a lower bound below it, 0 without candidates).
        """
        sizes = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in wh])[self.level]  # (P, K, 2)
        pw, ph, g = sizes[..., 0], sizes[..., 1], self.g
        ix = (torch.minimum(g[:, 2:3], self.cx + pw / 2) - torch.maximum(g[:, 0:1], self.cx - pw / 2)).clamp(min=0)
        iy = (torch.minimum(g[:, 3:4], self.cy + ph / 2) - torch.maximum(g[:, 1:2], self.cy - ph / 2)).clamp(min=0)
        inter = ix * iy
        iou = inter / (self.ga + pw * ph - inter)
        out = torch.zeros(self.num_objects, dtype=torch.long).index_add_(0, self.gi, (iou >= self.t).sum(dim=1))
        best = torch.zeros(self.num_objects, dtype=torch.float64)
        if len(self.gi):
            best.scatter_reduce_(0, self.gi, iou.max(dim=1).values, reduce="amax")
        return out, best

    def score(self, wh: Sequence[torch.Tensor]) -> Tuple[int, float]:
        """The objective, compared lexicographically: (objects with a prior at IoU >= pos_thresh,
        sum over objects of the best prior's IoU)."""
        c, best = self.counts(wh)
        return int((c > 0).sum()), round(float(best.sum()), 9)


def _sizes(log_scales: np.ndarray, log_ratios: np.ndarray, input_size: float, square: bool) -> List[torch.Tensor]:
    """Per level (S*R, 2) (pw, ph) in make_priors' order (scale, then ratio)."""
    out = []
    r = np.exp(log_ratios / 2)
    for ls in log_scales:
        pw = (np.exp(ls)[:, None] * r[None]).reshape(-1) / input_size
        ph = pw if square else (np.exp(ls)[:, None] / r[None]).reshape(-1) / input_size
        out.append(torch.from_numpy(np.stack([pw, ph], axis=1)))
    return out


def _kmeans_1d(x: np.ndarray, init: np.ndarray, iters: int = 30) -> np.ndarray:
    """Lloyd's k-means on a 1-D sample from ``init`` (an empty cluster keeps its centre)."""
    c = init.astype(np.float64).copy()
    for _ in range(iters):
        nearest = np.abs(x[:, None] - c[None]).argmin(axis=1)
        new = np.array([x[nearest == k].mean() if (nearest == k).any() else c[k] for k in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    return c


@dataclass
class PriorFit:
    """A fit's result: ``scales`` (per level, pixels at the input size) and ``aspect_ratios``
    (w / h, shared), with the objective ``(covered objects, best-IoU sum)`` before (configured
    priors) and after, as the counter measures them, ``num_objects`` boxes fitted to, ``evaluations``
    of the objective, ``start`` ("configured" or "k-means") and the objective's ``history``."""
    scales: List[List[float]]
    aspect_ratios: List[float]
    before: Tuple[int, int]
    after: Tuple[int, int]
    num_objects: int
    evaluations: int = 0
    start: str = "configured"
    history: List[Tuple[int, int]] = field(default_factory=list)


def fit_priors(
    boxes: Sequence[torch.Tensor],
    scales: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float],
    input_size: int,
    sizes: Sequence[Tuple[int, int]],
    pos_thresh: float,
    square: bool = False,
    iterations: int = 300,
    seed: int = 0,
) -> PriorFit:
    """Fit the priors' scales per level and their shared aspect ratios to a set of boxes.

    The layout stays as configured: ``len(scales[l])`` scales on level l, ``len(aspect_ratios)``
    ratios on every level, so the prior count (and the head's shapes) do not change. Parameters are
    log-scales per level and log-ratios, i.e. the frame the priors live in (boxes stretched to the
    square input, as the loss matches them).

    Steps: (1) start from the better of the configured priors and a log-space k-means (objects to
    levels by nearest configured log-scale; a 1-D k-means per level on log sqrt(w h), one on all
    objects' log(w / h)), as YOLOv2's dimension clusters adapted to the layout; (2) ``iterations``
    steps of a (1+1) evolution with a seeded ``numpy`` generator (each parameter mutated with
    probability 0.5 by a Gaussian step shrinking from 0.3 to 0.03 in log units), as YOLOv5's
    AutoAnchor evolves its anchors, keeping a candidate that is not worse; (3) a coordinate search
    in steps of 0.1, 0.03, 0.01 (at most two sweeps each). The objective
    (:meth:`CoverageCounter.score`, exact) is the number of objects with a prior at IoU >=
    ``pos_thresh`` first, then the sum of each object's best IoU (positives per object as the
    second criterion piled copies of one prior on the common shape: docs/priors.md). Values are
    rounded (scales to 0.01 px, ratios to 1e-4) before the last measure; if the rounded fit covers
    fewer objects than the configured priors, those are returned.

    Returns:
        :class:`PriorFit`; ``before`` / ``after`` are ``(covered objects, best-IoU sum)``.

    Args:
        boxes: per image, (G, 4) boxes (x0, y0, x1, y1) relative to the square input (0..1);
            boxes without positive width and height are left out.
        scales: per level, the configured prior scales in pixels at ``input_size``.
        aspect_ratios: the configured width / height ratios.
        input_size: side of the square network input, pixels.
        sizes: (h, w) of each level's feature map (:func:`~yolact_d2.priors.feature_sizes`).
        pos_thresh: MODEL.YOLACT.POS_IOU_THRESH.
        square: MODEL.YOLACT.SQUARE_ANCHORS (h = w for every ratio).
        iterations: evolution steps (0: k-means and coordinate search only).
        seed: the generator's seed; the same inputs and seed give the same fit.
    Raises:
        DatasetError: no box with positive width and height.
        ConfigError: levels of ``scales`` and ``sizes`` differ, levels with different numbers of
            scales (or none), no ratio, or ``pos_thresh`` outside (0, 1).
    """
    if len(scales) != len(sizes):
        raise ConfigError(f"{len(sizes)} feature levels but {len(scales)} lists of MODEL.YOLACT.ANCHOR_SCALES")
    if any(len(s) == 0 for s in scales) or not aspect_ratios or len({len(s) for s in scales}) != 1:
        raise ConfigError("every level needs the same number (>= 1) of MODEL.YOLACT.ANCHOR_SCALES, and at least "
                          f"one aspect ratio, to fit priors; got {list(scales)}")
    b = [torch.as_tensor(x, dtype=torch.float64).reshape(-1, 4) for x in boxes]
    b = torch.cat(b) if b else torch.zeros(0, 4, dtype=torch.float64)
    b = b[((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)]
    if len(b) == 0:
        raise DatasetError("no box with a positive width and height to fit priors to (check the training set)")
    input_size = float(input_size)
    ls0 = [np.log(np.asarray(s, np.float64)) for s in scales]
    lr0 = np.log(np.asarray(aspect_ratios, np.float64))
    lo = np.array([s.min() for s in ls0]) - math.log(SCALE_RANGE)
    hi = np.array([s.max() for s in ls0]) + math.log(SCALE_RANGE)
    rmax = max(math.log(MAX_RATIO), float(np.abs(lr0).max()))
    # Reachable prior areas per level (relative units): w h = s^2, or s^2 a for square priors.
    ext = 2 * rmax if square else 0.0
    area_bounds = [(math.exp(2 * lo[i] - ext) / input_size ** 2, math.exp(2 * hi[i] + ext) / input_size ** 2)
                   for i in range(len(scales))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads cost more than they give, above all on a busy CPU
    try:
        return _search(b, ls0, lr0, lo, hi, rmax, area_bounds, sizes, pos_thresh, input_size, square, iterations,
                       seed, scales, aspect_ratios)
    finally:
        torch.set_num_threads(threads)


def _search(b, ls0, lr0, lo, hi, rmax, area_bounds, sizes, pos_thresh, input_size, square, iterations, seed,
            scales, aspect_ratios) -> PriorFit:
    counter = CoverageCounter(b, sizes, pos_thresh, area_bounds)

    n_s = [len(s) for s in ls0]
    split = np.cumsum(n_s)[:-1]
    lo_vec = np.concatenate([np.full(n, lo[i]) for i, n in enumerate(n_s)] + [np.full(len(lr0), -rmax)])
    hi_vec = np.concatenate([np.full(n, hi[i]) for i, n in enumerate(n_s)] + [np.full(len(lr0), rmax)])
    n_scale = int(sum(n_s))

    def unpack(theta):
        return np.split(theta[:n_scale], split), theta[n_scale:]

    evals = [0]

    def score(theta):
        evals[0] += 1
        ls, lr = unpack(theta)
        return counter.score(_sizes(ls, lr, input_size, square))

    theta0 = np.concatenate(ls0 + [lr0])
    before = score(theta0)

    # (1) log-space k-means on the objects' sizes in pixels at the input.
    wg, hg = (b[:, 2] - b[:, 0]).numpy() * input_size, (b[:, 3] - b[:, 1]).numpy() * input_size
    log_s, log_r = 0.5 * np.log(wg * hg), np.log(wg / hg)
    centres = np.array([s.mean() for s in ls0])
    level = np.abs(log_s[:, None] - centres[None]).argmin(axis=1)
    ls_km = [_kmeans_1d(log_s[level == i], ls0[i]) if (level == i).any() else ls0[i] for i in range(len(ls0))]
    lr_km = lr0 if square else _kmeans_1d(log_r, lr0)
    theta_km = np.clip(np.concatenate(ls_km + [lr_km]), lo_vec, hi_vec)
    best, start = (theta0, before), "configured"
    km = score(theta_km)
    if km > before:
        best, start = (theta_km, km), "k-means"
    theta, cur = best
    history = [cur]

    # (2) (1+1) evolution, seeded.
    rng = np.random.default_rng(seed)
    for i in range(iterations):
        sigma = 0.3 * (0.1 ** (i / max(1, iterations - 1)))
        mask = rng.random(theta.shape) < 0.5
        if not mask.any():
            mask[rng.integers(len(theta))] = True
        cand = np.clip(theta + mask * rng.normal(0.0, sigma, theta.shape), lo_vec, hi_vec)
        s = score(cand)
        if s >= cur:
            theta, cur = cand, s
        history.append(cur)

    # (3) coordinate search.
    for step in (0.1, 0.03, 0.01):
        improved, sweeps = True, 0
        while improved and sweeps < 2:
            improved, sweeps = False, sweeps + 1
            for k in range(len(theta)):
                for d in (step, -step):
                    cand = theta.copy()
                    cand[k] = np.clip(cand[k] + d, lo_vec[k], hi_vec[k])
                    s = score(cand)
                    if s > cur:
                        theta, cur, improved = cand, s, True
                        break
        history.append(cur)

    ls, lr = unpack(theta)
    fit_scales = [[round(float(v), 2) for v in np.exp(x)] for x in ls]
    fit_ratios = [round(float(v), 4) for v in np.exp(lr)]
    after = score(np.concatenate([np.log(np.asarray(s)) for s in fit_scales] + [np.log(np.asarray(fit_ratios))]))
    if after < before:
        fit_scales, fit_ratios = [list(map(float, s)) for s in scales], list(map(float, aspect_ratios))
        after, start = before, "configured (kept)"
    return PriorFit(fit_scales, fit_ratios, before, after, counter.num_objects, evals[0], start, history)


def training_dataset_dicts(cfg) -> List[dict]:
    """The dataset dicts of ``cfg.DATASETS.TRAIN`` (built-in names registered first), crowd-only
    images kept out as the training loader does."""
    from detectron2.data import DatasetCatalog, get_detection_dataset_dicts

    from .data.datasets import register_builtin_datasets

    register_builtin_datasets()
    if not cfg.DATASETS.TRAIN:
        raise DatasetError("DATASETS.TRAIN is empty: there are no training boxes to fit priors to")
    unknown = [n for n in cfg.DATASETS.TRAIN if n not in DatasetCatalog.list()]
    if unknown:
        raise DatasetError(f"dataset {unknown[0]!r} (DATASETS.TRAIN) is not registered; use a registered name "
                           "or give --train-json / --train-images")
    return get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)


def fit_priors_to_dataset(cfg, dataset_dicts: List[dict], iterations: Optional[int] = None, seed: int = 0,
                          max_images: int = 2000) -> Tuple[PriorFit, Dict[str, float], Dict[str, float]]:
    """Fit ``cfg``'s priors to a dataset's boxes and write them into ``cfg`` (not frozen):
    ``MODEL.YOLACT.ANCHOR_SCALES`` / ``ANCHOR_ASPECT_RATIOS`` get the fitted values.

    Returns:
        (fit, coverage before, coverage after): the coverages are
        :func:`~yolact_d2.diagnostics.dataset_prior_coverage` (brute-force IoU over every prior) of
        the configured and of the fitted priors.
    """
    y = cfg.MODEL.YOLACT
    levels = [int(f.lstrip("p")) for f in y.IN_FEATURES]
    before = dataset_prior_coverage(cfg, dataset_dicts, max_images)
    boxes, _ = square_boxes(dataset_dicts, max_images)
    fit = fit_priors(boxes, y.ANCHOR_SCALES, y.ANCHOR_ASPECT_RATIOS, y.INPUT_SIZE, feature_sizes(y.INPUT_SIZE, levels),
                     y.POS_IOU_THRESH, y.SQUARE_ANCHORS, y.FIT_PRIORS_ITERATIONS if iterations is None else iterations,
                     seed)
    y.ANCHOR_SCALES = fit.scales
    y.ANCHOR_ASPECT_RATIOS = fit.aspect_ratios
    after = dataset_prior_coverage(cfg, dataset_dicts, max_images)
    return fit, before, after


def config_lines(scales, aspect_ratios) -> str:
    """The YAML lines that set these priors in a config file."""
    s = ", ".join("[" + ", ".join(f"{v:g}" for v in lv) + "]" for lv in scales)
    r = ", ".join(f"{v:g}" for v in aspect_ratios)
    return f"MODEL:\n  YOLACT:\n    ANCHOR_SCALES: [{s}]\n    ANCHOR_ASPECT_RATIOS: [{r}]"


def _saved_priors(output_dir: str):
    """(scales, ratios) of OUTPUT_DIR/config.yaml when a checkpoint is there to resume, else None."""
    if not os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        return None
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    y = saved.get("MODEL", {}).get("YOLACT", {})
    if "ANCHOR_SCALES" not in y or "ANCHOR_ASPECT_RATIOS" not in y:
        return None
    return [list(map(float, s)) for s in y["ANCHOR_SCALES"]], list(map(float, y["ANCHOR_ASPECT_RATIOS"]))


def fit_priors_at_setup(cfg, resume: bool = False, eval_only: bool = False, dataset_dicts=None) -> Optional[str]:
    """``MODEL.YOLACT.FIT_PRIORS`` at set-up, on a ``cfg`` not yet frozen and before detectron2's
    ``default_setup`` writes OUTPUT_DIR/config.yaml, so the saved config holds the fitted priors
    (and ``FIT_PRIORS False``: evaluation, the demo, export and a later run build the same priors
    without fitting again).

    - ``--resume`` with a checkpoint in OUTPUT_DIR: the priors of OUTPUT_DIR/config.yaml (the ones
      the checkpoint was trained with) are taken, not re-fitted.
    - ``--eval-only``: nothing is fitted; the checkpoint's stored priors are used
      (:func:`yolact_d2.checkpoint.adopt_priors`; a checkpoint without them keeps the config's,
      with a warning).
    - Several processes: rank 0 decides and fits, every rank receives its values.

    ``dataset_dicts``: a function returning the training dicts, for a caller whose data is not
    registered yet (tools/main_job.py); default: those of ``DATASETS.TRAIN``.

    Returns:
        "fitted", "resumed" or "eval-only" when FIT_PRIORS is set, else None.
    """
    from detectron2.utils import comm

    y = cfg.MODEL.YOLACT
    if cfg.MODEL.META_ARCHITECTURE != "YOLACT" or not y.FIT_PRIORS:
        return None
    if eval_only:  # nothing to fit: the loaded checkpoint's stored priors are used (checkpoint.adopt_priors)
        return "eval-only"
    result = None
    if comm.is_main_process():
        saved = _saved_priors(cfg.OUTPUT_DIR) if resume else None
        if saved is not None:
            logger.info(f"Resuming: priors of {os.path.join(cfg.OUTPUT_DIR, 'config.yaml')} kept, not re-fitted")
            result = (saved[0], saved[1], "resumed")
        else:
            dicts = dataset_dicts() if dataset_dicts is not None else training_dataset_dicts(cfg)
            fit, before, after = fit_priors_to_dataset(cfg, dicts)
            logger.info(format_coverage(before, "Prior coverage of the training set, configured priors:"))
            logger.info(format_coverage(after, f"Prior coverage of the training set, fitted priors "
                                                f"(MODEL.YOLACT.FIT_PRIORS, {fit.evaluations} evaluations):"))
            logger.info("Fitted priors (in OUTPUT_DIR/config.yaml):\n" + config_lines(fit.scales, fit.aspect_ratios))
            result = (fit.scales, fit.aspect_ratios, "fitted")
    if comm.get_world_size() > 1:
        result = comm.all_gather(result)[0]
    y.ANCHOR_SCALES, y.ANCHOR_ASPECT_RATIOS = result[0], result[1]
    y.FIT_PRIORS = False
    return result[2]
