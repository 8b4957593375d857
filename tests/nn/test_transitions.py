"""Signed transitions (``ChimeraConv(transitions="signed")``, issue 18): weights 2 exp(-x) - 1 in (-1, 1].

Every method must equal the dense float64 inverse with signed weights, the default must stay the
positive layer bit for bit, and every bound that a solver relies on must be taken on |A|.
"""
import pytest
import torch
from graphs import random_dag, random_graph
from torch_geometric.utils import to_undirected

from torch_geometric_chimera.nn import ChimeraConv
from torch_geometric_chimera.nn.adjacency import transition
from torch_geometric_chimera.ops import resolvent_attention
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention

#: (adjacency, graph, the methods exact on it). Neumann is exact on DAGs (its default is each graph's
#: depth); "line" needs directed paths.
CASES = [
    ("general", "cyclic", ["auto", "dense", "squaring", "band", "iterative"]),
    ("general", "dag", ["auto", "dense", "squaring", "band", "dag", "iterative", "neumann"]),
    ("dag", "dag", ["auto", "dense", "squaring", "band", "dag", "iterative", "neumann"]),
    ("mamba2", "path", ["auto", "dense", "squaring", "band", "dag", "line", "iterative", "neumann"]),
    ("undirected_line", "undirected path", ["auto", "dense", "band", "iterative"]),
]


def graph(kind, num_nodes=12):
    torch.manual_seed(1)
    if kind == "cyclic":
        return to_undirected(random_graph(num_nodes, 2 * num_nodes), num_nodes=num_nodes)
    if kind == "dag":
        return random_dag(num_nodes, 2 * num_nodes)
    path = torch.stack([torch.arange(num_nodes - 1), torch.arange(1, num_nodes)])
    return path if kind == "path" else to_undirected(path)


def layer(adjacency, transitions="signed", method="dense", **kwargs):
    torch.manual_seed(0)
    conv = ChimeraConv(8, heads=2, state_dim=3, expand=1, adjacency=adjacency, method=method,
                       transitions=transitions, **kwargs).double()
    with torch.no_grad():  # Delta spread over [0.05, 4]: transitions of both signs, down to -0.96
        conv.dt_bias.copy_(torch.tensor([0.5, 2.5], dtype=torch.float64))
    return conv


def signed_problem(adjacency, kind):
    """(query, key, value, edge_index, edge_weight) as the signed layer builds them, leaves with gradients."""
    conv = layer(adjacency)
    edge_index = graph(kind)
    num_nodes = int(edge_index.max()) + 1
    torch.manual_seed(2)
    delta = (torch.rand(num_nodes, 2, dtype=torch.float64) * 4 + 0.05).requires_grad_()
    psi = torch.randn(num_nodes, 2, dtype=torch.float64, requires_grad=True)
    weight, key_scale = conv.selective_adjacency(delta, edge_index, psi)
    q, k, v = (torch.randn(num_nodes, 2, d, dtype=torch.float64, requires_grad=True) for d in (3, 3, 4))
    leaves = (q, k, v, delta) + ((psi,) if adjacency == "general" else ())  # only "general" reads psi
    return (q, k * key_scale.unsqueeze(-1), v, edge_index, weight), leaves


@pytest.mark.parametrize("adjacency, kind, methods", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_signed_weights_have_both_signs_and_every_method_equals_the_dense_inverse(adjacency, kind, methods):
    (q, k, v, edge_index, weight), leaves = signed_problem(adjacency, kind)
    assert bool((weight < -0.05).any()) and bool((weight > 0.05).any())  # really signed, not a positive test
    expected = inverse_resolvent_attention(q, k, v, edge_index, weight)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, leaves, grad, retain_graph=True)
    for method in methods:
        out = resolvent_attention(q, k, v, edge_index, weight, method=method)
        torch.testing.assert_close(out, expected, msg=lambda m, method=method: f"{method}: {m}")
        got = torch.autograd.grad(out, leaves, grad, retain_graph=True)
        for name, a, b in zip(["query", "key", "value", "delta", "psi"], got, want):
            torch.testing.assert_close(a, b, msg=lambda m, method=method, name=name: f"{method}, {name}: {m}")


