import pytest
import torch
from graphs import batch_graphs, random_graph
from torch_geometric.typing import WITH_TORCH_SPARSE, SparseTensor
from torch_geometric.utils import to_torch_coo_tensor, to_torch_csr_tensor, to_undirected

from torch_geometric_chimera.nn import ChimeraConv


def molecule_like(n, device="cpu"):
    return to_undirected(random_graph(n, n, device=device), num_nodes=n)


def make_conv(**kwargs):
    kwargs.setdefault("edge_dim", 3)
    return ChimeraConv(16, heads=2, state_dim=4, **kwargs).double()


def test_repr_and_shapes():
    conv = make_conv()
    assert repr(conv) == ("ChimeraConv(16, heads=2, state_dim=4, expand=2, edge_dim=3, adjacency='general', "
                          "method='auto', num_terms=None)")
    edge_index = molecule_like(20)
    out = conv(torch.randn(20, 16).double(), edge_index, torch.randn(edge_index.size(1), 3).double())
    assert out.shape == (20, 16)


def test_reset_parameters_restores_the_initial_distribution():
    conv = make_conv()
    torch.manual_seed(0)
    conv.reset_parameters()
    initial = {k: v.clone() for k, v in conv.state_dict().items()}
    for p in conv.parameters():
        p.data.add_(1.0)
    torch.manual_seed(0)
    conv.reset_parameters()
    for k, v in conv.state_dict().items():
        torch.testing.assert_close(v, initial[k], msg=k)
    assert bool((conv.D == 1).all()) and bool((conv.norm_weight == 1).all())
    delta = torch.nn.functional.softplus(conv.dt_bias)
    assert bool((delta >= conv.dt_min * 0.99).all()) and bool((delta <= conv.dt_max * 1.01).all())


def test_edge_index_torch_sparse_and_sparse_tensor_agree():
    conv = make_conv()
    n = 25
    edge_index = molecule_like(n)
    edge_attr = torch.randn(edge_index.size(1), 3).double()
    x = torch.randn(n, 16).double()
    expected = conv(x, edge_index, edge_attr)
    # Sparse adjacencies are adj_t (row = target); edge_attr follows their row-major entries.
    order = torch.argsort(edge_index[1] * n + edge_index[0])
    for adj_t in (to_torch_coo_tensor(edge_index.flip(0), size=n), to_torch_csr_tensor(edge_index.flip(0), size=n)):
        torch.testing.assert_close(conv(x, adj_t, edge_attr[order]), expected)
    if WITH_TORCH_SPARSE:
        adj_t = SparseTensor(row=edge_index[1], col=edge_index[0], sparse_sizes=(n, n))
        torch.testing.assert_close(conv(x, adj_t, edge_attr[order]), expected)


@pytest.mark.skipif(WITH_TORCH_SPARSE, reason="only meaningful without torch_sparse")
def test_sparse_tensor_needs_torch_sparse():
    with pytest.raises(ImportError):
        SparseTensor(row=torch.tensor([0]), col=torch.tensor([1]), sparse_sizes=(2, 2))


@pytest.mark.parametrize("method", ["auto", "dense", "neumann", "iterative"])
def test_batch_equals_graphs_alone(method):
    conv = make_conv(method=method)
    graphs = [(n, molecule_like(n)) for n in (7, 30, 1, 12, 30)]
    edge_index, batch, total = batch_graphs(graphs)
    x = torch.randn(total, 16).double()
    edge_attr = torch.randn(edge_index.size(1), 3).double()
    out = conv(x, edge_index, edge_attr, batch)
    offset, e_offset = 0, 0
    for n, ei in graphs:
        e = ei.size(1)
        alone = conv(x[offset:offset + n], ei, edge_attr[e_offset:e_offset + e])
        torch.testing.assert_close(out[offset:offset + n], alone, rtol=1e-9, atol=1e-11)
        offset, e_offset = offset + n, e_offset + e


@pytest.mark.parametrize("adjacency", ["general", "dag", "undirected_line", "mamba2"])
def test_relabelling_nodes_permutes_the_output(adjacency):
    conv = make_conv(adjacency=adjacency, edge_dim=None, method="dense")
    n = 30
    edge_index = molecule_like(n)
    if adjacency in ("dag", "mamba2"):
        edge_index = edge_index[:, edge_index[0] < edge_index[1]]
    if adjacency == "undirected_line":
        edge_index = to_undirected(torch.stack([torch.arange(n - 1), torch.arange(1, n)]))
    x = torch.randn(n, 16).double()
    out = conv(x, edge_index)
    perm = torch.randperm(n)
    new_label = torch.argsort(perm)  # node perm[k] becomes node k
    out_perm = conv(x[perm], new_label[edge_index])
    torch.testing.assert_close(out_perm, out[perm])


