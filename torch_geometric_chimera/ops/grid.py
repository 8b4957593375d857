r"""The ``grid`` path: resolvent attention on directed grid DAGs (and lines), walked row by row.

A directed grid DAG (Fig. 3 of the paper) gives every pixel at most two parents, the pixel before
it in its row and the pixel above it, in the direction the DAG flows. Walking each image row by row
in that direction, position ``p`` of a walk over rows of ``W`` positions has the parents ``p - W``
and ``p - 1``:

.. math::
    \mathbf{H}_p = a^{\uparrow}_p \mathbf{H}_{p-W} + a^{\leftarrow}_p \mathbf{H}_{p-1}
        + \mathbf{K}_p \mathbf{V}_p^\top, \qquad \mathbf{y}_p = \mathbf{H}_p^\top \mathbf{Q}_p,

which is :math:`\mathbf{y} = ((\mathbf{I} - \mathbf{A})^{-1} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}`
for that DAG, exactly. The level-by-level ``dag`` path computes the same thing but keeps the
``S x P`` state of every node and head (half a gigabyte for 64 images of 32 x 32 patches at width 64)
and is bound by that memory traffic. ``chimera::grid_attention`` keeps two rows of states in cache,
writes only ``y`` and the states of every ``segment_rows``-th row, and the backward recomputes each
segment from its checkpoint before running the adjoint recurrence over it. Segments are as long as
a core's L2 cache allows, so images of up to about 60 rows of 32 patches keep no checkpoint at
all. Cost: about 8 S P flops per position and head forward, 22 S P backward (recomputation
included); memory ``N H S P / segment_rows``.

:func:`grid_attention_reference` is the same recurrence in plain PyTorch, position by position.
"""
import glob
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._extension import HAS_EXTENSION

#: The kernel processes state rows ``s`` in blocks, a row of a block (``W x block x P`` values)
#: taking about this much (``kRowBlockBytes`` in ``csrc/cpu/grid_scan_cpu.cpp``).
ROW_BLOCK_BYTES = 32 * 1024


def _l2_cache_bytes(default: int = 1024 * 1024) -> int:
    """One core's L2 cache as Linux reports it (``/sys/devices/system/cpu/cpu0/cache``), else ``default``,
    within [512 KiB, 4 MiB]."""
    for folder in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{folder}/level") as level, open(f"{folder}/size") as size:
                if level.read().strip() != "2":
                    continue
                text = size.read().strip().upper()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024 ** 2}
        try:
            found = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (ValueError, IndexError):
            continue
        return min(max(found, 512 * 1024), 4 * 1024 * 1024)
    return default


#: A recomputed segment of the backward (``segment_rows + 3`` rows of a block) stays in a core's
#: L2 cache. The larger the segment, the fewer checkpoint rows the forward writes: with a 2 MiB L2
#: (the development Xeon) a 32 x 32 image is one segment and writes none, 6% faster forward and
#: backward than with 1 MiB (64 images, width 64, ``expand=2``; 2026-12-06).
SEGMENT_BYTES = _l2_cache_bytes()


class GridWalks(NamedTuple):
    r"""How :func:`grid_attention` walks every DAG of a batch of grids.

    Attributes:
        graph_ptr (LongTensor): ``[G + 1]`` first node of every image.
        row_width (LongTensor): ``[G]`` positions per row of every walk (the image width).
        nodes (list of LongTensor): one ``[N]`` walk per DAG: ``nodes[d][p]`` is the node at position ``p``.
        weight_index (list of LongTensor): one ``[E_d]`` per DAG: where edge ``e`` of the DAG's
            ``edge_index`` goes in the flattened ``[N * 2]`` weight table (``2 * target + slot``,
            slot 0 for the parent above, 1 for the parent before in the row).
        max_rows (int): rows of the tallest image.
        max_width (int): the widest row.
    """
    graph_ptr: Tensor
    row_width: Tensor
    nodes: List[Tensor]
    weight_index: List[Tensor]
    max_rows: int
    max_width: int


#: The walk of each grid DAG in :func:`~torch_geometric_chimera.nn.decomposition.batched_grid_dags`'
#: order, as (rows reversed, columns reversed): (down, right), (down, left), (up, right), (up, left).
GRID_DIRECTIONS = ((False, False), (False, True), (True, False), (True, True))