@pytest.mark.parametrize("adjacency, kind, methods", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_signed_layer_gives_the_same_output_with_every_method(adjacency, kind, methods):
    edge_index = graph(kind)
    x = torch.randn(int(edge_index.max()) + 1, 8, dtype=torch.float64)
    expected = layer(adjacency, method="dense")(x, edge_index)
    for method in methods:
        torch.testing.assert_close(layer(adjacency, method=method)(x, edge_index), expected,
                                   msg=lambda m, method=method: f"{method}: {m}")


@pytest.mark.parametrize("adjacency, kind", [("general", "cyclic"), ("dag", "dag"), ("mamba2", "path")])
def test_signed_layer_gradcheck(adjacency, kind):
    conv = ChimeraConv(4, heads=2, state_dim=2, expand=1, adjacency=adjacency, transitions="signed").double()
    with torch.no_grad():
        conv.dt_bias.copy_(torch.tensor([0.5, 2.5], dtype=torch.float64))
    edge_index = graph(kind, num_nodes=6)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: conv(x, edge_index), (x,))


# --- the default is today's layer, bit for bit -------------------------------------------------------

def positive_weights_as_before(adjacency, delta, edge_index, psi, gamma=0.9):
    """The positive adjacencies written out with exp(-x), in the operation order of the layer before the
    option existed: the default must reproduce them exactly (torch.equal, not a tolerance)."""
    src, dst = edge_index
    n = delta.size(0)
    if adjacency == "general":
        raw = torch.exp(-(delta[dst] + delta[src]) / 3)
        row = delta.new_zeros(n, delta.size(1)).index_add(0, dst, raw)
        return gamma * raw / (row + torch.exp(-psi))[dst]
    if adjacency == "dag":
        parents = delta.new_zeros(n, 1).index_add(0, dst, delta.new_ones(dst.numel(), 1))
        return torch.exp(-(delta[dst] + delta[src]) / 2) * parents.clamp_min(1).rsqrt()[dst]
    if adjacency == "undirected_line":
        return 0.5 * torch.exp(-(delta[dst] + delta[src]) / 3)
    return torch.exp(-delta[dst])


@pytest.mark.parametrize("adjacency, kind", [("general", "cyclic"), ("dag", "dag"), ("undirected_line", "undirected path"),
                                             ("mamba2", "path")])
def test_default_transitions_are_the_positive_layer_bit_for_bit(adjacency, kind):
    edge_index = graph(kind)
    n = int(edge_index.max()) + 1
    delta, psi = torch.rand(n, 2) * 3, torch.randn(n, 2)
    conv = ChimeraConv(8, heads=2, state_dim=3, adjacency=adjacency)
    assert conv.transitions == "positive"
    weight, _ = conv.selective_adjacency(delta, edge_index, psi)
    assert torch.equal(weight, positive_weights_as_before(adjacency, delta, edge_index, psi))
    signed, _ = layer(adjacency).float().selective_adjacency(delta, edge_index, psi)
    assert not torch.equal(signed, weight)
    # Same parameters: a positive layer's state dict loads into a signed one and vice versa.
    layer(adjacency).load_state_dict(layer(adjacency, transitions="positive").state_dict())


@pytest.mark.parametrize("decomposition", ["grid", "line", "fwd", "cross_scan", "hydra"])
def test_signed_decomposition_layers_differ_from_positive_ones_only_in_the_transitions(decomposition, monkeypatch):
    geometry = (dict(grid_size=torch.tensor([[3, 4], [2, 2]])) if decomposition in ("grid", "cross_scan")
                else dict(seq_len=torch.tensor([6, 3])))
    n = 16 if "grid_size" in geometry else 9
    x = torch.randn(n, 8, dtype=torch.float64)
    torch.manual_seed(0)
    positive = ChimeraConv(8, heads=2, state_dim=3, decomposition=decomposition).double()
    signed = ChimeraConv(8, heads=2, state_dim=3, decomposition=decomposition, transitions="signed").double()
    signed.load_state_dict(positive.state_dict())
    assert not torch.allclose(signed(x, None, **geometry), positive(x, None, **geometry))
    # With transition() forced to exp(-x) the signed layer is the positive one: nothing else differs.
    import torch_geometric_chimera.nn.decomposition as decomposition_module
    monkeypatch.setattr(decomposition_module, "transition", lambda rate, signed=False: torch.exp(-rate))
    # (the grid's one-pass kernel of the same formulas, chimera::grid_selectivity, likewise)
    kernel = decomposition_module.grid_selectivity
    monkeypatch.setattr(decomposition_module, "grid_selectivity",
                        lambda delta, parents, groups, scale=1.0, signed=False: kernel(delta, parents, groups, scale))
    torch.testing.assert_close(signed(x, None, **geometry), positive(x, None, **geometry), rtol=0, atol=0)


