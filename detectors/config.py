"""OmegaConf resolvers the configs use, and config helpers for the entry points."""

from __future__ import annotations

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 autocast where a GPU is present, full precision on the CPU (bf16 there is slow or absent)."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("len", lambda x: len(x), replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)
