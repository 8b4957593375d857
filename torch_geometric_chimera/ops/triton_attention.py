r"""Triton kernels of :math:`\mathbf{y} = (\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}` for padded
batches (the last step of :func:`~.squaring.squaring_resolvent_attention`), FlashAttention-style.

For every ``(graph, head)`` and block of ``BLOCK_M`` rows, the forward kernel walks the blocks of
``BLOCK_N`` columns and accumulates

.. math::
    \mathbf{y}_I \mathrel{+}= \left(\mathbf{L}_{IJ} \odot \mathbf{Q}_I \mathbf{K}_J^\top\right) \mathbf{V}_J

in registers: the scores :math:`\mathbf{Q}\mathbf{K}^\top` are never written to memory. With
:math:`\partial\mathbf{M}_{IJ} = \partial\mathbf{Y}_I \mathbf{V}_J^\top` recomputed tile by tile, the
backward is two kernels:

- by rows: :math:`\partial\mathbf{Q}_I = \sum_J (\partial\mathbf{M}_{IJ} \odot \mathbf{L}_{IJ})
  \mathbf{K}_J`, and it writes :math:`\partial\mathbf{L}_{IJ} = \partial\mathbf{M}_{IJ} \odot
  \mathbf{Q}_I\mathbf{K}_J^\top`, the input of :math:`\partial\mathbf{A} = \mathbf{L}^\top
  \partial\mathbf{L}\,\mathbf{L}^\top`;
- by columns: :math:`\partial\mathbf{K}_J = \sum_I (\partial\mathbf{M}_{IJ} \odot \mathbf{L}_{IJ})^\top
  \mathbf{Q}_I` and :math:`\partial\mathbf{V}_J = \sum_I (\mathbf{L}_{IJ} \odot
  \mathbf{Q}_I\mathbf{K}_J^\top)^\top \partial\mathbf{Y}_I`.

So nothing larger than ``L`` (``[m, m]`` per graph and head) is materialized: ``dL`` itself.

**Tiles.** No tile grows with ``S`` or ``P``: the products ``Q_I K_Jᵀ`` and ``dY_I V_Jᵀ`` loop over
tiles of the features (:data:`STATE_BLOCKS`, :data:`HEAD_BLOCKS`), and the outputs' features are
split over grid axis 2 (``y`` by head features; ``dQ``, ``dK`` by state features; ``dV`` by head
features, in programs of their own). The configurations the launch code can choose are few
(:func:`launch_configs`); warps and stages were chosen from their kernels compiled ahead of time for
sm_80 and sm_90 (shared memory, spills: ``tests/ops/test_triton_aot.py`` checks every one), never by
trial at run time. Every launch runs under :func:`device_guard`, on its tensors' device.

Triton is optional (:data:`HAS_TRITON`): without it the module imports, and only the kernels'
entry points raise. The kernels run on CUDA tensors, or in Triton's interpreter (on CPU tensors,
how the tests check them without a GPU). Triton reads ``TRITON_INTERPRET`` each time
``triton.jit`` decorates a function, and its own library (``tl.zeros``, ...) is decorated when
``triton`` is first imported: so the variable must be set before anything imports Triton
(:data:`INTERPRETED` records it); the tests run these kernels in a subprocess for that reason.
:func:`~.squaring.squaring_resolvent_attention` takes this path with ``fused=True``.

The loops run to runtime bounds (``range(0, m, BLOCK_N)``: one compiled variant for every ``m``).
Triton 3.6's interpreter cannot run such a loop under numpy 2.4 (``int()`` of a one-element array,
triton-lang/triton#9171); 3.9's can, and compiled kernels never had the problem.

Precision: float32 inputs at ``precision="float32"`` multiply in ``tf32x3`` on the tensor cores
(:data:`FLOAT32_INPUT_PRECISION`), float64 inputs in float64. ``"tf32"`` and ``"bf16"`` round every
``tl.dot`` operand exactly as :func:`~.squaring.round_to_precision` does (integer operations on the
float32 bits, the same on the GPU and in the interpreter), then multiply on the tensor cores (tf32, or bf16 operands) with float32
accumulation; the rounded values are representable, so the hardware adds no rounding of its own.

:func:`attention_reference` is the pure-PyTorch specification the kernels are tested against.
"""
import contextlib
from typing import List, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - the module works without it, the kernels do not
    triton = tl = None
    HAS_TRITON = False

