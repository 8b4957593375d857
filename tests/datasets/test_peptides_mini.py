import pytest
import torch

from torch_geometric_chimera.datasets import PeptidesMini
from torch_geometric_chimera.datasets.build_peptides_mini import build


@pytest.fixture(scope="module")
def dataset():
    return PeptidesMini()


def test_shipped_dataset_loads_offline(dataset):
    assert len(dataset) == 2000 and dataset.num_targets == 4
    data = dataset[0]
    assert data.x.dtype == torch.long and data.x.size(1) == 9
    assert data.edge_attr.size(1) == 3 and data.edge_attr.size(0) == data.edge_index.size(1)
    assert data.y.shape == (1, 4)
    assert int(data.edge_index.max()) < data.num_nodes
    # Bonds are stored in both directions.
    pairs = set(map(tuple, data.edge_index.t().tolist()))
    assert all((j, i) in pairs for i, j in pairs)


def test_split_is_a_partition(dataset):
    split = dataset.split_idx()
    allidx = torch.cat([split["train"], split["val"], split["test"]])
    assert allidx.numel() == len(dataset) and allidx.unique().numel() == len(dataset)


def test_builder_reproduces_the_shipped_file(dataset):
    pytest.importorskip("rdkit")
    rebuilt = build(num=5, seed=0)
    raw = torch.load("torch_geometric_chimera/datasets/data/peptides_mini.pt", weights_only=False)
    n = int(rebuilt["node_ptr"][-1])
    assert rebuilt["sequences"] == raw["sequences"][:5]
    assert torch.equal(rebuilt["x"], raw["x"][:n])
    torch.testing.assert_close(rebuilt["y"], raw["y"][:5])