def grid_walks(grid_size: Tensor, dags: List[Tensor]) -> GridWalks:
    r"""The walks of the four directed grid DAGs ``dags`` (as
    :func:`~torch_geometric_chimera.nn.decomposition.batched_grid_dags` builds them) of images of
    ``grid_size`` (``[G, 2]``, height and width), nodes numbered image after image in raster order."""
    grid_size = grid_size.view(-1, 2).long()
    height, width = grid_size[:, 0], grid_size[:, 1]
    sizes = height * width
    graph_ptr = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
    num_nodes = int(graph_ptr[-1])
    graph = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), sizes, output_size=num_nodes)
    position = torch.arange(num_nodes, device=sizes.device)
    local = position - graph_ptr[graph]
    row_width, rows = width[graph], height[graph]
    row, column = local // row_width.clamp_min(1), local % row_width.clamp_min(1)
    walks = []
    for flip_rows, flip_columns in GRID_DIRECTIONS[:len(dags)]:
        r = rows - 1 - row if flip_rows else row
        c = row_width - 1 - column if flip_columns else column
        walks.append(graph_ptr[graph] + r * row_width + c)
    weight_index = []
    for dag in dags:
        src, dst = dag[0].long(), dag[1].long()
        # The parent before in the row is a neighbour (|src - dst| = 1) in a row of at least two.
        in_row = ((dst - src).abs() == 1) & (row_width[dst] > 1)
        weight_index.append(2 * dst + in_row.long())
    max_rows = int(height.max()) if height.numel() else 0
    max_width = int(width.max()) if width.numel() else 0
    return GridWalks(graph_ptr, width, walks, weight_index, max_rows, max_width)


