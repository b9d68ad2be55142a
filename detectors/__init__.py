"""detectors: object-detection training on PyTorch Lightning and Hydra."""

from detectors.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