# --- bounds on |A| ----------------------------------------------------------------------------------

def test_signed_general_rows_of_abs_a_sum_below_gamma():
    edge_index = graph("cyclic", 30)
    conv = layer("general")
    delta = torch.rand(30, 2, dtype=torch.float64) * 4  # transitions of both signs in most rows
    psi = torch.full((30, 2), 30.0, dtype=torch.float64)  # exp(-psi) ~ 0: rows as close to gamma as they get
    weight, _ = conv.selective_adjacency(delta, edge_index, psi)
    rows = torch.zeros(30, 2, dtype=torch.float64).index_add(0, edge_index[1], weight.abs())
    assert float(rows.max()) < conv.gamma and float(rows.max()) > 0.89
    # Normalized by the signed row sums instead, rows of mixed signs would leave |A| far above gamma.
    signed_sum = torch.zeros(30, 2, dtype=torch.float64).index_add(0, edge_index[1], weight)
    assert float((rows / signed_sum.abs()).max()) > 2


def test_squaring_and_band_bound_abs_a_not_the_signed_row_sum():
    # A 2-cycle whose rows sum to 0.6 - 0.6 = 0 but |A| to 1.2: a signed bound would call it safe.
    edge_index = torch.tensor([[1, 2, 0, 2, 0, 1], [0, 0, 1, 1, 2, 2]])
    weight = torch.tensor([0.6, -0.6, 0.6, -0.6, 0.6, -0.6], dtype=torch.float64).view(-1, 1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 1, 2, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match=r"row of \|A\| sums to 1\.2"):
        resolvent_attention(q, k, v, edge_index, weight, method="squaring")
    with pytest.raises(ValueError, match=r"gamma: a row of \|A\| sums to 1\.2"):
        resolvent_attention(q, k, v, edge_index, weight, method="squaring", gamma=0.5)
    # band's no-pivoting LU needs |A| rows below 1; it falls back to pivoted LU and stays exact.
    torch.testing.assert_close(resolvent_attention(q, k, v, edge_index, weight, method="band"),
                               inverse_resolvent_attention(q, k, v, edge_index, weight))


def test_a_signed_line_flips_the_state_where_a_positive_one_forgets():
    # Delta large: the positive transition exp(-Delta) ~ 0 forgets, the signed one ~ -1 flips the sign,
    # so the resolvent entry from the first token to the t-th is (-1)^t: parity of the steps taken.
    rate = torch.full((7,), 30.0, dtype=torch.float64)
    assert float(transition(rate).max()) < 1e-12
    signed = transition(rate, signed=True)
    torch.testing.assert_close(signed, torch.full_like(signed, -1.0))
    path = torch.stack([torch.arange(7), torch.arange(1, 8)])
    ones = torch.ones(8, 1, 1, dtype=torch.float64)
    out = resolvent_attention(ones, ones, ones.new_zeros(8, 1, 1).index_fill(0, torch.tensor([0]), 1.0), path,
                              signed.view(-1, 1), method="line")
    torch.testing.assert_close(out.view(-1), torch.tensor([(-1.0) ** t for t in range(8)], dtype=torch.float64))


def test_transitions_are_checked_and_shown():
    with pytest.raises(ValueError, match=r"transitions: expected one of \('positive', 'signed'\), got 'negative'"):
        ChimeraConv(8, transitions="negative")
    assert "transitions='signed'" in repr(ChimeraConv(8, transitions="signed"))
    assert "transitions" not in repr(ChimeraConv(8))
