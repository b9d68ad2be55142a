"""Train a detector: python train.py [model=ssd300] [data=voc data.root=PATH] [experiment=...] [ckpt_path=...]"""

import hydra
from omegaconf import DictConfig

import detectors  # noqa: F401  (registers the config resolvers)
from detectors.tasks.train import run_trial


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_trial(cfg)


if __name__ == "__main__":
    main()
