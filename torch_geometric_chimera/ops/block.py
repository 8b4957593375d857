r"""The elementwise parts of the Chimera block around the mixer, fused on CPU.

:class:`~torch_geometric_chimera.nn.ChimeraConv` runs, as Mamba-2 does, a short (here: local
graph) convolution with a SiLU before the mixer and a gated RMSNorm after it:

.. math::
    \mathrm{local\_conv\_silu}(\mathbf{x}, \mathbf{n}) = \mathrm{SiLU}(\mathbf{a} \odot \mathbf{x}
        + \mathbf{b} \odot \mathbf{n} + \mathbf{c}), \qquad
    \mathrm{gated\_rms\_norm}(\mathbf{y}, \mathbf{s}, \mathbf{z}) = \frac{\mathbf{g}}
        {\sqrt{\mathrm{mean}(\mathbf{g}^2) + \epsilon}} \odot \mathbf{w}, \quad
    \mathbf{g} = (\mathbf{y} + \mathbf{d} \odot \mathbf{s}) \odot \mathrm{SiLU}(\mathbf{z}),

row by row over ``[N, C]`` inputs, with per-channel parameters :math:`\mathbf{a}, \mathbf{b},
\mathbf{c}, \mathbf{d}, \mathbf{w}` (``[C]``). In PyTorch ops each is 5 to 10 passes over the
``[N, C]`` tensors forward and as many backward; on a batch of images (65,536 nodes of 128
channels) that cost more than the mixer. ``chimera::local_conv_silu`` and ``chimera::gated_rms_norm``
(``csrc/cpu/block_ops_cpu.cpp``) read every row once forward and once backward.

:func:`local_conv_silu` and :func:`gated_rms_norm` take the kernels for float32 / float64 CPU
tensors of one dtype (with the compiled extension) and otherwise their references
:func:`local_conv_silu_reference` and :func:`gated_rms_norm_reference`, the formulas above in
PyTorch ops. The kernels' backward is not differentiable again (no double backward).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._extension import HAS_EXTENSION


def local_conv_silu_reference(x: Tensor, neighbors: Tensor, self_scale: Tensor, neighbor_scale: Tensor,
                              bias: Tensor) -> Tensor:
    r""":math:`\mathrm{SiLU}(\mathbf{a} \odot \mathbf{x} + \mathbf{b} \odot \mathbf{n} + \mathbf{c})` in PyTorch ops."""
    return F.silu(x * self_scale + neighbors * neighbor_scale + bias)


def gated_rms_norm_reference(y: Tensor, skip: Optional[Tensor], skip_scale: Optional[Tensor], gate: Tensor,
                             weight: Tensor, eps: float = 1e-5) -> Tensor:
    r"""The gated RMSNorm of the module docstring in PyTorch ops (no skip term when ``skip`` is :obj:`None`)."""
    if skip is not None and skip_scale is not None:  # (two checks: TorchScript refines both Optionals)
        gated = (y + skip * skip_scale) * F.silu(gate)
    else:
        gated = y * F.silu(gate)
    return gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps) * weight


def block_kernels_available(*tensors: Tensor) -> bool:
    """The fused kernels take float32 / float64 CPU tensors of one dtype, with the compiled extension."""
    if not HAS_EXTENSION:
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype
                                                            for t in tensors)


def _check_rows(name: str, t: Tensor, like: Tensor):
    if t.dim() != 2 or t.shape != like.shape:
        raise ValueError(f"{name}: expected shape [N, C] = {list(like.shape)}, got {list(t.shape)}")


def _check_channels(name: str, t: Tensor, channels: int):
    if t.shape != (channels,):
        raise ValueError(f"{name}: expected shape [C] = [{channels}], got {list(t.shape)}")


def local_conv_silu(x: Tensor, neighbors: Tensor, self_scale: Tensor, neighbor_scale: Tensor, bias: Tensor) -> Tensor:
    r""":math:`\mathrm{SiLU}(\mathbf{a} \odot \mathbf{x} + \mathbf{b} \odot \mathbf{n} + \mathbf{c})`.

    Args:
        x (Tensor): ``[N, C]`` (rows may be strided, as a column slice of a projection).
        neighbors (Tensor): ``[N, C]``, the local convolution's neighbour aggregate.
        self_scale (Tensor): :math:`\mathbf{a}`, ``[C]``. neighbor_scale (Tensor): :math:`\mathbf{b}`,
            ``[C]``. bias (Tensor): :math:`\mathbf{c}`, ``[C]``.

    :rtype: :class:`Tensor` ``[N, C]``.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [N, C], got {list(x.shape)}")
    _check_rows("neighbors", neighbors, x)
    for name, t in (("self_scale", self_scale), ("neighbor_scale", neighbor_scale), ("bias", bias)):
        _check_channels(name, t, x.size(1))
    if not block_kernels_available(x, neighbors, self_scale, neighbor_scale, bias):
        return local_conv_silu_reference(x, neighbors, self_scale, neighbor_scale, bias)
    return torch.ops.chimera.local_conv_silu(x, neighbors, self_scale, neighbor_scale, bias)


