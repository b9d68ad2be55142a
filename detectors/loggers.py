"""A CSV logger that continues a run's metrics.csv when the run is resumed.

Lightning's CSVLogger deletes an existing metrics.csv when it starts; a resumed run (see
``detectors.tasks.train``) writes into the run folder it resumes, so it would wipe the history of
the epochs before the interruption. This one keeps the rows up to the checkpoint and appends.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv: rows with ``step < purge_step`` stay (all of them when
    ``purge_step`` is None), the rest are dropped, as TensorBoard's ``purge_step`` drops events that a
    killed run logged after its last checkpoint, and new rows are appended under the same header."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.purge_step = purge_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if self.purge_step is None or not r.get("step")
                    or float(r["step"]) < self.purge_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # new keys later rewrite the header, old rows keep their columns


class CSVLogger(LightningCSVLogger):
    """``lightning``'s CSVLogger, continuing an existing metrics.csv instead of deleting it.

    Args:
        purge_step: on resume, the first step the resumed run logs again (the checkpoint's global step
            + 1); rows the interrupted run logged from that step on are dropped. None keeps all rows.
        Others as ``lightning.pytorch.loggers.CSVLogger``.
    """

    def __init__(self, *args, purge_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.purge_step = purge_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir, purge_step=self.purge_step)
        return self._experiment
