r"""``method="line"``: exact, on unions of directed paths (sequences).

Every node has at most one parent and one child. All paths are laid end to end as one sequence
(:func:`line_order`; a path start gets the transition ``0``, which cuts the sequence there) and
computed like Mamba-2's SSD: quadratic attention inside chunks of ``Q = chunk_size`` tokens, and an
``S x P`` state passed from chunk to chunk.

Exact for edge weights of any sign (masked cumulative products: no logarithms or divisions).
Cost per head: :math:`O(N Q (S + P))` inside the chunks, :math:`O(N S P)` for the chunk states and
:math:`O((N / Q)^2 S P)` to pass them on. Pure PyTorch, differentiated by autograd.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..utils.topology import path_roots


def segment_product(w: Tensor) -> Tensor:
    r"""``out[..., t, s] = prod_{s < k <= t} w[..., k]`` for ``s <= t`` and ``0`` above the diagonal,
    by a masked cumulative product: no logarithms or divisions, so weights of any sign and exact
    zeros keep their exact values and gradients."""
    length = w.size(-1)
    expanded = w.unsqueeze(-1).expand(*w.shape, length)  # [..., k, s]
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=w.device), -1)
    out = torch.cumprod(expanded.masked_fill(~strictly_lower, 1), dim=-2)
    return torch.tril(out)


def line_order(edge_index: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor]:
    """For a union of directed paths: the node order that lays every path out contiguously from
    its start, and for every position the edge entering that node (``-1`` at a path start)."""
    root, depth, _ = path_roots(edge_index, num_nodes)
    dst = edge_index[1]
    incoming = torch.full((num_nodes,), -1, dtype=torch.long, device=edge_index.device)
    incoming[dst] = torch.arange(dst.numel(), device=edge_index.device)
    order = torch.argsort(root * num_nodes + depth)
    return order, incoming[order]


def line_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                             chunk_size: int = 64, order: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    r"""Exact resolvent attention on a union of directed paths (every node has at most one
    parent and one child), computed like Mamba-2's SSD: quadratic attention inside chunks of
    ``chunk_size`` tokens, and a ``S x P`` state passed between chunks. All paths are laid end to
    end as one sequence; a path start gets the transition ``0``, which cuts the sequence there.
    Edge weights may have any sign. ``order``: :func:`line_order` of the topology, if known."""
    num_nodes, heads = query.shape[:2]
    order, incoming = line_order(edge_index, num_nodes) if order is None else order
    # A path start has no incoming edge: transition 0, which cuts the sequence there.
    padded = torch.cat([edge_weight, edge_weight.new_zeros(1, heads)])
    w = padded[torch.where(incoming >= 0, incoming, edge_weight.size(0))]  # [T, H]

    chunks = -(-num_nodes // chunk_size)
    pad = chunks * chunk_size - num_nodes

    def chunked(t: Tensor) -> Tensor:  # [T, H, F] -> [chunks, H, Q, F], zero padded
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad))
        return t.view(chunks, chunk_size, *t.shape[1:]).transpose(1, 2)

    q, k, v = chunked(query[order]), chunked(key[order]), chunked(value[order])
    a = chunked(w.unsqueeze(-1)).squeeze(-1)  # [c, H, Q] transition into every token

    # 1. Inside every chunk: y = (L ⊙ C Bᵀ) x with L[t, s] = prod_{s<k<=t} w_k.
    within = segment_product(a)  # [c, H, Q, Q]
    y = (within * (q @ k.transpose(-1, -2))) @ v
    # 2. Each chunk's final state from its own tokens: sum_s (prod_{s<k<=last} w_k) B_s x_sᵀ.
    chunk_states = torch.einsum("chq,chqs,chqp->chsp", within[..., -1, :], k, v)
    # 3. Full state after every chunk: F_i = sum_{j<=i} (prod of the chunks j+1..i) chunk_state_j.
    across = segment_product(a.prod(-1).t())  # [H, c, c]
    after = torch.einsum("hij,jhsp->ihsp", across, chunk_states)
    entering = torch.cat([torch.zeros_like(after[:1]), after[:-1]])
    # 4. Its contribution inside the next chunk: C_tᵀ (prod_{first<=k<=t} w_k) F_{i-1}.
    from_start = torch.cumprod(a, -1)  # [c, H, Q]
    y = y + from_start.unsqueeze(-1) * (q @ entering)

    y = y.transpose(1, 2).reshape(chunks * chunk_size, heads, -1)[:num_nodes]
    return torch.empty_like(y).index_copy(0, order, y)
