r"""``resolvent_attention``: the one operation everything rests on (DESIGN.md §1).

This module only chooses and dispatches: :class:`GraphTopology` (what depends on the graph alone,
cached), :func:`choose_method` and its cost model, the input checks, and the dispatch to the
methods, one module each: :mod:`.dense`, :mod:`.squaring`, :mod:`.band`, :mod:`.dag`, :mod:`.line`,
:mod:`.neumann` and :mod:`.iterative`."""
import math
import weakref
from functools import cached_property
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy
import torch
import torch_geometric
from torch import Tensor

from ..utils.topology import diameter_bound, path_roots, raise_if_cyclic, topological_levels
from . import common
from ._extension import HAS_EXTENSION
from .band import band_resolvent_attention, band_schedule
from .common import CsrOperator, read_state, to_state
from .dag import dag_attention, dag_solve
from .dense import dense_attention
from .iterative import default_tolerance, iterative_solve
from .line import line_order, line_resolvent_attention
from .neumann import NeumannSchedule, checkpointed_neumann, neumann_schedule
from .squaring import (PaddedIndex, PaddedLayout, bucketed_layouts, fused_available, over_layouts, padded_index,
                       padded_layout, padding_bounds, resolve_num_squarings, row_sum_bound, squaring_attention,
                       squarings_per_graph)

METHODS = ("auto", "dense", "squaring", "band", "dag", "line", "neumann", "iterative")

#: ``method="auto"`` solves graphs with at most this many nodes exactly (dense or band).
DENSE_MAX_NODES = 768  # measured crossover with iterative on CPU: about 1,000 nodes

#: Off CPU, ``method="auto"`` takes ``"squaring"`` for graphs of at most this many nodes (DAGs, or rows
#: of ``|A|`` known to sum to less than 1): a few batched products of ``m x m`` matrices, against the
#: ``O(m^3)`` pivoted LU of ``"dense"``, whose batched GPU kernels are slower per flop. Not yet timed
#: on a GPU (issue 9): the value follows the paper's small graphs (LRGB peptides, about 150 nodes).
SQUARING_MAX_NODES = 256

#: A ``gamma`` given to :func:`resolvent_attention` is checked against the measured row sums of
#: ``|A|`` where that is free (CPU): it may be exceeded by this relative margin, the rounding of a
#: row normalized to exactly ``gamma`` (the ``general`` adjacency's rows approach ``gamma`` as
#: ``exp(-psi)`` vanishes), not more.
GAMMA_SLACK = 1e-5

#: The cost model of ``method="auto"`` on CPU: forward + backward seconds of each exact
#: small-graph path, fitted by ``benchmarks/fit_auto_panel.py`` (non-negative least squares on
#: relative error) to the mixer timings of ``benchmarks/bench_auto_panel.py`` (four runs, in
#: ``benchmarks/results/auto_panel_cpu_runs.json``; ``auto_panel_cpu.json`` is the check run) on
#: the 2-core development CPU (both threads, idle, 2026-11-25 after the OpenMP build; 11 graph batches:
#: rings with chords, molecule-like graphs, undirected and directed trees and grids, 8 to 128
#: graphs of 30 to 600 nodes; (H, S, P) from (4, 16, 16) to (8, 16, 32) and (2, 64, 32)).
#: ``dense``, per head: every graph padded to ``m`` (the largest graph, see
#: :meth:`GraphTopology.padded_sizes`) costs ``3 m^3`` (inverse and the two backward products) and
#: ``6 m^2 (S + P)`` (scores and products), plus a fixed cost per graph.
DENSE_CUBIC_S = 2.33e-11
DENSE_SQUARE_S = 2.91e-11
DENSE_GRAPH_S = 3.49e-5
#: ``band``, per head: every node and every nonzero of the LU factors moves an ``S x P`` state in
#: the solves, and the factorization costs ``n b^2`` per graph of bandwidth ``b``.
BAND_NODE_S = 3.09e-9
BAND_NONZERO_S = 9.43e-11
BAND_FACTOR_S = 2.09e-10
#: ``dag``, per head: every node and every edge moves an ``S x P`` state.
DAG_ELEMENT_S = 1.14e-9
#: ``dag`` is taken only when its estimate is below this fraction of the others': on the panel's
#: DAGs (trees and grids of 144 and 150 nodes, both threads) dag / band measured 0.60 to 0.97,
#: and the margin keeps a mispredicted DAG from losing much (single-threaded, on a shared machine,
#: the two had timed alike, 0.70 to 1.40).
DAG_MARGIN = 0.8
#: Kept for the benchmarks that report it: what a band-solve nonzero costs in dense-path flops.
BAND_FLOP_COST = BAND_NONZERO_S / (DENSE_CUBIC_S / 3)

#: On CPU the dense path splits its padded batch by size once padding every graph to the largest
#: would multiply the cubic work by more than this (peptides-func batches, sizes 100 to 200: a
#: Chimera-GPS step took 2.77 s with one padded batch, and the old per-size buckets 2.29 s).
CPU_PADDING_WORK_LIMIT = 1.25

