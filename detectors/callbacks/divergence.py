"""Catch a non-finite loss at the step where it happens, name the images, skip the step or stop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or its gradients are not finite."""


@dataclass
class _Pending:
    """A step checked on the device whose verdict the host has not read yet (deferred mode)."""

    finite: Tensor  # 0-dim bool on the device
    host_finite: Tensor  # its copy in pinned memory, valid once ``ready`` has passed
    ready: Any  # torch.cuda.Event recorded after the copy; None where device and host are one
    epoch: int
    step: int
    image_ids: Tensor | None
    optimizer: torch.optim.Optimizer
    keys_before: list[tuple[Tensor, frozenset | None]]  # each stepped parameter's state keys before the step
    host_state: list[Tensor]  # state tensors off the device (AdamW's CPU step counts) ...
    host_saved: list[Tensor]  # ... and their values before the step
    plain_state: list[tuple[dict, str, Any]]  # non-tensor state values before the step
    terms: dict[str, Tensor] = field(default_factory=dict)  # the step's logged train/ terms (references)
    reverted: bool = False  # the update was reverted on the device (the step post-hook ran)


@dataclass
class _FlatGroup:
    """Tensors of one dtype and device that a step may change, with two flat buffers of their total size
    and, for each tensor, a view into each buffer with the tensor's own shape and strides (a dense
    tensor's elements fill ``numel`` consecutive places in any layout, channels-last included), so
    ``_foreach_copy_`` moves them all in a few kernels and one ``torch.where`` selects over all of them."""

    slots: list[tuple[dict | None, str | None, Tensor]]  # (state entry or None for a parameter, key, tensor)
    targets: list[Tensor]
    old_flat: Tensor
    new_flat: Tensor
    old_views: list[Tensor]
    new_views: list[Tensor]

    @staticmethod
    def of(slots: list[tuple[dict | None, str | None, Tensor]]) -> "_FlatGroup":
        targets = [t for _, _, t in slots]
        first = targets[0]
        total = sum(t.numel() for t in targets)
        old_flat = torch.empty(total, dtype=first.dtype, device=first.device)
        new_flat = torch.empty_like(old_flat)
        old_views, new_views, offset = [], [], 0
        for t in targets:
            if not _is_dense(t):  # a view with gaps or overlaps: its own contiguous copy
                old_views.append(old_flat[offset:offset + t.numel()].view(t.shape))
                new_views.append(new_flat[offset:offset + t.numel()].view(t.shape))
            else:
                old_views.append(old_flat.as_strided(t.shape, t.stride(), offset))
                new_views.append(new_flat.as_strided(t.shape, t.stride(), offset))
            offset += t.numel()
        return _FlatGroup(slots, targets, old_flat, new_flat, old_views, new_views)


