"""OmegaConf resolvers the configs use, and config helpers for the entry points."""

from __future__ import annotations

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 autocast where a GPU is present, full precision on the CPU (bf16 there is slow or absent)."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def gpu_or_cpu(on_gpu, on_cpu):
    """A default that depends on the hardware, stated in the config: ``${gpu_or_cpu:60,3}``.

    Used where one number cannot serve both (epochs of the default run: minutes on a 2-core CPU,
    a converged model on a GPU). An explicit override always wins.
    """
    import torch

    return on_gpu if torch.cuda.is_available() else on_cpu


def num_classes(classes) -> int:
    """``${len:${data.classes}}``: the head's class count. Null classes are read from the dataset by
    train.py before the model is built; resolving the config before that (``--cfg job --resolve``)
    gets this message instead of len(None)'s TypeError."""
    if classes is None:
        raise ValueError("data.classes is null: train.py reads the class names from the dataset before it "
                         "builds the model; to resolve the config by itself, set data.classes=[a,b,c]")
    return len(classes)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("len", num_classes, replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("gpu_or_cpu", gpu_or_cpu, replace=True)
