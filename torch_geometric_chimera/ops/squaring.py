r"""``squaring``: resolvent attention for batches of small graphs as a few batched matrix products.

Every graph is padded to ``m`` nodes (the largest graph of the batch) and all graphs and heads are
solved together, so the number of operations (kernel launches on a GPU) does not depend on how
many graphs there are or how many distinct sizes they have. Per graph and head,

.. math::
    \mathbf{y} = (\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}, \qquad
    \mathbf{L} = \prod_{j=0}^{k-1}\left(\mathbf{I} + \mathbf{A}^{2^j}\right)
               = \sum_{r=0}^{2^k - 1} \mathbf{A}^r

(the squaring trick of the paper, §4.1.2, Eq. 19 and 27): :math:`k - 1` squarings
:math:`\mathbf{A}^{2^{j+1}} = (\mathbf{A}^{2^j})^2` and :math:`k - 1` products
:math:`\mathbf{L} \leftarrow \mathbf{L} + \mathbf{L}\mathbf{A}^{2^j}`, each one batched matrix product
over all ``G x H`` padded matrices.

**How many squarings.** On a DAG whose longest path has ``depth`` edges, :math:`\mathbf{A}^{\mathrm{depth}+1}
= 0`, so ``k = ceil(log2(depth + 1))`` squarings give the exact resolvent
(:func:`squarings_for_depth`); ``depth <= m - 1`` for every DAG of at most ``m`` nodes.
On any graph whose rows of :math:`|\mathbf{A}|` sum to at most :math:`\gamma < 1` (the ``general``
normalization), :math:`\|\mathbf{L}_k - (\mathbf{I} - \mathbf{A})^{-1}\|_\infty \le \gamma^{2^k} / (1 - \gamma)`,
and :math:`\|(\mathbf{I} - \mathbf{A})^{-1}\|_\infty \le 1 / (1 - \gamma)`: the truncation error
*relative to that bound* is at most :math:`\gamma^{2^k}`. :func:`squarings_for_bound` picks the fewest
``k`` with :math:`\gamma^{2^k} \le` ``tol``, by default the unit roundoff of the precision
(:data:`DEFAULT_TOL`), so that truncation is no larger than rounding: for :math:`\gamma = 0.9`, ``k`` is
8 in float32, 7 in tf32 and 6 in bf16 (9 in float64). A batch may mix both kinds: with no bound given,
:func:`squarings_per_graph` decides graph by graph (every graph a DAG, or with every row of
:math:`|\mathbf{A}|` summing to less than 1) and takes the most squarings any graph needs.

**Backward.** Not autograd through the chain: with :math:`\mathbf{S} = \mathbf{Q}\mathbf{K}^\top`,
:math:`\partial\mathbf{M} = \partial\mathbf{Y}\,\mathbf{V}^\top` (the gradient of
:math:`\mathbf{M} = \mathbf{L} \odot \mathbf{S}`),

.. math::
    \partial\mathbf{V} = \mathbf{M}^\top \partial\mathbf{Y}, \quad
    \partial\mathbf{Q} = (\partial\mathbf{M} \odot \mathbf{L})\mathbf{K}, \quad
    \partial\mathbf{K} = (\partial\mathbf{M} \odot \mathbf{L})^\top \mathbf{Q}, \quad
    \partial\mathbf{A} = \mathbf{L}^\top (\partial\mathbf{M} \odot \mathbf{S}) \mathbf{L}^\top,

the exact gradient of the resolvent :math:`(\mathbf{I} - \mathbf{A})^{-1}` (paper Eq. 26), read at the
edges only. Padding rows and columns of ``Q``, ``K``, ``V`` are zero, so every padded entry of
:math:`\partial\mathbf{L} = \partial\mathbf{M} \odot \mathbf{S}` is zero: the gradient is masked to the
valid nodes by construction.

**Operations.** Forward and backward together make a fixed number of operations: with ``k = 8``
(``gamma = 0.9``, float32) 77 aten operations, views included, for 64 graphs of 46 distinct sizes
and for 128 graphs of 92 (66 when the :func:`padded_layout` is computed once and passed in); with
``gamma`` (or ``depth`` or ``num_squarings``), ``max_nodes`` and ``num_graphs`` given, none reads a
value on the host (``tests/ops/test_squaring_path.py``).

**Precision.** ``precision="tf32"`` or ``"bf16"`` rounds the inputs of every matrix product to that
format (10 or 7 explicit mantissa bits) and accumulates in float32, as tensor cores do. On CUDA the
hardware does it (tf32 with both of PyTorch's TF32 flags set for the call, whatever the global
setting; bf16 products with ``out_dtype=torch.float32``); elsewhere it is emulated: bf16 is
``x.to(torch.bfloat16).float()``, tf32 rounds the float32 mantissa to nearest on 10 bits
(:func:`round_to_precision`; cuBLAS's tf32 may truncate instead, which doubles the unit roundoff).
The fused attention kernels of ``fused=True`` (:mod:`.triton_attention`) run float32 inputs at
``precision="float32"`` in three-pass TF32 (``tf32x3``) on the tensor cores, within 1.7x of full
float32's error in the emulation (``benchmarks/bench_triton_precision.py``; not yet measured on a GPU).
Measured on CPU with the emulation (``benchmarks/bench_squaring_precision.py``, results in
``benchmarks/results/squaring_precision_cpu.json``: float32 inputs, 64 graphs of 8 to 64 nodes, about
3 edges per node, H = 4, S = P = 16, q, k, v and the output gradient standard normal; error =
max |x - x_ref| / max |x_ref|, worst of 5 seeds, against the float64 inverse; ``dense float32``: the
exact path with a float32 inverse):

=====================================  ==============  =======  ===============  =======  =======  =======
graphs                                 precision (k)   y        dA (at edges)    dQ       dK       dV
=====================================  ==============  =======  ===============  =======  =======  =======
general: cycles, rows of |A| sum to    dense float32   3.1e-07  9.4e-07          2.9e-07  3.2e-07  4.5e-07
0.9 (``general`` adjacency, gamma      float32 (8)     3.1e-07  6.5e-07          2.8e-07  3.5e-07  3.0e-07
0.9); k from the bound                 tf32 (7)        2.4e-03  5.6e-03          2.9e-03  2.0e-03  2.4e-03
                                       bf16 (6)        1.6e-02  3.7e-02          1.7e-02  1.7e-02  2.1e-02
DAGs (``dag`` adjacency, depth <= 9);  dense float32   1.9e-07  2.4e-07          1.6e-07  2.3e-07  2.5e-07
k exact from the depth                 float32 (4)     1.9e-07  1.9e-07          1.6e-07  2.3e-07  2.5e-07
                                       tf32 (4)        7.2e-04  7.0e-04          6.6e-04  6.5e-04  1.2e-03
                                       bf16 (4)        6.0e-03  5.0e-03          5.7e-03  5.6e-03  5.9e-03
=====================================  ==============  =======  ===============  =======  =======  =======

In units of the format's roundoff u (2^-11 = 4.9e-4 for tf32, 2^-8 = 3.9e-3 for bf16): on DAGs about
1.5 u (2.5 u at most); on general graphs about 5 u for the output and up to 11.5 u for the edge
gradients. There most of it comes from rounding inside the chain: rounding ``A`` by a relative
``u`` moves :math:`(\mathbf{I} - \mathbf{A})^{-1}` by up to :math:`\|\mathbf{L}\|\|\mathbf{A}\| u
\le \gamma u / (1 - \gamma) = 9 u`. With the chain in float32 and only the attention products in
tf32 / bf16, the output error drops to 8.7e-4 / 3.4e-3 (measured on 2 seeds of 32 graphs), at the
cost of computing the chain, most of the flops, in float32. In float32 the path is as accurate as
the exact ``dense`` path (DESIGN.md §6: at most twice its error; here at most equal).
"""
import math
from contextlib import contextmanager
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..utils.topology import topological_levels
from . import common


