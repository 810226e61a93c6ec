"""CTR metrics: AUC (scikit-learn), GAUC as in the DIN paper, and logloss
(of probabilities, or exactly of logits).

scikit-learn is imported where it is used: it takes about a second to
import, which every din-fast command would otherwise pay, the ones that only
report a bad file included.
"""

from __future__ import annotations

import numpy as np


def auc(labels, scores) -> float:
    """Area under the ROC curve (scikit-learn's roc_auc_score).

    Args:
        labels: [N] array-like of 0/1 clicks.
        scores: [N] array-like of real scores, higher = more likely a click
            (logits or probabilities: only their order counts).

    Returns:
        The AUC, a float in [0, 1]; NaN with a warning where ``labels`` hold
        one class only (older scikit-learn raises ValueError).

    Raises:
        ValueError: from scikit-learn, for arrays of different lengths.
    """
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


def gauc(users, labels, scores) -> float:
    """Per-user AUC averaged with weights equal to each user's number of samples.

    Users whose samples are all of one class have no AUC and are skipped (their
    weight too). Ties in score count one half, as in roc_auc_score. Computed
    for all users at once: within each user, AUC is the Mann-Whitney statistic
    (sum of the positives' mid-ranks - P(P+1)/2) / (P N).

    Args:
        users: [N] array-like of user ids (any sortable dtype).
        labels: [N] array-like of clicks; a label above 0.5 is a positive.
        scores: [N] array-like of real scores (only their order counts).

    Returns:
        The GAUC, a float in [0, 1].

    Raises:
        ValueError: arrays that are not 1-D of one length, no samples, a NaN
            score or label, or no user with both a positive and a negative
            sample.
    """
    users, labels, scores = (np.asarray(a) for a in (users, labels, scores))
    if not (users.shape == labels.shape == scores.shape) or users.ndim != 1:
        raise ValueError("gauc: `users`, `labels` and `scores` must be 1-D of one length; got "
                         f"shapes {users.shape}, {labels.shape}, {scores.shape}")
    if users.size == 0:
        raise ValueError("gauc: no samples; GAUC is undefined")
    # A NaN equals no score, so each would rank as a tie of its own, last:
    # a number, not an error (auc's roc_auc_score raises for it).
    for name, values in (("scores", scores), ("labels", labels)):
        nan = np.flatnonzero(np.isnan(values.astype(np.float64)))
        if nan.size:
            raise ValueError(f"gauc: `{name}` holds {nan.size} NaN(s), the first at index "
                             f"{nan[0]}; expected numbers")
    order = np.lexsort((scores, users))
    users, labels, scores = users[order], labels[order] > 0.5, scores[order]
    n = len(users)
    # Mid-rank of each sample within its user: runs of equal (user, score)
    # share the mean of their 1-based positions inside the user's block.
    new_user = np.r_[True, users[1:] != users[:-1]]
    new_run = new_user | np.r_[True, scores[1:] != scores[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    run_id = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)
    run_last = np.r_[run_first[1:], n] - 1
    mid_rank = ((run_first + run_last) / 2)[run_id] - user_start + 1
    user_id = np.cumsum(new_user) - 1
    positives = np.bincount(user_id, weights=labels)
    counts = np.bincount(user_id)
    negatives = counts - positives
    rank_sum = np.bincount(user_id, weights=np.where(labels, mid_rank, 0.0))
    scored = (positives > 0) & (negatives > 0)
    if not scored.any():
        raise ValueError("gauc: every user has samples of one class only; GAUC is undefined")
    user_auc = ((rank_sum[scored] - positives[scored] * (positives[scored] + 1) / 2)
                / (positives[scored] * negatives[scored]))
    return float(np.average(user_auc, weights=counts[scored]))


def logloss(labels, probabilities) -> float:
    """Mean binary cross-entropy (scikit-learn's log_loss, labels 0 and 1).

    Args:
        labels: [N] array-like of 0/1 clicks.
        probabilities: [N] array-like of click probabilities in [0, 1]
            (computed in float64; 0 and 1 are clipped, so the loss is finite).

    Returns:
        The mean log loss, a float.

    Raises:
        ValueError: from scikit-learn, for a label other than 0 or 1, a
            probability outside [0, 1], or arrays of different lengths.
    """
    from sklearn.metrics import log_loss
    return float(log_loss(np.asarray(labels), np.asarray(probabilities, dtype=np.float64),
                          labels=[0, 1]))


def logloss_of_logits(labels, logits) -> float:
    """Mean binary cross-entropy of logits: log(1 + e^x) - y x, as the
    training loss (binary_cross_entropy_with_logits) computes it.

    :func:`logloss` of their sigmoid clips a probability of 0 or 1, which a
    logit beyond about 37 becomes in float64: a sample it gets wrong then
    costs 36 whatever its logit, and the mean understates the loss.

    Args:
        labels: [N] array-like of 0/1 clicks.
        logits: [N] array-like of real logits.

    Returns:
        The mean log loss, a float.

    Raises:
        ValueError: a label other than 0 or 1, or arrays of different shapes.
    """
    labels, logits = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
    if labels.shape != logits.shape:
        raise ValueError(f"logloss_of_logits: `labels` and `logits` must be of one shape; got "
                         f"{labels.shape} and {logits.shape}")
    other = np.flatnonzero((labels != 0) & (labels != 1))
    if other.size:
        raise ValueError(f"logloss_of_logits: `labels` holds {float(labels[other[0]])!r} at index "
                         f"{other[0]}; expected 0 or 1")
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def ctr_metrics(users, labels, logits) -> dict:
    """auc, gauc and logloss of a model's logits.

    Args:
        users: [N] array-like of user ids, for gauc.
        labels: [N] array-like of 0/1 clicks.
        logits: [N] array-like of the model's logits (before the sigmoid),
            logloss computed from them (:func:`logloss_of_logits`).

    Returns:
        ``{"auc": float, "gauc": float, "logloss": float}``.

    Raises:
        ValueError: as gauc and logloss_of_logits (arrays of different
            lengths, no user with both classes, a NaN score, labels other
            than 0 and 1).
    """
    logits = np.asarray(logits, dtype=np.float64)
    return {"auc": auc(labels, logits), "gauc": gauc(users, labels, logits),
            "logloss": logloss_of_logits(labels, logits)}
