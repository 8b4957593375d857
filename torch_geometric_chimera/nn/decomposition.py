r"""Canonical DAG decompositions of line and grid graphs (paper §4.1, Figures 2 and 3, App. B.2),
built as the authors' image and text models build them.

An undirected line graph is the union of two directed lines, an undirected grid graph the union
of four directed grid DAGs, one flowing towards each corner. Chimera runs its mixer on every DAG
and sums the results. The geometry (sequence lengths or grid sizes, as
:class:`~torch_geometric_chimera.transforms.SequenceToLine` and
:class:`~torch_geometric_chimera.transforms.ImageToGrid` record them) says where the DAGs are, so
nothing is inferred from ``edge_index``, and it gives every edge a *direction*, which the layer
uses twice (DESIGN.md §4):

* **Selectivity per DAG and edge direction.** On grids every DAG ``d`` has its own
  :math:`\Delta_{i,d,r}` for the edge arriving at ``i`` from the vertical (``r = 0``) and from the
  horizontal (``r = 1``) neighbour, and

  .. math::
      A^{(d)}_{ij} = \frac{\exp(-\Delta_{i,d,r(j \to i)})}{\sqrt{|p_d(i)|}}, \qquad
      \bar{\mathbf{B}}^{(d)}_i = \frac{\sum_{j \in p_d(i)} \Delta_{i,d,r(j \to i)}}{\sqrt{|p_d(i)|}}
          \mathbf{B}_i,

  so a DAG's source corner gets no input of its own in that DAG (the other DAGs carry it), as in
  the authors' image code. The four outputs are summed and scaled by :math:`1/\sqrt{4}`.
* On lines each direction has its own :math:`\Delta`, and every direction is Mamba-2 itself:
  :math:`A_{t,t-1} = \exp(-a_h \Delta_t)`, :math:`\bar{\mathbf{B}}_t = \Delta_t \mathbf{B}_t` (the
  first token included), with Mamba-2's learned decay rate :math:`a_h = \exp(\mathrm{A\_log}_h)`
  per head (shared by the directions, starting at 1 as in the authors' text model); the two
  directions are summed. Grids have no :math:`a_h`, as the authors' image model.
* With signed transitions (the layer's ``transitions="signed"``) every :math:`\exp(-\Delta)` above
  becomes :math:`2\exp(-\Delta) - 1` (:func:`~torch_geometric_chimera.nn.adjacency.transition`),
  normalizations unchanged.

(The local convolution, one weight per offset, is :func:`decomposition_conv_silu`.)

Nodes of every graph are numbered consecutively, graph after graph, as PyG's ``DataLoader``
batches them; inside a sequence in order, inside an image in raster order (row by row).
"""
import math
import weakref
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.block import block_kernels_available, window_conv_silu, window_conv_silu_reference
from ..ops.common import host_reads_allowed
from ..ops.grid import (GRID_DIRECTIONS, grid_attention, grid_available, grid_mixer, grid_selectivity, grid_walks,
                        num_checkpoints, segment_rows_for)
from ..ops.triton_grid import grid_attention_triton, grid_plan, grid_triton_available
from .adjacency import transition

#: Decompositions: ``"line"`` (forward and backward line, Fig. 2), ``"fwd"`` (the forward line
#: alone: causal, Mamba-2), ``"grid"`` (four directed grid DAGs, Fig. 3) and, as the baseline that
#: vision SSMs use, ``"cross_scan"`` (VMamba's SS2D: four raster scans of every image, row-major
#: and column-major, each forward and reverse, every one a Mamba-2 line); for text, ``"hydra"``
#: (Hydra's bidirectional mixer: the two lines' outputs each shifted by one token, so neither
#: direction sees the token itself, plus a data-dependent diagonal term; see :class:`ChimeraConv`).
DECOMPOSITIONS = ("line", "fwd", "grid", "cross_scan", "hydra")

#: Decompositions whose geometry is a grid (``grid_size``); the others take ``seq_len``.
GRID_LIKE = ("grid", "cross_scan")

#: How many DAGs each decomposition has, in the order :func:`decomposition_dags` returns them.
#: Grid DAGs: (down, right), (down, left), (up, right), (up, left); lines: forward, backward.
NUM_DAGS = {"line": 2, "fwd": 1, "grid": 4, "cross_scan": 4, "hydra": 2}

#: Edge directions a node's parents can come from: on grids the vertical (slot 0) and the
#: horizontal (slot 1) neighbour, on lines the one previous token.
NUM_DIRECTIONS = {"line": 1, "fwd": 1, "grid": 2, "cross_scan": 1, "hydra": 1}

#: Scale of the sum over the DAGs: the authors' image model divides it by the square root of the
#: number of DAGs; their text model adds the two directions, as VMamba adds its four scans.
DAG_SUM_SCALE = {"line": 1.0, "fwd": 1.0, "grid": 1.0 / math.sqrt(4), "cross_scan": 1.0, "hydra": 1.0}

#: Default width of the local convolution: 3 x 3 on grids (the authors' ``d_conv=2``), 7 taps
#: centred on lines (their text model), Mamba-2's causal 4 for ``"fwd"``.
CONV_KERNEL = {"grid": 3, "line": 7, "fwd": 4, "cross_scan": 3, "hydra": 7}

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
#: every other mode shares one. The cross-scan's DAGs are (row-major, its reverse, column-major,
#: its reverse): ``"row"`` and ``"diagonal"`` both pair a scan with its reverse.
SHARING = ("none", "complete", "row", "diagonal")
_GROUPS = {
    "grid": {"none": (0, 1, 2, 3), "complete": (0, 0, 0, 0), "row": (0, 0, 1, 1), "diagonal": (0, 1, 1, 0)},
    "line": {"none": (0, 1), "complete": (0, 0), "row": (0, 0), "diagonal": (0, 0)},
    "hydra": {"none": (0, 1), "complete": (0, 0), "row": (0, 0), "diagonal": (0, 0)},
    "fwd": {mode: (0,) for mode in SHARING},
    "cross_scan": {"none": (0, 1, 2, 3), "complete": (0, 0, 0, 0), "row": (0, 0, 1, 1), "diagonal": (0, 0, 1, 1)},
}

