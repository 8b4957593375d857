"""The padded-batch paths behind ``resolvent_attention``: ``method="squaring"`` (how many squarings,
what it refuses), ``auto``'s choice off CPU, the padded layouts cached on the topology (one padded
batch, or a few when padding would multiply the work), the dense path's block Gauss-Jordan inverse,
and the graph value checks run once per topology."""

import pytest
import torch
from dispatch_count import CountOps
from graphs import batch_graphs, inputs, random_dag, random_graph, row_normalize

from torch_geometric_chimera.ops import SQUARING_MAX_NODES, GraphTopology, choose_method, common, resolvent
from torch_geometric_chimera.ops import resolvent_attention
from torch_geometric_chimera.ops.dense import CPU_BATCHED_LU_MAX_ROWS, block_inverse, block_inverse_
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention
from torch_geometric_chimera.ops.squaring import PADDING_MAX_BUCKETS, padding_bounds
from torch_geometric_chimera.utils import line_graph_dags


def values_and_grads(fn, tensors):
    out = fn(*tensors)
    cotangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out.detach(), *torch.autograd.grad((out * cotangent).sum(), tensors))


def assert_matches_oracle(method, q, k, v, edge_index, w, batch=None, **kwargs):
    tensors = [t.detach().clone().requires_grad_() for t in (q, k, v, w)]
    got = values_and_grads(lambda *t: resolvent_attention(*t[:3], edge_index, t[3], method=method, batch=batch,
                                                          **kwargs), tensors)
    expected = values_and_grads(lambda *t: inverse_resolvent_attention(*t[:3], edge_index, t[3]), tensors)
    for name, a, b in zip(("y", "query", "key", "value", "edge_weight"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def mixed_batch(sizes, kind="cyclic", gamma=0.8, seed=0):
    """Graphs of the given sizes with nodes shuffled (``batch`` unsorted); cyclic graphs get rows of
    ``|A|`` summing to ``gamma``."""
    torch.manual_seed(seed)
    make = random_dag if kind == "dag" else random_graph
    edge_index, batch, n = batch_graphs([(size, make(size, 3 * size)) for size in sizes])
    perm = torch.randperm(n)
    edge_index, batch = torch.argsort(perm)[edge_index], batch[perm]
    q, k, v, w = inputs(n, edge_index.size(1), scale=0.9)
    if kind != "dag":
        w = row_normalize(edge_index, w, n, gamma)
    return q, k, v, edge_index, w, batch


# --------------------------------------------------------------------------------------------
# method="squaring"
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, gamma", [("cyclic", None), ("cyclic", 0.8), ("dag", None)])
def test_squaring_equals_the_inverse(kind, gamma):
    q, k, v, edge_index, w, batch = mixed_batch([7, 1, 30, 12, 19], kind)
    assert_matches_oracle("squaring", q, k, v, edge_index, w, batch, gamma=gamma)


def squarings_used(monkeypatch, *args, **kwargs):
    used = []
    original = resolvent.squaring_attention

    def spy(*spy_args, **spy_kwargs):
        used.append(spy_args[5])  # num_squarings
        return original(*spy_args, **spy_kwargs)
    monkeypatch.setattr(resolvent, "squaring_attention", spy)
    resolvent_attention(*args, method="squaring", **kwargs)
    return used


def test_squaring_takes_the_fewer_squarings_of_the_depth_and_the_bound(monkeypatch):
    path = torch.stack([torch.arange(99), torch.arange(1, 100)])  # depth 99: exact after 7 squarings
    q, k, v, w = inputs(100, 99, scale=0.5)
    assert squarings_used(monkeypatch, q, k, v, path, w) == [7]
    # Every row sums to at most 0.5: 0.5^(2^6) is below float64's roundoff, so 6 are enough.
    assert squarings_used(monkeypatch, q, k, v, path, w, gamma=0.5) == [6]
    assert_matches_oracle("squaring", q, k, v, path, w, gamma=0.5)
    # A graph with a cycle and no bound: measured, 0.8 after row_normalize; 0.8^(2^8) < 2^-53 < 0.8^(2^7).
    q, k, v, edge_index, w, _ = mixed_batch([20])
    assert squarings_used(monkeypatch, q, k, v, edge_index, w) == [8]
    # tol is the truncation bound (0 means "no stopping test" to iterative: the default then).
    assert squarings_used(monkeypatch, q, k, v, edge_index, w, tol=1e-3) == [5]
    assert squarings_used(monkeypatch, q, k, v, edge_index, w, tol=0) == [8]


def test_squaring_refuses_what_it_cannot_bound():
    q, k, v, edge_index, w, batch = mixed_batch([6, 9])
    with pytest.raises(ValueError, match=r"edge_weight: a row of \|A\| sums to 1.5.* method='dense'"):
        resolvent_attention(q, k, v, edge_index, 1.5 / 0.8 * w, method="squaring", batch=batch)
    with pytest.raises(ValueError, match=r"gamma: a row of \|A\| sums to 0.8.*above the bound gamma = 0.5"):
        resolvent_attention(q, k, v, edge_index, w, method="squaring", batch=batch, gamma=0.5)
    for gamma in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="gamma: expected a bound"):
            resolvent_attention(q, k, v, edge_index, w, batch=batch, gamma=gamma)
    with pytest.raises(ValueError, match="num_terms: only method='neumann'"):
        resolvent_attention(q, k, v, edge_index, w, method="squaring", num_terms=3)


# --------------------------------------------------------------------------------------------
# auto off CPU
# --------------------------------------------------------------------------------------------
def test_auto_off_cpu_takes_squaring_for_small_dags_and_known_bounds(monkeypatch):
    small_cyclic = batch_graphs([(n, random_graph(n, 3 * n)) for n in (12, 40, 7)])
    small_dags = batch_graphs([(n, random_dag(n, 3 * n)) for n in (12, 40, 7)])
    large_cyclic = batch_graphs([(SQUARING_MAX_NODES + 1, random_graph(SQUARING_MAX_NODES + 1, 800))])
    lines = batch_graphs([(n, line_graph_dags(n)[0]) for n in (40, 70)])

    def choice(graphs, gamma=None):
        edge_index, batch, n = graphs
        return choose_method(GraphTopology(edge_index, n, batch), None, 16, 32, gamma)

    on_cpu = choice(small_cyclic, 0.9)
    assert on_cpu in ("dense", "band", "dag")  # the CPU cost model, gamma or not
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)  # as on an accelerator
    assert choice(small_cyclic, 0.9) == "squaring"
    assert choice(small_cyclic) == "dense"  # rows not known to sum to less than 1
    assert choice(small_dags) == "squaring"  # exact after ceil(log2(depth + 1)) squarings
    assert choice(large_cyclic, 0.9) == "dense"
    assert choice(lines, 0.9) == "line"
    # The answer is kept per state shape and per whether a bound is known.
    edge_index, batch, n = small_cyclic
    topology = GraphTopology(edge_index, n, batch)
    assert [choose_method(topology, None, 16, 32, gamma) for gamma in (0.9, None, 0.5)] == [
        "squaring", "dense", "squaring"]


