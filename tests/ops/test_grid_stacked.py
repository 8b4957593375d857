"""The stacked form of ``chimera::grid_attention`` (``csrc/cpu/grid_scan_cpu.cpp``): ``D`` grid DAGs
in one call, walks ``[D, N]``, weight ``[D, N, 3, H]`` (above, before in the row, the key's scale
per head), query and key ``[N, D, 1, S]`` shared by the heads, one output ``[N, H, P]`` summed over
the DAGs. Against :func:`grid_attention_reference` in the stacked form, the sum of ``D`` one-DAG
kernel calls, and the dense inverse oracle on the DAGs' ``edge_index``; autograd and op checks,
thread-count determinism, low precision, malformed raw-op calls and the layer's use of it
(``decomposed_resolvent_attention`` in ``nn/decomposition.py``). The one-DAG form is in
``test_grid_kernel.py`` and ``test_raw_op_safety.py``."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from worker_cases import run_cases, subprocess_env

import torch_geometric_chimera.nn.decomposition as decomposition
from torch_geometric_chimera.nn.decomposition import (batched_grid_dags, decomposed_resolvent_attention,
                                                      decomposition_adjacency, decomposition_geometry, sharing_groups)
from torch_geometric_chimera.ops.grid import (GRID_DIRECTIONS, grid_attention, grid_attention_reference, grid_walks,
                                              grid_weights, num_checkpoints, state_block)
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention

# Images of a batch: a square-ish one, a single pixel, a row, a column, an empty 0 x 3 image and a
# tall one (several segments once segment_rows is small), as in test_grid_kernel.py.
MIXED_SIZES = ((3, 4), (1, 1), (1, 5), (4, 1), (0, 3), (7, 2))


class StackedProblem:
    """Random stacked inputs of :func:`grid_attention` for the first ``num_dags`` grid DAGs (in
    :data:`GRID_DIRECTIONS` order) of images of ``sizes``.

    ``weight`` (``[D, N, 3, H]``) is random in every entry, those of missing parents (first row,
    first column of a walk) included: the kernel must ignore them. All float tensors are leaves
    that require grad."""

    def __init__(self, sizes, num_dags=4, heads=2, state_dim=3, head_dim=4, dtype=torch.float64):
        self.grid_size = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
        self.dags = batched_grid_dags(self.grid_size)[:num_dags]
        self.walks = grid_walks(self.grid_size, self.dags)
        self.nodes = torch.stack(self.walks.nodes)  # [D, N]
        self.num_nodes = n = int(self.walks.graph_ptr[-1])
        self.num_dags, self.heads = num_dags, heads
        self.weight = (torch.rand(num_dags, n, 3, heads, dtype=dtype) - 0.5).requires_grad_()
        self.query = torch.randn(n, num_dags, 1, state_dim, dtype=dtype, requires_grad=True)
        self.key = torch.randn(n, num_dags, 1, state_dim, dtype=dtype, requires_grad=True)
        self.value = torch.randn(n, heads, head_dim, dtype=dtype, requires_grad=True)

    @property
    def index(self):
        return self.walks.graph_ptr, self.walks.row_width, self.nodes

    @property
    def inputs(self):
        return self.weight, self.query, self.key, self.value

    def kernel(self, segment_rows=None):
        return grid_attention(*self.index, *self.inputs, segment_rows)

    def reference(self):
        return grid_attention_reference(*self.index, *self.inputs)

    def one_dag_kernels(self, segment_rows=None):
        """The sum of ``D`` one-DAG kernel calls: the query expanded to every head, the key scaled."""
        out = 0
        for d in range(self.num_dags):
            query = self.query[:, d].expand(-1, self.heads, -1)
            key = self.key[:, d] * self.weight[d, :, 2].unsqueeze(-1)
            out = out + grid_attention(self.walks.graph_ptr, self.walks.row_width, self.walks.nodes[d],
                                       self.weight[d, :, :2], query, key, self.value, segment_rows)
        return out

    def missing(self):
        """``[D, N, 3, H]`` bool: the weights without a parent (slot 0 in a walk's first row, slot 1
        in its first column); slot 2 (the key's scale) is never missing."""
        mask = torch.zeros(self.weight.shape[:3], dtype=torch.bool)
        ptr, width = self.walks.graph_ptr, self.walks.row_width
        for d in range(self.num_dags):
            for g in range(ptr.numel() - 1):
                start, end, w = int(ptr[g]), int(ptr[g + 1]), int(width[g])
                for p in range(end - start):
                    i = int(self.nodes[d, start + p])
                    mask[d, i, 0] |= p < w
                    mask[d, i, 1] |= p % w == 0
        return mask.unsqueeze(-1).expand(self.weight.shape)


def values_and_grads(output, inputs, grad):
    """``output`` and the gradients of ``<output, grad>`` in ``inputs``."""
    return (output.detach(),) + torch.autograd.grad(output, inputs, grad)


NAMES = ("y", "grad weight", "grad query", "grad key", "grad value")


def assert_all_close(got, want, names=NAMES, **tolerances):
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


# --- values and gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("groups, sets", [((0, 1, 1, 0), 2), ((0, 0, 0, 0), 1), ((2, 0, 2, 0), 3)])
@pytest.mark.parametrize("head_dim", [3, 16])
def test_dags_sharing_query_and_key_sets_read_them_in_place(groups, sets, head_dim):
    # The layer's B, C sharing (diagonal: DAGs 0 and 3, 1 and 2): the kernel reads query[:, groups[d]]
    # in place, and values, keys and queries as strided column blocks of one feature tensor, as the
    # layer's projection lays them out; equal to the gathered, contiguous call and to the reference,
    # values and gradients. A set no DAG reads ((2, 0, 2, 0): set 1) gets zero gradient.
    torch.manual_seed(0)
    problem = StackedProblem(MIXED_SIZES, num_dags=4, heads=2, head_dim=head_dim)
    n = problem.num_nodes
    # values, keys, queries, then 5 more columns
    features = torch.randn(n, 2 * head_dim + 2 * sets * 3 + 5, dtype=torch.float64, requires_grad=True)
    value, key, query, _ = features.split([2 * head_dim, sets * 3, sets * 3, 5], dim=1)
    value, key, query = value.view(n, 2, head_dim), key.view(n, sets, 1, 3), query.view(n, sets, 1, 3)
    assert not any(t.is_contiguous() for t in (value, key, query))
    grad = torch.randn(n, 2, head_dim, dtype=torch.float64)
    leaves = (problem.weight, features)
    in_place = grid_attention(*problem.index, problem.weight, query, key, value, 2, groups=groups)
    index = torch.tensor(groups)
    gathered = grid_attention(*problem.index, problem.weight, query.index_select(1, index), key.index_select(1, index),
                              value.contiguous(), 2)
    reference = grid_attention_reference(*problem.index, problem.weight, query, key, value, groups=groups)
    want = values_and_grads(reference, leaves, grad)
    for got in (values_and_grads(in_place, leaves, grad), values_and_grads(gathered, leaves, grad)):
        assert_all_close(got, want, names=("y", "grad weight", "grad features"))
    unread = sorted(set(range(sets)) - set(groups))
    if unread:
        grad_query = torch.autograd.grad(grid_attention(*problem.index, problem.weight, query, key, value,
                                                        groups=groups).sum(), query)[0]
        assert torch.equal(grad_query[:, unread], torch.zeros_like(grad_query[:, unread]))


def test_groups_pass_opcheck_and_are_checked():
    problem = StackedProblem(((2, 3), (1, 2)), num_dags=4)
    n = problem.num_nodes
    query, key = torch.randn(n, 2, 1, 3, dtype=torch.float64), torch.randn(n, 2, 1, 3, dtype=torch.float64)
    value = torch.randn(n, 2, 4, dtype=torch.float64)
    weight = problem.weight.detach()
    count = num_checkpoints(problem.walks.graph_ptr, problem.walks.row_width, 1)
    args = (*problem.index, weight, query, key, value, 1, count, [0, 1, 1, 0])
    torch.library.opcheck(torch.ops.chimera.grid_attention.default, args)
    y, checkpoints = torch.ops.chimera.grid_attention(*args)
    torch.library.opcheck(torch.ops.chimera.grid_attention_backward.default,
                          (*problem.index, weight, query, key, value, checkpoints, torch.randn_like(y), 1, count,
                           [0, 1, 1, 0]))
    with pytest.raises(RuntimeError, match=r"groups\[2\] must be a set of query and key in \[0, 2\), got 2"):
        torch.ops.chimera.grid_attention(*problem.index, weight, query, key, value, 1, count, [0, 1, 2, 0])
    with pytest.raises(RuntimeError, match=r"nodes must be a \[D, N\] = \[3, "):
        torch.ops.chimera.grid_attention(*problem.index, weight, query, key, value, 1, count, [0, 1, 1])


@pytest.mark.parametrize("head_dim", [3, 16])  # the generic loops and a fixed head dimension (vectors)
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("num_dags", [4, 2])
def test_stacked_kernel_equals_the_reference_and_the_sum_of_one_dag_calls(num_dags, heads, head_dim):
    problem = StackedProblem(MIXED_SIZES, num_dags, heads, head_dim=head_dim)
    assert problem.num_nodes == 36 and problem.nodes.shape == (num_dags, 36)
    reference = problem.reference()
    grad = torch.randn_like(reference)
    want = values_and_grads(reference, problem.inputs, grad)
    assert want[0].abs().max() > 0.1  # not a vacuous comparison of zeros
    missing = problem.missing()
    assert 0 < int(missing.sum()) < missing.numel()
    # The reference never reads a missing weight: its gradient there is zero too.
    assert torch.equal(want[1][missing], torch.zeros_like(want[1][missing]))
    # The tallest image has 7 rows: segment_rows 1 and 2 checkpoint, 1000 and the default do not.
    for segment_rows, checkpointed in ((1, True), (2, True), (1000, False), (None, False)):
        if segment_rows is not None:
            count = num_checkpoints(problem.walks.graph_ptr, problem.walks.row_width, segment_rows)
            assert (count > 0) == checkpointed
        got = values_and_grads(problem.kernel(segment_rows), problem.inputs, grad)
        assert_all_close(got, want)
        assert_all_close(got, values_and_grads(problem.one_dag_kernels(segment_rows), problem.inputs, grad))
        grad_weight = got[1]
        assert torch.equal(grad_weight[missing], torch.zeros_like(grad_weight[missing]))
        assert bool((grad_weight[~missing] != 0).all())  # the present ones (and every key scale) do get one


def test_weights_of_missing_parents_are_never_read():
    # NaN in every weight without a parent: the output and the other gradients stay those of zeros there.
    problem = StackedProblem(MIXED_SIZES, 4, heads=2)
    missing = problem.missing()
    poisoned = problem.weight.detach().masked_fill(missing, float("nan")).requires_grad_()
    clean = problem.weight.detach().masked_fill(missing, 0.0).requires_grad_()
    rest = (problem.query, problem.key, problem.value)
    expected = grid_attention_reference(*problem.index, clean, *rest)
    grad = torch.randn_like(expected)
    want = values_and_grads(expected, (clean,) + rest, grad)
    for segment_rows in (1, None):
        out = grid_attention(*problem.index, poisoned, *rest, segment_rows)
        assert_all_close(values_and_grads(out, (poisoned,) + rest, grad), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_several_state_blocks_in_the_stacked_form(dtype):
    # Rows of 300 positions at P = 16: blocks of one (float64) or two (float32) of the S = 5 state
    # rows; the key scale's gradient and dQ, dK add up over the blocks and the heads.
    problem = StackedProblem(((3, 300), (1, 1), (2, 2)), 2, heads=2, state_dim=5, head_dim=16, dtype=dtype)
    assert state_block(300, 5, 16, torch.finfo(dtype).bits // 8) < 5
    out = problem.kernel(segment_rows=1)
    grad = torch.randn_like(out)
    got = values_and_grads(out, problem.inputs, grad)
    assert_all_close(got, values_and_grads(problem.one_dag_kernels(1), problem.inputs, grad))
    if dtype == torch.float64:  # the reference is slow on 900 positions x 2 DAGs: once is enough
        assert_all_close(got, values_and_grads(problem.reference(), problem.inputs, grad))


def test_stacked_kernel_equals_the_dense_oracle_summed_over_the_dags():
    # The weights from edge weights on every DAG's edge_index (grid_weights) and a per-head key
    # scale; the oracle inverts I - A_d of every DAG and adds the results.
    problem = StackedProblem(MIXED_SIZES, 4, heads=2)
    n, h = problem.num_nodes, problem.heads
    edge_weights = [(torch.rand(dag.size(1), h, dtype=torch.float64) - 0.5).requires_grad_() for dag in problem.dags]
    assert all(e.size(0) > 0 for e in edge_weights)
    scale = torch.randn(4, n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.stack([torch.cat([grid_weights(e, index, n), s.unsqueeze(1)], 1)
                          for e, index, s in zip(edge_weights, problem.walks.weight_index, scale)])
    query, key, value = problem.query, problem.key, problem.value
    inputs = (*edge_weights, scale, query, key, value)
    names = tuple(f"grad edge_weight {d}" for d in range(4)) + ("grad scale", "grad query", "grad key", "grad value")
    out = grid_attention(*problem.index, weight, query, key, value, 2)
    dense = sum(inverse_resolvent_attention(query[:, d].expand(-1, h, -1), key[:, d] * scale[d].unsqueeze(-1),
                                            value, dag, e)
                for d, (dag, e) in enumerate(zip(problem.dags, edge_weights)))
    grad = torch.randn_like(out)
    got = values_and_grads(out, inputs, grad)
    assert got[0].abs().max() > 0.1
    assert_all_close(got, values_and_grads(dense, inputs, grad), names=("y",) + names)


def test_float32_is_close_to_float64():
    problem = StackedProblem(MIXED_SIZES, 4, heads=3, state_dim=4, head_dim=16)
    single = [t.detach().float().requires_grad_() for t in problem.inputs]
    for segment_rows in (1, None):
        out = problem.kernel(segment_rows)
        grad = torch.randn_like(out)
        want = values_and_grads(out, problem.inputs, grad)
        out32 = grid_attention(*problem.index, *single, segment_rows)
        assert out32.dtype == torch.float32
        got = values_and_grads(out32, single, grad.float())
        assert_all_close([t.double() for t in got], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_float32_and_returns_the_input_dtype(dtype):
    problem = StackedProblem(((3, 4), (2, 2), (1, 1)), 4, heads=2)
    low = [t.detach().to(dtype).requires_grad_() for t in problem.inputs]
    out = grid_attention(*problem.index, *low)
    assert out.dtype == dtype
    upcast = [t.detach().float().requires_grad_() for t in low]
    expected = grid_attention(*problem.index, *upcast)
    assert torch.equal(out, expected.to(dtype))  # the same float32 computation, rounded once
    grad = torch.randn_like(expected).to(dtype)
    got = torch.autograd.grad(out, low, grad)
    want = torch.autograd.grad(expected, upcast, grad.float())
    for a, b, leaf in zip(got, want, low):
        assert a.dtype == dtype and a.shape == leaf.shape
        assert torch.equal(a, b.to(dtype))


# --- autograd and op checks ---------------------------------------------------------------------


@pytest.mark.parametrize("num_dags", [4, 2])
@pytest.mark.parametrize("segment_rows", [1, None])
def test_gradcheck(segment_rows, num_dags):
    problem = StackedProblem(((3, 2), (1, 2), (0, 2), (2, 1)), num_dags, heads=2, state_dim=2, head_dim=3)
    assert torch.autograd.gradcheck(
        lambda w, q, k, v: grid_attention(*problem.index, w, q, k, v, segment_rows), problem.inputs)


def test_opcheck_forward_and_backward_ops():
    problem = StackedProblem(((2, 3), (1, 2), (3, 1)), 4, heads=2, state_dim=2, head_dim=3)
    segment_rows = 1
    count = num_checkpoints(problem.walks.graph_ptr, problem.walks.row_width, segment_rows)
    assert count > 0  # the checkpoints are part of what is checked
    detached = [t.detach() for t in problem.inputs]
    torch.library.opcheck(torch.ops.chimera.grid_attention.default,
                          (*problem.index, *problem.inputs, segment_rows, count))
    y, checkpoints = torch.ops.chimera.grid_attention(*problem.index, *detached, segment_rows, count)
    assert checkpoints.shape == (4 * count, 2, 2 * 3)  # D * num_checkpoints rows
    torch.library.opcheck(torch.ops.chimera.grid_attention_backward.default,
                          (*problem.index, *detached, checkpoints, torch.randn_like(y), segment_rows, count))


def test_checkpoints_of_dag_d_are_its_one_dag_checkpoints():
    problem = StackedProblem(((5, 3), (1, 4), (4, 1)), 4, heads=2, state_dim=2, head_dim=3)
    walks, segment_rows = problem.walks, 2
    count = num_checkpoints(walks.graph_ptr, walks.row_width, segment_rows)
    assert count > 0
    weight, query, key, value = (t.detach() for t in problem.inputs)
    _, checkpoints = torch.ops.chimera.grid_attention(*problem.index, weight, query, key, value, segment_rows, count)
    for d in range(4):
        _, one = torch.ops.chimera.grid_attention(walks.graph_ptr, walks.row_width, walks.nodes[d],
                                                  weight[d, :, :2].contiguous(), query[:, d].expand(-1, 2, -1),
                                                  key[:, d] * weight[d, :, 2].unsqueeze(-1), value, segment_rows, count)
        torch.testing.assert_close(checkpoints[d * count:(d + 1) * count], one)


def test_no_dags_give_zeros():
    problem = StackedProblem(((2, 3), (1, 1)), 4, heads=2)
    n = problem.num_nodes
    weight = torch.rand(0, n, 3, 2, dtype=torch.float64, requires_grad=True)
    query = torch.randn(n, 0, 1, 3, dtype=torch.float64, requires_grad=True)
    key = torch.randn(n, 0, 1, 3, dtype=torch.float64, requires_grad=True)
    inputs = (weight, query, key, problem.value)
    out = grid_attention(problem.walks.graph_ptr, problem.walks.row_width, problem.nodes[:0], *inputs, 1)
    assert out.shape == problem.value.shape and torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    for g, leaf in zip(grads, inputs):
        assert g.shape == leaf.shape and torch.equal(g, torch.zeros_like(leaf))


def test_non_contiguous_inputs_give_the_same_numbers():
    # Walks, weight, query, key and value as transposed views of other layouts: the kernel reads
    # contiguous copies, the same numbers in the same order.
    problem = StackedProblem(MIXED_SIZES, 4, heads=3, state_dim=3, head_dim=16)
    out = problem.kernel(2)
    grad = torch.randn_like(out)
    want = values_and_grads(out, problem.inputs, grad)
    nodes = problem.nodes.t().contiguous().t()
    weight = problem.weight.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    query = problem.query.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    key = problem.key.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0).requires_grad_()
    value = problem.value.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    inputs = (weight, query, key, value)
    assert not any(t.is_contiguous() for t in (nodes,) + inputs)
    out = grid_attention(problem.walks.graph_ptr, problem.walks.row_width, nodes, *inputs, 2)
    got = values_and_grads(out, inputs, grad)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("heads, state_dim, head_dim", [(2, 0, 3), (0, 2, 3), (2, 2, 0)])
@pytest.mark.parametrize("segment_rows", [1, None])
def test_empty_dimensions_give_zeros_of_the_right_shape(heads, state_dim, head_dim, segment_rows):
    problem = StackedProblem(((3, 2), (0, 3), (2, 1)), 4, heads=heads, state_dim=state_dim, head_dim=head_dim)
    out = problem.kernel(segment_rows)
    assert out.shape == (problem.num_nodes, heads, head_dim)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, problem.inputs, torch.ones_like(out))
    for grad, leaf in zip(grads, problem.inputs):
        assert grad.shape == leaf.shape and torch.equal(grad, torch.zeros_like(leaf))


THREADS_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_grid_stacked import StackedProblem, values_and_grads
torch.manual_seed(0)
# Images big enough that every image is a task of its own (the kernel's task grain, about 2^18
# state updates, is less than an image's D H S P per position) and the tasks split between threads.
for head_dim in (16, 5):
    problem = StackedProblem(((32, 32), (32, 32), (16, 64), (1, 1), (0, 4), (24, 40)), 4, heads=3, state_dim=16,
                             head_dim=head_dim)
    grad = torch.randn(problem.value.shape, dtype=torch.float64)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        out = problem.kernel(segment_rows=2)
        results.append(values_and_grads(out, problem.inputs, grad))
    assert all(bool(t.isfinite().all()) for t in results[0])
    # a task runs all heads of an image: dQ, dK sum over the heads in one order whatever the threads
    assert all(torch.equal(a, b) for a, b in zip(*results)), "results differ between 1 and 2 threads"
print("same")
"""


def test_result_does_not_depend_on_the_number_of_threads():
    # In a subprocess: torch.set_num_threads breaks torch 2.13's CPU batched LU for the rest of the
    # process (tests/ops/test_cpu_batched_lu.py), which other tests of this session use.
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, here], capture_output=True, text=True,
                            timeout=300, env=subprocess_env())
    assert result.returncode == 0 and "same" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


# --- malformed raw-op calls ---------------------------------------------------------------------


def stacked_case(backward=False, graph_ptr="L([0, 4])", row_width="L([2])", nodes="L([[0, 1, 2, 3], [1, 0, 3, 2]])",
                 weight="ones(2, 4, 3, 2)", query="ones(4, 2, 1, 2)", key="ones(4, 2, 1, 2)", segment_rows=1,
                 num_checkpoints=2, checkpoints="ones(4, 2, 4)", grad_y="ones(4, 2, 2)"):
    """The code of a stacked chimera::grid_attention (or _backward) call on one 2 x 2 image, D = 2
    DAGs (down-right, down-left), H = 2, S = P = 2, that is valid (one checkpointed row of 2
    positions per DAG: checkpoints [D * 2, H, S * P]) but for the arguments given."""
    common = f"{graph_ptr}, {row_width}, {nodes}, {weight}, {query}, {key}, ones(4, 2, 2)"
    if backward:
        return f"ops.grid_attention_backward({common}, {checkpoints}, {grad_y}, {segment_rows}, {num_checkpoints})"
    return f"ops.grid_attention({common}, {segment_rows}, {num_checkpoints})"


GRID = r"chimera::grid_attention: "
GRID_BACKWARD = r"chimera::grid_attention_backward: "
TWO_IMAGES = dict(graph_ptr="L([0, 2, 4])", row_width="L([2, 2])", num_checkpoints=0, checkpoints="ones(0, 2, 4)")
NODES_SHAPE = r"nodes must be a \[D, N\] = \[2, 4\] int64 tensor"
WEIGHT_SHAPE = r"weight must have shape \[D, N, 3, H\] = \[2, 4, 3, 2\]"
# name: (code, pattern of the RuntimeError's message); each case runs twice, forward and backward.
STACKED_CASES = {
    "nodes_of_one_dag_fewer": ("nodes", dict(nodes="L([[0, 1, 2, 3]])"), NODES_SHAPE),
    "nodes_of_one_dag_more": ("nodes", dict(nodes="L([[0, 1, 2, 3], [1, 0, 3, 2], [0, 1, 2, 3]])"), NODES_SHAPE),
    "nodes_of_fewer_nodes": ("nodes", dict(nodes="L([[0, 1, 2], [1, 0, 2]])"), NODES_SHAPE),
    "nodes_1d": ("nodes", dict(nodes="L([0, 1, 2, 3])"), NODES_SHAPE),
    "nodes_int32": ("nodes", dict(nodes="I([[0, 1, 2, 3], [1, 0, 3, 2]])"), NODES_SHAPE),
    "nodes_second_walk_leaves_its_image": ("nodes", dict(nodes="L([[0, 1, 2, 3], [0, 2, 1, 3]])", **TWO_IMAGES),
                                           r"nodes\[1, 1\] = 2 leaves graph 0 \(nodes 0 to 1\)"),
    "nodes_second_walk_repeats_a_node": ("nodes", dict(nodes="L([[0, 1, 2, 3], [1, 0, 3, 3]])"),
                                         r"nodes\[1\] must be a permutation of 0..N-1 \(N = 4\), but 3 appears twice"),
    "nodes_second_walk_out_of_range": ("nodes", dict(nodes="L([[0, 1, 2, 3], [1, 0, 3, 4]])"),
                                       r"nodes\[1\] must be a permutation of 0..N-1 \(N = 4\)"),
    "nodes_second_walk_negative": ("nodes", dict(nodes="L([[0, 1, 2, 3], [1, -1, 3, 2]])"),
                                   r"nodes\[1\] must be a permutation of 0..N-1 \(N = 4\)"),
    "weight_with_two_slots": ("weight", dict(weight="ones(2, 4, 2, 2)"), WEIGHT_SHAPE),
    "weight_of_one_dag_fewer": ("weight", dict(weight="ones(1, 4, 3, 2)"), WEIGHT_SHAPE),
    "weight_of_one_dag_more": ("weight", dict(weight="ones(3, 4, 3, 2)"), WEIGHT_SHAPE),
    "weight_of_one_dag_form": ("weight", dict(weight="ones(4, 2, 2)"), WEIGHT_SHAPE),
    "weight_with_fewer_heads": ("weight", dict(weight="ones(2, 4, 3, 1)"), WEIGHT_SHAPE),
    "weight_float64": ("weight", dict(weight="ones(2, 4, 3, 2).double()"), WEIGHT_SHAPE + r".* Double"),
    "query_of_other_state_dim": ("query", dict(query="ones(4, 2, 1, 3)"),
                                 r"query must have the shape of key \[4, 2, 1, 2\], got \[4, 2, 1, 3\]"),
    "query_of_other_dags": ("query", dict(query="ones(4, 1, 1, 2)"), r"query must have the shape of key"),
    "key_of_other_dags": ("key", dict(key="ones(4, 1, 1, 2)", nodes="L([[0, 1, 2, 3]])", weight="ones(1, 4, 3, 2)"),
                          r"query must have the shape of key \[4, 1, 1, 2\], got \[4, 2, 1, 2\]"),
    "key_with_heads": ("key", dict(query="ones(4, 2, 2, 2)", key="ones(4, 2, 2, 2)"),
                       r"key must have shape \[N, sets, 1, S\] = \[4, sets, 1, S\]"),
    "key_of_other_nodes": ("key", dict(query="ones(3, 2, 1, 2)", key="ones(3, 2, 1, 2)"),
                           r"key must have shape \[N, sets, 1, S\] = \[4, sets, 1, S\]"),
    "key_float64": ("key", dict(key="ones(4, 2, 1, 2).double()"), r"key must have dtype Float"),
    "query_4d_key_3d": ("key", dict(key="ones(4, 2, 2)"),
                        r"query and key must have shape \[N, H, S\] \(one DAG\) or \[N, D, H, S\]"),
    "query_3d_key_4d": ("key", dict(query="ones(4, 2, 2)"), r"key must have shape \[N, H, F\]"),
    "num_checkpoints_of_one_dag": ("num_checkpoints", dict(num_checkpoints=4, checkpoints="ones(8, 2, 4)"),
                                   r"num_checkpoints must be .* = 2, got 4"),
}
BACKWARD_CASES = {
    "checkpoints_of_one_dag": ("checkpoints", dict(checkpoints="ones(2, 2, 4)"),
                               r"checkpoints must have shape \[4, 2, 4\]"),
    "checkpoints_of_more_dags": ("checkpoints", dict(checkpoints="ones(6, 2, 4)"),
                                 r"checkpoints must have shape \[4, 2, 4\]"),
    "checkpoints_of_other_features": ("checkpoints", dict(checkpoints="ones(4, 2, 2)"),
                                      r"checkpoints must have shape \[4, 2, 4\]"),
    "checkpoints_4d": ("checkpoints", dict(checkpoints="ones(2, 2, 2, 4)"), r"checkpoints must have shape \[N, H, F\]"),
    "grad_y_of_other_head_dim": ("grad_y", dict(grad_y="ones(4, 2, 3)"), r"grad_y must have the shape of value"),
    "grad_y_of_other_heads": ("grad_y", dict(grad_y="ones(4, 1, 2)"), r"grad_y must have the shape of value"),
    "grad_y_stacked": ("grad_y", dict(grad_y="ones(4, 2, 1, 2)"), r"grad_y must have shape \[N, H, F\]"),
}
ALL_CASES = {}
for _name, (_argument, _overrides, _pattern) in STACKED_CASES.items():
    ALL_CASES["forward_" + _name] = (_argument, stacked_case(**_overrides), GRID + _pattern)
    ALL_CASES["backward_" + _name] = (_argument, stacked_case(True, **_overrides), GRID_BACKWARD + _pattern)
for _name, (_argument, _overrides, _pattern) in BACKWARD_CASES.items():
    ALL_CASES["backward_" + _name] = (_argument, stacked_case(True, **_overrides), GRID_BACKWARD + _pattern)

WORKER = r"""
import json, sys
import torch
import torch_geometric_chimera  # registers torch.ops.chimera
ops = torch.ops.chimera
L = lambda values: torch.tensor(values, dtype=torch.long)
I = lambda values: torch.tensor(values, dtype=torch.int32)
ones = lambda *shape: torch.ones(*shape)
for name, code in json.loads(sys.stdin.read()):
    print(json.dumps(["start", name]), flush=True)
    try:
        value = eval(code)
        result = ["returned", repr(value)[:200]]
    except Exception as error:  # noqa: BLE001 - the type is what the test checks
        result = [type(error).__name__, str(error).splitlines()[0] if str(error) else ""]
    print(json.dumps([name] + result), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes():
    return run_cases(WORKER, {name: code for name, (_, code, _) in ALL_CASES.items()})


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_malformed_stacked_call_is_a_clean_error(name, outcomes):
    argument, _, pattern = ALL_CASES[name]
    outcome, message = outcomes[name]
    assert outcome == "RuntimeError", f"{name}: {outcome}: {message}"
    assert argument in message and re.search(pattern, message), message


def test_stacked_cases_change_one_argument_of_a_valid_call():
    # Each case above is this call with one argument broken: the call itself must work, and give
    # what the wrapper gives.
    helpers = dict(ops=torch.ops.chimera, ones=torch.ones, L=lambda values: torch.tensor(values, dtype=torch.long))
    y, checkpoints = eval(stacked_case(), helpers)
    assert y.shape == (4, 2, 2) and checkpoints.shape == (4, 2, 4)
    assert [g.shape for g in eval(stacked_case(backward=True), helpers)] == [(2, 4, 3, 2), (4, 2, 1, 2),
                                                                               (4, 2, 1, 2), (4, 2, 2)]
    for overrides in (TWO_IMAGES, dict(TWO_IMAGES, backward=True)):
        eval(stacked_case(**overrides), helpers)
    # the walks of the valid call are the down-right and down-left DAGs of the 2 x 2 image
    walks = grid_walks(torch.tensor([[2, 2]]), batched_grid_dags(torch.tensor([[2, 2]]))[:2])
    assert torch.equal(torch.stack(walks.nodes), torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]))
    assert GRID_DIRECTIONS[:2] == ((False, False), (False, True))


@pytest.mark.parametrize("query_shape", [(4, 2, 2), (4, 2, 2, 2), (4, 2, 2, 1, 2)])
def test_wrapper_refuses_a_query_of_another_form_with_stacked_walks(query_shape):
    problem = StackedProblem(((2, 2),), 2, heads=2, state_dim=2, head_dim=2)
    query = torch.randn(*query_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"query: with stacked walks \(nodes \[D, N\]\) expected shape \[N, sets, 1, S\]"):
        grid_attention(*problem.index, problem.weight, query, query, problem.value)


# --- the layer -----------------------------------------------------------------------------------


class CountGridOps(TorchDispatchMode):
    """The ``chimera::grid_attention`` and ``_backward`` calls inside the context, with their walks' shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("chimera.grid_attention") or name.startswith("chimera.grid_mixer"):
            self.calls.append((name, tuple(args[2].shape)))
        return func(*args, **(kwargs or {}))


def test_chimera_conv_grid_makes_one_stacked_kernel_call(monkeypatch):
    from torch_geometric_chimera import ChimeraConv
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # stacked from one image per thread up
    grid_size = torch.tensor(MIXED_SIZES)
    n = int(grid_size.prod(-1).sum())
    batch = torch.repeat_interleave(torch.arange(grid_size.size(0)), grid_size.prod(-1))
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", sharing="row").double()
    dense = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid", sharing="row", method="dense").double()
    dense.load_state_dict(conv.state_dict())
    x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    edge_index = torch.empty(2, 0, dtype=torch.long)
    with CountGridOps() as counter:
        out = conv(x, edge_index, batch=batch, grid_size=grid_size)
        grads = torch.autograd.grad(out, [x] + list(conv.parameters()), torch.ones_like(out))
    # The layer's features go in whole, with the D skip: chimera::grid_mixer (the stacked kernel).
    assert counter.calls == [("chimera.grid_mixer.default", (4, n)),
                             ("chimera.grid_mixer_backward.default", (4, n))]
    with CountGridOps() as counter:
        expected = dense(x, edge_index, batch=batch, grid_size=grid_size)
        want = torch.autograd.grad(expected, [x] + list(dense.parameters()), torch.ones_like(expected))
    assert counter.calls == []
    assert out.abs().max() > 0.01
    torch.testing.assert_close(out, expected)
    for (name, _), a, b in zip([("x", None)] + list(conv.named_parameters()), grads, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("sharing", ["none", "row"])
@pytest.mark.parametrize("shared_heads,threads", [(True, 1), (False, 1), (True, 64)])
def test_decomposed_attention_stacks_shared_heads_and_falls_back_for_per_head_sets(shared_heads, threads, sharing,
                                                                                    monkeypatch):
    # Query sets shared by the heads ([N, num_sets, 1, S]): one stacked call. One set per head
    # ([N, num_sets, H, S]): the kernel's stacked form cannot take them, four one-DAG calls; the
    # same with fewer images than threads (a stacked task is a whole image, a one-DAG task an
    # (image, head)). Either way the result is method="dense"'s.
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    heads, state_dim, head_dim = 3, 3, 4
    grid_size = torch.tensor(MIXED_SIZES)
    n = int(grid_size.prod(-1).sum())
    geometry = decomposition_geometry("grid", n, grid_size=grid_size)
    groups = sharing_groups("grid", sharing)
    shape = (n, max(groups) + 1, 1 if shared_heads else heads, state_dim)
    query = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    key = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    value = torch.randn(n, heads, head_dim, dtype=torch.float64, requires_grad=True)
    delta = torch.rand(n, 4, 2, heads, dtype=torch.float64).add(0.1).requires_grad_()  # per DAG and direction
    inputs = (query, key, value, delta)

    def mixer(method):
        weight, key_scale = decomposition_adjacency(delta, geometry, (0, 1, 2, 3), 0.5)
        return decomposed_resolvent_attention(query, key, value, weight, key_scale, geometry, groups, method=method)
    with CountGridOps() as counter:
        out = mixer("auto")
        grad = torch.randn_like(out)
        got = values_and_grads(out, inputs, grad)
    if shared_heads and threads <= grid_size.size(0):
        assert counter.calls == [("chimera.grid_attention.default", (4, n)),
                                 ("chimera.grid_attention_backward.default", (4, n))]
    else:
        assert sorted(counter.calls) == [("chimera.grid_attention.default", (n,))] * 4 + [
            ("chimera.grid_attention_backward.default", (n,))] * 4
    want = values_and_grads(mixer("dense"), inputs, grad)
    assert got[0].abs().max() > 0.01
    assert_all_close(got, want, names=("y", "grad query", "grad key", "grad value", "grad delta"))
    assert decomposition.grid_attention is grid_attention  # the layer's path is the one tested above
