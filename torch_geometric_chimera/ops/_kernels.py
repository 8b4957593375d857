r"""Registration of the compiled ``chimera::*`` ops: fake kernels, autograd formulas and typed
wrappers. The references they must equal live in :mod:`.reference`."""
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import reference



def carries_own_libstdcxx(path: str) -> bool:
    """Whether the shared object at ``path`` resolves ``std::ostream::operator<<(long)``
    (``_M_insert<long>``) to a copy of libstdc++ linked into itself instead of ``libstdc++.so``.
    Such a build crashes at the first error message it formats (its iostream copy is never
    initialized); ``setup.py`` refuses to build one, this catches one built elsewhere. Linux only."""
    import ctypes
    import os
    import sys

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    if not sys.platform.startswith("linux"):
        return False
    try:
        # dlsym on this handle searches the object first, then its dependencies (libstdc++.so).
        symbol = ctypes.CDLL(path)._ZNSo9_M_insertIlEERSoT_
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return False
    info = DlInfo()
    if not dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return False
    return os.path.realpath(info.dli_fname.decode()) == os.path.realpath(path)


try:
    from .. import _C  # noqa: F401  (importing runs TORCH_LIBRARY registration)
    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    HAS_EXTENSION = False
    EXTENSION_ERROR = error
    warnings.warn(f"torch_geometric_chimera._C is not built ({error}); falling back to the pure-PyTorch "
                  f"references. Reinstall with `pip install --no-build-isolation .`.")

if HAS_EXTENSION and carries_own_libstdcxx(_C.__file__):  # pragma: no cover - only on a broken toolchain
    warnings.warn(f"{_C.__file__} carries its own copy of libstdc++ (its compiler linked it statically): any "
                  f"error raised by the compiled kernels will crash the process (a segmentation fault) or lose its "
                  f"message instead of raising a clean RuntimeError. Rebuild with the system compiler: CC=/usr/bin/gcc CXX=/usr/bin/g++ "
                  f"LDSHARED=\"/usr/bin/g++ -shared\" LDCXXSHARED=\"/usr/bin/g++ -shared\" pip install "
                  f"--no-build-isolation .", RuntimeWarning)


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

    def _attention_outputs(query, value):  # (y [N, H, P], state [N, H, S * P])
        num_nodes, heads, state_dim = query.shape
        return [value.new_empty(value.shape), query.new_empty((num_nodes, heads, state_dim * value.shape[2]))]

    def _attention_gradients(query, key, value, state):  # (dq, dk, dv, g)
        return [query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
                state.new_empty(state.shape)]

    @torch.library.register_fake("chimera::band_attention")
    def _band_attention_fake(node_ptr, order, bandwidth, factors, query, key, value):
        return _attention_outputs(query, value)

    @torch.library.register_fake("chimera::band_attention_backward")
    def _band_attention_backward_fake(node_ptr, order, bandwidth, factors, query, key, value, state, grad_y,
                                      grad_state=None):
        return _attention_gradients(query, key, value, state)

    def _band_attention_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        # The state is rarely used downstream: let its gradient arrive as None rather than a
        # zero-filled [N, H, S * P] tensor that the kernel would then read through.
        ctx.set_materialize_grads(False)

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

    def _band_attention_backward_backward(ctx, *grads):
        raise NotImplementedError("chimera::band_attention_backward / dag_attention_backward: double backward is "
                                  "not supported")

    @torch.library.register_fake("chimera::dag_attention")
    def _dag_attention_fake(level_ptr, order, rowptr, col, weight, query, key, value):
        return _attention_outputs(query, value)

    @torch.library.register_fake("chimera::dag_attention_backward")
    def _dag_attention_backward_fake(level_ptr, order, rowptr_t, col_t, weight_t, query, key, value, state, grad_y,
                                     grad_state=None):
        return _attention_gradients(query, key, value, state)

    def _dag_attention_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        # The state is rarely used downstream: let its gradient arrive as None rather than a
        # zero-filled [N, H, S * P] tensor that the kernel would then read through.
        ctx.set_materialize_grads(False)

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
                                    setup_context=_dag_attention_setup_context)
    torch.library.register_autograd("chimera::dag_attention_backward", _band_attention_backward_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd("chimera::band_attention", _band_attention_backward,
                                    setup_context=_band_attention_setup_context)
    torch.library.register_autograd("chimera::band_attention_backward", _band_attention_backward_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd("chimera::band_solve", _band_solve_backward,
                                    setup_context=_band_solve_setup_context)
    torch.library.register_autograd("chimera::band_factor", _band_factor_backward,
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd("chimera::dag_solve", _dag_solve_backward,
                                    setup_context=_dag_solve_setup_context)
    torch.library.register_autograd("chimera::spmm", _spmm_backward, setup_context=_spmm_setup_context)
    torch.library.register_autograd("chimera::edge_dot", _edge_dot_backward, setup_context=_setup_context)


def spmm(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    r"""CSR sparse times multi-head dense:
    ``out[i, h] = bias[i, h] + Σ_{e ∈ row i} weight[e, h] · x[col[e], h]``.

    Args:
        rowptr (Tensor): ``[R + 1]`` int32 or int64 row pointer: starts at 0, never decreases,
            ends at ``E``.
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
        level_ptr (LongTensor): ``[L + 1]`` boundaries of the levels in ``order``, from 0 to ``N``.
        order (LongTensor): ``[N]`` a permutation of the nodes sorted by level; every edge into a
            node of level ``l`` must come from a node of an earlier level.
        rowptr, col (Tensor): CSR of ``A`` by target (row ``i`` lists the parents of ``i``).
        weight (Tensor): ``[E, H]`` in CSR order.
        x (Tensor): ``[N, H, F]``.

    Differentiable in ``weight`` and ``x``; the backward is the transposed solve in reverse level
    order. Falls back to :class:`.reference.DagSolve` when the extension is not built.

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
    return reference.DagSolve.apply(torch.stack([col.long(), row]), level, weight, x)


def dag_attention(level_ptr: Tensor, order: Tensor, rowptr: Tensor, col: Tensor, weight: Tensor, query: Tensor,
                  key: Tensor, value: Tensor) -> Tensor:
    r"""Resolvent attention on a DAG, :math:`y_i = Q_i^\top H_i` with :math:`H = (I - A)^{-1} X`,
    :math:`X_j = K_j V_j^\top`, by levels with the state contraction fused in
    (``chimera::dag_attention``, CPU). Differentiable in ``weight`` (CSR order), query, key and
    value; float16 / bfloat16 run in float32. The reference is :func:`dag_solve` on
    :func:`.reference.to_state` followed by :func:`.reference.read_state`."""
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return dag_attention(level_ptr, order, rowptr, col, weight.float(), query.float(), key.float(),
                             value.float()).to(dtype)
    return torch.ops.chimera.dag_attention(level_ptr, order, rowptr, col, weight, query, key, value)[0]


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
