"""A training schedule that fits the data: epochs, periodic evaluation, the best checkpoint, early
stop and a time budget, on detectron2's trainer and hooks (docs/training.md, *A schedule that
fits the data*).

- :func:`apply_schedule_units`: at setup, ``SOLVER.MAX_EPOCHS`` / ``TEST.EVAL_PERIOD_EPOCHS``
  become ``SOLVER.MAX_ITER`` (``STEPS`` scaled) / ``TEST.EVAL_PERIOD`` from the training-set size,
  logged; the options that need periodic evaluation are checked (one-line ``ConfigError``).
- :class:`BestCheckpointer`: after each evaluation of detectron2's ``EvalHook``, tracks the best
  ``SOLVER.BEST_METRIC`` (its iteration, the evaluations without gain), logs it, writes
  ``model_best.pth`` (``SOLVER.BEST_CHECKPOINT``) through the trainer's checkpointer without
  tagging it as the last checkpoint, and is itself a checkpointable of that checkpointer, so
  ``--resume`` keeps its state.
- :class:`EarlyStop`: ends training after ``SOLVER.PATIENCE`` evaluations without gain or past
  ``SOLVER.MAX_TIME`` minutes, as a normal end does (``model_final.pth``, final evaluation).
- :func:`schedule_hooks`: inserts both into the trainer's hook list; :class:`StoppableTraining`:
  the ``Trainer`` mix-in whose ``train()`` returns normally after an early stop.
"""
import logging
import math
import time

from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook
from detectron2.evaluation import verify_results
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from fvcore.common.checkpoint import PeriodicCheckpointer

from .errors import ConfigError

__all__ = ["apply_schedule_units", "iterations_per_epoch", "best_metric_name", "BestCheckpointer",
           "EarlyStop", "budget_steps", "StopTraining", "StoppableTraining", "schedule_hooks", "BEST_STATE_KEY"]

logger = logging.getLogger(__name__)

# The key of BestCheckpointer's state in every checkpoint.
BEST_STATE_KEY = "yolact_d2_best"


def iterations_per_epoch(num_images: int, ims_per_batch: int) -> int:
    """Iterations of one pass over ``num_images`` at ``ims_per_batch`` images per iteration (all
    processes together, as ``SOLVER.IMS_PER_BATCH``): ``ceil(num_images / ims_per_batch)``."""
    return max(1, math.ceil(num_images / ims_per_batch))


def best_metric_name(cfg) -> str:
    """``SOLVER.BEST_METRIC``, or its default: ``segm/AP`` with masks, ``bbox/AP`` without."""
    return cfg.SOLVER.BEST_METRIC or ("segm/AP" if cfg.MODEL.MASK_ON else "bbox/AP")


