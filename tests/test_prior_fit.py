"""Priors fitted to the training boxes (yolact_d2/prior_fit.py, MODEL.YOLACT.FIT_PRIORS)."""
import sys

import numpy as np
import pytest
import torch

from conftest import DATA, REPO, need

from yolact_d2.priors import make_priors
from yolact_d2.prior_fit import CoverageCounter, _sizes, fit_priors

sys.path.insert(0, str(REPO))

SIZE = 64
LEVELS = [(8, 8), (4, 4), (2, 2)]  # P3-P5 at 64 px
SCALES = [[8.0, 11.0], [16.0, 22.0], [32.0, 45.0]]
RATIOS = [1.0, 0.5, 2.0]
SUBSET = "pennfudan_train_first12"  # 12 photos: the fit's cost grows with the objects
TINY = ["MODEL.YOLACT.INPUT_SIZE", "128", "MODEL.FPN.OUT_CHANNELS", "32", "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TRAIN", f"('{SUBSET}',)", "DATASETS.TEST", "()",
        "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "1",
        "MODEL.YOLACT.FIT_PRIORS", "True", "MODEL.YOLACT.FIT_PRIORS_ITERATIONS", "20"]


def hand_made_boxes():
    """Two images of boxes (x0, y0, x1, y1) in pixels at 64: tall thin poles, wide strips and
    squares of several sizes, many of which the configured priors miss at IoU 0.5."""
    a = [[3, 2, 9, 40], [30, 5, 36, 50], [40, 10, 47, 60], [2, 50, 40, 58], [10, 20, 20, 30]]
    b = [[5, 5, 60, 17], [20, 30, 28, 62], [33, 33, 63, 63], [0, 0, 13, 13], [44, 2, 50, 30], [12, 40, 19, 63]]
    return [torch.tensor(a, dtype=torch.float32) / SIZE, torch.tensor(b, dtype=torch.float32) / SIZE]


def brute_force_counts(boxes, priors, t):
    """Priors at IoU >= t per object, by the definition, one pair at a time."""
    counts = []
    for g in torch.cat(boxes).tolist():
        n = 0
        for cx, cy, w, h in priors.tolist():
            p = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            iw = max(0.0, min(g[2], p[2]) - max(g[0], p[0]))
            ih = max(0.0, min(g[3], p[3]) - max(g[1], p[1]))
            inter = iw * ih
            union = (g[2] - g[0]) * (g[3] - g[1]) + w * h - inter
            n += inter / union >= t
        counts.append(n)
    return counts


def test_fit_coverage_matches_a_brute_force_iou_count():
    boxes = hand_made_boxes()
    fit = fit_priors(boxes, SCALES, RATIOS, SIZE, LEVELS, 0.5, iterations=40, seed=0)
    # Same layout: scales per level and ratios keep their count.
    assert [len(s) for s in fit.scales] == [2, 2, 2] and len(fit.aspect_ratios) == 3
    before = brute_force_counts(boxes, make_priors(LEVELS, SCALES, RATIOS, SIZE, False), 0.5)
    after = brute_force_counts(boxes, make_priors(LEVELS, fit.scales, fit.aspect_ratios, SIZE, False), 0.5)
    covered = lambda c: sum(n > 0 for n in c)  # noqa: E731
    # The fit's own objective is the brute-force count, before and after.
    assert fit.before[0] == covered(before) and fit.after[0] == covered(after)
    # The configured priors miss several of these objects; the fit covers strictly more.
    assert covered(before) < len(before) and covered(after) > covered(before)
    # The counter's per-object counts equal the definition for any sizes within bounds.
    counter = CoverageCounter(torch.cat(boxes), LEVELS, 0.5, [(0.0, 1.0)] * 3)
    ls = [np.log(np.asarray(s)) for s in fit.scales]
    assert counter.counts(_sizes(ls, np.log(np.asarray(fit.aspect_ratios)), SIZE, False))[0].tolist() == after
    assert counter.counts(_sizes([np.log(np.asarray(s)) for s in SCALES], np.log(np.asarray(RATIOS)), SIZE,
                                 True))[0].tolist() == brute_force_counts(
        boxes, make_priors(LEVELS, SCALES, RATIOS, SIZE, True), 0.5)
    # Seeded: the same inputs give the same fit.
    again = fit_priors(boxes, SCALES, RATIOS, SIZE, LEVELS, 0.5, iterations=40, seed=0)
    assert (again.scales, again.aspect_ratios) == (fit.scales, fit.aspect_ratios)


