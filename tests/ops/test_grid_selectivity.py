"""``chimera::grid_selectivity`` (``csrc/cpu/grid_scan_cpu.cpp``): the stacked grid kernel's weight
table from the selectivity in one pass, against the PyTorch formulas
(:func:`decomposition_adjacency_reference`): values and gradients, gradcheck, op checks, malformed
calls, and the layer's use of it (the table goes to the grid kernel as it is, no copy)."""
import pytest
import torch

import torch_geometric_chimera.nn.decomposition as decomposition
from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.nn.decomposition import (decomposition_adjacency, decomposition_adjacency_reference,
                                                      decomposition_geometry, dt_groups)
from torch_geometric_chimera.ops.grid import grid_selectivity

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.chimera, "grid_selectivity"),
                                reason="needs the compiled extension")

# A square-ish image, a pixel (a source in every DAG), a row, a column, an empty image, a tall one.
MIXED_SIZES = ((3, 4), (1, 1), (1, 5), (4, 1), (0, 3), (7, 2))


def problem(share_dt="none", heads=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    grid_size = torch.tensor(MIXED_SIZES)
    num_nodes = int((grid_size[:, 0] * grid_size[:, 1]).sum())
    geometry = decomposition_geometry("grid", num_nodes, grid_size=grid_size)
    groups = dt_groups("grid", share_dt)
    delta = (torch.rand(num_nodes, max(groups) + 1, 2, heads, dtype=dtype) * 3).requires_grad_()
    return geometry, groups, delta


@pytest.mark.parametrize("share_dt", ["none", "diagonal"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_kernel_equals_the_pytorch_formulas_values_and_gradients(share_dt, signed, scale):
    geometry, groups, delta = problem(share_dt)
    weight, key_scale = decomposition_adjacency(delta, geometry, groups, scale, signed)
    assert weight._base is not None and weight._base is key_scale._base  # the kernel's table
    want_weight, want_key_scale = decomposition_adjacency_reference(delta, geometry, groups, scale, signed)
    torch.testing.assert_close(weight, want_weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(key_scale, want_key_scale, rtol=1e-12, atol=1e-14)
    grad_weight, grad_key_scale = torch.randn_like(weight), torch.randn_like(key_scale)
    got = torch.autograd.grad((weight, key_scale), delta, (grad_weight, grad_key_scale))[0]
    want = torch.autograd.grad((want_weight, want_key_scale), delta, (grad_weight, grad_key_scale))[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_missing_parents_give_zero_weights_and_sources_zero_key_scales():
    geometry, groups, delta = problem()
    table = grid_selectivity(delta, geometry.parents, groups)
    parents = geometry.parents  # [D, N, 2]
    assert torch.equal(table[:, :, :2][~parents], torch.zeros_like(table[:, :, :2][~parents]))
    sources = ~parents.any(-1)  # the pixel of a 1 x 1 image, every DAG's first corner
    assert sources.any()
    assert torch.equal(table[:, :, 2][sources], torch.zeros_like(table[:, :, 2][sources]))
    # One parent: no normalization; two: 1 / sqrt(2). DAG d reads Delta set groups[d].
    above = delta.detach()[:, list(groups), 0].transpose(0, 1)  # [D, N, H]
    one, two = parents[..., 0] & ~parents[..., 1], parents.all(-1)
    assert one.any() and two.any()
    torch.testing.assert_close(table[:, :, 0][one], torch.exp(-above[one]))
    torch.testing.assert_close(table[:, :, 0][two], torch.exp(-above[two]) / 2 ** 0.5)


@pytest.mark.parametrize("signed", [False, True])
def test_gradcheck(signed):
    geometry, groups, delta = problem("diagonal", heads=2)
    assert torch.autograd.gradcheck(lambda d: grid_selectivity(d, geometry.parents, groups, 0.5, signed), (delta,))


def test_opcheck():
    geometry, groups, delta = problem("diagonal")
    args = (delta, geometry.parents, list(groups), 0.5, True)
    torch.library.opcheck(torch.ops.chimera.grid_selectivity.default, args)
    grad = torch.randn(4, delta.size(0), 3, delta.size(3), dtype=delta.dtype)
    torch.library.opcheck(torch.ops.chimera.grid_selectivity_backward.default, (grad, delta.detach()) + args[1:])
    with pytest.raises(NotImplementedError, match="grid_selectivity_backward: double backward"):
        table = grid_selectivity(delta, geometry.parents, groups)
        first = torch.autograd.grad(table.sum(), delta, create_graph=True)[0]
        torch.autograd.grad(first.sum(), delta)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "delta": a["delta"][:, :, :1]}, "delta must have shape"),
    (lambda a: {**a, "delta": a["delta"].long()}, "delta must be float32 or float64"),
    (lambda a: {**a, "delta": a["delta"].bfloat16()}, "delta must be float32 or float64"),
    (lambda a: {**a, "parents": a["parents"].long()}, "parents must be a bool tensor"),
    (lambda a: {**a, "parents": a["parents"][:, :-1]}, "parents must be a bool tensor"),
    (lambda a: {**a, "groups": [0, 1, 1]}, "groups must name one Delta set per DAG"),
    (lambda a: {**a, "groups": [0, 1, 2, 0]}, r"groups\[2\] must be a Delta set in \[0, 2\)"),
])
def test_malformed_calls_are_clean_errors(change, message):
    geometry, groups, delta = problem("diagonal")
    args = change(dict(delta=delta.detach(), parents=geometry.parents, groups=list(groups)))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.chimera.grid_selectivity(args["delta"], args["parents"], args["groups"], 1.0, False)


def test_layer_hands_the_table_to_the_grid_kernel_without_a_copy(monkeypatch):
    # The stacked kernel gets the selectivity kernel's table itself, not a concatenation of its views.
    tables, seen = [], []
    real_selectivity, real_mixer = decomposition.grid_selectivity, decomposition.grid_mixer

    def selectivity(*args, **kwargs):
        tables.append(real_selectivity(*args, **kwargs))
        return tables[-1]

    def mixer(graph_ptr, row_width, nodes, table, *args, **kwargs):
        seen.append(table)
        return real_mixer(graph_ptr, row_width, nodes, table, *args, **kwargs)

    monkeypatch.setattr(decomposition, "grid_selectivity", selectivity)
    monkeypatch.setattr(decomposition, "grid_mixer", mixer)
    torch.manual_seed(0)
    conv = ChimeraConv(16, heads=2, state_dim=4, decomposition="grid")
    grid_size = torch.tensor([[4, 4]] * max(4, torch.get_num_threads()))  # as many images as threads: one call
    with torch.no_grad():
        conv(torch.randn(16 * grid_size.size(0), 16), None, grid_size=grid_size)
    assert len(tables) == 1 and len(seen) == 1 and seen[0] is tables[0]
