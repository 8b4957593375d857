r"""What every method shares.

* The state form: ``X_j = K_j V_jᵀ`` (:func:`to_state`, an ``S x P`` state per node) and
  ``y_i = Q_iᵀ H_i`` (:func:`read_state`); the sparse methods solve for ``H = L X``.
* The sparse matrix ``A`` of an edge list as an operator (``matmul`` ``A x``, ``rmatmul`` ``Aᵀ x``,
  ``edge_dot`` the gradient of ``A`` at the edges): :class:`EdgeListOperator` in pure PyTorch,
  :class:`CsrOperator` on the ``chimera::spmm`` / ``chimera::edge_dot`` kernels. Both cost
  ``O(E F)`` per product.
* Those two kernels: their pure-PyTorch references (also the fallback without the extension),
  fake kernels, autograd formulas and typed wrappers :func:`spmm` and :func:`edge_dot`; and the
  fake-kernel helpers of the fused attention ops of :mod:`.band` and :mod:`.dag`.
* :func:`host_reads_allowed`: when a value may be read on the host without a synchronization.
"""
from typing import Optional

import torch
import torch_geometric
from torch import Tensor

from ._extension import HAS_EXTENSION, transpose_csr


def host_reads_allowed(t: Tensor) -> bool:
    """Whether a value of ``t`` may be read on the host: always on CPU (there is no device to wait
    for); on an accelerator only under ``torch_geometric.debug()``, since it would synchronize."""
    return t.device.type == "cpu" or torch_geometric.is_debug_enabled()


