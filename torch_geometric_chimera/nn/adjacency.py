r"""Selective adjacency parameterizations (DESIGN.md §3; paper §3.3, §4.1, App. B.1).

Each one maps the per-node selectivity :math:`\Delta \ge 0` (``[N, H]``), optionally per-edge
selectivity :math:`\Delta'` (``[E, H]``) and a per-node normalizer :math:`\Psi`, to

* ``edge_weight`` (``[E, H]``): :math:`A_{ij}` for every edge ``e = (j -> i)``, and
* ``key_scale`` (``[N, H]``): the factor with which :math:`\bar B_i = \mathrm{key\_scale}_i B_i`.

Node ``i`` is always the edge's target (``edge_index[1]``) and ``j`` its source.

Every one takes ``signed`` (the layer's ``transitions="signed"``): each transition
:math:`e^{-x}`, which lies in :math:`(0, 1]`, becomes :math:`2e^{-x} - 1`, which lies in
:math:`(-1, 1]`, as Grazzi et al. ("Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues", ICLR 2025) do for Mamba: a state can flip its sign, which a product of positive
factors never does (parity). The normalization :math:`s` of each adjacency is kept (computed on
:math:`|A|` where it depends on the weights), so :math:`|A|` obeys every bound that :math:`A` obeyed
(:func:`transition`).

Every one also takes an optional ``edge_mask`` (``[E]``, values in :math:`[0, 1]`), the edge
mask of an explainer such as :class:`torch_geometric.explain.algorithm.GNNExplainer`: a mask of
``1`` keeps the edge, a mask of ``0`` gives exactly the adjacency of the graph without it
(normalizations and parent counts included), and values in between interpolate.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

ADJACENCIES = ("general", "dag", "undirected_line", "mamba2")

#: Transition parameterizations: ``"positive"`` (:math:`e^{-x} \in (0, 1]`, Mamba's) or
#: ``"signed"`` (:math:`2e^{-x} - 1 \in (-1, 1]`, Grazzi et al.'s).
TRANSITIONS = ("positive", "signed")


def transition(rate: Tensor, signed: bool = False) -> Tensor:
    r""":math:`e^{-x}` (in :math:`(0, 1]`), or :math:`2e^{-x} - 1` (in :math:`(-1, 1]`) when
    ``signed``: the same gate, stretched onto :math:`[-1, 1]` so that a large :math:`x` flips the
    state's sign instead of forgetting it. :math:`|2e^{-x} - 1| \le 1`, so every normalization
    that bounds rows of :math:`e^{-x}` bounds rows of :math:`|2e^{-x} - 1|` when computed on them."""
    decay = torch.exp(-rate)
    return 2 * decay - 1 if signed else decay


def _row_sum(values: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
    return values.new_zeros((num_nodes,) + values.shape[1:]).index_add(0, dst, values)


def general_adjacency(delta: Tensor, edge_index: Tensor, psi: Tensor, gamma: float = 0.9,
                      delta_edge: Optional[Tensor] = None, edge_mask: Optional[Tensor] = None,
                      signed: bool = False) -> Tuple[Tensor, Tensor]:
    r"""General graphs (paper Eq. 12 and the row normalization of §3.3):

    .. math::
        A_{ij} = \exp\left(-\frac{\Delta_i + \Delta_j + \Delta'_{ij}}{3}\right), \qquad
        A[i, :] \leftarrow \frac{\gamma A[i, :]}{\sum_j A_{ij} + \exp(-\Psi_i)},

    so every row sums to less than :math:`\gamma < 1`: :math:`\|A\|_\infty < 1`, the resolvent
    exists and its Neumann series converges. :math:`\bar B_i = \Delta_i B_i`, as Mamba-2's
    :math:`b_t = \Delta_t`. With ``signed`` the numerators are :math:`2e^{-x} - 1` and the row
    sum in the denominator runs over their absolute values, so the rows of :math:`|A|` still sum
    to less than :math:`\gamma`.
    """
    src, dst = edge_index[0].long(), edge_index[1].long()
    logit = delta[dst] + delta[src]
    if delta_edge is not None:
        logit = logit + delta_edge
    raw = transition(logit / 3, signed)
    if edge_mask is not None:  # before the normalization, so that a masked edge leaves its row's sum
        raw = raw * edge_mask.view(-1, 1)
    denominator = _row_sum(raw.abs() if signed else raw, dst, delta.size(0)) + torch.exp(-psi)
    return gamma * raw / denominator[dst], delta


def dag_adjacency(delta: Tensor, edge_index: Tensor, delta_edge: Optional[Tensor] = None,
                  edge_mask: Optional[Tensor] = None, signed: bool = False) -> Tuple[Tensor, Tensor]:
    r"""DAGs, normalized as in Prop. 4.3 (paper Eq. 17):

    .. math::
        \Delta_{ij} = \tfrac{1}{2}(\Delta_i + \Delta_j), \quad
        \bar A_{ij} = \frac{\exp(-\Delta_{ij})}{\sqrt{|p(i)|}}, \quad
        \bar B_i = \frac{\sum_{j \in p(i)} \Delta_{ij}}{\sqrt{|p(i)|}} B_i,

    with :math:`p(i)` the parents of ``i`` and :math:`\Delta_{ij} = (\Delta_i + \Delta_j +
    \Delta'_{ij}) / 3` when edge selectivity is given. A source node (no parents) keeps
    :math:`\bar B_i = \Delta_i B_i`, as the first token of Mamba-2 does; the formula itself
    would give it no input at all. With ``edge_mask`` :math:`m`, :math:`|p(i)| = \sum_{j} m_{ij}`,
    the sum runs over :math:`m_{ij} \Delta_{ij}`, :math:`\bar A_{ij}` is scaled by :math:`m_{ij}`, and
    a node with :math:`|p(i)| < 1` blends in :math:`(1 - |p(i)|) \Delta_i B_i` (continuous in
    :math:`m`; the source-node rule at :math:`|p(i)| = 0`). With ``signed``,
    :math:`\bar A_{ij} = (2e^{-\Delta_{ij}} - 1) / \sqrt{|p(i)|}`: Prop. 4.3's variance argument
    holds for :math:`|\bar A|`, whose entries are still at most :math:`1 / \sqrt{|p(i)|}`.
    """
    src, dst = edge_index[0].long(), edge_index[1].long()
    if delta_edge is None:
        delta_ij = (delta[dst] + delta[src]) / 2
    else:
        delta_ij = (delta[dst] + delta[src] + delta_edge) / 3
    if edge_mask is None:
        # A row sum of ones, not torch.bincount: its output size depends on dst's values, which
        # torch.compile cannot trace (a graph break).
        parents = _row_sum(delta.new_ones(dst.numel(), 1), dst, delta.size(0))
        inv_sqrt = parents.clamp_min(1).rsqrt()
        weight = transition(delta_ij, signed) * inv_sqrt[dst]
        key_scale = torch.where(parents > 0, _row_sum(delta_ij, dst, delta.size(0)) * inv_sqrt, delta)
        return weight, key_scale
    mask = edge_mask.view(-1, 1)
    parents = _row_sum(mask, dst, delta.size(0))  # a soft parent count
    inv_sqrt = parents.clamp_min(1).rsqrt()
    weight = transition(delta_ij, signed) * inv_sqrt[dst] * mask
    # For integer counts this equals the torch.where above; in between it is continuous.
    key_scale = _row_sum(mask * delta_ij, dst, delta.size(0)) * inv_sqrt + (1 - parents).clamp_min(0) * delta
    return weight, key_scale


def undirected_line_adjacency(delta: Tensor, edge_index: Tensor, delta_edge: Optional[Tensor] = None,
                              edge_mask: Optional[Tensor] = None, signed: bool = False) -> Tuple[Tensor, Tensor]:
    r"""Undirected line graphs (paper App. B.1): the per-cycle constraint
    :math:`A_{ij} A_{ji} \le \tfrac14` on every 2-cycle ``i <-> j``, met by

    .. math::
        A_{ij} = \tfrac12 \exp\left(-\frac{\Delta_i + \Delta_j + \Delta'_{ij}}{3}\right).

    For a path (every node has at most two neighbours, no cycle) the leading minors of
    :math:`I - A` obey :math:`D_k \ge D_{k-1} / 2 > 0`, so the resolvent exists without the
    row normalization of :func:`general_adjacency`, which allows larger weights. Only valid on
    paths: use :func:`general_adjacency` for other graphs. :math:`\bar B_i = \Delta_i B_i`. With
    ``signed``, :math:`A_{ij} = \tfrac12 (2e^{-x} - 1)`: :math:`|A_{ij} A_{ji}| \le \tfrac14` still,
    and the minors' bound, which uses only :math:`|A_{ij} A_{ji}|`, still holds.
    """
    src, dst = edge_index[0].long(), edge_index[1].long()
    logit = delta[dst] + delta[src]
    if delta_edge is not None:
        logit = logit + delta_edge
    weight = 0.5 * transition(logit / 3, signed)
    if edge_mask is not None:
        weight = weight * edge_mask.view(-1, 1)
    return weight, delta


def mamba2_adjacency(delta: Tensor, edge_index: Tensor, edge_mask: Optional[Tensor] = None,
                     signed: bool = False) -> Tuple[Tensor, Tensor]:
    r"""Mamba-2 (paper §2, Prop. 3.3): :math:`A_{t, t-1} = \exp(-\Delta_t)` and
    :math:`\bar B_t = \Delta_t B_t`, no normalization. On the directed line graph
    ``t - 1 -> t`` this is exactly Mamba-2's SSD (with :math:`a_t = -\Delta_t`); on other graphs
    every edge into ``i`` gets :math:`\exp(-\Delta_i)`. With ``signed``,
    :math:`A_{t, t-1} = 2\exp(-\Delta_t) - 1` (Grazzi et al.'s Mamba)."""
    weight = transition(delta[edge_index[1].long()], signed)
    if edge_mask is not None:
        weight = weight * edge_mask.view(-1, 1)
    return weight, delta
