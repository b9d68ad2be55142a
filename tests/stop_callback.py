"""A callback for tests: end a run after some epochs, as an interruption would, without changing
max_epochs (which would change the learning-rate schedule)."""

import lightning as L


class StopAfterEpochs(L.Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class KillAtStep(L.Callback):
    """SIGKILL the process when a batch starts after ``step`` optimizer steps: a hard kill in the middle
    of an epoch, after the checkpoint callbacks of the previous batch have run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
