"""darknet's ``.cfg`` files read into sections, and what a detector cfg says about the framework model that carries
its weights (which model, input size, classes, anchors, widths).

The grammar is darknet's ``read_cfg`` (parser.c): ``[type]`` opens a section, ``key=value`` lines fill it, ``#``
and ``;`` start comments. Only the layer types the framework has parts for are accepted; any other (yolov1.cfg's
``[local]``, ``[connected]``, yolo9000's ``[region] tree=``) is refused in one line naming it and its line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from detectors.weights import ImportError_

# the layer types whose darknet semantics the framework's parts reproduce
SUPPORTED_LAYERS = ("net", "convolutional", "maxpool", "route", "shortcut", "upsample", "yolo", "region", "reorg")
# darknet's aliases of section names (parser.c's string_to_layer_type)
ALIASES = {"conv": "convolutional", "max": "maxpool", "network": "net"}


@dataclass
class Section:
    """One ``[kind]`` section of a cfg: its options as written and the line it starts on (1-based)."""

    kind: str
    line: int
    options: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def int(self, key: str, default: int | None = None) -> int:
        value = self.options.get(key)
        if value is None:
            if default is None:
                raise ImportError_(f"line {self.line}: [{self.kind}] lacks {key}=")
            return default
        try:
            return int(value)
        except ValueError:
            raise ImportError_(f"line {self.line}: [{self.kind}] {key}={value} is not an integer") from None

    def floats(self, key: str) -> list[float]:
        value = self.options.get(key, "")
        try:
            return [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ImportError_(f"line {self.line}: [{self.kind}] {key}={value} is not a list of numbers") from None

    def ints(self, key: str) -> list[int]:
        return [int(v) for v in self.floats(key)]


def parse_cfg(path: str | Path) -> list[Section]:
    """The sections of a darknet cfg, ``[net]`` first. ImportError_ (one line) for a file that is not a cfg or
    a layer type the framework has no part for, naming it and its line."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"darknet cfg {path}: no such file")
    sections: list[Section] = []
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = raw.split("#")[0].split(";")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ImportError_(f"{path.name} line {number}: {line!r} is not a [section] header")
            kind = line[1:-1].strip().lower()
            kind = ALIASES.get(kind, kind)
            if kind not in SUPPORTED_LAYERS:
                raise ImportError_(f"{path.name} line {number}: [{kind}] layer: this framework has no such part "
                                   f"(it imports {', '.join(f'[{k}]' for k in SUPPORTED_LAYERS[1:])})")
            sections.append(Section(kind, number))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1].options[key.strip()] = value.strip()
        else:
            raise ImportError_(f"{path.name} line {number}: {line!r} is neither a [section] nor key=value in one")
    if not sections or sections[0].kind != "net":
        raise ImportError_(f"{path.name}: a darknet cfg starts with [net]")
    for s in sections:
        check_section(s, path.name)
    return sections


def check_section(s: Section, name: str) -> None:
    """Options the framework's parts cannot reproduce, refused with the section's line."""
    where = f"{name} line {s.line}: [{s.kind}]"
    if s.kind == "convolutional":
        activation = s.get("activation", "logistic")
        expected = "leaky" if s.int("batch_normalize", 0) else "linear"
        if activation != expected:
            raise ImportError_(f"{where} activation={activation}: the framework's convs are batch-normalised leaky "
                               f"(darknet's YOLO trunks) or linear predictors")
        for key, default in (("groups", 1), ("dilation", 1), ("binary", 0), ("xnor", 0)):
            if s.int(key, default) != default:
                raise ImportError_(f"{where} {key}={s.get(key)}: the framework's convs have none")
    elif s.kind == "region":
        if "tree" in s.options or "map" in s.options:
            raise ImportError_(f"{where} with tree=/map= (yolo9000's hierarchical softmax): this framework has "
                               "no such part")
        if s.int("softmax", 0) != 1 or s.int("coords", 4) != 4 or s.int("background", 0):
            raise ImportError_(f"{where}: only softmax=1, coords=4, background=0 (YOLOv2's region layer) is imported")
    elif s.kind == "reorg":
        if s.int("stride", 1) != 2 or s.int("reverse", 0) or s.int("flatten", 0) or s.int("extra", 0):
            raise ImportError_(f"{where}: only stride=2 (YOLOv2's passthrough) is imported")
    elif s.kind == "upsample" and s.int("stride", 2) != 2:
        raise ImportError_(f"{where} stride={s.get('stride')}: the framework's necks upsample 2x")
    elif s.kind == "shortcut" and s.get("activation", "linear") != "linear":
        raise ImportError_(f"{where} activation={s.get('activation')}: DarkNet-53's shortcuts are linear")


