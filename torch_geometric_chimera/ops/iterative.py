r"""``method="iterative"``: the exact resolvent to a tolerance, with an implicit backward.

:math:`(I - A) H = X` by the fixed-point (Jacobi / Neumann) iteration :math:`H \leftarrow X + A H`
until the update falls below ``tol`` relative to :math:`H` (:func:`fixed_point`); the backward
solves the adjoint system :math:`(I - A)^\top G = \partial H` the same way, so memory does not grow
with the number of iterations (:class:`IterativeSolve`).

Converges whenever the spectral radius :math:`\rho` of :math:`A` is below 1 (e.g. the ``general``
adjacency with :math:`\gamma < 1`), and is then exact to ``tol``; otherwise it raises
:class:`ConvergenceError`, saying why. Cost per head: :math:`O(E S P)` per iteration, about
:math:`\log(\mathrm{tol}) / \log(\rho)` iterations forward and as many backward.
"""
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

from . import common


def default_tolerance(dtype: torch.dtype) -> float:
    """The default relative tolerance of ``iterative`` for inputs of ``dtype``: ``1e-12`` for float64,
    ``1e-6`` for float32 and ``eps / 16`` for float16 and bfloat16 (which the dispatcher computes in
    float32, so the iteration can reach it; a tolerance below a dtype's resolution never could)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-6
    return torch.finfo(dtype).eps / 16 if dtype.is_floating_point else 1e-6


class ConvergenceError(RuntimeError):
    """``iterative`` stopped at ``max_iter`` without reaching its tolerance."""


def _convergence_message(what: str, tol: float, max_iter: int, dtype: torch.dtype,
                         history: List[Tuple[int, float, float]]) -> str:
    """Say why the iteration stopped: a spectral radius of at least 1, a tolerance below the
    resolution of ``dtype``, or too few iterations. ``history``: ``(iteration, update, relative update)``."""
    head = f"method='iterative': the {what} did not converge to tol={tol:g} in max_iter={max_iter} steps"
    eps = torch.finfo(dtype).eps
    if len(history) < 2:
        return f"{head}; raise max_iter"
    best_it, _, best = min(history, key=lambda h: h[2])
    last = history[-1][2]
    # The update shrinks like rho^k (rho: spectral radius of A) until it meets the rounding floor;
    # measured on the second half of the iterations before that floor (the first ones are transient).
    decay = [h for h in history if h[0] <= best_it] if best_it > history[0][0] else history
    (it0, delta0, _), (it1, delta1, _) = decay[len(decay) // 2 - (len(decay) % 2 == 0)], decay[-1]
    rho = (delta1 / delta0) ** (1.0 / (it1 - it0)) if it1 > it0 and delta0 > 0 and delta1 > 0 else float("nan")
    estimate = f"the update shrank by a factor of about {rho:.3g} per step (an estimate of the spectral radius of A)"
    if rho == rho and rho >= 0.999:
        return (f"{head}: the update did not shrink (a factor of about {rho:.3g} per step, an estimate of the spectral "
                f"radius of A, which must be below 1); use an adjacency parameterization that bounds it "
                f"(e.g. 'general' with gamma < 1) or method='dense'")
    if best <= 64 * eps:
        return (f"{head}: {estimate}, then stalled at a relative update of {best:.2g}, the resolution of {dtype} "
                f"(eps = {eps:.2g}); tol is below what {dtype} can resolve: raise tol (the default for {dtype} is "
                f"{default_tolerance(dtype):g}) or use float64")
    needed = ""
    if rho == rho and 0 < rho < 1 and last > tol:
        needed = f"; reaching tol needs about {int(torch.tensor(tol / last).log() / torch.tensor(rho).log()) + 1} more"
    return f"{head}: {estimate}, and the last relative update was {last:.2g}{needed}: raise max_iter or tol"


def fixed_point(step: Callable[[Tensor, Tensor], Tensor], rhs: Tensor, tol: float, max_iter: int,
                what: str, check_every: int = 1, inputs: Sequence[Tuple[str, Tensor]] = ()) -> Tensor:
    r"""Iterate ``h <- step(h, rhs) = rhs + M h`` (Jacobi / Neumann iteration) until the update is
    below ``tol`` relative to ``h`` in the max norm. Converges whenever the spectral radius of ``M``
    is below 1. ``step`` adds ``rhs`` itself, so that a kernel can fuse the addition.

    The stopping test reads a value on the host, once every ``check_every`` iterations. ``tol=0``
    runs exactly ``max_iter`` iterations and reads nothing (no synchronization on a GPU).
    On failure, ``inputs`` (named tensors) are checked for NaN / Inf first, so that a non-finite
    input is named as the cause instead of the convergence; otherwise :class:`ConvergenceError`
    says whether the spectral radius, the tolerance or ``max_iter`` is at fault."""
    h = rhs
    inf = float("inf")
    history: List[Tuple[int, float]] = []
    for iteration in range(1, max_iter + 1):
        new = step(h, rhs)
        if tol == 0 or (iteration % check_every and iteration < max_iter):
            h = new
            continue
        delta = float(torch.linalg.vector_norm(new - h, ord=inf)) if new.numel() else 0.0
        h = new
        if delta != delta or delta == inf:  # NaN or Inf: diverged, or a non-finite input
            break
        scale = max(float(torch.linalg.vector_norm(h, ord=inf)) if h.numel() else 0.0, 1e-30)
        if delta <= tol * scale:
            return h
        history.append((iteration, delta, delta / scale))
    if tol == 0:
        return h
    culprit = next((name for name, t in inputs if t.numel() and not bool(torch.isfinite(t.detach()).all())), None)
    if culprit is not None:
        raise ValueError(f"{culprit}: contains NaN or Inf, so method='iterative' cannot produce a finite {what}")
    raise ConvergenceError(_convergence_message(what, tol, max_iter, rhs.dtype, history))


#: On accelerators the stopping test of ``iterative`` runs every this many iterations.
ACCELERATOR_CHECK_EVERY = 8


class IterativeSolve(torch.autograd.Function):
    r"""Solve :math:`(I - A) H = X` by fixed-point iteration; the backward solves the adjoint
    system :math:`(I - A)^\top G = \partial H` the same way, so memory does not grow with the
    number of iterations."""

    @staticmethod
    def forward(ctx, operator, weight: Tensor, x: Tensor, tol: float, max_iter: int,
                inputs: Sequence[Tuple[str, Tensor]] = ()) -> Tensor:
        ctx.check_every = 1 if common.host_reads_allowed(x) else ACCELERATOR_CHECK_EVERY
        named = tuple(inputs) or (("edge_weight", weight), ("key/value state", x))
        h = fixed_point(lambda t, b: operator.matmul(weight, t, b), x, tol, max_iter, "forward solve",
                        ctx.check_every, named)
        ctx.save_for_backward(weight, h)
        ctx.operator, ctx.tol, ctx.max_iter = operator, tol, max_iter
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        weight, h = ctx.saved_tensors
        operator = ctx.operator
        g = fixed_point(lambda t, b: operator.rmatmul(weight, t, b), grad_h.contiguous(), ctx.tol, ctx.max_iter,
                        "adjoint (backward) solve", ctx.check_every, (("grad_output", grad_h),))
        grad_weight = operator.edge_dot(g, h) if ctx.needs_input_grad[1] else None
        return None, grad_weight, g, None, None, None


def iterative_solve(operator, weight: Tensor, x: Tensor, tol: float, max_iter: int,
                    inputs: Sequence[Tuple[str, Tensor]] = ()) -> Tensor:
    """:math:`(I - A)^{-1} X` to a relative tolerance, with an implicit backward. ``inputs``: the
    caller's named tensors, checked for NaN / Inf when the solve fails (see :func:`fixed_point`)."""
    return IterativeSolve.apply(operator, weight, x, tol, max_iter, tuple(inputs))


