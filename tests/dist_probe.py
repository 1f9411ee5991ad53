#!/usr/bin/env python
"""``train_net.py`` as ``python tests/dist_probe.py <train_net args>`` (its parser, ``engine.main`` and
``launch()``), saving each rank's model state to OUTPUT_DIR/rank{r}_{init,final}.pth when training
starts and ends, for tests/test_distributed.py. Under ``launch()`` the workers are spawned: they
re-import this file, so the patch below applies in every rank."""
from pathlib import Path

import torch

from yolact_d2 import engine  # first: the package's warning filters
from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402


def _save_state(model, path):
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)


class ProbeTrainer(engine.Trainer):
    def train(self):
        out = Path(self.cfg.OUTPUT_DIR)
        _save_state(self.model, out / f"rank{comm.get_rank()}_init.pth")
        result = super().train()
        _save_state(self.model, out / f"rank{comm.get_rank()}_final.pth")
        return result


engine.Trainer = ProbeTrainer  # engine.main builds engine.Trainer

if __name__ == "__main__":
    args = engine.argument_parser().parse_args()
    launch(
        engine.main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,),
    )
