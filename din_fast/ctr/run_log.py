"""``din-fast train --log-dir DIR``: the epochs' metrics as a CSV, for watching curves.

``DIR/metrics.csv`` holds one row per finished epoch (:data:`COLUMNS`),
rewritten whole after every epoch through din_fast.ctr.files, so a reader (a
spreadsheet, pandas, gnuplot, ``tail``) never sees half a row; a resumed run
writes every epoch since the first. The directory is created when missing, by
the first write: a command refused before an epoch ended leaves nothing
behind (din_fast.ctr.files.check_output_directory tells beforehand that it
can be).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import OutputError
from .files import open_replacing

FILE_NAME = "metrics.csv"
COLUMNS = ("epoch", "train_loss", "validation_auc", "validation_gauc", "validation_logloss",
           "lr", "epoch_seconds", "samples_per_second")


class EpochLog:
    """The metrics.csv of a --log-dir directory (created where missing, as
    the first epoch's row is written)."""

    def __init__(self, directory):
        self.directory = directory
        self.path = self.path_in(directory)

    @staticmethod
    def path_in(directory) -> str:
        """The CSV's path in ``directory`` (nothing is created)."""
        return str(Path(directory) / FILE_NAME)

    def write(self, epochs: list) -> None:
        """The records of the finished epochs (fit_learner's), one row each."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:
            raise OutputError(f"--log-dir {self.directory}: cannot be created as a directory "
                              f"({error.strerror or type(error).__name__})") from None
        with open_replacing(self.path, "--log-dir's metrics.csv", newline="",
                            encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(COLUMNS)
            for record in epochs:
                writer.writerow([f"{record[c]:.6g}" if isinstance(record[c], float)
                                 else record[c] for c in COLUMNS])
