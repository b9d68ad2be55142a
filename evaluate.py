"""Evaluate a checkpoint: python evaluate.py ckpt_path=PATH [split=test|val] [data=voc data.root=PATH]"""

import hydra
from omegaconf import DictConfig

import detectors  # noqa: F401  (registers the config resolvers)
from detectors.tasks.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
