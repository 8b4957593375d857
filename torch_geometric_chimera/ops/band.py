r"""``method="band"``: exact, by band LU (CPU, compiled extension).

Every graph's nodes are put in reverse Cuthill-McKee order (``chimera::band_order``, once per
topology, :func:`band_schedule`), which makes :math:`I - A` banded with a small bandwidth
:math:`b`; ``chimera::band_factor`` factors it without pivoting, and ``chimera::band_attention``
runs the two triangular solves with the attention's state contraction fused in. The backward
(``chimera::band_attention_backward``) is one adjoint solve, with
:math:`\partial A_{ij} = \langle G_i, H_j \rangle` at the edges (:class:`BandResolventAttention`).

Exact (to rounding) when :math:`I - A` is row diagonally dominant, where LU without pivoting is
safe; the dispatcher sends other weights to :mod:`.dense`. Cost per head: :math:`O(n b^2)` for the
factorization of a graph of :math:`n` nodes, :math:`O((n + \mathrm{nnz}(LU))\, S P)` for the
solves. The kernels are checked against :func:`.reference.band_solve_reference` (a dense solve
per graph).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._extension import HAS_EXTENSION
from .common import attention_setup_context, fake_attention_gradients, fake_attention_outputs, no_double_backward

if HAS_EXTENSION:

    @torch.library.register_fake("chimera::band_order")
    def _band_order_fake(node_ptr, nodes, rowptr, col):
        num_graphs = node_ptr.shape[0] - 1
        return [nodes.new_empty(nodes.shape), node_ptr.new_empty((num_graphs,)), node_ptr.new_empty((num_graphs,))]

    @torch.library.register_fake("chimera::band_factor")
    def _band_factor_fake(node_ptr, order, bandwidth, rowptr, col, weight, band_size):
        return weight.new_empty((band_size, weight.shape[1]))

    @torch.library.register_fake("chimera::band_solve")
    def _band_solve_fake(node_ptr, order, bandwidth, factors, x, transpose=False):
        return x.new_empty(x.shape)

    def _band_solve_setup_context(ctx, inputs, output):
        node_ptr, order, bandwidth, factors, _, transpose = inputs
        ctx.save_for_backward(node_ptr, order, bandwidth, factors)
        ctx.transpose = transpose

    def _band_solve_backward(ctx, grad_h):
        # h = M^{-1} x is linear in x: the gradient is the solve with M^T (and vice versa).
        node_ptr, order, bandwidth, factors = ctx.saved_tensors
        if ctx.needs_input_grad[3]:
            raise NotImplementedError("chimera::band_solve: no gradient with respect to the factors; differentiate "
                                      "through band_resolvent_attention, which gives the gradient of the edge weights")
        grad_x = torch.ops.chimera.band_solve(node_ptr, order, bandwidth, factors, grad_h.contiguous(),
                                              not ctx.transpose)
        return None, None, None, None, grad_x, None

    def _band_factor_backward(ctx, grad_factors):
        raise NotImplementedError("chimera::band_factor is not differentiable; use band_resolvent_attention, which "
                                  "differentiates the solve with respect to the edge weights")

    @torch.library.register_fake("chimera::band_attention")
    def _band_attention_fake(node_ptr, order, bandwidth, factors, query, key, value):
        return fake_attention_outputs(query, value)

    @torch.library.register_fake("chimera::band_attention_backward")
    def _band_attention_backward_fake(node_ptr, order, bandwidth, factors, query, key, value, state, grad_y,
                                      grad_state=None):
        return fake_attention_gradients(query, key, value, state)

    def _band_attention_backward(ctx, grads):
        grad_y, grad_state = grads  # an op returning Tensor[] gets its gradients as one list
        node_ptr, order, bandwidth, factors, query, key, value, state = ctx.saved_tensors
        if ctx.needs_input_grad[3]:
            raise NotImplementedError("chimera::band_attention: no gradient with respect to the factors; use "
                                      "band_resolvent_attention, which gives the gradient of the edge weights")
        if grad_y is None:
            grad_y = value.new_zeros(value.shape)
        grad_query, grad_key, grad_value, _ = torch.ops.chimera.band_attention_backward(
            node_ptr, order, bandwidth, factors, query, key, value, state, grad_y, grad_state)
        return None, None, None, None, grad_query, grad_key, grad_value

    torch.library.register_autograd("chimera::band_attention", _band_attention_backward,
                                    setup_context=attention_setup_context)
    torch.library.register_autograd("chimera::band_attention_backward", no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd("chimera::band_solve", _band_solve_backward,
                                    setup_context=_band_solve_setup_context)
    torch.library.register_autograd("chimera::band_factor", _band_factor_backward,
                                    setup_context=lambda ctx, inputs, output: None)


class BandSchedule(NamedTuple):
    """Banded layout of a batch of graphs: nodes ``order[node_ptr[g]:node_ptr[g+1]]`` of graph ``g``
    in reverse Cuthill-McKee order, its bandwidth ``bandwidth[g]``, the off-diagonal nonzeros of
    its LU factors ``factor_nnz[g]`` (fill included) and the total band storage ``band_size``."""
    node_ptr: Tensor
    order: Tensor
    bandwidth: Tensor
    factor_nnz: Tensor
    band_size: int


def band_schedule(edge_index: Tensor, num_nodes: int, batch: Optional[Tensor] = None) -> BandSchedule:
    """Reverse Cuthill-McKee order and bandwidth of every graph (``chimera::band_order``). Depends
    on the topology only; reads the band size on the host, so it is computed once and cached."""
    device = edge_index.device
    src, dst = edge_index.long()
    keep = src != dst
    sym_row = torch.cat([dst[keep], src[keep]])
    sym_col = torch.cat([src[keep], dst[keep]])
    sym_row, perm = torch.sort(sym_row, stable=True)
    sym_col = sym_col[perm]
    rowptr = torch.searchsorted(sym_row, torch.arange(num_nodes + 1, device=device))
    if batch is None:
        nodes = torch.arange(num_nodes, device=device)
        sizes = torch.tensor([num_nodes], device=device)
    else:
        nodes = torch.argsort(batch, stable=True)
        sizes = torch.bincount(batch, minlength=int(batch.max()) + 1 if num_nodes else 0)
    node_ptr = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    order, bandwidth, factor_nnz = torch.ops.chimera.band_order(node_ptr, nodes, rowptr, sym_col)
    band_size = int((sizes * (2 * bandwidth + 1)).sum())  # graph g stores n_g rows of 2 b_g + 1
    return BandSchedule(node_ptr, order, bandwidth, factor_nnz, band_size)


class BandResolventAttention(torch.autograd.Function):
    r""":math:`y = (L \odot QK^\top)V`, :math:`L = (I - A)^{-1}`, by band LU with the state
    contraction fused into the solves (``chimera::band_attention``). The backward runs
    ``chimera::band_attention_backward`` (one adjoint solve) and reads
    :math:`\partial A_{ij} = \langle G_i, H_j\rangle` at the edges."""

    @staticmethod
    def forward(ctx, schedule: BandSchedule, rowptr: Tensor, col: Tensor, weight: Tensor, query: Tensor,
                key: Tensor, value: Tensor) -> Tensor:
        s = schedule
        factors = torch.ops.chimera.band_factor(s.node_ptr, s.order, s.bandwidth, rowptr, col, weight, s.band_size)
        y, state = torch.ops.chimera.band_attention(s.node_ptr, s.order, s.bandwidth, factors, query, key, value)
        ctx.save_for_backward(rowptr, col, factors, query, key, value, state)
        ctx.schedule = schedule
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        rowptr, col, factors, query, key, value, state = ctx.saved_tensors
        s = ctx.schedule
        grad_query, grad_key, grad_value, g = torch.ops.chimera.band_attention_backward(
            s.node_ptr, s.order, s.bandwidth, factors, query, key, value, state, grad_y.contiguous())
        grad_weight = torch.ops.chimera.edge_dot(rowptr, col, g, state) if ctx.needs_input_grad[3] else None
        return None, None, None, grad_weight, grad_query, grad_key, grad_value


def band_resolvent_attention(schedule: BandSchedule, rowptr: Tensor, col: Tensor, weight: Tensor, query: Tensor,
                             key: Tensor, value: Tensor) -> Tensor:
    r"""Exact resolvent attention by band LU (see :class:`BandResolventAttention`): ``weight``
    ``[E, H]`` in the CSR order of ``(rowptr, col)``; ``query``, ``key`` ``[N, H, S]``, ``value``
    ``[N, H, P]``. float16 / bfloat16 run in float32. CPU only."""
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return band_resolvent_attention(schedule, rowptr, col, weight.float(), query.float(), key.float(),
                                        value.float()).to(dtype)
    return BandResolventAttention.apply(schedule, rowptr, col, weight, query.contiguous(), key.contiguous(),
                                        value.contiguous())