def apply_schedule_units(cfg, dataset_dicts, eval_only: bool = False) -> None:
    """Convert the epoch options of the unfrozen ``cfg`` in place, from the size of the checked
    training set (``dataset_dicts()``, called only when an epoch option is set), and check the
    options that need periodic evaluation. Nothing changes when they are 0 (their defaults) or
    for ``eval_only``.

    - ``SOLVER.MAX_EPOCHS`` E > 0: ``MAX_ITER`` = E x iterations per epoch; each of ``STEPS``
      scaled by new / old ``MAX_ITER`` (rounded), so the decays stay at the same fraction.
    - ``TEST.EVAL_PERIOD_EPOCHS`` P > 0: ``TEST.EVAL_PERIOD`` = P x iterations per epoch.
    - ``TEST.AUTO_EVALUATIONS`` N > 0 with ``DATASETS.TRAIN_JSON`` and ``TEST_JSON`` and no period
      set: ``TEST.EVAL_PERIOD`` = ceil(epochs of ``MAX_ITER`` / N) epochs, ``SOLVER.BEST_CHECKPOINT`` True.

    Both are logged with the arithmetic. Running it again on the converted config (a saved
    ``config.yaml``, ``--resume``) gives the same values.

    Raises:
        ConfigError: a negative epoch count, patience or time budget; ``SOLVER.PATIENCE`` or
            ``SOLVER.BEST_CHECKPOINT`` without periodic evaluation or without a test set.
    """
    if eval_only:
        return
    s, t = cfg.SOLVER, cfg.TEST
    for key, value in (("SOLVER.MAX_EPOCHS", s.MAX_EPOCHS), ("TEST.EVAL_PERIOD_EPOCHS", t.EVAL_PERIOD_EPOCHS),
                       ("SOLVER.PATIENCE", s.PATIENCE), ("SOLVER.MAX_TIME", s.MAX_TIME)):
        if value < 0:
            raise ConfigError(f"{key} is {value}; give a value >= 0 (0 = off)")

    def epoch_size():  # (training images, iterations per epoch): the dataset is read only when needed
        n = len(dataset_dicts())
        return n, iterations_per_epoch(n, s.IMS_PER_BATCH)

    if s.MAX_EPOCHS > 0 or t.EVAL_PERIOD_EPOCHS > 0:
        num_images, per_epoch = epoch_size()
        basis = (f"{num_images} training images / SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} = "
                 f"{per_epoch} iterations per epoch")
        if s.MAX_EPOCHS > 0:
            old_max, old_steps = s.MAX_ITER, tuple(s.STEPS)
            s.MAX_ITER = s.MAX_EPOCHS * per_epoch
            s.STEPS = tuple(int(round(step * s.MAX_ITER / old_max)) for step in old_steps)
            logger.info(f"SOLVER.MAX_EPOCHS {s.MAX_EPOCHS}: {basis} -> SOLVER.MAX_ITER {s.MAX_ITER} "
                        f"(was {old_max}), SOLVER.STEPS {s.STEPS} (was {old_steps})")
        if t.EVAL_PERIOD_EPOCHS > 0:
            t.EVAL_PERIOD = t.EVAL_PERIOD_EPOCHS * per_epoch
            logger.info(f"TEST.EVAL_PERIOD_EPOCHS {t.EVAL_PERIOD_EPOCHS}: {basis} -> TEST.EVAL_PERIOD {t.EVAL_PERIOD}")
    # EVAL_PERIOD_EPOCHS, when given, has set EVAL_PERIOD above.
    if t.AUTO_EVALUATIONS > 0 and cfg.DATASETS.TRAIN_JSON and cfg.DATASETS.TEST_JSON and t.EVAL_PERIOD <= 0:
        num_images, per_epoch = epoch_size()
        epochs = math.ceil(s.MAX_ITER / per_epoch)
        every = math.ceil(epochs / t.AUTO_EVALUATIONS)
        t.EVAL_PERIOD, s.BEST_CHECKPOINT = every * per_epoch, True
        logger.info(f"--train-json with --val-json: TEST.AUTO_EVALUATIONS {t.AUTO_EVALUATIONS}: SOLVER.MAX_ITER "
                    f"{s.MAX_ITER} = {epochs} epochs of {per_epoch} iterations ({num_images} training images) -> "
                    f"TEST.EVAL_PERIOD {t.EVAL_PERIOD} (every {every} epochs), SOLVER.BEST_CHECKPOINT True")
    for key, on in (("SOLVER.PATIENCE", s.PATIENCE > 0), ("SOLVER.BEST_CHECKPOINT", s.BEST_CHECKPOINT)):
        if on and (t.EVAL_PERIOD <= 0 or not len(cfg.DATASETS.TEST)):
            raise ConfigError(f"{key} needs periodic evaluation on a test set: set TEST.EVAL_PERIOD "
                              "(iterations) or TEST.EVAL_PERIOD_EPOCHS and DATASETS.TEST (or --val-json)")


def _broadcast(value):
    """Rank 0's ``value`` on every process (evaluation results exist on rank 0 only)."""
    return comm.all_gather(value)[0] if comm.get_world_size() > 1 else value


