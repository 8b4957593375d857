"""``chimera::window_conv_silu`` (``csrc/cpu/block_ops_cpu.cpp``): the depthwise k x k (images) or
k-tap (sequences) convolution with SiLU of a decomposition layer, one call for a batch of images of
any sizes. Against :func:`window_conv_silu_reference` and ``torch.nn.Conv2d``: values and the
gradients of x, weight and bias, strided input, gradcheck, opcheck, thread-count determinism (in a
subprocess), no leak between images, and malformed raw calls."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from torch_geometric_chimera.ops import HAS_EXTENSION
from torch_geometric_chimera.ops.block import window_conv_silu, window_conv_silu_reference

requires_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")

# (height, width) of a batch: square, single pixel, row, column, empty, a row wider than a
# kernel segment (256 positions), a tall one
SIZES = ((3, 4), (1, 1), (1, 5), (4, 1), (0, 3), (2, 300), (7, 2))


def batch_of(sizes, channels, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor([h * w for h, w in sizes])
    graph_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    row_width = torch.tensor([w for _, w in sizes])
    x = torch.randn(int(counts.sum()), channels, generator=gen, dtype=dtype)
    return x, graph_ptr, row_width, gen


def values_and_grads(fn, x, weight, bias, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


WINDOWS = [  # (kh, kw, row_offset, col_offset)
    (3, 3, -1, -1),   # the grid's 3 x 3, centred
    (5, 5, -2, -2),
    (1, 7, 0, -3),    # a line's 7 taps, centred
    (1, 4, 0, -3),    # Mamba-2's causal 4
    (2, 3, 0, 1),     # an off-centre window, nothing at the pixel itself
]


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kh, kw, row_offset, col_offset", WINDOWS)
@pytest.mark.parametrize("channels", [1, 13, 40])
def test_kernel_equals_the_reference(kh, kw, row_offset, col_offset, channels, dtype):
    x, graph_ptr, row_width, gen = batch_of(SIZES, channels, dtype)
    weight = torch.randn(channels, kh, kw, generator=gen, dtype=dtype)
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    grad = torch.randn(x.shape, generator=gen, dtype=dtype)

    def kernel(*a):
        return window_conv_silu(a[0], graph_ptr, row_width, a[1], a[2], row_offset, col_offset)

    def reference(*a):
        return window_conv_silu_reference(a[0], graph_ptr, row_width, a[1], a[2], row_offset, col_offset)
    got, want = values_and_grads(kernel, x, weight, bias, grad), values_and_grads(reference, x, weight, bias, grad)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@requires_extension
def test_each_image_is_torch_conv2d_of_that_image_alone():
    channels, k = 6, 3
    x, graph_ptr, row_width, gen = batch_of(SIZES, channels, torch.float64)
    weight = torch.randn(channels, k, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    out = window_conv_silu(x, graph_ptr, row_width, weight, bias, -1, -1)
    for g, (h, w) in enumerate(SIZES):
        if h * w == 0:
            continue
        rows = slice(int(graph_ptr[g]), int(graph_ptr[g + 1]))
        image = x[rows].t().reshape(1, channels, h, w)
        expected = F.silu(F.conv2d(image, weight.unsqueeze(1), bias, padding=1, groups=channels))
        torch.testing.assert_close(out[rows], expected.reshape(channels, h * w).t())


@requires_extension
def test_strided_rows_are_read_in_place():
    # x as a column slice of a wider projection, as the layer passes it
    wide, graph_ptr, row_width, gen = batch_of(SIZES, 20, torch.float64)
    x = wide[:, 3:15]
    weight = torch.randn(12, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(window_conv_silu(x, graph_ptr, row_width, weight, bias, -1, -1),
                               window_conv_silu(x.contiguous(), graph_ptr, row_width, weight, bias, -1, -1))


@requires_extension
@pytest.mark.parametrize("kh, kw, row_offset, col_offset", [WINDOWS[0], WINDOWS[3]])
def test_gradcheck(kh, kw, row_offset, col_offset):
    x, graph_ptr, row_width, gen = batch_of(((3, 4), (1, 1), (2, 3)), 3, torch.float64)
    weight = torch.randn(3, kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, w, b: window_conv_silu(a, graph_ptr, row_width, w, b, row_offset, col_offset),
        (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))


@requires_extension
def test_opcheck():
    x, graph_ptr, row_width, gen = batch_of(((3, 4), (0, 2), (2, 3)), 5, torch.float64)
    weight = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.chimera.window_conv_silu.default,
                          (x.requires_grad_(), graph_ptr, row_width, weight.requires_grad_(), bias.requires_grad_(),
                           -1, -1))
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.chimera.window_conv_silu_backward.default,
                          (grad, x.detach(), graph_ptr, row_width, weight.detach(), bias.detach(), -1, -1))


@requires_extension
def test_no_leak_between_images():
    # changing one image changes no other image's output or input gradient
    channels = 4
    x, graph_ptr, row_width, gen = batch_of(SIZES, channels, torch.float64)
    weight = torch.randn(channels, 5, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    out = window_conv_silu(x, graph_ptr, row_width, weight, bias, -2, -2)
    moved = x.clone()
    moved[int(graph_ptr[0]):int(graph_ptr[1])] += 10.0  # the first image
    out_moved = window_conv_silu(moved, graph_ptr, row_width, weight, bias, -2, -2)
    first = int(graph_ptr[1])
    torch.testing.assert_close(out[first:], out_moved[first:], rtol=0, atol=0)
    assert not torch.allclose(out[:first], out_moved[:first])


@requires_extension
def test_empty_batch_and_no_double_backward():
    x = torch.zeros(0, 3, dtype=torch.float64)
    empty = window_conv_silu(x, torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             torch.randn(3, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), -1, -1)
    assert empty.shape == (0, 3)
    x, graph_ptr, row_width, gen = batch_of(((2, 3),), 2, torch.float64)
    weight = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = window_conv_silu(x.requires_grad_(), graph_ptr, row_width, weight, torch.zeros(2, dtype=torch.float64), -1,
                           -1)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="window_conv_silu.*double backward is not supported"):
        torch.autograd.grad(grad.sum(), weight)


@requires_extension
@pytest.mark.parametrize("change, message", [
    (dict(graph_ptr=torch.tensor([1, 6])), r"graph_ptr\[0\] must be 0"),
    (dict(graph_ptr=torch.tensor([0, 5])), r"graph_ptr\[-1\] must equal the number of nodes N = 6"),
    (dict(graph_ptr=torch.tensor([0, 7, 6]), row_width=torch.tensor([7, 1])), "graph_ptr must be non-decreasing"),
    (dict(row_width=torch.tensor([4])), r"row_width\[0\] = 4 must be positive and divide"),
    (dict(row_width=torch.tensor([0])), r"row_width\[0\] = 0 must be positive"),
    (dict(row_width=torch.tensor([3, 3])), r"row_width must be a CPU int64 tensor of shape \[G\] = \[1\]"),
    (dict(graph_ptr=torch.tensor([0.0, 6.0])), "graph_ptr must be a CPU int64 tensor"),
    (dict(weight=torch.randn(2, 3, dtype=torch.float64)), r"weight must have shape \[C, kh, kw\]"),
    (dict(weight=torch.randn(2, 3, 3)), "weight must have x's dtype"),
    (dict(bias=torch.randn(3, dtype=torch.float64)), r"bias must have shape \[C\] = \[2\]"),
])
def test_malformed_raw_calls_are_clean_errors(change, message):
    args = dict(x=torch.randn(6, 2, dtype=torch.float64), graph_ptr=torch.tensor([0, 6]),
                row_width=torch.tensor([3]), weight=torch.randn(2, 3, 3, dtype=torch.float64),
                bias=torch.randn(2, dtype=torch.float64))
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.chimera.window_conv_silu(args["x"], args["graph_ptr"], args["row_width"], args["weight"],
                                           args["bias"], -1, -1)


DETERMINISM_SCRIPT = r"""
import json
import torch
from torch_geometric_chimera.ops.block import window_conv_silu

