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


def topological_levels(edge_index: Tensor, num_nodes: int, *, raise_on_cycle: bool = True,
                       depth_bound: Optional[int] = None) -> Tensor:
    r"""Longest-path level of every node of a DAG (sources have level 0).

    Kahn's algorithm, one vectorized step per level, :math:`O(|V| + |E|)` work in total.
    Nodes on or downstream of a directed cycle never become free; they get level ``-1``,
    or a :class:`CycleError` is raised when ``raise_on_cycle`` (self-loops are cycles).

    Every step reads its frontier on the host (up to three synchronizations per level on a GPU).
    With ``depth_bound`` given, Kahn's algorithm runs exactly ``depth_bound + 1`` steps on masks over
    all nodes and edges instead: the same levels, no host read, :math:`O(\mathrm{depth\_bound}
    \cdot (|V| + |E|))` work (for batches of small graphs on accelerators).

    Args:
        edge_index (LongTensor): edges ``[2, E]``, source first.
        num_nodes (int): number of nodes ``N``.
        raise_on_cycle (bool, optional): raise on a cycle instead of returning ``-1`` levels.
            (default: :obj:`True`)
        depth_bound (int, optional): a bound on the longest path, in edges, of the acyclic part
            (the largest graph size minus one always is one); nodes beyond it would be taken for
            nodes after a cycle. (default: :obj:`None`)

    :rtype: :class:`LongTensor` of shape ``[N]``.
    """
    if depth_bound is not None and (isinstance(depth_bound, bool) or not isinstance(depth_bound, int)
                                    or depth_bound < 0):
        raise ValueError(f"depth_bound: expected a non-negative int or None, got {depth_bound!r}")
    edge_index = edge_index.long()
    device = edge_index.device
    level = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    if num_nodes == 0:
        return level
    if depth_bound is not None:
        level = _levels_in_steps(edge_index, num_nodes, depth_bound + 1)
        if raise_on_cycle:
            raise_if_cyclic(level)
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


def _levels_in_steps(edge_index: Tensor, num_nodes: int, num_steps: int) -> Tensor:
    """Kahn's algorithm for exactly ``num_steps`` steps, every step over all nodes and edges: the
    level of every node whose longest path has fewer than ``num_steps`` edges, ``-1`` for the others.
    No host read: the number of steps is fixed, the frontier a mask."""
    src, dst = edge_index
    remaining = torch.zeros(num_nodes, dtype=torch.long, device=edge_index.device)
    remaining.index_add_(0, dst, torch.ones_like(dst))  # in-degrees (bincount reads its range on the host)
    level = torch.full_like(remaining, -1)
    for step in range(num_steps):
        free = remaining == 0
        level.masked_fill_(free, step)
        freed = free.long()
        remaining.sub_(freed)  # a freed node drops to -1: it is never free again
        remaining.index_add_(0, dst, freed[src], alpha=-1)
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


#: The eccentricity bound of an undirected component runs one BFS per root; a component is
#: given it only while ``roots x nodes`` stays within this many (source, node) pairs, otherwise
#: it gets ``n_c - 1``. Both choices depend on the component alone, never on labels or batch.
ECCENTRICITY_PAIR_BUDGET = 1 << 22