def _args(out_dir, *extra):
    from yolact_d2.engine import argument_parser

    return argument_parser().parse_args(
        ["--config-file", str(REPO / "configs/pennfudan/yolact_R_18_FPN_320.yaml"), *extra,
         *TINY, "OUTPUT_DIR", str(out_dir)])


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """One training step of the tiny Penn-Fudan model with FIT_PRIORS, through train_net's setup."""
    need(DATA / "pennfudan")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from yolact_d2.engine import Trainer, setup
    from yolact_d2.data.datasets import register_builtin_datasets

    register_builtin_datasets()
    if SUBSET not in DatasetCatalog.list():
        DatasetCatalog.register(SUBSET, lambda: DatasetCatalog.get("pennfudan_train")[:12])
        MetadataCatalog.get(SUBSET).set(thing_classes=["person"])
    out = tmp_path_factory.mktemp("fit_priors")
    cfg = setup(_args(out))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, trainer, out


def test_fitted_priors_train_checkpoint_and_rebuild_from_config_yaml(fitted_run):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from conftest import yolact_cfg

    cfg, trainer, out = fitted_run
    configured = yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml").MODEL.YOLACT
    assert cfg.MODEL.YOLACT.ANCHOR_SCALES != configured.ANCHOR_SCALES  # fitted, not the recipe's
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 0  # one step trained, saved
    # The saved config holds the fitted priors, marked as done.
    saved = yolact_cfg(str(out / "config.yaml"))
    assert not saved.MODEL.YOLACT.FIT_PRIORS
    assert saved.MODEL.YOLACT.ANCHOR_SCALES == cfg.MODEL.YOLACT.ANCHOR_SCALES
    assert saved.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS == cfg.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS
    # A model built from config.yaml loads the checkpoint and makes the same priors as the trained one.
    model = build_model(saved)
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert torch.equal(model.prior_generator(sizes, "cpu"), trainer.model.prior_generator(sizes, "cpu"))
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_resume_keeps_the_first_fit(fitted_run, monkeypatch):
    import yolact_d2.prior_fit as prior_fit
    from yolact_d2.engine import setup

    from conftest import yolact_cfg

    cfg, _, out = fitted_run
    calls = []
    real = prior_fit.fit_priors_to_dataset

    def counted(cfg, *a, **k):
        calls.append(1)
        # A re-fit would find other priors: start it from different ones.
        cfg.MODEL.YOLACT.ANCHOR_SCALES = [[s * 1.5 for s in lv] for lv in cfg.MODEL.YOLACT.ANCHOR_SCALES]
        return real(cfg, *a, **k)

    monkeypatch.setattr(prior_fit, "fit_priors_to_dataset", counted)
    resumed = setup(_args(out, "--resume"))
    assert not calls
    assert resumed.MODEL.YOLACT.ANCHOR_SCALES == cfg.MODEL.YOLACT.ANCHOR_SCALES
    assert resumed.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS == cfg.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS
    # Without --resume the same config is fitted again (here from other starting priors: other values).
    fresh = yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml", TINY + ["OUTPUT_DIR", str(out)])
    assert prior_fit.fit_priors_at_setup(fresh, resume=False) == "fitted"
    assert calls == [1] and fresh.MODEL.YOLACT.ANCHOR_SCALES != cfg.MODEL.YOLACT.ANCHOR_SCALES


