import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.datasets import LRGBDataset

from torch_geometric_chimera import ChimeraGPSConv
from torch_geometric_chimera.lrgb import (LRGB_TASKS, MODELS, TASKS, LRGBModel, count_parameters, load_splits,
                                          width_for_budget)



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
