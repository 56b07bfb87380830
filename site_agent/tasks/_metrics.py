"""Aggregate classification metrics: accuracy, macro-F1 and, for binary tasks, AUROC."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def classification_metrics(
    *,
    total_loss: float,
    targets: Sequence[int],
    predictions: Sequence[int],
    positive_scores: Sequence[float] | None,
    num_labels: int,
) -> dict[str, float]:
    """The metrics every classification task reports.

    Args:
        total_loss: Summed loss over the examples.
        targets: True label indices.
        predictions: Predicted label indices.
        positive_scores: For binary tasks, a score for label 1 per example (any monotone score:
            a logit or a probability); None otherwise.
        num_labels: Size of the label set.

    Returns:
        ``loss`` (mean), ``accuracy``, ``macro_f1``, ``examples`` and, for binary tasks whose
        targets hold both labels, ``auroc`` (left out when it is undefined: every reported
        metric is finite).
    """
    count = len(targets)
    metrics = {
        "loss": total_loss / count,
        "accuracy": sum(1 for t, p in zip(targets, predictions, strict=True) if t == p) / count,
        "macro_f1": macro_f1(targets, predictions, num_labels),
        "examples": float(count),
    }
    if positive_scores is not None:
        score = auroc(targets, positive_scores)
        if score is not None:
            metrics["auroc"] = score
    return metrics


def macro_f1(targets: Sequence[int], predictions: Sequence[int], num_labels: int) -> float:
    """Mean F1 over the labels that occur in the targets or the predictions."""
    scores: list[float] = []
    for label in range(num_labels):
        true_positive = false_positive = false_negative = 0
        for target, predicted in zip(targets, predictions, strict=True):
            if predicted == label and target == label:
                true_positive += 1
            elif predicted == label:
                false_positive += 1
            elif target == label:
                false_negative += 1
        denominator = 2 * true_positive + false_positive + false_negative
        if denominator:
            scores.append(2 * true_positive / denominator)
    return sum(scores) / len(scores) if scores else 0.0


def auroc(targets: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve for label 1 (Mann-Whitney U with average ranks for ties).

    Returns:
        The AUROC, or None when the targets hold only one class.
    """
    positives = sum(1 for t in targets if t == 1)
    negatives = len(targets) - positives
    if positives == 0 or negatives == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1  # 1-based ranks, ties share their mean
        for position in range(start, end + 1):
            ranks[order[position]] = average_rank
        start = end + 1
    positive_rank_sum = sum(rank for rank, t in zip(ranks, targets, strict=True) if t == 1)
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# Metric keys that count things: summed when metrics are pooled, never averaged.
COUNT_KEYS = ("examples", "tokens", "train_examples", "train_steps")


def pool_metrics(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combines metrics of disjoint sets of examples (folds, sites) into one set's metrics.

    Counts (``COUNT_KEYS``: examples, tokens, train examples and steps) are summed; every other
    metric is the mean weighted by ``tokens`` when every entry has them (token-level losses),
    else by ``examples``, over the entries that report it. For accuracy and mean loss that is
    exactly the metric of the union; for macro-F1 and AUROC it is a weighted mean.
    ``perplexity`` is recomputed from the loss.

    Raises:
        ValueError: If ``metrics`` is empty or an entry lacks the weighting count.
    """
    if not metrics:
        raise ValueError("no metrics to pool")
    weight_key = "tokens" if all("tokens" in m for m in metrics) else "examples"
    if any(weight_key not in m for m in metrics):
        raise ValueError(f"every entry needs {weight_key!r} to pool metrics")
    pooled: dict[str, float] = {}
    for key in sorted({key for m in metrics for key in m}):
        present = [m for m in metrics if key in m]
        if key in COUNT_KEYS:
            pooled[key] = sum(m[key] for m in present)
        else:
            total = sum(m[weight_key] for m in present)
            pooled[key] = sum(m[key] * m[weight_key] for m in present) / total
    if "perplexity" in pooled and "loss" in pooled:
        pooled["perplexity"] = math.exp(pooled["loss"])
    return pooled
