"""OmegaConf resolvers the configs use, and config helpers for the entry points."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

# the precision ``auto_precision`` gives on a CPU when set (tests pin "32-true": float32 on any machine)
CPU_PRECISION_ENV = "DETECTORS_CPU_PRECISION"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (the AVX512-BF16 or AMX-BF16 instructions, Linux's
    /proc/cpuinfo flags): oneDNN's bf16 convolutions then cost about half of float32's (SSD300's training
    step on a 2-core AMD EPYC: 2.4x faster under bf16 autocast with channels-last). Without them bf16 is
    emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def auto_precision() -> str:
    """bf16 autocast where the hardware computes bf16 natively: a GPU, or a CPU with AVX512-BF16/AMX
    (``cpu_has_native_bf16``); float32 elsewhere. On a CPU, ``DETECTORS_CPU_PRECISION`` overrides."""
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed"
    forced = os.environ.get(CPU_PRECISION_ENV)
    if forced:
        return forced
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def gpu_or_cpu(on_gpu, on_cpu):
    """A default that depends on the hardware, stated in the config: ``${gpu_or_cpu:60,3}``.

    Used where one number cannot serve both (epochs of the default run: minutes on a 2-core CPU,
    a converged model on a GPU). An explicit override always wins.
    """
    import torch

    return on_gpu if torch.cuda.is_available() else on_cpu


def num_classes(classes) -> int:
    """``${len:LIST}``: a list's length: ``${len:${data.classes}}`` the head's class count, and the SSD necks'
    level count (one per entry of the head's ``priors.aspect_ratios``). Null classes are read from the
    dataset by train.py before the model is built; resolving the config before that (``--cfg job
    --resolve``) gets this message instead of len(None)'s TypeError."""
    if classes is None:
        raise ValueError("data.classes is null: train.py reads the class names from the dataset before it "
                         "builds the model; to resolve the config by itself, set data.classes=[a,b,c]")
    return len(classes)


def auto_channels_last(precision: str) -> bool:
    """``${auto_channels_last:${trainer.precision}}``: NHWC where it is the fast layout, NCHW where it is not.

    Channels-last convolutions are the fast ones on a GPU, under bf16 autocast on a CPU (oneDNN's bf16 kernels)
    and about even with NCHW in float32 on an AVX-512 CPU; in float32 on a CPU without AVX-512 (AVX2: most
    laptops and older servers) they cost SSD300's training step a third more than NCHW, so such a run keeps NCHW
    (ours and torchvision's step side by side: BENCHMARKS.md, "Training to a time budget"). The CPU's kind is
    the one ATen dispatches to (``torch.backends.cpu.get_cpu_capability``: ``ATEN_CPU_CAPABILITY`` lowers it)."""
    import torch

    if torch.cuda.is_available() or "bf16" in str(precision):
        return True
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")()
    return str(capability).upper().startswith("AVX512")


def train_input_size(input_size, multiscale_sizes) -> ListConfig:
    """``${train_input_size:${input_size},${multiscale.sizes}}``: the [H, W] the training loader
    delivers, the per-side largest of ``input_size`` and every multi-scale size (``input_size`` when
    multi-scale is off), so the module only ever shrinks a batch to its drawn size (see
    ``detectors.data.batch_ops.MultiScale``). Derived here so nobody writes the size twice."""
    from detectors.data.batch_ops import largest_size

    sizes = [input_size, *(multiscale_sizes or [])]
    # a ListConfig, not a list: OmegaConf.resolve (Hydra's --resolve) cannot put a plain list in a value node
    return OmegaConf.create(list(largest_size([OmegaConf.to_object(s) if OmegaConf.is_config(s) else s
                                               for s in sizes])))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("len", num_classes, replace=True)
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("gpu_or_cpu", gpu_or_cpu, replace=True)
    OmegaConf.register_new_resolver("auto_channels_last", auto_channels_last, replace=True)
    OmegaConf.register_new_resolver("train_input_size", train_input_size, replace=True)
