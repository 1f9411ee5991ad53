"""The schedule that fits the data (yolact_d2/schedule.py): epochs, periodic evaluation, the best
checkpoint, early stop, the time budget, and their state across --resume.

The hook tests train the tiny model for a few iterations with a scripted evaluation (the
trainer's ``test`` returns the AP values given), so the iteration each option must stop at is
known; ``test_epochs_periodic_evaluation_and_tide_through_train_net`` runs the real evaluator."""
import json

import pytest
import torch

from conftest import DATA, need, yolact_cfg
from helpers import CONFIG, TINY
from helpers import train_net_in_process as train_net
from yolact_d2.schedule import budget_steps


def read_state(path):
    return torch.load(path, weights_only=False)


def scripted_run(out, segm_ap, opts=(), resume=False):
    """Trainer on Penn-Fudan (tiny model, no dataset check or diagnostics) whose evaluations return
    ``segm_ap[k]`` as segm/AP at the k-th call. Returns the trainer after ``train()`` and the
    iterations whose weights were evaluated."""
    from yolact_d2.data.datasets import register_builtin_datasets
    from yolact_d2.engine import Trainer

    need(DATA / "pennfudan")
    register_builtin_datasets()
    cfg = yolact_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(out), "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
                                     "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.CHECK.ENABLED", "False",
                                     "MODEL.YOLACT.DIAGNOSTICS.ENABLED", "False", *opts])
    trainer = Trainer(cfg)
    evaluated = []

    def scripted_test(cfg, model):
        # after_train runs with trainer.iter == max_iter: the weights are those of max_iter - 1.
        evaluated.append(min(trainer.iter, trainer.max_iter - 1))
        ap = segm_ap[len(evaluated) - 1]
        return {"bbox": {"AP": ap + 1.0}, "segm": {"AP": ap}}

    trainer.test = scripted_test  # DefaultTrainer's EvalHook calls self.test(cfg, model)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer, evaluated


@pytest.mark.slow
def test_best_checkpoint_patience_and_resume(tmp_path, caplog):
    """Evaluation every iteration, PATIENCE 2, BEST_CHECKPOINT. A first run of 3 iterations (AP
    10, 20 at iterations 0-1, 12 at the final evaluation of iteration 2) ends with best 20 at
    iteration 1 and 1 evaluation without gain, in model_final.pth (written again after the final
    evaluation) as in model_best.pth's own copy at iteration 1 and in the periodic checkpoint of
    iteration 1 (written after its evaluation); last_checkpoint names model_final.pth. --resume to 40 iterations starts at iteration 3 (the last checkpoint, never
    model_best.pth) with best and count kept: one more evaluation without gain (iteration 3) is
    the second, so iteration 3 is the last; its evaluation is the final one (not run twice)."""
    caplog.set_level("INFO", logger="yolact_d2")
    opts = ["TEST.EVAL_PERIOD", "1", "SOLVER.PATIENCE", "2", "SOLVER.BEST_CHECKPOINT", "True"]
    first, evaluated = scripted_run(tmp_path, [10, 20, 12], ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", *opts])
    assert evaluated == [0, 1, 2]
    # The periodic checkpoint of iteration 1 is written after that iteration's evaluation.
    assert read_state(tmp_path / "model_0000001.pth")["yolact_d2_best"]["best"] == 20.0
    final, best = read_state(tmp_path / "model_final.pth"), read_state(tmp_path / "model_best.pth")
    assert final["iteration"] == 2 and final["trainer"]["iteration"] == 2 and best["iteration"] == 1
    assert final["yolact_d2_best"] == {"metric": "segm/AP", "best": 20.0, "best_iteration": 1,
                                       "evaluations_without_gain": 1}
    assert best["yolact_d2_best"] == {"metric": "segm/AP", "best": 20.0, "best_iteration": 1,
                                      "evaluations_without_gain": 0}
    # The weights of iteration 1, not a copy of the last ones.
    key = next(k for k, v in final["model"].items() if v.is_floating_point())
    assert not torch.equal(final["model"][key], best["model"][key])
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert "Evaluation at iteration 2: segm/AP 12.00; best so far 20.00 at iteration 1 (1 evaluation(s) without " \
           "gain of SOLVER.PATIENCE 2)" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["best/segm/AP"] for r in records if "best/segm/AP" in r][-1] == 20

    second, evaluated = scripted_run(tmp_path, [19, 99], ["SOLVER.MAX_ITER", "40", *opts], resume=True)
    assert second.start_iter == 3
    assert evaluated == [3]
    assert second.iter == second.max_iter == 4
    assert "Stopping at iteration 3 of 40: SOLVER.PATIENCE 2: 2 evaluations without a gain of segm/AP " \
           "(best 20.00 at iteration 1)" in caplog.text
    assert read_state(tmp_path / "model_best.pth")["iteration"] == 1
    final = read_state(tmp_path / "model_final.pth")
    assert final["iteration"] == 3 and final["yolact_d2_best"]["evaluations_without_gain"] == 2
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"


