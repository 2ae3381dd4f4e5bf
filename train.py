"""Train a modality classifier: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # the demo, on whatever hardware is here
    python train.py model=vgg16 trainer.devices=2     # DDP on two GPUs
    python train.py trainer=ddp_cpu                   # DDP on CPU (gloo), two processes
    python train.py -m model=resnet18,mnasnet optimizer.weight_decay=0,0.01
    python train.py experiment=seed_architectures    # the reference study's six networks
    python train.py ckpt_path=last hydra.run.dir=<run dir>   # resume a run with its own saved config

See docs/training.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from modality.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    from modality.training.job import run

    return run(cfg)


if __name__ == "__main__":
    import sys

    from modality.training.resume import main_argv_or_exit

    # Before Hydra, which writes .hydra/ into the run directory: a resume keeps the run's own record.
    sys.argv = main_argv_or_exit(sys.argv)
    main()