def squarings_for_depth(depth: int) -> int:
    r"""Fewest squarings :math:`k` with :math:`2^k \ge` ``depth + 1``: on a DAG whose longest path
    has ``depth`` edges, :math:`A^{\mathrm{depth} + 1} = 0`, so :func:`~.reference.squaring_resolvent` with
    this :math:`k` is exact."""
    if depth < 0:
        raise ValueError(f"depth: expected a non-negative int, got {depth}")
    return max(1, math.ceil(math.log2(depth + 1)))


PRECISIONS = ("float32", "tf32", "bf16")

#: Unit roundoff of each precision: the default tolerance of :func:`squarings_for_bound` (float64
#: inputs with ``precision="float32"`` compute in float64 and use float64's).
DEFAULT_TOL = {"float32": 2.0 ** -24, "tf32": 2.0 ** -11, "bf16": 2.0 ** -8, "float64": 2.0 ** -53}

#: ``num_squarings`` above this is refused: 2^30 Neumann terms are far beyond any useful graph.
MAX_SQUARINGS = 30

#: The bucketing cost model (:func:`bucket_cost`), an estimate for one H100, not yet calibrated on
#: one: each of the :data:`OPS_PER_BUCKET` kernels of a bucket's forward + backward (about 60 of its
#: 77 operations, the others being views) costs :data:`LAUNCH_S` seconds of launch and dispatch (a
#: launch-bound layer measured about 5 us per kernel, ``findings/gpu-h100-2026-11-25.md``), and the
#: padded products run at :data:`FLOP_RATE` flop/s (a fraction of tensor-core peak: small matrices).
LAUNCH_S = 8e-6
OPS_PER_BUCKET = 60
FLOP_RATE = {"float32": 2.5e13, "tf32": 1.0e14, "bf16": 2.0e14}


# --------------------------------------------------------------------------------------------
# Layout: where every node and edge sits in the padded batch.
# --------------------------------------------------------------------------------------------
class PaddedLayout(NamedTuple):
    """Graphs padded to ``max_nodes`` nodes: node ``nodes[r]`` (or ``r`` when ``nodes`` is
    :obj:`None`) sits at ``(graph[r], local[r])``; edge ``edges[e]`` (or ``e``) is the entry
    ``(edge_graph[e], edge_target[e], edge_source[e])`` of the padded ``A``."""
    num_graphs: int
    max_nodes: int
    graph: Tensor
    local: Tensor
    edge_graph: Tensor
    edge_target: Tensor
    edge_source: Tensor
    nodes: Optional[Tensor] = None
    edges: Optional[Tensor] = None


def _local_index(batch: Tensor) -> Tensor:
    """Position of every node inside its graph, in node order (``batch`` need not be sorted)."""
    # Sorted, a node's graph starts at the first equal id (no bincount: it reads the ids' range on
    # the host on CUDA, a synchronization).
    ids, order = torch.sort(batch, stable=True)
    local = torch.empty_like(batch)
    local[order] = torch.arange(batch.numel(), device=batch.device) - torch.searchsorted(ids, ids)
    return local


def padded_layout(edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None,
                  max_nodes: Optional[int] = None, num_graphs: Optional[int] = None) -> PaddedLayout:
    r"""The single padded batch of :func:`squaring_resolvent_attention`: node ``i`` of graph ``g`` at
    position ``(g, local[i])``, computed by a stable sort of ``batch`` (no loop over graphs).

    Args:
        edge_index (LongTensor): ``[2, E]``, source first; edges stay inside one graph.
        num_nodes (int): ``N``.
        batch (LongTensor, optional): ``[N]`` graph of every node, ids ``0 .. G - 1``. (default: one graph)
        max_nodes (int, optional): ``m``, at least the largest graph size. Read from ``batch`` on the
            host when :obj:`None` (a synchronization on a GPU). (default: :obj:`None`)
        num_graphs (int, optional): ``G``; ``batch.max() + 1`` (a host read) when :obj:`None`.
    """
    device = edge_index.device
    if batch is None:
        graph = torch.zeros(num_nodes, dtype=torch.long, device=device)
        local = torch.arange(num_nodes, device=device)
        num_graphs = 1 if num_graphs is None else num_graphs
        true_max = num_nodes
    else:
        graph = batch.long()
        if num_graphs is None:
            num_graphs = int(graph.max()) + 1 if num_nodes else 0
        local = _local_index(graph)
        true_max = None
    if max_nodes is None:
        max_nodes = true_max if true_max is not None else (int(local.max()) + 1 if num_nodes else 0)
    elif common.host_reads_allowed(edge_index) and num_nodes:  # values are checked where reading them is free
        largest = true_max if true_max is not None else int(local.max()) + 1
        if max_nodes < largest:
            raise ValueError(f"max_nodes: expected at least the largest graph size {largest}, got {max_nodes}")
    if (batch is not None and num_nodes and common.host_reads_allowed(edge_index)
            and int(graph.max()) >= num_graphs):
        raise ValueError(f"num_graphs: expected more than the largest id in batch ({int(graph.max())}), "
                         f"got {num_graphs}")
    src, dst = edge_index[0].long(), edge_index[1].long()
    return PaddedLayout(num_graphs, max_nodes, graph, local, graph[dst], local[dst], local[src])


