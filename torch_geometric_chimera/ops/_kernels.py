r"""Registration of the compiled ``chimera::*`` ops: fake kernels, autograd formulas and typed
wrappers. The references they must equal live in :mod:`.reference`."""
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

try:
    from .. import _C  # noqa: F401  (importing runs TORCH_LIBRARY registration)
    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    HAS_EXTENSION = False
    EXTENSION_ERROR = error
    warnings.warn(f"torch_geometric_chimera._C is not built ({error}); falling back to the pure-PyTorch "
                  f"references. Reinstall with `pip install --no-build-isolation .`.")


def transpose_csr(rowptr: Tensor, col: Tensor, num_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR of the transpose: ``(rowptr_t, col_t, perm)`` with ``weight_t = weight[perm]``.

    Shapes depend only on the input shapes (``searchsorted`` instead of ``bincount``) so that
    the autograd formulas also trace under fake tensors."""
    num_rows = rowptr.numel() - 1
    row = torch.repeat_interleave(torch.arange(num_rows, device=col.device, dtype=col.dtype), rowptr.diff(),
                                  output_size=col.numel())
    col_sorted, perm = torch.sort(col, stable=True)
    bounds = torch.arange(num_cols + 1, device=col.device, dtype=col.dtype)
    rowptr_t = torch.searchsorted(col_sorted, bounds).to(col.dtype)
    return rowptr_t, row[perm], perm


if HAS_EXTENSION:

    @torch.library.register_fake("chimera::spmm")
    def _spmm_fake(rowptr, col, weight, x, bias=None):
        torch._check(weight.dim() == 2 and x.dim() == 3, lambda: "chimera::spmm: expected weight [E, H], x [N, H, F]")
        return x.new_empty((rowptr.shape[0] - 1, x.shape[1], x.shape[2]))

    @torch.library.register_fake("chimera::edge_dot")
    def _edge_dot_fake(rowptr, col, a, b):
        torch._check(a.dim() == 3 and b.dim() == 3, lambda: "chimera::edge_dot: expected a, b of shape [N, H, F]")
        return a.new_empty((col.shape[0], a.shape[1]))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _spmm_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])

    def _spmm_backward(ctx, grad_out):
        rowptr, col, weight, x = ctx.saved_tensors
        grad_weight = grad_x = None
        num_inputs = len(ctx.needs_input_grad)  # 4 or 5: the optional bias may be left out
        grad_bias = grad_out if num_inputs > 4 and ctx.needs_input_grad[4] else None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.ops.chimera.edge_dot(rowptr, col, grad_out, x)
        if ctx.needs_input_grad[3]:
            rowptr_t, col_t, perm = transpose_csr(rowptr, col, x.shape[0])
            grad_x = torch.ops.chimera.spmm(rowptr_t, col_t, weight[perm], grad_out)
        return (None, None, grad_weight, grad_x, grad_bias)[:num_inputs]

    def _edge_dot_backward(ctx, grad_out):
        rowptr, col, a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_a = torch.ops.chimera.spmm(rowptr, col, grad_out, b)
        if ctx.needs_input_grad[3]:
            rowptr_t, col_t, perm = transpose_csr(rowptr, col, b.shape[0])
            grad_b = torch.ops.chimera.spmm(rowptr_t, col_t, grad_out[perm], a)
        return None, None, grad_a, grad_b

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

    torch.library.register_autograd("chimera::dag_solve", _dag_solve_backward,
                                    setup_context=_dag_solve_setup_context)
    torch.library.register_autograd("chimera::spmm", _spmm_backward, setup_context=_spmm_setup_context)
    torch.library.register_autograd("chimera::edge_dot", _edge_dot_backward, setup_context=_setup_context)


def spmm(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    r"""CSR sparse times multi-head dense:
    ``out[i, h] = bias[i, h] + Σ_{e ∈ row i} weight[e, h] · x[col[e], h]``.

    Args:
        rowptr (Tensor): ``[R + 1]`` int32 or int64 row pointer.
        col (Tensor): ``[E]`` column of every entry, same dtype as ``rowptr``.
        weight (Tensor): ``[E, H]`` value of every entry per head.
        x (Tensor): ``[C, H, F]`` dense input.
        bias (Tensor, optional): ``[R, H, F]`` added to the product (fused). (default: :obj:`None`)

    :rtype: :class:`Tensor` of shape ``[R, H, F]``.
    """
    if HAS_EXTENSION:
        return torch.ops.chimera.spmm(rowptr, col, weight, x, bias)
    out = reference.spmm_reference(rowptr, col, weight, x)
    return out if bias is None else out + bias


def edge_dot(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r"""Per stored entry ``e = (i, j)`` of a CSR matrix: ``out[e, h] = <a[i, h], b[j, h]>``.

    :rtype: :class:`Tensor` of shape ``[E, H]``.
    """
    if HAS_EXTENSION:
        return torch.ops.chimera.edge_dot(rowptr, col, a, b)
    return reference.edge_dot_reference(rowptr, col, a, b)


def dag_solve(level_ptr: Tensor, order: Tensor, rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    r"""Solve :math:`(I - A) h = x` on a DAG, one topological level at a time.

    Args:
        level_ptr (LongTensor): ``[L + 1]`` boundaries of the levels in ``order``.
        order (LongTensor): ``[N]`` nodes sorted by level; every edge into a node of level ``l``
            must come from a node of an earlier level (checked on CPU).
        rowptr, col (Tensor): CSR of ``A`` by target (row ``i`` lists the parents of ``i``).
        weight (Tensor): ``[E, H]`` in CSR order.
        x (Tensor): ``[N, H, F]``.

    Differentiable in ``weight`` and ``x``; the backward is the transposed solve in reverse level
    order. Falls back to :class:`.reference.DagSolve` when the extension is not built.
    """
    if HAS_EXTENSION:
        return torch.ops.chimera.dag_solve(level_ptr, order, rowptr, col, weight, x)
    row = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=x.device), rowptr.diff().long(),
                                  output_size=col.numel())
    level = torch.empty_like(order)
    level[order] = torch.repeat_interleave(torch.arange(level_ptr.numel() - 1, device=x.device), level_ptr.diff())
    return reference.DagSolve.apply(torch.stack([col.long(), row]), level, weight, x)


class CsrOperator:
    r"""The sparse matrix ``A`` of an edge list, stored as CSR by target (for ``A x``) and by
    source (for ``Aᵀ x``) once, and applied with the ``chimera::spmm`` kernel. Same interface as
    :class:`.reference.EdgeListOperator`; weights stay in the caller's edge order."""

    def __init__(self, edge_index: Tensor, num_nodes: int):
        src, dst = edge_index[0].long(), edge_index[1].long()
        dst_sorted, self.perm = torch.sort(dst, stable=True)
        self.col = src[self.perm]
        self.rowptr = torch.searchsorted(dst_sorted, torch.arange(num_nodes + 1, device=dst.device))
        self.rowptr_t, self.col_t, perm_t = transpose_csr(self.rowptr, self.col, num_nodes)
        self.perm_t = self.perm[perm_t]

    def matmul(self, weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return spmm(self.rowptr, self.col, weight[self.perm], x, bias)

    def rmatmul(self, weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return spmm(self.rowptr_t, self.col_t, weight[self.perm_t], x, bias)

    def edge_dot(self, g: Tensor, h: Tensor) -> Tensor:
        per_entry = edge_dot(self.rowptr, self.col, g, h)
        return torch.empty_like(per_entry).index_copy_(0, self.perm, per_entry)
