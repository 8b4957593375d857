r"""``method="line"``: exact, on unions of directed paths (sequences).

Every node has at most one parent and one child. Computed like Mamba-2's SSD: quadratic attention
inside chunks of at most ``Q = chunk_size`` tokens, and an ``S x P`` state passed from chunk to
chunk. Every path is cut into its own chunks (:func:`line_layout`): a chunk never holds two paths,
so no product, sum or matrix product ever combines values of two paths, and a NaN or an Inf in one
graph (its keys, values or edge weights) stays in that graph, as with the other methods. A path's
last chunk is padded to the next power of two (at most ``Q``), so the padding costs at most twice
the tokens whatever the path lengths; chunks of one size are solved together, one batched product
per size. The chunk states are passed on inside each path by a segmented scan (``ceil(log2 J)``
vectorized steps for paths of at most ``J`` full chunks), which selects (``torch.where``, index
gathers) rather than multiplies by zero at path boundaries.

Exact for edge weights of any sign (masked cumulative products: no logarithms or divisions).
Cost per head: :math:`O(N Q (S + P))` inside the chunks, :math:`O(N S P)` for the chunk states and
the states entering the chunks, :math:`O((N / Q) \log J\, S P)` to pass them on. Pure PyTorch,
differentiated by autograd. The layout depends on the topology and ``Q`` only and is kept on the
:class:`LineOrder` (reads on the host when first built, none afterwards).
"""
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

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


class LineLayout(NamedTuple):
    r"""Where every token of a union of paths sits in the chunks of :func:`line_resolvent_attention`.

    Chunks are grouped by size ``m`` (powers of two, and ``Q``), one group per entry of the lists,
    increasing; the full chunks (``m = Q``) are the last group.

    - ``nodes[c]``: ``[n_c, m_c]`` node of every position of every chunk, ``N`` at padding.
    - ``edges[c]``: ``[n_c, m_c]`` edge entering every position (from the previous token of the
      path), ``E`` at a path's first token and at padding (a zero weight).
    - ``entering[c]``: ``[n_c]`` index of the state entering every chunk among the ``K`` carried
      states, ``K`` (a zero state) for the first chunk of a path; :obj:`None` when every chunk of
      the group is the first of its path.
    - ``carried``: ``[K]`` position in the last group of every chunk whose final state is passed on
      (every chunk of a path but its last), path by path in path order.
    - ``steps``: per step of the segmented scan over the carried states, ``(partner, valid)``:
      ``partner[i] = i - 2^r`` where that is in the same path (``valid``), else ``i`` itself.
    - ``output``: ``[N]`` position of every node in the concatenated, flattened chunk outputs.
    """
    nodes: List[Tensor]
    edges: List[Tensor]
    entering: List[Tensor]
    carried: Tensor
    steps: List[Tuple[Tensor, Tensor]]
    output: Tensor