def _node_index(layout: PaddedLayout, heads: int) -> Tuple[Tensor, Tensor]:
    """Advanced index of every node and head in a padded ``[G * H, m, F]`` tensor: ``(graph * H +
    head, local)``, broadcast to ``[N, H]``."""
    head = torch.arange(heads, device=layout.graph.device)
    return layout.graph.view(-1, 1) * heads + head, layout.local.view(-1, 1)


def _edge_index(layout: PaddedLayout, heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Advanced index of every edge and head in a padded ``[G * H, m, m]`` ``A``: ``(graph * H + head,
    target, source)``, broadcast to ``[E, H]``."""
    head = torch.arange(heads, device=layout.graph.device)
    return (layout.edge_graph.view(-1, 1) * heads + head, layout.edge_target.view(-1, 1),
            layout.edge_source.view(-1, 1))


class PaddedIndex(NamedTuple):
    """Where every node and edge of a :class:`PaddedLayout` sits for ``H`` heads: advanced indices
    ``node`` into a padded ``[G * H, m, F]`` tensor and ``edge`` into a padded ``[G * H, m, m]``
    ``A``, broadcast to ``[N, H]`` and ``[E, H]``. They depend on the layout and ``H`` only: compute
    them once (:func:`padded_index`) to save their operations on every call."""
    node: Tuple[Tensor, Tensor]
    edge: Tuple[Tensor, Tensor, Tensor]


def padded_index(layout: PaddedLayout, heads: int) -> PaddedIndex:
    """The :class:`PaddedIndex` of ``layout`` for ``heads`` heads."""
    return PaddedIndex(_node_index(layout, heads), _edge_index(layout, heads))


def _pad(x: Tensor, index: Tuple[Tensor, Tensor], num_graphs: int, max_nodes: int) -> Tensor:
    """``[N, H, F] -> [G * H, m, F]``, zero at padding positions, in one scatter."""
    out = x.new_zeros(num_graphs * x.size(1), max_nodes, x.size(2))
    return out.index_put_(index, x)


def _scatter_adjacency(edge_weight: Tensor, index: Tuple[Tensor, Tensor, Tensor], num_graphs: int,
                       max_nodes: int) -> Tensor:
    """``A[g * H + h, i, j] = sum of edge_weight[e, h]`` over the edges ``e = (j -> i)`` of graph ``g``
    (``index`` from :func:`_edge_index`), in one ``index_put_`` with ``accumulate=True``."""
    adj = edge_weight.new_zeros(num_graphs * edge_weight.size(1), max_nodes, max_nodes)
    return adj.index_put_(index, edge_weight, accumulate=True)


def padded_adjacency(edge_index: Tensor, edge_weight: Tensor, batch: Optional[Tensor] = None,
                     max_nodes: Optional[int] = None, num_graphs: Optional[int] = None,
                     num_nodes: Optional[int] = None) -> Tensor:
    r"""The weighted adjacency of every graph, padded: ``A[g, h, i, j] = edge_weight[e, h]`` for every
    edge ``e = (j -> i)`` of graph ``g`` (local indices), duplicates added, in one ``index_put_``
    with ``accumulate=True``.

    Args:
        edge_index (LongTensor): ``[2, E]``, source first.
        edge_weight (Tensor): ``[E, H]`` (or ``[E]``: one head).
        batch (LongTensor, optional): ``[N]`` graph of every node. (default: one graph)
        max_nodes (int, optional): ``m`` (see :func:`padded_layout`).
        num_graphs (int, optional): ``G`` (see :func:`padded_layout`).
        num_nodes (int, optional): ``N``; ``batch.numel()``, else ``edge_index.max() + 1``.

    :rtype: :class:`Tensor` of shape ``[G, H, m, m]``.
    """
    if num_nodes is None:
        num_nodes = batch.numel() if batch is not None else (int(edge_index.max()) + 1 if edge_index.numel() else 0)
    weight = edge_weight.view(-1, 1) if edge_weight.dim() == 1 else edge_weight
    layout = padded_layout(edge_index, num_nodes, batch, max_nodes, num_graphs)
    adj = _scatter_adjacency(weight, _edge_index(layout, weight.size(1)), layout.num_graphs, layout.max_nodes)
    return adj.view(layout.num_graphs, weight.size(1), layout.max_nodes, layout.max_nodes)


# --------------------------------------------------------------------------------------------
# Products in reduced precision.
# --------------------------------------------------------------------------------------------
def round_to_precision(x: Tensor, precision: str) -> Tensor:
    r"""``x`` rounded to the inputs of a tensor-core product: ``"bf16"`` (8 bits of mantissa),
    ``"tf32"`` (11 bits: the float32 bits rounded to nearest, ties away from zero, at bit 13), or
    ``"float32"`` (unchanged). The result keeps the dtype of ``x``."""
    if precision == "float32":
        return x
    if precision == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    bits = x.float().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)  # -0x2000 == ~0x1FFF: clear 13 low bits
    return rounded.to(x.dtype)


#: The new per-backend float32 matmul flags that ``torch.set_float32_matmul_precision`` writes
#: along with the legacy precision: saved and restored around a change of the CUDA precision.
_MATMUL_BACKENDS = (("cuda", "matmul"), ("mkldnn", "matmul"))


def _matmul_flags() -> Tuple[str, Tuple[str, ...]]:
    """The legacy float32 matmul precision and the new flags of :data:`_MATMUL_BACKENDS`, read
    whatever mix of the two APIs the user left. ATen's getter of the legacy precision raises when
    the new flags disagree with it; with both set to ``"ieee"`` it cannot, so they are set so for
    the read and then put back."""
    new = tuple(torch._C._get_fp32_precision_getter(backend, op) for backend, op in _MATMUL_BACKENDS)
    for backend, op in _MATMUL_BACKENDS:
        torch._C._set_fp32_precision_setter(backend, op, "ieee")
    legacy = torch._C._get_float32_matmul_precision()
    _set_matmul_flags((legacy, new))
    return legacy, new


def _set_matmul_flags(flags: Tuple[str, Tuple[str, ...]]) -> None:
    legacy, new = flags
    torch._C._set_float32_matmul_precision(legacy)  # also writes the new flags: they go after it
    for (backend, op), value in zip(_MATMUL_BACKENDS, new):
        torch._C._set_fp32_precision_setter(backend, op, value)


@contextmanager
def _cuda_fp32_precision(precision: str) -> Iterator[None]:
    """float32 products on CUDA in tf32 (``precision="tf32"``) or in full float32 (otherwise),
    whatever the global setting, restored afterwards.

    ATen checks on every cuBLAS handle fetch that the legacy flag (``allow_tf32``, i.e.
    ``torch.get_float32_matmul_precision() != "highest"``) and the new one
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``) agree, and raises otherwise: both are
    set together (``_set_cublas_allow_tf32`` writes the two), and nothing is written when they
    already say what is wanted (the global flags are shared by every thread)."""
    tf32 = precision == "tf32"
    try:
        unchanged = torch._C._get_cublas_allow_tf32() == tf32
    except RuntimeError:  # the user left the two APIs disagreeing: set them consistently here
        unchanged = False
    if unchanged:
        yield
        return
    previous = _matmul_flags()
    torch._C._set_cublas_allow_tf32(tf32)
    try:
        yield
    finally:
        _set_matmul_flags(previous)


def _matmul(a: Tensor, b: Tensor, precision: str, add: Optional[Tensor] = None) -> Tensor:
    """``add + a @ b`` over the leading (batch) dimensions, with the inputs of the product in
    ``precision`` and the sum in the dtype of ``a``. Three-dimensional inputs go to ``bmm`` /
    ``baddbmm`` as they are (no reshape: one operation per product)."""
    batch_shape = a.shape[:-2]
    if a.dim() != 3:
        a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        add = None if add is None else add.reshape(-1, *add.shape[-2:])
    same = a is b  # A^(2^j) squared: round (or cast) it once
    if a.device.type == "cuda" and a.dtype == torch.float32:  # the tensor cores round the inputs
        if precision == "bf16":
            a16 = a.to(torch.bfloat16)
            b16 = a16 if same else b.to(torch.bfloat16)
            out = (torch.bmm(a16, b16, out_dtype=torch.float32) if add is None
                   else torch.baddbmm(add, a16, b16, out_dtype=torch.float32))
        else:
            with _cuda_fp32_precision(precision):
                out = torch.bmm(a, b) if add is None else torch.baddbmm(add, a, b)
    else:  # emulated: round the inputs, multiply and add in the dtype of a
        a = round_to_precision(a, precision)
        b = a if same else round_to_precision(b, precision)
        out = torch.bmm(a, b) if add is None else torch.baddbmm(add, a, b)
    return out if len(batch_shape) == 1 else out.view(*batch_shape, *out.shape[-2:])


def squaring_chain(adj: Tensor, num_squarings: int, precision: str = "float32") -> Tensor:
    r""":math:`\prod_{j<k} (\mathbf{I} + \mathbf{A}^{2^j}) = \sum_{r < 2^k} \mathbf{A}^r` for a batch
    ``[..., m, m]`` of ``A``, in ``2 (k - 1)`` batched products (the values of
    :func:`~.reference.squaring_resolvent`, with the products in ``precision``)."""
    resolvent = adj.clone()
    resolvent.diagonal(dim1=-2, dim2=-1).add_(1)  # I + A
    power = adj
    del adj  # A is needed as the first power only: three m x m batches live in the loop, not four
    for _ in range(num_squarings - 1):
        power = _matmul(power, power, precision)  # A^(2^j)
        resolvent = _matmul(resolvent, power, precision, add=resolvent)  # L (I + A^(2^j))
    return resolvent


def squarings_for_bound(gamma: float, tol: float) -> int:
    r"""Fewest squarings ``k >= 1`` with :math:`\gamma^{2^k} \le` ``tol``: when every row of
    :math:`|\mathbf{A}|` sums to at most :math:`\gamma < 1`,
    :math:`\|\mathbf{L}_k - (\mathbf{I} - \mathbf{A})^{-1}\|_\infty \le \gamma^{2^k} / (1 - \gamma)
    \le` ``tol`` :math:`/ (1 - \gamma)`, i.e. ``tol`` relative to the bound
    :math:`1 / (1 - \gamma)` on :math:`\|(\mathbf{I} - \mathbf{A})^{-1}\|_\infty`."""
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma: expected a bound on the row sums of |A| in [0, 1), got {gamma!r}")
    if not 0 < tol < 1:
        raise ValueError(f"tol: expected a float in (0, 1), got {tol!r}")
    if gamma == 0:
        return 1
    terms = math.log(tol) / math.log(gamma)  # gamma^terms == tol
    return max(1, math.ceil(math.log2(terms) - 1e-12))


# --------------------------------------------------------------------------------------------
# (L ⊙ Q Kᵀ) V and its backward, unfused (PyTorch) or fused (Triton).
# --------------------------------------------------------------------------------------------
def masked_attention(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor, precision: str = "float32") -> Tensor:
    r""":math:`(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}` for padded ``[..., m, m]``,
    ``[..., m, S]``, ``[..., m, S]``, ``[..., m, P]``: three batched operations."""
    return _matmul(resolvent * _matmul(q, k.transpose(-1, -2), precision), v, precision)


def masked_attention_backward(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor, grad_y: Tensor,
                              precision: str = "float32") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Gradients of :func:`masked_attention`: ``(dL, dQ, dK, dV)`` with
    :math:`\partial\mathbf{M} = \partial\mathbf{Y}\mathbf{V}^\top`, :math:`\partial\mathbf{L} =
    \partial\mathbf{M} \odot \mathbf{Q}\mathbf{K}^\top`, :math:`\partial\mathbf{Q} = (\partial\mathbf{M}
    \odot \mathbf{L})\mathbf{K}`, :math:`\partial\mathbf{K} = (\partial\mathbf{M} \odot \mathbf{L})^\top
    \mathbf{Q}`, :math:`\partial\mathbf{V} = (\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)^\top \partial\mathbf{Y}`."""
    scores = _matmul(q, k.transpose(-1, -2), precision)
    grad_mask = _matmul(grad_y, v.transpose(-1, -2), precision)
    grad_scores = grad_mask * resolvent
    grad_v = _matmul((resolvent * scores).transpose(-1, -2), grad_y, precision)
    grad_q = _matmul(grad_scores, k, precision)
    grad_k = _matmul(grad_scores.transpose(-1, -2), q, precision)
    return grad_mask * scores, grad_q, grad_k, grad_v


