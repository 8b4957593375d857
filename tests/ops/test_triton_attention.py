"""The Triton kernels of (L ⊙ QKᵀ)V (ops/triton_attention.py) against the PyTorch reference, forward
and every gradient.

Without a GPU the kernels run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before
Triton is first imported (Triton decorates its own library functions then). So, unless this
process already interprets them (or has CUDA), :func:`test_kernels_in_the_interpreter` runs this
file again in a subprocess with the variable set, where the other tests run on tiny CPU inputs.
"""
import ast
import inspect

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import kernel_device, run_in_interpreter  # noqa: E402
from triton_interpreter import needs_kernels as needs_kernels_when  # noqa: E402

from torch_geometric_chimera.ops import squaring  # noqa: E402
from torch_geometric_chimera.ops import triton_attention as ta  # noqa: E402
from torch_geometric_chimera.ops import triton_grid as tg  # noqa: E402
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention  # noqa: E402

DEVICE = kernel_device(ta.INTERPRETED)
needs_kernels = needs_kernels_when(ta.INTERPRETED)


def test_kernels_in_the_interpreter():
    run_in_interpreter(__file__, ta.INTERPRETED)


def padded_inputs(shape, dtype, seed=0):
    """Random ``L [..., m, m]``, ``q, k [..., m, S]``, ``v [..., m, P]`` for ``shape = (lead, m, S, P)``."""
    lead, m, state, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*lead, m, m, generator=gen, dtype=dtype) / max(m, 1) ** 0.5,
               torch.randn(*lead, m, state, generator=gen, dtype=dtype),
               torch.randn(*lead, m, state, generator=gen, dtype=dtype),
               torch.randn(*lead, m, head_dim, generator=gen, dtype=dtype)]
    return [t.to(DEVICE) for t in tensors]


# m below one tile, a partial tile, and two tiles of 64 (the loop); S and P below 16 and not powers of two;
# S over one tile of 32 (the products' loop, two blocks of dQ, dK) and P over one of 64 (two blocks of y, dV).
SHAPES = [((2, 2), 5, 3, 4), ((1, 1), 37, 17, 20), ((3,), 70, 16, 8), ((1,), 40, 40, 70)]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_gradients_equal_the_reference(shape, dtype):
    inputs = [t.requires_grad_() for t in padded_inputs(shape, dtype)]
    y = ta.fused_masked_attention(*inputs)
    expected = ta.attention_reference(*inputs)
    grad = torch.randn_like(y)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, expected, **tol)
    for got, want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, **tol)


