"""Loading the LRGB splits, and writing small fixtures in LRGB's exact raw on-disk format."""
import os
import pickle
from typing import Dict, Optional, Sequence

import torch
from torch_geometric.data import Dataset

from .tasks import TASKS

SPLITS = ("train", "val", "test")
# COCO-SP stores COCO's original category ids (81 of 0..90); PyG's LRGBDataset remaps them.
COCO_CATEGORY_IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
                     28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54,
                     55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82,
                     84, 85, 86, 87, 88, 89, 90]


def load_splits(name: str, root: Optional[str] = None) -> Dict[str, Dataset]:
    """``{"train", "val", "test"}`` datasets of an LRGB task (PyG's ``LRGBDataset`` under ``root``,
    downloaded when the machine is online and ``root`` has no data), or of the shipped
    ``peptides-mini`` (no ``root`` needed)."""
    if name not in TASKS:
        raise ValueError(f"name: expected one of {sorted(TASKS)}, got {name!r}")
    if name == "peptides-mini":
        from ..datasets import PeptidesMini
        dataset = PeptidesMini()
        return {split: dataset[index] for split, index in dataset.split_idx(0).items()}
    if root is None:
        raise ValueError(f"root: {name} needs a data directory (pass --root); only peptides-mini ships with the "
                         f"package")
    from torch_geometric.datasets import LRGBDataset
    return {split: LRGBDataset(root, name, split=split) for split in SPLITS}


def _ring_with_chords(num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    ring = torch.arange(num_nodes)
    src = torch.cat([ring, torch.randint(0, num_nodes, (num_nodes // 4,), generator=generator)])
    dst = torch.cat([(ring + 1) % num_nodes, torch.randint(0, num_nodes, (num_nodes // 4,), generator=generator)])
    keep = src != dst
    edge_index = torch.stack([src[keep], dst[keep]])
    return torch.cat([edge_index, edge_index.flip(0)], 1)  # both directions, as LRGB stores them


def write_fixture(root: str, name: str, graphs_per_split: Sequence[int] = (12, 6, 6), seed: int = 0) -> str:
    """Write random graphs in LRGB's raw format to ``root/name/raw`` so that PyG's ``LRGBDataset``
    processes them exactly as it processes the real download (used by the offline tests).

    Peptides: ``raw/{train,val,test}.pt``, lists of ``(x int64[N, 9], edge_attr int64[E, 3],
    edge_index int64[2, E], y float[1, 10 or 11])``. Superpixels: ``raw/{train,val,test}.pickle``,
    lists of ``(x float[N, 14], edge_attr float[E, 2], edge_index int64[2, E], y int64[N])``.
    """
    task = TASKS[name]
    raw_dir = os.path.join(root, name, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, count in zip(SPLITS, graphs_per_split):
        graphs = []
        for _ in range(count):
            num_nodes = int(torch.randint(8, 20, (1,), generator=generator))
            edge_index = _ring_with_chords(num_nodes, generator)
            num_edges = edge_index.size(1)
            if task.features == "molecule":
                x = torch.stack([torch.randint(0, v, (num_nodes,), generator=generator)
                                 for v in (119, 4, 12, 12, 10, 6, 6, 2, 2)], 1)
                edge_attr = torch.stack([torch.randint(0, v, (num_edges,), generator=generator) for v in (5, 6, 2)], 1)
                if name == "peptides-func":
                    y = (torch.rand(1, 10, generator=generator) < 0.3).float()
                    y[0, 0] = float(len(graphs) % 2)  # every split has both labels in task 0
                else:
                    y = torch.randn(1, 11, generator=generator)
                graphs.append((x, edge_attr, edge_index, y))
            else:
                x = torch.rand(num_nodes, 14, generator=generator)
                edge_attr = torch.rand(num_edges, 2, generator=generator)
                labels = torch.randint(0, task.num_outputs, (num_nodes,), generator=generator)
                if name == "coco-sp":
                    labels = torch.tensor(COCO_CATEGORY_IDS)[labels]
                graphs.append((x, edge_attr, edge_index, labels.tolist()))
        if task.features == "molecule":
            torch.save(graphs, os.path.join(raw_dir, f"{split}.pt"))
        else:
            with open(os.path.join(raw_dir, f"{split}.pickle"), "wb") as f:
                pickle.dump(graphs, f)
    return root
