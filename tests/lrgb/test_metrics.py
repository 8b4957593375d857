"""LRGB's metrics against their textbook definitions (and scikit-learn when it is installed)."""
import itertools

import pytest
import torch

from torch_geometric_chimera.lrgb import average_precision, macro_f1, mean_absolute_error
from torch_geometric_chimera.lrgb.metrics import binary_average_precision


def ap_by_definition(target, score):
    """AP = sum over distinct thresholds t (descending) of (R(t) - R(previous t)) * P(t)."""
    total, previous_recall = 0.0, 0.0
    positives = float(target.sum())
    for threshold in sorted(set(score.tolist()), reverse=True):
        selected = score >= threshold
        tp = float((target[selected] == 1).sum())
        precision, recall = tp / float(selected.sum()), tp / positives
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


@pytest.mark.parametrize("ties", [False, True])
def test_binary_ap_matches_its_definition(ties):
    for trial in range(20):
        n = 30
        target = (torch.rand(n) < 0.4).double()
        target[0], target[1] = 1.0, 0.0
        score = torch.randint(0, 5, (n,)).double() if ties else torch.randn(n, dtype=torch.float64)
        assert binary_average_precision(target, score).item() == pytest.approx(ap_by_definition(target, score))


def test_ap_examples_and_task_averaging_ignore_nan_and_one_class_tasks():
    assert binary_average_precision(torch.tensor([1., 0.]), torch.tensor([0.9, 0.1])).item() == 1.0
    # scikit-learn's documented example: average_precision_score([0, 0, 1, 1], [.1, .4, .35, .8]) = 0.8333
    value = binary_average_precision(torch.tensor([0., 0., 1., 1.]), torch.tensor([.1, .4, .35, .8]))
    assert value.item() == pytest.approx(0.8333333333)
    target = torch.tensor([[0., 1., 1.], [1., 1., float("nan")], [1., 1., 0.], [0., 1., 1.]])
    score = torch.rand(4, 3)
    expected = (ap_by_definition(target[:, 0], score[:, 0])
                + ap_by_definition(target[[0, 2, 3], 2], score[[0, 2, 3], 2])) / 2  # task 1 is all positive
    assert average_precision(target, score) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no task has both a positive and a negative label"):
        average_precision(torch.ones(3, 2), torch.rand(3, 2))
    with pytest.raises(ValueError, match="target: expected the shape of score"):
        average_precision(torch.ones(3, 2), torch.rand(3, 3))


def test_macro_f1_matches_its_definition():
    target = torch.randint(0, 6, (200,))
    logits = torch.randn(200, 8)  # classes 6 and 7 can only be predicted, never true
    predicted = logits.argmax(-1)
    classes = sorted(set(target.tolist()) | set(predicted.tolist()))
    f1s = []
    for c in classes:
        tp = sum(1 for t, p in zip(target.tolist(), predicted.tolist()) if t == c and p == c)
        fp = sum(1 for t, p in zip(target.tolist(), predicted.tolist()) if t != c and p == c)
        fn = sum(1 for t, p in zip(target.tolist(), predicted.tolist()) if t == c and p != c)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert macro_f1(target, logits) == pytest.approx(sum(f1s) / len(f1s))
    assert macro_f1(target, target) == 1.0
    assert macro_f1(torch.tensor([0, 0]), torch.tensor([1, 1])) == 0.0


def test_mae():
    assert mean_absolute_error(torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([[1., 0.], [3., 5.]])) == 0.75


def test_against_scikit_learn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    for target, score in itertools.product([torch.randint(0, 2, (50,)).double()], [torch.randn(50).double(),
                                                                                    torch.randint(0, 4, (50,)).double()]):
        target[0], target[1] = 0, 1
        assert binary_average_precision(target, score).item() == pytest.approx(
            metrics.average_precision_score(target.numpy(), score.numpy()))
    target, logits = torch.randint(0, 5, (100,)), torch.randn(100, 6)
    assert macro_f1(target, logits) == pytest.approx(
        metrics.f1_score(target.numpy(), logits.argmax(-1).numpy(), average="macro"))
