"""The fused block kernels ``chimera::local_conv_silu`` and ``chimera::gated_rms_norm``
(``csrc/cpu/block_ops_cpu.cpp``) through their wrappers :func:`local_conv_silu` and
:func:`gated_rms_norm` (``ops/block.py``), against the PyTorch references
:func:`local_conv_silu_reference` and :func:`gated_rms_norm_reference`: values and the gradients of
every input (the per-channel parameters included) for odd channel counts, several 256-row chunks and
strided / non-contiguous inputs; ``gradcheck`` and ``opcheck``; empty, large-magnitude and NaN
inputs; the errors of the wrappers (``ValueError``) and of the raw ops (``RuntimeError``); the
reference fallbacks (which run without the extension too); bitwise determinism across thread counts
(in a subprocess: ``torch.set_num_threads`` must not run in the test process); no double backward;
and :class:`ChimeraConv` with the fused ops against the same layer on the references."""
import json
import subprocess
import sys

import pytest
import torch
from graphs import random_graph

import torch_geometric_chimera.nn.chimera_conv as chimera_conv
from torch_geometric_chimera.nn import ChimeraConv
from torch_geometric_chimera.ops import HAS_EXTENSION
from torch_geometric_chimera.ops.block import (block_kernels_available, gated_rms_norm, gated_rms_norm_reference,
                                               local_conv_silu, local_conv_silu_reference)

requires_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the compiled extension is not built")


class Op:
    """One fused op: its wrapper, its reference, its raw op and the kind of every tensor argument
    (``"rows"``: ``[N, C]``, ``"channels"``: ``[C]``), in argument order."""

    def __init__(self, name, wrapper, reference, arg_names, kinds):
        self.name, self.wrapper, self.reference = name, wrapper, reference
        self.arg_names, self.kinds = arg_names, kinds

    @property
    def raw(self):
        return getattr(torch.ops.chimera, self.name).default

    @property
    def raw_backward(self):
        return getattr(torch.ops.chimera, self.name + "_backward").default

    def __repr__(self):
        return self.name


LOCAL_CONV_SILU = Op("local_conv_silu", local_conv_silu, local_conv_silu_reference,
                     ("x", "neighbors", "self_scale", "neighbor_scale", "bias"),
                     ("rows", "rows", "channels", "channels", "channels"))
GATED_RMS_NORM = Op("gated_rms_norm", gated_rms_norm, gated_rms_norm_reference,
                    ("y", "skip", "skip_scale", "gate", "weight"), ("rows", "rows", "channels", "rows", "channels"))
OPS = (LOCAL_CONV_SILU, GATED_RMS_NORM)


def random_args(op, rows, channels, dtype=torch.float64, scale=1.0):
    """Detached random arguments of ``op``: row inputs uniform in ``[-scale, scale]`` (standard
    normal when ``scale`` is ``None``), per-channel parameters standard normal."""
    args = []
    for kind in op.kinds:
        if kind == "channels":
            args.append(torch.randn(channels, dtype=dtype))
        elif scale is None:
            args.append(torch.randn(rows, channels, dtype=dtype))
        else:
            args.append((torch.rand(rows, channels, dtype=dtype) * 2 - 1) * scale)
    return args


def laid_out(op, args, layout):
    """``(leaves, inputs)``: leaves that require grad and the op's inputs made from them with the
    given layout of the row inputs.

    ``contiguous``: the arguments themselves. ``column_slices``: the row inputs are column slices of
    one wider tensor (strided rows, read in place, as the layer's ``in_proj(x).split(...)``).
    ``transposed``: each row input is the transpose of a ``[C, N]`` tensor (copied by the kernel).
    ``broadcast``: each row input is one row expanded to ``N`` rows (row stride 0, copied)."""
    rows = [a for a, kind in zip(args, op.kinds) if kind == "rows"]
    n, c = rows[0].shape
    params = [a.detach().clone().requires_grad_() for a, kind in zip(args, op.kinds) if kind == "channels"]
    if layout == "contiguous":
        row_leaves = [a.detach().clone().requires_grad_() for a in rows]
        row_inputs, leaves = row_leaves, row_leaves
    elif layout == "column_slices":
        wide = torch.cat([torch.randn(n, 1, dtype=rows[0].dtype)] + rows + [torch.randn(n, 3, dtype=rows[0].dtype)],
                         dim=1).requires_grad_()
        row_inputs = [wide[:, 1 + i * c:1 + (i + 1) * c] for i in range(len(rows))]
        assert all(t.stride() == (wide.size(1), 1) for t in row_inputs)
        leaves = [wide]
    elif layout == "transposed":
        leaves = [a.detach().t().contiguous().requires_grad_() for a in rows]
        row_inputs = [t.t() for t in leaves]
        assert all(not t.is_contiguous() for t in row_inputs) or min(n, c) <= 1
    elif layout == "broadcast":
        leaves = [a.detach()[:1].clone().requires_grad_() for a in rows]
        row_inputs = [t.expand(n, c) for t in leaves]
    else:
        raise AssertionError(layout)
    row_iter, param_iter = iter(row_inputs), iter(params)
    inputs = [next(row_iter) if kind == "rows" else next(param_iter) for kind in op.kinds]
    return leaves + params, inputs