def line_layout(order: Tensor, incoming: Tensor, num_edges: int, chunk_size: int) -> LineLayout:
    """The :class:`LineLayout` of the paths laid out by ``order`` (every path contiguous, from its
    start) with ``incoming`` the edge entering every position (``-1`` at a path start), for chunks
    of at most ``chunk_size`` tokens. Vectorized; reads the sizes on the host (a handful of reads)."""
    device = order.device
    num_nodes = order.numel()
    chunk = chunk_size
    position = torch.arange(num_nodes, device=device)
    starts = incoming < 0
    first = torch.cummax(torch.where(starts, position, 0), 0).values  # first position of the path
    depth = position - first
    path = torch.cumsum(starts, 0) - 1
    length = torch.bincount(path)[path]  # length of the path of every position
    offset = depth % chunk  # position inside its chunk
    chunk_heads = (offset == 0).nonzero().view(-1)  # first position of every chunk
    chunk_id = torch.cumsum(offset == 0, 0) - 1
    index_in_path = depth[chunk_heads] // chunk  # j: the chunk's place in its path
    chunk_length = (length[chunk_heads] - index_in_path * chunk).clamp(max=chunk)
    chunks_in_path = (length[chunk_heads] + chunk - 1) // chunk
    # Padded to the next power of two, at most Q (log2 of a power of two is exact in float64).
    size = torch.exp2(torch.ceil(torch.log2(chunk_length.double()))).long().clamp(max=chunk)
    sizes = torch.unique(size)
    group = torch.searchsorted(sizes, size)
    counts = torch.bincount(group, minlength=sizes.numel())
    by_group = torch.argsort(group, stable=True)
    group_first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[by_group] = torch.arange(group.numel(), device=device) - group_first[group[by_group]]
    group_base = torch.cumsum(counts * sizes, 0) - counts * sizes  # offset of each group, flattened
    flat = group_base[group] + slot * sizes[group]  # flat offset of every chunk
    token_flat = flat[chunk_id] + offset  # flat position of every token (in path order)
    total = int((counts * sizes).sum())
    node_flat = torch.full((total,), num_nodes, dtype=torch.long, device=device)
    node_flat[token_flat] = order
    edge_flat = torch.full((total,), num_edges, dtype=torch.long, device=device)
    edge_flat[token_flat] = torch.where(starts, num_edges, incoming)
    output = torch.empty_like(order)
    output[order] = token_flat

    # The carried states: every chunk of a path but its last (all of them full, in the last group).
    is_carried = index_in_path < chunks_in_path - 1
    carried_id = torch.cumsum(is_carried, 0) - 1
    num_carried = int(is_carried.sum())
    previous = torch.cat([carried_id.new_full((1,), num_carried), carried_id[:-1]])
    entering_flat = torch.where(index_in_path > 0, previous, num_carried)  # chunk i - 1 is of the same path
    entering_sorted = torch.empty_like(entering_flat)
    entering_sorted[group_first[group] + slot] = entering_flat
    carried = slot[is_carried]
    place = index_in_path[is_carried]  # the carried state's place in its path
    steps, step = [], 1
    longest = int(place.max()) if num_carried else 0
    ids = torch.arange(num_carried, device=device)
    while step <= longest:
        valid = place >= step
        steps.append((torch.where(valid, ids - step, ids), valid))
        step *= 2

    split = [int(n) * int(m) for n, m in zip(counts.tolist(), sizes.tolist())]
    nodes = [t.view(-1, m) for t, m in zip(node_flat.split(split), sizes.tolist())]
    edges = [t.view(-1, m) for t, m in zip(edge_flat.split(split), sizes.tolist())]
    # A group none of whose chunks continues a path needs no entering state (None).
    entering = [e if bool((e < num_carried).any()) else None for e in entering_sorted.split(counts.tolist())]
    return LineLayout(nodes, edges, entering, carried, steps, output)


class LineOrder:
    """The node order that lays every path of a union of directed paths out contiguously from its
    start (``order``) and, for every position, the edge entering that node (``incoming``, ``-1`` at
    a path start); iterates as ``(order, incoming)``. Keeps the :func:`line_layout` of every chunk
    size asked for (:meth:`layout`), so that only the first call reads the host."""

    def __init__(self, order: Tensor, incoming: Tensor):
        self.order, self.incoming = order, incoming
        self._layouts: Dict[Tuple[int, int], LineLayout] = {}

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.order, self.incoming))

    def layout(self, chunk_size: int, num_edges: int) -> LineLayout:
        key = (chunk_size, num_edges)
        if key not in self._layouts:
            self._layouts[key] = line_layout(self.order, self.incoming, num_edges, chunk_size)
        return self._layouts[key]


def line_order(edge_index: Tensor, num_nodes: int) -> LineOrder:
    """For a union of directed paths: the node order that lays every path out contiguously from
    its start, and for every position the edge entering that node (``-1`` at a path start)."""
    root, depth, _ = path_roots(edge_index, num_nodes)
    dst = edge_index[1]
    incoming = torch.full((num_nodes,), -1, dtype=torch.long, device=edge_index.device)
    incoming[dst] = torch.arange(dst.numel(), device=edge_index.device)
    order = torch.argsort(root * num_nodes + depth)
    return LineOrder(order, incoming[order])