def _is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements occupy exactly ``numel`` consecutive storage places (contiguous in some
    dimension order): then a view with its strides fits in a flat buffer of that size."""
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class _Layout:
    """The deferred mode's snapshot plan for one optimizer's stepped tensors (see ``_layout_for``)."""

    signature: tuple
    groups: list[_FlatGroup]
    keys_before: list[tuple[Tensor, frozenset | None]]
    host_state: list[Tensor]
    host_saved: list[Tensor]
    plain_keys: list[tuple[dict, str]]


class DivergenceGuard(L.Callback):
    """Checks every training step for a non-finite loss or gradient before the optimizer steps.

    Args:
        action: 'skip' (drop the step: weights and optimizer state stay as they were, training goes
            on) or 'stop' (raise NonFiniteLossError, which ends the run; a sweep records the trial
            as failed).
        max_skips: stop anyway after this many skipped steps in a run (a model that keeps
            diverging is not going to recover).
        deferred: how the verdict reaches the host (see below). None (default): deferred where the
            gradients live on a CUDA device, immediate elsewhere.

    The warning (or error) names the epoch and step, the step's logged loss terms and the batch's
    image ids, so the offending samples can be looked at. Mixed precision with a GradScaler
    (16-mixed) handles its own overflow; this guard sees only what survives unscaling.

    **Immediate** (the CPU): the finite flag of the summed gradient norms is read at once and a bad
    step's gradients are dropped (``p.grad = None``, which every torch optimizer skips, momentum
    and Adam moments included). Reading it waits for the backward pass, which on the CPU has
    finished anyway: the norm is the whole cost, less than the deferred mode's snapshot below would add
    there (BENCHMARKS.md, "Training loop vs isolated step").

    **Deferred** (a GPU): reading the flag at once would stall the host until the GPU drains,
    every step. Nor can a step be made a no-op on the device by the gradients alone (zero
    gradients still move SGD momentum and AdamW's moments, weight decay and bias correction). So
    the step runs, on the device, inside a snapshot: before the update the stepped parameters and
    their optimizer state tensors are copied into one flat buffer per dtype (``_foreach_copy_`` into
    views of it), and after it (a step post-hook) they are gathered into a second flat buffer, which
    becomes ``torch.where(finite, new, old)`` and is copied back. A bad step thus leaves
    weights and device state bit-for-bit unchanged before the next forward, with no host read. The
    flag itself goes to pinned memory (non-blocking) behind a CUDA event, and the host reads it one
    step late (next step's ``on_before_optimizer_step``, when the GPU has long passed it; also at
    epoch end, train end and before a checkpoint is written). Only then, for a bad step, the
    warning is logged (or the error raised, before the next update), and what lives on the host is
    put back: AdamW's CPU step counts, non-tensor state, and state entries the step created
    (e.g. the first step's momentum buffer), all before the next update reads them. What 'skip'
    means is the same as in the immediate mode; the price is memory for two copies of the parameters
    and optimizer state (SGD with momentum: four times the parameters; AdamW: six), about seven passes
    over them per step (some 1.4 GB of memory traffic for SSD300 with SGD, under a millisecond on an
    H200) and a few kernels per ``_foreach_copy_``, whatever the number of tensors. The host's work
    per step is one pass over the tensors' ids (the snapshot plan is kept while they stay the same
    objects), since host time adds to every launch-bound GPU step (SSDLite's; BENCHMARKS.md, "Training
    loop vs isolated step"). With 'stop' the run ends at the next step (or epoch end) with the bad
    step's numbers, its update reverted. Sync-free designs that keep less were rejected: zeroing
    the gradients on the device still moves momentum, Adam's moments and weight decay; the fused
    optimizers' ``found_inf`` skip serves only ``fused=True`` optimizers; GradScaler's own skip
    reads its flag on the host before every step.
    """

    def __init__(self, action: str = "skip", max_skips: int = 100, deferred: bool | None = None):
        if action not in ("skip", "stop"):
            raise ValueError(f"action must be 'skip' or 'stop', got {action!r}")
        self.action = action
        self.max_skips = max_skips
        self.deferred = deferred
        self.skipped = 0
        self._image_ids: Tensor | None = None
        self._pending: _Pending | None = None
        self._hooks: dict[int, Any] = {}  # id(optimizer) -> step post-hook handle
        self._layout: _Layout | None = None  # what a step may change and its snapshot, kept across steps
        self._host_flag: Tensor | None = None  # pinned, the deferred flag's way to the host

    # ---- hooks ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        # the tensor, read only when reporting: .tolist() here would wait for the GPU at every step
        self._image_ids = batch["image_ids"] if isinstance(batch, dict) and "image_ids" in batch else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._resolve()  # the previous step's verdict, one step late
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())  # one fused reduction
        deferred = self.deferred if self.deferred is not None else grads[0].device.type == "cuda"
        if deferred:
            self._defer(trainer, optimizer, finite)
        elif not finite:  # reads the flag now: the immediate mode
            terms = self._terms(trainer, pl_module)
            self._diverged(trainer.current_epoch, trainer.global_step, terms, self._image_ids)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimizers leave parameters without a gradient untouched

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        pending = self._pending
        if pending is not None and not pending.terms and pending.step == trainer.global_step - 1:
            # references to this step's logged terms; their values are read only if the step was bad
            pending.terms = self._terms(trainer, pl_module)

    @staticmethod
    def _terms(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The step's loss terms: the module's own (``last_loss_terms``: logged only every few steps, the
        logged ones may be older), else what was logged."""
        terms = getattr(pl_module, "last_loss_terms", None)
        return dict(terms) if terms else {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve()
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._pending = None
        self._release()

    def state_dict(self) -> dict[str, Any]:
        # called while a checkpoint is dumped, before the optimizer state: put the host state right first
        self._resolve()
        return {}

    # ---- the verdict ---------------------------------------------------------------------
    def _diverged(self, epoch: int, step: int, terms: dict[str, Tensor], image_ids: Tensor | None) -> None:
        """Report a non-finite step: raises for 'stop' (or too many skips), else counts it as skipped."""
        message = (
            f"non-finite loss or gradient at epoch {epoch} step {step} "
            f"(last logged {({k: float(v) for k, v in terms.items()})}); image ids of the batch: "
            f"{image_ids.tolist() if image_ids is not None else []}"
        )
        if self.action == "stop" or self.skipped >= self.max_skips:
            raise NonFiniteLossError(message + ("" if self.action == "stop" else f"; {self.skipped} steps skipped already"))
        self.skipped += 1
        log.warning("%s: step skipped (%d so far)", message, self.skipped)

    def _read_flag(self, pending: _Pending) -> bool:
        """The host's only read of a deferred flag: waits for the event of the step it belongs to
        (passed long ago), not for the work queued since."""
        if pending.ready is not None:
            pending.ready.synchronize()
        return bool(pending.host_finite)

    def _resolve(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self._read_flag(pending):
            return
        # put back what lives on the host (the device tensors were reverted by the step post-hook)
        if pending.host_state:
            torch._foreach_copy_(pending.host_state, pending.host_saved)
        for entry, key, value in pending.plain_state:
            entry[key] = value
        state = pending.optimizer.state
        for p, keys in pending.keys_before:
            entry = state.get(p)
            if entry is None:
                continue
            for key in [k for k in entry if keys is None or k not in keys]:
                del entry[key]  # created by the skipped step (e.g. the first momentum buffer)
            if keys is None and not entry:
                del state[p]
        self._diverged(pending.epoch, pending.step, pending.terms, pending.image_ids)

    # ---- deferred mode: the step inside a snapshot -----------------------------------------
    def _defer(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
        device = finite.device
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        layout = self._layout_for(optimizer, params, device)
        with torch.no_grad():
            for group in layout.groups:
                torch._foreach_copy_(group.old_views, group.targets)
            if layout.host_state:
                torch._foreach_copy_(layout.host_saved, layout.host_state)
        plain_state = [(entry, key, entry[key]) for entry, key in layout.plain_keys]
        if device.type == "cuda":
            if self._host_flag is None:
                self._host_flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            # one buffer is enough: the previous step's copy was read (``_resolve``) before this one is queued
            host_finite = self._host_flag
            host_finite.copy_(finite, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host_finite, ready = finite, None
        self._pending = _Pending(finite, host_finite, ready, trainer.current_epoch, trainer.global_step,
                                 self._image_ids, optimizer, layout.keys_before, layout.host_state,
                                 layout.host_saved, plain_state)
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_post_hook(self._after_step)

    def _layout_for(self, optimizer: torch.optim.Optimizer, params: list[Tensor], device: torch.device) -> _Layout:
        """What the step may change, and the flat buffers that snapshot it: made again only when the
        stepped parameters or their state tensors are other objects than last step's (the first steps,
        which create the optimizer's state; a parameter without a gradient). The check is one pass
        over object ids; the rest (grouping, buffers, views) is the slow path."""
        state = optimizer.state
        signature = (id(optimizer), tuple(id(p) for p in params),
                     tuple(id(v) for p in params for v in state.get(p, {}).values()))
        if self._layout is not None and self._layout.signature == signature:
            return self._layout
        slots: list[tuple[dict | None, str | None, Tensor]] = [(None, None, p) for p in params]
        host_state, plain_keys, keys_before = [], [], []
        for p in params:
            entry = state.get(p)
            keys_before.append((p, frozenset(entry) if entry else None))
            for key, value in (entry or {}).items():
                if not isinstance(value, Tensor):
                    plain_keys.append((entry, key))
                elif value.device == device:
                    slots.append((entry, key, value))
                else:
                    host_state.append(value)
        by_kind: dict[tuple, list[tuple[dict | None, str | None, Tensor]]] = {}
        for slot in slots:
            by_kind.setdefault((slot[2].dtype, slot[2].device), []).append(slot)
        self._layout = _Layout(signature, [_FlatGroup.of(kind_slots) for kind_slots in by_kind.values()],
                               keys_before, host_state, [torch.empty_like(t) for t in host_state], plain_keys)
        return self._layout

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook: keep the update where the step was finite, else the snapshot, on the device:
        per kind of tensor, gather the updated tensors into one flat buffer, select, scatter back (a few
        kernels, whatever the number of tensors)."""
        pending, layout = self._pending, self._layout
        if pending is None or pending.optimizer is not optimizer or pending.reverted or layout is None:
            return
        finite = pending.finite
        with torch.no_grad():
            for group in layout.groups:
                torch._foreach_copy_(group.new_views, group.targets)
                torch.where(finite, group.new_flat, group.old_flat, out=group.new_flat)
                torch._foreach_copy_(group.targets, group.new_views)
                for (entry, key, target), old in zip(group.slots, group.old_views):
                    if entry is None:
                        continue
                    current = entry.get(key)
                    if current is not target and isinstance(current, Tensor):
                        # the optimizer put a new tensor in its state: select into that one
                        entry[key] = torch.where(finite, current, old)
        pending.reverted = True

    def _release(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._layout = None