def state_block(row_width: int, state_dim: int, head_dim: int, element_size: int) -> int:
    """State rows per block of the kernel: one row of a block, ``W x block x P`` values, near
    :data:`ROW_BLOCK_BYTES` (the same rule as ``state_block`` in ``csrc/cpu/grid_scan_cpu.cpp``)."""
    return max(1, min(state_dim, ROW_BLOCK_BYTES // max(1, row_width * head_dim * element_size)))


def segment_rows_for(walks: GridWalks, state_dim: int, head_dim: int, element_size: int) -> int:
    r"""Rows per recomputed segment of the backward: as many as fit :data:`SEGMENT_BYTES` (every
    row is recomputed once whatever the segment length, so longer segments only save checkpoint
    memory), at most the tallest image's rows (then nothing is checkpointed)."""
    width = max(1, walks.max_width)
    row_bytes = width * state_block(width, state_dim, head_dim, element_size) * head_dim * element_size
    fits = max(1, SEGMENT_BYTES // max(1, row_bytes) - 3)
    return max(1, min(walks.max_rows, fits))


def num_checkpoints(graph_ptr: Tensor, row_width: Tensor, segment_rows: int) -> int:
    """Positions whose states the forward keeps: every segment's last row but the final one's,
    ``ceil(rows / segment_rows) - 1`` rows of every image."""
    if segment_rows < 1:
        raise ValueError(f"segment_rows: expected a positive int, got {segment_rows!r}")
    sizes = graph_ptr.diff()
    rows = torch.where(sizes > 0, sizes // row_width.clamp_min(1), torch.zeros_like(sizes))
    return int(((rows - 1).clamp_min(0) // segment_rows * row_width).sum())  # no overflow near INT64_MAX


if HAS_EXTENSION:

    @torch.library.register_fake("chimera::grid_attention")
    def _grid_attention_fake(graph_ptr, row_width, nodes, weight, query, key, value, segment_rows, num_checkpoints,
                             groups=None):
        heads, state_dim, head_dim = value.shape[1], key.shape[-1], value.shape[2]
        dags = (len(groups) if groups is not None else key.shape[1]) if key.dim() == 4 else 1
        return [value.new_empty(value.shape), value.new_empty(dags * num_checkpoints, heads, state_dim * head_dim)]

    @torch.library.register_fake("chimera::grid_attention_backward")
    def _grid_attention_backward_fake(graph_ptr, row_width, nodes, weight, query, key, value, checkpoints, grad_y,
                                      segment_rows, num_checkpoints, groups=None):
        return [weight.new_empty(weight.shape), query.new_empty(query.shape), key.new_empty(key.shape),
                value.new_empty(value.shape)]  # new_empty is contiguous, as the kernel's dV

    def _grid_attention_setup_context(ctx, inputs, output):
        graph_ptr, row_width, nodes, weight, query, key, value, segment_rows, num_checkpoints = inputs[:9]
        ctx.save_for_backward(graph_ptr, row_width, nodes, weight, query, key, value, output[1])
        ctx.segment_rows, ctx.num_checkpoints = segment_rows, num_checkpoints
        ctx.groups = inputs[9] if len(inputs) > 9 else None  # optional in the schema
        ctx.set_materialize_grads(False)  # the checkpoints are internal: their gradient stays None

    def _grid_attention_backward(ctx, grads):
        grad_y = grads[0]
        graph_ptr, row_width, nodes, weight, query, key, value, checkpoints = ctx.saved_tensors
        if grad_y is None:
            return ((None,) * 3 + (torch.zeros_like(weight), torch.zeros_like(query), torch.zeros_like(key),
                                   torch.zeros_like(value)) + (None,) * (len(ctx.needs_input_grad) - 7))
        grad_weight, grad_query, grad_key, grad_value = torch.ops.chimera.grid_attention_backward(
            graph_ptr, row_width, nodes, weight, query, key, value, checkpoints, grad_y, ctx.segment_rows,
            ctx.num_checkpoints, ctx.groups)
        return (None, None, None, grad_weight, grad_query, grad_key, grad_value) + (None,) * (len(ctx.needs_input_grad) - 7)

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError("chimera::grid_attention_backward: double backward is not supported")

    torch.library.register_autograd("chimera::grid_attention", _grid_attention_backward,
                                    setup_context=_grid_attention_setup_context)
    torch.library.register_autograd("chimera::grid_attention_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)

    @torch.library.register_fake("chimera::grid_mixer")
    def _grid_mixer_fake(graph_ptr, row_width, nodes, table, features, skip, value_width, state_dim, groups,
                         segment_rows, num_checkpoints):
        heads = table.shape[3]
        head_dim = value_width // heads
        return [features.new_empty(features.shape[0], heads, head_dim),
                features.new_empty(len(groups) * num_checkpoints, heads, state_dim * head_dim)]

    @torch.library.register_fake("chimera::grid_mixer_backward")
    def _grid_mixer_backward_fake(graph_ptr, row_width, nodes, table, features, skip, checkpoints, grad_y, value_width,
                                  state_dim, groups, segment_rows, num_checkpoints):
        return [table.new_empty(table.shape), features.new_empty(features.shape), skip.new_empty(skip.shape)]

    def _grid_mixer_setup_context(ctx, inputs, output):
        graph_ptr, row_width, nodes, table, features, skip = inputs[:6]
        ctx.save_for_backward(graph_ptr, row_width, nodes, table, features, skip, output[1])
        ctx.options = inputs[6:]  # value_width, state_dim, groups, segment_rows, num_checkpoints
        ctx.set_materialize_grads(False)

    def _grid_mixer_backward(ctx, grads):
        grad_y = grads[0]
        graph_ptr, row_width, nodes, table, features, skip, checkpoints = ctx.saved_tensors
        value_width, state_dim, groups, segment_rows, num_checkpoints = ctx.options
        # None for every non-tensor input; an empty groups list (no DAGs) must come back as [], since
        # torch.library compares the structure of the gradients with the inputs' and None stands for a
        # leaf, not for an empty list
        rest = (None, None, [] if len(groups) == 0 else None, None, None)
        if grad_y is None:
            return (None,) * 3 + (torch.zeros_like(table), torch.zeros_like(features), torch.zeros_like(skip)) + rest
        grad_table, grad_features, grad_skip = torch.ops.chimera.grid_mixer_backward(
            graph_ptr, row_width, nodes, table, features, skip, checkpoints, grad_y.contiguous(), value_width,
            state_dim, groups, segment_rows, num_checkpoints)
        return (None,) * 3 + (grad_table, grad_features, grad_skip) + rest

    def _no_mixer_double_backward(ctx, *grads):
        raise NotImplementedError("chimera::grid_mixer_backward: double backward is not supported")

    torch.library.register_autograd("chimera::grid_mixer", _grid_mixer_backward,
                                    setup_context=_grid_mixer_setup_context)
    torch.library.register_autograd("chimera::grid_mixer_backward", _no_mixer_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)

    @torch.library.register_fake("chimera::grid_selectivity")
    def _grid_selectivity_fake(delta, parents, groups, scale, signed):
        return delta.new_empty(parents.size(0), delta.size(0), 3, delta.size(3))

    @torch.library.register_fake("chimera::grid_selectivity_backward")
    def _grid_selectivity_backward_fake(grad_table, delta, parents, groups, scale, signed):
        return delta.new_empty(delta.shape)

    def _grid_selectivity_setup_context(ctx, inputs, output):
        delta, parents, groups, scale, signed = inputs
        ctx.save_for_backward(delta, parents)
        ctx.options = (groups, scale, signed)

    def _grid_selectivity_backward(ctx, grad_table):
        delta, parents = ctx.saved_tensors
        grad = torch.ops.chimera.grid_selectivity_backward(grad_table.contiguous(), delta, parents, *ctx.options)
        return grad, None, None, None, None

    torch.library.register_autograd("chimera::grid_selectivity", _grid_selectivity_backward,
                                    setup_context=_grid_selectivity_setup_context)

    def _no_selectivity_double_backward(ctx, *grads):
        raise NotImplementedError("chimera::grid_selectivity_backward: double backward is not supported")

    torch.library.register_autograd("chimera::grid_selectivity_backward", _no_selectivity_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _segments_of(graph_ptr: Tensor, row_width: Tensor, state_dim: int, head_dim: int, element_size: int,
                 segment_rows: Optional[int], checkpoints: Optional[int]) -> Tuple[int, int]:
    """``segment_rows`` (by default :func:`segment_rows_for` these images) and its
    :func:`num_checkpoints`, each where the caller did not give it."""
    if segment_rows is None:
        sizes = graph_ptr.diff()
        rows = int((sizes // row_width.clamp_min(1)).max()) if sizes.numel() else 0
        walks = GridWalks(graph_ptr, row_width, [], [], rows, int(row_width.max()) if row_width.numel() else 0)
        segment_rows = segment_rows_for(walks, state_dim, head_dim, element_size)
    if checkpoints is None:
        checkpoints = num_checkpoints(graph_ptr, row_width, segment_rows)
    return segment_rows, checkpoints


def grid_attention(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, query: Tensor, key: Tensor,
                   value: Tensor, segment_rows: Optional[int] = None, checkpoints: Optional[int] = None,
                   groups: Optional[Sequence[int]] = None) -> Tensor:
    r"""Resolvent attention on one directed grid DAG per image (``chimera::grid_attention``, CPU),
    or the sum over ``D`` such DAGs whose heads share query and key (the *stacked* shapes below:
    one call, one output and one value gradient, where ``D`` calls would write ``D`` of each and
    add them; a task then runs all heads of an image).

    Args:
        graph_ptr (LongTensor): ``[G + 1]`` first node of every image.
        row_width (LongTensor): ``[G]`` positions per row (it divides every image's node count).
        nodes (LongTensor): ``[N]`` the walk: a permutation of every image's own nodes
            (stacked: ``[D, N]``, one walk per DAG).
        weight (Tensor): ``[N, 2, H]``: ``weight[i, 0]`` the edge from the node above ``i`` in the
            walk, ``weight[i, 1]`` from the node before it in its row. Entries without such a
            parent (first row, first column) are ignored and get zero gradient. (stacked:
            ``[D, N, 3, H]``, the third slot scaling the key of every head: :math:`K_{ih} =`
            ``key[i, d, 0] * weight[d, i, 2, h]``)
        query (Tensor): ``[N, H, S]`` (stacked: ``[N, D, 1, S]``). key (Tensor): ``[N, H, S]``
            (stacked: ``[N, D, 1, S]``). value (Tensor): ``[N, H, P]``.
        segment_rows (int, optional): rows between checkpoints of the backward (at least 1; more
            than the tallest image's rows checkpoints nothing); by default :func:`segment_rows_for`.
        checkpoints (int, optional): :func:`num_checkpoints` of these images and ``segment_rows``,
            when the caller has it (the four DAGs of a batch share it).
        groups (sequence of int, optional): stacked walks only: DAG ``d`` reads ``query[:, groups[d]]``
            and ``key[:, groups[d]]`` (query and key ``[N, sets, 1, S]``, sets shared by DAGs, as
            B and C sharing gives them; no gathered copy). (default: :obj:`None`: ``groups[d] = d``)

    ``value`` may have strided rows (``value.stride(2) == 1``, ``value.stride(1) == P``), and so may
    stacked ``query`` and ``key`` (sets contiguous within a row, one row stride for both): the kernel
    reads them in place, as column blocks of the layer's projected features.

    Differentiable in ``weight``, ``query``, ``key`` and ``value``; float16 / bfloat16 run in float32.

    :rtype: :class:`Tensor` ``[N, H, P]``.
    """
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return grid_attention(graph_ptr, row_width, nodes, weight.float(), query.float(), key.float(), value.float(),
                              segment_rows, checkpoints, groups).to(dtype)
    if nodes.dim() == 2 and (query.dim() != 4 or query.size(2) != 1):
        raise ValueError(f"query: with stacked walks (nodes [D, N]) expected shape [N, sets, 1, S], got "
                         f"{list(query.shape)}")
    segment_rows, checkpoints = _segments_of(graph_ptr, row_width, query.size(-1), value.size(-1),
                                             query.element_size(), segment_rows, checkpoints)
    return torch.ops.chimera.grid_attention(graph_ptr, row_width, nodes, weight, query, key, value, segment_rows,
                                            checkpoints, None if groups is None else list(groups))[0]


def grid_attention_reference(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, query: Tensor,
                             key: Tensor, value: Tensor, groups: Optional[Sequence[int]] = None) -> Tensor:
    r""":func:`grid_attention` in plain PyTorch, one position at a time (the recurrence of the
    module docstring; differentiable by autograd). For tests: it loops over every position.
    Stacked walks (``nodes`` ``[D, N]``) give the sum over the DAGs (DAG ``d`` reading set ``groups[d]``)."""
    if nodes.dim() == 2:
        heads = value.size(1)
        groups = list(range(nodes.size(0))) if groups is None else list(groups)
        outputs = [grid_attention_reference(graph_ptr, row_width, nodes[d], weight[d, :, :2],
                                            query[:, groups[d]].expand(-1, heads, -1),
                                            key[:, groups[d]] * weight[d, :, 2].unsqueeze(-1), value)
                   for d in range(nodes.size(0))]
        return torch.stack(outputs).sum(0) if outputs else value.new_zeros(value.shape)
    heads = query.size(1)
    outputs = [value.new_zeros(value.shape[1:])] * value.size(0)  # [H, P] per node
    for g in range(graph_ptr.numel() - 1):
        start, end = int(graph_ptr[g]), int(graph_ptr[g + 1])
        width = int(row_width[g]) if end > start else 1
        states: List[Tensor] = []  # [H, S, P] per position of the walk
        for p in range(end - start):
            i = int(nodes[start + p])
            state = key[i].unsqueeze(-1) * value[i].unsqueeze(-2)
            if p >= width:  # not in the first row: the parent above
                state = state + weight[i, 0].view(heads, 1, 1) * states[p - width]
            if p % width:  # not in the first column: the parent before in the row
                state = state + weight[i, 1].view(heads, 1, 1) * states[p - 1]
            states.append(state)
            outputs[i] = (query[i].unsqueeze(-1) * state).sum(1)
    return torch.stack(outputs) if outputs else value.new_zeros(value.shape)


def _mixer_parts(features: Tensor, heads: int, value_width: int, state_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    num_nodes, sets = features.size(0), (features.size(1) - value_width) // (2 * state_dim)
    value, key, query = features.split([value_width, sets * state_dim, sets * state_dim], dim=1)
    return (value.reshape(num_nodes, heads, value_width // heads), key.reshape(num_nodes, sets, 1, state_dim),
            query.reshape(num_nodes, sets, 1, state_dim))


def grid_mixer(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, table: Tensor, features: Tensor, skip: Tensor,
               value_width: int, state_dim: int, groups: Sequence[int], segment_rows: Optional[int] = None,
               checkpoints: Optional[int] = None) -> Tensor:
    r"""The stacked :func:`grid_attention` on a layer's projected features, read in place, plus
    Mamba's :math:`D` skip (``chimera::grid_mixer``, CPU):

    .. math::
        \mathbf{y}_i = \sum_d \mathrm{grid\_attention}_d(\mathbf{C}_{g(d)}, \mathbf{B}_{g(d)},
            \mathbf{V})_i + D_h \mathbf{v}_{ih}.

    ``features`` is ``[N, C]``: the values (``value_width = H * P`` columns), then ``sets`` key sets
    and ``sets`` query sets of ``state_dim`` columns each, as the layer's convolution leaves them.
    Its gradient is one ``[N, C]`` tensor, where :func:`grid_attention` of the three column blocks
    leaves autograd three gradients to concatenate, and the skip's gradient on ``v`` joins dV in the
    kernel instead of a separate sum (each a fresh 32-48 MB tensor on 64 images of 32 x 32).

    Args:
        graph_ptr, row_width, nodes, segment_rows, checkpoints: as :func:`grid_attention` (stacked walks).
        table (Tensor): ``[D, N, 3, H]``, as the stacked ``weight`` of :func:`grid_attention`.
        features (Tensor): ``[N, value_width + 2 * sets * state_dim]``.
        skip (Tensor): :math:`D`, ``[H]``.
        value_width (int): ``H * P``. state_dim (int): ``S``.
        groups (sequence of int): the key/query set of every DAG.

    Differentiable in ``table``, ``features`` and ``skip``; float16 / bfloat16 run in float32.

    :rtype: :class:`Tensor` ``[N, H, P]``.
    """
    dtype = features.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return grid_mixer(graph_ptr, row_width, nodes, table.float(), features.float(), skip.float(), value_width,
                          state_dim, groups, segment_rows, checkpoints).to(dtype)
    segment_rows, checkpoints = _segments_of(graph_ptr, row_width, state_dim, value_width // max(1, table.size(-1)),
                                             features.element_size(), segment_rows, checkpoints)
    return torch.ops.chimera.grid_mixer(graph_ptr, row_width, nodes, table, features, skip, value_width, state_dim,
                                        list(groups), segment_rows, checkpoints)[0]


def grid_mixer_reference(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, table: Tensor, features: Tensor,
                         skip: Tensor, value_width: int, state_dim: int, groups: Sequence[int]) -> Tensor:
    r""":func:`grid_mixer` in plain PyTorch: :func:`grid_attention_reference` of the feature's column
    blocks plus the skip. For tests: it loops over every position."""
    value, key, query = _mixer_parts(features, table.size(-1), value_width, state_dim)
    return (grid_attention_reference(graph_ptr, row_width, nodes, table, query, key, value, groups)
            + skip.view(1, -1, 1) * value)


def grid_selectivity(delta: Tensor, parents: Tensor, groups: Sequence[int], scale: float = 1.0,
                     signed: bool = False) -> Tensor:
    r"""The weight table of the stacked :func:`grid_attention` from the selectivity, in one pass
    (``chimera::grid_selectivity``, CPU). For DAG ``d`` reading :math:`\Delta` set ``g = groups[d]``
    and node ``i`` with parents :math:`p_r` (``parents[d, i, r]``: ``r = 0`` the parent above, ``1``
    the one before in the row; :math:`n = p_0 + p_1`, counted 1 when 0):

    .. math::
        \mathrm{table}_{d,i,r,h} = \frac{p_r\, T(\Delta_{i,g,r,h})}{\sqrt{n}}, \qquad
        \mathrm{table}_{d,i,2,h} = \mathrm{scale}\,\frac{\sum_r p_r \Delta_{i,g,r,h}}{\sqrt{n}},

    :math:`T(x) = e^{-x}`, or :math:`2e^{-x} - 1` when ``signed``: the transition weights and key
    scales of :func:`~torch_geometric_chimera.nn.decomposition.decomposition_adjacency` on grids,
    side by side, where that function takes ten PyTorch passes forward and as many backward.

    Args:
        delta (Tensor): :math:`\Delta \ge 0`, ``[N, sets, 2, H]``.
        parents (BoolTensor): ``[D, N, 2]``.
        groups (sequence of int): the :math:`\Delta` set of every DAG.
        scale (float, optional): folded into the key scales. (default: ``1``)
        signed (bool, optional): signed transitions. (default: :obj:`False`)

    Differentiable in ``delta``.

    :rtype: :class:`Tensor` ``[D, N, 3, H]``.
    """
    return torch.ops.chimera.grid_selectivity(delta, parents, list(groups), float(scale), bool(signed))


def grid_weights(edge_weight: Tensor, weight_index: Tensor, num_nodes: int) -> Tensor:
    r"""The ``[N, 2, H]`` weight table of :func:`grid_attention` from a DAG's ``[E, H]`` edge
    weights (``weight_index`` from :func:`grid_walks`; every target has at most one edge per slot)."""
    table = edge_weight.new_zeros(2 * num_nodes, edge_weight.size(-1))
    return table.index_copy(0, weight_index, edge_weight).view(num_nodes, 2, edge_weight.size(-1))


def grid_available(query: Tensor) -> bool:
    """The row-by-row kernel exists for CPU tensors (with the compiled extension)."""
    return HAS_EXTENSION and query.device.type == "cpu"


__all__: Tuple[str, ...] = ("GridWalks", "grid_walks", "grid_attention", "grid_attention_reference", "grid_weights",
                            "grid_selectivity", "grid_mixer", "grid_mixer_reference",
                            "segment_rows_for", "state_block", "num_checkpoints", "grid_available", "GRID_DIRECTIONS")
