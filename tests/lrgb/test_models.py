import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.datasets import LRGBDataset
from torch_geometric.nn import GCNConv

from torch_geometric_chimera import ChimeraGPSConv
from torch_geometric_chimera.lrgb import (LRGB_TASKS, MODELS, TASKS, LRGBModel, count_parameters, load_splits,
                                          width_for_budget)
from torch_geometric_chimera.lrgb.models import GCNLocal



@pytest.mark.parametrize("name", LRGB_TASKS)
def test_fixture_is_read_by_pyg_lrgb_dataset(lrgb_root, name):
    splits = load_splits(name, lrgb_root)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    assert all(isinstance(d, LRGBDataset) for d in splits.values())
    data = splits["train"][0]
    task = TASKS[name]
    if task.features == "molecule":
        assert data.x.dtype == torch.long and data.x.size(1) == 9 and data.edge_attr.shape[1] == 3
        assert data.y.shape == (1, task.num_outputs)
    else:
        assert data.x.dtype == torch.float and data.x.size(1) == 14 and data.edge_attr.shape[1] == 2
        assert data.y.shape == (data.num_nodes,) and int(data.y.max()) < task.num_outputs  # COCO ids remapped


@pytest.mark.parametrize("name", LRGB_TASKS)
@pytest.mark.parametrize("model", MODELS)
def test_models_output_the_task_shape_and_train(lrgb_root, name, model):
    task = TASKS[name]
    data = Batch.from_data_list(list(load_splits(name, lrgb_root)["train"][:3]))
    net = LRGBModel(task, model, hidden=16, layers=2, heads=2, state_dim=8)
    out = net(data)
    rows = data.num_graphs if task.level == "graph" else data.num_nodes
    assert out.shape == (rows, task.num_outputs)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    if model == "chimera":
        assert all(isinstance(layer, ChimeraGPSConv) for layer in net.layers)


def test_width_for_budget_is_the_largest_width_within_budget():
    task = TASKS["peptides-func"]
    options = dict(layers=2, heads=4, state_dim=8)
    budget = count_parameters(LRGBModel(task, "chimera", hidden=48, **options))
    for model in ("gps", "gcn"):
        width = width_for_budget(task, model, budget, step=4, **options)
        assert width % 4 == 0
        assert count_parameters(LRGBModel(task, model, hidden=width, **options)) <= budget
        assert count_parameters(LRGBModel(task, model, hidden=width + 4, **options)) > budget


def test_default_configurations_fit_the_500k_budget():
    for name in LRGB_TASKS:
        c = TASKS[name].config
        net = LRGBModel(TASKS[name], "chimera", hidden=c["hidden"], layers=c["layers"], heads=c["heads"],
                        dropout=c["dropout"], head_layers=c["head_layers"], state_dim=c["state_dim"],
                        expand=c["expand"], norm_style=c["norm_style"])
        assert count_parameters(net) <= 500_000


def test_bad_names():
    with pytest.raises(ValueError, match="model: expected one of"):
        LRGBModel(TASKS["peptides-func"], "transformer")
    with pytest.raises(ValueError, match="name: expected one of"):
        load_splits("zinc", "/nonexistent")
    with pytest.raises(ValueError, match="root: peptides-func needs a data directory"):
        load_splits("peptides-func", None)


@pytest.mark.parametrize("self_loops", [0, 1, 2])
def test_gcn_local_computes_what_gcn_conv_computes(self_loops):
    """GCNLocal adds its self-loops without a boolean mask (torch.compile traces it without a graph
    break) and keeps GCNConv's values: existing self-loops (here up to two on one node) are replaced
    by one of weight 1, an isolated node gets one."""
    torch.manual_seed(0)
    num_nodes = 7  # node 6 is isolated
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 0], [1, 0, 2, 1, 4, 3, 0, 5]])
    edge_index = torch.cat([edge_index, torch.tensor([[2], [2]]).repeat(1, self_loops)], 1)
    x = torch.randn(num_nodes, 8, requires_grad=True)
    ours, theirs = GCNLocal(8, 5), GCNConv(8, 5)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        theirs.bias.normal_()
        ours.bias.copy_(theirs.bias)
    out = ours(x, edge_index, edge_attr=torch.randn(edge_index.size(1), 3))
    expected = theirs(x, edge_index)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