@needs_kernels
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_low_precision_rounds_like_the_pytorch_emulation(precision):
    resolvent, q, k, v = padded_inputs(((2, 2), 20, 8, 8), torch.float32, seed=1)
    grad_y = torch.randn_like(v)
    fused = (ta.attention_forward(resolvent, q, k, v, precision),
             *ta.attention_backward(resolvent, q, k, v, grad_y, precision))
    emulated = (squaring.masked_attention(resolvent, q, k, v, precision),
                *squaring.masked_attention_backward(resolvent, q, k, v, grad_y, precision))
    exact = (squaring.masked_attention(resolvent, q, k, v),
             *squaring.masked_attention_backward(resolvent, q, k, v, grad_y))
    for got, want, full in zip(fused, emulated, exact):
        # The same rounded operands: equal up to float32 summation order (the emulation itself is
        # 1e-3 to 1e-2 away from the float32 result).
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, full, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_squaring_path_fused_equals_the_inverse():
    sizes = [5, 0, 9, 1, 12]
    gen = torch.Generator().manual_seed(0)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    first = torch.cumsum(torch.tensor(sizes), 0) - torch.tensor(sizes)
    graph = batch[torch.randint(0, batch.numel(), (60,), generator=gen)]
    n = torch.tensor(sizes)[graph]
    src, dst = ((torch.rand(60, generator=gen) * n).long() for _ in range(2))
    edge_index = torch.stack([first[graph] + src, first[graph] + dst])  # cycles, self-loops, duplicates
    weight = 0.1 * torch.rand(60, 2, generator=gen, dtype=torch.float64)
    q, k = (torch.randn(batch.numel(), 2, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch.numel(), 2, 4, generator=gen, dtype=torch.float64)
    tensors = [t.to(DEVICE) for t in (q, k, v, weight)]
    edge_index, batch = edge_index.to(DEVICE), batch.to(DEVICE)
    grad = torch.randn(batch.numel(), 2, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    results = []
    for fn in (lambda q_, k_, v_, w_: squaring.squaring_resolvent_attention(q_, k_, v_, edge_index, w_, batch,
                                                                            fused=True),
               lambda q_, k_, v_, w_: inverse_resolvent_attention(q_, k_, v_, edge_index, w_)):
        inputs = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*inputs)
        results.append((y.detach(), *torch.autograd.grad(y, inputs, grad)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@needs_kernels
def test_empty_inputs_and_argument_errors():
    resolvent, q, k, v = padded_inputs(((0, 2), 4, 3, 5), torch.float32)
    assert ta.attention_forward(resolvent, q, k, v).shape == (0, 2, 4, 5)
    resolvent, q, k, v = padded_inputs(((2,), 4, 3, 5), torch.float32)
    with pytest.raises(ValueError, match="precision: expected one of"):
        ta.attention_forward(resolvent, q, k, v, "fp8")
    with pytest.raises(ValueError, match="v: expected shape"):
        ta.attention_forward(resolvent, q, k, v[:, :3])
    with pytest.raises(TypeError, match="float32 tensors"):
        ta.attention_forward(resolvent.double(), q.double(), k.double(), v.double(), "bf16")


@needs_kernels
def test_gradient_buffers_are_written_not_zero_filled(monkeypatch):
    """The backward allocates its gradients uninitialized (no zero fill of ``dL``, ``G·H·m²``): every
    entry is written by the kernels, so buffers filled with NaN come out equal to the reference."""
    inputs = padded_inputs(((2,), 70, 40, 70), torch.float64, seed=3)
    grad_y = torch.randn_like(inputs[3])
    zero_fills = []
    real_zeros_like, real_empty_like = torch.zeros_like, torch.empty_like
    monkeypatch.setattr(torch, "zeros_like",
                        lambda t, *a, **k: zero_fills.append(t.shape) or real_zeros_like(t, *a, **k))
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: real_empty_like(t, *a, **k).fill_(float("nan")))
    got = ta.attention_backward(*inputs, grad_y)
    monkeypatch.undo()
    assert zero_fills == []
    for a, b in zip(got, squaring.masked_attention_backward(*inputs, grad_y)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_every_kernel_launch_sits_in_a_device_guard():
    """A Triton launch runs on the current CUDA device, not on its tensors' (``cuda:1`` without
    ``torch.cuda.set_device`` breaks): every ``kernel[grid](...)`` of both Triton modules is inside a
    ``with device_guard(...)`` block."""
    launches = 0
    for module in (ta, tg):
        tree = ast.parse(inspect.getsource(module))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", None) ==
                    "device_guard" for item in node.items):
                guarded.update(id(inner) for inner in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    getattr(node.func.value, "id", "").endswith("_kernel"):
                launches += 1
                assert id(node) in guarded, f"{module.__name__}, line {node.lineno}: a launch outside device_guard"
    assert launches == 7  # 3 attention kernels, 4 grid kernels


def test_the_device_guard_selects_the_tensors_device():
    class OnSecondGpu:
        device = torch.device("cuda", 1)

    guard = ta.device_guard(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with ta.device_guard(torch.zeros(1)):  # elsewhere (the interpreter's CPU tensors): nothing to select
        pass


def test_grid_axes_are_checked():
    meta = ta._launch_config(64, 16, 16, torch.float32, "float32")
    rows = meta["BLOCK_M"]
    assert ta._grid(8, rows * 65535, 1, meta) == (8, 65535, 1)
    with pytest.raises(ValueError, match="over CUDA's 65535 per grid axis"):
        ta._grid(8, rows * 65535 + 1, 1, meta)
