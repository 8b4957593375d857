r"""Canonical DAG decompositions of line and grid graphs (paper §4.1, Figures 2 and 3, App. B.2).

An undirected line graph is the union of two directed lines, an undirected grid graph the union
of four directed grid DAGs, one flowing towards each corner. Chimera runs its mixer on every DAG,
each with the DAG normalization of Prop. 4.3, and sums the results. The geometry (sequence
lengths or grid sizes, as :class:`~torch_geometric_chimera.transforms.SequenceToLine` and
:class:`~torch_geometric_chimera.transforms.ImageToGrid` record them) says where the DAGs are,
so nothing is inferred from ``edge_index``.

Nodes of every graph are numbered consecutively, graph after graph, as PyG's ``DataLoader``
batches them; inside a sequence in order, inside an image in raster order (row by row).
"""
import weakref
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops._extension import HAS_EXTENSION
from ..ops.common import CsrOperator, host_reads_allowed
from ..ops.grid import (GRID_DIRECTIONS, grid_attention, grid_available, grid_walks, grid_weights, num_checkpoints,
                        segment_rows_for)
from ..ops.triton_grid import grid_attention_triton, grid_plan, grid_triton_available
from ..utils.topology import line_graph_dags

#: Decompositions: ``"line"`` (forward and backward line, Fig. 2), ``"fwd"`` (the forward line
#: alone: causal, Mamba-2's SSD) and ``"grid"`` (four directed grid DAGs, Fig. 3).
DECOMPOSITIONS = ("line", "fwd", "grid")

#: How many DAGs each decomposition has, in the order :func:`decomposition_dags` returns them.
#: Grid DAGs: (down, right), (down, left), (up, right), (up, left).
NUM_DAGS = {"line": 2, "fwd": 1, "grid": 4}

#: Which set of ``B, C`` parameters each DAG uses (App. B.2). Picture the grid DAGs as the
#: 2 x 2 table ``[[down-right, down-left], [up-right, up-left]]``:
#:
#: - ``"none"``: every DAG has its own ``B, C``;
#: - ``"complete"``: all DAGs share one ``B, C``;
#: - ``"row"``: DAGs in one row of the table (same vertical direction) share;
#: - ``"diagonal"``: DAGs on one diagonal of the table (a DAG and its reverse: down-right with
#:   up-left, down-left with up-right) share.
#:
#: A line has two DAGs, a forward and its reverse: ``"none"`` gives each its own ``B, C``,
#: every other mode shares one.
SHARING = ("none", "complete", "row", "diagonal")
_GROUPS = {
    "grid": {"none": (0, 1, 2, 3), "complete": (0, 0, 0, 0), "row": (0, 0, 1, 1), "diagonal": (0, 1, 1, 0)},
    "line": {"none": (0, 1), "complete": (0, 0), "row": (0, 0), "diagonal": (0, 0)},
    "fwd": {mode: (0,) for mode in SHARING},
}


def sharing_groups(decomposition: str, sharing: str) -> Tuple[int, ...]:
    """The ``B, C`` parameter set of every DAG of ``decomposition`` under ``sharing``."""
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS}, got {decomposition!r}")
    if sharing not in SHARING:
        raise ValueError(f"sharing: expected one of {SHARING}, got {sharing!r}")
    return _GROUPS[decomposition][sharing]


