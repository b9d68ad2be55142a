"""Known harmless messages of the libraries, silenced so the run log shows what matters."""

from __future__ import annotations

import logging
import warnings

_WARNINGS = (
    # our DataModule has no batch hooks: mixup, multi-scale and normalisation live on the module on purpose
    r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # torchdata 0.11's StatefulDataLoader calls a torch API that torch now deprecates; it has no effect
    r".*'set_vital' is deprecated",
    # Lightning's own use of a torch.utils._pytree API deprecated in newer torch
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning logs every log_every_n_steps optimizer steps of the whole run, not of an epoch
    # (_LoggerConnector.should_update_logs counts _batches_that_stepped), so epochs shorter than the
    # interval still log the training loss: nothing to act on
    r".*is smaller than the logging interval",
)


class _DropTips(logging.Filter):
    """Lightning's advertisement for its cloud logger, printed by every Trainer, and its note that the
    trainer keeps the project's ModelSummary (callbacks/model_summary.py) instead of adding its own."""

    _PREFIXES = ("💡 Tip:", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._PREFIXES)


def silence_known_noise() -> None:
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