def run(threads, dtype):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(3)
    sizes = [(9, 40), (3, 300), (12, 12)] * 3  # many segments, rows wider than a segment
    counts = torch.tensor([h * w for h, w in sizes])
    graph_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    row_width = torch.tensor([w for _, w in sizes])
    x = torch.randn(int(counts.sum()), 24, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(24, 3, 3, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(24, generator=gen, dtype=dtype).requires_grad_()
    out = window_conv_silu(x, graph_ptr, row_width, weight, bias, -1, -1)
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    return [out.detach()] + list(torch.autograd.grad(out, (x, weight, bias), grad))

report = {}
for dtype in (torch.float32, torch.float64):
    one, two = run(1, dtype), run(2, dtype)
    report[str(dtype)] = [bool(torch.equal(a, b)) for a, b in zip(one, two)]
print(json.dumps(report))
"""


@requires_extension
def test_outputs_and_gradients_do_not_depend_on_the_thread_count():
    result = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for dtype, equal in json.loads(result.stdout.strip().splitlines()[-1]).items():
        assert all(equal), f"{dtype}: output, grad x, grad weight, grad bias equal between 1 and 2 threads: {equal}"


@requires_extension
@pytest.mark.parametrize("kh, kw, row_offset, col_offset", WINDOWS)
def test_backward_bands_of_tall_images_equal_the_reference(kh, kw, row_offset, col_offset):
    # The backward splits images of narrow rows into bands of at most 16 rows, each recomputing the
    # gradients of the rows its window reaches beyond its own: 37 rows are three bands (16, 16, 5),
    # and the 40 x 600 image's rows are longer than a segment (chunks of one row).
    x, graph_ptr, row_width, gen = batch_of(((37, 5), (2, 2), (33, 1), (40, 600)), 6, torch.float64)
    weight = torch.randn(6, kh, kw, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def kernel(*a):
        return window_conv_silu(a[0], graph_ptr, row_width, a[1], a[2], row_offset, col_offset)

    def reference(*a):
        return window_conv_silu_reference(a[0], graph_ptr, row_width, a[1], a[2], row_offset, col_offset)
    got, want = values_and_grads(kernel, x, weight, bias, grad), values_and_grads(reference, x, weight, bias, grad)
    for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