@pytest.mark.slow
def test_max_time_ends_training_with_the_final_checkpoint_and_evaluation(tmp_path, caplog):
    """SOLVER.MAX_TIME 1e-4 minutes (6 ms): the first iteration already ends past it, so iteration 0
    is the last one of 50: model_final.pth at iteration 0, one (final) evaluation, train() returns."""
    caplog.set_level("INFO", logger="yolact_d2")
    trainer, evaluated = scripted_run(tmp_path, [5.0], ["SOLVER.MAX_ITER", "50", "SOLVER.MAX_TIME", "0.0001"])
    assert evaluated == [0] and trainer.iter == 1
    assert read_state(tmp_path / "model_final.pth")["iteration"] == 0
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert "Stopping at iteration 0 of 50: SOLVER.MAX_TIME 0.0001 min reached" in caplog.text


def test_best_checkpoint_does_not_move_last_checkpoint(tmp_path):
    """model_best.pth is written through the trainer's checkpointer without tagging it: with
    fvcore's Checkpointer (whose save tags every file) last_checkpoint keeps its name, and the
    checkpointer's save is its own method again afterwards. The evaluation (which draws random
    numbers here) leaves torch's generator as it was."""
    from yolact_d2.data.datasets import register_builtin_datasets
    from yolact_d2.engine import Trainer
    from yolact_d2.schedule import BestCheckpointer

    need(DATA / "pennfudan")
    register_builtin_datasets()
    trainer = Trainer(yolact_cfg(CONFIG, TINY + ["OUTPUT_DIR", str(tmp_path), "TEST.EVAL_PERIOD", "2",
                                                 "DATASETS.CHECK.ENABLED", "False"]))
    best = next(h for h in trainer._hooks if isinstance(h, BestCheckpointer))
    trainer.checkpointer.save("model_0000009", iteration=9)
    best._save_best(9)
    assert (tmp_path / "model_best.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000009.pth"
    assert "tag_last_checkpoint" not in vars(trainer.checkpointer)
    # The hook sits after the EvalHook and before the periodic checkpointer.
    names = [type(h).__name__ for h in trainer._hooks]
    assert names.index("EvalHook") < names.index("BestCheckpointer") < names.index("PeriodicCheckpointer")
    # Periodic evaluations leave the training's random generators as they found them.
    trainer.test = lambda cfg, model: {"segm": {"AP": torch.rand(1).item()}}
    evaluate = next(h for h in trainer._hooks if type(h).__name__ == "EvalHook")._func
    before = torch.get_rng_state()
    first, second = evaluate(), evaluate()
    assert torch.equal(torch.get_rng_state(), before) and first == second


def test_epoch_conversion_arithmetic():
    """101 images at batch 4 = 26 iterations per epoch: 20 epochs -> MAX_ITER 520, STEPS (160,) of
    200 -> (416,), evaluation every 2 epochs -> 52; converting the converted config again changes
    nothing; options that need periodic evaluation without it are one-line errors."""
    from yolact_d2.errors import ConfigError
    from yolact_d2.schedule import apply_schedule_units, iterations_per_epoch

    assert iterations_per_epoch(101, 4) == 26 and iterations_per_epoch(100, 4) == 25 and iterations_per_epoch(3, 8) == 1
    cfg = yolact_cfg(CONFIG, ["SOLVER.MAX_EPOCHS", "20", "TEST.EVAL_PERIOD_EPOCHS", "2"])
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.IMS_PER_BATCH) == (200, (160,), 4)
    apply_schedule_units(cfg, lambda: [{}] * 101)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.TEST.EVAL_PERIOD) == (520, (416,), 52)
    apply_schedule_units(cfg, lambda: [{}] * 101)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.TEST.EVAL_PERIOD) == (520, (416,), 52)
    off = yolact_cfg(CONFIG)
    apply_schedule_units(off, lambda: pytest.fail("the dataset is not read when no epoch option is set"))
    assert (off.SOLVER.MAX_ITER, off.TEST.EVAL_PERIOD) == (200, 0)
    for opts in (["SOLVER.PATIENCE", "3"], ["SOLVER.BEST_CHECKPOINT", "True"],
                 ["SOLVER.PATIENCE", "3", "TEST.EVAL_PERIOD", "10", "DATASETS.TEST", "()"]):
        with pytest.raises(ConfigError, match="needs periodic evaluation"):
            apply_schedule_units(yolact_cfg(CONFIG, opts), lambda: [])
    with pytest.raises(ConfigError, match="SOLVER.MAX_EPOCHS is -1"):
        apply_schedule_units(yolact_cfg(CONFIG, ["SOLVER.MAX_EPOCHS", "-1"]), lambda: [])


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    """4 Penn-Fudan train photos and 2 val photos as COCO JSON files (the images stay in ../shared)."""
    root = need(DATA / "pennfudan")
    out = tmp_path_factory.mktemp("subsets")
    files = {}
    for split, n in (("train", 4), ("val", 2)):
        d = json.loads((root / f"{split}.json").read_text())
        d["images"] = d["images"][:n]
        ids = {im["id"] for im in d["images"]}
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] in ids]
        files[split] = out / f"{split}.json"
        files[split].write_text(json.dumps(d))
    return files, root / "images"