def outputs_and_grads(fn, leaves, inputs, grad):
    """``fn(*inputs)`` and the gradients of ``<fn(*inputs), grad>`` in ``leaves``."""
    out = fn(*inputs)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


def assert_close_scaled(got, want, rtol, names, floor=1.0):
    """Every ``got[i]`` close to ``want[i]``, the absolute tolerance ``rtol`` times the largest
    magnitude of ``want[i]`` or ``floor``, whichever is larger: sums of many terms (and differences
    of nearly equal ones: with C = 1 the gradient of gated_rms_norm in y is w eps / (g^2 + eps)^1.5)
    leave small entries with the rounding error of the terms, ``O(1)`` for standard normal inputs."""
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert bool(torch.isfinite(a).all()), f"{name}: non-finite values"
        atol = rtol * max(floor, float(b.abs().max())) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def grad_names(op, layout):
    rows = [n for n, kind in zip(op.arg_names, op.kinds) if kind == "rows"]
    params = [n for n, kind in zip(op.arg_names, op.kinds) if kind == "channels"]
    row_leaves = ["wide input"] if layout == "column_slices" else rows
    return ["output"] + [f"grad {n}" for n in row_leaves + params]


# float64: rounding only. float32: the kernel's polynomial exp and its chunked sums against PyTorch's.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}


# --- values and gradients -------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rows, channels", [(1, 1), (5, 7), (600, 24), (300, 130), (257, 1)])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_values_and_gradients_of_every_input_equal_the_reference(op, rows, channels, dtype):
    args = random_args(op, rows, channels, dtype, scale=None)
    leaves, inputs = laid_out(op, args, "contiguous")
    assert block_kernels_available(*inputs)
    grad = torch.randn(rows, channels, dtype=dtype)
    assert_close_scaled(outputs_and_grads(op.wrapper, leaves, inputs, grad),
                        outputs_and_grads(op.reference, leaves, inputs, grad), RTOL[dtype],
                        grad_names(op, "contiguous"))


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["column_slices", "transposed", "broadcast"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_strided_and_non_contiguous_inputs(op, layout, dtype):
    rows, channels = 300, 7
    args = random_args(op, rows, channels, dtype, scale=None)
    leaves, inputs = laid_out(op, args, layout)
    # a non-contiguous output gradient too (the kernel copies it)
    grad = torch.randn(channels, rows, dtype=dtype).t()
    assert_close_scaled(outputs_and_grads(op.wrapper, leaves, inputs, grad),
                        outputs_and_grads(op.reference, leaves, inputs, grad), RTOL[dtype], grad_names(op, layout))


@requires_extension
@pytest.mark.parametrize("op", OPS, ids=str)
def test_gradcheck(op):
    args = random_args(op, 4, 5, torch.float64, scale=None)
    inputs = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(op.wrapper, inputs)


@requires_extension
def test_gradcheck_gated_rms_norm_with_its_eps():
    args = random_args(GATED_RMS_NORM, 3, 6, torch.float64, scale=0.05)  # small rows: eps matters
    inputs = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: gated_rms_norm(*a, eps=0.1), inputs)
    torch.testing.assert_close(gated_rms_norm(*inputs, eps=0.1), gated_rms_norm_reference(*inputs, eps=0.1),
                               rtol=1e-12, atol=1e-12)


