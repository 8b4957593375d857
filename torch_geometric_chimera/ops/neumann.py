r"""``method="neumann"``: the truncated series :math:`L = \sum_{k \le K_g} A^k`.

Every graph ``g`` has its own number of terms :math:`K_g` (by default its
:func:`~torch_geometric_chimera.utils.diameter_bound`, with which the series is exact on a DAG,
where :math:`A^{K+1} = 0`; elsewhere a truncation of the resolvent). :class:`CheckpointedNeumann`
runs it in Horner form, :math:`H \leftarrow X + A H`, with a checkpoint every
:math:`\sqrt{K}` steps, and its backward recomputes the states between checkpoints.

Cost per head: :math:`O(K E S P)` forward (one sparse product per term, with the :mod:`.common`
operators) and about three times that backward (the recomputed state, the adjoint product and the
edge gradient of every term), and :math:`O(\sqrt{K})` states of memory.
:func:`neumann_solve` is the readable reference (the unrolled series, differentiated by autograd).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor


def neumann_solve(operator, weight: Tensor, x: Tensor, num_terms: Tensor,
                  node_graph: Optional[Tensor] = None) -> Tensor:
    r""":math:`\sum_{k=0}^{K_g} A^k X` where ``K_g = num_terms[graph]`` for every node's graph.

    ``operator`` applies ``A`` (:class:`~.common.EdgeListOperator` or a kernel-backed one). Differentiated
    by autograd through the unrolled series.
    """
    terms = num_terms if node_graph is None else num_terms[node_graph]
    terms = terms.view(-1, 1, 1) if terms.dim() else terms
    max_terms = int(num_terms.max()) if num_terms.numel() else 0
    out, power = x, x
    for k in range(1, max_terms + 1):
        power = operator.matmul(weight, power)
        out = out + power * (terms >= k).to(power.dtype)
    return out


class CheckpointedNeumann(torch.autograd.Function):
    r""":math:`\sum_{k=0}^{K_g} A^k X` in Horner form, :math:`H \leftarrow X + A H` applied
    ``max K`` times (a node of a graph with fewer terms waits until the last ``K_g`` steps), with a
    backward that recomputes the states from checkpoints every ``segment`` steps: memory
    :math:`O(K / \text{segment} + \text{segment})` states instead of :math:`O(K)`.
    Same math as :func:`neumann_solve`, which differentiates the unrolled series by autograd."""

    @staticmethod
    def forward(ctx, operator, weight: Tensor, x: Tensor, first_step: Tensor, all_active_from: int,
                num_steps: int, segment: int) -> Tensor:
        checkpoints = []
        h = x
        for t in range(num_steps):
            if t % segment == 0:
                checkpoints.append(h)
            h = CheckpointedNeumann._step(operator, weight, x, h, first_step, t, all_active_from)
        ctx.save_for_backward(weight, x, first_step, *checkpoints)
        ctx.operator, ctx.num_steps, ctx.segment = operator, num_steps, segment
        ctx.all_active_from = all_active_from
        return h

    @staticmethod
    def _active(first_step: Tensor, t: int, like: Tensor) -> Tensor:
        return (first_step <= t).to(like.dtype)

    @staticmethod
    def _step(operator, weight, x, h, first_step, t, all_active_from):
        if t >= all_active_from:  # every graph active: the plain Horner step
            return operator.matmul(weight, h, x)
        active = CheckpointedNeumann._active(first_step, t, h)
        return h + active * (x + operator.matmul(weight, h) - h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: Tensor):
        weight, x, first_step, *checkpoints = ctx.saved_tensors
        operator, segment = ctx.operator, ctx.segment
        g = grad_h.contiguous()
        grad_x = torch.zeros_like(x)
        grad_weight = torch.zeros_like(weight)
        for index in reversed(range(len(checkpoints))):
            start, stop = index * segment, min((index + 1) * segment, ctx.num_steps)
            states = [checkpoints[index]]  # states[t - start] is H before step t
            for t in range(start, stop - 1):
                states.append(CheckpointedNeumann._step(operator, weight, x, states[-1], first_step, t,
                                                        ctx.all_active_from))
            for t in reversed(range(start, stop)):
                all_active = t >= ctx.all_active_from
                active_g = g if all_active else CheckpointedNeumann._active(first_step, t, g) * g
                grad_x += active_g
                grad_weight += operator.edge_dot(active_g, states[t - start])
                g = operator.rmatmul(weight, g) if all_active else g - active_g + operator.rmatmul(weight, active_g)
        return None, grad_weight, grad_x + g, None, None, None, None


class NeumannSchedule(NamedTuple):
    """When every node joins the Horner recursion: node ``i`` from step ``first_step[i]`` on."""
    first_step: Tensor
    max_terms: int
    all_active_from: int

    @property
    def segment(self) -> int:  # checkpoint every sqrt(K) steps
        return max(1, int(self.max_terms ** 0.5))


def neumann_schedule(num_terms: Tensor, node_graph: Optional[Tensor] = None) -> NeumannSchedule:
    """Per-graph term counts -> per-node first Horner step. Reads two values on the host, so it
    depends on the topology only and is cached with it."""
    terms = num_terms if node_graph is None else num_terms[node_graph]
    max_terms = int(num_terms.max()) if num_terms.numel() else 0
    first_step = (max_terms - terms).view(-1, 1, 1) if terms.dim() else (max_terms - terms).view(1, 1, 1)
    all_active_from = int(first_step.max()) if first_step.numel() else 0
    return NeumannSchedule(first_step, max_terms, all_active_from)


def checkpointed_neumann(operator, weight: Tensor, x: Tensor, num_terms, node_graph: Optional[Tensor] = None
                         ) -> Tensor:
    """:func:`neumann_solve` with memory that grows as the square root of the number of terms.
    ``num_terms``: an int (every node), a per-graph tensor, or a :class:`NeumannSchedule`."""
    if isinstance(num_terms, int):
        schedule = NeumannSchedule(x.new_zeros((1, 1, 1), dtype=torch.long), num_terms, 0)
    elif isinstance(num_terms, NeumannSchedule):
        schedule = num_terms
    else:
        schedule = neumann_schedule(num_terms, node_graph)
    return CheckpointedNeumann.apply(operator, weight, x, schedule.first_step, schedule.all_active_from,
                                     schedule.max_terms, schedule.segment)


