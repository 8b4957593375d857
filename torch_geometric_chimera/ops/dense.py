r"""``method="dense"``: exact, one batched inverse per bucket of similar graph sizes.

Every graph is padded to its size bucket (:func:`bucket_size`: at most 8 sizes per octave, at most
12.5% padding per side) and each bucket's :math:`L = (I - A)^{-1}` is formed with one batched
call (:func:`resolvent_matrix`: block elimination when every row of :math:`|A|` sums to less than
1, pivoted LU otherwise); then :math:`y = (L \odot QK^\top) V`, and the backward reads
:math:`\partial A = L^\top \partial L\, L^\top` at the edges (:class:`DenseResolventAttention`).

Exact (to rounding) whenever :math:`I - A` is invertible, on any graph. Cost per head and per graph
padded to :math:`m` nodes: :math:`O(m^3)` for the inverse and its backward products,
:math:`O(m^2 (S + P))` for the scores, and :math:`O(m^2)` memory. Pure PyTorch (no compiled kernel);
loops over buckets, never over graphs.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import common


def bucket_size(num_nodes: Tensor) -> Tensor:
    """Round graph sizes up to one of at most 8 sizes per octave (<= 12.5% padding per side)."""
    n = num_nodes.clamp_min(1)
    step = (2 ** (torch.floor(torch.log2(n.double())).long() - 3).clamp_min(0))
    return (n + step - 1) // step * step


#: Largest matrix that batched LU inverts correctly on CPU in every thread setting. torch 2.13's CPU
#: build (MKL) returns wrong factors, raises, or never returns for batches of larger matrices once
#: ``torch.set_num_threads`` has been called (MKL prints "Parameter 6 was incorrect on entry to
#: DLASWP"); one matrix at a time is exact. Measured: 32 rows sound, 200 rows wrong by 2e-5.
CPU_BATCHED_LU_MAX_ROWS = 32


def batched_inverse(matrix: Tensor) -> Tensor:
    """:func:`torch.linalg.inv` of a batch of matrices; on CPU, matrices of more than
    :data:`CPU_BATCHED_LU_MAX_ROWS` rows are inverted one at a time (about 10-20% slower than one
    batched call, and exact whatever the thread settings)."""
    n = matrix.size(-1)
    if matrix.device.type != "cpu" or matrix.dim() < 3 or n <= CPU_BATCHED_LU_MAX_ROWS or matrix.numel() == 0:
        return torch.linalg.inv(matrix)
    flat = matrix.reshape(-1, n, n)
    return torch.stack([torch.linalg.inv(m) for m in flat.unbind(0)]).view(matrix.shape)


def block_inverse(matrix: Tensor, base: int = 16) -> Tensor:
    r"""Inverse of a batch of matrices by recursive 2 x 2 block elimination (Schur complements),
    so that almost all the work is batched matrix products instead of small LU factorizations.

    It pivots on the leading blocks without row exchanges, which is safe (no breakdown, errors as
    small as LU's) when every matrix is strictly row diagonally dominant, as ``I - A`` is whenever
    every row of ``|A|`` sums to less than 1: the Schur complements stay diagonally dominant.
    Blocks of at most ``base`` rows use :func:`torch.linalg.inv`.
    """
    n = matrix.size(-1)
    if n <= base:
        return torch.linalg.inv(matrix)
    h = n // 2
    a, b = matrix[..., :h, :h], matrix[..., :h, h:]
    c, d = matrix[..., h:, :h], matrix[..., h:, h:]
    a_inv = block_inverse(a, base)
    a_inv_b, c_a_inv = a_inv @ b, c @ a_inv
    schur_inv = block_inverse(d - c @ a_inv_b, base)
    top_right = -(a_inv_b @ schur_inv)
    top_left = a_inv - top_right @ c_a_inv
    bottom_left = -(schur_inv @ c_a_inv)
    return torch.cat([torch.cat([top_left, top_right], -1), torch.cat([bottom_left, schur_inv], -1)], -2)


def resolvent_matrix(adj: Tensor) -> Tensor:
    """``(I - A)^{-1}`` for a batch of dense ``A``: block elimination when every row of ``|A|``
    sums to less than 1 (always true for the ``general`` adjacency), LU with pivoting otherwise.
    The test reads a value, so on accelerators (outside debug mode) LU is used without it."""
    eye = torch.eye(adj.size(-1), dtype=adj.dtype, device=adj.device)
    if adj.numel() and common.host_reads_allowed(adj) and float(adj.abs().sum(-1).amax()) < 1.0:
        return block_inverse(eye - adj)
    return batched_inverse(eye - adj)


class DenseResolventAttention(torch.autograd.Function):
    r"""One bucket of equally padded graphs: :math:`y = (L \odot QK^\top) V` with
    :math:`L = (I - A)^{-1}` from :func:`resolvent_matrix`.

    ``A[g, :, i, j] += weight[e]`` for every ``entries[:, e] = (g, i, j)``. The backward is
    :math:`\partial A = L^\top \partial L\, L^\top`, read at the edges only.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, entries: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        num_graphs, heads, n = q.shape[:3]
        adj = weight.new_zeros(num_graphs, n, n, heads)
        adj = adj.index_put_(tuple(entries), weight, accumulate=True).permute(0, 3, 1, 2)
        resolvent = resolvent_matrix(adj)
        y = (resolvent * (q @ k.transpose(-1, -2))) @ v
        ctx.save_for_backward(entries, resolvent, q, k, v)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        entries, resolvent, q, k, v = ctx.saved_tensors
        scores = q @ k.transpose(-1, -2)
        grad_mask = grad_y @ v.transpose(-1, -2)  # ∂(L ⊙ S)
        grad_v = (resolvent * scores).transpose(-1, -2) @ grad_y
        grad_scores = grad_mask * resolvent
        grad_q, grad_k = grad_scores @ k, grad_scores.transpose(-1, -2) @ q
        grad_weight = None
        if ctx.needs_input_grad[0]:
            resolvent_t = resolvent.transpose(-1, -2)
            grad_adj = resolvent_t @ (grad_mask * scores) @ resolvent_t  # Lᵀ ∂L Lᵀ
            g, i, j = entries
            grad_weight = grad_adj[g, :, i, j]  # [E, H]
        return grad_weight, None, grad_q, grad_k, grad_v


class DenseBucket(NamedTuple):
    """Graphs padded to one size ``n_pad``: node ``nodes[i]`` sits at ``(graph[i], position[i])``
    and ``entries[:, e] = (graph, target, source)`` of edge ``edges[e]``."""
    n_pad: int
    num_graphs: int
    nodes: Tensor
    graph: Tensor
    position: Tensor
    edges: Tensor
    entries: Tensor


def dense_buckets(edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None
                  ) -> Tuple[List[DenseBucket], Tensor]:
    """The bucketing of :func:`dense_resolvent_attention`, which depends on the topology only
    (it reads sizes on the host, so it is computed once per graph batch and cached), and the
    permutation that puts the buckets' concatenated outputs back in node order."""
    device = edge_index.device
    if batch is None:
        batch = torch.zeros(num_nodes, dtype=torch.long, device=device)
    num_graphs = int(batch.max()) + 1
    sizes = torch.bincount(batch, minlength=num_graphs)
    ptr = torch.cumsum(sizes, 0) - sizes
    order = torch.argsort(batch, stable=True)
    local = torch.empty_like(batch)
    local[order] = torch.arange(num_nodes, device=device) - ptr[batch[order]]
    padded = bucket_size(sizes)
    padded[sizes == 0] = 0
    src, dst = edge_index

    buckets: List[DenseBucket] = []
    for n_pad in torch.unique(padded[sizes > 0]).tolist():
        graphs = (padded == n_pad).nonzero().view(-1)
        slot = torch.full((num_graphs,), -1, dtype=torch.long, device=device)
        slot[graphs] = torch.arange(graphs.numel(), device=device)
        nodes = (slot[batch] >= 0).nonzero().view(-1)
        edges = (slot[batch[dst]] >= 0).nonzero().view(-1)
        entries = torch.stack([slot[batch[dst[edges]]], local[dst[edges]], local[src[edges]]])
        buckets.append(DenseBucket(int(n_pad), graphs.numel(), nodes, slot[batch[nodes]], local[nodes], edges,
                                   entries))
    inverse = torch.argsort(torch.cat([b.nodes for b in buckets]))
    return buckets, inverse


def dense_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor,
                              edge_weight: Tensor, batch: Optional[Tensor] = None,
                              buckets: Optional[Tuple[List[DenseBucket], Tensor]] = None) -> Tensor:
    r"""Exact :math:`(L \odot QK^\top)V` with :math:`L = (I - A)^{-1}` per graph.

    Graphs are grouped into buckets of similar size (:func:`bucket_size`); each bucket is padded
    to one size and solved with one batched :func:`torch.linalg.inv`. Padding nodes are isolated
    and have zero features, so they change nothing. The loop runs over buckets, not graphs.
    Edges must not connect different graphs. ``buckets`` (from :func:`dense_buckets`) may be
    passed in, and then nothing here reads a value on the host.
    """
    num_nodes, heads = query.size(0), query.size(1)
    if num_nodes == 0:
        return value.new_zeros(value.shape)
    bucket_list, inverse = dense_buckets(edge_index, num_nodes, batch) if buckets is None else buckets

    outputs: List[Tensor] = []
    for bucket in bucket_list:
        def densify(t: Tensor) -> Tensor:  # [n_nodes, H, F] -> [G_b, H, n_pad, F]
            out = t.new_zeros(bucket.num_graphs, bucket.n_pad, heads, t.size(-1))
            return out.index_put((bucket.graph, bucket.position), t[bucket.nodes]).transpose(1, 2)

        q, k, v = densify(query), densify(key), densify(value)
        y = DenseResolventAttention.apply(edge_weight[bucket.edges], bucket.entries, q, k, v)  # [G_b, H, n_pad, P]
        outputs.append(y.transpose(1, 2)[bucket.graph, bucket.position])
    return torch.cat(outputs)[inverse]