# --------------------------------------------------------------------------------------------
# Padded layouts
# --------------------------------------------------------------------------------------------
def test_padding_bounds_keep_one_batch_unless_padding_multiplies_the_work():
    assert padding_bounds(list(range(100, 201))) == [200]  # work x 2.1: one padded batch
    assert padding_bounds([0, 5, 0]) == [5]
    assert padding_bounds([]) == padding_bounds([0, 0]) == []
    many_small = [10] * 200 + [12] * 50 + [40] * 8 + [300]  # one padded batch: about 350x the work
    bounds = padding_bounds(many_small)
    assert 1 < len(bounds) <= PADDING_MAX_BUCKETS and bounds == sorted(bounds) and bounds[-1] == 300
    padded = [min(b for b in bounds if b >= n) for n in many_small]
    assert sum(m ** 3 for m in padded) < 2 * sum(n ** 3 for n in many_small)
    assert len(padding_bounds(many_small, max_buckets=2)) == 2
    assert padding_bounds(many_small, work_limit=1000.0) == [300]
    with pytest.raises(ValueError, match="work_limit"):
        padding_bounds([3], work_limit=0.5)
    with pytest.raises(ValueError, match="max_buckets"):
        padding_bounds([3], max_buckets=0)


@pytest.mark.parametrize("method", ["dense", "squaring"])
def test_split_padded_batches_equal_the_inverse(method):
    sizes = [3] * 12 + [5, 0, 4] + [70]  # padding everything to 70 would multiply the work ~50 times
    q, k, v, edge_index, w, batch = mixed_batch([s for s in sizes if s], seed=1)
    topology = GraphTopology(edge_index, q.size(0), batch)
    layouts, inverse = topology.padded_layouts
    assert len(layouts) > 1 and inverse is not None
    assert [layout.max_nodes for layout in layouts] == topology.padding_bounds
    torch.testing.assert_close(topology.padded_sizes(), torch.tensor([min(b for b in topology.padding_bounds
                                                                          if b >= n) for n in sizes if n]))
    assert_matches_oracle(method, q, k, v, edge_index, w, batch)


