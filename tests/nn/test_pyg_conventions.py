"""PyG conventions of ChimeraConv and ChimeraGPSConv: PyG's own GPSConv test with the class swapped,
TorchScript, to_hetero, explainers, sparse adjacencies with edge features, argument checks and
reset_parameters."""
import pytest
import torch
from torch.jit.frontend import NotSupportedError
from torch.nn import Linear, ReLU, Sequential
from torch_geometric.data import HeteroData
from torch_geometric.explain import Explainer
from torch_geometric.explain.algorithm import GNNExplainer
from torch_geometric.explain.algorithm.utils import clear_masks, set_masks
from torch_geometric.nn import GINEConv, GPSConv, SAGEConv, to_hetero
from torch_geometric.typing import WITH_TORCH_SPARSE, SparseTensor
from torch_geometric.utils import (add_self_loops, remove_self_loops, to_torch_coo_tensor, to_torch_csc_tensor,
                                   to_torch_csr_tensor, to_undirected)

from torch_geometric_chimera.nn import ChimeraConv, ChimeraGPSConv

needs_torch_sparse = pytest.mark.skipif(not WITH_TORCH_SPARSE, reason="torch_sparse is not installed")
no_jit_deprecation = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def small_graph(n=10, num_edges=18):
    edge_index = torch.randint(0, n, (2, num_edges))
    edge_index = to_undirected(edge_index[:, edge_index[0] != edge_index[1]], num_nodes=n)
    return edge_index


# 1. PyG 2.8's test/nn/conv/test_gps_conv.py, rewritten, with GPSConv swapped for ChimeraGPSConv ------

@pytest.mark.parametrize("attn_type", ["multihead", "performer"])
@pytest.mark.parametrize("norm", [None, "batch_norm", "layer_norm"])
def test_pyg_gps_conv_test_with_chimera(norm, attn_type):
    # Two graphs of two nodes each, joined both ways; the sparse form is PyG's adj_t.
    x, batch = torch.randn(4, 16), torch.tensor([0, 0, 1, 1])
    edge_index = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    adj_t = to_torch_csc_tensor(edge_index, size=(4, 4)).t()

    layer = ChimeraGPSConv(16, conv=SAGEConv(16, 16), heads=4, norm=norm, attn_type=attn_type)
    layer.reset_parameters()
    # GPSConv's format, with the Chimera variant where GPSConv names its attention type.
    assert str(layer) == ("ChimeraGPSConv(16, conv=SAGEConv(16, 16, aggr=mean), heads=4, "
                          "adjacency=general, method=auto)")
    assert str(GPSConv(16, conv=SAGEConv(16, 16), heads=4, attn_type=attn_type)) == (
        f"GPSConv(16, conv=SAGEConv(16, 16, aggr=mean), heads=4, attn_type={attn_type})")

    for b in (None, batch):
        out = layer(x, edge_index, b)
        assert out.shape == (4, 16)
        torch.testing.assert_close(layer(x, adj_t, b), out, rtol=0, atol=1e-6)
        if WITH_TORCH_SPARSE:
            sparse_t = SparseTensor.from_edge_index(edge_index, sparse_sizes=(4, 4)).t()
            torch.testing.assert_close(layer(x, sparse_t, b), out, rtol=0, atol=1e-6)


# 2. TorchScript -------------------------------------------------------------------------------------

@no_jit_deprecation
def test_torch_jit_script_chimera_conv_gives_the_eager_outputs():
    conv = ChimeraConv(16, heads=2, state_dim=4, edge_dim=3).double()
    scripted = torch.jit.script(conv)
    n = 10
    edge_index = small_graph(n)
    x, edge_attr = torch.randn(n, 16).double(), torch.randn(edge_index.size(1), 3).double()
    batch = torch.tensor([0] * 6 + [1] * 4)
    edge_index = edge_index[:, batch[edge_index[0]] == batch[edge_index[1]]]
    edge_attr = edge_attr[:edge_index.size(1)]
    torch.testing.assert_close(scripted(x, edge_index, edge_attr, batch), conv(x, edge_index, edge_attr, batch))
    adj_t = to_torch_csr_tensor(edge_index.flip(0), size=n)  # no edge_attr: its order does not matter
    torch.testing.assert_close(scripted(x, adj_t), conv(x, edge_index))


