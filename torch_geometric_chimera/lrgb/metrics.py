r"""The LRGB metrics, exactly as the benchmark defines them, in PyTorch (no scikit-learn needed).

- ``peptides-func``: average precision (AP) per task, averaged over the tasks that have both a
  positive and a negative label (NaN labels are ignored), as in LRGB's ``eval_ap``; AP is
  scikit-learn's step-wise definition :math:`\sum_n (R_n - R_{n-1}) P_n` over distinct thresholds.
- ``peptides-struct``: mean absolute error over every target of every graph.
- ``pascalvoc-sp`` / ``coco-sp``: macro F1 over the classes present in the labels or the
  predictions (scikit-learn's ``f1_score(average="macro")``), node predictions by arg max.
"""
import torch
from torch import Tensor


def binary_average_precision(target: Tensor, score: Tensor) -> Tensor:
    """AP of one binary task; ties in ``score`` share one threshold, as in scikit-learn."""
    order = torch.argsort(score, descending=True, stable=True)
    score, target = score[order], target[order].double()
    last_of_run = torch.cat([torch.nonzero(score[1:] != score[:-1]).flatten(),
                             torch.tensor([score.numel() - 1], device=score.device)])
    true_pos = target.cumsum(0)[last_of_run]
    precision = true_pos / (last_of_run + 1).double()
    recall = true_pos / true_pos[-1]
    recall_before = torch.cat([recall.new_zeros(1), recall[:-1]])
    return ((recall - recall_before) * precision).sum()


def average_precision(target: Tensor, score: Tensor) -> float:
    """Mean AP over the columns of ``[num_graphs, num_tasks]`` labels (0, 1 or NaN) and scores."""
    if target.shape != score.shape:
        raise ValueError(f"target: expected the shape of score {list(score.shape)}, got {list(target.shape)}")
    target, score = target.reshape(target.size(0), -1), score.reshape(score.size(0), -1)
    values = []
    for task in range(target.size(1)):
        labeled = ~torch.isnan(target[:, task])
        y = target[labeled, task]
        if (y == 1).any() and (y == 0).any():
            values.append(binary_average_precision(y, score[labeled, task]))
    if not values:
        raise ValueError("target: no task has both a positive and a negative label; AP is undefined")
    return torch.stack(values).mean().item()


def mean_absolute_error(target: Tensor, prediction: Tensor) -> float:
    if target.shape != prediction.shape:
        raise ValueError(f"target: expected the shape of prediction {list(prediction.shape)}, "
                         f"got {list(target.shape)}")
    return (prediction.double() - target.double()).abs().mean().item()


def macro_f1(target: Tensor, logits_or_labels: Tensor) -> float:
    """Macro F1 of integer labels ``[N]`` against class scores ``[N, C]`` (or predicted labels ``[N]``)."""
    predicted = logits_or_labels.argmax(-1) if logits_or_labels.dim() == 2 else logits_or_labels
    if predicted.shape != target.shape:
        raise ValueError(f"target: expected {list(predicted.shape)} labels, got {list(target.shape)}")
    classes = torch.unique(torch.cat([target, predicted]))
    hits = (target[:, None] == classes) & (predicted[:, None] == classes)
    true_pos = hits.sum(0).double()
    false_pos = (predicted[:, None] == classes).sum(0).double() - true_pos
    false_neg = (target[:, None] == classes).sum(0).double() - true_pos
    return (2 * true_pos / (2 * true_pos + false_pos + false_neg)).mean().item()