def test_topology_depth():
    path = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    assert GraphTopology(path, 5).depth == 4
    assert GraphTopology(path, 7).depth == 4  # isolated nodes
    assert GraphTopology(torch.tensor([[0, 1], [1, 0]]), 2).depth is None  # a cycle


# --------------------------------------------------------------------------------------------
# The dense path's inverse
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_inverse_is_as_accurate_as_lu(dtype):
    torch.manual_seed(0)
    n = 150
    adj = torch.randn(8, n, n, dtype=torch.float64)
    adj = 0.98 * adj / adj.abs().sum(-1, keepdim=True)  # every row of |A| sums to 0.98
    matrix = (torch.eye(n, dtype=torch.float64) - adj).to(dtype)
    # The residual |M X - I| in float64: the LU inverse of the same dtype is the yardstick.
    residual = lambda inverse: float((matrix.double() @ inverse.double() - torch.eye(n)).abs().max())  # noqa: E731
    lu = residual(torch.stack([torch.linalg.inv(m) for m in matrix]))  # per matrix: see test_cpu_batched_lu.py
    blocked = residual(block_inverse(matrix))
    assert blocked <= 2 * lu, (blocked, lu)
    assert lu < 100 * torch.finfo(dtype).eps


def test_block_inverse_makes_a_fixed_number_of_operations():
    def count(batch_size, n):
        matrix = torch.eye(n) - 0.5 / n * torch.rand(batch_size, n, n)
        with CountOps() as counter:
            block_inverse_(matrix)
        return sum(counter.ops.values())
    blocks = -(-100 // CPU_BATCHED_LU_MAX_ROWS)
    assert count(1, 100) == count(64, 100) == 7 * blocks + 4


def test_block_inverse_arguments():
    with pytest.raises(ValueError, match="matrix: expected a contiguous batch"):
        block_inverse_(torch.eye(4))
    with pytest.raises(ValueError, match="matrix: expected a contiguous batch"):
        block_inverse_(torch.eye(4).expand(2, 4, 4))
    with pytest.raises(ValueError, match="base: expected a positive int"):
        block_inverse(torch.eye(4), base=0)
    original = torch.eye(3) * 2
    torch.testing.assert_close(block_inverse(original, base=1), torch.eye(3) / 2)
    torch.testing.assert_close(original, torch.eye(3) * 2)  # left as it is


# --------------------------------------------------------------------------------------------
# Graph value checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("explicit_topology", [False, True])
def test_graph_values_are_checked_once_per_topology_and_version(explicit_topology):
    q, k, v, edge_index, w, batch = mixed_batch([6, 9])
    topology = GraphTopology(edge_index, q.size(0), batch) if explicit_topology else None

    def reads_edge_index_min():
        with CountOps() as counter:
            resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch, topology=topology)
        return "aten.min.default" in counter.ops
    assert reads_edge_index_min()
    assert not reads_edge_index_min()  # same tensors, unchanged: checked already
    edge_index[0, 0] = 99  # an in-place write, seen by the version counter: checked again
    with pytest.raises(IndexError, match=r"edge_index: node indices must lie in \[0, 15\)"):
        resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch, topology=topology)
