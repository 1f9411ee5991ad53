"""train_net.py: resume, NaN handling and bad-data errors (detectron2's trainer under the hood)."""
import json
import math

import pytest
import torch

from conftest import DATA, need
from helpers import CONFIG, TINY
# train_net.py in this process (~5 s of imports less per run); its real subprocesses (one user
# mistake, one internal error) are in test_errors.py.
from helpers import train_net_in_process as train_net

def iterations(out_dir):
    lines = (out_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if '"iteration"' in line]


@pytest.mark.slow
def test_resume_continues_the_same_schedule(tmp_path):
    """train_net.py --resume continues from the last checkpoint: iteration count, appended metrics.json and
    the step LR schedule go on."""
    need(DATA / "pennfudan")
    common = ["--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "2",
              "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER"]
    first = train_net(*common, "2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert state["iteration"] == 1
    second = train_net("--resume", *common, "4")
    assert second.returncode == 0, second.stderr[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    # detectron2's full record (environment, config, model), without colour codes in the file, and
    # the plugin's own logger set up too (yolact_d2/engine.py).
    assert "Running with full config" in log and "\x1b[" not in log and "yolact_d2.data.dataset_mapper" in log
    assert "\x1b[" not in first.stdout + second.stdout  # a redirected console: no colour either
    # metrics.json is appended (written at each run's last iteration), not restarted.
    assert iterations(tmp_path) == [1, 3]
    # The multi-step schedule continued: lr dropped x0.1 at iteration 3 of the same schedule.
    lrs = {json.loads(line)["iteration"]: json.loads(line)["lr"]
           for line in (tmp_path / "metrics.json").read_text().splitlines() if '"lr"' in line}
    assert lrs[3] == pytest.approx(lrs[1] * 0.1)


@pytest.mark.slow
def test_nan_loss_stops_training_naming_the_iteration(tmp_path):
    """A NaN loss stops training with a FloatingPointError naming the iteration."""
    need(DATA / "pennfudan")
    from yolact_d2.engine import Trainer
    from detectron2.config import get_cfg
    from yolact_d2 import add_yolact_config
    from yolact_d2.data.datasets import register_builtin_datasets

    register_builtin_datasets()
    cfg = get_cfg()
    add_yolact_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY + ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "3"])
    trainer = Trainer(cfg)
    real = trainer.model.criterion

    def nan_at_second_call(*args, calls=[0], **kwargs):
        losses = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    trainer.model.criterion = nan_at_second_call
    with pytest.raises(FloatingPointError, match="iteration=1"):
        trainer.train()


def test_bad_data_errors_name_the_problem(tmp_path):
    """train_net.py names an unregistered dataset, an unknown config key, an image missing on disk and a mask
    format that cannot hold the masks on its last stderr line (no traceback for the first three)."""
    unknown = train_net("--config-file", CONFIG, *TINY, "DATASETS.TRAIN", "('no_such_dataset',)",
                        "OUTPUT_DIR", str(tmp_path / "a"))
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "no_such_dataset" in unknown.stderr.strip().splitlines()[-1]
    bad_key = train_net("--config-file", CONFIG, "MODEL.YOLACT.NO_SUCH_KEY", "1")
    assert bad_key.returncode != 0 and "Non-existent key: MODEL.YOLACT.NO_SUCH_KEY" in bad_key.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad_key.stderr

    # A data root whose Penn-Fudan JSON lists an image that is not on disk.
    src = json.loads(need(DATA / "pennfudan" / "train.json").read_text())
    root = tmp_path / "data"
    (root / "pennfudan" / "images").mkdir(parents=True)
    (root / "pennfudan" / "train.json").write_text(json.dumps(src))
    env = {"YOLACT_D2_DATA": str(root)}
    missing = train_net("--config-file", CONFIG, *TINY, "OUTPUT_DIR", str(tmp_path / "b"), env=env,
                        unregister=("pennfudan_train", "pennfudan_val"))  # registered again under root
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "FudanPed00001.jpg" in missing.stderr.strip().splitlines()[-1]

    wrong_format = train_net("--config-file", CONFIG, *TINY, "INPUT.MASK_FORMAT", "polygon",
                             "OUTPUT_DIR", str(tmp_path / "c"))
    last = wrong_format.stderr.strip().splitlines()[-1]
    assert wrong_format.returncode != 0 and "INPUT.MASK_FORMAT bitmask" in last and ".jpg" in last


@pytest.mark.slow
def test_same_seed_repeats_the_training_exactly(tmp_path):
    """Two train_net.py runs of the Penn-Fudan recipe with the same SEED (a data-loader worker, the
    recipe's augmentation, 3 iterations) end with bit-identical weights and the same logged losses:
    a seeded run repeats on one machine, so a training figure's spread is seed (or CPU), not chance."""
    need(DATA / "pennfudan")
    finals, losses = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        result = train_net("--config-file", CONFIG, *TINY, "DATALOADER.NUM_WORKERS", "1", "SEED", "3",
                           "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "0", "OUTPUT_DIR", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        finals.append(torch.load(out / "model_final.pth", weights_only=False)["model"])
        record = json.loads((out / "metrics.json").read_text().splitlines()[-1])
        losses.append({k: v for k, v in record.items() if k.startswith("loss_")})
    assert set(losses[0]) >= {"loss_box_reg", "loss_cls", "loss_mask", "loss_sem_seg"}
    assert all(math.isfinite(v) and v > 0 for v in losses[0].values())
    assert losses[0] == losses[1]
    assert finals[0].keys() == finals[1].keys()
    different = [k for k in finals[0] if not torch.equal(finals[0][k], finals[1][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
