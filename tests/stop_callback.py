"""A callback for tests: end a run after some epochs, as an interruption would, without changing
max_epochs (which would change the learning-rate schedule)."""

import lightning as L


class StopAfterEpochs(L.Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