def test_exact_methods_agree_inside_the_layer():
    n = 40
    edge_index = molecule_like(n)
    x = torch.randn(n, 16).double()
    edge_attr = torch.randn(edge_index.size(1), 3).double()
    torch.manual_seed(3)
    dense = make_conv(method="dense")
    iterative = make_conv(method="iterative")
    iterative.load_state_dict(dense.state_dict())
    torch.testing.assert_close(dense(x, edge_index, edge_attr), iterative(x, edge_index, edge_attr))


def test_every_parameter_gets_a_gradient():
    conv = make_conv()
    edge_index = molecule_like(20)
    out = conv(torch.randn(20, 16).double(), edge_index, torch.randn(edge_index.size(1), 3).double())
    out.square().sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_gradcheck_layer_input():
    conv = ChimeraConv(4, heads=2, state_dim=2, expand=1, edge_dim=1).double()
    edge_index = molecule_like(6)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    edge_attr = torch.randn(edge_index.size(1), 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, e: conv(x, edge_index, e), (x, edge_attr))


def test_empty_graph_isolated_nodes_self_loops_and_duplicates():
    conv = make_conv(edge_dim=None)
    empty = conv(torch.zeros(0, 16).double(), torch.zeros(2, 0, dtype=torch.long))
    assert empty.shape == (0, 16)
    # An isolated node sees only itself: its output equals running it alone.
    n = 10
    edge_index = molecule_like(n)
    edge_index = edge_index[:, (edge_index != 9).all(0)]
    x = torch.randn(n, 16).double()
    out = conv(x, edge_index)
    torch.testing.assert_close(out[9:], conv(x[9:], torch.zeros(2, 0, dtype=torch.long)))
    # Self-loops and duplicates are edges like any other: finite, and they change the output.
    loops = torch.cat([edge_index, torch.arange(n).repeat(2, 1)], 1)
    duplicated = torch.cat([edge_index, edge_index[:, :5]], 1)
    for variant in (loops, duplicated):
        y = conv(x, variant)
        assert bool(torch.isfinite(y).all()) and not torch.allclose(y[:9], out[:9])


def test_bad_layer_input_messages():
    conv = make_conv()
    edge_index = molecule_like(5)
    with pytest.raises(ValueError, match=r"x: expected shape \[N, channels\]"):
        conv(torch.randn(5, 15).double(), edge_index)
    with pytest.raises(ValueError, match=r"edge_attr: expected shape \[E, edge_dim\]"):
        conv(torch.randn(5, 16).double(), edge_index, torch.randn(edge_index.size(1), 2).double())
    with pytest.raises(ValueError, match="edge_attr: this ChimeraConv was built with edge_dim=None"):
        make_conv(edge_dim=None)(torch.randn(5, 16).double(), edge_index, torch.randn(edge_index.size(1), 3).double())
    with pytest.raises(ValueError, match="heads"):
        ChimeraConv(10, heads=3)
    with pytest.raises(ValueError, match="adjacency"):
        ChimeraConv(8, adjacency="nope")
    with pytest.raises(ValueError, match="gamma"):
        ChimeraConv(8, gamma=1.0)


def test_layer_takes_an_explicit_topology_where_the_cache_cannot_see_a_write(monkeypatch):
    # As on an accelerator outside debug mode: the cache checks version counters only.
    from torch_geometric_chimera.ops import GraphTopology, common
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)
    # local_conv=False: the local convolution reads edge_index itself and would see the write
    conv = ChimeraConv(8, heads=2, state_dim=4, method="dense", local_conv=False)
    x = torch.randn(6, 8)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    before = conv(x, edge_index)
    edge_index.data[1, 4] = 0  # bypasses the version counter
    expected = conv(x, edge_index.clone())
    assert not torch.allclose(conv(x, edge_index), expected)  # the documented limit of the cache
    held = conv(x, edge_index, topology=GraphTopology(edge_index, 6))
    torch.testing.assert_close(held, expected)
    assert not torch.allclose(held, before)