#: Which DAGs share their selectivity :math:`\Delta` (the authors' ``share_dt_for_two_graphs``):
#: ``"none"`` (each DAG its own) or ``"diagonal"`` (a DAG and its reverse share, as ``sharing``).
SHARE_DT = ("none", "diagonal")


def sharing_groups(decomposition: str, sharing: str) -> Tuple[int, ...]:
    """The ``B, C`` parameter set of every DAG of ``decomposition`` under ``sharing``."""
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS}, got {decomposition!r}")
    if sharing not in SHARING:
        raise ValueError(f"sharing: expected one of {SHARING}, got {sharing!r}")
    return _GROUPS[decomposition][sharing]


def dt_groups(decomposition: str, share_dt: str) -> Tuple[int, ...]:
    """The :math:`\\Delta` set of every DAG of ``decomposition`` under ``share_dt``."""
    if share_dt not in SHARE_DT:
        raise ValueError(f"share_dt: expected one of {SHARE_DT}, got {share_dt!r}")
    return sharing_groups(decomposition, share_dt)


class DecompositionGeometry:
    r"""Everything a decomposition derives from the geometry alone, built once per geometry
    tensor and shared by every layer of a model on one mini-batch.

    Attributes:
        decomposition (str): ``"line"``, ``"fwd"`` or ``"grid"``.
        sizes (LongTensor): ``[G, 2]`` height and width of every image, or ``[G]`` sequence lengths.
        num_nodes (int): ``N``.
        graph_ptr (LongTensor): ``[G + 1]`` first node of every graph.
        batch (LongTensor): ``[N]`` graph of every node.
        dags (list of LongTensor): ``[2, E_d]`` per DAG, edges grouped by direction slot.
        edge_slot (list of LongTensor): ``[E_d]`` per DAG: ``R * target + slot``, where edge ``e``
            reads its weight in a flattened ``[N * R, H]`` per-node table.
        parents (BoolTensor): ``[D, N, R]``: whether node ``i`` has a parent in slot ``r`` of DAG ``d``.
        uniform (tuple of int, optional): ``(G, height, width)`` or ``(G, length)`` when every graph
            has the same shape (the local convolution is then one batched call), else :obj:`None`.
    """

    def __init__(self, decomposition: str, sizes: Tensor, num_nodes: int):
        self.decomposition, self.sizes, self.num_nodes = decomposition, sizes, num_nodes
        device = sizes.device
        grid = decomposition in GRID_LIKE
        counts = sizes[:, 0] * sizes[:, 1] if grid else sizes
        num_graphs = counts.numel()
        self.graph_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.batch = torch.repeat_interleave(torch.arange(num_graphs, device=device), counts, output_size=num_nodes)
        node = torch.arange(num_nodes, device=device)
        local = node - self.graph_ptr[self.batch]
        # Per DAG and slot: which nodes have a parent there, and which node it is.
        links: List[List[Tuple[Tensor, Tensor]]] = []
        if grid:
            height, width = sizes[self.batch, 0], sizes[self.batch, 1]
            row, column = local // width.clamp_min(1), local % width.clamp_min(1)
            self.coordinates = (row, column, height, width)
            if decomposition == "cross_scan":  # each scan: the node before in its order
                size = height * width
                by_column = column * height + row  # position in the column-major scan
                links = [[(local > 0, node - 1)], [(local < size - 1, node + 1)],
                         [(by_column > 0, torch.where(row > 0, node - width, node + (height - 1) * width - 1))],
                         [(by_column < size - 1,
                           torch.where(row < height - 1, node + width, node - (height - 1) * width + 1))]]
            for flip_rows, flip_columns in GRID_DIRECTIONS if decomposition == "grid" else ():
                vertical = (row < height - 1, node + width) if flip_rows else (row > 0, node - width)
                horizontal = (column < width - 1, node + 1) if flip_columns else (column > 0, node - 1)
                links.append([vertical, horizontal])
        else:
            length = counts[self.batch]
            self.coordinates = (local, length)
            links.append([(local > 0, node - 1)])
            if decomposition in ("line", "hydra"):
                links.append([(local < length - 1, node + 1)])
        directions = NUM_DIRECTIONS[decomposition]
        self.parents = torch.stack([torch.stack([valid for valid, _ in dag], -1) for dag in links])
        if decomposition == "hydra":  # [D, N]: the one parent of every node, N (a zero row) for none
            self.parent_index = torch.stack([torch.where(dag[0][0], dag[0][1], num_nodes) for dag in links])
        self.dags, self.edge_slot = [], []
        if not grid and num_graphs == 1:  # one sequence: no boolean masks, so nothing is read on the device
            forward = torch.stack([node[:-1], node[1:]])
            self.dags = [forward, forward.flip(0)][:len(links)]
            self.edge_slot = [dag[1] for dag in self.dags]
        for dag in links[len(self.dags):]:
            self.dags.append(torch.cat([torch.stack([parent[valid], node[valid]]) for valid, parent in dag], 1))
            self.edge_slot.append(torch.cat([node[valid] * directions + slot for slot, (valid, _) in enumerate(dag)]))
        self.uniform: Optional[Tuple[int, ...]] = None
        if not grid and num_graphs == 1 and num_nodes > 0:  # one sequence: nothing to read
            self.uniform = (1, num_nodes)
        elif num_graphs and device.type != "meta":  # the sizes were read on the host already (_checked_sizes)
            first = sizes[0]
            if bool((sizes == first).all()) and bool((counts > 0).all()):
                self.uniform = (num_graphs,) + tuple(int(v) for v in first.view(-1))
        self._memo: Dict[Hashable, Any] = {}

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """A value derived from this geometry alone, built on first use."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


class _GeometryCache:
    """Values built from the last few geometry tensors, so every layer of a model on one
    mini-batch reuses them. Entries hold weak references and version counters, as
    :meth:`GraphTopology.get` does: an in-place write to the tensor is a miss."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: List[Tuple] = []

    def get(self, kind: Hashable, geometry: Tensor, build: Callable[[], Any]) -> Any:
        if geometry.is_inference():
            return build()
        for ref, version, entry_kind, value in self.entries:
            if ref() is geometry and version == geometry._version and entry_kind == kind:
                return value
        value = build()
        self.entries = ([(weakref.ref(geometry), geometry._version, kind, value)]
                        + [e for e in self.entries if e[0]() is not None][:self.size - 1])
        return value