# --- opcheck --------------------------------------------------------------------------------------

def raw_args(op, rows=5, channels=7):
    args = random_args(op, rows, channels, torch.float64, scale=None)
    extra = (1e-5,) if op is GATED_RMS_NORM else ()
    return args, extra


@requires_extension
@pytest.mark.parametrize("op", OPS, ids=str)
def test_opcheck_forward(op):
    args, extra = raw_args(op)
    torch.library.opcheck(op.raw, tuple(a.requires_grad_() for a in args) + extra)


def backward_args(op):
    """Realistic inputs of the backward op: an output gradient, the forward's inputs and, for
    gated_rms_norm, the rstd of the forward."""
    args, extra = raw_args(op)
    grad = torch.randn_like(args[0])
    if op is GATED_RMS_NORM:
        rstd = op.raw(*args, *extra)[1]
        return (grad, *args, rstd)
    return (grad, *args)


@requires_extension
@pytest.mark.parametrize("op", OPS, ids=str)
def test_opcheck_backward(op):
    torch.library.opcheck(op.raw_backward, backward_args(op))


@requires_extension
@pytest.mark.parametrize("op", OPS, ids=str)
def test_backward_outputs_do_not_alias_each_other(op):
    # (They once were views of one [k, C] tensor, which opcheck's test_faketensor rejects.)
    grads = op.raw_backward(*backward_args(op))
    pointers = [g.untyped_storage().data_ptr() for g in grads]
    assert len(set(pointers)) == len(grads)


# --- edge cases -----------------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_no_rows(op, dtype):
    args = random_args(op, 0, 6, dtype)
    leaves, inputs = laid_out(op, args, "contiguous")
    got = outputs_and_grads(op.wrapper, leaves, inputs, torch.zeros(0, 6, dtype=dtype))
    want = outputs_and_grads(op.reference, leaves, inputs, torch.zeros(0, 6, dtype=dtype))
    assert got[0].shape == (0, 6)
    for name, a, b in zip(grad_names(op, "contiguous"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
    param_grads = got[-op.kinds.count("channels"):]  # the leaves: the row inputs, then the parameters
    assert all(g.shape == (6,) and bool((g == 0).all()) for g in param_grads)


@requires_extension
def test_local_conv_silu_with_no_channels():
    args = random_args(LOCAL_CONV_SILU, 4, 0)
    leaves, inputs = laid_out(LOCAL_CONV_SILU, args, "contiguous")
    got = outputs_and_grads(local_conv_silu, leaves, inputs, torch.zeros(4, 0, dtype=torch.float64))
    assert [tuple(g.shape) for g in got] == [(4, 0), (4, 0), (4, 0), (0,), (0,), (0,)]


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [100.0, 1e4])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_large_magnitude_inputs(op, scale, dtype):
    # Row inputs uniform in [-scale, scale]: the float32 exp clamps its argument at -87 / 88 for most of them.
    rows, channels = 260, 33
    args = random_args(op, rows, channels, dtype, scale=scale)
    leaves, inputs = laid_out(op, args, "contiguous")
    grad = torch.randn(rows, channels, dtype=dtype)
    got = outputs_and_grads(op.wrapper, leaves, inputs, grad)
    assert all(bool(torch.isfinite(g).all()) for g in got)
    # the gradients in y and skip of gated_rms_norm are ~1 / scale^2: no absolute floor
    assert_close_scaled(got, outputs_and_grads(op.reference, leaves, inputs, grad), RTOL[dtype],
                        grad_names(op, "contiguous"), floor=0.0)


def nan_at(op, args, index):
    """A copy of ``args`` with a NaN in argument ``index`` (row 1, channel 2 / channel 2)."""
    args = [a.clone() for a in args]
    if op.kinds[index] == "rows":
        args[index][1, 2] = float("nan")
    else:
        args[index][2] = float("nan")
    return args


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op, index", [(op, i) for op in OPS for i in range(5)],
                         ids=[f"{op}-{name}" for op in OPS for name in op.arg_names])
