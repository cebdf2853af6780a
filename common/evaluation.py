"""Loss, accuracy and macro-F1 of a classifier on a tokenised data set (client and server)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or prediction."""
    scores = []
    for c in range(num_labels):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TensorDataset,
    num_labels: int,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    losses, preds, truth = [], [], []
    for ids, mask, labels in DataLoader(data, batch_size=batch_size):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        losses.append(
            torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item()
        )
        preds.append(logits.argmax(-1).cpu().numpy())
        truth.append(labels.numpy())
    model.train(was_training)
    y_pred, y_true = np.concatenate(preds), np.concatenate(truth)
    return {
        "loss": sum(losses) / len(y_true),
        "accuracy": float(np.mean(y_pred == y_true)),
        "macro-f1": macro_f1(y_true, y_pred, num_labels),
        "num-examples": len(y_true),
    }
