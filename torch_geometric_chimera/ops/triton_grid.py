r"""Triton kernels of the ``grid`` path (:mod:`.grid`): resolvent attention, and the plain solve, on
directed grid DAGs, one launch for the whole batch whatever the depth.

The operation is ``chimera::grid_attention``'s (:func:`.grid.grid_attention`): every image ``g`` is
walked as rows of ``W = row_width[g]`` positions (``nodes[graph_ptr[g]:graph_ptr[g + 1]]``, one of the
four walks of :func:`.grid.grid_walks`), position ``p`` having the parents ``p - W`` (weight
``weight[node, 0]``) and ``p - 1`` within its row (``weight[node, 1]``):

.. math::
    \mathbf{H}_p = a^{\uparrow}_p \mathbf{H}_{p-W} + a^{\leftarrow}_p \mathbf{H}_{p-1}
        + \mathbf{K}_p \mathbf{V}_p^\top, \qquad \mathbf{y}_p = \mathbf{H}_p^\top \mathbf{Q}_p.

**Forward.** One persistent program per (image, head, block of the ``S x P`` state entries) walks
the rows of its image. Given the row above, a row is a first-order linear recurrence along its
columns,

.. math::
    \mathbf{U}_c = a^{\uparrow}_c \mathbf{H}^{\text{above}}_c + \mathbf{K}_c \mathbf{V}_c^\top, \qquad
    \mathbf{H}_c = a^{\leftarrow}_c \mathbf{H}_{c-1} + \mathbf{U}_c,

solved by ``tl.associative_scan`` over the column axis of a ``[BLOCK_W, BLOCK_S, BLOCK_P]``
register tile with the combine :math:`(a_1, b_1), (a_2, b_2) \mapsto (a_1 a_2, a_2 b_1 + b_2)`
(``a = 0`` in column 0, which has no parent before it). ``y`` of the row is
:math:`\sum_s q_s \mathbf{H}_{s\cdot}`. Images of different widths share one launch: the column
tile is the widest row rounded up to a power of two, masked per image. A launch therefore costs
``max_rows`` sequential row steps of ``O(log BLOCK_W)`` depth, instead of one launch per level
(``rows + W - 1`` levels) of the level-by-level ``dag`` path.

The entries ``(s, f)`` of the state have independent recurrences (only the read-outs couple them),
so a program takes one block of ``BLOCK_S`` state rows by ``BLOCK_P`` head features, the tile
staying near :data:`TILE_BYTES`: narrow images take all of ``S`` and ``P`` in one
program, wide ones split ``P`` first, then ``S``. Quantities summed over the split axis (``y`` over
``s``; in the backward ``dq``, ``dk`` over ``f``, ``dv`` over ``s``, the weight gradients over
both) are written as partial sums, one slice per block, and added by PyTorch afterwards:
deterministic, no atomics. With one block (the common case) the slice is the result.

**Backward, and what the forward keeps.** The forward writes ``y`` and, like the CPU kernel, the
states of every ``segment_rows``-th row (the last row of every segment but an image's final one;
``[num_checkpoints, H, S, P]``, in the CPU op's layout). The backward program walks the segments
last to first: it recomputes the segment's states from the checkpoint above it into a scratch
buffer of its own (``segment_rows + 1`` rows of one tile, in global memory, on a GPU mostly in L2),
then runs the adjoint recurrence on the reversed walk, row by row, last to first,

.. math::
    \mathbf{G}_p = \mathbf{Q}_p \partial\mathbf{y}_p^\top + a^{\uparrow}_{p+W} \mathbf{G}_{p+W}
        + a^{\leftarrow}_{p+1} \mathbf{G}_{p+1},

each row again one scan (the columns read right to left), the row below kept in registers, and
writes :math:`\partial\mathbf{Q}_p = \mathbf{H}_p \partial\mathbf{y}_p`,
:math:`\partial\mathbf{K}_p = \mathbf{G}_p \mathbf{V}_p`,
:math:`\partial\mathbf{V}_p = \mathbf{G}_p^\top \mathbf{K}_p`,
:math:`\partial a^{\uparrow}_p = \langle \mathbf{G}_p, \mathbf{H}_{p-W} \rangle` and
:math:`\partial a^{\leftarrow}_p = \langle \mathbf{G}_p, \mathbf{H}_{p-1} \rangle` (the states
``H_{p-W}`` and ``H_{p-1}``, a column shift, are read back from the scratch rows). Weights of
missing parents (first row, first column) are ignored and get zero gradient. The default
``segment_rows`` is :math:`\lceil\sqrt{\text{max\_rows}}\rceil`, which roughly minimizes
checkpoints (``N H S P / segment_rows``) plus scratch (``G H S P W (segment_rows + 1)``, i.e.
``N H S P (segment_rows + 1) / rows``): about ``0.13 N H S P`` for a 256 x 256 image, instead of
the ``N H S P`` of keeping every state. Every row is recomputed once: the backward costs about two
forwards plus the adjoint.

**The solve** (:func:`grid_solve_triton`) is the same recurrence with ``K_p V_p^T`` replaced by a
right-hand side ``x_p`` (``[N, H, F]``) and every state as output:
:math:`\mathbf{h} = (\mathbf{I} - \mathbf{A})^{-1}\mathbf{x}` for the grid DAG, what ``dag_solve``
computes on it (the 256 x 256 target of issue 9). It keeps nothing but its output; its backward is
the adjoint scan with the states read from that output.

**Triton and its interpreter.** Triton is optional (:data:`HAS_TRITON`): without it the module
imports and only the entry points raise. The kernels run on CUDA tensors, or on CPU tensors in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before Triton was first imported
(:data:`INTERPRETED`; see :mod:`.triton_attention`). The loops over rows and segments are ``while``
loops on runtime bounds read from ``graph_ptr``: Triton 3.6's interpreter evaluates
``range(runtime_bound)`` with ``int()`` of a one-element array, which numpy 2.4 refuses
(triton-lang/triton#9171), whereas a ``while`` condition goes through ``bool()``, which numpy still
allows. (:mod:`.triton_attention` loops to runtime bounds with ``range``, which needs Triton 3.9's
interpreter.) Every launch runs under :func:`.triton_attention.device_guard`, on its tensors' device,
and its grid is checked against CUDA's limits (:func:`_launch_grid`). On a GPU a ``while`` loop
compiles to ``scf.while``; the row loop is sequential anyway. A mask that joins a block to a scalar condition (``r > 0``: the row
has a row above) goes through ``_and_scalar``: the interpreter broadcasts a scalar comparison as an
array of its operands' integer type, ``&`` keeps that type, and from Triton 3.9 the interpreter's
``tl.load`` / ``tl.store`` refuse such a mask ("mask has unsupported dtype"; 3.6 to 3.8 took it as
boolean). Compiled, the helper's ``tl.where(condition, True, False)`` folds away: the sm_90 PTX is
the same as with a plain ``&``.

The entry points are :func:`grid_attention_triton` and :func:`grid_solve_triton`, backed by the
custom ops ``chimera_triton::grid_attention`` (and ``_backward``), ``chimera_triton::grid_solve``
(and ``_backward``) with fake kernels and autograd formulas, so ``torch.compile`` sees one opaque
op. :func:`grid_plan` does the host-side work (one synchronization: the widest row, the tallest
image, the checkpoint count) once per batch, for every walk direction to share.
"""
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# Triton itself (None without it), HAS_TRITON and INTERPRETED (TRITON_INTERPRET=1 was set when
# Triton was first imported): one import guard for both Triton modules.
from .triton_attention import HAS_TRITON, INTERPRETED, MAX_GRID_YZ, device_guard, tl, triton

