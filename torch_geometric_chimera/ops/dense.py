r"""``method="dense"``: exact, one batched inverse of every graph padded to one size.

Every graph is padded to the largest of the batch (the layout of the ``squaring`` path,
:func:`~.squaring.padded_layout`; a few size buckets only when that padding would multiply the
work many times over, :func:`~.squaring.padding_bounds`), and :math:`L = (I - A)^{-1}` of all
graphs and heads is formed at once (:func:`resolvent_matrix`: block elimination when every row of
:math:`|A|` sums to less than 1, pivoted LU otherwise); then :math:`y = (L \odot QK^\top) V`, and the
backward reads :math:`\partial A = L^\top \partial L\, L^\top` at the edges
(:class:`DenseResolventAttention`, which shares the forward and backward of the squaring path and
differs only in how :math:`L` is computed).

Exact (to rounding) whenever :math:`I - A` is invertible, on any graph. Cost per head and per graph
padded to :math:`m` nodes: :math:`O(m^3)` for the inverse and its backward products,
:math:`O(m^2 (S + P))` for the scores, and :math:`O(m^2)` memory. Pure PyTorch (no compiled kernel).
The number of operations does not depend on the number of graphs or of distinct sizes: on CPU it
grows with :math:`m / 32` (the blocks of :func:`block_inverse_`), elsewhere it is constant.
"""
from typing import Optional

import torch
from torch import Tensor

from . import common
from .squaring import PaddedIndex, PaddedLayout, padded_attention_backward, padded_attention_forward, padded_layout

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


def block_inverse_(matrix: Tensor, base: int = CPU_BATCHED_LU_MAX_ROWS) -> Tensor:
    r"""Inverts a contiguous batch ``[B, n, n]`` of matrices in place, by block Gauss-Jordan
    elimination (the sweep operator on blocks of ``base`` rows), and returns it. Almost all the work
    is one batched rank-``base`` update of the whole matrix per block; the pivot blocks, of at most
    ``base`` rows, go to one batched :func:`torch.linalg.inv_ex` each, so that ``base =``
    :data:`CPU_BATCHED_LU_MAX_ROWS` keeps clear of torch 2.13's CPU batched LU bug.

    For the pivot block :math:`p = M_{JJ}` of the rows and columns :math:`J`, with :math:`C = M_{:J}`
    (the column panel) and :math:`R = p^{-1} M_{J:}` (the row panel, whose block :math:`J` is set to
    :math:`I` first, so that it becomes :math:`p^{-1}`), one step is

    .. math::
        M_{:J} \leftarrow E_J, \qquad M \leftarrow M - C R, \qquad M_{J:} \leftarrow R,

    with :math:`E_J` the columns :math:`J` of the identity: afterwards :math:`M_{IJ} = -C_I p^{-1}`,
    :math:`M_{JK} = p^{-1} M_{JK}`, :math:`M_{IK} - C_I p^{-1} M_{JK}` elsewhere, the sweep of
    :math:`J`; sweeping every block leaves :math:`M^{-1}`. Every update writes the whole (contiguous)
    matrix or a panel of contiguous rows, which batched BLAS does at full speed (an in-place product
    into a strided block does not: PyTorch then loops over the batch), and a strided column panel
    only by an elementwise copy. 7 operations per block of ``base`` rows, 4 more in all, whatever
    the batch.

    No pivoting between blocks: safe (no breakdown, errors as small as LU's) when every matrix is
    strictly row diagonally dominant, as ``I - A`` is whenever every row of ``|A|`` sums to less than
    1: the remaining pivot blocks, Schur complements, stay diagonally dominant. Other matrices need
    pivoting (:func:`batched_inverse`).
    """
    if matrix.dim() != 3 or matrix.size(1) != matrix.size(2) or not matrix.is_contiguous():
        raise ValueError(f"matrix: expected a contiguous batch of square matrices [B, n, n], got shape "
                         f"{list(matrix.shape)} (contiguous: {matrix.is_contiguous()})")
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise ValueError(f"base: expected a positive int, got {base!r}")
    n = matrix.size(-1)
    # Every panel at once (views, one operation each): rows J (contiguous), columns J, identity columns J.
    row_panels, col_panels = matrix.split(base, dim=1), matrix.split(base, dim=2)
    eye_panels = torch.eye(n, dtype=matrix.dtype, device=matrix.device).split(base, dim=1)
    for start, rows, cols, eye_cols in zip(range(0, n, base), row_panels, col_panels, eye_panels):
        pivot_inverse = torch.linalg.inv_ex(rows[:, :, start:start + base]).inverse  # no check: no singular pivot
        col_panel = cols.clone()
        cols.copy_(eye_cols)
        row_panel = torch.bmm(pivot_inverse, rows)
        matrix.baddbmm_(col_panel, row_panel, alpha=-1)
        rows.copy_(row_panel)
    return matrix