def _take(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` as an ``index_select``: its backward is an ``index_add`` where advanced indexing's
    is a sorting ``index_put`` with accumulation (a fifth of the line path's time on one long sequence)."""
    return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])


def line_resolvent_attention(query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, edge_weight: Tensor,
                             chunk_size: int = 64, order: Optional[Union[LineOrder, Tuple[Tensor, Tensor]]] = None
                             ) -> Tensor:
    r"""Exact resolvent attention on a union of directed paths (every node has at most one
    parent and one child), computed like Mamba-2's SSD: quadratic attention inside chunks of at
    most ``chunk_size`` tokens of one path each, and a ``S x P`` state passed between the chunks of
    a path (module docstring). Paths never meet in any arithmetic: a NaN or an Inf stays in its
    path. Edge weights may have any sign. ``order``: :func:`line_order` of the topology, if known
    (its layout is then kept for the next call)."""
    num_nodes, heads = query.shape[:2]
    if num_nodes == 0:
        return value.new_zeros(value.shape)
    if order is None:
        order = line_order(edge_index, num_nodes)
    layout = (order.layout(chunk_size, edge_index.size(1)) if isinstance(order, LineOrder)
              else line_layout(*order, edge_index.size(1), chunk_size))

    def padded(t: Tensor) -> Tensor:  # one zero row at the end, read by padding (index N, or E)
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])])

    query_, key_, value_, weight = padded(query), padded(key), padded(value), padded(edge_weight)
    outputs, queries, from_starts = [], [], []
    final_states = None
    for group, (nodes, edges) in enumerate(zip(layout.nodes, layout.edges)):
        q, k, v = (_take(t, nodes).transpose(1, 2) for t in (query_, key_, value_))  # [n, H, m, F]
        a = _take(weight, edges).transpose(1, 2)  # [n, H, m] transition into every token (0 at a path start)
        # 1. Inside every chunk: y = (L ⊙ C Bᵀ) x with L[t, s] = prod_{s<k<=t} w_k.
        within = segment_product(a)  # [n, H, m, m]
        outputs.append((within * (q @ k.transpose(-1, -2))) @ v)
        if layout.carried.numel():
            queries.append(q)
            from_starts.append(torch.cumprod(a, -1))  # prod_{first<=k<=t} w_k, entry from the previous chunk
            if group == len(layout.nodes) - 1:
                # 2. The final state of every carried chunk from its own tokens:
                # sum_s (prod_{s<k<=last} w_k) B_s x_sᵀ.
                c = layout.carried
                final_states = torch.einsum("chq,chqs,chqp->chsp", within[c, :, -1, :], k[c], v[c])
    if final_states is not None:
        # 3. The full state after every carried chunk, F_i = T_i F_{i-1} + (its own final state), with
        # T_i the product of the chunk's weights: a segmented scan inside every path.
        state, decay = final_states, from_starts[-1][layout.carried, :, -1]  # [K, H, S, P], [K, H]
        for partner, valid in layout.steps:
            state = torch.where(valid.view(-1, 1, 1, 1), state + decay[..., None, None] * _take(state, partner), state)
            decay = torch.where(valid.view(-1, 1), decay * _take(decay, partner), decay)
        state = padded(state)  # the zero state entering a path's first chunk
        # 4. Its contribution inside the next chunk: C_tᵀ (prod_{first<=k<=t} w_k) F_{i-1}.
        for group, entering in enumerate(layout.entering):
            if entering is not None:
                outputs[group] = outputs[group] + from_starts[group].unsqueeze(-1) * (queries[group] @ _take(state, entering))
    flat = torch.cat([y.transpose(1, 2).reshape(-1, heads, y.size(-1)) for y in outputs])
    return _take(flat, layout.output)