#: Bytes of one ``[BLOCK_W, BLOCK_S, BLOCK_P]`` register tile a program aims at: 4096 float32 values
#: (2048 float64), 16 per thread with :data:`NUM_WARPS` = 8; a handful of such tiles are live in a row
#: step. Compiled for sm_90 by Triton 3.6 (``ptxas -v``) at the tiles :func:`tile_blocks` picks for
#: rows of 8, 32 and 256 positions, S = 16 and P = 16 to 64, the kernels use 100 to 255 registers and
#: spill at most 16 bytes (float32) or 60 bytes (float64), both in the attention's backward; 4 warps
#: with the same tiles spilled up to 550 bytes. Not tuned on a GPU.
TILE_BYTES = 16 * 1024
#: Warps per program on a GPU.
NUM_WARPS = 8


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class GridPlan(NamedTuple):
    r"""Host-side sizes of one batch of grids, shared by its four walks (:func:`grid_plan`).

    Attributes:
        max_width (int): the widest row (``BLOCK_W`` is its next power of two).
        max_rows (int): rows of the tallest image.
        segment_rows (int): rows between checkpoints of the attention's backward.
        num_checkpoints (int): positions whose states the attention's forward keeps.
        block_s (int): state rows ``s`` per program (a power of two).
        block_p (int): head features per program (a power of two).
        num_nodes (int): ``graph_ptr[-1]``, the nodes the walks cover.
    """
    max_width: int
    max_rows: int
    segment_rows: int
    num_checkpoints: int
    block_s: int
    block_p: int
    num_nodes: int


def default_segment_rows(max_rows: int) -> int:
    r""":math:`\lceil\sqrt{\text{max\_rows}}\rceil`: checkpoints (``1 / segment_rows`` of all states)
    plus the backward's scratch (``(segment_rows + 1) / rows`` of them) near their minimum."""
    return max(1, math.isqrt(max(0, max_rows - 1)) + 1) if max_rows > 1 else 1