def _node_coordinates(sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(node, graph, local)`` of every node of graphs with ``sizes`` nodes, numbered in order."""
    num_nodes = int(sizes.sum())
    graph = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes, output_size=num_nodes)
    offsets = torch.cumsum(sizes, 0) - sizes
    node = torch.arange(num_nodes, device=sizes.device)
    return node, graph, node - offsets[graph]


def batched_line_dags(seq_len: Tensor) -> List[Tensor]:
    r"""Forward (``t -> t + 1``) and backward (``t + 1 -> t``) chains of every sequence of a batch
    with lengths ``seq_len`` (``[G]``), nodes numbered sequence after sequence."""
    seq_len = seq_len.view(-1).long()
    num_nodes = int(seq_len.sum())
    batch = torch.repeat_interleave(torch.arange(seq_len.numel(), device=seq_len.device), seq_len,
                                    output_size=num_nodes)
    return list(line_graph_dags(num_nodes, batch))


def batched_grid_dags(grid_size: Tensor) -> List[Tensor]:
    r"""The four directed grid DAGs of every image of a batch with ``grid_size`` (``[G, 2]``:
    height and width), nodes numbered image after image in raster order: (down, right),
    (down, left), (up, right), (up, left), as :func:`~torch_geometric_chimera.utils.grid_graph_dags`
    gives for one image."""
    grid_size = grid_size.view(-1, 2).long()
    height, width = grid_size[:, 0], grid_size[:, 1]
    node, graph, local = _node_coordinates(height * width)
    row_width = width[graph]
    row, column = local // row_width, local % row_width
    has_right = column < row_width - 1
    has_down = row < height[graph] - 1
    right = torch.stack([node[has_right], node[has_right] + 1])
    down = torch.stack([node[has_down], node[has_down] + row_width[has_down]])
    left, up = right.flip(0), down.flip(0)
    return [torch.cat([down, right], 1), torch.cat([down, left], 1),
            torch.cat([up, right], 1), torch.cat([up, left], 1)]


class _DagCache:
    """The DAGs of the last few geometry tensors, so every layer of a model on one mini-batch
    reuses the same edge tensors (and with them the cached :class:`GraphTopology`). Entries hold
    weak references and version counters, as :meth:`GraphTopology.get` does."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: List[Tuple] = []

    def get(self, kind: Hashable, geometry: Tensor, build: Callable[[], Any]) -> Any:
        if geometry.is_inference():
            return build()
        for ref, version, entry_kind, dags in self.entries:
            if ref() is geometry and version == geometry._version and entry_kind == kind:
                return dags
        dags = build()
        self.entries = ([(weakref.ref(geometry), geometry._version, kind, dags)]
                        + [e for e in self.entries if e[0]() is not None][:self.size - 1])
        return dags


def _build(decomposition: str, geometry: Tensor) -> List[Tensor]:
    if decomposition == "grid":
        return batched_grid_dags(geometry)
    dags = batched_line_dags(geometry)
    return dags[:1] if decomposition == "fwd" else dags


_CACHE = _DagCache()


def decomposition_dags(decomposition: str, num_nodes: int, *, grid_size: Optional[Tensor] = None,
                       seq_len: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                       device: Optional[torch.device] = None) -> List[Tensor]:
    r"""The DAGs of ``decomposition`` over a batch of ``num_nodes`` nodes.

    Args:
        decomposition (str): ``"line"``, ``"fwd"`` or ``"grid"``.
        num_nodes (int): total number of nodes; checked against the geometry.
        grid_size (LongTensor, optional): ``[G, 2]`` height and width of every image (``"grid"``).
        seq_len (LongTensor, optional): ``[G]`` length of every sequence (``"line"``, ``"fwd"``);
            when :obj:`None`, every graph of ``batch`` (or the whole input) is one sequence.
        batch (LongTensor, optional): ``[N]`` graph of every node, used only without ``seq_len``.
        device (torch.device, optional): where the DAGs go when neither ``seq_len`` nor ``batch``
            is given (default: CPU).

    :rtype: list of :class:`LongTensor` ``[2, E_d]``, one per DAG (:data:`NUM_DAGS`).
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS}, got {decomposition!r}")
    if decomposition == "grid":
        if grid_size is None:
            raise ValueError("grid_size: decomposition='grid' needs the [num_graphs, 2] grid size of every image "
                             "(ImageToGrid records it as data.grid_size)")
        if grid_size.dim() not in (1, 2) or grid_size.size(-1) != 2 or grid_size.is_floating_point():
            raise ValueError(f"grid_size: expected an integer tensor of shape [num_graphs, 2], got "
                             f"{list(grid_size.shape)} of dtype {grid_size.dtype}")
        geometry = grid_size
        total = grid_size.view(-1, 2).long().prod(-1).sum()
        name = "grid_size"
    else:
        if seq_len is None:
            # Every graph of batch (or the whole input) is one sequence: no lengths needed, no host read.
            forward_only = decomposition == "fwd"
            if batch is not None:
                dags = _CACHE.get(decomposition, batch, lambda: list(line_graph_dags(num_nodes, batch)))
                return dags[:1] if forward_only else dags
            key = (num_nodes, str(torch.device(device or "cpu")))
            if key not in _SINGLE_SEQUENCE:
                if len(_SINGLE_SEQUENCE) > 64:  # bounded: many distinct lengths only cost cache misses
                    _SINGLE_SEQUENCE.clear()
                _SINGLE_SEQUENCE[key] = list(line_graph_dags(num_nodes, device=device))
            dags = _SINGLE_SEQUENCE[key]
            return dags[:1] if forward_only else dags
        if seq_len.dim() > 1 or seq_len.is_floating_point():
            raise ValueError(f"seq_len: expected an integer tensor of shape [num_graphs], got "
                             f"{list(seq_len.shape)} of dtype {seq_len.dtype}")
        geometry = seq_len
        total = seq_len.long().sum()
        name = "seq_len"
    if host_reads_allowed(geometry):  # CPU, or torch_geometric.debug() on accelerators
        if int(total) != num_nodes or bool((geometry < 0).any()):
            raise ValueError(f"{name}: the graphs it describes have {int(total)} nodes in all, but x has "
                             f"{num_nodes} (sizes must be non-negative)")
    return _CACHE.get(decomposition, geometry, lambda: _build(decomposition, geometry))


_SINGLE_SEQUENCE: Dict[Tuple[int, str], List[Tensor]] = {}


def local_neighbors(dags: List[Tensor], num_nodes: int) -> Tuple[Tensor, Optional[CsrOperator]]:
    r"""The edges of a decomposition's local convolution, every neighbour once: the forward line
    alone for ``"fwd"`` (causal), both lines for ``"line"``, and for ``"grid"`` the down-left and
    up-right DAGs, which together hold each of the four neighbour directions once. With the
    compiled extension on CPU, also their CSR operator (the sum over neighbours as one
    ``chimera::spmm``, kept with the DAGs)."""
    def build():
        edge_index = torch.cat(dags[1:3] if len(dags) == 4 else dags, 1)
        operator = CsrOperator(edge_index, num_nodes) if HAS_EXTENSION and edge_index.device.type == "cpu" else None
        return edge_index, operator
    return _CACHE.get("local", dags[0], build)


def decomposed_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, delta: Tensor, dags: List[Tensor],
                                   groups: Tuple[int, ...], *, batch: Optional[Tensor] = None,
                                   grid_size: Optional[Tensor] = None, method: str = "auto",
                                   **solver_options) -> Tensor:
    r"""The Chimera mixer summed over the DAGs of a decomposition:

    .. math::
        \mathbf{y} = \sum_{d} \left((\mathbf{I} - \mathbf{A}_d)^{-1} \odot
            \mathbf{C}_{g(d)} \bar{\mathbf{B}}_{g(d), d}^\top\right) \mathbf{V},

    where :math:`\mathbf{A}_d` and :math:`\bar{\mathbf{B}}_{g(d), d}` follow the DAG normalization
    of Prop. 4.3 (:func:`~torch_geometric_chimera.nn.adjacency.dag_adjacency`) on DAG :math:`d`,
    and :math:`g(d)` = ``groups[d]`` picks the parameter set of ``B, C`` (:data:`SHARING`).

    Args:
        query (Tensor): :math:`\mathbf{C}`, ``[N, num_sets, H, S]``, or ``[N, num_sets, 1, S]``
            when the heads share it.
        key (Tensor): :math:`\mathbf{B}`, shaped like ``query``.
        value (Tensor): :math:`\mathbf{V}`, ``[N, H, P]``.
        delta (Tensor): selectivity :math:`\Delta \ge 0`, ``[N, H]``, shared by the DAGs.
        dags (list of LongTensor): the DAGs, ``[2, E_d]`` each (:func:`decomposition_dags`).
        groups (tuple of int): parameter set of every DAG.
        batch (LongTensor, optional): ``[N]``, so exact solvers work graph by graph.
        grid_size (LongTensor, optional): ``[G, 2]`` when ``dags`` are the four grid DAGs of
            :func:`batched_grid_dags`: with ``method="auto"`` they are then solved row by row, on
            CPU by :func:`~torch_geometric_chimera.ops.grid.grid_attention`, on a GPU with Triton by
            :func:`~torch_geometric_chimera.ops.triton_grid.grid_attention_triton`.
        method (str, optional): solver of every DAG, see
            :func:`~torch_geometric_chimera.ops.resolvent_attention`. (default: ``"auto"``, which
            takes ``"line"`` on directed lines and the row-by-row grid kernel on grids, where it
            exists)
        **solver_options: passed on to :func:`~torch_geometric_chimera.ops.resolvent_attention`.

    :rtype: :class:`Tensor` ``[N, H, P]``.
    """
    from ..ops import resolvent_attention
    from .adjacency import dag_adjacency

    if len(groups) != len(dags):
        raise ValueError(f"groups: expected one parameter set per DAG ({len(dags)}), got {len(groups)}")
    if query.dim() != 4 or key.shape != query.shape or max(groups) >= query.size(1):
        raise ValueError(f"query: expected shape [N, num_sets, H, S] (or [N, num_sets, 1, S], shared by the heads) "
                         f"with num_sets > {max(groups)}, like key, got {list(query.shape)} and {list(key.shape)}")
    heads = value.size(1)
    if query.size(2) not in (1, heads):
        raise ValueError(f"query: expected H = {heads} heads (like value) or 1, got shape {list(query.shape)}")
    walks = plan = None
    on_cpu, on_triton = grid_available(value), grid_triton_available(value)
    if grid_size is not None and method == "auto" and (on_cpu or on_triton):
        if len(dags) != len(GRID_DIRECTIONS):
            raise ValueError(f"grid_size: given for the four grid DAGs, but dags has {len(dags)}")
        walks = _CACHE.get("grid_walks", grid_size, lambda: grid_walks(grid_size, dags))
        if on_cpu:
            segment_rows = segment_rows_for(walks, query.size(-1), value.size(-1), query.element_size())
            checkpoints = num_checkpoints(walks.graph_ptr, walks.row_width, segment_rows)  # shared by the DAGs
        else:  # the Triton row-scan kernels (GPU); the plan reads the sizes once per geometry and shape
            key = ("grid_plan", query.size(-1), value.size(-1), query.element_size())
            plan = _CACHE.get(key, grid_size, lambda: grid_plan(walks.graph_ptr, walks.row_width, query.size(-1),
                                                                  value.size(-1), element_size=query.element_size()))
        value = value.contiguous()  # once, not in every DAG's kernel call
    # CPU: the four DAGs in one kernel call, whose tasks are whole images (all heads); with fewer
    # images than threads, one call per DAG keeps every (image, head) a task of its own.
    if (walks is not None and plan is None and query.size(2) == 1
            and walks.graph_ptr.numel() - 1 >= torch.get_num_threads()):
        return _stacked_grid_attention(query, key, value, delta, dags, groups, walks, segment_rows, checkpoints)
    out: Optional[Tensor] = None
    queries: Dict[int, Tensor] = {}
    for d, (dag, group) in enumerate(zip(dags, groups)):
        edge_weight, key_scale = dag_adjacency(delta, dag)
        # Select the set, then broadcast over heads: gradients stay [N, num_sets, 1, S]-sized.
        query_d = queries.get(group)
        if query_d is None:
            query_d = query[:, group].expand(-1, heads, -1)
            if walks is not None:  # the kernels read it contiguous: copy once per set, not in every call
                query_d = query_d.contiguous()
            queries[group] = query_d
        key_d = key[:, group] * key_scale.unsqueeze(-1)
        if walks is not None:
            weight = grid_weights(edge_weight, walks.weight_index[d], value.size(0))
            if plan is None:
                y = grid_attention(walks.graph_ptr, walks.row_width, walks.nodes[d], weight, query_d, key_d, value,
                                   segment_rows, checkpoints)
            else:
                y = grid_attention_triton(walks.graph_ptr, walks.row_width, walks.nodes[d], weight, query_d, key_d,
                                          value, plan=plan)
        else:
            y = resolvent_attention(query_d, key_d, value, dag, edge_weight, method=method, batch=batch,
                                    **solver_options)
        out = y if out is None else out.add_(y)  # y is a fresh tensor; add's backward needs neither
    return out


def _stacked_grid_attention(query: Tensor, key: Tensor, value: Tensor, delta: Tensor, dags: List[Tensor],
                            groups: Tuple[int, ...], walks, segment_rows: int, checkpoints: int) -> Tensor:
    """The grid DAGs of a decomposition in one ``chimera::grid_attention`` call: the kernel sums
    their outputs (and value gradients) in place of one tensor per DAG added up afterwards."""
    from .adjacency import dag_adjacency

    num_nodes = value.size(0)
    weights = []
    for d, dag in enumerate(dags):
        edge_weight, key_scale = dag_adjacency(delta, dag)
        # [N, 3, H]: the edge from above, from before in the row, and the key's scale per head
        weights.append(torch.cat([grid_weights(edge_weight, walks.weight_index[d], num_nodes),
                                  key_scale.unsqueeze(1)], 1))
    index = torch.tensor(groups, device=query.device)
    # [N, D, 1, S]: the kernel scales the key per head and shares both over the heads, so no
    # [N, D, H, S] tensor is made.
    query_all, key_all = query.index_select(1, index), key.index_select(1, index)
    nodes = _CACHE.get("grid_nodes", dags[0], lambda: torch.stack(walks.nodes))
    return grid_attention(walks.graph_ptr, walks.row_width, nodes, torch.stack(weights), query_all, key_all, value,
                          segment_rows, checkpoints)
