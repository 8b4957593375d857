"""method='line': chunked SSD-style exact resolvent on unions of directed paths."""
import pytest
import torch
from graphs import inputs

from torch_geometric_chimera.ops import GraphTopology, choose_method, resolvent_attention
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention
from torch_geometric_chimera.utils import line_graph_dags


def sequences(lengths, shuffle=True):
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    forward, backward = line_graph_dags(batch.numel(), batch)
    if shuffle:  # node ids no longer follow the sequence order
        relabel = torch.argsort(torch.randperm(batch.numel()))
        forward, backward = relabel[forward], relabel[backward]
        batch = batch[torch.argsort(relabel)]
    return forward, backward, batch


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 500])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_line_matches_inverse_in_values_and_gradients(chunk_size, direction, device):
    forward, backward, batch = sequences([40, 1, 73, 9])
    edge_index = (forward if direction == "forward" else backward).to(device)
    n = batch.numel()
    q, k, v, w = inputs(n, edge_index.size(1), device=device, scale=1.0)
    w = (2 * w - 1)  # weights of both signs, and exact zeros, are allowed
    w[5] = 0
    w.requires_grad_()
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = resolvent_attention(q, k, v, edge_index, w, method="line", chunk_size=chunk_size)
    expected = inverse_resolvent_attention(q, k, v, edge_index, w)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-11)
    cot = torch.randn(out.shape, dtype=out.dtype, device=device)
    got = torch.autograd.grad((out * cot).sum(), (q, k, v, w))
    want = torch.autograd.grad((expected * cot).sum(), (q, k, v, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_line_agrees_with_dag_and_dense_and_sums_both_directions():
    forward, backward, batch = sequences([100, 30])
    n = batch.numel()
    q, k, v, w = inputs(n, forward.size(1), scale=0.9)
    total = 0
    for edge_index in (forward, backward):
        line = resolvent_attention(q, k, v, edge_index, w, method="line", chunk_size=16)
        torch.testing.assert_close(line, resolvent_attention(q, k, v, edge_index, w, method="dag"))
        torch.testing.assert_close(line, resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch))
        total = total + line
    # The 2-DAG decomposition of the undirected line: both resolvents summed (paper Fig. 2).
    both = inverse_resolvent_attention(q, k, v, forward, w) + inverse_resolvent_attention(q, k, v, backward, w)
    torch.testing.assert_close(total, both)


def test_gradcheck_line():
    forward, _, _ = sequences([7, 4])
    q, k, v, w = inputs(11, forward.size(1), heads=1, state=2, head_dim=2, scale=0.9, requires_grad=True)
    fn = lambda q, k, v, w: resolvent_attention(q, k, v, forward, w, method="line", chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_auto_uses_line_for_sequences_and_rejects_other_graphs_for_line():
    forward, _, batch = sequences([300, 20])
    assert choose_method(GraphTopology(forward, batch.numel(), batch)) == "line"
    branching = torch.tensor([[0, 0], [1, 2]])
    assert choose_method(GraphTopology(branching, 3)) == "dense"
    q, k, v, w = inputs(3, 2)
    with pytest.raises(ValueError, match="edge_index: method='line' needs a union of directed paths"):
        resolvent_attention(q, k, v, branching, w, method="line")
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        resolvent_attention(q, k, v, branching, w, method="line", chunk_size=0)
