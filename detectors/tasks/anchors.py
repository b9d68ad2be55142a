"""Anchors for a dataset: YOLOv2's dimension clusters over the training boxes, at the network's input size.

    python -m detectors.anchors kmeans data=voc data.root=PATH [model=...] [input_size=[416,416]] [k=5]
        [seed=0] [iters=300] [out=anchors_k5.yaml]

Every argument of the form ``k=``, ``seed=``, ``iters=`` or ``out=`` belongs to this command and is
taken out before the rest is composed with ``configs/train.yaml`` as train.py composes it (so
``seed=`` is the k-means seed here, not the training seed, which does not change the boxes). The
data module is built as train.py builds it, and the boxes are those its training split reads:
clipped to the image, degenerate, outside and tiny ones dropped by the source
(``formats.common.AnnotationChecks``), difficult (and crowd) ones left out as training leaves
them out. Each box is scaled to the input as the training resize scales it: stretched
(``w * W_in / W0``, ``h * H_in / H0``) under the 'ssd' and 'none' augment presets, letterboxed (one
factor, ``min(W_in / W0, H_in / H0)``, with albumentations' rounding, see
``transforms.letterbox_frame``) under 'yolo'; boxes then narrower or lower than the augment's
``min_box_size`` are dropped, as the training transform drops them. The random scaling of the
augmentation is not modelled: anchors describe the boxes at scale 1.

It prints the number of boxes, the k anchors in pixels of the input (by area), their mean best IoU
(the paper's "Avg IOU"), the same for the config's own ``head.anchors`` (a list of [w, h] in input
pixels, the key the YOLO heads read) where it has them, and writes ``head: {anchors: [[w, h], ...]}``
to ``out``; the override that applies it is printed too. Exit status 0, 1 when the data cannot be
read or clustered, 2 for a malformed command line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from detectors.anchors import kmeans_anchors, mean_best_iou
from detectors.data.training_boxes import (  # noqa: F401  (boxes_at_input, training_records: also read here)
    LETTERBOX_PRESETS,
    box_sizes_at_input,
    boxes_at_input,
    training_records,
    training_resize,
)

USAGE = ("usage: python -m detectors.anchors kmeans [Hydra overrides as for train.py] [k=5] [seed=0] [iters=300] "
         "[out=PATH]")
OWN_KEYS = {"k": int, "seed": int, "iters": int, "out": str}


def split_arguments(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """(this command's own keys, the Hydra overrides), e.g. ['k=5', 'data=voc'] -> ({'k': 5}, ['data=voc']).
    Raises ValueError for a value of the wrong type."""
    own, overrides = {"k": 5, "seed": 0, "iters": 300, "out": None}, []
    for arg in argv:
        m = re.fullmatch(r"(\w+)=(.*)", arg, flags=re.S)
        if m and m.group(1) in OWN_KEYS:
            try:
                own[m.group(1)] = OWN_KEYS[m.group(1)](m.group(2))
            except ValueError:
                raise ValueError(f"{m.group(1)} must be an integer, got {m.group(2)!r}") from None
        else:
            overrides.append(arg)
    return own, overrides


def anchors_yaml(anchors: Sequence[Sequence[float]]) -> str:
    """``[[w, h], ...]`` in flow style, 2 decimals (what the file and the override carry)."""
    return "[" + ", ".join(f"[{w:.2f}, {h:.2f}]" for w, h in anchors) + "]"


def config_anchors(cfg) -> list[list[float]] | None:
    """The config's ``head.anchors`` as a list of [w, h], or None when the head has none; for ``anchors: auto``
    the ``head.default_anchors`` that training starts from."""
    node = OmegaConf.select(cfg, "head.anchors", default=None)
    if node == "auto":
        node = OmegaConf.select(cfg, "head.default_anchors", default=None)
    if node is None:
        return None
    anchors = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    array = np.asarray(anchors, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"head.anchors must be a list of [w, h] pairs, got {anchors!r}")
    return array.tolist()


def main(argv: Sequence[str] | None = None) -> int:
    from detectors.data.check import compose_config  # configs/train.yaml as train.py composes it
    from detectors.tasks.train import build_datamodule

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0 if argv else 2
    if argv[0] != "kmeans":
        print(f"unknown command {argv[0]!r}\n{USAGE}")
        return 2
    try:
        own, overrides = split_arguments(argv[1:])
    except ValueError as e:
        print(f"{e}\n{USAGE}")
        return 2
    k, out = own["k"], Path(own["out"] or f"anchors_k{own['k']}.yaml")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    cfg = compose_config(overrides)
    try:
        datamodule = build_datamodule(cfg)
        records, generated = training_records(datamodule.source)
    except Exception as e:  # Hydra wraps the source's error; its message says what was looked for
        print(f"cannot read the training split: {e}")
        return 1
    input_size = datamodule.input_size
    preset, letterbox, min_box_size = training_resize(datamodule)
    wh, left_out = box_sizes_at_input(records, input_size, letterbox, min_box_size)

    height, width = input_size
    root = cfg.data.get("root")
    print(f"k-means anchors (YOLOv2 dimension clusters, d = 1 - IoU), k={k} seed={own['seed']}")
    print(f"data: {type(datamodule.source).__name__}, train split, {len(records)} images"
          + (f", data.root={root}" if root is not None else "")
          + (" (boxes generated with the images)" if generated else ""))
    resize = (f"letterbox (augment preset {preset!r}): w, h * min({width} / W0, {height} / H0)" if letterbox
              else f"stretch (augment preset {preset!r}): w * {width} / W0, h * {height} / H0")
    print(f"input {width}x{height} (W x H), {resize}")
    print(f"boxes clustered: {len(wh)} (left out: " + ", ".join(f"{n} {why}" for why, n in left_out.items()) + ")")
    if letterbox != (datamodule.eval_resize == "letterbox"):
        print(f"note: evaluation resizes otherwise (augment.eval_resize={datamodule.eval_resize}); the anchors "
              "follow the training resize")
    try:
        anchors = kmeans_anchors(wh, k, seed=own["seed"], iters=own["iters"])
    except ValueError as e:
        print(f"cannot cluster: {e}")
        return 1
    rounded = [[round(float(w), 2), round(float(h), 2)] for w, h in anchors]
    print(f"anchors (w, h px of the input, by area): {anchors_yaml(rounded)}")
    print(f"mean IoU of the {k} anchors: {mean_best_iou(wh, rounded):.4f}")
    try:
        current = config_anchors(cfg)
    except ValueError as e:
        print(f"cannot compare with the config's anchors: {e}")
        return 1
    if current is None:
        print("current anchors: the model has no anchors (no head.anchors in the config)")
    else:
        print(f"mean IoU of the config's head.anchors ({len(current)}): {mean_best_iou(wh, current):.4f}")

    header = (f"# k-means anchors (1 - IoU), k={k} seed={own['seed']}, {len(wh)} training boxes at input "
              f"{width}x{height} ({'letterbox' if letterbox else 'stretch'}); "
              f"overrides: {' '.join(overrides) or '-'}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + f"head:\n  anchors: {anchors_yaml(rounded)}\n")
    print(f"wrote {out}; as an override: '{'' if current is not None else '+'}head.anchors={anchors_yaml(rounded)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
