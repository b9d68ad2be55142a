"""``train.py init_from=PATH``: a new run starts from the weights of any checkpoint of this framework (trained,
or imported by ``detectors.weights``), with its own classes.

Every tensor whose name and shape match is loaded; the others keep the fresh model's initialisation. The class
outputs (each head's ``class_axes``, ``detectors.heads.class_axes``) are rebuilt instead: their class-independent
entries (box, objectness, background) and the rows of every class whose name the checkpoint's run also had come
from the checkpoint, the rows of new classes are the fresh model's. So a COCO detector fine-tuned to
``[person, car]`` detects both from the first step. One log line says what was loaded, rebuilt, re-initialised.

It is not a resume: nothing but the weights is read (optimizer, epoch, schedule and RNG start fresh);
``ckpt_path`` resumes, and the two together are refused. A checkpoint of another model (another head or
backbone class), or one of which fewer than half of this model's tensors match, is refused in one line that
names the model it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from detectors.checkpoints import load_checkpoint
from detectors.heads.class_axes import ClassAxis

log = logging.getLogger(__name__)

HEAD_PREFIX = "detector.head."
# below this share of the model's tensors matching by name (and shape, or a class layout to rebuild), the
# checkpoint is not a start for this model: most of it would be re-initialised anyway
MIN_MATCHING_SHARE = 0.5


@dataclass
class Transfer:
    """What init_from did with each tensor of the model. loaded: keys loaded whole; rebuilt and reinitialised:
    key -> (the checkpoint's shape or None where it has no such key, the model's shape); unused: the
    checkpoint's keys the model lacks; kept and new: the model's classes found in the checkpoint's, and not."""

    total: int
    loaded: list[str] = field(default_factory=list)
    rebuilt: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    reinitialised: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    def summary(self, path: str | Path) -> str:
        """The one log line."""
        def shapes(entries: dict) -> str:
            return ", ".join(f"{k} {tuple(old) if old is not None else '(absent)'} -> {tuple(new)}"
                             for k, (old, new) in entries.items()) or "none"

        line = f"init_from {path}: {len(self.loaded)} of {self.total} tensors loaded"
        if self.rebuilt:
            line += (f"; class outputs rebuilt, classes kept from the checkpoint: {self.kept or 'none'}, new: "
                     f"{self.new or 'none'} ({shapes(self.rebuilt)})")
        line += f"; re-initialised: {shapes(self.reinitialised)}"
        if self.unused:
            line += f"; {len(self.unused)} of the checkpoint's unused (first: {self.unused[0]})"
        return line


def class_names_of(run: DictConfig) -> list[str] | None:
    """The class names (label order) a checkpoint's run config trained with: ``data.classes``, else the
    module's ``class_names``; None where it records none."""
    for key in ("data.classes", "model.class_names"):
        names = OmegaConf.select(run, key, default=None)
        if names:
            return [str(n) for n in names]
    return None


def _short(target: object) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "?"


def class_slots_of(run: DictConfig, names: list[str] | None) -> list[str] | None:
    """The checkpoint's class outputs in layout order: ``names`` where its head put class c in slot c (all but
    one), else (an SSD head with ``class_columns``, as torchvision's COCO SSD imported: 80 names in 90 columns
    after the background) the name of each column, unnamed columns as placeholders no class name equals."""
    columns = OmegaConf.select(run, "model.detector.head.class_columns", default=None)
    if not columns or names is None:
        return names
    slots = [f"<column {c} without a class>" for c in range(1, max(columns) + 1)]
    for name, column in zip(names, columns):
        slots[int(column) - 1] = name
    return slots


def describe_model(run: DictConfig) -> str:
    """'YOLOv3Head on DarkNet53 (neck YOLOv3FPN, 80 classes)': the model a run config holds."""
    part = lambda name: _short(OmegaConf.select(run, f"model.detector.{name}._target_", default=None))  # noqa: E731
    classes = class_names_of(run)
    return (f"{part('head')} on {part('backbone')} (neck {part('neck')}"
            f"{f', {len(classes)} classes' if classes else ''})")


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def check_same_model(model: nn.Module, run: DictConfig, path: str | Path) -> None:
    """Refuse in one line a checkpoint whose run config holds another head or backbone class than ``model``'s."""
    detector = model.detector
    for part in ("head", "backbone"):
        stored = OmegaConf.select(run, f"model.detector.{part}._target_", default=None)
        if stored is not None and stored != _class_path(getattr(detector, part)):
            raise ValueError(
                f"init_from={path} holds another model: {describe_model(run)}, this run builds "
                f"{type(detector.head).__name__} on {type(detector.backbone).__name__}: choose the model (and "
                "backbone) it was trained with")


