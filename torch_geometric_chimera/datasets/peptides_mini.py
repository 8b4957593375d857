"""``PeptidesMini``: 2,000 real peptide molecules with peptides-struct's targets, shipped in the wheel."""
import os
from typing import Callable, Dict, Optional

import torch
from torch_geometric.data import Data, InMemoryDataset

DATA_FILE = os.path.join(os.path.dirname(__file__), "data", "peptides_mini.pt")


class PeptidesMini(InMemoryDataset):
    r"""Peptides of 4 to 16 residues as molecular graphs: heavy atoms with 9 categorical OGB-style
    features (``x``, int64), bonds in both directions with 3 categorical features (``edge_attr``,
    int64), and the 11 structural targets of LRGB's peptides-struct (``y``, ``[1, 11]``), computed
    by RDKit from a 3D conformer and standardized: principal moments of inertia (mass- and
    valence-weighted), extents along the principal axes, spherocity and plane of best fit (names
    in ``target_names``; the means and standard deviations in ``target_mean`` / ``target_std``).
    About 85 atoms per graph. Built by :mod:`torch_geometric_chimera.datasets.build_peptides_mini`;
    needs no download.

    Args:
        transform (callable, optional): applied to every :class:`~torch_geometric.data.Data`.
    """

    num_targets = 11

    def __init__(self, transform: Optional[Callable] = None):
        super().__init__(root=None, transform=transform)
        raw = torch.load(DATA_FILE, weights_only=False)
        self.target_names = raw["targets"]
        self.target_mean, self.target_std = raw["target_mean"], raw["target_std"]
        node_ptr, edge_ptr = raw["node_ptr"].tolist(), raw["edge_ptr"].tolist()
        data_list = []
        for g in range(len(node_ptr) - 1):
            edges = slice(edge_ptr[g], edge_ptr[g + 1])
            data_list.append(Data(
                x=raw["x"][node_ptr[g]:node_ptr[g + 1]].long(),
                edge_index=raw["edge_index"][:, edges].long(),
                edge_attr=raw["edge_attr"][edges].long(),
                y=raw["y"][g:g + 1],
                num_nodes=node_ptr[g + 1] - node_ptr[g],
            ))
        self._data, self.slices = self.collate(data_list)

    def split_idx(self, seed: int = 0) -> Dict[str, torch.Tensor]:
        """A fixed 80 / 10 / 10 train / val / test split."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_train, n_val = int(0.8 * len(self)), int(0.1 * len(self))
        return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