#: Whether the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` was set when this module
#: (and Triton, whose own library functions are decorated at import) was imported.
INTERPRETED = HAS_TRITON and bool(triton.knobs.runtime.interpret)

PRECISIONS = ("float32", "tf32", "bf16")


def attention_reference(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    r""":math:`(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}` in PyTorch, for ``[..., m, m]``,
    ``[..., m, S]``, ``[..., m, S]`` and ``[..., m, P]``: what the kernels compute."""
    return (resolvent * (q @ k.transpose(-1, -2))) @ v


if HAS_TRITON:
    @triton.jit
    def _operand(x, ROUND: tl.constexpr, OPERAND: tl.constexpr):
        """A ``tl.dot`` operand rounded like :func:`~.squaring.round_to_precision` (``ROUND``: 0 none,
        1 tf32: 10 mantissa bits, to nearest, ties away from zero; 2 bf16: 7 bits, to nearest even),
        by integer operations on the float32 bits, so that the GPU and the interpreter agree; then cast
        to ``OPERAND`` (bfloat16 on a GPU for bf16 tensor cores: exact, the value being representable)."""
        if ROUND == 1:
            bits = x.to(tl.int32, bitcast=True)
            x = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 == ~0x1FFF
        elif ROUND == 2:
            bits = x.to(tl.int32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)  # ~0xFFFF
        return x.to(OPERAND)

    @triton.jit
    def _products(X, Y, x_rows, y_rows, x_ok, y_ok, F, BLOCK_F: tl.constexpr, ROUND: tl.constexpr,
                  OPERAND: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """``X[x_rows] @ Y[y_rows]ᵀ`` over all ``F`` features of two ``[m, F]`` matrices, ``BLOCK_F`` at a
        time: the scores ``Q_I K_Jᵀ`` (``F = S``) or ``dM_IJ = dY_I V_Jᵀ`` (``F = P``) of one tile."""
        acc = tl.zeros([x_rows.shape[0], y_rows.shape[0]], dtype=X.dtype.element_ty)
        for start in range(0, F, BLOCK_F):
            f = start + tl.arange(0, BLOCK_F)
            x = tl.load(X + x_rows[:, None] * F + f[None, :], mask=x_ok[:, None] & (f < F)[None, :], other=0.0)
            y = tl.load(Y + y_rows[:, None] * F + f[None, :], mask=y_ok[:, None] & (f < F)[None, :], other=0.0)
            acc += tl.dot(_operand(x, ROUND, OPERAND), tl.trans(_operand(y, ROUND, OPERAND)),
                          input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _forward_kernel(L, Q, K, V, Y, m, S, P,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_P: tl.constexpr, ROUND: tl.constexpr, OPERAND: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr):
        """One block of rows and one block of head features of one (graph, head):
        ``Y_I = sum_J (L_IJ * Q_I K_Jᵀ) V_J``."""
        bh = tl.program_id(0).to(tl.int64)  # (graph, head) on axis 0: up to 2^31 - 1
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        fp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        row_ok = rows < m
        Q, K, V, L = Q + bh * m * S, K + bh * m * S, V + bh * m * P, L + bh * m * m
        acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=Y.dtype.element_ty)
        for start in range(0, m, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < m
            scores = _products(Q, K, rows, cols, row_ok, col_ok, S, BLOCK_S, ROUND, OPERAND, INPUT_PRECISION)
            lij = tl.load(L + rows[:, None] * m + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            v = tl.load(V + cols[:, None] * P + fp[None, :], mask=col_ok[:, None] & (fp < P)[None, :], other=0.0)
            acc += tl.dot(_operand(lij * scores, ROUND, OPERAND), _operand(v, ROUND, OPERAND),
                          input_precision=INPUT_PRECISION)
        tl.store(Y + bh * m * P + rows[:, None] * P + fp[None, :], acc, mask=row_ok[:, None] & (fp < P)[None, :])

    @triton.jit
    def _backward_rows_kernel(L, Q, K, V, DY, DL, DQ, m, S, P,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                              BLOCK_P: tl.constexpr, ROUND: tl.constexpr, OPERAND: tl.constexpr,
                              INPUT_PRECISION: tl.constexpr):
        """One block of rows and one block of state features: ``dQ_I = sum_J (dM_IJ * L_IJ) K_J`` and
        (by the programs of the first block of state features) ``dL_IJ = dM_IJ * Q_I K_Jᵀ``, with
        ``dM_IJ = dY_I V_Jᵀ``."""
        bh = tl.program_id(0).to(tl.int64)  # (graph, head) on axis 0: up to 2^31 - 1
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        fs = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
        row_ok = rows < m
        Q, K, V, DY, L = Q + bh * m * S, K + bh * m * S, V + bh * m * P, DY + bh * m * P, L + bh * m * m
        dq = tl.zeros([BLOCK_M, BLOCK_S], dtype=DQ.dtype.element_ty)
        for start in range(0, m, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < m
            tile = rows[:, None] * m + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            grad_mask = _products(DY, V, rows, cols, row_ok, col_ok, P, BLOCK_P, ROUND, OPERAND, INPUT_PRECISION)
            lij = tl.load(L + tile, mask=tile_ok, other=0.0)
            k = tl.load(K + cols[:, None] * S + fs[None, :], mask=col_ok[:, None] & (fs < S)[None, :], other=0.0)
            dq += tl.dot(_operand(grad_mask * lij, ROUND, OPERAND), _operand(k, ROUND, OPERAND),
                         input_precision=INPUT_PRECISION)
            if tl.program_id(2) == 0:  # dL once per tile: every entry of it is written (no zero fill needed)
                scores = _products(Q, K, rows, cols, row_ok, col_ok, S, BLOCK_S, ROUND, OPERAND, INPUT_PRECISION)
                tl.store(DL + bh * m * m + tile, grad_mask * scores, mask=tile_ok)
        tl.store(DQ + bh * m * S + rows[:, None] * S + fs[None, :], dq, mask=row_ok[:, None] & (fs < S)[None, :])

    @triton.jit
    def _backward_columns_kernel(L, Q, K, V, DY, DK, DV, m, S, P,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                                 BLOCK_P: tl.constexpr, ROUND: tl.constexpr, OPERAND: tl.constexpr,
                                 INPUT_PRECISION: tl.constexpr):
        """One block of columns and, by grid axis 2, one block of state features
        (``dK_J = sum_I (dM_IJ * L_IJ)ᵀ Q_I``, ``z < cdiv(S, BLOCK_S)``) or of head features
        (``dV_J = sum_I (L_IJ * Q_I K_Jᵀ)ᵀ dY_I``, the following ``z``). Apart, each keeps one product
        tile and one accumulator live: together they spilled up to 1.1 KB per thread in tf32x3."""
        bh = tl.program_id(0).to(tl.int64)  # (graph, head) on axis 0: up to 2^31 - 1
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tl.program_id(2)
        s_blocks = tl.cdiv(S, BLOCK_S)
        col_ok = cols < m
        Q, K, V, DY, L = Q + bh * m * S, K + bh * m * S, V + bh * m * P, DY + bh * m * P, L + bh * m * m
        if z < s_blocks:
            fs = z * BLOCK_S + tl.arange(0, BLOCK_S)
            dk = tl.zeros([BLOCK_N, BLOCK_S], dtype=DK.dtype.element_ty)
            for start in range(0, m, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < m
                grad_mask = _products(DY, V, rows, cols, row_ok, col_ok, P, BLOCK_P, ROUND, OPERAND,
                                      INPUT_PRECISION)
                lij = tl.load(L + rows[:, None] * m + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                              other=0.0)
                q = tl.load(Q + rows[:, None] * S + fs[None, :], mask=row_ok[:, None] & (fs < S)[None, :], other=0.0)
                dk += tl.dot(tl.trans(_operand(grad_mask * lij, ROUND, OPERAND)), _operand(q, ROUND, OPERAND),
                             input_precision=INPUT_PRECISION)
            tl.store(DK + bh * m * S + cols[:, None] * S + fs[None, :], dk, mask=col_ok[:, None] & (fs < S)[None, :])
        else:
            fp = (z - s_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
            dv = tl.zeros([BLOCK_N, BLOCK_P], dtype=DV.dtype.element_ty)
            for start in range(0, m, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                row_ok = rows < m
                scores = _products(Q, K, rows, cols, row_ok, col_ok, S, BLOCK_S, ROUND, OPERAND, INPUT_PRECISION)
                lij = tl.load(L + rows[:, None] * m + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                              other=0.0)
                dy = tl.load(DY + rows[:, None] * P + fp[None, :], mask=row_ok[:, None] & (fp < P)[None, :],
                             other=0.0)
                dv += tl.dot(tl.trans(_operand(lij * scores, ROUND, OPERAND)), _operand(dy, ROUND, OPERAND),
                             input_precision=INPUT_PRECISION)
            tl.store(DV + bh * m * P + cols[:, None] * P + fp[None, :], dv, mask=col_ok[:, None] & (fp < P)[None, :])


def _flat(x: Tensor) -> Tensor:
    """``[..., m, F] -> [B, m, F]`` contiguous."""
    return x.reshape(-1, x.size(-2), x.size(-1)).contiguous()


def device_guard(tensor: Tensor):
    """Makes ``tensor``'s CUDA device the current one for a kernel launch (a Triton launch runs on the
    current device, not on its arguments' device: the ``CUDAGuard`` of the ``.cu`` kernels); nothing
    for tensors elsewhere (Triton's interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


#: Row (and column) tiles, state feature tiles and head feature tiles the launch code chooses from:
#: :func:`tile_sizes`. Larger ``S`` and ``P`` are walked in tiles (a loop over ``S`` and ``P`` in the
#: products, a grid axis over the output's features), so that no tile grows with them: at
#: ``BLOCK_P = 256`` the backward kernels needed 232-320 KB of shared memory on sm_90, over its 227 KB.
ROW_BLOCKS = (32, 64)
STATE_BLOCKS = (16, 32)
HEAD_BLOCKS = (32, 64)

#: The ``tl.dot`` input precision of float32 inputs at ``precision="float32"``: ``"tf32x3"``, three
#: TF32 passes on the tensor cores (hi·hi + hi·lo + lo·hi). Its error, measured by an exact emulation
#: (``benchmarks/bench_triton_precision.py``, ``benchmarks/results/triton_precision_cpu.json``), is
#: at most 1.69x float32's on cyclic graphs and DAGs (output and every gradient; the rule of issue 17
#: was 2x), whereas ``"ieee"`` runs every product on the FMA units. Not measured on a GPU.
FLOAT32_INPUT_PRECISION = "tf32x3"

#: The precisions a launch can run: name -> (ROUND, whether the operands are bfloat16 on a GPU,
#: INPUT_PRECISION; float32's is :data:`FLOAT32_INPUT_PRECISION`). "float64" is
#: ``precision="float32"`` on float64 tensors.
_KINDS = {"float32": (0, False, None), "float64": (0, False, "ieee"),
          "tf32": (1, False, "tf32"), "bf16": (2, True, "ieee")}


def row_blocks(kind: str) -> Tuple[int, ...]:
    """The row tiles of a precision kind: :data:`ROW_BLOCKS`, but at most 32 rows in tf32x3, whose
    hi / lo operand halves spilled 0.6-1.4 KB per thread at 64-row tiles on sm_80 (0.3 KB at 32)."""
    return tuple(b for b in ROW_BLOCKS if b <= 32) if kind == "float32" and FLOAT32_INPUT_PRECISION == "tf32x3" \
        else ROW_BLOCKS


def tile_sizes(m: int, state_dim: int, head_dim: int, kind: str = "float64") -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_S, BLOCK_P)``: the smallest of :func:`row_blocks` of ``kind``,
    :data:`STATE_BLOCKS` and :data:`HEAD_BLOCKS` that holds ``m``, ``S`` and ``P``, else the largest
    (then tiled)."""
    return tuple(next((b for b in blocks if b >= size), blocks[-1])
                 for size, blocks in ((m, row_blocks(kind)), (state_dim, STATE_BLOCKS), (head_dim, HEAD_BLOCKS)))


def num_warps_for(block_m: int) -> int:
    """Warps per program: 8. With 4, the backward kernels spilled 0.5-1.6 KB per thread at 64-row
    tiles, and in tf32x3 at 32-row tiles (sm_80 and sm_90, Triton 3.9's ptxas; see
    ``tests/ops/test_triton_aot.py``)."""
    return 8


#: Software pipelining stages of the kernels' loops. The products' loads sit in an inner loop over
#: feature tiles (one iteration for ``S``, ``P`` up to a tile), so deeper pipelines buy little and
#: cost shared memory.
NUM_STAGES = 2


def _config(block_m: int, block_s: int, block_p: int, kind: str, interpreted: bool = False) -> dict:
    """The launch arguments of every kernel for these tiles and precision kind (:data:`_KINDS`)."""
    rounding, bf16_operands, input_precision = _KINDS[kind]
    if kind == "float32":
        input_precision = FLOAT32_INPUT_PRECISION
    # The interpreter multiplies bfloat16 operands as their raw uint16 bits: keep them in float32 there.
    operand = tl.float64 if kind == "float64" else tl.bfloat16 if bf16_operands and not interpreted else tl.float32
    return dict(BLOCK_M=block_m, BLOCK_N=block_m, BLOCK_S=block_s, BLOCK_P=block_p, ROUND=rounding,
                OPERAND=operand, INPUT_PRECISION=input_precision, num_warps=num_warps_for(block_m),
                num_stages=NUM_STAGES)


def _kind(dtype: torch.dtype, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if dtype not in (torch.float32, torch.float64) or (precision != "float32" and dtype != torch.float32):
        raise TypeError(f"resolvent: expected float32 tensors (or float64 with precision='float32'), got {dtype} "
                        f"with precision={precision!r}")
    return "float64" if dtype == torch.float64 else precision


def _launch_config(m: int, state_dim: int, head_dim: int, dtype: torch.dtype, precision: str) -> dict:
    """The launch arguments for one call: tiles from :func:`tile_sizes`, warps and stages from
    :func:`num_warps_for` and :data:`NUM_STAGES`, the precision switches. Every result is one of
    :func:`launch_configs` (with ``interpreted`` as this process runs), which the ahead-of-time compile
    test checks for shared memory, spills and tensor cores."""
    kind = _kind(dtype, precision)
    return _config(*tile_sizes(m, state_dim, head_dim, kind), kind, INTERPRETED)


def launch_configs(interpreted: bool = False) -> List[dict]:
    """Every launch configuration :func:`_launch_config` can choose (on a GPU, or in the interpreter):
    the product of the tiles and the precision kinds. The kernels take them all alike."""
    return [_config(block_m, block_s, block_p, kind, interpreted)
            for kind in _KINDS for block_m in row_blocks(kind) for block_s in STATE_BLOCKS for block_p in HEAD_BLOCKS]


#: The grid's axes 1 and 2 hold at most this many programs (CUDA's limit; axis 0 takes 2^31 - 1).
MAX_GRID_YZ = 65535


def _grid(batch: int, m: int, blocks: int, meta: dict) -> Tuple[int, int, int]:
    """``(graph x head, blocks of rows, blocks of features)``, checked against CUDA's grid limits."""
    grid = (batch, triton.cdiv(m, meta["BLOCK_M"]), blocks)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"resolvent: m = {m} nodes per graph makes {grid[1]} blocks of rows and the features "
                         f"{grid[2]} blocks, over CUDA's {MAX_GRID_YZ} per grid axis")
    return grid


def _check(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton_attention: Triton is not installed")
    m = resolvent.size(-1)
    if resolvent.shape[-2:] != (m, m):
        raise ValueError(f"resolvent: expected shape [..., m, m], got {list(resolvent.shape)}")
    lead = resolvent.shape[:-2]
    if q.shape[:-1] != (*lead, m) or k.shape != q.shape:
        raise ValueError(f"q, k: expected shape {[*lead, m, 'S']} (like resolvent), got {list(q.shape)} and "
                         f"{list(k.shape)}")
    if v.shape[:-1] != (*lead, m):
        raise ValueError(f"v: expected shape {[*lead, m, 'P']}, got {list(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != resolvent.dtype or t.device != resolvent.device:
            raise ValueError(f"{name}: expected dtype {resolvent.dtype} and device {resolvent.device} (like "
                             f"resolvent), got {t.dtype} on {t.device}")


def attention_forward(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor, precision: str = "float32") -> Tensor:
    r""":math:`(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}` by the forward kernel.

    Args:
        resolvent (Tensor): ``L``, ``[..., m, m]`` (e.g. ``[G, H, m, m]``), float32 or float64.
        q (Tensor): ``[..., m, S]``.
        k (Tensor): ``[..., m, S]``.
        v (Tensor): ``[..., m, P]``.
        precision (str, optional): ``"float32"`` (the inputs' precision), ``"tf32"`` or ``"bf16"`` for
            the products' inputs; float32 accumulation. (default: ``"float32"``)

    :rtype: :class:`Tensor` of shape ``[..., m, P]``.
    """
    _check(resolvent, q, k, v)
    m, state_dim, head_dim = resolvent.size(-1), q.size(-1), v.size(-1)
    lead = resolvent.shape[:-2]
    meta = _launch_config(m, state_dim, head_dim, q.dtype, precision)
    y = v.new_empty(*lead, m, head_dim)
    if y.numel() == 0 or state_dim == 0:  # nothing, or no scores: zero (no launch)
        return y.zero_()
    L, q3, k3, v3 = _flat(resolvent), _flat(q), _flat(k), _flat(v)
    grid = _grid(L.size(0), m, triton.cdiv(head_dim, meta["BLOCK_P"]), meta)
    with device_guard(L):
        _forward_kernel[grid](L, q3, k3, v3, y, m, state_dim, head_dim, **meta)
    return y


def attention_backward(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor, grad_y: Tensor,
                       precision: str = "float32") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Gradients ``(dL, dQ, dK, dV)`` of :func:`attention_forward` for the output gradient ``grad_y``
    (``[..., m, P]``), by the two backward kernels. ``dL`` is
    :math:`\partial\mathbf{Y}\mathbf{V}^\top \odot \mathbf{Q}\mathbf{K}^\top`, ready for
    :math:`\partial\mathbf{A} = \mathbf{L}^\top \partial\mathbf{L}\,\mathbf{L}^\top`."""
    _check(resolvent, q, k, v)
    if grad_y.shape != v.shape:
        raise ValueError(f"grad_y: expected shape {list(v.shape)} (like v), got {list(grad_y.shape)}")
    m, state_dim, head_dim = resolvent.size(-1), q.size(-1), v.size(-1)
    meta = _launch_config(m, state_dim, head_dim, q.dtype, precision)
    L, q3, k3, v3, dy = _flat(resolvent), _flat(q), _flat(k), _flat(v), _flat(grad_y.to(v.dtype))
    if L.numel() == 0 or state_dim == 0 or head_dim == 0:  # every gradient is zero (or empty): no launch
        grad_l, grad_q, grad_k, grad_v = (torch.zeros_like(t) for t in (L, q3, k3, v3))
    else:  # the kernels write every entry of every gradient: no zero fill (dL alone is G·H·m²)
        grad_l, grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (L, q3, k3, v3))
        s_blocks, p_blocks = triton.cdiv(state_dim, meta["BLOCK_S"]), triton.cdiv(head_dim, meta["BLOCK_P"])
        with device_guard(L):
            _backward_rows_kernel[_grid(L.size(0), m, s_blocks, meta)](
                L, q3, k3, v3, dy, grad_l, grad_q, m, state_dim, head_dim, **meta)
            _backward_columns_kernel[_grid(L.size(0), m, s_blocks + p_blocks, meta)](
                L, q3, k3, v3, dy, grad_k, grad_v, m, state_dim, head_dim, **meta)
    return (grad_l.view(resolvent.shape), grad_q.view(q.shape), grad_k.view(k.shape), grad_v.view(v.shape))


class FusedMaskedAttention(torch.autograd.Function):
    r""":math:`(\mathbf{L} \odot \mathbf{Q}\mathbf{K}^\top)\mathbf{V}` with the kernels' backward,
    differentiable in ``L``, ``Q``, ``K`` and ``V``."""

    @staticmethod
    def forward(ctx, resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor, precision: str) -> Tensor:
        ctx.save_for_backward(resolvent, q, k, v)
        ctx.precision = precision
        return attention_forward(resolvent, q, k, v, precision)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grads = attention_backward(*ctx.saved_tensors, grad_y, ctx.precision)
        return (*grads, None)


def fused_masked_attention(resolvent: Tensor, q: Tensor, k: Tensor, v: Tensor, precision: str = "float32") -> Tensor:
    """Differentiable :func:`attention_forward` (see :class:`FusedMaskedAttention`)."""
    return FusedMaskedAttention.apply(resolvent, q, k, v, precision)
