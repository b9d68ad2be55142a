"""Predict on your own images: python predict.py ckpt_path=PATH input=IMAGE|FOLDER|GLOB|VIDEO [score_threshold=0.3]"""

import sys

import hydra
from omegaconf import DictConfig

import detectors  # noqa: F401  (registers the config resolvers)
from detectors.tasks.predict import main as predict_main


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    status = predict_main(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