@dataclass
class DarknetModel:
    """What a detector cfg says about the framework model that carries its weights.

    model: ``yolov3`` | ``yolov2`` | ``yolov3_tiny`` | ``yolov2_tiny`` (configs/model/); input_size (H, W) from ``[net]``; num_classes; anchors
    (K, 2) in pixels of the input, grouped by level finest first as ``detectors.anchors.YOLOAnchors`` wants;
    overrides: the composition's other lines (neck widths, SPP, the cfg's ignore threshold).
    """

    model: str
    input_size: tuple[int, int]
    num_classes: int
    anchors: list[list[float]]
    overrides: list[str]


def describe(sections: list[Section], name: str) -> DarknetModel:
    """The framework model a cfg's layers make: YOLOv3 (DarkNet-53 with ``[shortcut]``s, the YOLOv3 neck, SPP
    where it has ``[maxpool]``s, ``[yolo]`` layers), YOLOv3-tiny (``[yolo]`` without shortcuts: the tiny trunk),
    YOLOv2 (DarkNet-19, the passthrough neck with ``[reorg]``, ``[region]``) or YOLOv2-tiny (``[region]`` without
    ``[reorg]``). The layer-by-layer check is ``darknet_layout.check_layout``."""
    net, layers = sections[0], sections[1:]
    input_size = (net.int("height"), net.int("width"))
    if net.int("channels", 3) != 3:
        raise ImportError_(f"{name} line {net.line}: [net] channels={net.get('channels')}: the framework reads RGB")
    kinds = {s.kind for s in layers}
    yolo = [s for s in layers if s.kind == "yolo"]
    region = [s for s in layers if s.kind == "region"]
    if yolo:
        return _yolov3(yolo, layers, input_size, name, tiny="shortcut" not in kinds)
    if region:
        return _yolov2(region, layers, input_size, name, tiny="reorg" not in kinds)
    raise ImportError_(f"{name}: no [yolo] or [region] layer: not a detector this framework imports")


def _yolov3(yolo: list[Section], layers: list[Section], input_size: tuple[int, int], name: str,
            tiny: bool) -> DarknetModel:
    classes = {s.int("classes") for s in yolo}
    if len(classes) != 1:
        raise ImportError_(f"{name} line {yolo[1].line}: the [yolo] layers disagree on classes ({sorted(classes)})")
    pairs = _anchor_pairs(yolo[0], name)
    groups = []
    for s in reversed(yolo):  # darknet's yolo layers go coarsest first; the framework's levels finest first
        mask = s.ints("mask")
        if not mask or any(m >= len(pairs) for m in mask) or _anchor_pairs(s, name) != pairs:
            raise ImportError_(f"{name} line {s.line}: [yolo] mask={s.get('mask')} / anchors differ from the first "
                               "[yolo] layer's or point past them")
        groups.append([pairs[m] for m in mask])
    if len({len(g) for g in groups}) != 1:
        raise ImportError_(f"{name} line {yolo[0].line}: [yolo] masks of unequal lengths: the framework's levels "
                           "share one anchor count")
    overrides = [f"head.ignore_threshold={float(yolo[0].get('ignore_thresh', 0.5))}"]
    if tiny:  # the neck's width: the conv after the tiny trunk's last (the second after its last max-pool)
        neck_convs = _convs_after_trunk(layers, name)
        overrides.append(f"neck.channels={neck_convs[0].int('filters')}")
    else:  # the neck's width: the first conv after DarkNet-53's last shortcut (yolov3.cfg: 512)
        last_shortcut = max(i for i, s in enumerate(layers) if s.kind == "shortcut")
        first_neck_conv = next(s for s in layers[last_shortcut:] if s.kind == "convolutional")
        spp = any(s.kind == "maxpool" for s in layers)
        overrides += [f"neck.channels={first_neck_conv.int('filters')}", f"neck.spp={str(spp).lower()}"]
    return DarknetModel("yolov3_tiny" if tiny else "yolov3", input_size, classes.pop(),
                        [a for g in groups for a in g], overrides)