def test_nan_propagates_where_the_reference_puts_it(op, index, dtype):
    rows, channels = 4, 5
    args = nan_at(op, random_args(op, rows, channels, dtype, scale=None), index)
    leaves, inputs = laid_out(op, args, "contiguous")
    grad = torch.randn(rows, channels, dtype=dtype)
    got = outputs_and_grads(op.wrapper, leaves, inputs, grad)
    want = outputs_and_grads(op.reference, leaves, inputs, grad)
    out_nan = got[0].isnan()
    # the NaN reaches the output: its element for local_conv_silu, its whole row for gated_rms_norm
    # (the mean square), its channel (every row) for a parameter
    if op.kinds[index] == "rows":
        assert bool(out_nan[1, 2]) and bool(out_nan[1].all() if op is GATED_RMS_NORM else out_nan[1].sum() == 1)
    else:
        assert bool(out_nan[:, 2].all())
    for name, a, b in zip(grad_names(op, "contiguous"), got, want):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at {a.isnan().nonzero().tolist()}, reference at " \
                                                  f"{b.isnan().nonzero().tolist()}"
        finite = ~b.isnan()
        torch.testing.assert_close(a[finite], b[finite], rtol=RTOL[dtype], atol=RTOL[dtype] * 10,
                                   msg=lambda m, name=name: f"{name}: {m}")


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_minus_infinity_gives_the_references_nans(op, dtype):
    # float32 once gave silu(-inf) = -inf (exp_approx clamped exp(inf) to a finite number).
    rows, channels = 3, 5
    args = random_args(op, rows, channels, dtype, scale=None)
    index = 0 if op is LOCAL_CONV_SILU else 3  # x, gate: the argument of a SiLU
    args[index][1, 2] = float("-inf")
    if op is LOCAL_CONV_SILU:
        args[2][2] = 1.0
    with torch.no_grad():
        got, want = op.wrapper(*args), op.reference(*args)
    assert bool(want[1, 2].isnan())  # the reference's silu(-inf) = -inf / (1 + inf)
    assert torch.equal(got.isnan(), want.isnan()), f"NaN at {got.isnan().nonzero().tolist()}, reference at " \
                                                   f"{want.isnan().nonzero().tolist()}"


# --- errors ---------------------------------------------------------------------------------------

def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


N, C = 3, 4
# (op, argument index, the wrong argument, the name the error must give)
WRONG_ARGUMENTS = [
    (LOCAL_CONV_SILU, 0, f64(C), "x"),
    (LOCAL_CONV_SILU, 0, f64(N, C, 1), "x"),
    (LOCAL_CONV_SILU, 1, f64(N + 1, C), "neighbors"),
    (LOCAL_CONV_SILU, 1, f64(N, C - 1), "neighbors"),
    (LOCAL_CONV_SILU, 1, f64(N * C), "neighbors"),
    (LOCAL_CONV_SILU, 2, f64(C + 1), "self_scale"),
    (LOCAL_CONV_SILU, 3, f64(1, C), "neighbor_scale"),
    (LOCAL_CONV_SILU, 4, f64(0), "bias"),
    (GATED_RMS_NORM, 0, f64(N), "y"),
    (GATED_RMS_NORM, 1, f64(N, C + 1), "skip"),
    (GATED_RMS_NORM, 2, f64(2 * C), "skip_scale"),
    (GATED_RMS_NORM, 3, f64(N - 1, C), "gate"),
    (GATED_RMS_NORM, 3, f64(C, N), "gate"),
    (GATED_RMS_NORM, 4, f64(C, 1), "weight"),
]
WRONG_IDS = [f"{op}-{name}-{list(t.shape)}" for op, _, t, name in WRONG_ARGUMENTS]


def with_argument(op, index, value, rows=N, channels=C):
    args, extra = random_args(op, rows, channels), ((1e-5,) if op is GATED_RMS_NORM else ())
    args[index] = value
    return args, extra


@pytest.mark.parametrize("op, index, value, name", WRONG_ARGUMENTS, ids=WRONG_IDS)
def test_wrapper_rejects_wrong_shapes_naming_the_argument(op, index, value, name):
    args, _ = with_argument(op, index, value)
    with pytest.raises(ValueError, match=f"^{name}: expected shape"):
        op.wrapper(*args)


