"""Binary-classification metrics of a CTR model: AUC, log loss, normalized entropy; weighted by
per-sample weights when given (``data.weight``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def binary_metrics(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> dict[str, float]:
    """AUC, log loss, normalized entropy (NE) and base rates of predictions.

    NE is the log loss divided by the entropy of the empirical positive rate (He et al., 2014):
    1.0 means no better than always predicting the base rate.

    With ``weights`` every metric is weighted (:func:`weighted_binary_metrics`).

    Args:
        logits: (N,) raw model outputs.
        labels: (N,) 0/1 labels.
        weights: (N,) non-negative sample weights, or None (unweighted).
    """
    if weights is not None:
        return weighted_binary_metrics(logits, labels, weights)
    logits = logits.detach().double().flatten()
    labels = labels.detach().double().flatten()
    n = labels.numel()
    if n == 0:
        return {"rows": 0}
    log_loss = F.binary_cross_entropy_with_logits(logits, labels).item()
    p = labels.mean().item()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else float("nan")
    has_both = 0 < p < 1
    auc = binary_auroc(logits, labels.long()).item() if has_both else float("nan")
    return {
        "rows": n,
        "auc": auc,
        "log_loss": log_loss,
        "ne": log_loss / entropy if has_both else float("nan"),
        "positive_rate": p,
        "mean_prediction": torch.sigmoid(logits).mean().item(),
    }


def weighted_auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative, each (positive,
    negative) pair counted with weight ``w_pos * w_neg`` and a tie counted half (the weighted
    Mann-Whitney statistic; with all weights 1 the usual AUC).

    Computed from weighted ranks: rows sorted by score, tied scores grouped; a positive of group
    g gains the negative weight of the groups below g plus half of g's own.
    """
    order = torch.argsort(scores)
    s, y, w = scores[order], labels[order], weights[order]
    _, group = torch.unique_consecutive(s, return_inverse=True)
    groups = int(group.max()) + 1 if group.numel() else 0
    pos = torch.zeros(groups, dtype=w.dtype).index_add_(0, group, w * y)
    neg = torch.zeros(groups, dtype=w.dtype).index_add_(0, group, w * (1 - y))
    below = torch.cumsum(neg, 0) - neg
    pairs = pos.sum() * neg.sum()
    return float((pos * (below + 0.5 * neg)).sum() / pairs) if pairs > 0 else float("nan")


def weighted_binary_metrics(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> dict[str, float]:
    """:func:`binary_metrics` with sample weights w (float64): log loss ``sum(w * l) / sum(w)``,
    positive rate and mean prediction weighted the same way, NE over the entropy of the
    weighted positive rate, :func:`weighted_auc`; ``rows`` counts rows, ``weight_sum`` sums w."""
    logits = logits.detach().double().flatten()
    labels = labels.detach().double().flatten()
    w = weights.detach().double().flatten()
    n = labels.numel()
    total = w.sum().item()
    if n == 0:
        return {"rows": 0, "weight_sum": 0.0}
    if total <= 0:  # every weight 0: no metric is defined
        nan = float("nan")
        keys = ("auc", "log_loss", "ne", "positive_rate", "mean_prediction")
        return {"rows": n, "weight_sum": total, **dict.fromkeys(keys, nan)}
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    log_loss = (w * losses).sum().item() / total
    p = (w * labels).sum().item() / total
    has_both = 0 < p < 1
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if has_both else float("nan")
    return {
        "rows": n,
        "weight_sum": total,
        "auc": weighted_auc(logits, labels, w) if has_both else float("nan"),
        "log_loss": log_loss,
        "ne": log_loss / entropy if has_both else float("nan"),
        "positive_rate": p,
        "mean_prediction": (w * torch.sigmoid(logits)).sum().item() / total,
    }
