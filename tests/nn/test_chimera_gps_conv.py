"""ChimeraGPSConv is a drop-in replacement for PyG's GPSConv."""
import pytest
import torch
from torch.nn import BatchNorm1d, Embedding, Linear, ModuleList, ReLU, Sequential
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GINEConv, GPSConv, global_add_pool

import torch_geometric_chimera
from torch_geometric_chimera import ChimeraGPSConv


class GPS(torch.nn.Module):
    """The GPS model of PyG's ``examples/graph_gps.py`` (ZINC): node and edge embeddings, a
    random-walk positional encoding, GINE as the local MPNN, add pooling. The layer class is looked
    up by name in ``namespace`` so that the swap below is a one-line change, as it is for a user."""

    def __init__(self, channels, pe_dim, num_layers, attn_type, attn_kwargs, namespace):
        super().__init__()
        self.node_emb = Embedding(28, channels - pe_dim)
        self.pe_lin = Linear(20, pe_dim)
        self.pe_norm = BatchNorm1d(20)
        self.edge_emb = Embedding(4, channels)
        self.convs = ModuleList()
        for _ in range(num_layers):
            mlp = Sequential(Linear(channels, channels), ReLU(), Linear(channels, channels))
            conv = namespace.GPSConv(channels, GINEConv(mlp), heads=4, attn_type=attn_type, attn_kwargs=attn_kwargs)
            self.convs.append(conv)
        self.mlp = Sequential(Linear(channels, channels // 2), ReLU(), Linear(channels // 2, 1))

    def forward(self, x, pe, edge_index, edge_attr, batch):
        x = torch.cat((self.node_emb(x.squeeze(-1)), self.pe_lin(self.pe_norm(pe))), 1)
        edge_attr = self.edge_emb(edge_attr)
        for conv in self.convs:
            x = conv(x, edge_index, batch, edge_attr=edge_attr)
        return self.mlp(global_add_pool(x, batch))


def zinc_like_batch(num_graphs=4):
    graphs = []
    for _ in range(num_graphs):
        n = int(torch.randint(5, 12, (1,)))
        ring = torch.arange(n)
        edge_index = torch.stack([ring, (ring + 1) % n])
        edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
        graphs.append(Data(x=torch.randint(0, 28, (n, 1)), pe=torch.randn(n, 20), edge_index=edge_index,
                           edge_attr=torch.randint(0, 4, (edge_index.size(1),)), y=torch.randn(1)))
    return Batch.from_data_list(graphs)


class Namespace:
    GPSConv = GPSConv


def test_swap_into_the_pyg_gps_example_is_one_line(monkeypatch):
    data = zinc_like_batch()
    args = dict(channels=64, pe_dim=8, num_layers=2, attn_type="multihead", attn_kwargs={"dropout": 0.5})
    torch.manual_seed(0)
    reference = GPS(**args, namespace=Namespace)
    monkeypatch.setattr(Namespace, "GPSConv", ChimeraGPSConv)  # the user's only change
    torch.manual_seed(0)
    model = GPS(**args, namespace=Namespace)
    assert all(isinstance(conv, ChimeraGPSConv) for conv in model.convs)

    # Everything but the global model keeps its name, so the rest of a GPSConv checkpoint loads.
    reference_keys = {k for k in reference.state_dict() if ".attn." not in k}
    chimera_keys = {k for k in model.state_dict() if ".chimera." not in k}
    assert reference_keys == chimera_keys

    out = model(data.x, data.pe, data.edge_index, data.edge_attr, data.batch)
    assert out.shape == reference(data.x, data.pe, data.edge_index, data.edge_attr, data.batch).shape == (4, 1)
    (out - data.y.view(-1, 1)).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # edge features reach Chimera: its edge projection is trained too


def test_matches_gps_conv_without_global_model_differences():
    """With the global branch zeroed, ChimeraGPSConv computes exactly what GPSConv computes."""
    channels, data = 32, zinc_like_batch()
    x, edge_attr = torch.randn(data.num_nodes, channels), torch.randn(data.num_edges, channels)
    local = GINEConv(Sequential(Linear(channels, channels), ReLU(), Linear(channels, channels)))
    ours = ChimeraGPSConv(channels, local, heads=2, norm="layer_norm").eval()
    theirs = GPSConv(channels, local, heads=2, norm="layer_norm").eval()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if ".chimera." not in k
                            and not k.startswith("chimera.")}, strict=False)
    with torch.no_grad():
        ours.chimera.out_proj.weight.zero_()
        theirs.attn.out_proj.weight.zero_()
        theirs.attn.out_proj.bias.zero_()
    torch.testing.assert_close(ours(x, data.edge_index, data.batch, edge_attr=edge_attr),
                               theirs(x, data.edge_index, data.batch, edge_attr=edge_attr))


