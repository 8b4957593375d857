r"""``ChimeraConv``: a Mamba-2 block whose sequence mixer is resolvent attention on the graph."""
import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, Parameter
from torch_geometric.nn import MessagePassing
from torch_geometric.typing import Adj, OptTensor
from torch_geometric.utils import is_torch_sparse_tensor, to_edge_index

from ..ops import METHODS, resolvent_attention
from ..ops.block import gated_rms_norm, gated_rms_norm_reference, local_conv_silu
from ..ops.opaque import opaque_resolvent_attention
from .adjacency import (ADJACENCIES, TRANSITIONS, dag_adjacency, general_adjacency, mamba2_adjacency,
                        undirected_line_adjacency)
from .decomposition import (CONV_KERNEL, DECOMPOSITIONS, GRID_LIKE, NUM_DIRECTIONS, decomposition_mixer, dt_groups,
                            opaque_decomposition_mixer, sharing_groups)

#: Decompositions without Mamba-2's learned decay rate A_log (the authors' image model has none).
GRID_DAGS = ("grid",)


#: ``resolvent_attention`` run by Python even inside a compiled region (torch.compile stops its graph there).
_resolvent_attention_outside_graph = torch.compiler.disable(resolvent_attention)


class ChimeraConv(MessagePassing):
    r"""The Chimera layer from "Chimera: State Space Models Beyond Sequences" (Lahoti et al.):
    Mamba-2's selective state space model generalized from sequences to any graph topology.

    With :math:`\mathbf{X}` the node features, a Mamba-2 style block computes

    .. math::
        [\mathbf{z}, \mathbf{x}, \mathbf{B}, \mathbf{C}, \boldsymbol{\delta}, \boldsymbol{\Psi}]
            &= \mathbf{X}\mathbf{W}_{\mathrm{in}}, \qquad
        [\mathbf{x}, \mathbf{B}, \mathbf{C}] \leftarrow \mathrm{SiLU}\Big(
            \mathbf{w}_0 \odot [\mathbf{x}, \mathbf{B}, \mathbf{C}]_i + \mathbf{w}_1 \odot
            \mathrm{mean}_{j \in \mathcal{N}(i)} [\mathbf{x}, \mathbf{B}, \mathbf{C}]_j + \mathbf{b}\Big)
        \quad \text{(a decomposition: a depthwise convolution with one weight per offset)},

        \mathbf{y}_h &= \left((\mathbf{I} - \mathbf{A}_h)^{-1} \odot \mathbf{C}\bar{\mathbf{B}}_h^\top\right)
            \mathbf{x}_h + D_h \mathbf{x}_h, \qquad
        \mathrm{out} = \mathrm{RMSNorm}(\mathbf{y} \odot \mathrm{SiLU}(\mathbf{z}))\,\mathbf{W}_{\mathrm{out}},

    per head :math:`h`, with :math:`\Delta = \mathrm{softplus}(\boldsymbol{\delta} + \mathbf{b}_\Delta)`
    and the selective adjacency :math:`\mathbf{A}_h` and :math:`\bar{\mathbf{B}}_h` given by
    ``adjacency`` (see :mod:`torch_geometric_chimera.nn.adjacency`); for ``"general"``

    .. math::
        A_{ij} = \frac{\gamma\, e^{-(\Delta_i + \Delta_j + \Delta'_{ij})/3}}
                 {\sum_{k} e^{-(\Delta_i + \Delta_k + \Delta'_{ik})/3} + e^{-\Psi_i}},
        \qquad \Delta'_{ij} = \mathrm{softplus}(\mathbf{e}_{ji}\mathbf{W}_e),

    for every edge :math:`j \to i`, and :math:`\bar{\mathbf{B}}_i = \Delta_i \mathbf{B}_i`.

    .. note::

        With a sparse adjacency (:class:`torch.sparse.Tensor` or :class:`torch_sparse.SparseTensor`,
        transposed as everywhere in PyG), ``edge_attr`` must follow the adjacency's *stored* order,
        as for :class:`~torch_geometric.nn.conv.TransformerConv`: the order of ``indices()`` for a
        COO tensor, row-major (by target) for CSR and :class:`SparseTensor`, column-major (by
        source) for CSC. An ``edge_attr`` in the order of some other ``edge_index`` gives other
        numbers; only a wrong number of rows is detected.

    .. note::

        The resolvent needs a square adjacency over one node set: bipartite inputs (a pair
        ``(x_src, x_dst)``, as :func:`~torch_geometric.nn.to_hetero` passes for relations between
        two node types, or a rectangular sparse adjacency) raise a :class:`ValueError`. Relations
        within one node type work under :func:`~torch_geometric.nn.to_hetero`.

    .. note::

        PyG's explainers (*e.g.*, :class:`~torch_geometric.explain.algorithm.GNNExplainer`) mask
        the local messages *and* the selective adjacency :math:`\mathbf{A}` (see
        :mod:`torch_geometric_chimera.nn.adjacency`): an edge masked to zero has no global
        influence either. The local convolution follows PyG's convention (its mean still counts
        the masked message), so the output equals that of the graph without the edge when
        ``local_conv=False``.

    .. note::

        :func:`torch.compile` traces the layer without a graph break: the resolvent mixer enters
        the graph as one custom op, ``chimera::resolvent_attention``
        (:mod:`torch_geometric_chimera.ops.opaque`), which runs the eager solve with the shared
        topology cache and, in the backward, runs the forward again (as activation checkpointing
        does). Pass ``topology=None`` there: with an explicit ``topology`` the mixer runs outside
        the graph (two graph breaks when the layer itself is compiled). In CUDA graphs (``mode="reduce-overhead"``) the op runs
        between the captured parts.

    .. note::

        On CPU (float32 / float64), the local convolution with its SiLU and the gated RMSNorm with
        the :math:`D` skip run as two fused kernels (:mod:`torch_geometric_chimera.ops.block`), one
        pass each forward and backward; they support no double backward. Other devices and dtypes
        use the same formulas in PyTorch ops.

    .. note::

        :func:`torch.jit.script` compiles the layer, but the resolvent solve, the fused local
        convolution and a decomposition's whole block stay Python calls (topology caches, autograd
        functions and compiled ops that are not TorchScript): the scripted module runs in Python and
        gives the eager outputs, but :func:`torch.jit.save` refuses it.

    Args:
        channels (int): size of every input and output node feature.
        heads (int, optional): number of SSM heads :math:`H`. (default: ``4``)
        state_dim (int, optional): state size :math:`S` of :math:`\mathbf{B}, \mathbf{C}`.
            (default: ``16``)
        expand (int, optional): inner width is ``expand * channels``, split into ``heads`` heads
            of size :math:`P`. (default: ``2``)
        edge_dim (int, optional): edge feature size; enables :math:`\Delta'`. (default: :obj:`None`)
        adjacency (str, optional): ``"general"``, ``"dag"``, ``"undirected_line"`` or
            ``"mamba2"``. (default: ``"general"``)
        method (str, optional): how the resolvent is solved, see
            :func:`~torch_geometric_chimera.ops.resolvent_attention`. (default: ``"auto"``)
        num_terms (int, optional): truncate the resolvent to ``num_terms + 1`` Neumann terms.
            With ``method="neumann"`` and :obj:`None`, each graph's diameter bound is used.
            (default: :obj:`None`, exact)
        tol (float, optional): tolerance of ``method="iterative"`` (:obj:`None`: by dtype; ``0``:
            exactly ``max_iter`` iterations and no stopping test, nothing read on the host).
            (default: :obj:`None`)
        max_iter (int, optional): iteration cap of ``method="iterative"``. (default: ``1000``)
        gamma (float, optional): row-normalization scale :math:`\gamma < 1` of ``"general"``.
            (default: ``0.9``)
        local_conv (bool, optional): apply the local graph convolution. (default: :obj:`True`)
        dt_min (float, optional): smallest initial :math:`\Delta`. (default: ``0.001``)
        dt_max (float, optional): largest initial :math:`\Delta`. (default: ``0.1``)
        decomposition (str, optional): run the mixer on a canonical DAG decomposition instead
            of ``edge_index`` (paper §4.1; :mod:`~torch_geometric_chimera.nn.decomposition`) and
            sum the results: ``"line"`` (the forward and the backward line of every sequence,
            Fig. 2), ``"fwd"`` (the forward line alone: causal, a Mamba-2 block), ``"grid"``
            (the four directed grid DAGs of every image, Fig. 3, summed and scaled by
            :math:`1/\sqrt{4}`), or the baselines ``"cross_scan"`` (VMamba's four raster scans)
            and ``"hydra"`` (Hydra's shifted bidirectional mixer with a diagonal term). Built as
            the authors' image and text models: the local convolution has one weight per offset
            (``conv_kernel``), and every DAG has its own :math:`\Delta` per edge direction
            (``share_dt``); grids use the DAG normalization of Prop. 4.3 per direction, lines are
            Mamba-2 in every direction, with its learned decay rate per head (the parameter
            ``A_log``, transitions :math:`e^{-e^{A\_log_h} \Delta}`, starting at ``A_log = 0`` as
            the authors' text model; grids have none, as their image model) (``adjacency`` must be
            ``"dag"``, the default then). The
            geometry comes from :meth:`forward`'s ``grid_size`` or ``seq_len``, as
            :class:`~torch_geometric_chimera.transforms.ImageToGrid` and
            :class:`~torch_geometric_chimera.transforms.SequenceToLine` record it. (default:
            :obj:`None`: the mixer runs on ``edge_index``)
        sharing (str, optional): which DAGs of the decomposition share their :math:`\mathbf{B},
            \mathbf{C}` projections (paper App. B.2): ``"none"`` (each DAG its own),
            ``"complete"`` (one for all), ``"row"`` (grid DAGs of one vertical direction share)
            or ``"diagonal"`` (a grid DAG shares with its reverse: down-right with up-left,
            down-left with up-right). (default: ``"diagonal"`` for ``"grid"``, ``"none"``
            otherwise)
        conv_kernel (int, optional): width of a decomposition's depthwise local convolution,
            zero padded at every graph's border: ``k x k`` over the image (odd ``k``) for
            ``"grid"`` and ``"cross_scan"``, ``k`` centred taps (odd) for ``"line"`` and
            ``"hydra"``, ``k`` causal taps for ``"fwd"``. (default: ``3``, ``7``, ``7``, ``4``)
        share_dt (str, optional): ``"none"`` (every DAG its own :math:`\Delta`) or
            ``"diagonal"`` (a DAG and its reverse share it, the authors'
            ``share_dt_for_two_graphs``). (default: ``"none"``)
        transitions (str, optional): ``"positive"`` (every transition :math:`e^{-x} \in (0, 1]`,
            Mamba's) or ``"signed"`` (:math:`2e^{-x} - 1 \in (-1, 1]`, as Grazzi et al.,
            "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues", do for Mamba):
            for ``"general"``

            .. math::
                A_{ij} = \frac{\gamma\, (2e^{-x_{ij}} - 1)}{\sum_k |2e^{-x_{ik}} - 1| + e^{-\Psi_i}},
                \qquad x_{ij} = (\Delta_i + \Delta_j + \Delta'_{ij}) / 3,

            and every other adjacency and decomposition keeps its normalization :math:`s` and
            replaces :math:`e^{-x}` by :math:`2e^{-x} - 1` (:math:`s = 1/\sqrt{|p(i)|}` on DAGs,
            :math:`\tfrac12` on the undirected line). A state can then change sign along a path,
            which products of positive weights never do: with them a linear recurrence cannot track
            parity. Every bound the solvers use holds for :math:`|\mathbf{A}|` (row sums of
            :math:`|\mathbf{A}|` below :math:`\gamma` for ``"general"``; on DAGs, Prop. 4.3's variance
            argument with :math:`|\bar A_{ij}| \le 1/\sqrt{|p(i)|}`), so every ``method`` is exact as
            before. GraphGym key: ``chimera.transitions``. (default: ``"positive"``)
        **kwargs (optional): additional arguments of :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices :math:`(2, |\mathcal{E}|)`
          or a sparse adjacency :math:`(|\mathcal{V}|, |\mathcal{V}|)` (``adj_t``: row = target),
          *(optional)* edge features :math:`(|\mathcal{E}|, D)` (for a sparse adjacency, in its
          stored order), *(optional)* batch vector :math:`(|\mathcal{V}|)`
        - **output:** node features :math:`(|\mathcal{V}|, F)`
    """

    def __init__(self, channels: int, heads: int = 4, state_dim: int = 16, expand: int = 2,
                 edge_dim: Optional[int] = None, adjacency: Optional[str] = None, method: str = "auto",
                 num_terms: Optional[int] = None, gamma: float = 0.9, local_conv: bool = True,
                 dt_min: float = 0.001, dt_max: float = 0.1, tol: Optional[float] = None, max_iter: int = 1000,
                 decomposition: Optional[str] = None, sharing: Optional[str] = None,
                 conv_kernel: Optional[int] = None, share_dt: Optional[str] = None, transitions: str = "positive",
                 **kwargs):
        kwargs.setdefault("aggr", "mean")
        super().__init__(**kwargs)
        # Sizes first: heads=0 would otherwise surface as a modulo by zero or an empty reshape.
        for name, value in (("channels", channels), ("heads", heads), ("state_dim", state_dim), ("expand", expand),
                            ("edge_dim", edge_dim), ("max_iter", max_iter)):
            if name == "edge_dim" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if num_terms is not None and (not isinstance(num_terms, int) or isinstance(num_terms, bool) or num_terms < 0):
            raise ValueError(f"num_terms: expected a non-negative int or None, got {num_terms!r}")
        if tol is not None and not tol >= 0:
            raise ValueError(f"tol: expected a non-negative float or None, got {tol!r}")
        if not 0.0 < dt_min <= dt_max:
            raise ValueError(f"dt_min: expected 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if decomposition is not None and decomposition not in DECOMPOSITIONS:
            raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS} or None, got {decomposition!r}")
        if adjacency is None:
            adjacency = "general" if decomposition is None else "dag"
        if decomposition is not None:
            if adjacency != "dag":
                raise ValueError(f"adjacency: decomposition={decomposition!r} normalizes every DAG as Prop. 4.3 "
                                 f"does, so adjacency must be 'dag' (or None), got {adjacency!r}")
            if edge_dim is not None:
                raise ValueError("edge_dim: the DAGs of a decomposition come from the geometry, not from "
                                 "edge_index, so they carry no edge features; use edge_dim=None")
            if sharing is None:
                sharing = "diagonal" if decomposition == "grid" else "none"
            self.groups = sharing_groups(decomposition, sharing)
            share_dt = "none" if share_dt is None else share_dt
            self.dt_groups = dt_groups(decomposition, share_dt)
            conv_kernel = CONV_KERNEL[decomposition] if conv_kernel is None else conv_kernel
            if not isinstance(conv_kernel, int) or isinstance(conv_kernel, bool) or conv_kernel < 1 or (
                    decomposition != "fwd" and conv_kernel % 2 == 0):
                raise ValueError(f"conv_kernel: expected a positive int, odd for decomposition={decomposition!r} (the "
                                 f"kernel is centred on the node), got {conv_kernel!r}")
        else:
            for name, value in (("sharing", sharing), ("share_dt", share_dt), ("conv_kernel", conv_kernel)):
                if value is not None:
                    raise ValueError(f"{name}: only applies with a decomposition; pass decomposition='line', 'fwd' "
                                     f"or 'grid'")
            self.groups = self.dt_groups = (0,)
        self.decomposition, self.sharing, self.share_dt, self.conv_kernel = decomposition, sharing, share_dt, conv_kernel
        self.num_sets = max(self.groups) + 1
        if adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency: expected one of {ADJACENCIES}, got {adjacency!r}")
        if transitions not in TRANSITIONS:
            raise ValueError(f"transitions: expected one of {TRANSITIONS}, got {transitions!r}")
        self.transitions = transitions
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        inner = expand * channels
        if inner % heads:
            raise ValueError(f"heads: expand * channels = {inner} must be divisible by heads, got heads={heads}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma: expected 0 < gamma < 1 for an invertible I - A, got {gamma}")
        if adjacency == "mamba2" and edge_dim is not None:
            raise ValueError("edge_dim: the 'mamba2' adjacency has no edge selectivity; use edge_dim=None")
        self.channels, self.heads, self.state_dim, self.expand = channels, heads, state_dim, expand
        self.head_dim, self.inner = inner // heads, inner
        self.edge_dim, self.adjacency, self.method = edge_dim, adjacency, method
        self.num_terms, self.gamma, self.local_conv = num_terms, gamma, local_conv
        self.dt_min, self.dt_max = dt_min, dt_max
        self.tol, self.max_iter = tol, max_iter

        # x, then B and C for each of the num_sets parameter sets of the decomposition.
        conv_width = inner + 2 * state_dim * self.num_sets
        self.conv_width = conv_width
        if decomposition is None:
            # delta and psi per head; the local convolution: one weight for the node, one for its neighbours.
            self.dt_width = 2 * heads
            self.conv_self = Parameter(torch.empty(conv_width))
            self.conv_neighbors = Parameter(torch.empty(conv_width))
        else:
            # delta per head, Delta set (share_dt) and edge direction; a depthwise convolution with one
            # weight per offset (k x k on grids, k taps on lines), as the authors' Conv2d / Conv1d.
            self.dt_width = heads * (max(self.dt_groups) + 1) * NUM_DIRECTIONS[decomposition]
            if decomposition == "hydra":  # and Hydra's data-dependent diagonal, per head
                self.dt_width += heads
            kernel_shape = (conv_kernel, conv_kernel) if decomposition in GRID_LIKE else (conv_kernel,)
            self.conv_weight = Parameter(torch.empty(conv_width, *kernel_shape))
        # One projection for z, (x, B, C) and the selectivity, as Mamba-2's in_proj.
        self.in_proj = Linear(channels, inner + conv_width + self.dt_width, bias=False)
        self.conv_bias = Parameter(torch.empty(conv_width))
        self.dt_bias = Parameter(torch.empty(heads))
        if decomposition is not None and decomposition not in GRID_DAGS:
            # Mamba-2's decay rate per head on every line (a_h = exp(A_log), transitions exp(-a_h Delta)), as
            # the authors' text model; their image model's grid DAGs have none.
            self.A_log = Parameter(torch.empty(heads))
            self._register_load_state_dict_pre_hook(self._fill_missing_decay_rate)
        else:
            self.register_parameter("A_log", None)
        self.D = Parameter(torch.empty(heads))
        self.norm_weight = Parameter(torch.empty(inner))
        self.edge_proj = Linear(edge_dim, heads) if edge_dim is not None else None
        self.out_proj = Linear(inner, channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        r"""Resets all learnable parameters of the module."""
        super().reset_parameters()
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        if self.edge_proj is not None:
            self.edge_proj.reset_parameters()
        with torch.no_grad():
            if self.decomposition is None:
                # Local conv starts as identity plus a small neighbour mix (Mamba's short conv starts random).
                bound = 1.0 / math.sqrt(2.0)
                self.conv_self.uniform_(-bound, bound).add_(1.0)
                self.conv_neighbors.uniform_(-bound, bound)
                self.conv_bias.zero_()
            else:
                # As torch.nn.Conv2d / Conv1d (Mamba-2's and the authors' convolutions): uniform in
                # +-1 / sqrt(fan_in), fan_in the kernel's taps (depthwise).
                bound = 1.0 / math.sqrt(self.conv_weight[0].numel())
                self.conv_weight.uniform_(-bound, bound)
                self.conv_bias.uniform_(-bound, bound)
            # Mamba-2's dt initialization: Δ log-uniform in [dt_min, dt_max] through softplus.
            dt = torch.exp(torch.rand(self.heads) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min)).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            if self.A_log is not None:
                self.A_log.zero_()  # a_h = 1, as the authors' text model starts
            self.D.fill_(1.0)
            self.norm_weight.fill_(1.0)

    @staticmethod
    def _fill_missing_decay_rate(state_dict, prefix, *args):
        # A line layer saved before it learned Mamba-2's decay rate computed exp(-Delta): A_log = 0 (rate 1)
        # reproduces it exactly, so such a checkpoint loads, strict or not.
        key = prefix + "A_log"
        weight = state_dict.get(prefix + "dt_bias")
        if key not in state_dict and weight is not None:
            state_dict[key] = torch.zeros_like(weight)

    @staticmethod
    def _to_edge_index(edge_index: Adj, num_nodes: int) -> Tensor:
        # Union refinement by isinstance keeps this scriptable (Adj = Union[Tensor, SparseTensor]).
        if isinstance(edge_index, Tensor):
            if not is_torch_sparse_tensor(edge_index):
                return edge_index
            rows, cols = edge_index.size(0), edge_index.size(1)
        else:
            rows, cols = edge_index.size(0), edge_index.size(1)
        # Shapes only, no host sync: the resolvent (I - A)^-1 needs A square over the nodes of x.
        if rows != num_nodes or cols != num_nodes:
            raise ValueError(f"edge_index: expected a square sparse adjacency of size [N, N] = [{num_nodes}, "
                             f"{num_nodes}] (the resolvent (I - A)^-1 needs one node set), got [{rows}, {cols}]")
        # PyG passes sparse adjacencies transposed (adj_t[target, source]); the edge order is the
        # adjacency's stored order, which edge_attr must follow.
        if isinstance(edge_index, Tensor) and edge_index.layout == torch.sparse_coo:
            # Not to_edge_index: it flags an uncoalesced COO tensor as coalesced, in place.
            return edge_index._indices().flip(0).long()
        return to_edge_index(edge_index)[0].flip(0)

    def _explain_edge_mask(self, num_edges: int, num_nodes: int) -> OptTensor:
        # PyG's explainers (GNNExplainer, ...) set these through set_masks(); propagate() applies the
        # mask to the local messages, and the selective adjacency applies it to A, so that a masked
        # edge also loses its global influence.
        if not self._explain:
            return None
        edge_mask = self._edge_mask
        if edge_mask is None:
            raise ValueError("edge_mask: explain is on but no edge mask is set (set it with "
                             "torch_geometric.explain.algorithm.utils.set_masks)")
        if self._apply_sigmoid:
            edge_mask = edge_mask.sigmoid()
        loop_mask = self._loop_mask
        if edge_mask.numel() != num_edges and loop_mask is not None and loop_mask.numel() == edge_mask.numel():
            # As PyG's explain_message: the model replaced self-loops by one per node (add_self_loops),
            # which are not explained and keep a mask of 1.
            edge_mask = torch.cat([edge_mask[loop_mask], edge_mask.new_ones(num_nodes)])
        if edge_mask.numel() != num_edges:
            raise ValueError(f"edge_mask: expected one entry per edge, [E] = [{num_edges}], got "
                             f"{list(edge_mask.shape)}")
        return edge_mask.view(-1)

    def _edge_selectivity(self, edge_attr: OptTensor, num_edges: int) -> OptTensor:
        if edge_attr is None:
            return None
        if self.edge_proj is None:
            raise ValueError("edge_attr: this ChimeraConv was built with edge_dim=None; pass edge_dim to use edge "
                             "features")
        if edge_attr.dim() == 1:
            edge_attr = edge_attr.unsqueeze(-1)
        if edge_attr.shape != (num_edges, self.edge_dim):
            raise ValueError(f"edge_attr: expected shape [E, edge_dim] = [{num_edges}, {self.edge_dim}] (with a "
                             f"sparse adjacency, one row per stored entry, in the stored order), got "
                             f"{list(edge_attr.shape)}")
        return F.softplus(self.edge_proj(edge_attr.to(self.edge_proj.weight.dtype)))

    def selective_adjacency(self, delta: Tensor, edge_index: Tensor, psi: Optional[Tensor] = None,
                            delta_edge: OptTensor = None, edge_mask: OptTensor = None) -> Tuple[Tensor, Tensor]:
        """``(edge_weight [E, H], key_scale [N, H])`` of this layer's ``adjacency``; ``edge_mask``
        (``[E]``) is an explainer's edge mask (``0``: as if the edge were absent)."""
        if edge_mask is not None:
            edge_mask = edge_mask.to(delta.dtype)
        signed = self.transitions == "signed"
        if self.adjacency == "general":
            if psi is None:
                psi = torch.zeros_like(delta)
            return general_adjacency(delta, edge_index, psi, self.gamma, delta_edge, edge_mask, signed)
        if self.adjacency == "dag":
            return dag_adjacency(delta, edge_index, delta_edge, edge_mask, signed)
        if self.adjacency == "undirected_line":
            return undirected_line_adjacency(delta, edge_index, delta_edge, edge_mask, signed)
        return mamba2_adjacency(delta, edge_index, edge_mask, signed)

    def mix(self, x: Tensor, B: Tensor, C: Tensor, delta: Tensor, edge_index: Tensor, psi: OptTensor = None,
            delta_edge: OptTensor = None, batch: OptTensor = None, edge_mask: OptTensor = None,
            topology: Any = None) -> Tensor:
        r"""The selective resolvent mixer alone, :math:`((I - A)^{-1} \odot C\bar B^\top) x` per head.

        Args:
            x (Tensor): values ``[N, H, P]``.
            B (Tensor): keys ``[N, S]`` (shared by the heads) or ``[N, H, S]``.
            C (Tensor): queries, same shape as ``B``.
            delta (Tensor): selectivity :math:`\Delta \ge 0`, ``[N, H]``.
            edge_index (LongTensor): ``[2, E]``.
            psi (Tensor, optional): normalizer :math:`\Psi`, ``[N, H]`` (``"general"`` only).
            delta_edge (Tensor, optional): edge selectivity :math:`\Delta'`, ``[E, H]``.
            batch (LongTensor, optional): ``[N]``.
            edge_mask (Tensor, optional): an explainer's edge mask ``[E]`` in :math:`[0, 1]`, applied to
                :math:`\mathbf{A}` (see :mod:`torch_geometric_chimera.nn.adjacency`).
            topology (GraphTopology, optional): the topology of ``(edge_index, batch)`` to use
                (see :func:`~torch_geometric_chimera.ops.resolvent_attention`).
        """
        heads = x.size(1)
        if B.dim() == 2:
            B = B.unsqueeze(1).expand(-1, heads, -1)
        if C.dim() == 2:
            C = C.unsqueeze(1).expand(-1, heads, -1)
        edge_weight, key_scale = self.selective_adjacency(delta, edge_index, psi, delta_edge, edge_mask)
        return self._resolvent(C, B * key_scale.unsqueeze(-1), x, edge_index, edge_weight, batch, topology)

    @torch.jit.ignore
    def _resolvent(self, query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                   batch: OptTensor, topology: Any = None) -> Tensor:
        # Python-only (topology cache, autograd Functions): a scripted ChimeraConv calls back into Python here.
        # The general adjacency's rows of |A| sum to less than gamma: the squaring path needs no measurement.
        gamma = self.gamma if self.adjacency == "general" else None
        options = dict(method=self.method, num_terms=self.num_terms, batch=batch, tol=self.tol, max_iter=self.max_iter,
                       gamma=gamma)
        if torch.compiler.is_compiling():
            if topology is None:  # one node of the compiled graph (ops/opaque.py)
                return opaque_resolvent_attention(query, key, value, edge_index, edge_weight, **options)
            # A GraphTopology cannot be an op's argument: run outside the graph (graph breaks).
            return _resolvent_attention_outside_graph(query, key, value, edge_index, edge_weight, topology=topology,
                                                      **options)
        return resolvent_attention(query, key, value, edge_index, edge_weight, topology=topology, **options)

    @torch.jit.ignore
    def _decomposition_forward(self, x: Tensor, grid_size: OptTensor, seq_len: OptTensor, batch: OptTensor,
                               topology: Any) -> Tensor:
        """The layer on ``self.decomposition``: DAGs, neighbours and directions from the geometry."""
        if topology is not None:
            raise ValueError("topology: a decomposition builds and caches its DAGs from grid_size / seq_len; "
                             "pass topology=None")
        weight_z, weight_xbc, weight_dt = self.in_proj.weight.split([self.inner, self.conv_width, self.dt_width])
        z, xbc, dt = F.linear(x, weight_z), F.linear(x, weight_xbc), F.linear(x, weight_dt)
        conv_weight = self.conv_weight if self.local_conv else None
        conv_bias = self.conv_bias if self.local_conv else None
        # Under torch.compile one opaque op (no graph break, nothing of the geometry baked into the graph).
        compiling = torch.compiler.is_compiling()
        mixer = opaque_decomposition_mixer if compiling else decomposition_mixer
        # Eager, the grid kernel may add the D skip itself (values then comes back None).
        skip = {} if compiling else dict(D=self.D)
        y, values = mixer(xbc, dt, conv_weight, conv_bias, self.dt_bias, self.decomposition, grid_size, seq_len, batch,
                          self.groups, self.dt_groups, self.heads, self.state_dim, self.method,
                          num_terms=self.num_terms, tol=self.tol, max_iter=self.max_iter,
                          signed=self.transitions == "signed", A_log=self.A_log, **skip)
        # Functions, not self._gated_rms_norm / self.out_proj: in a scripted layer this method runs in
        # Python, where the scripted submodules and ignored methods cannot be called.
        if values is None:  # the skip is in y already
            y = gated_rms_norm(y, None, None, z, self.norm_weight, 1e-5)
        else:
            y = gated_rms_norm(y, values, self.D.repeat_interleave(self.head_dim), z, self.norm_weight, 1e-5)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)

    def forward(self, x: Tensor, edge_index: Adj, edge_attr: OptTensor = None, batch: OptTensor = None,
                grid_size: OptTensor = None, seq_len: OptTensor = None, topology: Any = None) -> Tensor:
        """Runs the layer; see the class docstring for shapes. ``grid_size`` (``[G, 2]``) and
        ``seq_len`` (``[G]``) give the geometry of a ``decomposition``. ``topology``
        (:class:`~torch_geometric_chimera.ops.GraphTopology` of ``(edge_index, batch)``) is the
        explicit handle to the topology cache: pass it when ``edge_index`` may be written in place
        through ``.data`` or DLPack on an accelerator, where the cache cannot see such writes (eager
        mode only: a scripted layer takes ``topology=None``)."""
        if isinstance(x, (tuple, list)):  # to_hetero passes (x_src, x_dst) for a bipartite relation
            raise ValueError("x: expected one node feature tensor [N, channels], got a pair (x_src, x_dst) of a "
                             "bipartite graph; the resolvent (I - A)^-1 needs a square adjacency over one node set, "
                             "so ChimeraConv supports only relations whose source and target node types are the "
                             "same (with to_hetero, give bipartite relations another layer)")
        if x.dim() != 2 or x.size(-1) != self.channels:
            raise ValueError(f"x: expected shape [N, channels] = [N, {self.channels}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating tensor (the layer's weights are {self.in_proj.weight.dtype}), "
                             f"got dtype {x.dtype}")
        if self.decomposition is not None:
            if edge_attr is not None:
                raise ValueError("edge_attr: a decomposition's DAGs carry no edge features; pass edge_attr=None")
            return self._decomposition_forward(x, grid_size, seq_len, batch, topology)
        num_nodes, heads = x.size(0), self.heads
        edge_index = self._to_edge_index(edge_index, num_nodes)
        delta_edge = self._edge_selectivity(edge_attr, edge_index.size(1))
        edge_mask: OptTensor = None
        if not torch.jit.is_scripting():  # PyG's explain masks exist on the Python module only
            edge_mask = self._explain_edge_mask(edge_index.size(1), num_nodes)

        # in_proj as three products over row blocks of its weight: one [N, inner + conv_width + 2H]
        # output split in four would need its gradient concatenated back (a copy of the widest
        # tensor of the layer) in the backward.
        weight_z, weight_xbc, weight_dt = self.in_proj.weight.split([self.inner, self.conv_width, self.dt_width])
        z, xbc = F.linear(x, weight_z), F.linear(x, weight_xbc)
        dt, psi = F.linear(x, weight_dt).split([heads, heads], dim=-1)
        if self.local_conv:
            neighbors = self.propagate(edge_index.long(), x=xbc, size=(num_nodes, num_nodes))
            # Python even in a scripted layer: a decomposition layer has no conv_self / conv_neighbors.
            xbc = self._local_conv_silu(xbc, neighbors)
        else:
            xbc = F.silu(xbc)
        values, B, C = xbc.split([self.inner, self.state_dim * self.num_sets, self.state_dim * self.num_sets], dim=-1)
        values = values.view(num_nodes, heads, self.head_dim)
        delta = F.softplus(dt + self.dt_bias)

        y = self.mix(values, B, C, delta, edge_index, psi, delta_edge, batch, edge_mask, topology)
        y, values = y.reshape(num_nodes, self.inner), values.reshape(num_nodes, self.inner)
        if torch.jit.is_scripting():
            y = gated_rms_norm_reference(y, values, self.D.repeat_interleave(self.head_dim), z, self.norm_weight, 1e-5)
        else:
            y = self._gated_rms_norm(y, values, z)
        return self.out_proj(y)

    @torch.jit.ignore
    def _local_conv_silu(self, xbc: Tensor, neighbors: Tensor) -> Tensor:
        # One fused pass on CPU (ops/block.py); PyTorch ops elsewhere.
        return local_conv_silu(xbc, neighbors, self.conv_self, self.conv_neighbors, self.conv_bias)

    @torch.jit.ignore
    def _gated_rms_norm(self, y: Tensor, values: Tensor, z: Tensor) -> Tensor:
        # RMSNorm((y + D x) * SiLU(z)) * w, D per head: one fused pass on CPU (ops/block.py).
        skip_scale = self.D.repeat_interleave(self.head_dim)
        return gated_rms_norm(y, values, skip_scale, z, self.norm_weight, 1e-5)

    def message(self, x_j: Tensor) -> Tensor:
        return x_j

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.channels}, heads={self.heads}, state_dim={self.state_dim}, "
                f"expand={self.expand}, edge_dim={self.edge_dim}, adjacency={self.adjacency!r}, "
                f"method={self.method!r}, num_terms={self.num_terms}"
                + (f", transitions={self.transitions!r}" if self.transitions != "positive" else "")
                + (f", decomposition={self.decomposition!r}, sharing={self.sharing!r}, share_dt={self.share_dt!r}, "
                   f"conv_kernel={self.conv_kernel})" if self.decomposition else ")"))
