r"""Topology utilities: DAG checks, topological levels, diameter bounds and DAG decompositions.

Everything here is vectorized over edges; loops run over BFS/Kahn *levels* (the graph depth),
never over nodes or graphs. Convention (PyG): ``edge_index[0]`` is the source ``j`` and
``edge_index[1]`` the target ``i`` of an edge ``j -> i``; it carries ``A[i, j]``.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor


class CycleError(ValueError):
    """Raised when a method that needs a DAG gets a graph with a directed cycle."""


def _csr_by_source(edge_index: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor, Tensor]:
    src, dst = edge_index
    order = torch.argsort(src, stable=True)
    out_degree = torch.bincount(src, minlength=num_nodes)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=src.device)
    torch.cumsum(out_degree, 0, out=rowptr[1:])
    return rowptr, dst[order], out_degree


def _gather_out_edges(frontier: Tensor, rowptr: Tensor, out_degree: Tensor) -> Tensor:
    """Positions (in source-sorted order) of all edges leaving the nodes of ``frontier``."""
    counts = out_degree[frontier]
    total = int(counts.sum())
    starts = torch.repeat_interleave(rowptr[frontier], counts, output_size=total)
    offsets = torch.arange(total, device=frontier.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts, output_size=total)
    return starts + offsets


def topological_levels(edge_index: Tensor, num_nodes: int, *, raise_on_cycle: bool = True) -> Tensor:
    r"""Longest-path level of every node of a DAG (sources have level 0).

    Kahn's algorithm, one vectorized step per level, :math:`O(|V| + |E|)` work in total.
    Nodes on or downstream of a directed cycle never become free; they get level ``-1``,
    or a :class:`CycleError` is raised when ``raise_on_cycle`` (self-loops are cycles).

    Args:
        edge_index (LongTensor): edges ``[2, E]``, source first.
        num_nodes (int): number of nodes ``N``.
        raise_on_cycle (bool, optional): raise on a cycle instead of returning ``-1`` levels.
            (default: :obj:`True`)

    :rtype: :class:`LongTensor` of shape ``[N]``.
    """
    edge_index = edge_index.long()
    device = edge_index.device
    level = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    if num_nodes == 0:
        return level
    rowptr, dst_sorted, out_degree = _csr_by_source(edge_index, num_nodes)
    in_degree = torch.bincount(edge_index[1], minlength=num_nodes)
    frontier = (in_degree == 0).nonzero().view(-1)
    depth = 0
    while frontier.numel() > 0:
        level[frontier] = depth
        targets = dst_sorted[_gather_out_edges(frontier, rowptr, out_degree)]
        in_degree.index_add_(0, targets, torch.full_like(targets, -1))
        candidates = torch.unique(targets)
        frontier = candidates[in_degree[candidates] == 0]
        depth += 1
    if raise_on_cycle:
        raise_if_cyclic(level)
    return level


def raise_if_cyclic(level: Tensor) -> None:
    """Raise :class:`CycleError` when :func:`topological_levels` left nodes unresolved (``-1``)."""
    unresolved = int((level < 0).sum())
    if unresolved:
        raise CycleError(
            f"edge_index: expected a directed acyclic graph, but {unresolved} of {level.numel()} nodes lie on or "
            f"after a directed cycle (self-loops count as cycles); use method='dense' or 'iterative' for "
            f"graphs with cycles, or decompose the graph into DAGs")


def path_roots(edge_index: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor, bool]:
    r"""For a graph in which every node has at most one parent: the root (first node) and the depth
    of every node, by pointer jumping in :math:`\lceil \log_2 N \rceil` vectorized steps.

    Returns ``(root, depth, acyclic)``; ``acyclic`` is ``False`` when some parent chain never
    reaches a node without a parent, i.e. the graph has a cycle.
    """
    edge_index = edge_index.long()
    src, dst = edge_index
    nodes = torch.arange(num_nodes, device=edge_index.device)
    root = nodes.clone()
    root[dst] = src
    depth = (root != nodes).long()
    for _ in range(max(1, num_nodes).bit_length() + 1):
        depth = depth + depth[root]
        root = root[root]
    has_parent = torch.zeros(num_nodes, dtype=torch.bool, device=edge_index.device)
    has_parent[dst] = True
    acyclic = num_nodes == 0 or not bool(has_parent[root].any())
    return root, depth, acyclic


def is_directed_paths(edge_index: Tensor, num_nodes: int) -> bool:
    """``True`` for a union of directed paths (sequences): no node has two parents or two
    children, and no cycle."""
    if edge_index.size(1) == 0:
        return True
    src, dst = edge_index.long()
    if int(torch.bincount(src).max()) > 1 or int(torch.bincount(dst).max()) > 1:
        return False
    return path_roots(edge_index, num_nodes)[2]


def is_dag(edge_index: Tensor, num_nodes: int) -> bool:
    """``True`` when the directed graph has no cycle (self-loops are cycles)."""
    return bool((topological_levels(edge_index, num_nodes, raise_on_cycle=False) >= 0).all())


def is_symmetric(edge_index: Tensor, num_nodes: int) -> bool:
    """``True`` when every edge ``j -> i`` has a reverse edge ``i -> j`` (multiplicity ignored)."""
    if edge_index.size(1) == 0:
        return True
    forward = torch.unique(edge_index[0] * num_nodes + edge_index[1])
    backward = torch.unique(edge_index[1] * num_nodes + edge_index[0])
    return forward.numel() == backward.numel() and bool((forward == backward).all())


def _num_graphs(batch: Optional[Tensor]) -> int:
    return 1 if batch is None or batch.numel() == 0 else int(batch.max()) + 1


def _per_graph_max(values: Tensor, batch: Optional[Tensor], num_graphs: int) -> Tensor:
    out = torch.zeros(num_graphs, dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return out
    index = torch.zeros_like(values) if batch is None else batch
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def _undirected_eccentricity_bound(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Per node, ``min(2 * ecc(root), |component| - 1)`` of its connected component, where ``root``
    is the component's smallest node. Valid diameter bound for symmetric graphs."""
    src, dst = edge_index
    device = edge_index.device
    # Connected components by min-label propagation: one vectorized step per hop.
    label = torch.arange(num_nodes, device=device)
    while True:
        new = label.scatter_reduce(0, dst, label[src], reduce="amin", include_self=True)
        if torch.equal(new, label):
            break
        label = new
    # BFS from every component root at once.
    dist = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    roots = (label == torch.arange(num_nodes, device=device)).nonzero().view(-1)
    dist[roots] = 0
    rowptr, dst_sorted, out_degree = _csr_by_source(edge_index, num_nodes)
    frontier, hop = roots, 0
    while frontier.numel() > 0:
        hop += 1
        targets = torch.unique(dst_sorted[_gather_out_edges(frontier, rowptr, out_degree)])
        frontier = targets[dist[targets] < 0]
        dist[frontier] = hop
    ecc = torch.zeros(num_nodes, dtype=torch.long, device=device).scatter_reduce(
        0, label, dist, reduce="amax", include_self=True)
    size = torch.bincount(label, minlength=num_nodes)
    return torch.minimum(2 * ecc, (size - 1).clamp_min(0))[label]


