r"""``method="dag"``: exact, on directed acyclic graphs only.

Forward substitution by topological levels: :math:`H = X + A H` one level at a time, every level
reading finished levels only; the backward is the transposed solve
:math:`(I - A)^\top G = \partial H` in reverse level order, with
:math:`\partial A_{ij} = \langle G_i, H_j \rangle`.

Exact (no truncation) on every DAG, whatever the weights. Cost per head:
:math:`O((N + E)\, S P)` work and :math:`O(N S P)` memory, in one sequential step per level.
:class:`DagSolve` is the pure-PyTorch reference (and the fallback without the extension);
``chimera::dag_solve`` (CPU and CUDA) and ``chimera::dag_attention`` (CPU, the state contraction
fused in) are the kernels, wrapped by :func:`dag_solve` and :func:`dag_attention`.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from ._extension import HAS_EXTENSION, transpose_csr
from .common import attention_setup_context, fake_attention_gradients, fake_attention_outputs, no_double_backward


def level_schedule(edge_index: Tensor, level: Tensor, by: str) -> Tuple[Tensor, List[int]]:
    """Edges sorted by the level of their target (``by='dst'``) or source (``by='src'``), with
    the boundaries of each level, so that one ``index_add`` processes one level."""
    key = level[edge_index[1] if by == "dst" else edge_index[0]]
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=int(level.max()) + 1 if level.numel() else 0)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    return order, bounds


class DagSolve(torch.autograd.Function):
    r"""Solve :math:`(I - A) H = X` on a DAG by forward substitution, level by level.

    Backward is the transposed solve :math:`(I - A)^\top G = \partial H` in reverse level order,
    with :math:`\partial A_{ij} = \langle G_i, H_j \rangle`; memory is :math:`O(N \cdot F)`.
    """

    @staticmethod
    def forward(ctx, edge_index: Tensor, level: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        src, dst = edge_index
        order, bounds = level_schedule(edge_index, level, "dst")
        h = x.clone()
        # Level 0 are sources (no incoming edges); every later level reads finished levels only.
        for lo, hi in zip(bounds[1:-1], bounds[2:]):
            e = order[lo:hi]
            h.index_add_(0, dst[e], weight[e].unsqueeze(-1) * h[src[e]])
        ctx.save_for_backward(edge_index, level, weight, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        edge_index, level, weight, h = ctx.saved_tensors
        src, dst = edge_index
        order, bounds = level_schedule(edge_index, level, "src")
        g = grad_h.clone()
        for lo, hi in reversed(list(zip(bounds[:-1], bounds[1:]))):
            e = order[lo:hi]
            g.index_add_(0, src[e], weight[e].unsqueeze(-1) * g[dst[e]])
        grad_weight = (g[dst] * h[src]).sum(-1) if ctx.needs_input_grad[2] else None
        return None, None, grad_weight, g


def dag_solve_reference(edge_index: Tensor, level: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """:math:`(I - A)^{-1} X` on a DAG with precomputed :func:`topological_levels`."""
    return DagSolve.apply(edge_index, level, weight, x)


if HAS_EXTENSION:

    @torch.library.register_fake("chimera::dag_solve")
    def _dag_solve_fake(level_ptr, order, rowptr, col, weight, x):
        torch._check(x.dim() == 3, lambda: "chimera::dag_solve: expected x of shape [N, H, F]")
        return torch.empty_like(x)

    def _dag_solve_setup_context(ctx, inputs, output):
        level_ptr, order, rowptr, col, weight, _ = inputs
        ctx.save_for_backward(level_ptr, order, rowptr, col, weight, output)

    def _dag_solve_backward(ctx, grad_h):
        # The adjoint (I - A)ᵀ g = ∂h is a solve on the reversed DAG in reverse level order.
        level_ptr, order, rowptr, col, weight, h = ctx.saved_tensors
        num_nodes = h.shape[0]
        rowptr_t, col_t, perm = transpose_csr(rowptr, col, num_nodes)
        g = torch.ops.chimera.dag_solve((num_nodes - level_ptr).flip(0), order.flip(0), rowptr_t, col_t,
                                        weight[perm], grad_h.contiguous())
        grad_weight = torch.ops.chimera.edge_dot(rowptr, col, g, h) if ctx.needs_input_grad[4] else None
        return None, None, None, None, grad_weight, g

    @torch.library.register_fake("chimera::dag_attention")
    def _dag_attention_fake(level_ptr, order, rowptr, col, weight, query, key, value):
        return fake_attention_outputs(query, value)

    @torch.library.register_fake("chimera::dag_attention_backward")
    def _dag_attention_backward_fake(level_ptr, order, rowptr_t, col_t, weight_t, query, key, value, state, grad_y,
                                     grad_state=None):
        return fake_attention_gradients(query, key, value, state)

    def _dag_attention_backward(ctx, grads):
        grad_y, grad_state = grads
        level_ptr, order, rowptr, col, weight, query, key, value, state = ctx.saved_tensors
        if grad_y is None:
            grad_y = value.new_zeros(value.shape)
        rowptr_t, col_t, perm = transpose_csr(rowptr, col, query.shape[0])
        grad_query, grad_key, grad_value, g = torch.ops.chimera.dag_attention_backward(
            level_ptr, order, rowptr_t, col_t, weight[perm], query, key, value, state, grad_y, grad_state)
        grad_weight = torch.ops.chimera.edge_dot(rowptr, col, g, state) if ctx.needs_input_grad[4] else None
        return None, None, None, None, grad_weight, grad_query, grad_key, grad_value

    torch.library.register_autograd("chimera::dag_attention", _dag_attention_backward,
                                    setup_context=attention_setup_context)
    torch.library.register_autograd("chimera::dag_attention_backward", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd("chimera::dag_solve", _dag_solve_backward,
                                    setup_context=_dag_solve_setup_context)


def dag_solve(level_ptr: Tensor, order: Tensor, rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    r"""Solve :math:`(I - A) h = x` on a DAG, one topological level at a time.

    Args:
        level_ptr (LongTensor): ``[L + 1]`` boundaries of the levels in ``order``, from 0 to ``N``.
        order (LongTensor): ``[N]`` a permutation of the nodes sorted by level; every edge into a
            node of level ``l`` must come from a node of an earlier level.
        rowptr, col (Tensor): CSR of ``A`` by target (row ``i`` lists the parents of ``i``).
        weight (Tensor): ``[E, H]`` in CSR order.
        x (Tensor): ``[N, H, F]``.

    Differentiable in ``weight`` and ``x``; the backward is the transposed solve in reverse level
    order. Falls back to :class:`DagSolve` when the extension is not built.

    Every index argument is checked before it is read (a ``RuntimeError`` naming it): always on
    CPU; on CUDA ``level_ptr`` always (it is copied to the host anyway), the rest only under
    ``torch_geometric.debug()``, since reading them synchronizes.
    """
    if HAS_EXTENSION:
        return torch.ops.chimera.dag_solve(level_ptr, order, rowptr, col, weight, x)
    row = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=x.device), rowptr.diff().long(),
                                  output_size=col.numel())
    level = torch.empty_like(order)
    level[order] = torch.repeat_interleave(torch.arange(level_ptr.numel() - 1, device=x.device), level_ptr.diff())
    return DagSolve.apply(torch.stack([col.long(), row]), level, weight, x)


def dag_attention(level_ptr: Tensor, order: Tensor, rowptr: Tensor, col: Tensor, weight: Tensor, query: Tensor,
                  key: Tensor, value: Tensor) -> Tensor:
    r"""Resolvent attention on a DAG, :math:`y_i = Q_i^\top H_i` with :math:`H = (I - A)^{-1} X`,
    :math:`X_j = K_j V_j^\top`, by levels with the state contraction fused in
    (``chimera::dag_attention``, CPU). Differentiable in ``weight`` (CSR order), query, key and
    value; float16 / bfloat16 run in float32. The reference is :func:`dag_solve` on
    :func:`.common.to_state` followed by :func:`.common.read_state`."""
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return dag_attention(level_ptr, order, rowptr, col, weight.float(), query.float(), key.float(),
                             value.float()).to(dtype)
    return torch.ops.chimera.dag_attention(level_ptr, order, rowptr, col, weight, query, key, value)[0]