@pytest.mark.parametrize("eps", [-1e-3, float("nan")])
def test_gated_rms_norm_rejects_a_negative_eps(eps):
    with pytest.raises(ValueError, match="^eps: expected a non-negative float"):
        gated_rms_norm(*random_args(GATED_RMS_NORM, N, C), eps=eps)


def test_gated_rms_norm_rejects_no_channels():
    args = random_args(GATED_RMS_NORM, N, 0)
    with pytest.raises(ValueError, match=r"^y: expected shape \[N, C\] with C >= 1, got \[3, 0\]"):
        gated_rms_norm(*args)


@requires_extension
@pytest.mark.parametrize("op, index, value, name", WRONG_ARGUMENTS, ids=WRONG_IDS)
def test_raw_ops_reject_wrong_shapes_naming_the_argument(op, index, value, name):
    args, extra = with_argument(op, index, value)
    with pytest.raises(RuntimeError, match=f"chimera::{op.name}: {name} must have shape"):
        op.raw(*args, *extra)
    # the backward op checks the same arguments (after grad_out)
    grad = f64(*args[0].shape) if args[0].dim() == 2 else f64(N, C)
    if op is GATED_RMS_NORM:
        extra = (f64(args[0].size(0)) if args[0].dim() == 2 else f64(N),)
    with pytest.raises(RuntimeError, match=f"chimera::{op.name}_backward: {name} must have shape"):
        op.raw_backward(grad, *args, *extra)


@requires_extension
@pytest.mark.parametrize("op, index", [(op, i) for op in OPS for i in range(1, 5)],
                         ids=[f"{op}-{name}" for op in OPS for name in op.arg_names[1:]])
def test_raw_ops_reject_a_dtype_mismatch(op, index):
    args, extra = random_args(op, N, C), ((1e-5,) if op is GATED_RMS_NORM else ())
    args[index] = args[index].float()
    name = op.arg_names[index]
    with pytest.raises(RuntimeError, match=f"chimera::{op.name}: {name} must have dtype Double, got Float"):
        op.raw(*args, *extra)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_raw_ops_reject_other_dtypes(op, dtype):
    args, extra = random_args(op, N, C), ((1e-5,) if op is GATED_RMS_NORM else ())
    args = [a.to(dtype) for a in args]
    lead = op.arg_names[0]
    with pytest.raises(RuntimeError, match=f"chimera::{op.name}: {lead} must be float32 or float64"):
        op.raw(*args, *extra)


@requires_extension
@pytest.mark.parametrize("eps", [-1e-3, float("nan")])
def test_raw_gated_rms_norm_rejects_a_negative_eps(eps):
    with pytest.raises(RuntimeError, match="chimera::gated_rms_norm: eps must be non-negative"):
        torch.ops.chimera.gated_rms_norm(*random_args(GATED_RMS_NORM, N, C), eps)


@requires_extension
def test_raw_gated_rms_norm_rejects_no_channels():
    with pytest.raises(RuntimeError, match="chimera::gated_rms_norm: y must have at least one channel"):
        torch.ops.chimera.gated_rms_norm(*random_args(GATED_RMS_NORM, N, 0), 1e-5)


@requires_extension
@pytest.mark.parametrize("rstd", [f64(N + 1), f64(N, 1), f64(N).float()], ids=["rows", "2-D", "dtype"])
def test_raw_gated_rms_norm_backward_rejects_a_wrong_rstd(rstd):
    args = random_args(GATED_RMS_NORM, N, C)
    with pytest.raises(RuntimeError, match=r"chimera::gated_rms_norm_backward: rstd must be the forward's \[N\]"):
        torch.ops.chimera.gated_rms_norm_backward(f64(N, C), *args, rstd)


@requires_extension
@pytest.mark.parametrize("op", OPS, ids=str)
def test_raw_backward_ops_reject_a_wrong_grad_out(op):
    args, extra = random_args(op, N, C), ()
    if op is GATED_RMS_NORM:
        extra = (op.raw(*args, 1e-5)[1],)
    with pytest.raises(RuntimeError, match=f"chimera::{op.name}_backward: grad_out must have shape"):
        op.raw_backward(f64(C, N), *args, *extra)
    with pytest.raises(RuntimeError, match=f"chimera::{op.name}_backward: grad_out must have dtype Double"):
        op.raw_backward(f64(N, C).float(), *args, *extra)


