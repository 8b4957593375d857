"""The grid path: ``chimera::grid_attention`` (``csrc/cpu/grid_scan_cpu.cpp``) on the four directed
grid DAGs of :func:`batched_grid_dags`, against :func:`grid_attention_reference` (the same
recurrence, position by position, in PyTorch) and the dense inverse oracle on the DAG's
``edge_index``. The malformed raw-op calls are in ``test_raw_op_safety.py``; the layer's grid path
against the per-DAG path in ``tests/nn/test_decomposition.py``."""

import pytest
import torch

from torch_geometric_chimera.nn.decomposition import batched_grid_dags
from torch_geometric_chimera.ops.grid import (GRID_DIRECTIONS, grid_attention, grid_attention_reference, grid_walks,
                                              grid_weights, num_checkpoints, segment_rows_for, state_block)
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention

# Images of a batch: a square-ish one, a single pixel, a row, a column, an empty 0 x 3 image and a
# tall one (several segments once segment_rows is small).
MIXED_SIZES = ((3, 4), (1, 1), (1, 5), (4, 1), (0, 3), (7, 2))


class GridProblem:
    """Random inputs of :func:`grid_attention` for the DAG ``direction`` of images of ``sizes``.

    ``edge_weight`` (``[E, H]``, signed, small enough that the resolvent stays bounded) lives on
    the DAG's ``edge_index``; ``weight`` is its ``[N, 2, H]`` table (:func:`grid_weights`). All
    float tensors are leaves that require grad."""

    def __init__(self, sizes, direction=0, heads=2, state_dim=3, head_dim=4, dtype=torch.float64):
        self.grid_size = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
        dags = batched_grid_dags(self.grid_size)
        self.walks = grid_walks(self.grid_size, dags)
        self.edge_index = dags[direction]
        self.nodes = self.walks.nodes[direction]
        self.weight_index = self.walks.weight_index[direction]
        self.num_nodes = int(self.walks.graph_ptr[-1])
        n, h = self.num_nodes, heads
        self.edge_weight = (torch.rand(self.edge_index.size(1), h, dtype=dtype) - 0.5).requires_grad_()
        self.query = torch.randn(n, h, state_dim, dtype=dtype, requires_grad=True)
        self.key = torch.randn(n, h, state_dim, dtype=dtype, requires_grad=True)
        self.value = torch.randn(n, h, head_dim, dtype=dtype, requires_grad=True)

    @property
    def inputs(self):
        return self.edge_weight, self.query, self.key, self.value

    def kernel(self, segment_rows=None):
        weight = grid_weights(self.edge_weight, self.weight_index, self.num_nodes)
        return grid_attention(self.walks.graph_ptr, self.walks.row_width, self.nodes, weight, self.query, self.key,
                              self.value, segment_rows)

    def reference(self):
        weight = grid_weights(self.edge_weight, self.weight_index, self.num_nodes)
        return grid_attention_reference(self.walks.graph_ptr, self.walks.row_width, self.nodes, weight, self.query,
                                        self.key, self.value)

    def dense(self):
        return inverse_resolvent_attention(self.query, self.key, self.value, self.edge_index, self.edge_weight)


def values_and_grads(output, inputs, grad):
    """``output`` and the gradients of ``<output, grad>`` in ``inputs``."""
    return (output.detach(),) + torch.autograd.grad(output, inputs, grad)


def assert_all_close(got, want, **tolerances):
    assert len(got) == len(want) == 5
    names = ("y", "grad edge_weight", "grad query", "grad key", "grad value")
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


# --- values and gradients -------------------------------------------------------------------------

