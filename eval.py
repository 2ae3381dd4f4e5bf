"""Evaluate a trained modality classifier: test-shard metrics, or predictions on raw scans.

    python eval.py ckpt_path=<checkpoint or run dir> [trainer=ddp_cpu] [data_dir=...] [out=...]
    python eval.py ckpt_path=<checkpoint or run dir> input=<file or folder> [out=...]

Thin Hydra entry point (configs/eval.yaml); the work is in modality/evaluation/ (shard_split.py, predict.py).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from modality.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    from modality.evaluation.predict import predict_from_config
    from modality.evaluation.shard_split import evaluate_from_config

    if cfg.get("input"):
        predict_from_config(cfg)
    else:
        evaluate_from_config(cfg)


if __name__ == "__main__":
    main()
