"""How a head lays out its class outputs, so that ``train.py init_from=`` can keep the rows of the classes a
checkpoint and a new run share (``detectors.init_from``).

Every head's class-dependent tensors (the class predictors' weights and biases, Faster R-CNN's class-specific
box deltas) hold their classes along dim 0, the layer's outputs: dim 0 reads as ``(groups, before + C, inner)``
(``ClassAxis``), groups being anchors, priors or cells, ``before`` the class-independent entries ahead of the
classes in each group (box, objectness, background), ``inner`` the entries per class. A head says which of its
tensors are laid out so by a method ``class_axes() -> {state-dict key relative to the head: ClassAxis}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class ClassAxis:
    """dim 0 of a tensor as (groups, before + C, inner): e.g. YOLOv3's predictor (A, 5 + C, 1) is
    ``ClassAxis(before=5)``, SSD's (P, 1 + C, 1) with background first ``ClassAxis(before=1)``, Faster R-CNN's
    class-specific deltas (1, C, 4) ``ClassAxis(before=0, inner=4)``."""

    before: int
    inner: int = 1

    def split(self, tensor: Tensor, num_classes: int) -> Tensor | None:
        """``tensor`` (N, ...) viewed as (groups, before + num_classes, inner, ...); None when N does not
        divide so (then the tensor is not laid out for ``num_classes`` classes)."""
        per_group = (self.before + num_classes) * self.inner
        if tensor.dim() == 0 or tensor.shape[0] % per_group:
            return None
        return tensor.view(tensor.shape[0] // per_group, self.before + num_classes, self.inner, *tensor.shape[1:])


def layer_axes(head: nn.Module, layers: Iterable[nn.Module], axis: ClassAxis) -> dict[str, ClassAxis]:
    """``{key: axis}`` for the weight and bias of each of ``layers`` (submodules of ``head``), keys relative to
    ``head``'s state dict: what a head's ``class_axes`` returns."""
    names = {id(module): name for name, module in head.named_modules()}
    out = {}
    for layer in layers:
        for param, value in layer.named_parameters(recurse=False):
            if value is not None:
                out[f"{names[id(layer)]}.{param}"] = axis
    return out
