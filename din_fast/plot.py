"""``din-fast train --plot FILE.png``: the run's curves per epoch.

Two panels: validation GAUC and AUC (the early-stopping criterion, the best
epoch marked), and the training loss at the end of each epoch (averaged over
its last ~50 batches) beside the validation logloss (where overfitting shows:
the one keeps falling while the other turns up).
matplotlib is an optional dependency (``pip install din-fast[plot]``).
"""

from __future__ import annotations

from .errors import InputError


def check_matplotlib() -> None:
    """InputError now, before training, when --plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib (or "
                         "din-fast[plot])") from None


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
    figure.savefig(path, dpi=100)
    plt.close(figure)