class BestCheckpointer(HookBase):
    """After each evaluation of the trainer's ``EvalHook`` (periodic and final), reads
    ``metric`` from its results (``trainer._last_eval_results``, the first test set's when there
    are several), keeps the best value (higher is better; NaN never counts), its iteration and the
    count of evaluations in a row without a gain, logs one line with them and puts
    ``best/<metric>`` into the EventStorage (metrics.json). With ``save``, each new best is written
    to ``model_best.pth`` by ``trainer.checkpointer`` with ``tag_last_checkpoint=False``:
    ``last_checkpoint`` keeps naming the latest periodic checkpoint, which ``--resume`` loads.

    Its state (``state_dict``) is registered on ``trainer.checkpointer`` under
    :data:`BEST_STATE_KEY`, so every checkpoint carries it and ``--resume`` restores it. Place it
    right after the ``EvalHook`` and before the ``PeriodicCheckpointer``
    (:func:`schedule_hooks`), so that the checkpoint of an evaluated iteration holds the state
    after that evaluation.
    """

    def __init__(self, trainer, metric: str, save: bool = False, patience: int = 0):
        self.metric, self.save, self.patience = metric, save, patience
        self.best, self.best_iteration, self.evaluations_without_gain = None, -1, 0
        self.last_evaluated = -1  # the iteration of the latest evaluation of this process
        self._seen = getattr(trainer, "_last_eval_results", None)
        trainer.checkpointer.add_checkpointable(BEST_STATE_KEY, self)

    def state_dict(self):
        return {"metric": self.metric, "best": self.best, "best_iteration": self.best_iteration,
                "evaluations_without_gain": self.evaluations_without_gain}

    def load_state_dict(self, state):
        if state.get("metric") != self.metric:
            logger.warning(f"the checkpoint's best {state.get('metric')} is not SOLVER.BEST_METRIC {self.metric}; "
                           "the best is tracked afresh")
            return
        self.best, self.best_iteration = state["best"], state["best_iteration"]
        self.evaluations_without_gain = state["evaluations_without_gain"]

    def _value(self, results):
        flat = flatten_results_dict(results or {})
        names = [k for k in flat if k == self.metric or k.endswith("/" + self.metric)]
        if not names:
            if results:
                logger.warning(f"SOLVER.BEST_METRIC {self.metric} is not among the evaluation results "
                               f"({', '.join(sorted(flat)[:8])}, ...); no best is kept")
            return None
        value = float(flat[names[0]])
        return None if math.isnan(value) else value

    def _after_evaluation(self, iteration):
        results = getattr(self.trainer, "_last_eval_results", None)
        if results is None or results is self._seen:
            return
        self._seen = results
        self.last_evaluated = iteration
        value = _broadcast(self._value(results))
        gained = value is not None and (self.best is None or value > self.best)
        if gained:
            self.best, self.best_iteration, self.evaluations_without_gain = value, iteration, 0
            if self.save:
                self._save_best(iteration)
        else:
            self.evaluations_without_gain += 1
        if self.best is not None:
            self.trainer.storage.put_scalar(f"best/{self.metric}", self.best, smoothing_hint=False)
        shown = "none" if value is None else f"{value:.2f}"
        best = "none" if self.best is None else f"{self.best:.2f} at iteration {self.best_iteration}"
        tail = ("new best" + (", model_best.pth" if self.save else "")) if gained else (
            f"{self.evaluations_without_gain} evaluation(s) without gain"
            + (f" of SOLVER.PATIENCE {self.patience}" if self.patience else ""))
        logger.info(f"Evaluation at iteration {iteration}: {self.metric} {shown}; best so far {best} ({tail})")

    def _save_best(self, iteration):
        # Not tagged: --resume continues from the latest periodic checkpoint, never from this one.
        self.trainer.checkpointer.save("model_best", iteration=iteration, tag_last_checkpoint=False)

    def after_step(self):
        self._after_evaluation(self.trainer.iter)

    def after_train(self):
        before = self.state_dict()
        # The final evaluation (EvalHook.after_train, just before), of the weights of the last
        # iteration (trainer.iter is max_iter after a complete loop).
        last = self.trainer.iter - 1
        self._after_evaluation(last)
        if self.trainer.iter >= self.trainer.max_iter and self.state_dict() != before:
            # model_final.pth was written before that evaluation: written again with this state, so
            # that --resume with a longer schedule continues from it.
            self.trainer.iter = last  # the trainer's own state in the file, as PeriodicCheckpointer saves it
            try:
                self.trainer.checkpointer.save("model_final", iteration=last)
            finally:
                self.trainer.iter = last + 1


class StopTraining(BaseException):
    """Raised by :class:`EarlyStop` after the last step's hooks: a ``BaseException``, so that
    detectron2's training loop runs ``after_train`` without logging it as a failure;
    :class:`StoppableTraining` catches it."""


def _now() -> float:
    # The training loop's clock, in seconds (a module function, so tests can script the time).
    return time.perf_counter()


