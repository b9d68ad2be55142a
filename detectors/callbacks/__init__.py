"""Lightning callbacks: sample pictures for TensorBoard, result files for evaluate.py."""

from detectors.callbacks.evaluation_writer import EvaluationWriter
from detectors.callbacks.sample_images import SampleImages, sample_grid

__all__ = ["EvaluationWriter", "SampleImages", "sample_grid"]