def block_inverse(matrix: Tensor, base: int = CPU_BATCHED_LU_MAX_ROWS) -> Tensor:
    """The inverse of a batch ``[..., n, n]`` of strictly row diagonally dominant matrices by
    :func:`block_inverse_` (on a copy: ``matrix`` is left as it is)."""
    n = matrix.size(-1)
    copy = matrix.clone(memory_format=torch.contiguous_format)
    block_inverse_(copy.view(-1, n, n), base)
    return copy


def resolvent_matrix(adj: Tensor) -> Tensor:
    """``(I - A)^{-1}`` for a batch ``[..., m, m]`` of dense ``A`` in one batched computation.

    On CPU: block Gauss-Jordan (:func:`block_inverse_`) when every row of ``|A|`` sums to less than
    1 (always true for the ``general`` adjacency; measured, as values may be read on the host for
    free there, see :func:`~.common.host_reads_allowed`), LU with pivoting otherwise, one matrix at
    a time above :data:`CPU_BATCHED_LU_MAX_ROWS` rows (:func:`batched_inverse`). Elsewhere: one
    batched LU with pivoting (a fixed number of kernels, no host read)."""
    matrix = torch.eye(adj.size(-1), dtype=adj.dtype, device=adj.device) - adj
    if (adj.device.type == "cpu" and adj.numel() and common.host_reads_allowed(adj)
            and float(adj.abs().sum(-1).amax()) < 1.0):
        return block_inverse_(matrix.view(-1, *matrix.shape[-2:])).view(matrix.shape)
    return batched_inverse(matrix)


class DenseResolventAttention(torch.autograd.Function):
    r"""One padded batch of graphs (:func:`~.squaring.padded_attention_forward`):
    :math:`y = (L \odot QK^\top) V` with the exact :math:`L = (I - A)^{-1}` of
    :func:`resolvent_matrix`. The backward (:func:`~.squaring.padded_attention_backward`) is
    :math:`\partial A = L^\top \partial L\, L^\top`, read at the edges only, and the gradients of
    the attention products."""

    @staticmethod
    def forward(ctx, edge_weight: Tensor, query: Tensor, key: Tensor, value: Tensor, layout: PaddedLayout,
                index: Optional[PaddedIndex]) -> Tensor:
        return padded_attention_forward(ctx, edge_weight, query, key, value, layout, index, resolvent_matrix,
                                        "float32", False)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return padded_attention_backward(ctx, grad_out)


def dense_attention(query: Tensor, key: Tensor, value: Tensor, edge_weight: Tensor, layout: PaddedLayout,
                    index: Optional[PaddedIndex] = None) -> Tensor:
    r"""The dense path on inputs already checked (as :func:`~.resolvent.resolvent_attention` checks
    them) and a precomputed layout (:func:`~.squaring.padded_layout`, and optionally its
    :func:`~.squaring.padded_index` for the heads of ``query``): one padded batch, one batched
    inverse. ``edge_weight`` is ``[E, H]``.

    :rtype: :class:`Tensor` of shape ``[N, H, P]``.
    """
    return DenseResolventAttention.apply(edge_weight, query, key, value, layout, index)


def dense_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor,
                              edge_weight: Tensor, batch: Optional[Tensor] = None,
                              layout: Optional[PaddedLayout] = None) -> Tensor:
    r"""Exact :math:`(L \odot QK^\top)V` with :math:`L = (I - A)^{-1}` per graph and head.

    Every graph is padded to the largest (or to ``layout``, from :func:`~.squaring.padded_layout`)
    and all are solved with one batched inverse (:func:`resolvent_matrix`). Padding nodes are
    isolated and have zero features, so they change nothing. Edges must not connect different
    graphs. With ``layout`` passed in, nothing here reads a value on the host but the
    diagonal-dominance test of :func:`resolvent_matrix` (CPU only).

    Args:
        query (Tensor): ``[N, H, S]``.
        key (Tensor): ``[N, H, S]``.
        value (Tensor): ``[N, H, P]``.
        edge_index (LongTensor): ``[2, E]``, source first.
        edge_weight (Tensor): ``[E, H]``.
        batch (LongTensor, optional): ``[N]`` graph of every node. (default: one graph)
        layout (PaddedLayout, optional): :func:`~.squaring.padded_layout` of ``(edge_index, batch)``.

    :rtype: :class:`Tensor` of shape ``[N, H, P]``.
    """
    num_nodes = query.size(0)
    if num_nodes == 0:
        return value.new_zeros(value.shape)
    if layout is None:
        layout = padded_layout(edge_index, num_nodes, batch)
    return dense_attention(query, key, value, edge_weight, layout)
