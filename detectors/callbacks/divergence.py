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
    finished anyway: the norm is the whole cost (SSD300: about 25 ms of a 10 s step of 4 images on one core;
    the deferred mode's snapshot below would add about 0.2 s there).

    **Deferred** (a GPU): reading the flag at once would stall the host until the GPU drains,
    every step. Nor can a step be made a no-op on the device by the gradients alone (zero
    gradients still move SGD momentum and AdamW's moments, weight decay and bias correction). So
    the step runs, on the device, inside a snapshot: before the update the stepped parameters and
    their optimizer state tensors are copied into kept buffers (one ``_foreach_copy_``), and after
    it (a step post-hook) each is set to ``torch.where(finite, new, old)``. A bad step thus leaves
    weights and device state bit-for-bit unchanged before the next forward, with no host read. The
    flag itself goes to pinned memory (non-blocking) behind a CUDA event, and the host reads it one
    step late (next step's ``on_before_optimizer_step``, when the GPU has long passed it; also at
    epoch end, train end and before a checkpoint is written). Only then, for a bad step, the
    warning is logged (or the error raised, before the next update), and what lives on the host is
    put back: AdamW's CPU step counts, non-tensor state, and state entries the step created
    (e.g. the first step's momentum buffer), all before the next update reads them. What 'skip'
    means is the same as in the immediate mode; the price is memory for a copy of the parameters
    and optimizer state (as much again as the parameters for SGD with momentum, twice for AdamW),
    about five passes over them per step (copy, select: some 1 GB of memory traffic for SSD300
    with SGD, well under a millisecond on an H200; an estimate, not measured yet) and one small
    kernel per tensor. With 'stop' the run ends at the next step (or epoch end) with the bad
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
        # (layout of the snapshotted tensors, their copies), kept across steps
        self._buffers: tuple[tuple, list[Tensor]] = ((), [])
        self._host_buffers: tuple[tuple, list[Tensor]] = ((), [])
        self._slots: list[tuple[dict | None, str | None, Tensor, Tensor]] = []  # what the post-hook reverts
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
            terms = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            self._diverged(trainer.current_epoch, trainer.global_step, terms, self._image_ids)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimizers leave parameters without a gradient untouched

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        pending = self._pending
        if pending is not None and not pending.terms and pending.step == trainer.global_step - 1:
            # references to this step's logged terms; their values are read only if the step was bad
            pending.terms = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

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
        # (state entry or None for the parameter itself, key, tensor) of everything the step may change
        slots: list[tuple[dict | None, str | None, Tensor]] = [(None, None, p) for p in params]
        host_state, plain_state, keys_before = [], [], []
        for p in params:
            entry = optimizer.state.get(p)
            keys_before.append((p, frozenset(entry) if entry else None))
            for key, value in (entry or {}).items():
                if not isinstance(value, Tensor):
                    plain_state.append((entry, key, value))
                elif value.device == device:
                    slots.append((entry, key, value))
                else:
                    host_state.append(value)
        targets = [t for _, _, t in slots]
        with torch.no_grad():
            buffers = self._cached("_buffers", targets)
            torch._foreach_copy_(buffers, targets)
            host_saved = self._cached("_host_buffers", host_state)
            if host_state:
                torch._foreach_copy_(host_saved, host_state)
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
                                 self._image_ids, optimizer, keys_before, host_state, host_saved, plain_state)
        self._slots = [(entry, key, t, old) for (entry, key, t), old in zip(slots, buffers)]
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_post_hook(self._after_step)

    def _cached(self, name: str, tensors: list[Tensor]) -> list[Tensor]:
        """Copies shaped like ``tensors``, kept across steps (allocated again only when the shapes change)."""
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)
        cache = getattr(self, name)
        if cache[0] != key:
            cache = (key, [torch.empty_like(t) for t in tensors])
            setattr(self, name, cache)
        return cache[1]

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook: keep the update where the step was finite, else the snapshot, on the device."""
        pending = self._pending
        if pending is None or pending.optimizer is not optimizer or pending.reverted:
            return
        finite = pending.finite
        with torch.no_grad():
            for entry, key, target, old in self._slots:
                current = target if entry is None else entry.get(key)
                if current is target:
                    torch.where(finite, target, old, out=target)
                elif isinstance(current, Tensor):  # the optimizer put a new tensor in its state
                    entry[key] = torch.where(finite, current, old)
        pending.reverted = True
        self._slots = []

    def _release(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._buffers = self._host_buffers = ((), [])
        self._slots = []
