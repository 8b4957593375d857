"""The squaring trick (paper Eq. 27), the reference of the batched GPU path: against the inverse
and the explicit Neumann sum, in values and gradients."""
import pytest
import torch

from torch_geometric_chimera.nn.adjacency import general_adjacency
from torch_geometric_chimera.ops.squaring import squarings_for_depth
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention, squaring_resolvent
from torch_geometric_chimera.utils import topological_levels


def dense(edge_index, weight, n):
    adj = torch.zeros(weight.size(1), n, n, dtype=weight.dtype)
    heads = torch.arange(weight.size(1)).view(-1, 1)
    return adj.index_put((heads, edge_index[1].view(1, -1), edge_index[0].view(1, -1)), weight.t(), accumulate=True)


def random_dag(n, edges, generator):
    src = torch.randint(0, n, (edges,), generator=generator)
    dst = torch.randint(0, n, (edges,), generator=generator)
    keep = src < dst  # forward in node order: acyclic
    return torch.stack([src[keep], dst[keep]])


@pytest.mark.parametrize("seed", range(5))
def test_exact_on_a_dag_after_the_squarings_its_depth_needs(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 40
    edge_index = random_dag(n, 120, generator)
    depth = int(topological_levels(edge_index, n).max())
    weight = torch.randn(edge_index.size(1), 2, generator=generator, dtype=torch.float64)
    adj = dense(edge_index, weight, n)
    k = squarings_for_depth(depth)
    assert 2 ** k >= depth + 1 and (k == 1 or 2 ** (k - 1) < depth + 1)
    exact = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - adj)
    torch.testing.assert_close(squaring_resolvent(adj, k), exact)
    if 2 ** (k - 1) < depth + 1 and k > 1:  # one squaring fewer misses the longest path
        assert not torch.allclose(squaring_resolvent(adj, k - 1), exact)


@pytest.mark.parametrize("num_squarings", [1, 2, 3, 5])
def test_error_bound_under_the_general_normalization(num_squarings):
    generator = torch.Generator().manual_seed(num_squarings)
    n, gamma = 30, 0.9
    src, dst = torch.randint(0, n, (2, 150), generator=generator)
    edge_index = torch.stack([src, dst])
    delta = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    weight, _ = general_adjacency(delta, edge_index, torch.zeros_like(delta), gamma)
    adj = dense(edge_index, weight, n)
    exact = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - adj)
    error = (squaring_resolvent(adj, num_squarings) - exact).abs().sum(-1).amax()
    assert float(error) <= gamma ** (2 ** num_squarings) / (1 - gamma)
    assert float(error) > 0  # a cyclic graph: truncated, not exact


def test_values_and_gradients_equal_the_explicit_neumann_sum():
    generator = torch.Generator().manual_seed(0)
    n, heads, k = 12, 2, 3
    src, dst = torch.randint(0, n, (2, 40), generator=generator)
    edge_index = torch.stack([src, dst])
    weight = (0.2 * torch.rand(edge_index.size(1), heads, generator=generator, dtype=torch.float64)).requires_grad_()
    q, key = (torch.randn(n, heads, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(n, heads, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    resolvent = squaring_resolvent(dense(edge_index, weight, n), k)
    scores = torch.einsum("ihs,jhs->hij", q, key)
    y = torch.einsum("hij,jhp->ihp", resolvent * scores, v)
    expected = inverse_resolvent_attention(q, key, v, edge_index, weight, num_terms=2 ** k - 1)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (weight, q, key, v), grad),
                    torch.autograd.grad(expected, (weight, q, key, v), grad)):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda w: squaring_resolvent(dense(edge_index, w, n), 2), (weight,))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="num_squarings: expected a positive int"):
        squaring_resolvent(torch.zeros(1, 3, 3), 0)
    with pytest.raises(ValueError, match="depth: expected a non-negative int"):
        squarings_for_depth(-1)
    assert [squarings_for_depth(d) for d in (0, 1, 2, 3, 4, 7, 8)] == [1, 1, 2, 2, 3, 3, 4]