@no_jit_deprecation
def test_torch_jit_scripted_chimera_conv_cannot_be_saved(tmp_path):
    # Documented limit: the resolvent solve stays a Python call inside the scripted module.
    scripted = torch.jit.script(ChimeraConv(16, heads=2, state_dim=4))
    with pytest.raises(RuntimeError, match="Could not export Python function call '_(resolvent|local_conv_silu)'"):
        torch.jit.save(scripted, str(tmp_path / "chimera.pt"))


@no_jit_deprecation
def test_torch_jit_script_gps_layers_fail_alike():
    # GPSConv.forward takes **kwargs, which TorchScript does not compile; the drop-in keeps that call.
    with pytest.raises(NotSupportedError):
        torch.jit.script(GPSConv(16, SAGEConv(16, 16), heads=4))
    with pytest.raises(NotSupportedError):
        torch.jit.script(ChimeraGPSConv(16, SAGEConv(16, 16), heads=4))


# 3. to_hetero ---------------------------------------------------------------------------------------

class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ChimeraConv(16, heads=2, state_dim=4)

    def forward(self, x, edge_index):
        return self.conv(x, edge_index)


def hetero_graph(bipartite):
    data = HeteroData()
    data["paper"].x, data["author"].x = torch.randn(6, 16), torch.randn(5, 16)
    data["paper", "cites", "paper"].edge_index = small_graph(6, 8)
    data["author", "knows", "author"].edge_index = small_graph(5, 6)
    if bipartite:
        data["author", "writes", "paper"].edge_index = torch.tensor([[0, 1, 2, 4], [0, 0, 3, 5]])
    return data


def test_to_hetero_same_type_relations_run_each_relations_own_layer():
    data = hetero_graph(bipartite=False)
    model = to_hetero(OneLayer(), data.metadata())
    out = model(data.x_dict, data.edge_index_dict)
    for node_type, relation in (("paper", "paper__cites__paper"), ("author", "author__knows__author")):
        edge_index = data.edge_index_dict[(node_type, relation.split("__")[1], node_type)]
        torch.testing.assert_close(out[node_type], model.conv[relation](data[node_type].x, edge_index))


def test_to_hetero_bipartite_relation_raises_a_clear_error():
    data = hetero_graph(bipartite=True)
    model = to_hetero(OneLayer(), data.metadata())
    with pytest.raises(ValueError, match=r"x: expected one node feature tensor .* got a pair \(x_src, x_dst\).*"
                                         r"square adjacency over one node set"):
        model(data.x_dict, data.edge_index_dict)
    conv = ChimeraConv(16, heads=2, state_dim=4)
    with pytest.raises(ValueError, match="x: expected one node feature tensor"):
        conv((torch.randn(5, 16), torch.randn(6, 16)), torch.tensor([[0, 1], [2, 3]]))


def test_rectangular_sparse_adjacency_raises():
    conv = ChimeraConv(16, heads=2, state_dim=4)
    adj_t = to_torch_coo_tensor(torch.tensor([[0, 1], [2, 3]]), size=(5, 6)).t()
    with pytest.raises(ValueError, match=r"edge_index: expected a square sparse adjacency of size \[N, N\] = "
                                         r"\[6, 6\].*got \[6, 5\]"):
        conv(torch.randn(6, 16), adj_t)
    square_but_not_n = to_torch_csr_tensor(torch.tensor([[0, 1], [2, 3]]), size=7)
    with pytest.raises(ValueError, match=r"edge_index: expected a square sparse adjacency .* got \[7, 7\]"):
        conv(torch.randn(6, 16), square_but_not_n)


