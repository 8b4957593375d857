import pytest
import torch

from torch_geometric_chimera.datasets import PeptidesMini
from torch_geometric_chimera.datasets.peptides_mini import DATA_FILE
from torch_geometric_chimera.datasets.build_peptides_mini import build


@pytest.fixture(scope="module")
def dataset():
    return PeptidesMini()


def test_shipped_dataset_loads_offline(dataset):
    assert len(dataset) == 2000 and dataset.num_targets == 11 and len(dataset.target_names) == 11
    data = dataset[0]
    assert data.x.dtype == torch.long and data.x.size(1) == 9
    assert data.edge_attr.size(1) == 3 and data.edge_attr.size(0) == data.edge_index.size(1)
    assert data.y.shape == (1, 11)
    # standardized over the whole set, as peptides-struct
    torch.testing.assert_close(dataset.y.mean(0), torch.zeros(11), atol=1e-4, rtol=0)
    torch.testing.assert_close(dataset.y.std(0), torch.ones(11), atol=1e-3, rtol=0)
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
    rebuilt = build(num=3, seed=0)  # about 1 s per molecule: RDKit embeds a 3D conformer
    raw = torch.load(DATA_FILE, weights_only=False)
    n, e = int(rebuilt["node_ptr"][-1]), int(rebuilt["edge_ptr"][-1])
    assert rebuilt["sequences"] == raw["sequences"][:3]
    assert torch.equal(rebuilt["x"], raw["x"][:n])
    assert torch.equal(rebuilt["edge_index"], raw["edge_index"][:, :e])
    assert torch.equal(rebuilt["edge_ptr"], raw["edge_ptr"][:4])
    # The same conformers give the same raw targets (standardization differs: 3 vs 2,000 molecules).
    torch.testing.assert_close(rebuilt["y"].double() * rebuilt["target_std"] + rebuilt["target_mean"],
                               raw["y"][:3].double() * raw["target_std"] + raw["target_mean"], rtol=1e-4, atol=1e-3)