def gated_rms_norm(y: Tensor, skip: Optional[Tensor], skip_scale: Optional[Tensor], gate: Tensor, weight: Tensor,
                   eps: float = 1e-5) -> Tensor:
    r"""Gated RMSNorm with a skip term, :math:`\mathbf{g} / \sqrt{\mathrm{mean}(\mathbf{g}^2) + \epsilon}
    \odot \mathbf{w}` with :math:`\mathbf{g} = (\mathbf{y} + \mathbf{d} \odot \mathbf{s}) \odot
    \mathrm{SiLU}(\mathbf{z})`, the mean over the ``C`` channels of every row.

    Args:
        y (Tensor): ``[N, C]``, the mixer's output.
        skip (Tensor, optional): :math:`\mathbf{s}`, ``[N, C]`` (Mamba's ``D`` skip: the mixer's input);
            :obj:`None` for no skip term (a mixer that added it itself), with ``skip_scale`` :obj:`None`.
        skip_scale (Tensor, optional): :math:`\mathbf{d}`, ``[C]``.
        gate (Tensor): :math:`\mathbf{z}`, ``[N, C]``.
        weight (Tensor): :math:`\mathbf{w}`, ``[C]``.
        eps (float, optional): added to the mean square. (default: ``1e-5``)

    :rtype: :class:`Tensor` ``[N, C]``.
    """
    if y.dim() != 2 or y.size(1) < 1:
        raise ValueError(f"y: expected shape [N, C] with C >= 1, got {list(y.shape)}")
    if (skip is None) != (skip_scale is None):
        raise ValueError(f"skip: expected skip and skip_scale together (or both None for no skip term), got "
                         f"{'skip' if skip is not None else 'skip_scale'} alone")
    if skip is not None:
        _check_rows("skip", skip, y)
        _check_channels("skip_scale", skip_scale, y.size(1))
    _check_rows("gate", gate, y)
    _check_channels("weight", weight, y.size(1))
    if not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if not block_kernels_available(*(t for t in (y, skip, skip_scale, gate, weight) if t is not None)):
        return gated_rms_norm_reference(y, skip, skip_scale, gate, weight, eps)
    return torch.ops.chimera.gated_rms_norm(y, skip, skip_scale, gate, weight, float(eps))[0]


def window_conv_silu_reference(x: Tensor, graph_ptr: Tensor, row_width: Tensor, weight: Tensor, bias: Tensor,
                               row_offset: int, col_offset: int) -> Tensor:
    r""":func:`window_conv_silu` in PyTorch ops: the window's neighbours gathered (a zero row past
    an image's border), weighted and summed."""
    num_nodes, channels = x.shape
    kh, kw = weight.shape[1:]
    sizes = graph_ptr.diff()
    graph = torch.repeat_interleave(torch.arange(sizes.numel(), device=x.device), sizes, output_size=num_nodes)
    local = torch.arange(num_nodes, device=x.device) - graph_ptr[graph]
    width = row_width[graph].clamp_min(1)
    rows = sizes[graph] // width
    row, column = local // width, local % width
    padded = torch.cat([x, x.new_zeros(1, channels)])
    out = bias.expand(num_nodes, channels)
    for i in range(kh):
        for j in range(kw):
            r, c = row + row_offset + i, column + col_offset + j
            inside = (r >= 0) & (r < rows) & (c >= 0) & (c < width)
            neighbor = torch.where(inside, graph_ptr[graph] + r * width + c, num_nodes)
            out = out + padded[neighbor] * weight[:, i, j]
    return F.silu(out)