# 4. Explainers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("adjacency", ["general", "dag", "undirected_line", "mamba2"])
def test_explain_mask_of_zero_removes_the_edge_from_the_resolvent(adjacency):
    n = 12
    edge_index = small_graph(n, 20)
    if adjacency == "dag":
        edge_index = edge_index[:, edge_index[0] < edge_index[1]]
    edge_dim = None if adjacency == "mamba2" else 3
    conv = ChimeraConv(16, heads=2, state_dim=4, edge_dim=edge_dim, adjacency=adjacency, local_conv=False,
                       method="dense").double()
    num_edges = edge_index.size(1)
    x = torch.randn(n, 16).double()
    edge_attr = None if edge_dim is None else torch.randn(num_edges, 3).double()
    dropped = 3
    mask = torch.ones(num_edges, dtype=torch.float64)
    mask[dropped] = 0.0
    set_masks(conv, mask, edge_index, apply_sigmoid=False)
    masked = conv(x, edge_index, edge_attr)
    clear_masks(conv)
    keep = torch.arange(num_edges) != dropped
    without = conv(x, edge_index[:, keep], None if edge_attr is None else edge_attr[keep])
    torch.testing.assert_close(masked, without, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(conv(x, edge_index, edge_attr), without)  # the edge did matter
    # A mask of ones (before the sigmoid: large logits) is the unmasked layer.
    set_masks(conv, torch.full((num_edges,), 1e4, dtype=torch.float64), edge_index, apply_sigmoid=True)
    ones = conv(x, edge_index, edge_attr)
    clear_masks(conv)
    torch.testing.assert_close(ones, conv(x, edge_index, edge_attr))


def test_explain_masked_edge_has_no_influence_with_the_local_conv():
    # Directed path 0 -> 1 -> 2 -> 3: with 1 -> 2 masked, nothing upstream of it may reach node 3,
    # neither through the local convolution nor through the resolvent.
    conv = ChimeraConv(16, heads=2, state_dim=4).double()
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 3]])
    set_masks(conv, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), edge_index, apply_sigmoid=False)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    conv(x, edge_index)[3].sum().backward()
    assert bool((x.grad[:2] == 0).all()) and bool(x.grad[2:].abs().sum() > 0)
    clear_masks(conv)
    x.grad = None
    conv(x, edge_index)[3].sum().backward()
    assert bool(x.grad[0].abs().sum() > 0)  # three hops away: only the resolvent reaches it


def test_explain_mask_with_self_loops_added_by_the_model():
    # As for PyG's local messages: loops that the model adds (add_self_loops appends one per node,
    # after dropping existing ones) are not explained and keep a mask of 1.
    n = 8
    edge_index = torch.cat([small_graph(n, 10), torch.tensor([[2], [2]])], 1)  # one loop already there
    looped, _ = add_self_loops(remove_self_loops(edge_index)[0], num_nodes=n)
    conv = ChimeraConv(16, heads=2, state_dim=4).double()
    x = torch.randn(n, 16).double()
    mask = torch.ones(edge_index.size(1), dtype=torch.float64)
    mask[0] = 0.0
    set_masks(conv, mask, edge_index, apply_sigmoid=False)
    masked = conv(x, looped)
    clear_masks(conv)
    local_mask = torch.ones(looped.size(1), dtype=torch.float64)
    local_mask[0] = 0.0
    set_masks(conv, local_mask, looped, apply_sigmoid=False)
    torch.testing.assert_close(masked, conv(x, looped))
    clear_masks(conv)
    assert not torch.allclose(masked, conv(x, looped))


def test_explain_mask_of_the_wrong_length_raises():
    conv = ChimeraConv(16, heads=2, state_dim=4, local_conv=False)
    edge_index = small_graph(6, 8)
    set_masks(conv, torch.ones(edge_index.size(1) + 1), edge_index)
    with pytest.raises(ValueError, match=r"edge_mask: expected one entry per edge"):
        conv(torch.randn(6, 16), edge_index)


class NodeRegressor(torch.nn.Module):
    def __init__(self, local_conv):
        super().__init__()
        self.conv = ChimeraConv(16, heads=2, state_dim=4, local_conv=local_conv)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x, edge_index):
        return self.head(self.conv(x, edge_index))