def test_global_model_sees_edge_attr_and_topology():
    channels, data = 16, zinc_like_batch(3)
    x, edge_attr = torch.randn(data.num_nodes, channels), torch.randn(data.num_edges, channels)
    layer = ChimeraGPSConv(channels, None, heads=2, norm=None).eval()
    out = layer(x, data.edge_index, data.batch, edge_attr=edge_attr)
    assert not torch.allclose(out, layer(x, data.edge_index, data.batch, edge_attr=2 * edge_attr))
    assert not torch.allclose(out, layer(x, data.edge_index.flip(0)[:, ::2], data.batch, edge_attr=edge_attr[::2]))
    # a batch gives exactly the outputs of its graphs run alone (no attention across graphs)
    alone = torch.cat([layer(x[data.batch == g], g_data.edge_index, None,
                             edge_attr=edge_attr[data.batch[data.edge_index[0]] == g])
                       for g, g_data in enumerate(data.to_data_list())])
    torch.testing.assert_close(out, alone)


def test_without_edge_features():
    channels, data = 16, zinc_like_batch(2)
    x = torch.randn(data.num_nodes, channels)
    layer = ChimeraGPSConv(channels, None, heads=2, attn_kwargs={"edge_dim": None})
    assert layer.chimera.edge_proj is None
    out = layer(x, data.edge_index, data.batch, edge_attr=torch.randn(data.num_edges, 5))
    torch.testing.assert_close(out, layer(x, data.edge_index, data.batch))


def test_attn_kwargs_reach_chimera_and_reset_and_repr():
    layer = ChimeraGPSConv(32, None, heads=4, norm="graph_norm",
                           attn_kwargs={"state_dim": 8, "expand": 1, "method": "neumann", "num_terms": 3,
                                        "dropout": 0.2})
    assert (layer.chimera.state_dim, layer.chimera.expand, layer.chimera.method) == (8, 1, "neumann")
    assert layer.attn_dropout == 0.2 and layer.norm_with_batch
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for p in layer.parameters():
        torch.nn.init.constant_(p, 0.123)
    layer.reset_parameters()
    changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])]
    assert any("chimera.in_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert repr(layer) == "ChimeraGPSConv(32, conv=None, heads=4, adjacency=general, method=neumann)"
    assert torch_geometric_chimera.ChimeraGPSConv is ChimeraGPSConv


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_type="linear"), "attn_type: expected 'chimera'"),
    (dict(attn_kwargs={"bias": False}), r"attn_kwargs: \['bias'\]"),
    (dict(heads=3), "heads: expand \\* channels = 64"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChimeraGPSConv(32, None, **kwargs)


def test_edge_attr_width_is_checked():
    layer = ChimeraGPSConv(16, None, heads=2)
    data = zinc_like_batch(1)
    with pytest.raises(ValueError, match=r"edge_attr: expected shape \[E, edge_dim\]"):
        layer(torch.randn(data.num_nodes, 16), data.edge_index, edge_attr=torch.randn(data.num_edges, 3))


def test_pre_norm_order():
    """norm_style='pre': x + MPNN(N1 x) + Chimera(N2 x), then + MLP(N3 h), written out by hand."""
    channels, data = 16, zinc_like_batch(2)
    x, edge_attr = torch.randn(data.num_nodes, channels), torch.randn(data.num_edges, channels)
    local = GINEConv(Sequential(Linear(channels, channels), ReLU(), Linear(channels, channels)))
    layer = ChimeraGPSConv(channels, local, heads=2, norm="layer_norm", norm_style="pre").eval()
    b = data.batch  # PyG's "layer_norm" normalizes per graph
    h = (x + layer.conv(layer.norm1(x, b), data.edge_index, edge_attr=edge_attr)
         + layer.chimera(layer.norm2(x, b), data.edge_index, edge_attr, b))
    expected = h + layer.mlp(layer.norm3(h, b))
    torch.testing.assert_close(layer(x, data.edge_index, data.batch, edge_attr=edge_attr), expected)
    with pytest.raises(ValueError, match="norm_style: expected 'post' or 'pre'"):
        ChimeraGPSConv(channels, None, norm_style="sandwich")


@pytest.mark.parametrize("norm", ["layer_norm", "graph_norm", "instance_norm", "batch_norm", None])
@pytest.mark.parametrize("norm_style", ["post", "pre"])
def test_batch_size_reaches_the_graph_level_norms(norm, norm_style, monkeypatch):
    """``batch_size`` spares the norms their host read of ``batch.max()`` (a graph break under
    torch.compile) and changes nothing else; norms without the argument do not get it."""
    channels, data = 16, zinc_like_batch(3)
    x, edge_attr = torch.randn(data.num_nodes, channels), torch.randn(data.num_edges, channels)
    local = GINEConv(Sequential(Linear(channels, channels), ReLU(), Linear(channels, channels)))
    layer = ChimeraGPSConv(channels, local, heads=2, norm=norm, norm_style=norm_style).eval()
    expected = layer(x, data.edge_index, data.batch, edge_attr=edge_attr)
    received = []
    for norm_module in (layer.norm1, layer.norm2, layer.norm3):
        if norm_module is not None:
            forward = norm_module.forward
            monkeypatch.setattr(norm_module, "forward",
                                lambda *args, _forward=forward, **kwargs: received.append(kwargs.get("batch_size"))
                                or _forward(*args, **kwargs))
    out = layer(x, data.edge_index, data.batch, batch_size=data.num_graphs, edge_attr=edge_attr)
    torch.testing.assert_close(out, expected)
    takes_batch_size = norm in ("layer_norm", "graph_norm", "instance_norm")
    assert received == ([data.num_graphs] * 3 if takes_batch_size else [None] * (3 if norm else 0))
