"""Random graphs and inputs shared by the tests."""
from typing import List, Tuple

import torch
from torch import Tensor


def random_dag(num_nodes: int, num_edges: int, device="cpu") -> Tensor:
    """Edges j -> i with j < i under a random relabelling (so not trivially sorted)."""
    src = torch.randint(0, num_nodes, (num_edges,))
    dst = torch.randint(0, num_nodes, (num_edges,))
    keep = src != dst
    lo, hi = torch.minimum(src, dst)[keep], torch.maximum(src, dst)[keep]
    perm = torch.randperm(num_nodes)
    return torch.stack([perm[lo], perm[hi]]).to(device)


def random_graph(num_nodes: int, num_edges: int, device="cpu", self_loops: bool = False) -> Tensor:
    """A directed graph with cycles (and optionally self-loops)."""
    edge_index = torch.randint(0, num_nodes, (2, num_edges))
    if not self_loops:
        edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    return edge_index.to(device)


def batch_graphs(graphs: List[Tuple[int, Tensor]]) -> Tuple[Tensor, Tensor, int]:
    """Concatenate ``(num_nodes, edge_index)`` pairs into one disjoint union."""
    edges, batch, offset = [], [], 0
    for g, (n, ei) in enumerate(graphs):
        edges.append(ei + offset)
        batch.append(torch.full((n,), g, dtype=torch.long))
        offset += n
    return torch.cat(edges, 1), torch.cat(batch), offset


def inputs(num_nodes: int, num_edges: int, heads: int = 2, state: int = 3, head_dim: int = 4,
           dtype=torch.float64, device="cpu", scale: float = 0.3, requires_grad: bool = False):
    """query, key, value and contracting edge weights (row sums stay well below 1 on average)."""
    q = torch.randn(num_nodes, heads, state, dtype=dtype, device=device)
    k = torch.randn(num_nodes, heads, state, dtype=dtype, device=device)
    v = torch.randn(num_nodes, heads, head_dim, dtype=dtype, device=device)
    w = scale * torch.rand(num_edges, heads, dtype=dtype, device=device)
    if requires_grad:
        for t in (q, k, v, w):
            t.requires_grad_()
    return q, k, v, w


def row_normalize(edge_index: Tensor, weight: Tensor, num_nodes: int, gamma: float = 0.8) -> Tensor:
    """Scale weights so that every row of A sums to gamma (spectral radius <= gamma)."""
    row_sum = torch.zeros(num_nodes, weight.size(1), dtype=weight.dtype, device=weight.device)
    row_sum = row_sum.index_add(0, edge_index[1], weight)
    return gamma * weight / row_sum[edge_index[1]].clamp_min(1e-12)