@pytest.mark.parametrize("local_conv", [True, False])
def test_gnn_explainer_end_to_end_sees_global_influence(local_conv):
    n = 7
    path = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
    edge_index = torch.cat([path, path.flip(0)], 1)  # an undirected path
    explainer = Explainer(NodeRegressor(local_conv), algorithm=GNNExplainer(epochs=20), explanation_type="model",
                          node_mask_type="attributes", edge_mask_type="object",
                          model_config=dict(mode="regression", task_level="node", return_type="raw"))
    explanation = explainer(torch.randn(n, 16), edge_index, index=n - 1)
    assert explanation.edge_mask.shape == (edge_index.size(1),)
    assert explanation.node_mask.shape == (n, 16)
    assert bool(torch.isfinite(explanation.edge_mask).all())
    # GNNExplainer zeroes every edge whose mask got no gradient. Without the local convolution only
    # the resolvent can see an edge, so a positive mask on edge 0 -> 1, five hops from node 6,
    # means the mask reaches the selective adjacency.
    assert float(explanation.edge_mask[0]) > 0


# 5. Sparse adjacencies with edge features -----------------------------------------------------------

def sparse_layouts(edge_index, n):
    """``(name, adj_t, order)``: order[k] is the edge_index column of adj_t's k-th stored entry."""
    src, dst = edge_index
    perm = torch.randperm(edge_index.size(1))
    uncoalesced = torch.sparse_coo_tensor(torch.stack([dst[perm], src[perm]]), torch.ones(perm.numel()), (n, n))
    return [
        ("coo", to_torch_coo_tensor(edge_index.flip(0), size=n), torch.argsort(dst * n + src)),
        ("coo-uncoalesced", uncoalesced, perm),
        ("csr", to_torch_csr_tensor(edge_index.flip(0), size=n), torch.argsort(dst * n + src)),
        ("csc-transposed", to_torch_csc_tensor(edge_index, size=n).t(), torch.argsort(dst * n + src)),
        ("csc", to_torch_csc_tensor(edge_index.flip(0), size=n), torch.argsort(src * n + dst)),
    ]


def test_edge_attr_follows_the_sparse_adjacency_stored_order():
    n = 14
    edge_index = small_graph(n, 24)
    edge_index = edge_index[:, torch.randperm(edge_index.size(1))]  # in no layout's order
    conv = ChimeraConv(16, heads=2, state_dim=4, edge_dim=3).double()
    x, edge_attr = torch.randn(n, 16).double(), torch.randn(edge_index.size(1), 3).double()
    expected = conv(x, edge_index, edge_attr)
    for name, adj_t, order in sparse_layouts(edge_index, n):
        torch.testing.assert_close(conv(x, adj_t, edge_attr[order]), expected, msg=name)
        # edge_attr in edge_index's order is another input: other numbers, no error possible.
        assert not torch.allclose(conv(x, adj_t, edge_attr), expected), name


def test_uncoalesced_coo_adjacency_is_left_as_it_was():
    # Duplicate entries add up (DEVELOPERS.md); the caller's tensor must stay uncoalesced.
    adj_t = torch.sparse_coo_tensor(torch.tensor([[1, 0, 1], [0, 1, 0]]), torch.ones(3), (2, 2))
    conv = ChimeraConv(16, heads=2, state_dim=4)
    x = torch.randn(2, 16)
    out = conv(x, adj_t)
    assert not adj_t.is_coalesced()
    torch.testing.assert_close(adj_t.coalesce().values(), torch.tensor([1.0, 2.0]))  # (0, 1) once, (1, 0) twice
    torch.testing.assert_close(out, conv(x, torch.tensor([[0, 1, 0], [1, 0, 1]])))


@needs_torch_sparse
def test_edge_attr_follows_the_sparse_tensor_order():
    n = 14
    edge_index = small_graph(n, 24)
    conv = ChimeraConv(16, heads=2, state_dim=4, edge_dim=3).double()
    x, edge_attr = torch.randn(n, 16).double(), torch.randn(edge_index.size(1), 3).double()
    adj_t = SparseTensor.from_edge_index(edge_index, sparse_sizes=(n, n)).t()
    order = torch.argsort(edge_index[1] * n + edge_index[0])
    torch.testing.assert_close(conv(x, adj_t, edge_attr[order]), conv(x, edge_index, edge_attr))


def test_edge_attr_of_the_wrong_length_with_a_sparse_adjacency_raises():
    n = 8
    edge_index = small_graph(n, 10)
    conv = ChimeraConv(16, heads=2, state_dim=4, edge_dim=3)
    adj_t = to_torch_csr_tensor(edge_index.flip(0), size=n)
    with pytest.raises(ValueError, match=r"edge_attr: expected shape \[E, edge_dim\] .*one row per stored entry, "
                                         r"in the stored order"):
        conv(torch.randn(n, 16), adj_t, torch.randn(edge_index.size(1) - 1, 3))