@pytest.mark.slow
def test_epochs_periodic_evaluation_and_tide_through_train_net(tmp_path, subsets):
    """train_net.py on 4 photos at batch 2 (2 iterations per epoch): MAX_EPOCHS 2 -> MAX_ITER 4 (in
    the saved config.yaml too), EVAL_PERIOD_EPOCHS 1 -> evaluation at iterations 1 and 3 (final) by
    the real COCO evaluator, each logged with the best so far; model_best.pth written, last_checkpoint
    model_final.pth; TEST.TIDE writes tide.json with the six main errors for boxes and masks."""
    pytest.importorskip("tidecv")
    files, images = subsets
    out = tmp_path / "run"
    run = train_net("--config-file", CONFIG, "--train-json", files["train"], "--train-images", images,
                    "--val-json", files["val"], "--val-images", images, *TINY, "SOLVER.MAX_EPOCHS", "2", "TEST.EVAL_PERIOD_EPOCHS", "1",
                    "SOLVER.BEST_CHECKPOINT", "True", "TEST.TIDE", "True", "SOLVER.WARMUP_ITERS", "0",
                    # 160 px: at TINY's 128 P7 is 1x1, too small for GroupNorm at batch 1; every score kept,
                    # so that 6 iterations give detections to evaluate.
                    "MODEL.YOLACT.INPUT_SIZE", "160", "MODEL.YOLACT.SCORE_THRESH_TEST", "0.0",
                    "OUTPUT_DIR", out)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "SOLVER.MAX_EPOCHS 2: 4 training images / SOLVER.IMS_PER_BATCH 2 = 2 iterations per epoch -> " \
           "SOLVER.MAX_ITER 4 (was 200), SOLVER.STEPS (3,) (was (160,))" in log
    assert "TEST.EVAL_PERIOD_EPOCHS 1: 4 training images" in log and "-> TEST.EVAL_PERIOD 2" in log
    assert "Evaluation at iteration 1: segm/AP" in log and "Evaluation at iteration 3: segm/AP" in log
    assert "best so far" in log and "TIDE dAP" in log
    saved = (out / "config.yaml").read_text()
    assert "MAX_ITER: 4\n" in saved and "EVAL_PERIOD: 2\n" in saved
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert read_state(out / "model_best.pth")["iteration"] in (1, 3)
    tide = json.loads((out / "inference" / "tide.json").read_text())
    assert set(tide) == {"bbox", "segm"}
    assert set(tide["segm"]["main"]) == {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"}
    # --eval-only with the run's config.yaml and no MODEL.WEIGHTS evaluates model_best.pth, and says so.
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    best = [r["best/segm/AP"] for r in records if "best/segm/AP" in r][-1]
    again = train_net("--config-file", out / "config.yaml", "--eval-only", "TEST.TIDE", "False")
    assert again.returncode == 0, again.stderr[-3000:]
    log = (out / "log.txt").read_text().split("Full config saved to")[-1]  # the evaluation's own lines
    assert f"MODEL.WEIGHTS is empty: using {out / 'model_best.pth'} (the best periodic evaluation)" in log
    lines = log.splitlines()
    segm = [lines[i + 2] for i, line in enumerate(lines) if line.endswith("copypaste: Task: segm")][-1]
    assert float(segm.split("copypaste: ")[1].split(",")[0]) == pytest.approx(best, abs=1e-3)


def test_budget_steps_arithmetic():
    # 40 iterations in 100 s (2.5 s each), 600 s budget: 200 more fit -> 240 of MAX_ITER 1000.
    assert budget_steps((800, 900), 1000, 40, 40, 100.0, 600.0) == (240, (192, 216))
    # Resumed at 500: this process ran 40 of the 540; never past MAX_ITER.
    assert budget_steps((800,), 1000, 540, 40, 100.0, 600.0) == (740, (592,))
    assert budget_steps((800,), 1000, 40, 40, 1.0, 600.0) == (1000, (800,))
    assert budget_steps((800,), 1000, 40, 40, 700.0, 600.0) == (40, (32,))  # over budget already


@pytest.mark.slow
def test_max_time_moves_the_lr_steps_to_the_iterations_that_fit(tmp_path, caplog, monkeypatch):
    """A scripted clock, SOLVER.MAX_TIME 1 min, MAX_ITER 100, STEPS (50,): the plan after 5
    iterations at 6 s each (plan_after, WARMUP_ITERS + 20 in a real run, set to 5 here) moves the lr
    step to half of the 12 iterations that fit; the run then speeds up and goes past them at the
    decayed lr until the budget ends it."""
    from yolact_d2 import schedule

    caplog.set_level("INFO", logger="yolact_d2")
    holder = {}
    def clock():  # 6 s per iteration for 5 iterations, then 3 s: the run outlives the plan
        i = holder["trainer"].iter if "trainer" in holder else 0
        return 6.0 * min(i, 5) + 3.0 * max(i - 5, 0)

    monkeypatch.setattr(schedule, "_now", clock)
    real_init = schedule.EarlyStop.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.plan_after = 5

    monkeypatch.setattr(schedule.EarlyStop, "__init__", init)
    real_before = schedule.EarlyStop.before_train

    def before_train(self):
        holder["trainer"] = self.trainer
        real_before(self)

    monkeypatch.setattr(schedule.EarlyStop, "before_train", before_train)
    trainer, evaluated = scripted_run(tmp_path, [5.0], ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(50,)",
                                                        "SOLVER.MAX_TIME", "1.0", "SOLVER.BASE_LR", "0.01"])
    # After iteration 4 (5 done, the clock at 24 s: 4.8 s each), 36 s left fit 7 more: 12 planned, step 6.
    assert "SOLVER.MAX_TIME 1 min: 5 iterations in 0.40 min -> about 12 iterations fit (SOLVER.MAX_ITER 100); " \
           "lr steps (6,) (were (50,))" in caplog.text
    # Then faster: the clock reaches 60 s after iteration 15, past the 12 planned, at the last lr.
    assert trainer.iter == 16 and evaluated == [15]
    lrs = {it: lr for lr, it in trainer.storage.history("lr").values()}
    assert [lrs[i] for i in (4, 5, 6, 12, 15)] == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.001])