def budget_steps(steps, max_iter: int, iteration: int, done: int, elapsed_s: float, budget_s: float):
    """The iterations a time budget allows, and the lr steps at the same fractions of them.

    Args:
        steps: ``SOLVER.STEPS`` (iterations, for a run of ``max_iter`` iterations).
        max_iter: ``SOLVER.MAX_ITER``, the upper bound of the run.
        iteration: iterations run so far, counted from 0 (a resumed run's included).
        done: of those, the iterations this process ran in ``elapsed_s`` (> 0).
        elapsed_s: seconds of this process's training loop (periodic evaluations included).
        budget_s: ``SOLVER.MAX_TIME`` in seconds.

    Returns:
        ``(planned, new_steps)``: ``planned`` = ``iteration`` + the whole iterations that fit in
        the time left at this process's mean pace, at most ``max_iter``; each step scaled by
        ``planned / max_iter`` (rounded).
    """
    per_iteration = elapsed_s / done
    left = max(0.0, budget_s - elapsed_s)
    planned = min(int(max_iter), int(iteration) + int(left // per_iteration))
    return planned, tuple(int(round(step * planned / max_iter)) for step in steps)


class EarlyStop(HookBase):
    """Ends training after the current iteration when ``best`` (a :class:`BestCheckpointer`)
    counts ``patience`` evaluations in a row without gain (0 = off), or when ``max_minutes``
    (0 = off) of this process's training loop (from ``before_train``, periodic evaluations
    included) have passed. The end is a normal one: ``model_final.pth`` through
    ``trainer.checkpointer`` (at this iteration, tagged last), ``trainer.iter`` and ``max_iter``
    set as after the last iteration, so the final evaluation and the writers run in
    ``after_train``; an evaluation done at this very iteration is reused as the final one.
    Place it last (:func:`schedule_hooks`).

    With a time budget and ``cfg`` (the run's config) the lr steps follow the budget: once
    ``plan_after`` iterations have run, and again after each periodic evaluation, the iterations
    that fit (:func:`budget_steps`, the mean pace so far, evaluations included) move
    ``SOLVER.STEPS`` to their fractions of that planned total (the lr schedule is rebuilt with
    them, still over ``SOLVER.MAX_ITER``); logged each time. Once an lr step has been passed the plan is kept. The
    trainer's ``max_iter`` stays the upper bound; the budget ends the run."""

    def __init__(self, best=None, patience: int = 0, max_minutes: float = 0.0, cfg=None, plan_after: int = 20):
        self.best, self.patience, self.max_minutes = best, patience, max_minutes
        self.cfg, self.plan_after = cfg, int(plan_after)
        self.stopped_at = None

    def before_train(self):
        self._start = _now()
        self._start_iter = self.trainer.start_iter
        if self.cfg is not None:
            self._steps = tuple(self.cfg.SOLVER.STEPS)

    def _plan(self):
        # Rebuild the lr scheduler for the iterations the budget allows (see the class docstring).
        from detectron2.solver import build_lr_scheduler

        trainer, cfg, i = self.trainer, self.cfg, self.trainer.iter
        if not self._steps or min(self._steps) <= i + 1:
            return  # no step, or one already passed: the plan is kept
        elapsed = _now() - self._start
        # Rank 0's plan on every process, so that all of them keep one lr.
        planned, steps = _broadcast(budget_steps(cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER, i + 1,
                                                 i + 1 - self._start_iter, elapsed, self.max_minutes * 60.0))
        steps = tuple(max(step, i + 2) for step in steps)  # a step the plan puts in the past: the next iteration
        if steps == self._steps:
            return
        plan_cfg = cfg.clone()
        plan_cfg.defrost()
        # MAX_ITER stays the upper bound the schedule is defined on: a run faster than planned goes on
        # past `planned` at the last lr.
        plan_cfg.SOLVER.STEPS = steps
        scheduler = build_lr_scheduler(plan_cfg, trainer.optimizer)
        scheduler.last_epoch = i
        scheduler.step()  # the lr of iteration i + 1 under the new plan
        trainer.scheduler = scheduler  # detectron2's LRScheduler hook steps trainer.scheduler
        logger.info(f"SOLVER.MAX_TIME {self.max_minutes:g} min: {i + 1 - self._start_iter} iterations in "
                    f"{elapsed / 60:.2f} min -> about "
                    f"{planned} iterations fit (SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}); lr steps {steps} "
                    f"(were {self._steps})")
        self._steps = steps

    def _reason(self):
        i = self.trainer.iter
        if self.patience and self.best is not None and self.best.last_evaluated == i \
                and self.best.evaluations_without_gain >= self.patience:
            return (f"SOLVER.PATIENCE {self.patience}: {self.best.evaluations_without_gain} evaluations without a "
                    f"gain of {self.best.metric} (best {self.best.best:.2f} at iteration {self.best.best_iteration})"
                    if self.best.best is not None else
                    f"SOLVER.PATIENCE {self.patience}: no {self.best.metric} in {self.best.evaluations_without_gain} "
                    "evaluations")
        minutes = (_now() - self._start) / 60
        if self.max_minutes and minutes >= self.max_minutes:
            return f"SOLVER.MAX_TIME {self.max_minutes:g} min reached ({minutes:.2f} min)"
        return None

    def after_step(self):
        trainer = self.trainer
        i = trainer.iter
        if i + 1 >= trainer.max_iter:
            return
        done = i + 1 - self._start_iter
        if self.max_minutes and self.cfg is not None and (
                done == self.plan_after or (done > self.plan_after and self.best is not None
                                            and self.best.last_evaluated == i)):
            self._plan()
        reason = _broadcast(self._reason())
        if reason is None:
            return
        logger.info(f"Stopping at iteration {i} of {trainer.max_iter}: {reason}")
        trainer.checkpointer.save("model_final", iteration=i)  # as PeriodicCheckpointer at the end
        if self.best is not None and self.best.last_evaluated == i:
            results = trainer._last_eval_results
            for h in trainer._hooks:
                if isinstance(h, EvalHook):
                    h._func = lambda: results  # this iteration's evaluation is the final one
        self.stopped_at = i
        trainer.iter = trainer.max_iter = i + 1
        raise StopTraining(reason)


class StoppableTraining:
    """Mix-in of a ``DefaultTrainer`` subclass (before it in the bases): ``train()`` ends
    normally after :class:`EarlyStop` stopped the loop, returning what ``DefaultTrainer.train``
    returns (the final evaluation with ``TEST.EXPECTED_RESULTS`` checked, else None)."""

    def train(self):
        try:
            return super().train()
        except StopTraining:
            pass
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results
        return None


def keeping_random_state(func):
    """``func`` run with the torch (CPU and CUDA), numpy and ``random`` generators restored after
    it: an evaluation's data loader draws a seed from torch's generator, which would otherwise
    change the rest of a seeded training run."""
    import random

    import numpy as np
    import torch

    def wrapped():
        states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            return func()
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    return wrapped


def schedule_hooks(trainer, hooks: list) -> list:
    """``hooks`` (``DefaultTrainer.build_hooks``'s list) with the schedule's hooks of
    ``trainer.cfg``: with periodic evaluation (``TEST.EVAL_PERIOD`` > 0, an ``EvalHook`` in the
    list) a :class:`BestCheckpointer` right after the ``EvalHook``, the periodic checkpointer
    moved after it, and the evaluations run :func:`keeping_random_state` (a seeded run trains the
    same weights with or without them); with ``SOLVER.PATIENCE`` or ``SOLVER.MAX_TIME`` an
    :class:`EarlyStop` last.
    Without any of these options the list is returned unchanged."""
    cfg = trainer.cfg
    evals = [h for h in hooks if isinstance(h, EvalHook)]
    best = None
    hooks = list(hooks)
    if cfg.TEST.EVAL_PERIOD > 0 and evals:
        best = BestCheckpointer(trainer, best_metric_name(cfg), save=cfg.SOLVER.BEST_CHECKPOINT,
                                patience=cfg.SOLVER.PATIENCE)
        evals[0]._func = keeping_random_state(evals[0]._func)
        at = hooks.index(evals[0])
        moved = [h for h in hooks[:at] if isinstance(h, PeriodicCheckpointer)]
        hooks = [h for h in hooks[:at] if h not in moved] + [evals[0], best] + moved + hooks[at + 1:]
    if cfg.SOLVER.PATIENCE > 0 or cfg.SOLVER.MAX_TIME > 0:
        hooks.append(EarlyStop(best, cfg.SOLVER.PATIENCE, cfg.SOLVER.MAX_TIME, cfg=cfg,
                               plan_after=cfg.SOLVER.WARMUP_ITERS + 20))
    return hooks
