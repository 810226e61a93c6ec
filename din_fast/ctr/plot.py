"""``din-fast train --plot FILE.png``: the run's curves per epoch.

Two panels: validation GAUC and AUC (the early-stopping criterion, the best
epoch marked), and the training loss at the end of each epoch (averaged over
its last ~50 batches) beside the validation logloss (where overfitting shows:
the one keeps falling while the other turns up).
matplotlib is an optional dependency (din_fast's ``plot`` extra).
"""

from __future__ import annotations

import io
from pathlib import Path

from .errors import InputError
from .files import replacing


def check_plot_path(path) -> None:
    """InputError now, before training, when --plot cannot be drawn: no
    matplotlib, or a format (the name's suffix) it does not write here. A
    figure holding one word is drawn in that format, in memory, to find out
    (some formats need more than matplotlib: .pgf lays its text out with LaTeX)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
        from matplotlib.figure import Figure
    except ImportError:
        # din-fast is not on PyPI: the extra installs from a checkout only.
        raise InputError("--plot needs matplotlib, which is not installed: pip install "
                         "matplotlib (in a din_fast checkout: pip install -e '.[plot]')") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if plot_format(path) not in formats:
        raise InputError(f"--plot {path}: expected a name ending in a format matplotlib "
                         f"writes, one of {' '.join('.' + f for f in sorted(formats))}")
    try:
        probe = Figure()
        probe.text(0.5, 0.5, "probe")
        probe.savefig(io.BytesIO(), format=plot_format(path))
    except Exception as error:  # noqa: BLE001 - each format's writer fails its own way
        raise InputError(f"--plot {path}: matplotlib cannot write {Path(path).suffix} here "
                         f"({type(error).__name__}); .png needs nothing else") from None


def plot_format(path) -> str:
    """The format of a --plot file: its suffix, as matplotlib names formats."""
    return Path(path).suffix[1:].lower()


def plot_training(metrics: dict, path: str) -> None:
    """Draw ``train``'s metrics (per-epoch records under ``epochs``) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")                  # files only: no display needed
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in metrics["epochs"]]
    series = lambda key: [e[key] for e in metrics["epochs"]]
    best = metrics["best_epoch"]
    config = metrics["config"]
    figure, (ranking, losses) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ranking.plot(epochs, series("validation_gauc"), "o-", label="validation GAUC")
    ranking.plot(epochs, series("validation_auc"), "s--", label="validation AUC")
    ranking.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best})")
    ranking.set(xlabel="epoch", ylabel="AUC", title="Validation ranking")
    losses.plot(epochs, series("train_loss"), "o-", label="training loss (last ~50 batches)")
    losses.plot(epochs, series("validation_logloss"), "s--", label="validation logloss")
    losses.axvline(best, color="grey", linestyle=":")
    losses.set(xlabel="epoch", ylabel="logloss", title="Loss")
    for axes in (ranking, losses):
        axes.grid(alpha=0.3)
        axes.legend()
        axes.set_xticks(epochs)
    figure.suptitle(f"{metrics['model']} on {config['data'] or 'synthetic data'}: test GAUC "
                    f"{metrics['test_gauc']:.4f} at epoch {best} ({metrics['stopped']})",
                    fontsize=9)
    try:
        with replacing(path, "--plot") as temporary:
            figure.savefig(temporary, dpi=100, format=plot_format(path))
    finally:
        plt.close(figure)