def fused_available(device: torch.device) -> bool:
    """Whether the Triton kernels of :mod:`~.triton_attention` can run on ``device``: CUDA with Triton
    installed, or any device when Triton was imported under ``TRITON_INTERPRET=1`` (its interpreter,
    for tests on CPU)."""
    from .triton_attention import HAS_TRITON, INTERPRETED
    return HAS_TRITON and (INTERPRETED or device.type == "cuda")


def padded_attention_forward(ctx, edge_weight: Tensor, query: Tensor, key: Tensor, value: Tensor,
                             layout: PaddedLayout, index: Optional[PaddedIndex],
                             resolvent_of: Callable[[Tensor], Tensor], precision: str, fused: bool) -> Tensor:
    r"""The forward of a padded-batch autograd function (:class:`SquaringResolventAttention`,
    :class:`~.dense.DenseResolventAttention`): pad ``q, k, v`` and ``A`` (one scatter each),
    :math:`\mathbf{L}` = ``resolvent_of(A)`` for the ``[G * H, m, m]`` batch of ``A``,
    :math:`(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}`, unpad (one gather). ``index`` is
    :func:`padded_index` of ``layout`` for the heads of ``query`` (computed here when :obj:`None`).
    Saves on ``ctx`` what :func:`padded_attention_backward` needs."""
    heads, num_graphs, m = query.size(1), layout.num_graphs, layout.max_nodes
    if index is None:
        index = padded_index(layout, heads)
    node_index, edge_index = index
    q, k, v = (_pad(t, node_index, num_graphs, m) for t in (query, key, value))  # [G * H, m, F]
    resolvent = resolvent_of(_scatter_adjacency(edge_weight, edge_index, num_graphs, m))
    if fused:
        from .triton_attention import attention_forward
        y = attention_forward(resolvent, q, k, v, precision)
    else:
        y = masked_attention(resolvent, q, k, v, precision)
    ctx.save_for_backward(resolvent, q, k, v)
    ctx.layout, ctx.node_index, ctx.edge_index, ctx.precision, ctx.fused = (layout, node_index, edge_index,
                                                                            precision, fused)
    return y[node_index]  # [N, H, P]


