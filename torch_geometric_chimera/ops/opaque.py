r"""Resolvent attention as one opaque custom op, for :func:`torch.compile`.

:func:`~.resolvent.resolvent_attention` reads values on the host (input checks, graph sizes, the
cost model of ``method="auto"``), keeps a Python-side cache (:meth:`~.resolvent.GraphTopology.get`,
keyed by the tensors' identity and version counters) and runs loops whose length depends on the
graph (size buckets, levels). Dynamo cannot trace that: every host read is a graph break, and every
cached attribute or loop length becomes a guard that fails on the next batch of other sizes (issue
9 counted 30 breaks and about 40 recompilations over 10 batches). A ``torch.compiler.disable``'d
call would be one break, but a break inside a module called by another module breaks every frame
above it as well (an LRGB model calls a GPS layer that calls ``ChimeraConv``: five breaks per layer).

:func:`opaque_resolvent_attention` puts all of it behind one custom op,
``chimera::resolvent_attention``, whose fake kernel only states the output shape ``[N, H, P]``.
The compiled graph holds one node for the mixer, with no graph break and no guard on the topology;
at run time the op calls :func:`~.resolvent.resolvent_attention` eagerly. It receives the graph's
input tensors themselves (for ``edge_index`` and ``batch`` passed straight from the inputs), so the
topology cache sees the same tensors as in eager mode and is shared by the layers of a model.

**Gradients.** The op records no autograd graph. Its backward, ``chimera::resolvent_attention_backward``,
runs the forward again with autograd and differentiates it, as activation checkpointing does:
the gradients of eager mode, the inputs as the only memory kept between forward and backward,
and one more forward per backward. No double backward.

**CUDA graphs.** Both ops are tagged ``cudagraph_unsafe``: what they compute depends on the values
of ``edge_index`` and ``batch`` through host-side caches, which a replayed CUDA graph would not
read again, so a replay on another graph of the same sizes would reuse the old topology. Inductor
(``mode="reduce-overhead"``, with its default graph partitioning) captures the rest of the layer
and runs these two ops between the captured partitions.
"""
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from .resolvent import resolvent_attention

_NOT_IN_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("chimera::resolvent_attention", mutates_args=(), tags=_NOT_IN_CUDA_GRAPHS)
def _resolvent_attention_op(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                            batch: Optional[Tensor], method: str, num_terms: Optional[int], tol: Optional[float],
                            max_iter: int, gamma: Optional[float] = None) -> Tensor:
    # contiguous: the fake kernel promises a contiguous output, and Inductor relies on the strides.
    return resolvent_attention(query, key, value, edge_index, edge_weight, method=method, num_terms=num_terms,
                               batch=batch, tol=tol, max_iter=max_iter, gamma=gamma).contiguous()


@_resolvent_attention_op.register_fake
def _resolvent_attention_fake(query, key, value, edge_index, edge_weight, batch, method, num_terms, tol, max_iter,
                              gamma=None):
    return value.new_empty(value.shape)


@contextmanager
def _autograd_recording() -> Iterator[None]:
    """Records autograd inside a custom op's kernel, where the dispatcher has excluded the autograd
    keys for the thread (``torch.enable_grad`` alone records nothing there). torch's own
    ``invoke_leaf_function`` re-enables them the same way."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor)
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    for k in keys:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for k, was in zip(keys, excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, was)


@torch.library.custom_op("chimera::resolvent_attention_backward", mutates_args=(), tags=_NOT_IN_CUDA_GRAPHS)
def _resolvent_attention_backward_op(grad_y: Tensor, query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor,
                                     edge_weight: Tensor, batch: Optional[Tensor], method: str,
                                     num_terms: Optional[int], tol: Optional[float], max_iter: int,
                                     gamma: Optional[float], needs_grad: List[bool]) -> List[Tensor]:
    """Gradients of (query, key, value, edge_weight); an empty tensor where ``needs_grad`` is False."""
    differentiable = [query, key, value, edge_weight]
    with _autograd_recording():
        inputs = [t.detach().requires_grad_(need) for t, need in zip(differentiable, needs_grad)]
        y = resolvent_attention(inputs[0], inputs[1], inputs[2], edge_index, inputs[3], method=method,
                                num_terms=num_terms, batch=batch, tol=tol, max_iter=max_iter, gamma=gamma)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True) if wanted and y.requires_grad
                     else [None] * len(wanted))
    out = []
    for t, need in zip(differentiable, needs_grad):
        grad = next(grads) if need else None
        if not need:
            out.append(t.new_empty(0))
        elif grad is None:  # the output does not depend on it (e.g. an empty graph)
            out.append(torch.zeros(t.shape, dtype=t.dtype, device=t.device))
        else:
            out.append(grad.contiguous())
    return out


@_resolvent_attention_backward_op.register_fake
def _resolvent_attention_backward_fake(grad_y, query, key, value, edge_index, edge_weight, batch, method, num_terms,
                                       tol, max_iter, gamma, needs_grad):
    return [t.new_empty(t.shape if need else (0,)) for t, need in zip((query, key, value, edge_weight), needs_grad)]


_DIFFERENTIABLE = (0, 1, 2, 4)  # query, key, value, edge_weight among the op's arguments


def _setup_context(ctx, inputs, output):
    query, key, value, edge_index, edge_weight, batch, *options = inputs
    ctx.save_for_backward(query, key, value, edge_index, edge_weight, batch)
    ctx.options = options


def _backward(ctx, grad_y):
    query, key, value, edge_index, edge_weight, batch = ctx.saved_tensors
    needs_grad = [ctx.needs_input_grad[i] for i in _DIFFERENTIABLE]
    if not any(needs_grad):
        return (None,) * len(ctx.needs_input_grad)
    grads = torch.ops.chimera.resolvent_attention_backward(grad_y, query, key, value, edge_index, edge_weight, batch,
                                                           *ctx.options, needs_grad)
    out = [None] * len(ctx.needs_input_grad)
    for position, grad, need in zip(_DIFFERENTIABLE, grads, needs_grad):
        out[position] = grad if need else None
    return tuple(out)


_resolvent_attention_op.register_autograd(_backward, setup_context=_setup_context)


def opaque_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor, *,
                               method: str = "auto", num_terms: Optional[int] = None, batch: Optional[Tensor] = None,
                               tol: Optional[float] = None, max_iter: int = 1000,
                               gamma: Optional[float] = None) -> Tensor:
    r""":func:`~.resolvent.resolvent_attention` (same arguments and result, ``chunk_size`` and
    ``topology`` aside) as the single custom op ``chimera::resolvent_attention``, which
    :func:`torch.compile` keeps as one node of its graph (see the module docstring). Under a
    ``backward``, the forward runs once more. For eager code, call
    :func:`~.resolvent.resolvent_attention`: it keeps its autograd graph instead."""
    return torch.ops.chimera.resolvent_attention(query, key, value, edge_index, edge_weight, batch, method, num_terms,
                                                 tol, max_iter, gamma)
