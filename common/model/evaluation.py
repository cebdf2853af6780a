"""Scores of a classifier on a tokenised data set, all from one confusion matrix (client and
server). A client releases only a noised matrix (:func:`noised_confusion`); the server turns
the sum of those into accuracy and macro-F1 with :func:`scores`, which is post-processing."""

from __future__ import annotations

import numpy as np
import torch
from privatune.common.model.causal_lm import class_scores
from privatune.common.model.heads import head_of
from torch.utils.data import DataLoader, TensorDataset


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts: rows are true labels, columns predictions."""
    matrix = np.zeros((num_labels, num_labels))
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each class of a confusion matrix (0 where a
    class is neither true nor predicted); noised cells below zero count as zero."""
    m = np.clip(np.asarray(matrix, dtype=float), 0, None)
    tp = np.diag(m)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(tp), where=den > 0)

    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "support": m.sum(1),
        "present": (tp + fp + fn) > 0,
    }


def scores(matrix: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-class F1 over the classes present in
    truth or prediction) of a confusion matrix; noised cells below zero count as zero."""
    m = np.clip(np.asarray(matrix, dtype=float), 0, None)
    total = m.sum()
    c = per_class(m)
    return {
        "accuracy": float(np.trace(m) / total) if total > 0 else 0.0,
        "macro-f1": float(c["f1"][c["present"]].mean()) if c["present"].any() else 0.0,
    }


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion (95% by default): the interval a reported
    test accuracy carries, which matters on test sets of a few hundred questions."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def best_constant(y_true: np.ndarray, num_labels: int) -> tuple[int, float]:
    """The most frequent true label and the accuracy of always answering it: the baseline a
    model must beat before it has learned anything from the questions."""
    counts = np.bincount(y_true, minlength=num_labels)
    return int(counts.argmax()), float(counts.max() / len(y_true))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    return scores(confusion(y_true, y_pred, num_labels))["macro-f1"]


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 64
) -> tuple[float, np.ndarray, np.ndarray]:
    """(summed loss, predictions, truth) of the model on every row: tokenised rows, or
    pooled embeddings (:func:`common.model.features.embed`) that only the head needs to see,
    or the frozen lower layers' output (hidden states, mask), for which ``model`` is the
    :class:`common.model.top_layers.TopLayers` above them."""
    was_training = model.training
    model.eval()
    head = head_of(model) if len(data.tensors) == 2 else None
    loss, preds, truth = 0.0, [], []
    for *inputs, labels in DataLoader(data, batch_size=batch_size):
        if head is not None:
            logits = head(inputs[0].to(device)).float()
        elif inputs[0].is_floating_point():  # the lower layers' output: the top layers' input
            logits = model(*(x.to(device) for x in inputs)).float()
        else:
            ids, mask = (x.to(device) for x in inputs)
            logits = class_scores(model, ids, mask).float()
        loss += torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item()
        preds.append(logits.argmax(-1).cpu().numpy())
        truth.append(labels.numpy())
    model.train(was_training)
    return loss, np.concatenate(preds), np.concatenate(truth)


@torch.no_grad()
def probabilities(
    model: torch.nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Rows x labels: each tokenised row's probability of each label (the softmax of the
    class scores; for a causal LM, over its answers' likelihoods), for ``privatune predict``."""
    model.eval()
    out = []
    for ids, mask, _ in DataLoader(data, batch_size=batch_size):
        scores = class_scores(model, ids.to(device), mask.to(device)).float()
        out.append(torch.softmax(scores, -1).cpu().numpy())
    return np.concatenate(out)


def evaluate(
    model: torch.nn.Module,
    data: TensorDataset,
    num_labels: int,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact loss, accuracy and macro-F1: for data the caller may see (the central test set)."""
    return evaluate_matrix(model, data, num_labels, device, batch_size)[0]


def evaluate_matrix(
    model: torch.nn.Module,
    data: TensorDataset,
    num_labels: int,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`evaluate` and the confusion matrix it came from (per-class scores)."""
    loss, y_pred, y_true = predict(model, data, device, batch_size)
    matrix = confusion(y_true, y_pred, num_labels)
    return {"loss": loss / len(y_true), **scores(matrix), "num-examples": len(y_true)}, matrix


def noised_confusion(
    model: torch.nn.Module,
    data: TensorDataset | None,
    num_labels: int,
    device: torch.device,
    noise_multiplier: float,
    generator: torch.Generator,
) -> np.ndarray:
    """The confusion matrix plus Gaussian noise of std ``noise_multiplier`` on every cell:
    one record moves one cell by one (L2 sensitivity 1), so this is the Gaussian mechanism
    that :func:`common.privacy.accounting.count_release` accounts. ``data`` None: no rows,
    noise only."""
    matrix = np.zeros((num_labels, num_labels))
    if data is not None:
        _, y_pred, y_true = predict(model, data, device)
        matrix = confusion(y_true, y_pred, num_labels)
    noise = torch.normal(0.0, noise_multiplier, matrix.shape, generator=generator)
    return matrix + noise.double().numpy()