# float32: the kernel sums in another order than the oracles.
TOLERANCES = {torch.float64: {}, torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("direction", range(len(GRID_DIRECTIONS)))
def test_grid_attention_equals_the_reference_and_the_dense_oracle(direction, dtype):
    problem = GridProblem(MIXED_SIZES, direction, dtype=dtype)
    assert problem.num_nodes == 36 and problem.edge_index.size(1) > 0
    out = problem.kernel()
    grad = torch.randn_like(out)
    got = values_and_grads(out, problem.inputs, grad)
    assert got[0].abs().max() > 0.1  # not a vacuous comparison of zeros
    assert_all_close(got, values_and_grads(problem.reference(), problem.inputs, grad), **TOLERANCES[dtype])
    assert_all_close(got, values_and_grads(problem.dense(), problem.inputs, grad), **TOLERANCES[dtype])


def test_segments_and_state_blocks_give_the_same_numbers():
    # Rows of 64 positions at P = 16 in float64 are 8 KiB per state row: blocks of 4 of the S = 10
    # state rows (4 + 4 + 2). The images are 7 and 5 rows tall: segment_rows 1, 2, 3 checkpoint.
    sizes = ((7, 64), (2, 3), (5, 64), (6, 1))
    problem = GridProblem(sizes, direction=3, heads=1, state_dim=10, head_dim=16)
    assert state_block(64, 10, 16, 8) == 4 and state_block(3, 10, 16, 8) == 10
    assert segment_rows_for(problem.walks, 10, 16, 8) == 7  # default: the tallest image, no checkpoint
    reference = problem.reference()
    grad = torch.randn_like(reference)
    want = values_and_grads(reference, problem.inputs, grad)
    for segment_rows in (1, 2, 3, None):
        got = values_and_grads(problem.kernel(segment_rows), problem.inputs, grad)
        assert_all_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_dim, width", [(5, 300), (32, 100)])
def test_several_state_blocks_match_the_reference(head_dim, width, dtype):
    # The generic head dimension (5) and a fixed one (32), with rows wide enough that the S = 7
    # state rows take several blocks (float64: blocks of 2 and of 1 rows; float32, where blocks are
    # twice as tall: 5 and 2).
    block = state_block(width, 7, head_dim, torch.finfo(dtype).bits // 8)
    assert block < 7
    problem = GridProblem(((2, width),), direction=1, heads=1, state_dim=7, head_dim=head_dim, dtype=dtype)
    out = problem.kernel(segment_rows=1)
    grad = torch.randn_like(out)
    assert_all_close(values_and_grads(out, problem.inputs, grad),
                     values_and_grads(problem.reference(), problem.inputs, grad), **TOLERANCES[dtype])


def walk_states(graph_ptr, row_width, nodes, weight, key, value):
    """``[N, H, S, P]``: the state of every position of the walks, by the recurrence, in walk order."""
    states = torch.zeros(key.shape + value.shape[-1:], dtype=key.dtype)
    for g in range(graph_ptr.numel() - 1):
        start, end, width = int(graph_ptr[g]), int(graph_ptr[g + 1]), int(row_width[g])
        for p in range(start, end):
            i = int(nodes[p])
            states[p] = key[i].unsqueeze(-1) * value[i].unsqueeze(-2)
            if p - start >= width:
                states[p] += weight[i, 0].view(-1, 1, 1) * states[p - width]
            if (p - start) % width:
                states[p] += weight[i, 1].view(-1, 1, 1) * states[p - 1]
    return states


def test_checkpoints_are_the_last_rows_of_every_segment_but_the_final_one():
    problem = GridProblem(((7, 3), (1, 4), (0, 3), (6, 1)), direction=2, heads=2, state_dim=3, head_dim=2)
    walks = problem.walks
    weight = grid_weights(problem.edge_weight, problem.weight_index, problem.num_nodes).detach()
    query, key, value = problem.query.detach(), problem.key.detach(), problem.value.detach()
    states = walk_states(walks.graph_ptr, walks.row_width, problem.nodes, weight, key, value)
    # 7 rows of 3: ceil(7 / C) - 1 checkpointed rows; 1 row: none; 6 rows of 1: ceil(6 / C) - 1.
    for segment_rows, expected in ((1, 6 * 3 + 5), (2, 3 * 3 + 2), (3, 2 * 3 + 1), (6, 3), (7, 0)):
        count = num_checkpoints(walks.graph_ptr, walks.row_width, segment_rows)
        assert count == expected
        y, checkpoints = torch.ops.chimera.grid_attention(walks.graph_ptr, walks.row_width, problem.nodes, weight,
                                                          query, key, value, segment_rows, count)
        positions = [start + row * width + c
                     for start, rows, width in ((0, 7, 3), (21, 1, 4), (25, 6, 1))
                     for row in range(segment_rows - 1, rows - 1, segment_rows) for c in range(width)]
        assert len(positions) == expected
        torch.testing.assert_close(checkpoints, states[positions].flatten(2))


# --- autograd and op checks ---------------------------------------------------------------------


def raw_inputs(sizes=((2, 3), (1, 2), (3, 1)), heads=2, state_dim=2, head_dim=3, direction=2):
    """The arguments of ``chimera::grid_attention`` (float64 leaves that require grad)."""
    problem = GridProblem(sizes, direction, heads, state_dim, head_dim)
    weight = torch.rand(problem.num_nodes, 2, heads, dtype=torch.float64) - 0.5
    return problem.walks, problem.nodes, weight.requires_grad_(), problem.query, problem.key, problem.value


@pytest.mark.parametrize("segment_rows", [1, None])
def test_gradcheck(segment_rows):
    # segment_rows=1: the backward restarts every row from a checkpoint; None: none at all
    walks, nodes, *inputs = raw_inputs(sizes=((3, 2), (1, 2), (2, 1)), heads=1)
    if True:  # tiny problems run serially (the kernel's task grain), no thread setting needed
        assert torch.autograd.gradcheck(
            lambda w, q, k, v: grid_attention(walks.graph_ptr, walks.row_width, nodes, w, q, k, v, segment_rows),
            inputs)


def test_opcheck_forward_and_backward_ops():
    walks, nodes, *inputs = raw_inputs()
    segment_rows = 1
    count = num_checkpoints(walks.graph_ptr, walks.row_width, segment_rows)
    assert count > 0  # the checkpoints are part of what is checked
    index = (walks.graph_ptr, walks.row_width, nodes)
    detached = [t.detach() for t in inputs]
    if True:  # tiny problems run serially (the kernel's task grain), no thread setting needed
        torch.library.opcheck(torch.ops.chimera.grid_attention.default, (*index, *inputs, segment_rows, count))
        y, checkpoints = torch.ops.chimera.grid_attention(*index, *detached, segment_rows, count)
        torch.library.opcheck(torch.ops.chimera.grid_attention_backward.default,
                              (*index, *detached, checkpoints, torch.randn_like(y), segment_rows, count))


def test_double_backward_is_refused_with_a_clear_error():
    walks, nodes, *inputs = raw_inputs()
    y = grid_attention(walks.graph_ptr, walks.row_width, nodes, *inputs)
    grads = torch.autograd.grad(y.square().sum(), inputs, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward is not supported"):
        torch.autograd.grad(grads[1].sum(), inputs)


THREADS_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_grid_kernel import GridProblem, values_and_grads
# Images big enough that the kernel's task grain (about 2^18 state updates per chunk) splits the
# (image, head) tasks between the threads.
problem = GridProblem(((32, 32), (32, 32), (16, 64), (1, 1)), direction=1, heads=2, state_dim=16, head_dim=16)
results = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    out = problem.kernel(segment_rows=2)
    results.append(values_and_grads(out, problem.inputs, torch.ones_like(out)))
# every (image, head) is one task writing its own entries: bitwise the same
assert all(torch.equal(a, b) for a, b in zip(*results)), "results differ between 1 and 2 threads"
print("same")
"""


def test_result_does_not_depend_on_the_number_of_threads():
    # In a subprocess: torch.set_num_threads breaks torch 2.13's CPU batched LU for the rest of the
    # process (tests/ops/test_cpu_batched_lu.py), which other tests of this session use.
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, here], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "same" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_float32_and_returns_the_input_dtype(dtype):
    walks, nodes, *inputs = raw_inputs(sizes=((3, 4), (2, 2)), direction=3)
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    index = (walks.graph_ptr, walks.row_width, nodes)
    out = grid_attention(*index, *low)
    assert out.dtype == dtype
    upcast = [t.detach().float().requires_grad_() for t in low]
    expected = grid_attention(*index, *upcast)
    assert torch.equal(out, expected.to(dtype))  # the same float32 computation, rounded once
    grad = torch.randn_like(expected).to(dtype)
    got = torch.autograd.grad(out, low, grad)
    want = torch.autograd.grad(expected, upcast, grad.float())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))


@pytest.mark.parametrize("heads, state_dim, head_dim", [(2, 0, 3), (0, 2, 3), (2, 2, 0)])
@pytest.mark.parametrize("segment_rows", [1, None])
def test_empty_dimensions_give_zeros_of_the_right_shape(heads, state_dim, head_dim, segment_rows):
    problem = GridProblem(((3, 2), (0, 3), (2, 1)), heads=heads, state_dim=state_dim, head_dim=head_dim)
    weight = torch.rand(problem.num_nodes, 2, heads, dtype=torch.float64, requires_grad=True)
    inputs = (weight, problem.query, problem.key, problem.value)
    out = grid_attention(problem.walks.graph_ptr, problem.walks.row_width, problem.nodes, *inputs, segment_rows)
    assert out.shape == (problem.num_nodes, heads, head_dim)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    for grad, leaf in zip(grads, inputs):
        assert grad.shape == leaf.shape and torch.equal(grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("num_graphs", [0, 2])
def test_no_nodes_give_an_empty_output(num_graphs):
    graph_ptr, row_width = torch.zeros(num_graphs + 1, dtype=torch.long), torch.full((num_graphs,), 3)
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in ((0, 2, 2), (0, 2, 4), (0, 2, 4), (0, 2, 5))]
    out = grid_attention(graph_ptr, row_width, torch.zeros(0, dtype=torch.long), *inputs)
    assert out.shape == (0, 2, 5)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in inputs]


def test_weights_of_missing_parents_are_ignored_and_get_zero_gradient():
    walks, nodes, weight, query, key, value = raw_inputs(sizes=((3, 4), (1, 3), (4, 1), (1, 1)), direction=1)
    # which (node, slot) has no parent: slot 0 in a walk's first row, slot 1 in its first column
    missing = torch.zeros(weight.shape[:2], dtype=torch.bool)
    for g in range(walks.graph_ptr.numel() - 1):
        start, end, width = int(walks.graph_ptr[g]), int(walks.graph_ptr[g + 1]), int(walks.row_width[g])
        for p in range(end - start):
            missing[nodes[start + p], 0] |= p < width
            missing[nodes[start + p], 1] |= p % width == 0
    assert 0 < int(missing.sum()) < missing.numel()
    poisoned = weight.detach().clone()
    poisoned[missing] = float("nan")
    poisoned.requires_grad_()
    clean = weight.detach().masked_fill(missing.unsqueeze(-1), 0.0).requires_grad_()
    index = (walks.graph_ptr, walks.row_width, nodes)
    for segment_rows in (1, None):
        out = grid_attention(*index, poisoned, query, key, value, segment_rows)
        expected = grid_attention_reference(*index, clean, query, key, value)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (poisoned, query, key, value), grad)
        want = torch.autograd.grad(expected, (clean, query, key, value), grad)
        torch.testing.assert_close(out, expected)
        assert torch.equal(got[0][missing], torch.zeros_like(got[0][missing]))
        assert bool((got[0][~missing] != 0).all())  # the present ones do get a gradient
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("segment_rows", [8, 2**40, 2**63 - 1])
def test_segment_rows_past_the_tallest_image_checkpoint_nothing(segment_rows):
    # The backward's buffer once held segment_rows rows whatever the image's height: 2**40 rows
    # aborted the process (std::bad_alloc cannot leave the kernel's vector clones), and
    # ceil(rows / segment_rows) overflowed near INT64_MAX.
    problem = GridProblem(((7, 64), (3, 2)), heads=1, state_dim=16, head_dim=16, dtype=torch.float32)
    assert num_checkpoints(problem.walks.graph_ptr, problem.walks.row_width, segment_rows) == 0
    out = problem.kernel(segment_rows)
    grad = torch.randn_like(out)
    assert_all_close(values_and_grads(out, problem.inputs, grad),
                     values_and_grads(problem.kernel(7), problem.inputs, grad))


@pytest.mark.parametrize("segment_rows", [0, -2])
def test_segment_rows_below_one_is_refused_by_name(segment_rows):
    walks, nodes, *inputs = raw_inputs()
    with pytest.raises(ValueError, match=f"segment_rows: expected a positive int, got {segment_rows}"):
        grid_attention(walks.graph_ptr, walks.row_width, nodes, *inputs, segment_rows)
