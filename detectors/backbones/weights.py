"""Where backbone weights come from: torchvision weight enums, local state-dict files, darknet files.

Every loader ends in :func:`load_matching`, which loads the tensors whose names and shapes fit,
refuses weights that leave required tensors out, and returns the sentence the run log prints
("torchvision MobileNet_V2_Weights.IMAGENET1K_V2 (312 tensors)").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

# prefixes under which a backbone's tensors sit in files users have: a checkpoint of this
# framework (Lightning state_dict of DetectionModule) or a bare Detector's state dict
_OWN_PREFIXES = ("detector.backbone.", "backbone.")


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt``/``.ckpt`` file (``weights_only``: the file runs no code).

    Accepts a bare state dict, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers, and checkpoints
    of this framework (the backbone's tensors are taken from under ``detector.backbone.``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file or a pickle of objects: not a state dict we load
        raise ValueError(f"backbone weights {path} are not a readable state dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights {path} hold a {type(state).__name__}, not a state dict")
    for prefix in _OWN_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def torchvision_state_dict(enum: type, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of torchvision weights ``name`` of ``enum`` (e.g. ``VGG16_BN_Weights``,
    'IMAGENET1K_V1' or 'DEFAULT'); downloads into torch's cache unless it is there."""
    try:
        w = enum[name] if name in enum.__members__ else enum.verify(name)
    except (KeyError, ValueError):
        raise ValueError(
            f"backbone weights {name!r} is neither a file nor a {enum.__name__} name ({', '.join(enum.__members__)})"
        ) from None
    try:
        state = w.get_state_dict(progress=True)
    except OSError as e:  # no network (URLError is an OSError) or an unwritable cache
        raise ValueError(
            f"torchvision weights {enum.__name__}.{w.name} could not be downloaded ({e}); download {w.url} where "
            "the network is reachable and give the file: backbone.weights=/path/to/file.pth"
        ) from None
    return state, f"torchvision {enum.__name__}.{w.name}"


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str, name: str,
                  required: Callable[[str], bool] = lambda key: True) -> str:
    """Load the tensors of ``state`` whose key and shape fit ``module``; tensors of ``module`` for
    which ``required(key)`` holds must all be there, or this raises ValueError naming the first
    missing one. Returns "<source> (<n> tensors)"."""
    own = module.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    needed = [k for k in own if required(k) and not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in loaded]
    if missing:
        first = missing[0]
        shape = f" (shape {tuple(state[first].shape)} there, {tuple(own[first].shape)} here)" if first in state else ""
        raise ValueError(
            f"backbone weights from {source} do not fit {name}: {len(missing)} of {len(needed)} tensors missing "
            f"or of another shape (first: {first}{shape})"
        )
    module.load_state_dict(loaded, strict=False)
    return f"{source} ({len(loaded)} tensors)"


def resolve_weights(weights: str, enum_factory: Callable[[], type] | None, name: str) -> tuple[dict, str]:
    """``weights`` is a file (state dict) or, when ``enum_factory`` gives a torchvision enum, one of
    its names. Returns (state dict, source)."""
    path = Path(weights).expanduser()
    if path.is_file():
        return read_state_dict_file(path), f"file {path}"
    if "/" in weights or path.suffix in (".pth", ".pt", ".ckpt", ".weights", ".bin"):
        raise ValueError(f"backbone weights file {path} not found")
    if enum_factory is None:
        raise ValueError(f"backbone weights {weights!r} for {name}: no such file (torchvision has no {name})")
    return torchvision_state_dict(enum_factory(), weights)


# ---- darknet's own .weights files -------------------------------------------------------------


def read_darknet_header(data: bytes) -> tuple[tuple[int, int, int], int, int]:
    """(major, minor, revision), images seen, header length in bytes of a darknet weights file.

    darknet's ``load_weights_upto``: three int32, then ``seen`` as int64 when
    major * 10 + minor >= 2 (and both < 1000), else as int32."""
    if len(data) < 16:
        raise ValueError("darknet weights file too short for its header")
    major, minor, revision = np.frombuffer(data[:12], dtype="<i4").tolist()
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        return (major, minor, revision), int(np.frombuffer(data[12:20], dtype="<i8")[0]), 20
    return (major, minor, revision), int(np.frombuffer(data[12:16], dtype="<i4")[0]), 16


def load_darknet_weights(path: str | Path, layers: Iterable[tuple[nn.Conv2d, nn.BatchNorm2d | None]],
                         allow_extra: bool = False) -> tuple[int, int]:
    """Fill ``layers`` (each conv, with its BatchNorm or None, in darknet's layer order) from a
    darknet ``.weights`` file such as ``darknet53.conv.74``.

    The layout after the header is darknet's ``load_convolutional_weights``: per conv, with
    BatchNorm: biases (beta), scales (gamma), rolling mean, rolling variance (``n`` floats each),
    then the ``n x c x k x k`` kernel; without BatchNorm: biases, then the kernel. Truncated files
    (``.conv.N``: the first N layers) fill the first convs and leave the rest as they were.

    Returns (convs loaded, convs in ``layers``). A file that ends inside a conv's tensors, or holds
    more floats than the convs take, is not this network's: ValueError. ``allow_extra`` accepts the
    latter (a backbone built only up to some stride reads the front of a full file).
    """
    path = Path(path)
    data = path.read_bytes()
    _, _, offset = read_darknet_header(data)
    if (len(data) - offset) % 4:
        raise ValueError(f"{path}: body of {len(data) - offset} bytes is not a whole number of float32")
    floats = np.frombuffer(data, dtype="<f4", offset=offset)
    layers = list(layers)
    pos, loaded = 0, 0
    for conv, bn in layers:
        if pos == len(floats):
            break
        n = conv.out_channels
        parts: list[tuple[torch.Tensor, Sequence[int]]] = []
        if bn is not None:
            parts += [(bn.bias, (n,)), (bn.weight, (n,)), (bn.running_mean, (n,)), (bn.running_var, (n,))]
        elif conv.bias is not None:
            parts.append((conv.bias, (n,)))
        parts.append((conv.weight, tuple(conv.weight.shape)))
        need = sum(int(np.prod(shape)) for _, shape in parts)
        if pos + need > len(floats):
            raise ValueError(f"{path} ends inside conv {loaded} ({len(floats) - pos} floats left, {need} needed): "
                             "not weights of this network")
        with torch.no_grad():
            for tensor, shape in parts:
                size = int(np.prod(shape))
                tensor.copy_(torch.from_numpy(floats[pos:pos + size].copy()).view(shape))
                pos += size
        loaded += 1
    if pos != len(floats) and not allow_extra:
        raise ValueError(f"{path} holds {len(floats) - pos} floats more than the {len(layers)} convs of this network "
                         "take: not weights of this network")
    return loaded, len(layers)