#: ``num_terms`` above this is refused: every term is one sparse product over all edges, and the
#: exact resolvent is cheaper through ``"iterative"`` or ``"dense"`` long before.
MAX_NUM_TERMS = 10_000


class _Counts(NamedTuple):
    """What choosing a method and padding the graphs read on the host (:attr:`GraphTopology._counts`)."""
    batch: Optional[Tensor]  # graph ids, renumbered 0 .. G - 1 when some id was >= N
    sizes: Tensor  # [G] node count of every graph, on the device
    host_sizes: List[int]  # the same on the host
    max_out_degree: int
    max_in_degree: int


class GraphTopology:
    r"""Everything about a batch of graphs that depends on ``edge_index`` and ``batch`` only
    (topological levels, DAG-ness, sizes, diameter bounds, CSR operator). Each property is
    computed on first use and kept, so one instance can serve every layer and step that shares
    the graph: pass it as ``resolvent_attention(..., topology=...)``. It reads the tensors when a
    property is first computed and never checks them again, so do not modify them in place
    while it is in use (:meth:`get` is the checked, cached way to obtain one).

    Args:
        edge_index (LongTensor): ``[2, E]`` edges, source first.
        num_nodes (int): number of nodes ``N``.
        batch (LongTensor, optional): ``[N]`` graph id of every node. (default: :obj:`None`)
    """

    def __init__(self, edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None):
        self.edge_index = edge_index.long()
        self.num_nodes = num_nodes
        self._batch_ids = batch
        self.choices: Dict[Tuple, str] = {}  # choose_method's answers, per state shape
        self._padded_indices: Dict[int, List[PaddedIndex]] = {}  # per number of heads
        self._checked_inputs: Optional[Tuple] = None  # the inputs whose values were checked (see inputs_checked)

    @cached_property
    def batch(self) -> Optional[Tensor]:
        """Graph id of every node as given, or renumbered ``0 .. G - 1`` (same grouping, same order)
        when some id is ``>= N``: such ids cannot all be in use, and every per-graph table would
        otherwise be as long as the largest id."""
        return self._counts.batch

    @cached_property
    def _counts(self) -> _Counts:
        """Graph sizes and the largest out- and in-degree, reduced on the device and read on the
        host at once: on an accelerator the one synchronization of a new topology on the
        ``"squaring"`` path with ``gamma`` known (asking whether the graphs are DAGs adds one, see
        :attr:`is_dag`). Graph ids of ``N`` or more are renumbered (then read a second time)."""
        num_nodes, edge_index = self.num_nodes, self.edge_index
        batch = None if self._batch_ids is None else self._batch_ids.long()
        if num_nodes == 0:
            return _Counts(batch, edge_index.new_full((0 if batch is not None else 1,), 0),
                           [] if batch is not None else [0], 0, 0)
        while True:  # at most twice
            # Counts by index_add, not bincount: on CUDA bincount reads the range of its input on the host.
            degree = edge_index.new_zeros(2, num_nodes).index_put_(
                (torch.arange(2, device=edge_index.device).view(2, 1), edge_index),
                torch.ones_like(edge_index[0]), accumulate=True)  # [out-degree, in-degree]
            parts = [degree.amax(1)]
            if batch is not None:  # ids outside [0, N) are clamped here and refused or renumbered below
                sizes = batch.new_zeros(num_nodes).index_add_(0, batch.clamp(0, num_nodes - 1), torch.ones_like(batch))
                parts += [torch.stack(torch.aminmax(batch)), sizes]
            values = torch.cat(parts).tolist()  # the one read
            out_degree, in_degree = values[:2]
            if batch is None:
                return _Counts(None, edge_index.new_full((1,), num_nodes), [num_nodes], out_degree, in_degree)
            low, high = values[2:4]
            if low < 0:
                raise ValueError(f"batch: graph ids must be non-negative, found {low}")
            if high < num_nodes:
                return _Counts(batch, sizes[:high + 1], values[4:5 + high], out_degree, in_degree)
            batch = torch.unique(batch, return_inverse=True)[1]

    _cache: List[Tuple] = []
    CACHE_SIZE = 8

    @classmethod
    def get(cls, edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None) -> "GraphTopology":
        """The topology of ``(edge_index, batch)``, shared by every call that passes the *same*
        tensors unchanged (the layers of one model on one mini-batch).

        An entry holds weak references to the tensors, their version counters and, where values
        may be read on the host (CPU tensors, or any device under ``torch_geometric.debug()``), a
        copy of their values, compared on every hit (one pass over ``edge_index``; see
        ``benchmarks/bench_topology_cache.py``). So on CPU every change is seen, including writes
        that bypass the version counter (``t.data[...] = ...``, ``t.numpy()[...] = ...``, DLPack).
        On accelerators outside debug mode only the version counter is checked (the comparison
        would synchronize): in-place writes through ``t[...] = ...`` are seen, writes through
        ``.data``, DLPack or foreign kernels are not; pass ``topology=GraphTopology(...)`` to
        :func:`resolvent_attention` to hold the topology explicitly, or give the changed graph a
        new tensor. Tensors made under ``torch.inference_mode`` have no version counter: they are
        not cached."""
        if edge_index.is_inference() or (batch is not None and batch.is_inference()):
            return cls(edge_index, num_nodes, batch)
        verify = common.host_reads_allowed(edge_index)
        for entry in cls._cache:
            ei_ref, ei_version, ei_copy, batch_ref, batch_version, batch_copy, n, topology = entry
            if (ei_ref() is edge_index and ei_version == edge_index._version and n == num_nodes
                    and (batch_ref is None) == (batch is None)
                    and (batch is None or (batch_ref() is batch and batch_version == batch._version))
                    and (not verify or (_same_values(ei_copy, edge_index)
                                        and (batch is None or _same_values(batch_copy, batch))))):
                return topology
        topology = cls(edge_index, num_nodes, batch)
        # The copy is what a later hit compares against (only where that comparison is free of syncs).
        entry = (weakref.ref(edge_index), edge_index._version, edge_index.clone() if verify else None,
                 None if batch is None else weakref.ref(batch), None if batch is None else batch._version,
                 batch.clone() if verify and batch is not None else None, num_nodes, topology)
        cls._cache = [entry] + [e for e in cls._cache if e[0]() is not None][:cls.CACHE_SIZE - 1]
        return topology

    @cached_property
    def num_graphs(self) -> int:
        return len(self._counts.host_sizes)

    @cached_property
    def levels(self) -> Tensor:
        """Topological level of every node, ``-1`` on or after a cycle. Where a host read costs a
        synchronization and every graph has at most :data:`SQUARING_MAX_NODES` nodes (the graphs
        ``auto`` asks about off CPU), in a fixed number of steps with no host read
        (:func:`~torch_geometric_chimera.utils.topological_levels` with ``depth_bound``)."""
        depth_bound = None
        if not common.host_reads_allowed(self.edge_index) and self.max_graph_size <= SQUARING_MAX_NODES:
            depth_bound = max(self.max_graph_size - 1, 0)  # a longest path stays inside its graph
        return topological_levels(self.edge_index, self.num_nodes, raise_on_cycle=False, depth_bound=depth_bound)

    @cached_property
    def _level_range(self) -> Tuple[int, int]:
        """The lowest and the highest level, read together (one synchronization on an accelerator)."""
        if self.num_nodes == 0:
            return 0, 0
        low, high = torch.stack(torch.aminmax(self.levels)).tolist()
        return low, high

    @cached_property
    def is_dag(self) -> bool:
        return self._level_range[0] >= 0

    @cached_property
    def is_line(self) -> bool:
        """``True`` for a union of directed paths: acyclic, in- and out-degree at most 1."""
        counts = self._counts
        if counts.max_out_degree > 1 or counts.max_in_degree > 1:
            return False
        return self.edge_index.size(1) == 0 or path_roots(self.edge_index, self.num_nodes)[2]

    @cached_property
    def max_graph_size(self) -> int:
        return max(self._counts.host_sizes, default=0)

    @cached_property
    def level_schedule(self):
        """``(level_ptr, order)``: nodes sorted by topological level and the level boundaries."""
        sorted_levels, order = torch.sort(self.levels, stable=True)
        bounds = torch.arange(int(sorted_levels[-1]) + 2 if self.num_nodes else 1, device=order.device)
        return torch.searchsorted(sorted_levels, bounds), order

    @cached_property
    def diameter_bound(self) -> Tensor:
        """Per-graph bound on the directed diameter (see :func:`diameter_bound`)."""
        return diameter_bound(self.edge_index, self.num_nodes, self.batch)

    @cached_property
    def operator(self) -> CsrOperator:
        return CsrOperator(self.edge_index, self.num_nodes)

    @cached_property
    def graph_sizes(self) -> Tensor:
        return self._counts.sizes

    @cached_property
    def band_schedule(self):
        """Reverse Cuthill-McKee order and bandwidth of every graph (``band`` path, CPU)."""
        return band_schedule(self.edge_index, self.num_nodes, self.batch)

    def path_costs(self, state_dim: int, head_dim: int) -> Dict[str, float]:
        """Estimated forward + backward seconds per head of every exact small-graph path that
        applies on CPU: ``"dense"`` always, ``"band"`` where its kernels run, ``"dag"`` on DAGs
        (the constants above :func:`choose_method`)."""
        padded = self.padded_sizes().double()
        state = state_dim * head_dim
        costs = {"dense": float(DENSE_CUBIC_S * (3 * padded ** 3).sum()
                                + DENSE_SQUARE_S * (6 * padded ** 2).sum() * (state_dim + head_dim)
                                + DENSE_GRAPH_S * int((self.graph_sizes > 0).sum()))}
        if band_available(self):
            schedule = self.band_schedule
            n = self.graph_sizes.double()
            costs["band"] = float(state * (BAND_NODE_S * self.num_nodes + BAND_NONZERO_S * schedule.factor_nnz.sum())
                                  + BAND_FACTOR_S * (n * schedule.bandwidth.double() ** 2).sum())
        if self.is_dag:
            costs["dag"] = DAG_ELEMENT_S * state * (self.num_nodes + self.edge_index.size(1))
        return costs

    def exact_costs(self, state_dim: int, head_dim: int) -> Tuple[float, float]:
        """Estimated forward + backward seconds per head of ``dense`` and ``band`` (see :meth:`path_costs`)."""
        costs = self.path_costs(state_dim, head_dim)
        return costs["dense"], costs.get("band", float("inf"))

    @cached_property
    def line_order(self) -> Tuple[Tensor, Tensor]:
        """Node order and incoming edges of the ``line`` path (see :func:`~.line.line_order`)."""
        return line_order(self.edge_index, self.num_nodes)

    @cached_property
    def depth(self) -> Optional[int]:
        """The longest directed path of any graph, in edges (the largest topological level), on a
        DAG; :obj:`None` when a graph has a cycle. ``"squaring"`` is exact with
        :func:`~.squaring.squarings_for_depth` of it."""
        if not self.is_dag:
            return None
        return self._level_range[1]

    @cached_property
    def padding_bounds(self) -> List[int]:
        """Padded size of every batch of ``"dense"`` and ``"squaring"``, increasing: the largest
        graph size alone, unless :func:`~.squaring.padding_bounds` splits the graphs by size. On CPU,
        where a launch costs little and padded flops cost time, graphs are split as soon as padding
        adds :data:`CPU_PADDING_WORK_LIMIT` of the cubic work (still at most four batches)."""
        on_cpu = common.host_reads_allowed(self.edge_index)  # CPU (or an accelerator in debug mode)
        return padding_bounds(self._counts.host_sizes, **({"work_limit": CPU_PADDING_WORK_LIMIT} if on_cpu else {}))

    @cached_property
    def padded_layouts(self) -> Tuple[List[PaddedLayout], Optional[Tensor]]:
        """The padded batches of ``"dense"`` and ``"squaring"`` and the permutation that puts their
        concatenated outputs back in node order: one :func:`~.squaring.padded_layout` with every graph
        padded to the largest and :obj:`None` (no permutation needed), or the
        :func:`~.squaring.bucketed_layouts` of :attr:`padding_bounds`."""
        bounds = self.padding_bounds
        if len(bounds) <= 1:
            return [padded_layout(self.edge_index, self.num_nodes, self.batch, self.max_graph_size,
                                  self.num_graphs)], None
        return bucketed_layouts(self.edge_index, self.num_nodes, self.batch, bounds)

    def inputs_checked(self, edge_index: Tensor, batch: Optional[Tensor]) -> bool:
        """Whether :func:`resolvent_attention` already checked the values of these very tensors
        (same objects, same version counters) with this topology, so that it need not read them
        again. Writes that bypass the version counter are not seen here: they are the cache's
        (:meth:`get` compares values on CPU) or the caller's concern, as for every cached property."""
        record = self._checked_inputs
        if record is None or edge_index.is_inference() or (batch is not None and batch.is_inference()):
            return False
        ei_ref, ei_version, batch_ref, batch_version = record
        if ei_ref() is not edge_index or ei_version != edge_index._version:
            return False
        if batch is None:
            return batch_ref is None
        return batch_ref is not None and batch_ref() is batch and batch_version == batch._version

    def mark_inputs_checked(self, edge_index: Tensor, batch: Optional[Tensor]) -> None:
        """Records that the values of ``edge_index`` and ``batch`` passed the checks (see
        :meth:`inputs_checked`)."""
        if edge_index.is_inference() or (batch is not None and batch.is_inference()):
            return  # no version counter to tell a later write
        batch_record = (None, None) if batch is None else (weakref.ref(batch), batch._version)
        self._checked_inputs = (weakref.ref(edge_index), edge_index._version, *batch_record)

    def padded_indices(self, heads: int) -> List[PaddedIndex]:
        """:func:`~.squaring.padded_index` of every layout of :attr:`padded_layouts` for ``heads`` heads,
        kept per number of heads."""
        if heads not in self._padded_indices:
            self._padded_indices[heads] = [padded_index(layout, heads) for layout in self.padded_layouts[0]]
        return self._padded_indices[heads]

    def padded_sizes(self) -> Tensor:
        """The size every graph is padded to by ``"dense"`` and ``"squaring"`` (``0`` for an empty graph)."""
        sizes = self.graph_sizes
        bounds = torch.tensor(self.padding_bounds or [0], dtype=sizes.dtype, device=sizes.device)
        return bounds[torch.searchsorted(bounds, sizes).clamp_max(bounds.numel() - 1)] * (sizes > 0)

    @cached_property
    def neumann_schedule(self) -> NeumannSchedule:
        """Horner schedule of ``neumann`` with each graph's own diameter bound as its term count."""
        return neumann_schedule(self.diameter_bound, self.batch)