_CACHE = _GeometryCache()
_SINGLE_SEQUENCE: Dict[Tuple[int, str, str], DecompositionGeometry] = {}


def _checked_sizes(decomposition: str, geometry: Tensor, num_nodes: int, name: str) -> Tensor:
    """``geometry`` as long sizes, every entry checked before anything is summed or multiplied:
    an int64 sum or product that wraps around could otherwise match ``num_nodes`` by accident."""
    shape = "[num_graphs, 2]" if name == "grid_size" else "[num_graphs]"
    if geometry.is_floating_point() or geometry.is_complex() or geometry.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of shape {shape}, got dtype {geometry.dtype}")
    if name == "grid_size":
        if geometry.dim() not in (1, 2) or geometry.size(-1) != 2:
            raise ValueError(f"{name}: expected an integer tensor of shape {shape}, got {list(geometry.shape)}")
        sizes = geometry.reshape(-1, 2).long()
    else:
        if geometry.dim() > 1:
            raise ValueError(f"{name}: expected an integer tensor of shape {shape}, got {list(geometry.shape)}")
        sizes = geometry.reshape(-1).long()
    # The sizes are read on the host once per geometry tensor (the DAGs need them anyway).
    if bool((sizes < 0).any()) or bool((sizes > num_nodes).any()):
        raise ValueError(f"{name}: every entry must lie in [0, N] = [0, {num_nodes}] (N, the nodes of x), got "
                         f"entries from {int(sizes.min())} to {int(sizes.max())}")
    if name == "grid_size":
        height, width = sizes[:, 0], sizes[:, 1]
        # height * width <= N without forming a product that could wrap: height <= N // width.
        if bool((height > num_nodes // width.clamp_min(1)).any()):
            raise ValueError(f"{name}: an image has height * width > N = {num_nodes} nodes")
        counts = height * width
    else:
        counts = sizes
    # Each count is at most N now, so the sum cannot wrap for any realistic number of graphs.
    total = int(counts.sum())
    if total != num_nodes:
        raise ValueError(f"{name}: the graphs it describes have {total} nodes in all, but x has {num_nodes}")
    return sizes


def _sizes_from_batch(batch: Tensor, num_nodes: int) -> Tensor:
    """Sequence lengths of a ``batch`` whose graphs each occupy consecutive nodes."""
    if batch.dim() != 1 or batch.numel() != num_nodes or batch.is_floating_point():
        raise ValueError(f"batch: expected an integer tensor of shape [N] = [{num_nodes}], got "
                         f"{list(batch.shape)} of dtype {batch.dtype}")
    if num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch: decomposition='line' / 'fwd' without seq_len takes every graph of batch as one "
                         "sequence, so its nodes must be consecutive (batch sorted, as PyG's DataLoader makes it); "
                         "pass seq_len, or sort the nodes")
    return torch.unique_consecutive(batch, return_counts=True)[1]


def _check_batch(geometry: DecompositionGeometry, batch: Tensor, name: str) -> None:
    """``batch`` must put the nodes of every graph of the geometry together, graph after graph."""
    num_nodes = geometry.num_nodes
    if batch.dim() != 1 or batch.numel() != num_nodes or batch.is_floating_point():
        raise ValueError(f"batch: expected an integer tensor of shape [N] = [{num_nodes}], got "
                         f"{list(batch.shape)} of dtype {batch.dtype}")
    if num_nodes > 1:
        starts = batch[1:] != batch[:-1]
        expected = geometry.batch[1:] != geometry.batch[:-1]
        if bool((batch[1:] < batch[:-1]).any()) or not torch.equal(starts, expected):
            raise ValueError(f"batch: disagrees with {name}: the graphs of batch must be those {name} describes, "
                             f"node for node, in the same order")


def decomposition_geometry(decomposition: str, num_nodes: int, *, grid_size: Optional[Tensor] = None,
                           seq_len: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                           device: Optional[torch.device] = None) -> DecompositionGeometry:
    r"""The :class:`DecompositionGeometry` of ``decomposition`` over a batch of ``num_nodes`` nodes
    (cached per geometry tensor). Arguments as :func:`decomposition_dags`."""
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS}, got {decomposition!r}")
    if decomposition in GRID_LIKE:
        if grid_size is None:
            raise ValueError(f"grid_size: decomposition={decomposition!r} needs the [num_graphs, 2] grid size of every image "
                             "(ImageToGrid records it as data.grid_size)")
        geometry, name = grid_size, "grid_size"
    elif seq_len is not None:
        geometry, name = seq_len, "seq_len"
    elif batch is not None:  # every graph of batch is one sequence
        return _CACHE.get((decomposition, num_nodes, "batch"), batch,
                          lambda: DecompositionGeometry(decomposition, _sizes_from_batch(batch, num_nodes), num_nodes))
    else:  # the whole input is one sequence
        device = torch.device(device or "cpu")
        key = (num_nodes, str(device), decomposition)
        if key not in _SINGLE_SEQUENCE:
            if len(_SINGLE_SEQUENCE) > 64:  # bounded: many distinct lengths only cost cache misses
                _SINGLE_SEQUENCE.clear()
            _SINGLE_SEQUENCE[key] = DecompositionGeometry(decomposition, torch.tensor([num_nodes], device=device),
                                                          num_nodes)
        return _SINGLE_SEQUENCE[key]
    result = _CACHE.get((decomposition, num_nodes), geometry,
                        lambda: DecompositionGeometry(decomposition,
                                                      _checked_sizes(decomposition, geometry, num_nodes, name),
                                                      num_nodes))
    if batch is not None and host_reads_allowed(batch):
        # Checked once per (geometry, batch) pair: the memo keeps the batch tensors already seen.
        _CACHE.get(("batch agrees", id(result)), batch, lambda: _check_batch(result, batch, name))
    return result


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
        batch (LongTensor, optional): ``[N]`` graph of every node; with ``grid_size`` or
            ``seq_len`` it must agree with them (checked where host reads are free).
        device (torch.device, optional): where the DAGs go when neither ``seq_len`` nor ``batch``
            is given (default: CPU).

    :rtype: list of :class:`LongTensor` ``[2, E_d]``, one per DAG (:data:`NUM_DAGS`).
    """
    return decomposition_geometry(decomposition, num_nodes, grid_size=grid_size, seq_len=seq_len, batch=batch,
                                  device=device).dags


def batched_line_dags(seq_len: Tensor) -> List[Tensor]:
    r"""Forward (``t -> t + 1``) and backward (``t + 1 -> t``) chains of every sequence of a batch
    with lengths ``seq_len`` (``[G]``), nodes numbered sequence after sequence."""
    num_nodes = int(seq_len.long().sum())
    return decomposition_dags("line", num_nodes, seq_len=seq_len)


def batched_grid_dags(grid_size: Tensor) -> List[Tensor]:
    r"""The four directed grid DAGs of every image of a batch with ``grid_size`` (``[G, 2]``:
    height and width), nodes numbered image after image in raster order: (down, right),
    (down, left), (up, right), (up, left), as :func:`~torch_geometric_chimera.utils.grid_graph_dags`
    gives for one image."""
    num_nodes = int(grid_size.view(-1, 2).long().prod(-1).sum())
    return decomposition_dags("grid", num_nodes, grid_size=grid_size)


def _window(geometry: "DecompositionGeometry", weight: Tensor) -> Tuple[Tensor, Tensor, Tensor, int, int]:
    """The images, window weight ``[C, kh, kw]`` and offsets of :func:`window_conv_silu` for this geometry."""
    kernel = weight.size(-1)
    if geometry.decomposition in GRID_LIKE:
        return geometry.graph_ptr, geometry.sizes[:, 1], weight, -(kernel // 2), -(kernel // 2)
    # sequences are images of one row; "fwd" looks back only (causal), "line" both ways
    first = -(kernel - 1) if geometry.decomposition == "fwd" else -(kernel // 2)
    return geometry.graph_ptr, geometry.sizes, weight.unsqueeze(1), 0, first


def decomposition_conv_silu(x: Tensor, weight: Tensor, bias: Tensor, geometry: DecompositionGeometry) -> Tensor:
    r"""The local convolution of a decomposition and its SiLU: depthwise, one weight per offset, zero
    padded at every graph's border, as the authors' ``Conv2d`` (grids) and ``Conv1d`` (lines; causal
    for ``"fwd"``, as Mamba-2's):

    .. math::
        \mathbf{x}'_i = \mathrm{SiLU}\Big(\mathbf{b} + \sum_{o} \mathbf{w}_o \odot \mathbf{x}_{i + o}\Big).

    Args:
        x (Tensor): ``[N, C]``.
        weight (Tensor): ``[C, k, k]`` (grid) or ``[C, k]`` (lines).
        bias (Tensor): ``[C]``.
        geometry (DecompositionGeometry): where the neighbours are.

    On CPU one ``chimera::window_conv_silu`` call for the whole batch, any mix of shapes
    (:func:`~torch_geometric_chimera.ops.block.window_conv_silu`); elsewhere a batch of graphs of one
    shape is one ``conv2d`` / ``conv1d`` call, and mixed shapes gather every offset's neighbour
    (:func:`decomposition_conv_silu_reference`). No graph ever reads another.
    """
    graph_ptr, row_width, window, row_offset, col_offset = _window(geometry, weight)
    if block_kernels_available(x, weight, bias):
        return window_conv_silu(x, graph_ptr, row_width, window, bias, row_offset, col_offset)
    num_nodes, channels = x.shape
    kernel = weight.size(-1)
    if geometry.uniform is not None and not torch.compiler.is_compiling():
        if geometry.decomposition in GRID_LIKE:
            graphs, height, width = geometry.uniform
            images = x.view(graphs, height, width, channels).permute(0, 3, 1, 2)  # channels-last strides
            out = F.conv2d(images, weight.unsqueeze(1), bias, padding=kernel // 2, groups=channels)
            return F.silu(out.permute(0, 2, 3, 1).reshape(num_nodes, channels))
        graphs, length = geometry.uniform
        pad = (kernel - 1, 0) if geometry.decomposition == "fwd" else (kernel // 2, kernel // 2)
        sequences = F.pad(x.view(graphs, length, channels).transpose(1, 2), pad)
        out = F.conv1d(sequences, weight.unsqueeze(1), bias, groups=channels)
        return F.silu(out.transpose(1, 2).reshape(num_nodes, channels))
    return decomposition_conv_silu_reference(x, weight, bias, geometry)


def decomposition_conv_silu_reference(x: Tensor, weight: Tensor, bias: Tensor,
                                      geometry: DecompositionGeometry) -> Tensor:
    """:func:`decomposition_conv_silu` in PyTorch ops, every offset's neighbour gathered: any mix of shapes."""
    graph_ptr, row_width, window, row_offset, col_offset = _window(geometry, weight)
    return window_conv_silu_reference(x, graph_ptr, row_width, window, bias, row_offset, col_offset)


def decomposition_adjacency(delta: Tensor, geometry: DecompositionGeometry, groups: Tuple[int, ...],
                            scale: float = 1.0, signed: bool = False,
                            rate: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    r"""Per-node edge weights and key scales of every DAG (the module docstring's formulas).

    Args:
        delta (Tensor): :math:`\Delta \ge 0`, ``[N, num_dt, R, H]``: per node, :math:`\Delta` set,
            edge direction (:data:`NUM_DIRECTIONS`) and head.
        geometry (DecompositionGeometry): the DAGs' parents.
        groups (tuple of int): the :math:`\Delta` set of every DAG (:func:`dt_groups`).
        scale (float, optional): folded into the key scales (:data:`DAG_SUM_SCALE`). (default: ``1``)
        signed (bool, optional): transitions :math:`2e^{-\Delta} - 1` instead of :math:`e^{-\Delta}`.
            (default: :obj:`False`)
        rate (Tensor, optional): ``[H]``, Mamba-2's decay rate :math:`a_h > 0`: transitions
            :math:`e^{-a_h \Delta}`, key scales unchanged. (default: :obj:`None`: 1)

    Returns:
        ``(weight [D, N, R, H], key_scale [D, N, H])``: ``weight[d, i, r]`` is :math:`A^{(d)}_{ij}`
        for the parent ``j`` of ``i`` in slot ``r`` (zero where there is none), and
        :math:`\bar{\mathbf{B}}^{(d)}_i` = ``key_scale[d, i] * B_i``.

    On grids on CPU one pass of :func:`~torch_geometric_chimera.ops.grid.grid_selectivity`, whose
    table both results are views of; elsewhere :func:`decomposition_adjacency_reference`.
    """
    _check_dt_groups(delta, geometry, groups)
    if (geometry.decomposition == "grid" and rate is None and grid_available(delta)
            and delta.dtype in (torch.float32, torch.float64)):
        table = grid_selectivity(delta, geometry.parents, groups, scale, signed)
        return table[:, :, :2], table[:, :, 2]
    return decomposition_adjacency_reference(delta, geometry, groups, scale, signed, rate)


def _check_dt_groups(delta: Tensor, geometry: DecompositionGeometry, groups: Tuple[int, ...]) -> None:
    if len(groups) != len(geometry.dags) or max(groups) >= delta.size(1) or min(groups) < 0:
        raise ValueError(f"groups: expected one Delta set in [0, {delta.size(1)}) per DAG ({len(geometry.dags)}), "
                         f"got {groups}")


def decomposition_adjacency_reference(delta: Tensor, geometry: DecompositionGeometry, groups: Tuple[int, ...],
                                      scale: float = 1.0, signed: bool = False,
                                      rate: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`decomposition_adjacency` in PyTorch ops, the module docstring's formulas as written."""
    _check_dt_groups(delta, geometry, groups)
    if tuple(groups) != tuple(range(delta.size(1))):
        # index_select, not delta[:, list]: its backward is an index_add, not a sorting index_put
        delta = delta.index_select(1, torch.tensor(groups, device=delta.device))
    delta = delta.transpose(0, 1)  # [D, N, R, H]
    decay = delta if rate is None else delta * rate  # the transitions' exponent; B keeps Delta itself
    parents = geometry.parents.to(delta.dtype).unsqueeze(-1)  # [D, N, R, 1]
    if geometry.decomposition == "grid":
        # 1 / sqrt(|p(i)|), with a source's empty parent set counted as 1 (its weights are zero anyway).
        inv_sqrt = parents.sum(2, keepdim=True).clamp_min(1).rsqrt()
        weight = transition(decay, signed) * (parents * inv_sqrt)
        key_scale = (delta * parents).sum(2) * (inv_sqrt.squeeze(2) * scale)
    else:  # lines: Mamba-2 in every direction; the first token keeps Delta_t B_t
        weight = transition(decay, signed) * parents
        key_scale = delta.squeeze(2) * scale if scale != 1.0 else delta.squeeze(2)
    return weight, key_scale


def _grid_plan(geometry: DecompositionGeometry, state_dim: int, head_dim: int,
               element_size: int) -> Tuple[Any, Tensor, int, int]:
    """The CPU grid kernel's walks, stacked walks ``[D, N]``, segment rows and checkpoint count."""
    walks = geometry.memo("walks", lambda: grid_walks(geometry.sizes, geometry.dags))
    nodes = geometry.memo("stacked walks", lambda: torch.stack(walks.nodes))
    segment_rows = segment_rows_for(walks, state_dim, head_dim, element_size)
    return walks, nodes, segment_rows, num_checkpoints(walks.graph_ptr, walks.row_width, segment_rows)


def _stacked_grid_kernel(geometry: DecompositionGeometry, method: str, value: Tensor) -> bool:
    """Whether the four grid DAGs run as one CPU kernel call (heads sharing ``B, C``): with the
    images as its tasks, at least as many images as threads."""
    return (geometry.decomposition == "grid" and method == "auto" and grid_available(value)
            and geometry.graph_ptr.numel() - 1 >= torch.get_num_threads())


def _stacked_table(weight: Tensor, key_scale: Tensor) -> Tensor:
    """The ``[D, N, 3, H]`` table of the stacked grid kernel: the one both came from as views
    (:func:`~torch_geometric_chimera.ops.grid.grid_selectivity`), else a new one."""
    base = weight._base
    if (base is not None and key_scale._base is base and base.dim() == 4 and base.size(2) == 3
            and base.is_contiguous() and weight.shape == base[:, :, :2].shape and weight.data_ptr() == base.data_ptr()
            and weight.stride() == base.stride() and key_scale.shape == base[:, :, 2].shape
            and key_scale.stride() == base[:, :, 2].stride()
            and key_scale.data_ptr() == base[:, :, 2].data_ptr()):
        return base
    return torch.cat([weight, key_scale.unsqueeze(2)], 2)


def decomposed_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, weight: Tensor, key_scale: Tensor,
                                   geometry: DecompositionGeometry, groups: Tuple[int, ...], *,
                                   method: str = "auto", **solver_options) -> Tensor:
    r"""The Chimera mixer summed over the DAGs of a decomposition:

    .. math::
        \mathbf{y} = \sum_{d} \left((\mathbf{I} - \mathbf{A}_d)^{-1} \odot
            \mathbf{C}_{g(d)} \bar{\mathbf{B}}_{d}^\top\right) \mathbf{V},
        \qquad \bar{\mathbf{B}}_{d, i} = \mathrm{key\_scale}_{d, i}\, \mathbf{B}_{g(d), i},

    with :math:`\mathbf{A}_d` given per node by ``weight`` (:func:`decomposition_adjacency`) and
    :math:`g(d)` = ``groups[d]`` the parameter set of ``B, C`` (:data:`SHARING`).

    Args:
        query (Tensor): :math:`\mathbf{C}`, ``[N, num_sets, H, S]``, or ``[N, num_sets, 1, S]``
            when the heads share it.
        key (Tensor): :math:`\mathbf{B}`, shaped like ``query``.
        value (Tensor): :math:`\mathbf{V}`, ``[N, H, P]``.
        weight (Tensor): ``[D, N, R, H]`` edge weights per node and direction slot.
        key_scale (Tensor): ``[D, N, H]``.
        geometry (DecompositionGeometry): the DAGs.
        groups (tuple of int): parameter set of every DAG.
        method (str, optional): solver of every DAG, see
            :func:`~torch_geometric_chimera.ops.resolvent_attention`. (default: ``"auto"``: on
            grids the row-by-row grid kernel where it exists (CPU:
            :func:`~torch_geometric_chimera.ops.grid.grid_attention`, GPU with Triton:
            :func:`~torch_geometric_chimera.ops.triton_grid.grid_attention_triton`), on lines
            the chunked SSD of ``"line"``)
        **solver_options: passed on to :func:`~torch_geometric_chimera.ops.resolvent_attention`.

    :rtype: :class:`Tensor` ``[N, H, P]``.
    """
    from ..ops import resolvent_attention

    num_dags, num_nodes, heads = len(geometry.dags), value.size(0), value.size(1)
    if len(groups) != num_dags:
        raise ValueError(f"groups: expected one parameter set per DAG ({num_dags}), got {len(groups)}")
    if query.dim() != 4 or key.shape != query.shape or max(groups) >= query.size(1):
        raise ValueError(f"query: expected shape [N, num_sets, H, S] (or [N, num_sets, 1, S], shared by the heads) "
                         f"with num_sets > {max(groups)}, like key, got {list(query.shape)} and {list(key.shape)}")
    if query.size(2) not in (1, heads):
        raise ValueError(f"query: expected H = {heads} heads (like value) or 1, got shape {list(query.shape)}")
    directions = NUM_DIRECTIONS[geometry.decomposition]
    if weight.shape != (num_dags, num_nodes, directions, heads) or key_scale.shape != (num_dags, num_nodes, heads):
        raise ValueError(f"weight: expected shape [D, N, R, H] = {[num_dags, num_nodes, directions, heads]} and "
                         f"key_scale [D, N, H], got {list(weight.shape)} and {list(key_scale.shape)}")
    walks = plan = None
    if geometry.decomposition == "grid" and method == "auto" and (grid_available(value) or
                                                                   grid_triton_available(value)):
        walks = geometry.memo("walks", lambda: grid_walks(geometry.sizes, geometry.dags))
        if grid_available(value):
            _, nodes, segment_rows, checkpoints = _grid_plan(geometry, query.size(-1), value.size(-1),
                                                             query.element_size())
            # The four DAGs in one kernel call, whose tasks are whole images (all heads); with fewer
            # images than threads, one call per DAG keeps every (image, head) a task of its own.
            if query.size(2) == 1 and _stacked_grid_kernel(geometry, method, value):
                # [D, N, 3, H]: from above, from before in the row, the key's scale per head. The kernel reads
                # every DAG's set of B, C in place (groups) and the values as a column block of the layer's
                # features (strided rows): no gathered or contiguous copies.
                table = _stacked_table(weight, key_scale)
                return grid_attention(walks.graph_ptr, walks.row_width, nodes, table, query, key, value,
                                      segment_rows, checkpoints, groups)
        else:  # the Triton row-scan kernels (GPU); the plan reads the sizes once per geometry and shape
            plan = geometry.memo(("grid_plan", query.size(-1), value.size(-1), query.element_size()),
                                 lambda: grid_plan(walks.graph_ptr, walks.row_width, query.size(-1), value.size(-1),
                                                   element_size=query.element_size()))
        value = value.contiguous()  # once, not in every DAG's kernel call
    out: Optional[Tensor] = None
    queries: Dict[int, Tensor] = {}
    for d, group in enumerate(groups):
        # Select the set, then broadcast over heads: gradients stay [N, num_sets, 1, S]-sized.
        query_d = queries.get(group)
        if query_d is None:
            query_d = query[:, group].expand(-1, heads, -1)
            if walks is not None:  # the kernels read it contiguous: copy once per set, not in every call
                query_d = query_d.contiguous()
            queries[group] = query_d
        key_d = key[:, group] * key_scale[d].unsqueeze(-1)
        if walks is not None and plan is None:
            y = grid_attention(walks.graph_ptr, walks.row_width, walks.nodes[d], weight[d], query_d, key_d, value,
                               segment_rows, checkpoints)
        elif walks is not None:
            y = grid_attention_triton(walks.graph_ptr, walks.row_width, walks.nodes[d], weight[d], query_d, key_d,
                                      value, plan=plan)
        else:
            edge_weight = weight[d].reshape(num_nodes * directions, heads).index_select(0, geometry.edge_slot[d])
            y = resolvent_attention(query_d, key_d, value, geometry.dags[d], edge_weight, method=method,
                                    batch=geometry.batch, **solver_options)
            if geometry.decomposition == "hydra":  # shifted by one: token t reads the state of t - 1
                y = torch.cat([y, y.new_zeros(1, *y.shape[1:])]).index_select(0, geometry.parent_index[d])
        out = y if out is None else out.add_(y)  # y is a fresh tensor; add's backward needs neither
    return out


def decomposition_mixer(xbc: Tensor, dt: Tensor, conv_weight: Optional[Tensor], conv_bias: Optional[Tensor],
                        dt_bias: Tensor, decomposition: str, grid_size: Optional[Tensor], seq_len: Optional[Tensor],
                        batch: Optional[Tensor], groups: Tuple[int, ...], delta_groups: Tuple[int, ...], heads: int,
                        state_dim: int, method: str = "auto", signed: bool = False,
                        A_log: Optional[Tensor] = None, D: Optional[Tensor] = None,
                        **solver_options) -> Tuple[Tensor, Optional[Tensor]]:
    r"""The part of a decomposition layer that depends on the geometry, between ``in_proj`` and the
    gated norm: local convolution and SiLU, selectivity, the mixer over the DAGs (and Hydra's
    diagonal).

    Args:
        xbc (Tensor): ``[N, inner + 2 num_sets S]``, the projected values, keys and queries.
        dt (Tensor): ``[N, dt_width]``, the projected selectivity (and, for ``"hydra"``, the
            diagonal's ``H`` columns last).
        conv_weight (Tensor, optional): the local convolution's weight (:obj:`None`: no convolution).
        conv_bias (Tensor, optional): its bias. dt_bias (Tensor): ``[H]``.
        signed (bool, optional): signed transitions (:func:`decomposition_adjacency`).
        A_log (Tensor, optional): ``[H]``, the log of the lines' decay rate :math:`a_h`.
        D (Tensor, optional): ``[H]``, Mamba's skip. Where the four grid DAGs run as one CPU kernel
            call, the kernel adds :math:`D_h \mathbf{v}` to ``y`` itself
            (:func:`~torch_geometric_chimera.ops.grid.grid_mixer`: one gradient of the features, no
            separate sum for the skip's) and ``values`` comes back :obj:`None`.

    Returns:
        ``(y, values)``, each ``[N, inner]``: the mixer's output and its input for the ``D`` skip, or
        ``(y + D v, None)`` where the kernel added the skip.
    """
    num_nodes = xbc.size(0)
    geometry = decomposition_geometry(decomposition, num_nodes, grid_size=grid_size, seq_len=seq_len, batch=batch,
                                      device=xbc.device)
    diagonal: Optional[Tensor] = None
    if decomposition == "hydra":
        dt, diagonal = dt.split([dt.size(1) - heads, heads], dim=-1)
    xbc = F.silu(xbc) if conv_weight is None else decomposition_conv_silu(xbc, conv_weight, conv_bias, geometry)
    num_sets = max(groups) + 1
    inner = xbc.size(1) - 2 * state_dim * num_sets
    values, key, query = xbc.split([inner, state_dim * num_sets, state_dim * num_sets], dim=-1)
    values = values.view(num_nodes, heads, inner // heads)
    # [N, Delta sets, directions, H]: every DAG its own selectivity per edge direction.
    delta = F.softplus(dt.view(num_nodes, -1, NUM_DIRECTIONS[decomposition], heads) + dt_bias)
    rate = None if A_log is None else torch.exp(A_log)
    weight, key_scale = decomposition_adjacency(delta, geometry, delta_groups, DAG_SUM_SCALE[decomposition], signed,
                                                rate)
    if (D is not None and diagonal is None and D.dtype == xbc.dtype and xbc.dtype in (torch.float32, torch.float64)
            and _stacked_grid_kernel(geometry, method, xbc)):
        # The features as the convolution left them, [values | keys | queries], read in place.
        walks, nodes, segment_rows, checkpoints = _grid_plan(geometry, state_dim, inner // heads, xbc.element_size())
        y = grid_mixer(walks.graph_ptr, walks.row_width, nodes, _stacked_table(weight, key_scale), xbc.contiguous(),
                       D, inner, state_dim, groups, segment_rows, checkpoints)
        return y.reshape(num_nodes, inner), None
    # B, C: [N, num_sets * S] -> [N, num_sets, 1, S], every head of a set sharing them.
    shape = (num_nodes, num_sets, 1, state_dim)
    y = decomposed_resolvent_attention(query.reshape(shape), key.reshape(shape), values, weight, key_scale, geometry,
                                       groups, method=method, **solver_options)
    if diagonal is not None:  # Hydra: y_t += d_t x_t, d_t a projection of the input (the layer's D adds to it)
        y = y + diagonal.unsqueeze(-1) * values
    return y.reshape(num_nodes, inner), values.reshape(num_nodes, inner)


# --- one opaque op for torch.compile -------------------------------------------------------------
# Everything above reads the geometry on the host and keeps Python-side caches keyed by the tensors'
# identity; traced by Dynamo, that was 30-40 graph breaks per batch and a recompile per image height
# (segment_rows became a guarded constant). Worse, Inductor in torch 2.13 mis-schedules the backward
# of the per-DAG scatter-adds once a dynamic recompile gives each DAG's edge count its own symbol
# (pytorch/pytorch#185509): the grid layer's gradients came out 0.7% off (x) and 36-62% (dt_bias) from
# the second batch of new sizes on (tests/nn/test_compile.py keeps a PyTorch-only repro). Under
# torch.compile the layer therefore calls decomposition_mixer as one custom op, as ops/opaque.py does
# for the general mixer: the geometry, its caches and the scatter-adds stay in eager code, the fake
# kernel states the two output shapes, and the backward runs the forward again with autograd.

_MIXER_INPUTS = (0, 1, 2, 3, 4, 5)  # xbc, dt, conv_weight, conv_bias, dt_bias, A_log: the differentiable arguments


def _mixer_call(inputs, grid_size, seq_len, batch, decomposition, groups, delta_groups, heads, state_dim, method,
                num_terms, tol, max_iter, signed):
    return decomposition_mixer(*inputs[:5], decomposition, grid_size, seq_len, batch, tuple(groups), tuple(delta_groups),
                               heads, state_dim, method, signed, inputs[5], num_terms=num_terms, tol=tol,
                               max_iter=max_iter)


@torch.library.custom_op("chimera::decomposition_mixer", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _decomposition_mixer_op(xbc: Tensor, dt: Tensor, conv_weight: Optional[Tensor], conv_bias: Optional[Tensor],
                            dt_bias: Tensor, A_log: Optional[Tensor], grid_size: Optional[Tensor],
                            seq_len: Optional[Tensor],
                            batch: Optional[Tensor], decomposition: str, groups: List[int], delta_groups: List[int],
                            heads: int, state_dim: int, method: str, num_terms: Optional[int], tol: Optional[float],
                            max_iter: int, signed: bool) -> List[Tensor]:
    y, values = _mixer_call((xbc, dt, conv_weight, conv_bias, dt_bias, A_log), grid_size, seq_len, batch, decomposition,
                            groups, delta_groups, heads, state_dim, method, num_terms, tol, max_iter, signed)
    return [y.contiguous(), values.contiguous()]


@_decomposition_mixer_op.register_fake
def _decomposition_mixer_fake(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, grid_size, seq_len, batch, decomposition,
                              groups, delta_groups, heads, state_dim, method, num_terms, tol, max_iter, signed):
    inner = xbc.size(1) - 2 * state_dim * (max(groups) + 1)
    # The op computes in the promoted dtype of its tensors (a float32 parameter with bf16 features under
    # autocast gives float32), so its fake must say the same.
    dtype = _common_dtype(xbc, dt, conv_weight, conv_bias, dt_bias, A_log)
    return [xbc.new_empty(xbc.size(0), inner, dtype=dtype), xbc.new_empty(xbc.size(0), inner, dtype=dtype)]


@torch.library.custom_op("chimera::decomposition_mixer_backward", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _decomposition_mixer_backward_op(grad_y: Tensor, grad_values: Tensor, xbc: Tensor, dt: Tensor,
                                     conv_weight: Optional[Tensor], conv_bias: Optional[Tensor], dt_bias: Tensor,
                                     A_log: Optional[Tensor],
                                     grid_size: Optional[Tensor], seq_len: Optional[Tensor], batch: Optional[Tensor],
                                     decomposition: str, groups: List[int], delta_groups: List[int], heads: int,
                                     state_dim: int, method: str, num_terms: Optional[int], tol: Optional[float],
                                     max_iter: int, signed: bool, needs_grad: List[bool]) -> List[Tensor]:
    """Gradients of (xbc, dt, conv_weight, conv_bias, dt_bias, A_log); an empty tensor where not needed."""
    from ..ops.opaque import _autograd_recording
    originals = [xbc, dt, conv_weight, conv_bias, dt_bias, A_log]
    with _autograd_recording():
        inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(originals, needs_grad)]
        outputs = _mixer_call(inputs, grid_size, seq_len, batch, decomposition, groups, delta_groups, heads,
                              state_dim, method, num_terms, tol, max_iter, signed)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(outputs, wanted, (grad_y, grad_values), allow_unused=True) if wanted
                     else [])
    out = []
    for t, need in zip(originals, needs_grad):
        grad = next(grads) if need and t is not None else None
        if not need or t is None:
            out.append(xbc.new_empty(0))
        else:
            out.append(torch.zeros_like(t) if grad is None else grad.contiguous())
    return out


@_decomposition_mixer_backward_op.register_fake
def _decomposition_mixer_backward_fake(grad_y, grad_values, xbc, dt, conv_weight, conv_bias, dt_bias, A_log, grid_size,
                                       seq_len, batch, decomposition, groups, delta_groups, heads, state_dim, method,
                                       num_terms, tol, max_iter, signed, needs_grad):
    originals = [xbc, dt, conv_weight, conv_bias, dt_bias, A_log]
    return [(t if need and t is not None else xbc).new_empty(t.shape if need and t is not None else (0,))
            for t, need in zip(originals, needs_grad)]


def _mixer_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])  # the six differentiable inputs, grid_size, seq_len, batch
    ctx.options = inputs[9:]
    ctx.set_materialize_grads(False)


def _mixer_backward(ctx, grads):
    grad_y, grad_values = grads
    saved = ctx.saved_tensors
    needs_grad = [bool(ctx.needs_input_grad[i]) for i in _MIXER_INPUTS]
    out = [None] * len(ctx.needs_input_grad)
    if not any(needs_grad):
        return tuple(out)
    if grad_y is None:
        grad_y = saved[0].new_zeros(saved[0].size(0), _mixer_inner(saved[0], ctx.options))
    if grad_values is None:
        grad_values = torch.zeros_like(grad_y)
    grads = torch.ops.chimera.decomposition_mixer_backward(grad_y, grad_values, *saved, *ctx.options, needs_grad)
    for position, grad, need in zip(_MIXER_INPUTS, grads, needs_grad):
        out[position] = grad if need else None
    return tuple(out)


def _common_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t is not None]
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def _mixer_inner(xbc: Tensor, options) -> int:
    groups, state_dim = options[1], options[4]
    return xbc.size(1) - 2 * state_dim * (max(groups) + 1)


_decomposition_mixer_op.register_autograd(_mixer_backward, setup_context=_mixer_setup_context)


def opaque_decomposition_mixer(xbc: Tensor, dt: Tensor, conv_weight: Optional[Tensor], conv_bias: Optional[Tensor],
                               dt_bias: Tensor, decomposition: str, grid_size: Optional[Tensor],
                               seq_len: Optional[Tensor], batch: Optional[Tensor], groups: Tuple[int, ...],
                               delta_groups: Tuple[int, ...], heads: int, state_dim: int, method: str = "auto",
                               num_terms: Optional[int] = None, tol: Optional[float] = None,
                               max_iter: int = 1000, signed: bool = False,
                               A_log: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`decomposition_mixer` as the one custom op ``chimera::decomposition_mixer`` (for
    :func:`torch.compile`: no graph break, nothing of the geometry captured in the graph). Its tensors
    enter in one dtype, the promoted one (under autocast the features are bf16 and the parameters
    float32), so that the op computes in one precision and autograd casts each gradient back."""
    dtype = _common_dtype(xbc, dt, conv_weight, conv_bias, dt_bias, A_log)
    xbc, dt, conv_weight, conv_bias, dt_bias, A_log = (None if t is None else t.to(dtype)
                                                       for t in (xbc, dt, conv_weight, conv_bias, dt_bias, A_log))
    y, values = torch.ops.chimera.decomposition_mixer(xbc, dt, conv_weight, conv_bias, dt_bias, A_log, grid_size, seq_len,
                                                      batch, decomposition, list(groups), list(delta_groups), heads,
                                                      state_dim, method, num_terms, tol, max_iter, signed)
    return y, values
