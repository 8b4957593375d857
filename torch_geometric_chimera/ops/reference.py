r"""Test oracles: the executable specification of resolvent attention.

For one head, with ``A[i, j] = edge_weight[e]`` for every edge ``e = (j -> i)`` (duplicates add up,
no implicit self-loops),

.. math::
    y = (L \odot Q K^\top) V, \qquad L = (I - A)^{-1} \text{ or } \textstyle\sum_{k \le K} A^k.

Per node, the same thing in state form: ``X_j = K_j V_jᵀ`` (an ``S x P`` state), ``H = L X`` and
``y_i = Q_iᵀ H_i``. The methods (:mod:`.dense`, :mod:`.band`, :mod:`.dag`, :mod:`.line`,
:mod:`.neumann`, :mod:`.iterative`) each compute one of these two forms; here are the oracles they
are tested against, which no production path calls: one dense inverse (or power sum) of the whole
block-diagonal matrix, a dense solve per graph for the band kernels, and the squaring trick.
"""
from typing import Optional

import torch
from torch import Tensor

from .dense import batched_inverse


def squaring_resolvent(adj: Tensor, num_squarings: int) -> Tensor:
    r"""The squaring trick (paper Eq. 27) for a batch of dense ``A``:

    .. math::
        \prod_{j=0}^{k-1} \left(\mathbf{I} + \mathbf{A}^{2^j}\right)
            = \sum_{m=0}^{2^k - 1} \mathbf{A}^m,

    :math:`2k - 1` matrix products for :math:`2^k` Neumann terms. Exact on a DAG once
    :math:`k \ge` :func:`~.squaring.squarings_for_depth`; when every row of :math:`|\mathbf{A}|` sums to at most
    :math:`\gamma < 1` (the ``general`` adjacency), it differs from :math:`(\mathbf{I} - \mathbf{A})^{-1}`
    by at most :math:`\gamma^{2^k} / (1 - \gamma)` in the :math:`\infty`-norm. Differentiable (autograd through the products gives the
    gradient of the truncated sum itself). The reference of the batched GPU path (GPU issue).
    """
    if isinstance(num_squarings, bool) or not isinstance(num_squarings, int) or num_squarings < 1:
        raise ValueError(f"num_squarings: expected a positive int, got {num_squarings!r}")
    eye = torch.eye(adj.size(-1), dtype=adj.dtype, device=adj.device)
    resolvent, power = eye + adj, adj
    for _ in range(num_squarings - 1):
        power = power @ power          # A^(2^j)
        resolvent = resolvent + resolvent @ power  # times (I + A^(2^j))
    return resolvent


# --------------------------------------------------------------------------------------------
# band: the reference of the band LU kernels (chimera::band_factor / band_solve / band_attention).
# --------------------------------------------------------------------------------------------
def band_solve_reference(node_ptr: Tensor, order: Tensor, edge_index: Tensor, weight: Tensor, x: Tensor,
                         transpose: bool = False) -> Tensor:
    r""":math:`(I - A)^{-1} X` (or :math:`(I - A)^{-\top} X`) graph by graph, each graph's nodes
    ``order[node_ptr[g]:node_ptr[g+1]]``, with a dense :func:`torch.linalg.solve`. The band
    kernels must equal it; the ordering changes nothing here, only their cost."""
    out = torch.zeros_like(x)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    src, dst = edge_index.long()
    for g in range(node_ptr.numel() - 1):
        begin, end = int(node_ptr[g]), int(node_ptr[g + 1])
        nodes, n = order[begin:end], end - begin
        inside = (position[dst] >= begin) & (position[dst] < end)
        adj = x.new_zeros(x.size(1), n, n)  # [H, n, n]
        for h in range(x.size(1)):
            adj[h].index_put_((position[dst[inside]] - begin, position[src[inside]] - begin), weight[inside, h],
                              accumulate=True)
        system = torch.eye(n, dtype=x.dtype, device=x.device) - adj
        if transpose:
            system = system.transpose(-1, -2)
        out[nodes] = torch.linalg.solve(system, x[nodes].transpose(0, 1)).transpose(0, 1)
    return out


# --------------------------------------------------------------------------------------------
# The slowest and simplest check of all: one dense inverse of the whole (block-diagonal) matrix.
# --------------------------------------------------------------------------------------------
def inverse_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor,
                                edge_weight: Tensor, num_terms: Optional[int] = None) -> Tensor:
    r"""``torch.linalg.inv`` (or the explicit power sum with ``num_terms``) of the full ``N x N``
    matrix for every head. Test oracle only: cubic in the total number of nodes."""
    num_nodes, heads = query.size(0), query.size(1)
    adj = edge_weight.new_zeros(heads, num_nodes, num_nodes)
    adj = adj.index_put((torch.arange(heads, device=query.device).view(-1, 1), edge_index[1].view(1, -1),
                         edge_index[0].view(1, -1)), edge_weight.t(), accumulate=True)
    eye = torch.eye(num_nodes, dtype=adj.dtype, device=adj.device).expand_as(adj)
    if num_terms is None:
        resolvent = batched_inverse(eye - adj)
    else:
        resolvent, power = eye, eye
        for _ in range(num_terms):
            power = power @ adj
            resolvent = resolvent + power
    scores = torch.einsum("ihs,jhs->hij", query, key)
    return torch.einsum("hij,jhp->ihp", resolvent * scores, value)