def _same_values(kept: Tensor, current: Tensor) -> bool:
    """Whether ``current`` still holds the values of ``kept`` (its copy). On CPU through NumPy: one
    single-threaded pass, about 1000x faster than :func:`torch.equal` on a busy 2-core machine,
    whose thread pool then waits (``benchmarks/bench_topology_cache.py``)."""
    if kept.shape != current.shape or kept.dtype != current.dtype:
        return False
    if current.device.type == "cpu":
        return bool(numpy.array_equal(kept.numpy(), current.numpy()))
    return torch.equal(kept, current)


def choose_method(topology: GraphTopology, num_terms: Optional[int] = None, state_dim: Optional[int] = None,
                  head_dim: Optional[int] = None, gamma: Optional[float] = None) -> str:
    r"""The path ``method="auto"`` takes. Exact unless a truncation is asked for:

    1. ``num_terms`` given: ``"neumann"`` with that many terms;
    2. directed paths (sequences): ``"line"``;
    3. off CPU (tensors on an accelerator, or values not readable on the host for free, see
       :func:`~.common.host_reads_allowed`): every graph has at most :data:`SQUARING_MAX_NODES` nodes
       and the graphs are DAGs (exact after :math:`\lceil \log_2(\mathrm{depth} + 1) \rceil`
       squarings) or ``gamma`` bounds the row sums of :math:`|A|` below 1 (truncation below the
       float's roundoff): ``"squaring"``, a fixed number of batched products on one padded batch;
       otherwise, up to :data:`DENSE_MAX_NODES` nodes, ``"dense"`` (one batched pivoted LU). Both
       make a number of operations (kernel launches) independent of the number of graphs and sizes;
    4. on CPU, every graph has at most :data:`DENSE_MAX_NODES` nodes: when the state sizes are
       given, the exact path of least estimated time (:meth:`GraphTopology.path_costs`, a model
       calibrated by ``benchmarks/bench_auto_panel.py``) among ``"dense"`` (per graph
       :math:`O(n^3 + n^2 (S + P))`), ``"band"`` (:math:`O((n + \mathrm{nnz}(LU)) S P)`) and, on
       DAGs, ``"dag"`` (:math:`O((n + E) S P)`, taken only when clearly cheaper, see
       :data:`DAG_MARGIN`); otherwise ``"dense"``. On the panel the choice is within 1.10x of the
       fastest exact path on the mean of four runs, 1.13x in the check run, where two paths tie
       within the machine's noise (``benchmarks/results/auto_panel_cpu*.json``); e.g. 64 rings with
       chords of 150 nodes take ``"band"`` for :math:`(H, S, P) = (4, 16, 32)`, a state of
       :math:`64 \times 32` takes ``"dense"``;
    5. the graph is a DAG: ``"dag"``;
    6. otherwise ``"iterative"``.

    ``gamma`` (optional): a bound below 1 on every row sum of :math:`|A|` that the caller knows
    (:class:`~torch_geometric_chimera.nn.ChimeraConv` with the ``general`` adjacency passes its own).
    """
    if num_terms is not None:
        return "neumann"
    # Every layer and step on one topology asks again: the answer depends on the shapes only.
    key = (state_dim, head_dim, common.host_reads_allowed(topology.edge_index), gamma is not None)
    if key not in topology.choices:
        topology.choices[key] = _choose_exact_or_iterative(topology, state_dim, head_dim, gamma)
    return topology.choices[key]