def _convs_after_trunk(layers: list[Section], name: str) -> list[Section]:
    """The convs after the tiny trunk (its last max-pool and the 1024-wide conv after it)."""
    last_pool = max((i for i, s in enumerate(layers) if s.kind == "maxpool"), default=None)
    if last_pool is None:
        raise ImportError_(f"{name}: no [maxpool]: not a tiny darknet trunk, nor DarkNet-53 (no [shortcut])")
    return [s for s in layers[last_pool:] if s.kind == "convolutional"][1:]


def _yolov2(region: list[Section], layers: list[Section], input_size: tuple[int, int], name: str,
            tiny: bool) -> DarknetModel:
    if len(region) != 1:
        raise ImportError_(f"{name} line {region[1].line}: a second [region] layer: YOLOv2 predicts on one map")
    s = region[0]
    pairs = _anchor_pairs(s, name)
    if len(pairs) != s.int("num"):
        raise ImportError_(f"{name} line {s.line}: [region] num={s.get('num')} but {len(pairs)} anchors")
    # the region layer's anchors are in cells of its grid, 32 px of the input at DarkNet-19's stride 32
    anchors = [[round(w * 32, 6), round(h * 32, 6)] for w, h in pairs]
    overrides = [f"head.ignore_threshold={float(s.get('thresh', 0.6))}",
                 f"head.object_scale={float(s.get('object_scale', 5))}",
                 f"head.noobject_scale={float(s.get('noobject_scale', 1))}"]
    if tiny:  # the 3x3 convs between the tiny trunk and the predictor (yolov2-tiny.cfg: one of 512)
        widths = [c.int("filters") for c in _convs_after_trunk(layers, name)[:-1]]
        overrides.append(f"neck.channels=[{','.join(map(str, widths))}]")
    else:
        reorg = next(i for i, x in enumerate(layers) if x.kind == "reorg")
        route = max(i for i, x in enumerate(layers[:reorg]) if x.kind == "route")
        deep_conv = layers[route - 1]  # the neck's second 3x3 conv, its width
        if deep_conv.kind != "convolutional":
            raise ImportError_(f"{name} line {deep_conv.line}: [{deep_conv.kind}] before the passthrough's [route]: "
                               "YOLOv2's neck has its 3x3 conv there")
        reduce_conv = next(x for x in layers[route:] if x.kind == "convolutional")
        overrides += [f"neck.channels={deep_conv.int('filters', 0)}",
                      f"neck.passthrough_channels={reduce_conv.int('filters')}"]
    return DarknetModel("yolov2_tiny" if tiny else "yolov2", input_size, s.int("classes"), anchors, overrides)


def _anchor_pairs(s: Section, name: str) -> list[list[float]]:
    values = s.floats("anchors")
    if not values or len(values) % 2:
        raise ImportError_(f"{name} line {s.line}: [{s.kind}] anchors= must be w,h pairs")
    return [[values[i], values[i + 1]] for i in range(0, len(values), 2)]


def float_count(sections: list[Section], name: str) -> int:
    """Floats the cfg's convs take in a ``.weights`` file (per conv: biases, with ``batch_normalize`` also scales,
    rolling means and variances, then the kernel), from the channels walked through its layers: a route
    concatenates, a reorg multiplies by stride^2, the others keep them. The importer's early check of a weights
    file, before the model is built."""
    channels: list[int] = []
    prev, total = sections[0].int("channels", 3), 0
    for i, s in enumerate(sections[1:]):
        if s.kind == "convolutional":
            n, k = s.int("filters", 1), s.int("size", 1)
            total += (4 * n if s.int("batch_normalize", 0) else n) + n * prev * k * k
            c = n
        elif s.kind == "route":
            try:
                c = sum(channels[j if j >= 0 else i + j] for j in s.ints("layers"))
            except IndexError:
                raise ImportError_(f"{name} line {s.line}: [route] layers={s.get('layers')} points outside the cfg") from None
        elif s.kind == "reorg":
            c = prev * s.int("stride", 1) ** 2
        else:
            c = prev
        channels.append(c)
        prev = c
    return total