def window_conv_silu(x: Tensor, graph_ptr: Tensor, row_width: Tensor, weight: Tensor, bias: Tensor, row_offset: int,
                     col_offset: int) -> Tensor:
    r"""A depthwise convolution with SiLU over every image of a batch (sequences: images of one row),
    zero padded at each image's border, so no image reads another:

    .. math::
        \mathbf{x}'_{(y, x)} = \mathrm{SiLU}\Big(\mathbf{b} + \sum_{i < k_h,\, j < k_w}
            \mathbf{w}_{:, i, j} \odot \mathbf{x}_{(y + r_0 + i,\; x + c_0 + j)}\Big).

    Args:
        x (Tensor): ``[N, C]``, the nodes of every image in raster order, image after image.
        graph_ptr (LongTensor): ``[G + 1]`` first node of every image.
        row_width (LongTensor): ``[G]`` width of every image (it divides the image's node count).
        weight (Tensor): ``[C, k_h, k_w]``. bias (Tensor): ``[C]``.
        row_offset (int): :math:`r_0`. col_offset (int): :math:`c_0` (``-(k // 2)`` centres the window).

    One pass forward, one backward (in bands of rows whose gradients stay in cache;
    ``chimera::window_conv_silu``, CPU float32 / float64 with the compiled extension); elsewhere
    :func:`window_conv_silu_reference`.

    :rtype: :class:`Tensor` ``[N, C]``.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [N, C], got {list(x.shape)}")
    if weight.dim() != 3 or weight.size(0) != x.size(1):
        raise ValueError(f"weight: expected shape [C, kh, kw] with C = {x.size(1)}, got {list(weight.shape)}")
    _check_channels("bias", bias, x.size(1))
    if not (block_kernels_available(x, weight, bias) and graph_ptr.device.type == "cpu"):
        return window_conv_silu_reference(x, graph_ptr, row_width, weight, bias, row_offset, col_offset)
    return torch.ops.chimera.window_conv_silu(x, graph_ptr, row_width, weight, bias, row_offset, col_offset)


if HAS_EXTENSION:

    @torch.library.register_fake("chimera::window_conv_silu")
    def _window_conv_silu_fake(x, graph_ptr, row_width, weight, bias, row_offset, col_offset):
        return x.new_empty(x.shape)

    @torch.library.register_fake("chimera::window_conv_silu_backward")
    def _window_conv_silu_backward_fake(grad_out, x, graph_ptr, row_width, weight, bias, row_offset, col_offset):
        return [x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)]

    def _window_conv_silu_setup_context(ctx, inputs, output):
        x, graph_ptr, row_width, weight, bias, row_offset, col_offset = inputs
        ctx.save_for_backward(x, graph_ptr, row_width, weight, bias)
        ctx.offsets = (row_offset, col_offset)

    def _window_conv_silu_backward(ctx, grad_out):
        x, graph_ptr, row_width, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.chimera.window_conv_silu_backward(grad_out, x, graph_ptr, row_width, weight,
                                                                         bias, *ctx.offsets)
        return dx, None, None, dweight, dbias, None, None

    @torch.library.register_fake("chimera::local_conv_silu")
    def _local_conv_silu_fake(x, neighbors, self_scale, neighbor_scale, bias):
        return x.new_empty(x.shape)

    @torch.library.register_fake("chimera::local_conv_silu_backward")
    def _local_conv_silu_backward_fake(grad_out, x, neighbors, self_scale, neighbor_scale, bias):
        return [x.new_empty(x.shape), x.new_empty(x.shape), self_scale.new_empty(self_scale.shape),
                self_scale.new_empty(self_scale.shape), self_scale.new_empty(self_scale.shape)]

    @torch.library.register_fake("chimera::gated_rms_norm")
    def _gated_rms_norm_fake(y, skip, skip_scale, gate, weight, eps):
        return [y.new_empty(y.shape), y.new_empty(y.shape[:1])]

    @torch.library.register_fake("chimera::gated_rms_norm_backward")
    def _gated_rms_norm_backward_fake(grad_out, y, skip, skip_scale, gate, weight, rstd):
        rows, channels = y.new_empty(y.shape), weight.new_empty(weight.shape)
        if skip is None:  # no skip term: its gradients are empty
            return [rows, y.new_empty(0, y.shape[1]), y.new_empty(0), rows.new_empty(y.shape), channels]
        return [rows, rows.new_empty(y.shape), channels.new_empty(channels.shape), rows.new_empty(y.shape), channels]

    def _local_conv_silu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _local_conv_silu_backward(ctx, grad_out):
        grads = torch.ops.chimera.local_conv_silu_backward(grad_out, *ctx.saved_tensors)
        return tuple(grads)

    def _gated_rms_norm_setup_context(ctx, inputs, output):
        y, skip, skip_scale, gate, weight, _eps = inputs
        ctx.save_for_backward(y, skip, skip_scale, gate, weight, output[1])
        ctx.set_materialize_grads(False)  # rstd is internal: its gradient stays None

    def _gated_rms_norm_backward(ctx, grads: Tuple[Tensor, Tensor]):
        grad_out = grads[0]
        if grad_out is None:
            return (None,) * 6
        dy, dskip, dskip_scale, dgate, dweight = torch.ops.chimera.gated_rms_norm_backward(grad_out,
                                                                                          *ctx.saved_tensors)
        if ctx.saved_tensors[1] is None:  # no skip term
            dskip = dskip_scale = None
        return dy, dskip, dskip_scale, dgate, dweight, None

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError("chimera's fused block kernels (local_conv_silu, gated_rms_norm, window_conv_silu): "
                                  "double backward is not supported; use their *_reference functions")

    torch.library.register_autograd("chimera::local_conv_silu", _local_conv_silu_backward,
                                    setup_context=_local_conv_silu_setup_context)
    torch.library.register_autograd("chimera::gated_rms_norm", _gated_rms_norm_backward,
                                    setup_context=_gated_rms_norm_setup_context)
    torch.library.register_autograd("chimera::window_conv_silu", _window_conv_silu_backward,
                                    setup_context=_window_conv_silu_setup_context)
    for _name in ("chimera::local_conv_silu_backward", "chimera::gated_rms_norm_backward",
                  "chimera::window_conv_silu_backward"):
        torch.library.register_autograd(_name, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


__all__ = ("local_conv_silu", "local_conv_silu_reference", "gated_rms_norm", "gated_rms_norm_reference",
           "window_conv_silu", "window_conv_silu_reference", "block_kernels_available")