def _choose_exact_or_iterative(topology: GraphTopology, state_dim: Optional[int], head_dim: Optional[int],
                               gamma: Optional[float]) -> str:
    if topology.is_line:
        return "line"
    on_cpu = topology.edge_index.device.type == "cpu" and common.host_reads_allowed(topology.edge_index)
    # gamma first: it costs nothing, asking whether the graphs are DAGs costs a host read off CPU.
    if not on_cpu and topology.max_graph_size <= SQUARING_MAX_NODES and (gamma is not None or topology.is_dag):
        return "squaring"
    if topology.max_graph_size <= DENSE_MAX_NODES:
        # The model is calibrated on CPU, and evaluating it reads sizes on the host.
        if state_dim is not None and head_dim is not None and on_cpu:
            costs = topology.path_costs(state_dim, head_dim)
            dag = costs.pop("dag", None)
            best = min(costs, key=costs.get)
            return "dag" if dag is not None and dag < DAG_MARGIN * costs[best] else best
        return "dense"
    if topology.is_dag:
        return "dag"
    return "iterative"


def band_available(topology: GraphTopology) -> bool:
    """The band kernels exist for CPU tensors (with the compiled extension); the path also reads
    the host (its diagonal-dominance test), which only CPU does for free."""
    edge_index = topology.edge_index
    return HAS_EXTENSION and edge_index.device.type == "cpu" and common.host_reads_allowed(edge_index)


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                  batch: Optional[Tensor]) -> Tensor:
    """Validate shapes, dtypes and devices; returns ``edge_weight`` as ``[E, H]``."""
    edge_weight = common.check_attention_shapes(query, key, value, edge_index, edge_weight, batch)

    if torch_geometric.is_debug_enabled():
        for name, t in (("query", query), ("key", key), ("value", value), ("edge_weight", edge_weight)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN or Inf (checked because torch_geometric.debug() is on)")
    return edge_weight


def _check_graph_values(edge_index: Tensor, batch: Optional[Tensor], num_nodes: int, topology: GraphTopology) -> None:
    """The values of ``edge_index`` and ``batch``: node indices in range, graph ids non-negative, no
    edge between graphs. They need the data on the host: checked on CPU (on accelerators in debug
    mode only), once per topology and unchanged tensors (:meth:`GraphTopology.inputs_checked`)."""
    if not common.host_reads_allowed(edge_index) or topology.inputs_checked(edge_index, batch):
        return
    num_edges = edge_index.size(1)
    if num_edges and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise IndexError(f"edge_index: node indices must lie in [0, {num_nodes}) for N = {num_nodes} nodes, "
                         f"found values in [{int(edge_index.min())}, {int(edge_index.max())}]")
    if batch is not None and num_nodes and int(batch.min()) < 0:
        raise ValueError(f"batch: graph ids must be non-negative, found {int(batch.min())}")
    if batch is not None and num_edges and bool((batch[edge_index[0]] != batch[edge_index[1]]).any()):
        raise ValueError("edge_index: an edge connects nodes of different graphs in batch; every edge must stay "
                         "inside one graph")
    topology.mark_inputs_checked(edge_index, batch)


def resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor, *,
                        method: str = "auto", num_terms: Optional[int] = None, batch: Optional[Tensor] = None,
                        tol: Optional[float] = None, max_iter: int = 1000, chunk_size: int = 64,
                        topology: Optional[GraphTopology] = None, gamma: Optional[float] = None) -> Tensor:
    r"""Resolvent attention, per head:

    .. math::
        \mathbf{y} = \left(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top\right)\mathbf{V},
        \qquad \mathbf{L} = (\mathbf{I} - \mathbf{A})^{-1}
        \quad\text{or}\quad \mathbf{L} = \textstyle\sum_{k=0}^{K} \mathbf{A}^k,

    where :math:`\mathbf{A}_{ij}` = ``edge_weight[e]`` for every edge ``e = (j -> i)``
    (``edge_index[0]`` is the source). Duplicate edges add up; there are no implicit self-loops.
    Graphs in a batch are independent (the matrix is block diagonal).

    Args:
        query (Tensor): :math:`\mathbf{C}`, shape ``[N, H, S]``.
        key (Tensor): :math:`\bar{\mathbf{B}}`, shape ``[N, H, S]``.
        value (Tensor): :math:`\mathbf{V}`, shape ``[N, H, P]``.
        edge_index (LongTensor): ``[2, E]``, int32 or int64.
        edge_weight (Tensor): ``[E, H]`` (or ``[E]``, shared by all heads).
        method (str, optional): ``"dense"`` (exact, one batched inverse of every graph padded to the
            largest, see :mod:`.dense`), ``"squaring"`` (the squaring trick on the same padded batch,
            :math:`L = \prod_j (I + A^{2^j})`, see :mod:`.squaring`: exact on DAGs, and to the
            float's roundoff when every row of :math:`|A|` sums to less than 1; otherwise refused),
            ``"band"`` (exact, band LU in reverse Cuthill-McKee order, CPU), ``"dag"``
            (exact, DAGs only), ``"line"`` (exact, unions of directed paths, chunked like Mamba-2's
            SSD), ``"neumann"`` (truncated series), ``"iterative"`` (exact to ``tol``,
            implicit backward) or ``"auto"`` (see :func:`choose_method`). (default: ``"auto"``)
        num_terms (int, optional): ``K`` for ``"neumann"``. When :obj:`None`, every graph uses its
            own :func:`~torch_geometric_chimera.utils.diameter_bound`. (default: :obj:`None`)
        batch (LongTensor, optional): ``[N]`` graph id of every node. (default: :obj:`None`)
        tol (float, optional): relative tolerance of ``"iterative"``; :obj:`None` picks it by dtype
            (:func:`~.iterative.default_tolerance`: ``1e-12`` for float64, ``1e-6`` for float32,
            ``eps / 16`` for float16 and bfloat16); ``0`` runs exactly ``max_iter`` iterations with no
            stopping test (nothing read on the host). For ``"squaring"``, where the graph has a
            cycle: the truncation bound :math:`\gamma^{2^k}` relative to :math:`1 / (1 - \gamma)`
            (:func:`~.squaring.squarings_for_bound`); :obj:`None`, and any value outside ``(0, 1)``,
            is the unit roundoff of the dtype. (default: :obj:`None`)
        max_iter (int, optional): iteration cap of ``"iterative"``, at least 1. (default: ``1000``)
        chunk_size (int, optional): chunk length of ``"line"``. (default: ``64``)
        topology (GraphTopology, optional): topology of ``(edge_index, batch)`` to reuse; by default
            :meth:`GraphTopology.get` shares one between calls with the same, unchanged tensors.
        gamma (float, optional): a bound in ``[0, 1)`` on every row sum of :math:`|A|` known to the
            caller (``gamma`` of the ``general`` adjacency, which
            :class:`~torch_geometric_chimera.nn.ChimeraConv` passes). ``"squaring"`` then picks its
            number of squarings from it instead of measuring the row sums (a host read, one
            synchronization on a GPU), and ``"auto"`` may take ``"squaring"`` on graphs with cycles off
            CPU. Checked against the measured row sums where that is free (CPU); not checked on
            accelerators, where a wrong bound gives a wrong ``"squaring"`` result. (default: :obj:`None`)

    float16 and bfloat16 inputs are computed in float32 (factorizations, series, iterations) and
    the output is rounded to the input dtype. An output with no entries (``N``, ``H`` or ``P`` zero)
    is returned as zeros of shape ``[N, H, P]``.

    :rtype: :class:`Tensor` of shape ``[N, H, P]``.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if num_terms is not None and (not isinstance(num_terms, int) or isinstance(num_terms, bool) or num_terms < 0):
        raise ValueError(f"num_terms: expected a non-negative int or None, got {num_terms!r}")
    if num_terms is not None and num_terms > MAX_NUM_TERMS:
        raise ValueError(f"num_terms: at most MAX_NUM_TERMS = {MAX_NUM_TERMS} terms (each one is a sparse product "
                         f"over every edge), got {num_terms}; for the exact resolvent use method='iterative' or "
                         f"'dense'")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol: expected a non-negative float or None, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive int, got {max_iter!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1):
        raise ValueError(f"gamma: expected a bound on the row sums of |A| in [0, 1) or None, got {gamma!r}")
    edge_weight = _check_inputs(query, key, value, edge_index, edge_weight, batch)
    num_nodes = query.size(0)
    if topology is None:
        topology = GraphTopology.get(edge_index, num_nodes, batch)
    elif not isinstance(topology, GraphTopology) or topology.num_nodes != num_nodes:
        raise ValueError(f"topology: expected a GraphTopology of N = {num_nodes} nodes (like query), got "
                         f"{getattr(topology, 'num_nodes', type(topology).__name__)}")
    _check_graph_values(edge_index, batch, num_nodes, topology)
    if method == "auto":
        method = choose_method(topology, num_terms, query.size(-1), value.size(-1), gamma)
    if num_terms is not None and method != "neumann":
        raise ValueError(f"num_terms: only method='neumann' (or 'auto') truncates the series; method={method!r} "
                         f"is exact, got num_terms={num_terms}")
    if value.numel() == 0:  # N, H or P is zero: nothing to compute (S = 0 gives zero scores, computed below)
        return value.new_zeros(value.shape)
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # Factorizations, inverses, series and iterations run in float32; the output is rounded once.
        query, key, value, edge_weight = (t.float() for t in (query, key, value, edge_weight))
    if method == "squaring":
        bound = tol if tol is not None and 0 < tol < 1 else None  # tol = 0 means "no stopping test" to iterative
        out = _squaring(query, key, value, edge_weight, topology, gamma, bound)
    else:
        if tol is None:
            tol = default_tolerance(dtype)
        out = _dispatch(method, query, key, value, edge_weight, topology, num_terms, tol, max_iter, chunk_size)
    return out.to(dtype)


def _not_finite(named: Sequence[Tuple[str, Tensor]]) -> Optional[str]:
    """The first name whose tensor holds a NaN or an Inf (read on the host: failure paths only)."""
    for name, t in named:
        if t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def _dispatch(method: str, query: Tensor, key: Tensor, value: Tensor, edge_weight: Tensor, topology: GraphTopology,
              num_terms: Optional[int], tol: float, max_iter: int, chunk_size: int) -> Tensor:
    num_nodes = query.size(0)
    if method == "line":
        if not topology.is_line:
            raise ValueError("edge_index: method='line' needs a union of directed paths (every node with at most one "
                             "incoming and one outgoing edge, no cycle); use method='dag' or 'dense'")
        return line_resolvent_attention(query, key, value, topology.edge_index, edge_weight, chunk_size,
                                        order=topology.line_order)
    if method == "dense":
        return _dense(query, key, value, edge_weight, topology)

    if method == "band":
        if not band_available(topology):
            raise ValueError(f"method: 'band' runs on CPU (with the compiled extension), got tensors on "
                             f"{query.device}; use method='dense'")
        row_sum = torch.zeros(num_nodes, edge_weight.size(1), dtype=edge_weight.dtype, device=query.device)
        row_sum.index_add_(0, topology.edge_index[1], edge_weight.detach().abs())
        if edge_weight.numel() and float(row_sum.max()) >= 1.0:
            # No pivoting is safe only for diagonally dominant I - A; LU with pivoting otherwise.
            return _dense(query, key, value, edge_weight, topology)
        csr = topology.operator
        return band_resolvent_attention(topology.band_schedule, csr.rowptr, csr.col, edge_weight[csr.perm], query,
                                        key, value)

    if method == "dag":
        if not topology.is_dag:  # cached: no host read once the topology is known
            raise_if_cyclic(topology.levels)
        level_ptr, order = topology.level_schedule
        csr = topology.operator
        if HAS_EXTENSION and query.device.type == "cpu":  # state contraction fused into the solve
            return dag_attention(level_ptr, order, csr.rowptr, csr.col, edge_weight[csr.perm], query, key, value)
        state = dag_solve(level_ptr, order, csr.rowptr, csr.col, edge_weight[csr.perm], to_state(key, value))
        return read_state(query, state, value.size(-1))

    state = to_state(key, value)
    if method == "neumann":
        schedule = topology.neumann_schedule if num_terms is None else num_terms
        if num_terms is None and schedule.max_terms > MAX_NUM_TERMS:
            raise ValueError(f"num_terms: the default, each graph's diameter bound, reaches {schedule.max_terms} "
                             f"terms, above MAX_NUM_TERMS = {MAX_NUM_TERMS}; pass num_terms or use "
                             f"method='iterative'")
        state = checkpointed_neumann(topology.operator, edge_weight, state, schedule)
    else:  # iterative
        state = iterative_solve(topology.operator, edge_weight, state, tol, max_iter,
                                inputs=(("edge_weight", edge_weight), ("key", key), ("value", value)))
    return read_state(query, state, value.size(-1))


def _squaring(query: Tensor, key: Tensor, value: Tensor, edge_weight: Tensor, topology: GraphTopology,
              gamma: Optional[float], tol: Optional[float]) -> Tensor:
    """The ``squaring`` path on the topology's padded batches. Its number of squarings: exact for the
    DAG depth, or below ``tol`` for the bound ``gamma`` (the fewer of the two when both are known);
    with neither, for the measured row sums of ``|A|``, a host read (one synchronization on a GPU).
    A given ``gamma`` is checked where reading the row sums is free. Where host reads cost a
    synchronization, a given ``gamma`` alone decides (asking whether the graphs are DAGs would read
    the host; on a DAG the squarings for ``gamma`` are exact as well, only more)."""
    host_reads = common.host_reads_allowed(edge_weight)
    depth = topology.depth if host_reads or gamma is None else None  # cached: None on graphs with a cycle
    if gamma is not None and host_reads:
        measured = row_sum_bound(topology.edge_index, edge_weight, topology.num_nodes)
        if math.isnan(measured):
            raise ValueError("edge_weight: contains NaN, so the rows of |A| have no bound (method='squaring')")
        if measured > gamma * (1 + GAMMA_SLACK):
            raise ValueError(f"gamma: a row of |A| sums to {measured:.6g}, above the bound gamma = {gamma}; pass "
                             f"the true bound, or gamma=None to measure it")
    if depth is None and gamma is None:
        # Decided graph by graph: every graph a DAG (exact) or with rows of |A| summing to < 1; the
        # error names the first graph that is neither.
        num_squarings = squarings_per_graph(topology.edge_index, edge_weight, topology.levels, topology.batch,
                                            topology.num_graphs, tol, "float32", query.dtype,
                                            batch_ids=topology._batch_ids)
    else:
        known = []
        if depth is not None:  # exact
            known.append(resolve_num_squarings(None, depth, None, tol, "float32", query.dtype))
        if gamma is not None:  # truncation below tol (default: the roundoff)
            known.append(resolve_num_squarings(None, None, gamma, tol, "float32", query.dtype))
        num_squarings = min(known)
    fused = fused_squaring_attention(query.device)
    layouts, inverse = topology.padded_layouts
    return over_layouts(lambda q, k, v, w, layout, index: squaring_attention(q, k, v, w, layout, num_squarings,
                                                                             fused=fused, index=index),
                        layouts, inverse, query, key, value, edge_weight, topology.padded_indices(query.size(1)))


def fused_squaring_attention(device: torch.device) -> bool:
    r"""Whether ``"squaring"`` computes :math:`(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}`
    and its backward in the Triton kernels of :mod:`.triton_attention`: on CUDA with Triton, never in
    Triton's (slow) interpreter on CPU. A function of its own so that tests on CPU can take the CUDA
    branch (``tests/ops/test_op_count.py``)."""
    return device.type == "cuda" and fused_available(device)


def _dense(query: Tensor, key: Tensor, value: Tensor, edge_weight: Tensor, topology: GraphTopology) -> Tensor:
    layouts, inverse = topology.padded_layouts
    try:
        return over_layouts(dense_attention, layouts, inverse, query, key, value, edge_weight,
                            topology.padded_indices(query.size(1)))
    except torch.linalg.LinAlgError as error:
        if _not_finite([("edge_weight", edge_weight)]):
            raise ValueError("edge_weight: contains NaN or Inf, so I - A has no inverse") from error
        raise torch.linalg.LinAlgError(
            "edge_weight: I - A is singular (A has an eigenvalue 1, e.g. a self-loop of weight 1 or a cycle whose "
            "weights multiply to 1), so the resolvent (I - A)^-1 does not exist; scale the weights so that every "
            "row of |A| sums to less than 1 (e.g. the 'general' adjacency with gamma < 1)") from error