# 6. Argument checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=0), "heads: expected a positive int, got 0"),
    (dict(heads=-2), "heads: expected a positive int, got -2"),
    (dict(channels=0), "channels: expected a positive int, got 0"),
    (dict(state_dim=0), "state_dim: expected a positive int, got 0"),
    (dict(expand=0), "expand: expected a positive int, got 0"),
    (dict(edge_dim=0), "edge_dim: expected a positive int, got 0"),
    (dict(max_iter=0), "max_iter: expected a positive int, got 0"),
    (dict(heads=2.0), "heads: expected a positive int, got 2.0"),
    (dict(num_terms=-1), "num_terms: expected a non-negative int or None, got -1"),
    (dict(tol=-1.0), "tol: expected a non-negative float or None, got -1.0"),
    (dict(dt_min=0.0), "dt_min: expected 0 < dt_min <= dt_max"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min: expected 0 < dt_min <= dt_max"),
])
def test_chimera_conv_rejects_bad_sizes_at_construction(kwargs, match):
    kwargs = {"channels": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        ChimeraConv(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=0), "channels: expected a positive int, got 0"),
    (dict(heads=0), "heads: expected a positive int, got 0"),
    (dict(dropout=1.5), r"dropout: expected a probability in \[0, 1\], got 1.5"),
    (dict(attn_kwargs={"dropout": -0.1}), r"attn_kwargs: 'dropout' must be a probability in \[0, 1\]"),
    (dict(attn_kwargs={"state_dim": 0}), "state_dim: expected a positive int, got 0"),
])
def test_chimera_gps_conv_rejects_bad_sizes_at_construction(kwargs, match):
    kwargs = {"channels": 16, "conv": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        ChimeraGPSConv(**kwargs)


def test_zero_num_terms_is_allowed():
    conv = ChimeraConv(16, heads=2, state_dim=4, method="neumann", num_terms=0, local_conv=False)
    assert conv(torch.randn(5, 16), small_graph(5, 6)).shape == (5, 16)


# reset_parameters ------------------------------------------------------------------------------------

def train_a_little(model, run):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        out = run()
        # A random target: a normalized output's mean square is constant, so it would train nothing.
        (out - torch.randn_like(out)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("build", [
    lambda: ChimeraConv(16, heads=2, state_dim=4, edge_dim=3),
    lambda: ChimeraGPSConv(16, GINEConv(Sequential(Linear(16, 16), ReLU(), Linear(16, 16)), edge_dim=3), heads=2,
                           attn_kwargs={"edge_dim": 3}),
    lambda: ChimeraGPSConv(16, SAGEConv(16, 16), heads=2, norm="graph_norm", norm_style="pre",
                           attn_kwargs={"edge_dim": None}),
], ids=["conv", "gps-batch-norm", "gps-graph-norm-pre"])
def test_reset_parameters_resets_everything(build):
    model = build()
    n = 10
    edge_index = small_graph(n)
    x, edge_attr = torch.randn(n, 16), torch.randn(edge_index.size(1), 3)
    if isinstance(model, ChimeraConv):
        def run():
            return model(x, edge_index, edge_attr)
    else:
        def run():
            return model(x, edge_index, edge_attr=edge_attr) if isinstance(model.conv, GINEConv) \
                else model(x, edge_index)

    torch.manual_seed(7)
    model.reset_parameters()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    train_a_little(model, run)
    trained = model.state_dict()
    differ = [k for k, v in trained.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    torch.manual_seed(7)
    model.reset_parameters()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, initial[k], rtol=0, atol=0, msg=k)
    # Training moved every Chimera parameter and running statistic (a bias right before a batch norm
    # gets no gradient), and the reset above brought the whole state back.
    learned = {k for k, _ in model.named_parameters() if isinstance(model, ChimeraConv) or k.startswith("chimera.")}
    learned |= {k for k, _ in model.named_buffers() if ".running_" in k}
    assert learned <= set(differ) and len(learned) > 5