def tile_blocks(max_width: int, state_dim: int, head_dim: int, element_size: int = 4) -> Tuple[int, int]:
    """``(block_s, block_p)``: powers of two, the tile ``next_power_of_2(max_width) x block_s x block_p``
    near :data:`TILE_BYTES`; ``P`` is split before ``S`` (a split of ``S`` makes ``y`` a partial sum)."""
    tile_elements = max(1, TILE_BYTES // max(4, element_size))  # float16 and bfloat16 run in float32
    width = _next_power_of_2(max(1, max_width))
    block_s = min(_next_power_of_2(max(1, state_dim)), max(1, tile_elements // width))
    block_p = min(_next_power_of_2(max(1, head_dim)), max(1, tile_elements // (width * block_s)))
    return block_s, block_p


def grid_plan(graph_ptr: Tensor, row_width: Tensor, state_dim: int, head_dim: int,
              segment_rows: Optional[int] = None, *, element_size: int = 4, block_s: Optional[int] = None,
              block_p: Optional[int] = None) -> GridPlan:
    r"""The :class:`GridPlan` of a batch: reads ``graph_ptr`` and ``row_width`` once (one host
    synchronization), and checks what the kernels assume but cannot check (every image's node count a
    multiple of its positive width).

    Args:
        graph_ptr (LongTensor): ``[G + 1]``. row_width (LongTensor): ``[G]``.
        state_dim (int): ``S``. head_dim (int): ``P`` (for :func:`grid_solve_triton`, ``F``).
        segment_rows (int, optional): rows between checkpoints (default :func:`default_segment_rows`).
        element_size (int, optional): bytes per value (4 for float32, 8 for float64). (default: 4)
        block_s, block_p (int, optional): tile sizes, powers of two (default :func:`tile_blocks`).
    """
    if graph_ptr.dim() != 1 or graph_ptr.numel() < 1 or row_width.shape != (graph_ptr.numel() - 1,):
        raise ValueError(f"graph_ptr, row_width: expected shapes [G + 1] and [G], got {list(graph_ptr.shape)} "
                         f"and {list(row_width.shape)}")
    values = torch.cat([graph_ptr.long(), row_width.long().to(graph_ptr.device)]).tolist()  # the one sync
    ptr, widths = values[:graph_ptr.numel()], values[graph_ptr.numel():]
    sizes = [b - a for a, b in zip(ptr[:-1], ptr[1:])]
    if ptr[0] != 0 or any(n < 0 or (n > 0 and (w < 1 or n % w)) for n, w in zip(sizes, widths)):
        raise ValueError("graph_ptr, row_width: graph_ptr must start at 0 and not decrease, and every image's node "
                         "count must be a multiple of its positive row width")
    rows = [n // w if n > 0 else 0 for n, w in zip(sizes, widths)]
    max_rows = max(rows, default=0)
    max_width = max((w for n, w in zip(sizes, widths) if n > 0), default=0)
    if segment_rows is None:
        segment_rows = default_segment_rows(max_rows)
    if segment_rows < 1:
        raise ValueError(f"segment_rows: expected at least 1, got {segment_rows}")
    count = sum(max(0, -(-r // segment_rows) - 1) * w for r, w in zip(rows, widths) if r > 0)
    auto_s, auto_p = tile_blocks(max_width, state_dim, head_dim, element_size)
    block_s, block_p = block_s or auto_s, block_p or auto_p
    for name, block in (("block_s", block_s), ("block_p", block_p)):
        if block < 1 or block & (block - 1):
            raise ValueError(f"{name}: expected a power of two, got {block}")
    return GridPlan(max_width, max_rows, segment_rows, count, block_s, block_p, ptr[-1])


def _checkpoint_ptr(graph_ptr: Tensor, row_width: Tensor, segment_rows: int) -> Tensor:
    """``[G]`` first checkpoint position of every image (on the device, no synchronization)."""
    sizes = graph_ptr.diff()
    width = row_width.to(sizes.dtype)
    rows = torch.where(sizes > 0, sizes // width.clamp_min(1), torch.zeros_like(sizes))
    count = ((rows + segment_rows - 1) // segment_rows - 1).clamp_min(0) * torch.where(sizes > 0, width, 0)
    return (torch.cumsum(count, 0) - count).contiguous()


if HAS_TRITON:
    @triton.jit
    def _combine(a1, b1, a2, b2):
        """``x -> a1 x + b1`` then ``x -> a2 x + b2``."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _scan_columns(decay, inflow):
        """``H_c = decay_c H_{c-1} + inflow_c`` along axis 0 (``decay`` broadcast to ``inflow``'s shape,
        zero where the recurrence starts)."""
        _, state = tl.associative_scan((decay + tl.zeros_like(inflow), inflow), 0, _combine)
        return state

    @triton.jit
    def _and_scalar(mask, condition):
        """``mask & condition`` for a block ``mask`` and a scalar ``condition``, a boolean block in Triton's
        interpreter too (module docstring); compiled, the same code as ``mask & condition``."""
        return mask & tl.where(condition, True, False)

    @triton.jit
    def _attention_forward_kernel(GRAPH_PTR, ROW_WIDTH, NODES, WEIGHT, Q, K, V, Y, CKPT, CKPT_PTR,
                                  num_nodes, heads, S, P, segment_rows,
                                  P_BLOCKS, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_P: tl.constexpr):
        """One (image, head, block of state entries): ``y`` (a partial sum over ``s`` for its block of
        ``S``, in ``Y[s_block]``) and the checkpoint rows."""
        gh = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        g, h = gh // heads, gh % heads
        sb, pb = chunk // P_BLOCKS, chunk % P_BLOCKS
        base = tl.load(GRAPH_PTR + g)
        size = tl.load(GRAPH_PTR + g + 1) - base
        width = tl.load(ROW_WIDTH + g)
        rows = tl.where(size > 0, size // tl.maximum(width, 1), 0)
        first_checkpoint = tl.load(CKPT_PTR + g)
        col = tl.arange(0, BLOCK_W)
        fs = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        fp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        col_ok = col < width
        qk_ok = col_ok[:, None] & (fs < S)[None, :]
        v_ok = col_ok[:, None] & (fp < P)[None, :]
        state_ok = qk_ok[:, :, None] & (fp < P)[None, None, :]
        state_offset = fs[None, :, None] * P + fp[None, None, :]  # within one [S, P] state
        state = tl.zeros([BLOCK_W, BLOCK_S, BLOCK_P], dtype=Y.dtype.element_ty)  # the row above
        r = 0
        while r < rows:
            node = tl.load(NODES + base + r * width + col, mask=col_ok, other=0)
            w_up = tl.load(WEIGHT + (node * 2) * heads + h, mask=_and_scalar(col_ok, r > 0), other=0.0)
            w_left = tl.load(WEIGHT + (node * 2 + 1) * heads + h, mask=col_ok & (col > 0), other=0.0)
            nh = node * heads + h
            q = tl.load(Q + nh[:, None] * S + fs[None, :], mask=qk_ok, other=0.0)
            k = tl.load(K + nh[:, None] * S + fs[None, :], mask=qk_ok, other=0.0)
            v = tl.load(V + nh[:, None] * P + fp[None, :], mask=v_ok, other=0.0)
            inflow = w_up[:, None, None] * state + k[:, :, None] * v[:, None, :]
            state = _scan_columns(w_left[:, None, None], inflow)
            y = tl.sum(q[:, :, None] * state, axis=1)
            tl.store(Y + (sb * num_nodes * heads + nh[:, None]) * P + fp[None, :], y, mask=v_ok)
            keep = ((r + 1) % segment_rows == 0) & (r + 1 < rows)
            position = first_checkpoint + ((r + 1) // segment_rows - 1) * width + col
            tl.store(CKPT + (position[:, None, None] * heads + h) * S * P + state_offset, state,
                     mask=_and_scalar(state_ok, keep))
            r += 1

    @triton.jit
    def _attention_backward_kernel(GRAPH_PTR, ROW_WIDTH, NODES, WEIGHT, Q, K, V, DY, CKPT, CKPT_PTR, SCRATCH,
                                   DQ, DK, DV, DW, num_nodes, heads, S, P, segment_rows, P_BLOCKS, S_BLOCKS,
                                   BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
        """One (image, head, block of state entries): segment by segment, last first, recompute the
        states into the program's scratch rows, then the adjoint recurrence over the segment's rows,
        last first, writing the gradients' partial sums (``dq``, ``dk`` per block of ``P``; ``dv`` per
        block of ``S``; the weights' per block)."""
        gh = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        g, h = gh // heads, gh % heads
        sb, pb = chunk // P_BLOCKS, chunk % P_BLOCKS
        base = tl.load(GRAPH_PTR + g)
        size = tl.load(GRAPH_PTR + g + 1) - base
        width = tl.load(ROW_WIDTH + g)
        rows = tl.where(size > 0, size // tl.maximum(width, 1), 0)
        first_checkpoint = tl.load(CKPT_PTR + g)
        TILE: tl.constexpr = BLOCK_W * BLOCK_S * BLOCK_P
        scratch = SCRATCH + (gh * (S_BLOCKS * P_BLOCKS) + chunk) * (segment_rows + 1) * TILE
        ls = tl.arange(0, BLOCK_S)
        lp = tl.arange(0, BLOCK_P)
        fs = sb * BLOCK_S + ls
        fp = pb * BLOCK_P + lp
        s_ok, p_ok = fs < S, fp < P
        state_offset = fs[None, :, None] * P + fp[None, None, :]
        tile_offset = ls[None, :, None] * BLOCK_P + lp[None, None, :]  # within one column of a scratch row
        # The recomputation walks the columns left to right (column = j), the adjoint right to left
        # (column = width - 1 - j); the scratch rows are addressed by column.
        j = tl.arange(0, BLOCK_W)
        fwd_ok = j < width
        fwd_qk_ok = fwd_ok[:, None] & s_ok[None, :]
        fwd_state_ok = fwd_qk_ok[:, :, None] & p_ok[None, None, :]
        col = width - 1 - j
        rev_ok = j < width
        rev_qk_ok = rev_ok[:, None] & s_ok[None, :]
        rev_v_ok = rev_ok[:, None] & p_ok[None, :]
        rev_state_ok = rev_qk_ok[:, :, None] & p_ok[None, None, :]
        left_ok = rev_state_ok & (col > 0)[:, None, None]
        below = tl.zeros([BLOCK_W, BLOCK_S, BLOCK_P], dtype=DQ.dtype.element_ty)  # adjoint of the row below
        segment = (rows + segment_rows - 1) // segment_rows - 1
        while segment >= 0:
            r0 = segment * segment_rows
            r1 = tl.minimum(rows, r0 + segment_rows)
            # Scratch row 0: the checkpoint above the segment (zero above the first).
            position = first_checkpoint + (tl.maximum(segment, 1) - 1) * width + j
            state = tl.load(CKPT + (position[:, None, None] * heads + h) * S * P + state_offset,
                            mask=_and_scalar(fwd_state_ok, segment > 0), other=0.0)
            tl.store(scratch + j[:, None, None] * (BLOCK_S * BLOCK_P) + tile_offset, state)
            r = r0
            while r < r1:  # recompute the segment's states
                node = tl.load(NODES + base + r * width + j, mask=fwd_ok, other=0)
                w_up = tl.load(WEIGHT + (node * 2) * heads + h, mask=_and_scalar(fwd_ok, r > 0), other=0.0)
                w_left = tl.load(WEIGHT + (node * 2 + 1) * heads + h, mask=fwd_ok & (j > 0), other=0.0)
                nh = node * heads + h
                k = tl.load(K + nh[:, None] * S + fs[None, :], mask=fwd_qk_ok, other=0.0)
                v = tl.load(V + nh[:, None] * P + fp[None, :], mask=fwd_ok[:, None] & p_ok[None, :], other=0.0)
                state = _scan_columns(w_left[:, None, None],
                                      w_up[:, None, None] * state + k[:, :, None] * v[:, None, :])
                tl.store(scratch + (r - r0 + 1) * TILE + j[:, None, None] * (BLOCK_S * BLOCK_P) + tile_offset, state)
                r += 1
            tl.debug_barrier()  # the adjoint reads other threads' scratch entries
            r = r1 - 1
            while r >= r0:  # the adjoint recurrence, last row first
                position = base + r * width + col
                node = tl.load(NODES + position, mask=rev_ok, other=0)
                right = tl.load(NODES + position + 1, mask=rev_ok & (col + 1 < width), other=0)
                down = tl.load(NODES + position + width, mask=_and_scalar(rev_ok, r + 1 < rows), other=0)
                w_right = tl.load(WEIGHT + (right * 2 + 1) * heads + h, mask=rev_ok & (col + 1 < width), other=0.0)
                w_down = tl.load(WEIGHT + (down * 2) * heads + h, mask=_and_scalar(rev_ok, r + 1 < rows), other=0.0)
                nh = node * heads + h
                q = tl.load(Q + nh[:, None] * S + fs[None, :], mask=rev_qk_ok, other=0.0)
                k = tl.load(K + nh[:, None] * S + fs[None, :], mask=rev_qk_ok, other=0.0)
                v = tl.load(V + nh[:, None] * P + fp[None, :], mask=rev_v_ok, other=0.0)
                dy = tl.load(DY + nh[:, None] * P + fp[None, :], mask=rev_v_ok, other=0.0)
                adjoint = _scan_columns(w_right[:, None, None],
                                        q[:, :, None] * dy[:, None, :] + w_down[:, None, None] * below)
                row = scratch + (r - r0) * TILE + col[:, None, None] * (BLOCK_S * BLOCK_P) + tile_offset
                up = tl.load(row, mask=rev_state_ok, other=0.0)  # zero above row 0 (scratch row 0 of segment 0)
                current = tl.load(row + TILE, mask=rev_state_ok, other=0.0)
                left = tl.load(row + TILE - BLOCK_S * BLOCK_P, mask=left_ok, other=0.0)
                grad_q = tl.sum(current * dy[:, None, :], axis=2)
                grad_k = tl.sum(adjoint * v[:, None, :], axis=2)
                grad_v = tl.sum(adjoint * k[:, :, None], axis=1)
                grad_up = tl.sum(tl.sum(adjoint * up, axis=2), axis=1)
                grad_left = tl.sum(tl.sum(adjoint * left, axis=2), axis=1)
                tl.store(DQ + (pb * num_nodes * heads + nh[:, None]) * S + fs[None, :], grad_q, mask=rev_qk_ok)
                tl.store(DK + (pb * num_nodes * heads + nh[:, None]) * S + fs[None, :], grad_k, mask=rev_qk_ok)
                tl.store(DV + (sb * num_nodes * heads + nh[:, None]) * P + fp[None, :], grad_v, mask=rev_v_ok)
                weight_grad = DW + chunk * num_nodes * 2 * heads + node * 2 * heads + h
                tl.store(weight_grad, grad_up, mask=rev_ok)
                tl.store(weight_grad + heads, grad_left, mask=rev_ok)
                below = adjoint
                r -= 1
            tl.debug_barrier()  # the next segment overwrites the scratch rows
            segment -= 1

    @triton.jit
    def _solve_forward_kernel(GRAPH_PTR, ROW_WIDTH, NODES, WEIGHT, X, OUT, heads, F,
                              BLOCK_W: tl.constexpr, BLOCK_F: tl.constexpr):
        """One (image, head, block of features): ``h_p = a_up h_{p-W} + a_left h_{p-1} + x_p``, every state
        written."""
        gh = tl.program_id(0).to(tl.int64)
        ff = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
        g, h = gh // heads, gh % heads
        base = tl.load(GRAPH_PTR + g)
        size = tl.load(GRAPH_PTR + g + 1) - base
        width = tl.load(ROW_WIDTH + g)
        rows = tl.where(size > 0, size // tl.maximum(width, 1), 0)
        col = tl.arange(0, BLOCK_W)
        col_ok = col < width
        ok = col_ok[:, None] & (ff < F)[None, :]
        state = tl.zeros([BLOCK_W, BLOCK_F], dtype=OUT.dtype.element_ty)
        r = 0
        while r < rows:
            node = tl.load(NODES + base + r * width + col, mask=col_ok, other=0)
            w_up = tl.load(WEIGHT + (node * 2) * heads + h, mask=_and_scalar(col_ok, r > 0), other=0.0)
            w_left = tl.load(WEIGHT + (node * 2 + 1) * heads + h, mask=col_ok & (col > 0), other=0.0)
            offset = (node * heads + h)[:, None] * F + ff[None, :]
            x = tl.load(X + offset, mask=ok, other=0.0)
            state = _scan_columns(w_left[:, None], w_up[:, None] * state + x)
            tl.store(OUT + offset, state, mask=ok)
            r += 1

    @triton.jit
    def _solve_backward_kernel(GRAPH_PTR, ROW_WIDTH, NODES, WEIGHT, OUT, DOUT, DX, DW, num_nodes, heads, F,
                               BLOCK_W: tl.constexpr, BLOCK_F: tl.constexpr):
        """One (image, head, block of features): the adjoint ``g_p = dh_p + a_up(p+W) g_{p+W} + a_left(p+1)
        g_{p+1}`` rows last to first, columns right to left; ``dx = g``, the weights' gradients
        ``<g_p, h_{p-W}>`` and ``<g_p, h_{p-1}>`` (partial sums per block of features)."""
        gh = tl.program_id(0).to(tl.int64)
        fb = tl.program_id(1).to(tl.int64)
        ff = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        g, h = gh // heads, gh % heads
        base = tl.load(GRAPH_PTR + g)
        size = tl.load(GRAPH_PTR + g + 1) - base
        width = tl.load(ROW_WIDTH + g)
        rows = tl.where(size > 0, size // tl.maximum(width, 1), 0)
        j = tl.arange(0, BLOCK_W)
        col = width - 1 - j
        col_ok = j < width
        f_ok = (ff < F)[None, :]
        ok = col_ok[:, None] & f_ok
        below = tl.zeros([BLOCK_W, BLOCK_F], dtype=DX.dtype.element_ty)
        r = rows - 1
        while r >= 0:
            position = base + r * width + col
            node = tl.load(NODES + position, mask=col_ok, other=0)
            has_right, has_down = col_ok & (col + 1 < width), _and_scalar(col_ok, r + 1 < rows)
            has_left, has_up = col_ok & (col > 0), _and_scalar(col_ok, r > 0)
            right = tl.load(NODES + position + 1, mask=has_right, other=0)
            down = tl.load(NODES + position + width, mask=has_down, other=0)
            left = tl.load(NODES + position - 1, mask=has_left, other=0)
            up = tl.load(NODES + position - width, mask=has_up, other=0)
            w_right = tl.load(WEIGHT + (right * 2 + 1) * heads + h, mask=has_right, other=0.0)
            w_down = tl.load(WEIGHT + (down * 2) * heads + h, mask=has_down, other=0.0)
            offset = (node * heads + h)[:, None] * F + ff[None, :]
            grad_out = tl.load(DOUT + offset, mask=ok, other=0.0)
            adjoint = _scan_columns(w_right[:, None], grad_out + w_down[:, None] * below)
            tl.store(DX + offset, adjoint, mask=ok)
            state_up = tl.load(OUT + (up * heads + h)[:, None] * F + ff[None, :], mask=has_up[:, None] & f_ok,
                               other=0.0)
            state_left = tl.load(OUT + (left * heads + h)[:, None] * F + ff[None, :], mask=has_left[:, None] & f_ok,
                                 other=0.0)
            weight_grad = DW + fb * num_nodes * 2 * heads + node * 2 * heads + h
            tl.store(weight_grad, tl.sum(adjoint * state_up, axis=1), mask=col_ok)
            tl.store(weight_grad + heads, tl.sum(adjoint * state_left, axis=1), mask=col_ok)
            below = adjoint
            r -= 1


def grid_triton_available(tensor: Tensor) -> bool:
    """Whether the kernels can run on ``tensor``'s device: CUDA with Triton installed, or any device
    in Triton's interpreter (:data:`INTERPRETED`)."""
    return HAS_TRITON and (INTERPRETED or tensor.device.type == "cuda")


def _check_device(*tensors: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton_grid: Triton is not installed")
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(f"triton_grid: the kernels run on CUDA tensors (or on any tensors in Triton's "
                               f"interpreter, TRITON_INTERPRET=1 before Triton is imported), got a tensor on "
                               f"{t.device}")


def _reduce(partials: Tensor) -> Tensor:
    """Sum the per-block partial sums (leading axis); one block is the result itself."""
    return partials[0] if partials.size(0) == 1 else partials.sum(0)


def _launch_grid(programs: int, blocks: int) -> Tuple[int, int]:
    """``(image x head, block of the state or features)``, checked against CUDA's grid limits."""
    if programs >= 2 ** 31:
        raise ValueError(f"graph_ptr, query: {programs} (image, head) pairs, over CUDA's 2^31 - 1 programs on grid "
                         f"axis 0")
    if blocks > MAX_GRID_YZ:
        raise ValueError(f"block_s, block_p: the state splits into {blocks} blocks, over CUDA's {MAX_GRID_YZ} on grid "
                         f"axis 1; pass larger blocks to grid_plan")
    return programs, blocks


def _attention_meta(max_width: int, block_s: int, block_p: int) -> dict:
    """The compile-time arguments of the attention kernels. (The block counts ``P_BLOCKS`` and
    ``S_BLOCKS`` are runtime arguments: as constants they compiled one variant per split.)"""
    return dict(BLOCK_W=_next_power_of_2(max(1, max_width)), BLOCK_S=block_s, BLOCK_P=block_p,
                num_warps=NUM_WARPS)


def _solve_meta(max_width: int, block_f: int) -> dict:
    """The compile-time arguments of the solve kernels."""
    return dict(BLOCK_W=_next_power_of_2(max(1, max_width)), BLOCK_F=block_f, num_warps=NUM_WARPS)


#: The sizes :func:`launch_configs` enumerates by default: image widths of 8 to 256 positions (the
#: image models' grids), ``S`` of 16 and 64, ``P`` (or ``F``) of 16 to 256, powers of two (the tiles
#: depend on the sizes through their next power of two only), float32 and float64. A bound, not all
#: the launches can choose: that set grows with the widest image and is hundreds of kernels.
CONFIG_WIDTHS = (8, 16, 32, 64, 128, 256)
CONFIG_STATE_DIMS = (16, 64)
CONFIG_HEAD_DIMS = (16, 32, 64, 128, 256)


def launch_configs(widths=CONFIG_WIDTHS, state_dims=CONFIG_STATE_DIMS, head_dims=CONFIG_HEAD_DIMS,
                   element_sizes=(4, 8)) -> List[Tuple[str, int, dict]]:
    """Every ``(kernel name, element size, launch arguments)`` the launches choose with the default tiles
    (:func:`tile_blocks`) for these sizes, without repeats: what the ahead-of-time compile test
    compiles. The sizes are bounded (:data:`CONFIG_WIDTHS`, ...): the tiles the launches can choose
    grow with the widest image, without bound."""
    configs = {}
    for size in element_sizes:
        for width in widths:
            for head_dim in head_dims:
                block_f = tile_blocks(width, 1, head_dim, size)[1]
                for name in ("_solve_forward_kernel", "_solve_backward_kernel"):
                    configs[(name, size, tuple(_solve_meta(width, block_f).items()))] = None
                for state_dim in state_dims:
                    meta = _attention_meta(width, *tile_blocks(width, state_dim, head_dim, size))
                    for name in ("_attention_forward_kernel", "_attention_backward_kernel"):
                        configs[(name, size, tuple(meta.items()))] = None
    return [(name, size, dict(meta)) for name, size, meta in configs]


def _index_inputs(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return graph_ptr.long().contiguous(), row_width.long().contiguous(), nodes.long().contiguous()


# ---------------------------------------------------------------------------------------------------------------
# chimera_triton::grid_attention
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("chimera_triton::grid_attention", mutates_args=())
def _grid_attention_op(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, query: Tensor,
                       key: Tensor, value: Tensor, segment_rows: int, num_checkpoints: int, max_width: int,
                       block_s: int, block_p: int) -> Tuple[Tensor, Tensor]:
    _check_device(query)
    graph_ptr, row_width, nodes = _index_inputs(graph_ptr, row_width, nodes)
    weight, query, key, value = (t.contiguous() for t in (weight, query, key, value))
    num_nodes, heads, state_dim = query.shape
    head_dim = value.size(2)
    s_blocks, p_blocks = triton.cdiv(state_dim, block_s), triton.cdiv(head_dim, block_p)
    checkpoints = query.new_empty(num_checkpoints, heads, state_dim, head_dim)
    num_graphs = graph_ptr.numel() - 1
    if num_nodes == 0 or heads == 0 or head_dim == 0 or state_dim == 0 or num_graphs == 0:
        return value.new_zeros(value.shape), checkpoints
    partial_y = value.new_empty(s_blocks, num_nodes, heads, head_dim)
    with device_guard(query):
        _attention_forward_kernel[_launch_grid(num_graphs * heads, s_blocks * p_blocks)](
            graph_ptr, row_width, nodes, weight, query, key, value, partial_y, checkpoints,
            _checkpoint_ptr(graph_ptr, row_width, segment_rows), num_nodes, heads, state_dim, head_dim,
            segment_rows, p_blocks, **_attention_meta(max_width, block_s, block_p))
    return _reduce(partial_y), checkpoints


@_grid_attention_op.register_fake
def _grid_attention_fake(graph_ptr, row_width, nodes, weight, query, key, value, segment_rows, num_checkpoints,
                         max_width, block_s, block_p):
    return value.new_empty(value.shape), query.new_empty(num_checkpoints, query.size(1), query.size(2),
                                                         value.size(2))


@torch.library.custom_op("chimera_triton::grid_attention_backward", mutates_args=())
def _grid_attention_backward_op(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, query: Tensor,
                                key: Tensor, value: Tensor, checkpoints: Tensor, grad_y: Tensor, segment_rows: int,
                                max_width: int, block_s: int, block_p: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_device(query)
    graph_ptr, row_width, nodes = _index_inputs(graph_ptr, row_width, nodes)
    weight, query, key, value, checkpoints = (t.contiguous() for t in (weight, query, key, value, checkpoints))
    grad_y = grad_y.to(value.dtype).contiguous()
    num_nodes, heads, state_dim = query.shape
    head_dim = value.size(2)
    num_graphs = graph_ptr.numel() - 1
    if num_nodes == 0 or heads == 0 or head_dim == 0 or state_dim == 0 or num_graphs == 0:
        return (torch.zeros_like(weight), torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value))
    s_blocks, p_blocks = triton.cdiv(state_dim, block_s), triton.cdiv(head_dim, block_p)
    block_w = _next_power_of_2(max(1, max_width))
    programs = num_graphs * heads * s_blocks * p_blocks
    scratch = query.new_empty(programs * (segment_rows + 1) * block_w * block_s * block_p)
    partial_q = query.new_empty(p_blocks, num_nodes, heads, state_dim)
    partial_k = query.new_empty(p_blocks, num_nodes, heads, state_dim)
    partial_v = value.new_empty(s_blocks, num_nodes, heads, head_dim)
    # Weights of missing parents get zero: the kernel writes zero for them (their state is masked to zero).
    partial_w = weight.new_empty(s_blocks * p_blocks, num_nodes, 2, heads)
    with device_guard(query):
        _attention_backward_kernel[_launch_grid(num_graphs * heads, s_blocks * p_blocks)](
            graph_ptr, row_width, nodes, weight, query, key, value, grad_y, checkpoints,
            _checkpoint_ptr(graph_ptr, row_width, segment_rows), scratch, partial_q, partial_k, partial_v,
            partial_w, num_nodes, heads, state_dim, head_dim, segment_rows, p_blocks, s_blocks,
            **_attention_meta(max_width, block_s, block_p))
    return _reduce(partial_w), _reduce(partial_q), _reduce(partial_k), _reduce(partial_v)


@_grid_attention_backward_op.register_fake
def _grid_attention_backward_fake(graph_ptr, row_width, nodes, weight, query, key, value, checkpoints, grad_y,
                                  segment_rows, max_width, block_s, block_p):
    return (weight.new_empty(weight.shape), query.new_empty(query.shape), key.new_empty(key.shape),
            value.new_empty(value.shape))


def _grid_attention_setup_context(ctx, inputs, output):
    (graph_ptr, row_width, nodes, weight, query, key, value, segment_rows, num_checkpoints, max_width, block_s,
     block_p) = inputs
    ctx.save_for_backward(graph_ptr, row_width, nodes, weight, query, key, value, output[1])
    ctx.sizes = (segment_rows, max_width, block_s, block_p)
    ctx.set_materialize_grads(False)  # the checkpoints are internal: their gradient stays None


def _grid_attention_backward(ctx, grad_y, grad_checkpoints):
    graph_ptr, row_width, nodes, weight, query, key, value, checkpoints = ctx.saved_tensors
    if grad_y is None:
        grads = (torch.zeros_like(weight), torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value))
    else:
        grads = torch.ops.chimera_triton.grid_attention_backward(graph_ptr, row_width, nodes, weight, query, key,
                                                                 value, checkpoints, grad_y, *ctx.sizes)
    return (None, None, None, *grads, None, None, None, None, None)


_grid_attention_op.register_autograd(_grid_attention_backward, setup_context=_grid_attention_setup_context)


def grid_attention_triton(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, query: Tensor,
                          key: Tensor, value: Tensor, segment_rows: Optional[int] = None, *,
                          plan: Optional[GridPlan] = None) -> Tensor:
    r""":func:`.grid.grid_attention` by the Triton kernels (module docstring): resolvent attention on one
    directed grid DAG per image, one launch forward and one backward for the whole batch.

    Args:
        graph_ptr (LongTensor): ``[G + 1]`` first node of every image.
        row_width (LongTensor): ``[G]`` positions per row (it divides every image's node count).
        nodes (LongTensor): ``[N]`` the walk: a permutation of every image's own nodes.
        weight (Tensor): ``[N, 2, H]``: ``weight[i, 0]`` the edge from the node above ``i`` in the
            walk, ``weight[i, 1]`` from the node before it in its row; ignored (zero gradient)
            where there is no such parent.
        query (Tensor): ``[N, H, S]``. key (Tensor): ``[N, H, S]``. value (Tensor): ``[N, H, P]``.
        segment_rows (int, optional): rows between checkpoints of the backward (default
            :func:`default_segment_rows`); ignored when ``plan`` is given.
        plan (GridPlan, optional): :func:`grid_plan` of this batch for these ``S`` and ``P``; without
            it the call synchronizes once with the device to make one. The walks' validity (a
            permutation within every image) is not checked.

    Differentiable in ``weight``, ``query``, ``key`` and ``value``; float16 / bfloat16 run in float32.

    :rtype: :class:`Tensor` ``[N, H, P]``.
    """
    _check_device(query)
    if query.dim() != 3 or key.shape != query.shape or value.dim() != 3 or value.shape[:2] != query.shape[:2]:
        raise ValueError(f"query, key, value: expected shapes [N, H, S], [N, H, S] and [N, H, P], got "
                         f"{list(query.shape)}, {list(key.shape)} and {list(value.shape)}")
    num_nodes, heads = query.shape[:2]
    if weight.shape != (num_nodes, 2, heads) or nodes.shape != (num_nodes,):
        raise ValueError(f"weight, nodes: expected shapes [N, 2, H] = [{num_nodes}, 2, {heads}] and [N], got "
                         f"{list(weight.shape)} and {list(nodes.shape)}")
    for name, t in (("key", key), ("value", value), ("weight", weight)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name}: expected dtype {query.dtype} on {query.device} (like query), got {t.dtype} "
                             f"on {t.device}")
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return grid_attention_triton(graph_ptr, row_width, nodes, weight.float(), query.float(), key.float(),
                                     value.float(), segment_rows, plan=plan).to(dtype)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"query: expected a floating dtype, got {dtype}")
    if plan is None:
        plan = grid_plan(graph_ptr, row_width, query.size(2), value.size(2), segment_rows,
                         element_size=query.element_size())
    if plan.num_nodes != num_nodes:
        raise ValueError(f"graph_ptr: the images must cover the N = {num_nodes} nodes, they cover {plan.num_nodes}")
    y, _ = torch.ops.chimera_triton.grid_attention(graph_ptr, row_width, nodes, weight, query, key, value,
                                                   plan.segment_rows, plan.num_checkpoints, plan.max_width,
                                                   plan.block_s, plan.block_p)
    return y


# ---------------------------------------------------------------------------------------------------------------
# chimera_triton::grid_solve
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("chimera_triton::grid_solve", mutates_args=())
def _grid_solve_op(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, x: Tensor, max_width: int,
                   block_f: int) -> Tensor:
    _check_device(x)
    graph_ptr, row_width, nodes = _index_inputs(graph_ptr, row_width, nodes)
    weight, x = weight.contiguous(), x.contiguous()
    num_nodes, heads, features = x.shape
    num_graphs = graph_ptr.numel() - 1
    if x.numel() == 0 or num_graphs == 0:
        return torch.zeros_like(x)
    out = torch.empty_like(x)
    with device_guard(x):
        _solve_forward_kernel[_launch_grid(num_graphs * heads, triton.cdiv(features, block_f))](
            graph_ptr, row_width, nodes, weight, x, out, heads, features, **_solve_meta(max_width, block_f))
    return out


@_grid_solve_op.register_fake
def _grid_solve_fake(graph_ptr, row_width, nodes, weight, x, max_width, block_f):
    return x.new_empty(x.shape)


@torch.library.custom_op("chimera_triton::grid_solve_backward", mutates_args=())
def _grid_solve_backward_op(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, out: Tensor,
                            grad_out: Tensor, max_width: int, block_f: int) -> Tuple[Tensor, Tensor]:
    _check_device(out)
    graph_ptr, row_width, nodes = _index_inputs(graph_ptr, row_width, nodes)
    weight, out = weight.contiguous(), out.contiguous()
    grad_out = grad_out.to(out.dtype).contiguous()
    num_nodes, heads, features = out.shape
    num_graphs = graph_ptr.numel() - 1
    if out.numel() == 0 or num_graphs == 0:
        return torch.zeros_like(weight), torch.zeros_like(out)
    f_blocks = triton.cdiv(features, block_f)
    grad_x = torch.empty_like(out)
    partial_w = weight.new_empty(f_blocks, num_nodes, 2, heads)
    with device_guard(out):
        _solve_backward_kernel[_launch_grid(num_graphs * heads, f_blocks)](
            graph_ptr, row_width, nodes, weight, out, grad_out, grad_x, partial_w, num_nodes, heads, features,
            **_solve_meta(max_width, block_f))
    return _reduce(partial_w), grad_x


@_grid_solve_backward_op.register_fake
def _grid_solve_backward_fake(graph_ptr, row_width, nodes, weight, out, grad_out, max_width, block_f):
    return weight.new_empty(weight.shape), out.new_empty(out.shape)


def _grid_solve_setup_context(ctx, inputs, output):
    graph_ptr, row_width, nodes, weight, x, max_width, block_f = inputs
    ctx.save_for_backward(graph_ptr, row_width, nodes, weight, output)
    ctx.sizes = (max_width, block_f)


def _grid_solve_backward(ctx, grad_out):
    graph_ptr, row_width, nodes, weight, out = ctx.saved_tensors
    grad_weight, grad_x = torch.ops.chimera_triton.grid_solve_backward(graph_ptr, row_width, nodes, weight, out,
                                                                       grad_out, *ctx.sizes)
    return None, None, None, grad_weight, grad_x, None, None


_grid_solve_op.register_autograd(_grid_solve_backward, setup_context=_grid_solve_setup_context)


def grid_solve_triton(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, x: Tensor, *,
                      plan: Optional[GridPlan] = None) -> Tensor:
    r"""Solve :math:`(\mathbf{I} - \mathbf{A})\mathbf{h} = \mathbf{x}` on one directed grid DAG per
    image, ``A`` given as :func:`grid_attention_triton`'s weight table: row by row,

    .. math::
        \mathbf{h}_p = a^{\uparrow}_p \mathbf{h}_{p-W} + a^{\leftarrow}_p \mathbf{h}_{p-1} + \mathbf{x}_p.

    Args:
        graph_ptr, row_width, nodes, weight: as for :func:`grid_attention_triton`.
        x (Tensor): ``[N, H, F]``.
        plan (GridPlan, optional): :func:`grid_plan` with ``state_dim=1, head_dim=F`` (its
            ``block_p`` is the block of features).

    Differentiable in ``weight`` and ``x``. :rtype: :class:`Tensor` ``[N, H, F]``.
    """
    _check_device(x)
    if x.dim() != 3 or weight.shape != (x.size(0), 2, x.size(1)) or nodes.shape != (x.size(0),):
        raise ValueError(f"x, weight, nodes: expected shapes [N, H, F], [N, 2, H] and [N], got {list(x.shape)}, "
                         f"{list(weight.shape)} and {list(nodes.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight: expected dtype {x.dtype} on {x.device} (like x), got {weight.dtype} on "
                         f"{weight.device}")
    if x.dtype in (torch.float16, torch.bfloat16):
        return grid_solve_triton(graph_ptr, row_width, nodes, weight.float(), x.float(), plan=plan).to(x.dtype)
    if plan is None:
        plan = grid_plan(graph_ptr, row_width, 1, x.size(2), element_size=x.element_size())
    if plan.num_nodes != x.size(0):
        raise ValueError(f"graph_ptr: the images must cover the N = {x.size(0)} nodes, they cover {plan.num_nodes}")
    return torch.ops.chimera_triton.grid_solve(graph_ptr, row_width, nodes, weight, x, plan.max_width, plan.block_p)


def grid_solve_reference(graph_ptr: Tensor, row_width: Tensor, nodes: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """:func:`grid_solve_triton` in plain PyTorch, one position at a time (differentiable by autograd;
    for tests)."""
    heads = x.size(1)
    outputs: List[Tensor] = [x.new_zeros(x.shape[1:])] * x.size(0)
    for g in range(graph_ptr.numel() - 1):
        start, end = int(graph_ptr[g]), int(graph_ptr[g + 1])
        width = int(row_width[g]) if end > start else 1
        states: List[Tensor] = []
        for p in range(end - start):
            i = int(nodes[start + p])
            state = x[i]
            if p >= width:
                state = state + weight[i, 0].view(heads, 1) * states[p - width]
            if p % width:
                state = state + weight[i, 1].view(heads, 1) * states[p - 1]
            states.append(state)
            outputs[i] = state
    return torch.stack(outputs) if outputs else x.new_zeros(x.shape)


__all__: Tuple[str, ...] = ("HAS_TRITON", "INTERPRETED", "GridPlan", "grid_plan", "default_segment_rows",
                            "grid_triton_available",
                            "tile_blocks", "grid_attention_triton", "grid_solve_triton", "grid_solve_reference",
                            "TILE_BYTES")