def weak_components(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Weakly connected component of every node, labelled by its smallest node index (the
    partition does not depend on the labels, only the names of its parts do)."""
    src, dst = edge_index
    both_src, both_dst = torch.cat([src, dst]), torch.cat([dst, src])
    label = torch.arange(num_nodes, device=edge_index.device)
    while True:  # min-label propagation, then pointer jumping to shorten long chains
        new = label.scatter_reduce(0, both_dst, label[both_src], reduce="amin", include_self=True)
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new


def _has_reverse(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Per edge ``j -> i``: whether some edge ``i -> j`` exists (a self-loop is its own reverse)."""
    src, dst = edge_index
    keys, _ = torch.sort(src * num_nodes + dst)
    reverse = dst * num_nodes + src
    position = torch.searchsorted(keys, reverse).clamp_max(max(keys.numel() - 1, 0))
    return keys[position] == reverse


def _invariant_score(edge_index: Tensor, num_nodes: int, rounds: int = 3) -> Tensor:
    """A node score that depends on the graph around the node only, not on its label: the degree,
    refined ``rounds`` times by a hash of the multiset of the neighbours' scores (colour refinement;
    integer arithmetic wraps around, and wrapped sums do not depend on the order of the terms)."""
    src, dst = edge_index
    score = torch.bincount(src, minlength=num_nodes).long()
    for _ in range(rounds):
        mixed = (score * 0x1E3779B97F4A7C15 + 0x632BE59BD9B4E019) * (score ^ 0x5851F42D4C957F2D)
        score = score * 0x2545F4914F6CDD1D + torch.zeros_like(score).index_add_(0, dst, mixed[src])
    return score


def _undirected_eccentricity_bound(edge_index: Tensor, num_nodes: int, label: Tensor) -> Tensor:
    """Per component of a symmetric graph: ``min(2 * min_r ecc(r), n_c - 1)`` with ``r`` over the
    component's nodes of maximal degree and, among those, maximal :func:`_invariant_score`, any of which gives a valid bound
    (``d(u, v) <= d(u, r) + d(r, v)``). Components with more (root, node) pairs than
    :data:`ECCENTRICITY_PAIR_BUDGET` get ``n_c - 1``. Indexed by component label."""
    device = edge_index.device
    size = torch.bincount(label, minlength=num_nodes)
    bound = (size - 1).clamp_min(0)
    # Roots: the nodes of largest degree (hubs tend to be central), and among those the largest
    # refined score, which only shrinks the set (fewer BFS) without looking at labels.
    lowest = torch.full((num_nodes,), torch.iinfo(torch.long).min, device=device)
    degree = torch.bincount(edge_index[0], minlength=num_nodes)
    is_root = degree == lowest.scatter_reduce(0, label, degree, reduce="amax", include_self=True)[label]
    score = torch.where(is_root, _invariant_score(edge_index, num_nodes), torch.iinfo(torch.long).min)
    is_root &= score == lowest.scatter_reduce(0, label, score, reduce="amax", include_self=True)[label]
    roots_per_component = torch.bincount(label[is_root], minlength=num_nodes)
    affordable = roots_per_component * size <= ECCENTRICITY_PAIR_BUDGET
    roots = (is_root & affordable[label]).nonzero().view(-1)
    if roots.numel() == 0:
        return bound
    # One BFS per root, all at once, on (root, node) pairs: root r owns a slice of a flat visited
    # map as long as its component, indexed by the node's rank inside the component.
    by_component = torch.argsort(label, stable=True)
    start = torch.cumsum(size, 0) - size
    local = torch.empty_like(label)
    local[by_component] = torch.arange(num_nodes, device=device) - start[label[by_component]]
    root_size = size[label[roots]]
    root_offset = torch.cumsum(root_size, 0) - root_size
    visited = torch.zeros(int(root_size.sum()), dtype=torch.bool, device=device)
    visited[root_offset + local[roots]] = True
    rowptr, dst_sorted, out_degree = _csr_by_source(edge_index, num_nodes)
    frontier_owner, frontier_node = torch.arange(roots.numel(), device=device), roots
    ecc = torch.zeros(roots.numel(), dtype=torch.long, device=device)
    hop = 0
    while frontier_node.numel() > 0:
        hop += 1
        positions = _gather_out_edges(frontier_node, rowptr, out_degree)
        owner = torch.repeat_interleave(frontier_owner, out_degree[frontier_node], output_size=positions.numel())
        flat = root_offset[owner] + local[dst_sorted[positions]]
        flat = torch.unique(flat[~visited[flat]])
        visited[flat] = True
        frontier_owner = torch.searchsorted(root_offset, flat, right=True) - 1
        rank = flat - root_offset[frontier_owner]
        frontier_node = by_component[start[label[roots[frontier_owner]]] + rank]
        ecc[frontier_owner] = hop
    per_component = torch.full((num_nodes,), torch.iinfo(torch.long).max, device=device).scatter_reduce(
        0, label[roots], 2 * ecc, reduce="amin", include_self=True)
    return torch.minimum(bound, per_component)


def diameter_bound(edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None) -> Tensor:
    r"""An upper bound on every graph's directed diameter, i.e. a ``K`` such that the Neumann series
    :math:`\sum_{k \le K} A^k` reaches every pair of nodes that :math:`(I - A)^{-1}` couples
    (Prop. 4.6 of the paper).

    Per weakly connected component :math:`c` (with :math:`n_c` nodes), the tightest of the bounds
    that apply, and per graph the largest over its components:

    * a DAG: its longest path (exact; then :math:`A^{K+1} = 0`, so the series is exact too);
    * symmetric (undirected: every edge has its reverse): :math:`\min(2\,\mathrm{ecc}(r), n_c - 1)`,
      with :math:`r` the best of the component's nodes of maximal degree after a few rounds of
      colour refinement (see :data:`ECCENTRICITY_PAIR_BUDGET`);
    * otherwise: :math:`n_c - 1`.

    Each bound depends on its component alone: relabelling the nodes or batching the graph with
    others changes nothing.

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
    device = edge_index.device
    level = topological_levels(edge_index, num_nodes, raise_on_cycle=False)
    label = weak_components(edge_index, num_nodes)
    cyclic = torch.zeros(num_nodes, dtype=torch.bool, device=device).index_fill_(0, label[level < 0], True)
    bound = torch.zeros(num_nodes, dtype=torch.long, device=device).scatter_reduce(
        0, label, level.clamp_min(0), reduce="amax", include_self=True)
    if bool(cyclic.any()):
        symmetric = torch.ones(num_nodes, dtype=torch.bool, device=device)
        symmetric[label[edge_index[1][~_has_reverse(edge_index, num_nodes)]]] = False
        fallback = (torch.bincount(label, minlength=num_nodes) - 1).clamp_min(0)
        undirected = cyclic & symmetric
        if bool(undirected.any()):
            keep = undirected[label[edge_index[0]]]
            fallback = torch.where(undirected, _undirected_eccentricity_bound(
                edge_index[:, keep], num_nodes, label), fallback)
        bound = torch.where(cyclic, fallback, bound)
    return _per_graph_max(bound[label], batch, num_graphs)


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