def rebuild_class_tensor(fresh: Tensor, source: Tensor, axis: ClassAxis, source_classes: Sequence[str],
                         classes: Sequence[str]) -> Tensor | None:
    """``fresh`` (the new model's tensor, laid out by ``axis`` for ``classes``) with the class-independent
    entries and the rows of every class also in ``source_classes`` taken from ``source`` (laid out for
    those); None where the two differ in more than the classes (groups, input width)."""
    new, old = axis.split(fresh.detach().clone(), len(classes)), axis.split(source, len(source_classes))
    if new is None or old is None or new.shape[0] != old.shape[0] or new.shape[2:] != old.shape[2:]:
        return None
    new[:, : axis.before] = old[:, : axis.before]
    index = {name: i for i, name in enumerate(source_classes)}
    for j, name in enumerate(classes):
        if name in index:
            new[:, axis.before + j] = old[:, axis.before + index[name]]
    return new.reshape(fresh.shape)


def transfer_state(model: nn.Module, source: dict[str, Tensor], source_classes: Sequence[str] | None,
                   classes: Sequence[str]) -> tuple[dict[str, Tensor], Transfer]:
    """The state dict ``model`` (a DetectionModule, freshly built) starts from, taken from ``source`` (a
    checkpoint's state dict of classes ``source_classes``; None: unknown, class outputs then load only where
    their shapes match), and what was done with each tensor."""
    own = model.state_dict()
    head = model.detector.head
    axes = {HEAD_PREFIX + k: a for k, a in (head.class_axes() if hasattr(head, "class_axes") else {}).items()}
    same_classes = source_classes is None or list(source_classes) == list(classes)
    state, t = {}, Transfer(total=len(own))
    for key, fresh in own.items():
        old = source.get(key)
        state[key] = fresh
        if old is None:
            t.reinitialised[key] = (None, tuple(fresh.shape))
        elif key in axes and not same_classes:
            rebuilt = rebuild_class_tensor(fresh, old, axes[key], source_classes, classes)
            if rebuilt is None:
                t.reinitialised[key] = (tuple(old.shape), tuple(fresh.shape))
            else:
                state[key] = rebuilt
                t.rebuilt[key] = (tuple(old.shape), tuple(fresh.shape))
        elif old.shape == fresh.shape:
            state[key] = old
            t.loaded.append(key)
        else:
            t.reinitialised[key] = (tuple(old.shape), tuple(fresh.shape))
    t.unused = [k for k in source if k not in own]
    if t.rebuilt:
        t.kept = [c for c in classes if c in set(source_classes)]
        t.new = [c for c in classes if c not in set(source_classes)]
    return state, t


def init_from_checkpoint(model: nn.Module, path: str | Path) -> Transfer:
    """Load ``path``'s weights into ``model`` (a freshly built DetectionModule; its ``class_names`` are the
    run's classes) as the module docstring says, log the one line, and return what was done. Refusals (another
    model, too little matching, not a checkpoint of this framework) are one-line ValueErrors."""
    ckpt, run = load_checkpoint(path)
    check_same_model(model, run, path)
    classes = list(getattr(model, "class_names", []) or [])
    source_classes = class_slots_of(run, class_names_of(run))
    state, transfer = transfer_state(model, ckpt["state_dict"], source_classes, classes)
    matching = len(transfer.loaded) + len(transfer.rebuilt)
    if matching < MIN_MATCHING_SHARE * transfer.total:
        first = next(iter(transfer.reinitialised), "-")
        raise ValueError(
            f"init_from={path} holds {describe_model(run)}, of which only {matching} of this model's "
            f"{transfer.total} tensors match (first that does not: {first}): not a start for this model")
    model.load_state_dict(state)
    log.info(transfer.summary(path))
    return transfer


def check_init_from(cfg: DictConfig) -> None:
    """Before anything is built: refuse ``init_from`` together with a ``ckpt_path`` file (a resume: the two
    would disagree on where the weights come from; ``ckpt_path=auto`` is allowed: it resumes the fine-tuning
    run this configuration started, if any, else the run starts from ``init_from``), refuse a missing file,
    and record the file's absolute path in ``cfg`` (the run config, compared by ``ckpt_path=auto``)."""
    init_from = cfg.get("init_from")
    if not init_from:
        return
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and ckpt_path != "auto":
        raise ValueError(f"init_from={init_from} starts a new run from a checkpoint's weights, ckpt_path={ckpt_path} "
                         "resumes a run: give one (the resume of a fine-tuning run needs only ckpt_path)")
    path = Path(str(init_from)).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"init_from={init_from}: no such file")
    with open_dict(cfg):
        cfg.init_from = str(path)


def keep_init_from_of(stored_run: DictConfig, cfg: DictConfig) -> None:
    """Resuming: the run config keeps the ``init_from`` of the run that started from it (its weights came from
    there; ``ckpt_path=auto`` finds the run by it), and the resume does not load it again."""
    stored = stored_run.get("init_from")
    if cfg.get("init_from") and stored:
        log.info("resuming a run that started from init_from=%s: its weights come from the checkpoint resumed", stored)
    with open_dict(cfg):
        cfg.init_from = stored
