"""Binary-classification metrics of a CTR model: AUC, log loss, normalized entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, log loss, normalized entropy (NE) and base rates of predictions.

    NE is the log loss divided by the entropy of the empirical positive rate (He et al., 2014):
    1.0 means no better than always predicting the base rate.

    Args:
        logits: (N,) raw model outputs.
        labels: (N,) 0/1 labels.
    """
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
