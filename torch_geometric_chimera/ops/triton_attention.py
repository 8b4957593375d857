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

Triton is optional (:data:`HAS_TRITON`): without it the module imports, and only the kernels'
entry points raise. The kernels run on CUDA tensors, or in Triton's interpreter (on CPU tensors,
how the tests check them without a GPU). Triton reads ``TRITON_INTERPRET`` each time
``triton.jit`` decorates a function, and its own library (``tl.zeros``, ...) is decorated when
``triton`` is first imported: so the variable must be set before anything imports Triton
(:data:`INTERPRETED` records it); the tests run these kernels in a subprocess for that reason.
:func:`~.squaring.squaring_resolvent_attention` takes this path with ``fused=True``.

Precision: ``"tf32"`` and ``"bf16"`` round every ``tl.dot`` operand exactly as
:func:`~.squaring.round_to_precision` does (integer operations on the float32 bits, the same on the
GPU and in the interpreter), then multiply on the tensor cores (tf32, or bf16 operands) with float32
accumulation; the rounded values are representable, so the hardware adds no rounding of its own.

:func:`attention_reference` is the pure-PyTorch specification the kernels are tested against.
"""
from typing import Tuple

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
    def _forward_kernel(L, Q, K, V, Y, m, S, P,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_P: tl.constexpr, NUM_BLOCKS: tl.constexpr, ROUND: tl.constexpr,
                        OPERAND: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """One block of rows of one (graph, head): ``Y_I = sum_J (L_IJ * Q_I K_Jᵀ) V_J``."""
        bh = tl.program_id(0).to(tl.int64)  # (graph, head) on axis 0: up to 2^31 - 1
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        fs = tl.arange(0, BLOCK_S)
        fp = tl.arange(0, BLOCK_P)
        row_ok = rows < m
        q = tl.load(Q + bh * m * S + rows[:, None] * S + fs[None, :], mask=row_ok[:, None] & (fs[None, :] < S),
                    other=0.0)
        q = _operand(q, ROUND, OPERAND)
        acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=Y.dtype.element_ty)
        for block in range(NUM_BLOCKS):
            cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < m
            k = tl.load(K + bh * m * S + cols[:, None] * S + fs[None, :], mask=col_ok[:, None] & (fs[None, :] < S),
                        other=0.0)
            v = tl.load(V + bh * m * P + cols[:, None] * P + fp[None, :], mask=col_ok[:, None] & (fp[None, :] < P),
                        other=0.0)
            lij = tl.load(L + bh * m * m + rows[:, None] * m + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                          other=0.0)
            scores = tl.dot(q, tl.trans(_operand(k, ROUND, OPERAND)), input_precision=INPUT_PRECISION)
            acc += tl.dot(_operand(lij * scores, ROUND, OPERAND), _operand(v, ROUND, OPERAND),
                          input_precision=INPUT_PRECISION)
        tl.store(Y + bh * m * P + rows[:, None] * P + fp[None, :], acc, mask=row_ok[:, None] & (fp[None, :] < P))

    @triton.jit
    def _backward_rows_kernel(L, Q, K, V, DY, DL, DQ, m, S, P,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                              BLOCK_P: tl.constexpr, NUM_BLOCKS: tl.constexpr, ROUND: tl.constexpr,
                              OPERAND: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """One block of rows: ``dQ_I = sum_J (dM_IJ * L_IJ) K_J`` and ``dL_IJ = dM_IJ * Q_I K_Jᵀ``,
        with ``dM_IJ = dY_I V_Jᵀ``."""
        bh = tl.program_id(0).to(tl.int64)  # (graph, head) on axis 0: up to 2^31 - 1
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        fs = tl.arange(0, BLOCK_S)
        fp = tl.arange(0, BLOCK_P)
        row_ok = rows < m
        q = tl.load(Q + bh * m * S + rows[:, None] * S + fs[None, :], mask=row_ok[:, None] & (fs[None, :] < S),
                    other=0.0)
        dy = tl.load(DY + bh * m * P + rows[:, None] * P + fp[None, :], mask=row_ok[:, None] & (fp[None, :] < P),
                     other=0.0)
        q = _operand(q, ROUND, OPERAND)
        dy = _operand(dy, ROUND, OPERAND)
        dq = tl.zeros([BLOCK_M, BLOCK_S], dtype=DQ.dtype.element_ty)
        for block in range(NUM_BLOCKS):
            cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < m
            k = tl.load(K + bh * m * S + cols[:, None] * S + fs[None, :], mask=col_ok[:, None] & (fs[None, :] < S),
                        other=0.0)
            v = tl.load(V + bh * m * P + cols[:, None] * P + fp[None, :], mask=col_ok[:, None] & (fp[None, :] < P),
                        other=0.0)
            tile = bh * m * m + rows[:, None] * m + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            lij = tl.load(L + tile, mask=tile_ok, other=0.0)
            k = _operand(k, ROUND, OPERAND)
            scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
            grad_mask = tl.dot(dy, tl.trans(_operand(v, ROUND, OPERAND)), input_precision=INPUT_PRECISION)
            dq += tl.dot(_operand(grad_mask * lij, ROUND, OPERAND), k, input_precision=INPUT_PRECISION)
            tl.store(DL + tile, grad_mask * scores, mask=tile_ok)
        tl.store(DQ + bh * m * S + rows[:, None] * S + fs[None, :], dq, mask=row_ok[:, None] & (fs[None, :] < S))

    @triton.jit
    def _backward_columns_kernel(L, Q, K, V, DY, DK, DV, m, S, P,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                                 BLOCK_P: tl.constexpr, NUM_BLOCKS: tl.constexpr, ROUND: tl.constexpr,
                                 OPERAND: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """One block of columns: ``dK_J = sum_I (dM_IJ * L_IJ)ᵀ Q_I`` and
        ``dV_J = sum_I (L_IJ * Q_I K_Jᵀ)ᵀ dY_I``."""
        bh = tl.program_id(0).to(tl.int64)  # (graph, head) on axis 0: up to 2^31 - 1
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        fs = tl.arange(0, BLOCK_S)
        fp = tl.arange(0, BLOCK_P)
        col_ok = cols < m
        k = tl.load(K + bh * m * S + cols[:, None] * S + fs[None, :], mask=col_ok[:, None] & (fs[None, :] < S),
                    other=0.0)
        v = tl.load(V + bh * m * P + cols[:, None] * P + fp[None, :], mask=col_ok[:, None] & (fp[None, :] < P),
                    other=0.0)
        k = _operand(k, ROUND, OPERAND)
        v = _operand(v, ROUND, OPERAND)
        dk = tl.zeros([BLOCK_N, BLOCK_S], dtype=DK.dtype.element_ty)
        dv = tl.zeros([BLOCK_N, BLOCK_P], dtype=DV.dtype.element_ty)
        for block in range(NUM_BLOCKS):
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < m
            q = tl.load(Q + bh * m * S + rows[:, None] * S + fs[None, :], mask=row_ok[:, None] & (fs[None, :] < S),
                        other=0.0)
            dy = tl.load(DY + bh * m * P + rows[:, None] * P + fp[None, :],
                         mask=row_ok[:, None] & (fp[None, :] < P), other=0.0)
            lij = tl.load(L + bh * m * m + rows[:, None] * m + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                          other=0.0)
            q = _operand(q, ROUND, OPERAND)
            dy = _operand(dy, ROUND, OPERAND)
            scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
            grad_mask = tl.dot(dy, tl.trans(v), input_precision=INPUT_PRECISION)
            dv += tl.dot(tl.trans(_operand(lij * scores, ROUND, OPERAND)), dy, input_precision=INPUT_PRECISION)
            dk += tl.dot(tl.trans(_operand(grad_mask * lij, ROUND, OPERAND)), q, input_precision=INPUT_PRECISION)
        tl.store(DK + bh * m * S + cols[:, None] * S + fs[None, :], dk, mask=col_ok[:, None] & (fs[None, :] < S))
        tl.store(DV + bh * m * P + cols[:, None] * P + fp[None, :], dv, mask=col_ok[:, None] & (fp[None, :] < P))


def _flat(x: Tensor) -> Tensor:
    """``[..., m, F] -> [B, m, F]`` contiguous."""
    return x.reshape(-1, x.size(-2), x.size(-1)).contiguous()


def _launch_config(m: int, state_dim: int, head_dim: int, dtype: torch.dtype, precision: str) -> dict:
    """Tile sizes (powers of two, at least 16 for ``tl.dot``), the number of tiles along ``m`` and the
    precision switches.

    The tile loops run over the constant ``NUM_BLOCKS`` rather than ``range(0, m, BLOCK)``: Triton
    3.6's interpreter converts a runtime loop bound with ``int()`` of a one-element array, which numpy
    2.4 refuses (triton-lang/triton#9171, fixed after 3.6). On a GPU this compiles one variant per
    tile count, ``ceil(m / 64)`` for ``m > 64``: a handful for graphs of up to a few hundred nodes."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if dtype not in (torch.float32, torch.float64) or (precision != "float32" and dtype != torch.float32):
        raise TypeError(f"resolvent: expected float32 tensors (or float64 with precision='float32'), got {dtype} "
                        f"with precision={precision!r}")
    block = min(64, max(16, triton.next_power_of_2(m)))
    rounding = PRECISIONS.index(precision)  # 0, 1 (tf32), 2 (bf16)
    # The interpreter multiplies bfloat16 operands as their raw uint16 bits: keep them in float32 there.
    operand = tl.float64 if dtype == torch.float64 else tl.float32
    if rounding == 2 and not INTERPRETED:
        operand = tl.bfloat16
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_S=max(16, triton.next_power_of_2(state_dim)),
                BLOCK_P=max(16, triton.next_power_of_2(head_dim)), NUM_BLOCKS=triton.cdiv(m, block), ROUND=rounding,
                OPERAND=operand, INPUT_PRECISION="tf32" if rounding == 1 else "ieee")


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
    y = v.new_empty(*lead, m, head_dim)
    if y.numel() == 0:
        return y.zero_()
    L, q3, k3, v3 = _flat(resolvent), _flat(q), _flat(k), _flat(v)
    meta = _launch_config(m, state_dim, head_dim, q.dtype, precision)
    grid = (L.size(0), triton.cdiv(m, meta["BLOCK_M"]))  # axis 1 is limited to 65535
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
    L, q3, k3, v3, dy = _flat(resolvent), _flat(q), _flat(k), _flat(v), _flat(grad_y.to(v.dtype))
    grad_l, grad_q, grad_k, grad_v = (torch.zeros_like(t) for t in (L, q3, k3, v3))
    if L.numel() and (state_dim or head_dim):
        meta = _launch_config(m, state_dim, head_dim, q.dtype, precision)
        grid = (L.size(0), triton.cdiv(m, meta["BLOCK_M"]))  # axis 1 is limited to 65535
        _backward_rows_kernel[grid](L, q3, k3, v3, dy, grad_l, grad_q, m, state_dim, head_dim,
                                                       **meta)
        _backward_columns_kernel[grid](L, q3, k3, v3, dy, grad_k, grad_v, m, state_dim, head_dim,
                                                          **meta)
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