def padded_attention_backward(ctx, grad_out: Tensor):
    r"""The backward of :func:`padded_attention_forward`: the exact resolvent gradient (module
    docstring), not autograd through however ``L`` was computed: two products for
    :math:`\partial\mathbf{A} = \mathbf{L}^\top \partial\mathbf{L}\, \mathbf{L}^\top`, gathered at
    the edges, and those of :func:`masked_attention_backward`. Returns the gradients of
    ``(edge_weight, query, key, value)`` and :obj:`None` for every further input."""
    resolvent, q, k, v = ctx.saved_tensors
    node_index, precision = ctx.node_index, ctx.precision
    grad_y = _pad(grad_out, node_index, ctx.layout.num_graphs, ctx.layout.max_nodes)
    if ctx.fused:
        from .triton_attention import attention_backward
        grad_resolvent, grad_q, grad_k, grad_v = attention_backward(resolvent, q, k, v, grad_y, precision)
    else:
        grad_resolvent, grad_q, grad_k, grad_v = masked_attention_backward(resolvent, q, k, v, grad_y, precision)
    grad_weight = None
    needs = ctx.needs_input_grad
    if needs[0]:
        resolvent_t = resolvent.transpose(-1, -2)
        grad_adj = _matmul(_matmul(resolvent_t, grad_resolvent, precision), resolvent_t, precision)  # Lᵀ dL Lᵀ
        grad_weight = grad_adj[ctx.edge_index]  # [E, H]
    grads = (grad_weight, grad_q[node_index] if needs[1] else None, grad_k[node_index] if needs[2] else None,
             grad_v[node_index] if needs[3] else None)
    return grads + (None,) * (len(needs) - len(grads))


class SquaringResolventAttention(torch.autograd.Function):
    r"""One padded batch with :math:`\mathbf{L}` by :func:`squaring_chain`
    (:func:`padded_attention_forward`); the backward is the exact resolvent gradient
    (:func:`padded_attention_backward`)."""

    @staticmethod
    def forward(ctx, edge_weight: Tensor, query: Tensor, key: Tensor, value: Tensor, layout: PaddedLayout,
                index: Optional[PaddedIndex], num_squarings: int, precision: str, fused: bool) -> Tensor:
        return padded_attention_forward(ctx, edge_weight, query, key, value, layout, index,
                                        lambda adj: squaring_chain(adj, num_squarings, precision), precision, fused)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return padded_attention_backward(ctx, grad_out)


def squaring_attention(query: Tensor, key: Tensor, value: Tensor, edge_weight: Tensor, layout: PaddedLayout,
                       num_squarings: int, precision: str = "float32", fused: bool = False,
                       index: Optional[PaddedIndex] = None) -> Tensor:
    r"""The squaring path on inputs already checked (as :func:`~.resolvent.resolvent_attention`
    checks them) and a precomputed layout (and, optionally, its :func:`padded_index` for the heads
    of ``query``): one padded batch, ``num_squarings`` squarings, no host read. ``edge_weight`` is
    ``[E, H]``; float32 or float64 (float16 and bfloat16 are the caller's to convert).
    :func:`squaring_resolvent_attention` is the checked, self-contained form.

    :rtype: :class:`Tensor` of shape ``[N, H, P]``.
    """
    return SquaringResolventAttention.apply(edge_weight, query, key, value, layout, index, num_squarings, precision,
                                            fused)


# --------------------------------------------------------------------------------------------
# Optional bucketing: a few padded batches instead of one, by a cost model.
# --------------------------------------------------------------------------------------------
def bucket_cost(num_graphs: int, max_nodes: int, heads: int, state_dim: int, head_dim: int, num_squarings: int,
                precision: str = "tf32") -> float:
    r"""Estimated forward + backward seconds of one padded batch on a GPU: :data:`OPS_PER_BUCKET`
    launches of :data:`LAUNCH_S` each, plus
    :math:`G H (2 m^3 (2k) + 8 m^2 (S + P))` flops (``2 (k - 1)`` chain products and two for
    :math:`\partial\mathbf{A}`; four products with ``S`` and four with ``P``) at :data:`FLOP_RATE`."""
    m = float(max_nodes)
    flops = num_graphs * heads * (2 * m ** 3 * 2 * num_squarings + 8 * m ** 2 * (state_dim + head_dim))
    return OPS_PER_BUCKET * LAUNCH_S + flops / FLOP_RATE[precision]