def test_own_json_data_gets_periodic_evaluation_and_the_best_checkpoint(caplog):
    """--train-json with --val-json and no period: 300 iterations of 26 per epoch (101 images at
    batch 4) are 12 epochs; TEST.AUTO_EVALUATIONS 5 -> every 3 epochs = 78 iterations, model_best.pth
    kept. A period given, AUTO_EVALUATIONS 0 or a built-in dataset leave the config alone."""
    from yolact_d2.schedule import apply_schedule_units

    caplog.set_level("INFO", logger="yolact_d2")
    json_opts = ["DATASETS.TRAIN_JSON", "t.json", "DATASETS.TEST_JSON", "v.json", "SOLVER.IMS_PER_BATCH", "4",
                 "SOLVER.MAX_ITER", "300"]
    cfg = yolact_cfg(CONFIG, json_opts)
    apply_schedule_units(cfg, lambda: [{}] * 101)
    assert cfg.TEST.EVAL_PERIOD == 78 and cfg.SOLVER.BEST_CHECKPOINT
    assert "TEST.AUTO_EVALUATIONS 5: SOLVER.MAX_ITER 300 = 12 epochs of 26 iterations (101 training images) -> " \
           "TEST.EVAL_PERIOD 78 (every 3 epochs), SOLVER.BEST_CHECKPOINT True" in caplog.text
    apply_schedule_units(cfg, lambda: [{}] * 101)  # the saved config.yaml again: unchanged
    assert cfg.TEST.EVAL_PERIOD == 78
    for opts in (json_opts + ["TEST.EVAL_PERIOD", "50"], json_opts + ["TEST.AUTO_EVALUATIONS", "0"],
                 json_opts[4:]):
        cfg = yolact_cfg(CONFIG, opts)
        period = cfg.TEST.EVAL_PERIOD
        apply_schedule_units(cfg, lambda: [{}] * 101)
        assert cfg.TEST.EVAL_PERIOD == period and not cfg.SOLVER.BEST_CHECKPOINT