def diameter_bound(edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None) -> Tensor:
    r"""An upper bound on every graph's directed diameter, i.e. a ``K`` such that the Neumann series
    :math:`\sum_{k \le K} A^k` reaches every pair of nodes that :math:`(I - A)^{-1}` couples
    (Prop. 4.6 of the paper).

    Per graph, the tightest of the bounds that apply:

    * a DAG: its longest path (exact; then :math:`A^{K+1} = 0`, so the series is exact too);
    * a symmetric (undirected) graph: :math:`\min(2\,\mathrm{ecc}(r), n_c - 1)` over its connected
      components, with :math:`r` the component's first node;
    * otherwise: :math:`n - 1`.

    Args:
        edge_index (LongTensor): edges ``[2, E]``.
        num_nodes (int): total number of nodes.
        batch (LongTensor, optional): graph id of every node. (default: :obj:`None`)

    :rtype: :class:`LongTensor` of shape ``[num_graphs]``.
    """
    num_graphs = _num_graphs(batch)
    edge_index = edge_index.long()
    batch = batch.long() if batch is not None else None
    if num_nodes == 0:
        return torch.zeros(num_graphs, dtype=torch.long, device=edge_index.device)
    level = topological_levels(edge_index, num_nodes, raise_on_cycle=False)
    ones = torch.ones(num_nodes, dtype=torch.long, device=edge_index.device)
    graph = torch.zeros_like(ones) if batch is None else batch
    nodes_per_graph = torch.zeros(num_graphs, dtype=torch.long, device=ones.device).index_add_(0, graph, ones)
    cyclic = _per_graph_max((level < 0).long(), batch, num_graphs).bool()
    bound = _per_graph_max(level.clamp_min(0), batch, num_graphs)
    if bool(cyclic.any()):
        fallback = (nodes_per_graph - 1).clamp_min(0)
        if is_symmetric(edge_index, num_nodes):
            fallback = _per_graph_max(_undirected_eccentricity_bound(edge_index, num_nodes), batch, num_graphs)
        bound = torch.where(cyclic, fallback, bound)
    return bound


def line_graph_dags(num_nodes: int, batch: Optional[Tensor] = None,
                    device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    r"""The canonical 2-DAG decomposition of (a batch of) undirected line graphs (paper Fig. 2):
    the forward chain ``t -> t + 1`` and the backward chain ``t + 1 -> t`` within every sequence.

    Args:
        num_nodes (int): total number of tokens.
        batch (LongTensor, optional): sequence id of every token, sorted. (default: :obj:`None`)

    Returns:
        ``(forward_edge_index, backward_edge_index)``, each ``[2, N - num_sequences]``.
    """
    if batch is not None:
        device = batch.device
    index = torch.arange(num_nodes, device=device)
    src, dst = index[:-1], index[1:]
    if batch is not None and num_nodes > 1:
        same = batch[:-1] == batch[1:]
        src, dst = src[same], dst[same]
    forward = torch.stack([src, dst])
    return forward, forward.flip(0)


def grid_graph_dags(height: int, width: int, device: Optional[torch.device] = None) -> List[Tensor]:
    r"""The canonical 4-DAG decomposition of an ``height x width`` grid graph (paper Fig. 3).

    Node ``(r, c)`` has index ``r * width + c``. The four DAGs flow towards the four corners:
    (down, right), (down, left), (up, right) and (up, left); each has the horizontal edges of its
    horizontal direction and the vertical edges of its vertical direction.

    :rtype: list of four :class:`LongTensor` of shape ``[2, E]``.
    """
    index = torch.arange(height * width, device=device).view(height, width)
    right = torch.stack([index[:, :-1].reshape(-1), index[:, 1:].reshape(-1)])
    down = torch.stack([index[:-1, :].reshape(-1), index[1:, :].reshape(-1)])
    left, up = right.flip(0), down.flip(0)
    return [torch.cat([down, right], 1), torch.cat([down, left], 1),
            torch.cat([up, right], 1), torch.cat([up, left], 1)]