def choose_buckets(sizes: Sequence[int], max_buckets: int, cost) -> List[int]:
    r"""Split the graph sizes into at most ``max_buckets`` contiguous ranges (by size), each padded to
    its largest size, minimizing the summed ``cost(num_graphs, max_nodes)`` by dynamic programming
    over the distinct sizes (:math:`O(B D^2)` cost evaluations for ``D`` distinct sizes). Returns the
    padded size of every bucket, increasing; empty graphs need none."""
    counts = {}
    for n in sizes:
        if n > 0:
            counts[n] = counts.get(n, 0) + 1
    distinct = sorted(counts)
    if not distinct:
        return []
    prefix = [0]
    for n in distinct:
        prefix.append(prefix[-1] + counts[n])
    num = len(distinct)
    inf = float("inf")
    # best[b][d]: least cost of the first d distinct sizes in b buckets; back[b][d]: start of the last one.
    best = [[inf] * (num + 1) for _ in range(max_buckets + 1)]
    back = [[0] * (num + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0.0
    for b in range(1, max_buckets + 1):
        for d in range(1, num + 1):
            for start in range(d):
                if best[b - 1][start] == inf:
                    continue
                total = best[b - 1][start] + cost(prefix[d] - prefix[start], distinct[d - 1])
                if total < best[b][d]:
                    best[b][d], back[b][d] = total, start
    buckets = min(range(1, max_buckets + 1), key=lambda b: best[b][num])
    bounds, d = [], num
    for b in range(buckets, 0, -1):
        bounds.append(distinct[d - 1])
        d = back[b][d]
    return bounds[::-1]


def bucketed_layouts(edge_index: Tensor, num_nodes: int, batch: Optional[Tensor], bounds: Sequence[int]
                     ) -> Tuple[List[PaddedLayout], Tensor]:
    """One :class:`PaddedLayout` per bucket of graph sizes ``(bounds[b - 1], bounds[b]]`` (with their
    ``nodes`` and ``edges``), and the permutation that puts the buckets' concatenated outputs back in
    node order. Reads nothing on the host but the bucket sizes; loops over buckets only."""
    device = edge_index.device
    graph = torch.zeros(num_nodes, dtype=torch.long, device=device) if batch is None else batch.long()
    num_graphs = int(graph.max()) + 1 if num_nodes else 0
    sizes = torch.bincount(graph, minlength=num_graphs)
    local = _local_index(graph)
    src, dst = edge_index[0].long(), edge_index[1].long()
    layouts, lower = [], 0
    for upper in bounds:
        member = (sizes > lower) & (sizes <= upper)
        slot = torch.cumsum(member, 0) - 1  # position of a member graph in the bucket
        node_in = member[graph]
        nodes = node_in.nonzero().view(-1)
        edges = node_in[dst].nonzero().view(-1)
        layouts.append(PaddedLayout(int(member.sum()), int(upper), slot[graph[nodes]], local[nodes],
                                    slot[graph[dst[edges]]], local[dst[edges]], local[src[edges]], nodes, edges))
        lower = upper
    inverse = torch.argsort(torch.cat([layout.nodes for layout in layouts]))
    return layouts, inverse


def over_layouts(attention: Callable[..., Tensor], layouts: Sequence[PaddedLayout], inverse: Optional[Tensor],
                 query: Tensor, key: Tensor, value: Tensor, edge_weight: Tensor,
                 indices: Optional[Sequence[PaddedIndex]] = None) -> Tensor:
    """``attention(query, key, value, edge_weight, layout, index)`` on every padded batch of
    ``layouts`` (from :func:`bucketed_layouts`, or a single :func:`padded_layout` with ``inverse``
    :obj:`None`), the outputs put back in node order by ``inverse``; ``indices`` are the layouts'
    :func:`padded_index` (or :obj:`None`: computed in ``attention``). Loops over the batches only."""
    if indices is None:
        indices = [None] * len(layouts)
    if inverse is None:
        return attention(query, key, value, edge_weight, layouts[0], indices[0])
    outputs = [attention(query[layout.nodes], key[layout.nodes], value[layout.nodes], edge_weight[layout.edges],
                         layout, index) for layout, index in zip(layouts, indices)]
    return torch.cat(outputs)[inverse]


#: :func:`padding_bounds`: every graph is padded to the largest unless that multiplies the cubic
#: work :math:`\sum_g n_g^3` by more than this factor (about 2 for sizes spread evenly over
#: ``[n / 2, n]``, as the ``bench_layer.py`` tree batch; 8 for a half-size batch with one graph
#: twice as large as the rest). A guard against batches of many small graphs and one large one,
#: whose padded ``G x H x m x m`` batch could otherwise take far more memory and time than the graphs need.
PADDING_WORK_LIMIT = 4.0
#: ... and then the graphs are split by size into at most this many padded batches, so that the
#: number of operations stays bounded whatever the number of distinct sizes.
PADDING_MAX_BUCKETS = 4


def padding_bounds(sizes: Sequence[int], work_limit: float = PADDING_WORK_LIMIT,
                   max_buckets: int = PADDING_MAX_BUCKETS) -> List[int]:
    r"""Padded size of every batch of graphs, increasing, for the padded-batch paths (``dense`` and
    ``squaring`` through :func:`~.resolvent.resolvent_attention`): ``[max(sizes)]`` (one padded batch)
    when padding every graph to the largest multiplies :math:`\sum_g n_g^3` by at most ``work_limit``;
    otherwise the split into at most ``max_buckets`` batches of least padded work
    :math:`\sum_b G_b m_b^3` (:func:`choose_buckets`). Empty graphs need no padding; ``[]`` when every
    graph is empty."""
    if not work_limit >= 1:
        raise ValueError(f"work_limit: expected a float >= 1, got {work_limit!r}")
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f"max_buckets: expected a positive int, got {max_buckets!r}")
    sizes = [n for n in sizes if n > 0]
    if not sizes:
        return []
    largest = max(sizes)
    if len(sizes) * largest ** 3 <= work_limit * sum(n ** 3 for n in sizes):
        return [largest]
    return choose_buckets(sizes, max_buckets, lambda num_graphs, max_nodes: num_graphs * max_nodes ** 3)


# --------------------------------------------------------------------------------------------
# The public function.
# --------------------------------------------------------------------------------------------
def _check_inputs(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                  batch: Optional[Tensor], precision: str) -> Tensor:
    """Shapes, dtypes and devices; returns ``edge_weight`` as ``[E, H]``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    edge_weight = common.check_attention_shapes(query, key, value, edge_index, edge_weight, batch)
    num_nodes, num_edges = query.size(0), edge_index.size(1)
    if common.host_reads_allowed(query) and num_edges:
        if int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes:
            raise IndexError(f"edge_index: node indices must lie in [0, {num_nodes}), found values in "
                             f"[{int(edge_index.min())}, {int(edge_index.max())}]")
        if batch is not None and bool((batch[edge_index[0]] != batch[edge_index[1]]).any()):
            raise ValueError("edge_index: an edge connects nodes of different graphs in batch")
    return edge_weight


def row_sum_bound(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> float:
    """Largest row sum of :math:`|\\mathbf{A}|` over all nodes and heads (one host read)."""
    rows = edge_weight.new_zeros(num_nodes, edge_weight.size(1))
    rows.index_add_(0, edge_index[1].long(), edge_weight.detach().abs())
    return float(rows.max()) if rows.numel() else 0.0


def resolve_num_squarings(num_squarings: Optional[int], depth: Optional[int], gamma: Optional[float],
                          tol: Optional[float], precision: str, dtype: torch.dtype) -> int:
    """The ``k`` of :func:`squaring_resolvent_attention`: ``num_squarings`` if given; else exact for
    ``depth``; else the bound for ``gamma`` at ``tol`` (default :data:`DEFAULT_TOL` of the precision).
    With none of them, :func:`squarings_per_graph` measures the graphs."""
    if num_squarings is not None:
        if isinstance(num_squarings, bool) or not isinstance(num_squarings, int) or not 1 <= num_squarings:
            raise ValueError(f"num_squarings: expected a positive int, got {num_squarings!r}")
        if num_squarings > MAX_SQUARINGS:
            raise ValueError(f"num_squarings: at most MAX_SQUARINGS = {MAX_SQUARINGS} (2^30 terms), "
                             f"got {num_squarings}")
        return num_squarings
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise ValueError(f"depth: expected a non-negative int, got {depth!r}")
        return squarings_for_depth(depth)
    if tol is None:
        tol = DEFAULT_TOL["float64" if dtype == torch.float64 and precision == "float32" else precision]
    if gamma is None:
        raise ValueError("gamma: expected a bound on the row sums of |A| (or num_squarings, or depth)")
    return squarings_for_bound(gamma, tol)


def squarings_per_graph(edge_index: Tensor, edge_weight: Tensor, levels: Tensor, batch: Optional[Tensor] = None,
                        num_graphs: Optional[int] = None, tol: Optional[float] = None, precision: str = "float32",
                        dtype: torch.dtype = torch.float32, batch_ids: Optional[Tensor] = None) -> int:
    r"""The ``k`` of the squaring path when no bound is given, decided graph by graph: a DAG is exact
    with :func:`squarings_for_depth` of its longest path, whatever its weights; a graph with a cycle
    needs every row of :math:`|\mathbf{A}|` to sum to less than 1, and :func:`squarings_for_bound` of
    its largest row sum (at ``tol``, default :data:`DEFAULT_TOL` of the precision). ``k`` is the largest
    over the graphs: more squarings leave a DAG exact and a bounded graph closer. Graphs do not meet in
    the padded batch, so a DAG whose rows sum to 3 and a graph with a cycle whose rows sum to 0.6 go
    together as they go alone.

    Per-graph segment reductions over the nodes (``scatter_reduce`` by ``batch``, no loop over
    graphs) and one host read.

    Args:
        edge_index (LongTensor): ``[2, E]``, source first, edges inside graphs.
        edge_weight (Tensor): ``[E, H]``.
        levels (LongTensor): ``[N]`` topological level of every node, ``-1`` on or after a cycle
            (:func:`~torch_geometric_chimera.utils.topological_levels` with ``raise_on_cycle=False``).
        batch (LongTensor, optional): ``[N]`` graph of every node, ids ``0 .. G - 1``. (default: one graph)
        num_graphs (int, optional): ``G``; ``batch.max() + 1`` (a host read) when :obj:`None`.
        batch_ids (LongTensor, optional): the graph ids to name in the error, when ``batch`` renumbers
            them (as :attr:`~.resolvent.GraphTopology.batch` does). (default: ``batch``)

    Raises:
        ValueError: a graph has a cycle and a row of :math:`|\mathbf{A}|` summing to 1 or more (or NaN);
            the message names the first such graph (its id in ``batch``) and its largest row sum.
    """
    num_nodes = levels.numel()
    if num_nodes == 0:
        return 1
    device = levels.device
    graph = torch.zeros(num_nodes, dtype=torch.long, device=device) if batch is None else batch.long()
    if num_graphs is None:
        num_graphs = int(graph.max()) + 1

    def per_graph(values: Tensor, empty: float) -> Tensor:  # the largest value of every graph's nodes
        out = torch.full((num_graphs,), empty, dtype=values.dtype, device=device)
        return out.scatter_reduce(0, graph, values, reduce="amax", include_self=True)

    rows = edge_weight.new_zeros(num_nodes, edge_weight.size(1))
    rows.index_add_(0, edge_index[1].long(), edge_weight.detach().abs())
    node_nan = torch.isnan(rows).any(1) if rows.size(1) else torch.zeros_like(graph, dtype=torch.bool)
    node_rows = rows.amax(1) if rows.size(1) else rows.new_zeros(num_nodes)
    node_rows = torch.where(node_nan, float("inf"), node_rows).double()
    row_max, has_nan = per_graph(node_rows, 0.0), per_graph(node_nan.double(), 0.0) > 0
    cyclic = per_graph((levels < 0).double(), 0.0) > 0
    depth = per_graph(levels.double(), -1.0)  # on a DAG, its longest path; -1 for a graph without nodes
    bad = cyclic & ~(row_max < 1)
    first = torch.argmax(bad.long())  # the first graph that is neither a DAG nor bounded below 1
    any_bad, first, first_rows, first_nan, dag_depth, cyclic_rows, any_cyclic = torch.stack([
        bad.any().double(), first.double(), row_max[first], has_nan[first].double(),
        torch.where(cyclic, -1.0, depth).max(), torch.where(cyclic, row_max, 0.0).max(),
        cyclic.any().double()]).tolist()  # the one host read
    if any_bad:
        first = int(first)
        if batch is None:
            name = "the graph"
        else:
            ids = graph if batch_ids is None else batch_ids
            name = f"graph {int(ids[(graph == first).nonzero()[0, 0]])} of batch"
        if first_nan:
            raise ValueError(f"edge_weight: contains NaN in {name}, which has a cycle, so its rows of |A| have no "
                             f"bound (method='squaring')")
        raise ValueError(f"edge_weight: a row of |A| sums to {first_rows:.4g} >= 1 in {name}, which has a cycle: "
                         f"method='squaring' needs every graph to be a DAG (exact) or to have every row of |A| sum "
                         f"to less than 1 (e.g. the 'general' adjacency with gamma < 1); use method='dense'")
    known = []
    if dag_depth >= 0:  # some DAG with nodes
        known.append(resolve_num_squarings(None, int(dag_depth), None, tol, precision, dtype))
    if any_cyclic:
        known.append(resolve_num_squarings(None, None, cyclic_rows, tol, precision, dtype))
    return max(known, default=1)


def squaring_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor,
                                 edge_weight: Tensor, batch: Optional[Tensor] = None, *,
                                 num_squarings: Optional[int] = None, depth: Optional[int] = None,
                                 gamma: Optional[float] = None, tol: Optional[float] = None,
                                 precision: str = "float32", max_nodes: Optional[int] = None,
                                 num_graphs: Optional[int] = None, max_buckets: int = 1,
                                 fused: bool = False, layout: Optional[PaddedLayout] = None) -> Tensor:
    r"""Resolvent attention :math:`\mathbf{y} = (\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}`
    per graph and head, with :math:`\mathbf{L}` from the squaring trick on every graph padded to one
    size (module docstring): exact on DAGs, within a chosen bound of
    :math:`(\mathbf{I} - \mathbf{A})^{-1}` when the rows of :math:`|\mathbf{A}|` sum to less than 1.
    ``A[i, j] = edge_weight[e, h]`` for every edge ``e = (j -> i)``; duplicates add up.

    Forward and backward make a number of operations that depends on ``k`` and ``max_buckets``
    only; with ``num_squarings`` (or ``depth``, or ``gamma``), ``max_nodes`` and ``num_graphs`` given,
    nothing is read on the host (no synchronization on a GPU).

    Args:
        query (Tensor): ``[N, H, S]``.
        key (Tensor): ``[N, H, S]``.
        value (Tensor): ``[N, H, P]``.
        edge_index (LongTensor): ``[2, E]``, source first, edges inside graphs.
        edge_weight (Tensor): ``[E, H]`` (or ``[E]``, shared by all heads).
        batch (LongTensor, optional): ``[N]`` graph of every node, ids ``0 .. G - 1``. (default: one graph)
        num_squarings (int, optional): ``k``; ``2^k`` Neumann terms. (default: from ``depth`` or the bound)
        depth (int, optional): on DAGs, the longest path (in edges) of any graph, or an upper bound
            (``max_nodes - 1`` always is one): ``k = ceil(log2(depth + 1))``, exact.
        gamma (float, optional): a bound :math:`< 1` on every row sum of :math:`|\mathbf{A}|` (``gamma``
            of the ``general`` adjacency): ``k`` is then :func:`squarings_for_bound` ``(gamma, tol)``. When
            none of ``num_squarings``, ``depth`` and ``gamma`` is given, ``k`` is decided graph by graph
            on the host (:func:`squarings_per_graph`): every graph must be a DAG (exact) or have every
            row of :math:`|\mathbf{A}|` sum to less than 1.
        tol (float, optional): the truncation bound, relative to :math:`1/(1-\gamma)`. (default:
            the unit roundoff of ``precision``, :data:`DEFAULT_TOL`)
        precision (str, optional): inputs of the matrix products in ``"float32"`` (the input dtype),
            ``"tf32"`` or ``"bf16"``, accumulated in float32. (default: ``"float32"``)
        max_nodes (int, optional): ``m``, the padded size; the largest graph (a host read) when :obj:`None`.
        num_graphs (int, optional): ``G``; ``batch.max() + 1`` (a host read) when :obj:`None`.
        max_buckets (int, optional): more than 1 splits the graphs by size into at most this many padded
            batches, chosen by :func:`choose_buckets` with :func:`bucket_cost` (reads the sizes on the
            host). (default: ``1``, one padded batch)
        fused (bool, optional): ``(L ⊙ QKᵀ)V`` and its backward in the Triton kernels of
            :mod:`~.triton_attention` (CUDA with Triton, or Triton's interpreter when ``TRITON_INTERPRET=1``
            was set before Triton was imported), which materialize nothing larger than ``L``; float32, or
            float64 with ``precision="float32"``. (default: :obj:`False`)
        layout (PaddedLayout, optional): :func:`padded_layout` of ``(edge_index, batch)``, which depends on
            the topology only: computed once and passed in, it saves its dozen operations on every
            call (``max_nodes``, ``num_graphs`` and ``max_buckets`` are then ignored). (default: :obj:`None`)

    float16 and bfloat16 inputs are computed in float32 and the output rounded back.

    :rtype: :class:`Tensor` of shape ``[N, H, P]``.
    """
    edge_weight = _check_inputs(query, key, value, edge_index, edge_weight, batch, precision)
    if not isinstance(max_buckets, int) or isinstance(max_buckets, bool) or max_buckets < 1:
        raise ValueError(f"max_buckets: expected a positive int, got {max_buckets!r}")
    if fused and not fused_available(query.device):
        raise ValueError(f"fused: the Triton kernels need Triton and CUDA tensors (or Triton imported under "
                         f"TRITON_INTERPRET=1), got tensors on {query.device}")
    num_nodes, heads = query.shape[:2]
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        query, key, value, edge_weight = (t.float() for t in (query, key, value, edge_weight))
    if num_squarings is None and depth is None and gamma is None:  # decided graph by graph (host reads)
        levels = topological_levels(edge_index, num_nodes, raise_on_cycle=False)
        k = squarings_per_graph(edge_index, edge_weight, levels, batch, None, tol, precision, query.dtype)
    else:
        k = resolve_num_squarings(num_squarings, depth, gamma, tol, precision, query.dtype)
    if num_nodes == 0 or value.numel() == 0:
        return value.new_zeros(value.shape).to(dtype)

    if layout is not None or max_buckets == 1:
        if layout is None:
            layout = padded_layout(edge_index, num_nodes, batch, max_nodes, num_graphs)
        return squaring_attention(query, key, value, edge_weight, layout, k, precision, fused).to(dtype)

    graph = torch.zeros(num_nodes, dtype=torch.long, device=query.device) if batch is None else batch.long()
    sizes = torch.bincount(graph).tolist()
    bounds = choose_buckets(sizes, max_buckets, lambda g, m: bucket_cost(
        g, m, heads, query.size(-1), value.size(-1), k, precision))
    layouts, inverse = bucketed_layouts(edge_index, num_nodes, batch, bounds)
    return over_layouts(lambda q, k_, v, w, layout, index: squaring_attention(q, k_, v, w, layout, k, precision,
                                                                              fused, index),
                        layouts, inverse, query, key, value, edge_weight).to(dtype)