# --- fallbacks to the references (these run without the extension too) ----------------------------

@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("op", OPS, ids=str)
def test_mixed_dtypes_fall_back_to_the_reference(op, index):
    args = random_args(op, 6, 5, torch.float32, scale=None)
    args[index] = args[index].double()
    assert not block_kernels_available(*args)
    leaves, inputs = laid_out(op, args, "contiguous")
    grad = torch.randn(6, 5, dtype=torch.float64)
    got = outputs_and_grads(op.wrapper, leaves, inputs, grad)
    want = outputs_and_grads(op.reference, leaves, inputs, grad)
    assert got[0].dtype == torch.float64
    for name, a, b in zip(grad_names(op, "contiguous"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_low_precision_falls_back_to_the_reference(op, dtype):
    args = random_args(op, 6, 5, dtype, scale=None)
    assert not block_kernels_available(*args)
    leaves, inputs = laid_out(op, args, "contiguous")
    grad = torch.randn(6, 5, dtype=dtype)
    got = outputs_and_grads(op.wrapper, leaves, inputs, grad)
    want = outputs_and_grads(op.reference, leaves, inputs, grad)
    assert got[0].dtype == dtype
    for name, a, b in zip(grad_names(op, "contiguous"), got, want):
        assert torch.equal(a, b), name


def test_block_kernels_available_needs_the_extension_and_one_float_dtype():
    x32, x64 = torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)
    assert block_kernels_available(x32, x32) == HAS_EXTENSION
    assert block_kernels_available(x64, x64) == HAS_EXTENSION
    assert not block_kernels_available(x32, x64)
    assert not block_kernels_available(x32.bfloat16(), x32.bfloat16())
    assert not block_kernels_available(x32.long())


# --- determinism ----------------------------------------------------------------------------------

DETERMINISM_SCRIPT = r"""
import json, sys
import torch
from torch_geometric_chimera.ops.block import gated_rms_norm, local_conv_silu

def run(threads, dtype):
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    gen = torch.Generator().manual_seed(7)
    rows, channels = 1100, 24  # five 256-row chunks; the forward splits the rows too (16384 / C per task)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_()
    conv_args = [r(rows, channels), r(rows, channels), r(channels), r(channels), r(channels)]
    norm_args = [r(rows, channels), r(rows, channels), r(channels), r(rows, channels), r(channels)]
    grad = torch.randn(rows, channels, generator=gen, dtype=dtype)
    results = []
    for fn, args in ((local_conv_silu, conv_args), (gated_rms_norm, norm_args)):
        out = fn(*args)
        results += [out.detach()] + list(torch.autograd.grad(out, args, grad))
    return results

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
    report = json.loads(result.stdout.strip().splitlines()[-1])
    names = [f"{op} {n}" for op in OPS for n in ("output",) + tuple(f"grad {a}" for a in op.arg_names)]
    for dtype, equal in report.items():
        assert len(equal) == len(names)
        assert all(equal), f"{dtype}: differ between 1 and 2 threads: {[n for n, e in zip(names, equal) if not e]}"


# --- no double backward ---------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("op", OPS, ids=str)
def test_double_backward_raises(op):
    args = [a.requires_grad_() for a in random_args(op, 4, 3, scale=None)]
    out = op.wrapper(*args)
    grads = torch.autograd.grad(out, args, torch.randn_like(out), create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(NotImplementedError, match=f"{op.name}.*double backward is not supported"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), args)


# --- the layer ------------------------------------------------------------------------------------

def layer_case(kind):
    if kind == "graph":
        conv = ChimeraConv(16, heads=2, state_dim=4)
        x = torch.randn(20, 16)
        return conv, x, dict(edge_index=random_graph(20, 60))
    conv = ChimeraConv(16, heads=2, state_dim=4, decomposition="grid")
    grid_size = torch.tensor([[3, 4], [2, 5]])
    x = torch.randn(22, 16)
    batch = torch.repeat_interleave(torch.arange(2), grid_size.prod(-1))
    return conv, x, dict(edge_index=torch.empty(2, 0, dtype=torch.long), batch=batch, grid_size=grid_size)


def layer_outputs_and_grads(conv, x, kwargs):
    x = x.detach().clone().requires_grad_()
    out = conv(x, **kwargs)
    params = list(conv.parameters())
    grads = torch.autograd.grad(out, [x] + params, torch.ones_like(out) + out.detach())
    return [out.detach()] + list(grads)


@requires_extension
@pytest.mark.parametrize("kind", ["graph", "grid"])
def test_layer_with_the_fused_ops_equals_the_layer_on_the_references(kind, monkeypatch):
    conv, x, kwargs = layer_case(kind)
    conv, x = conv.double(), x.double()
    calls = {"local_conv_silu": [], "gated_rms_norm": []}

    def counting(name, fn):
        def wrapper(*args, **kw):
            calls[name].append(block_kernels_available(*[a for a in args if isinstance(a, torch.Tensor)]))
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(chimera_conv, "local_conv_silu", counting("local_conv_silu", local_conv_silu))
    monkeypatch.setattr(chimera_conv, "gated_rms_norm", counting("gated_rms_norm", gated_rms_norm))
    fused = layer_outputs_and_grads(conv, x, kwargs)
    # the kernels ran, once each (a grid layer's local convolution is its k x k conv2d)
    assert calls == {"local_conv_silu": [True] if kind == "graph" else [], "gated_rms_norm": [True]}

    monkeypatch.setattr(chimera_conv, "local_conv_silu", local_conv_silu_reference)
    monkeypatch.setattr(chimera_conv, "gated_rms_norm", gated_rms_norm_reference)
    reference = layer_outputs_and_grads(conv, x, kwargs)
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in conv.named_parameters()]
    assert len(fused) == len(names)
    for name, a, b in zip(names, fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


# --- gated RMSNorm without the skip term (a mixer that added D v itself: chimera::grid_mixer) -------

@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gated_rms_norm_without_skip_equals_the_reference(dtype):
    torch.manual_seed(0)
    y, gate = (torch.randn(300, 9, dtype=dtype, requires_grad=True) for _ in range(2))
    weight = torch.randn(9, dtype=dtype, requires_grad=True)
    out = gated_rms_norm(y, None, None, gate, weight)
    want = gated_rms_norm_reference(y, None, None, gate, weight)
    # the skip term with a zero scale is the same norm
    zero_skip = gated_rms_norm_reference(y, torch.randn_like(y), torch.zeros(9, dtype=dtype), gate, weight)
    grad = torch.randn_like(out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(want, zero_skip)
    for a, b in zip(torch.autograd.grad(out, (y, gate, weight), grad), torch.autograd.grad(want, (y, gate, weight), grad)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")
def test_gated_rms_norm_without_skip_gradcheck_and_opcheck():
    torch.manual_seed(0)
    y, gate = (torch.randn(20, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, g, w: gated_rms_norm(y, None, None, g, w), (y, gate, weight))
    torch.library.opcheck(torch.ops.chimera.gated_rms_norm.default, (y, None, None, gate, weight, 1e-5))
    out, rstd = torch.ops.chimera.gated_rms_norm(y.detach(), None, None, gate.detach(), weight.detach(), 1e-5)
    grads = torch.ops.chimera.gated_rms_norm_backward(torch.randn_like(out), y.detach(), None, None, gate.detach(),
                                                      weight.detach(), rstd)
    assert grads[1].numel() == 0 and grads[2].numel() == 0  # no skip: empty gradients
    torch.library.opcheck(torch.ops.chimera.gated_rms_norm_backward.default,
                          (torch.randn_like(out), y.detach(), None, None, gate.detach(), weight.detach(), rstd))


def test_gated_rms_norm_takes_skip_and_skip_scale_together():
    y, gate, weight = torch.randn(4, 3), torch.randn(4, 3), torch.randn(3)
    with pytest.raises(ValueError, match="skip: expected skip and skip_scale together"):
        gated_rms_norm(y, y, None, gate, weight)
    with pytest.raises(ValueError, match="skip: expected skip and skip_scale together"):
        gated_rms_norm(y, None, torch.ones(3), gate, weight)
    if HAS_EXTENSION:
        with pytest.raises(RuntimeError, match="skip and skip_scale must be given together"):
            torch.ops.chimera.gated_rms_norm(y, y, None, gate, weight, 1e-5)