def test_checkpoint_carries_the_fitted_priors_to_every_loader(fitted_run, tmp_path, caplog):
    """The run's checkpoint stores the fitted priors; the predictor and --eval-only's loader, given
    the recipe's own config file (whose priors are only the fit's start), use the stored ones with
    one warning. A checkpoint without them (an older file) keeps the configured priors, with one
    warning under FIT_PRIORS naming the run's config.yaml, and without a warning when FIT_PRIORS is off."""
    import logging

    from detectron2.modeling import build_model

    from conftest import yolact_cfg
    from yolact_d2.checkpoint import CHECKPOINT_METADATA_KEY, CheckpointLayoutError, checkpoint_metadata, load_for_evaluation
    from yolact_d2.predictor import YolactPredictor

    cfg, trainer, out = fitted_run
    weights = out / "model_final.pth"
    stored = checkpoint_metadata(torch.load(weights, weights_only=False))["priors"]
    assert stored == {"anchor_scales": cfg.MODEL.YOLACT.ANCHOR_SCALES,
                      "anchor_aspect_ratios": cfg.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS, "square_anchors": False}
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    trained = trainer.model.prior_generator(sizes, "cpu")
    recipe = yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml", TINY + ["MODEL.WEIGHTS", str(weights)])
    assert recipe.MODEL.YOLACT.FIT_PRIORS and recipe.MODEL.YOLACT.ANCHOR_SCALES != stored["anchor_scales"]

    with caplog.at_level(logging.WARNING, logger="yolact_d2.checkpoint"):
        predictor = YolactPredictor(recipe)
    assert torch.equal(predictor.model.prior_generator(sizes, "cpu"), trained)
    assert predictor.cfg.MODEL.YOLACT.ANCHOR_SCALES == stored["anchor_scales"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "trained with other priors" in warned[0] and "ANCHOR_SCALES" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="yolact_d2.checkpoint"):  # the run's config.yaml: nothing to adopt
        saved = YolactPredictor(yolact_cfg(str(out / "config.yaml"), ["MODEL.WEIGHTS", str(weights)]))
    assert not caplog.records and torch.equal(saved.model.prior_generator(sizes, "cpu"), trained)
    model = build_model(recipe)
    evaluated = load_for_evaluation(model, recipe, str(weights))
    assert torch.equal(model.prior_generator(sizes, "cpu"), trained)
    assert evaluated.MODEL.YOLACT.ANCHOR_ASPECT_RATIOS == stored["anchor_aspect_ratios"]

    # An older checkpoint (no priors stored): the configured priors, one warning under FIT_PRIORS.
    state = torch.load(weights, weights_only=False)
    del state[CHECKPOINT_METADATA_KEY]["priors"]
    old = tmp_path / "old.pth"
    torch.save(state, old)
    for fit, warnings in (("True", 1), ("False", 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="yolact_d2.checkpoint"):
            plain = YolactPredictor(yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml",
                                               TINY + ["MODEL.WEIGHTS", str(old), "MODEL.YOLACT.FIT_PRIORS", fit]))
        assert plain.cfg.MODEL.YOLACT.ANCHOR_SCALES == recipe.MODEL.YOLACT.ANCHOR_SCALES
        assert torch.equal(plain.model.prior_generator(sizes, "cpu"), build_model(recipe).prior_generator(sizes, "cpu"))
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == warnings and all("stores no priors" in w and "config.yaml" in w for w in warned)
    # Priors of another count per location than the config's head: refused in one line.
    state[CHECKPOINT_METADATA_KEY]["priors"] = dict(stored, anchor_aspect_ratios=[1.0, 0.5])
    torch.save(state, old)
    with pytest.raises(CheckpointLayoutError, match="priors per location"):
        YolactPredictor(yolact_cfg("configs/pennfudan/yolact_R_18_FPN_320.yaml", TINY + ["MODEL.WEIGHTS", str(old)]))