# --------------------------------------------------------------------------------------------
# State form helpers.
# --------------------------------------------------------------------------------------------
class StateOuter(torch.autograd.Function):
    r""":math:`X_j = K_j V_j^\top`. Autograd of a broadcast product would build two more
    ``[N, H, S, P]`` products in the backward and sum them; here both gradients are batched
    matrix-vector products that read the incoming gradient once."""

    @staticmethod
    def forward(ctx, key: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(key, value)
        return key.unsqueeze(-1) * value.unsqueeze(-2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        key, value = ctx.saved_tensors
        grad_key = (grad @ value.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[0] else None
        grad_value = (key.unsqueeze(-2) @ grad).squeeze(-2) if ctx.needs_input_grad[1] else None
        return grad_key, grad_value


def to_state(key: Tensor, value: Tensor) -> Tensor:
    """``X_j = K_j V_jᵀ`` flattened to ``[N, H, S * P]``."""
    return StateOuter.apply(key, value).flatten(2)


def read_state(query: Tensor, state: Tensor, head_dim: int) -> Tensor:
    """``y_i = Q_iᵀ H_i`` for a flattened state ``[N, H, S * P]``."""
    return torch.einsum("nhs,nhsp->nhp", query, state.unflatten(-1, (query.size(-1), head_dim)))


# --------------------------------------------------------------------------------------------
# Sparse building blocks (the kernels in csrc/ compute exactly these).
# --------------------------------------------------------------------------------------------
def spmm_reference(rowptr: Tensor, col: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    r"""``out[i, h] = sum_{e in row i} weight[e, h] * x[col[e], h]`` for a CSR matrix."""
    num_rows = rowptr.numel() - 1
    row = torch.repeat_interleave(torch.arange(num_rows, device=x.device), rowptr.diff().long(),
                                  output_size=col.numel())
    out = x.new_zeros((num_rows,) + x.shape[1:])
    return out.index_add(0, row, weight.unsqueeze(-1) * x[col.long()])


def edge_dot_reference(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r"""``out[e, h] = <a[row(e), h], b[col[e], h]>`` for every stored entry of a CSR matrix."""
    row = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=a.device), rowptr.diff().long(),
                                  output_size=col.numel())
    return (a[row] * b[col.long()]).sum(-1)


class EdgeListOperator:
    r"""The sparse matrix ``A`` (one per head) of an edge list, applied with ``index_add``.

    ``matmul``: ``(A x)[i] = sum_{e: dst[e] = i} weight[e] * x[src[e]]``;
    ``rmatmul``: ``Aᵀ x``; ``edge_dot``: ``<g[dst[e]], h[src[e]]>``, the gradient of ``A`` at
    every edge for ``∂L/∂(A h) = g``. ``x``, ``g`` and ``h`` have shape ``[N, H, F]``.
    """

    def __init__(self, edge_index: Tensor):
        self.src, self.dst = edge_index[0].long(), edge_index[1].long()

    def matmul(self, weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        out = torch.zeros_like(x) if bias is None else bias.clone()
        return out.index_add(0, self.dst, weight.unsqueeze(-1) * x[self.src])

    def rmatmul(self, weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        out = torch.zeros_like(x) if bias is None else bias.clone()
        return out.index_add(0, self.src, weight.unsqueeze(-1) * x[self.dst])

    def edge_dot(self, g: Tensor, h: Tensor) -> Tensor:
        return (g[self.dst] * h[self.src]).sum(-1)


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

    torch.library.register_autograd("chimera::spmm", _spmm_backward, setup_context=_spmm_setup_context)
    torch.library.register_autograd("chimera::edge_dot", _edge_dot_backward, setup_context=_setup_context)


# Shared by the fused attention ops (chimera::band_attention, chimera::dag_attention and their
# backward ops), which return the same shapes: fake kernels and autograd pieces.
def fake_attention_outputs(query, value):  # (y [N, H, P], state [N, H, S * P])
    num_nodes, heads, state_dim = query.shape
    return [value.new_empty(value.shape), query.new_empty((num_nodes, heads, state_dim * value.shape[2]))]


def fake_attention_gradients(query, key, value, state):  # (dq, dk, dv, g)
    return [query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            state.new_empty(state.shape)]


def attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    # The state is rarely used downstream: let its gradient arrive as None rather than a
    # zero-filled [N, H, S * P] tensor that the kernel would then read through.
    ctx.set_materialize_grads(False)


def no_double_backward(ctx, *grads):
    raise NotImplementedError("chimera::band_attention_backward / dag_attention_backward: double backward is "
                              "not supported")


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
    out = spmm_reference(rowptr, col, weight, x)
    return out if bias is None else out + bias


def edge_dot(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r"""Per stored entry ``e = (i, j)`` of a CSR matrix: ``out[e, h] = <a[i, h], b[j, h]>``.

    :rtype: :class:`Tensor` of shape ``[E, H]``.
    """
    if HAS_EXTENSION:
        return torch.ops.chimera.edge_dot(rowptr, col, a, b)
    return edge_dot_reference(rowptr, col, a, b)


class CsrOperator:
    r"""The sparse matrix ``A`` of an edge list, stored as CSR by target (for ``A x``) and by
    source (for ``Aᵀ x``) once, and applied with the ``chimera::spmm`` kernel. Same interface as
    :class:`EdgeListOperator`; weights stay in the caller's edge order."""

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


def _describe(t: Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_attention_shapes(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                           batch: Optional[Tensor]) -> Tensor:
    """Types, shapes, dtypes and devices of resolvent attention's inputs (no value is read), for
    every public entry point; returns ``edge_weight`` as ``[E, H]`` (an ``[E]`` one is shared by the heads)."""
    for name, t in (("query", query), ("key", key), ("value", value), ("edge_index", edge_index),
                    ("edge_weight", edge_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 3 or not query.is_floating_point():
        raise ValueError(f"query: expected a floating tensor of shape [N, H, S], got {_describe(query)}")
    num_nodes, heads, _ = query.shape
    if key.shape != query.shape:
        raise ValueError(f"key: expected shape {list(query.shape)} (like query), got {list(key.shape)}")
    if value.dim() != 3 or value.shape[:2] != query.shape[:2]:
        raise ValueError(f"value: expected shape [N, H, P] = [{num_nodes}, {heads}, P], got {list(value.shape)}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"edge_index: expected an integer tensor of shape [2, E] (int32 or int64), "
                         f"got {_describe(edge_index)}")
    num_edges = edge_index.size(1)
    if edge_weight.dim() == 1 and edge_weight.numel() == num_edges:
        edge_weight = edge_weight.unsqueeze(-1).expand(num_edges, heads)
    if edge_weight.shape != (num_edges, heads):
        raise ValueError(f"edge_weight: expected shape [E, H] = [{num_edges}, {heads}] (or [E]), "
                         f"got {list(edge_weight.shape)}")
    for name, t in (("key", key), ("value", value), ("edge_weight", edge_weight)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name}: expected dtype {query.dtype} (like query), got {t.dtype}")
    tensors = [("key", key), ("value", value), ("edge_index", edge_index), ("edge_weight", edge_weight)]
    if batch is not None:
        if batch.dim() != 1 or batch.numel() != num_nodes or batch.is_floating_point():
            raise ValueError(f"batch: expected an integer tensor of shape [N] = [{num_nodes}], got {_describe(batch)}")
        tensors.append(("batch", batch))
    for name, t in tensors:
        if t.device != query.device:
            raise ValueError(f"{name}: expected device {query.device} (like query), got {t.device}")
    return edge_weight
