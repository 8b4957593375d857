"""Inside the layer's forward and backward nothing is read on the host once the topology is
known (on a GPU every such read would be a host-device synchronization), and a new topology costs
at most two reads. On CPU the library reads values on purpose (input checks, the dense path's
block-inverse test); ``host_reads_allowed`` is what turns them off on accelerators, so the test
turns it off here and counts what is left."""
import collections
import importlib.util
import os

import pytest
import torch
from dispatch_count import CountSyncs
from graphs import batch_graphs, inputs, random_dag, random_graph

from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.ops import GraphTopology, choose_method, common, resolvent_attention
from torch_geometric_chimera.utils import line_graph_dags

_spec = importlib.util.spec_from_file_location(
    "bench_common", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "common.py"))
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@pytest.fixture
def count_host_reads(monkeypatch):
    """Counts every call that copies a tensor value to the host, by kind."""
    counts = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for name in ("nonzero", "unique"):
        original = getattr(torch, name)

        def counted_fn(*args, _name=name, _original=original, **kwargs):
            counts["torch." + _name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch, name, counted_fn)
    return counts


@pytest.fixture
def accelerator_mode(monkeypatch):
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)


def graphs_for(kind):
    if kind == "dense":  # molecule-sized graphs: auto takes a padded-batch path (squaring with gamma known)
        return batch_graphs([(n, random_graph(n, 3 * n)) for n in (12, 30, 7)])
    if kind == "dag":
        return batch_graphs([(n, random_dag(n, 3 * n)) for n in (800, 900)])
    if kind == "line":
        return batch_graphs([(n, line_graph_dags(n)[0]) for n in (40, 70)])
    return batch_graphs([(n, random_graph(n, 3 * n)) for n in (15, 9)])


@pytest.mark.parametrize("kind, method, adjacency", [
    ("dense", "auto", "general"), ("dense", "dense", "general"), ("dense", "squaring", "general"),
    ("dag", "auto", "dag"), ("line", "auto", "mamba2"),
    ("neumann", "neumann", "general"), ("iterative-fixed", "iterative", "general")])
def test_layer_forward_and_backward_read_nothing_on_the_host(accelerator_mode, count_host_reads, kind, method,
                                                             adjacency):
    edge_index, batch, n = graphs_for(kind)
    # tol=0: a fixed iteration count and no stopping test (the default test reads the host)
    conv = ChimeraConv(16, heads=2, state_dim=4, edge_dim=None, adjacency=adjacency, method=method,
                       tol=0 if kind == "iterative-fixed" else None, max_iter=60)
    x = torch.randn(n, 16)
    conv(x, edge_index, batch=batch).sum().backward()  # first call: the topology is computed and cached
    count_host_reads.clear()
    out = conv(x, edge_index, batch=batch)
    out.sum().backward()
    assert dict(count_host_reads) == {}


def new_batch(kind):
    """Fresh tensors, so that the topology cache has not seen them: bench_layer.py's tree batch
    (64 molecule-like graphs of 100 to 200 nodes, both directions of every bond: cycles), or 24
    random DAGs of 10 to 60 nodes."""
    if kind == "trees":
        return bench_common.peptide_like_batch(64)
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(10, 61, (24,), generator=generator).tolist()
    return batch_graphs([(n, random_dag(n, 3 * n)) for n in sizes])


@pytest.mark.parametrize("kind, adjacency, most", [
    ("trees", "general", 1),  # gamma known: the graph sizes and degrees, in one read
    ("dags", "general", 1),   # gamma known: not asked whether the graphs are DAGs
    ("dags", "dag", 2),       # no gamma: whether they are DAGs, and their depth, in a second read
])
def test_a_new_batch_costs_at_most_two_host_reads(accelerator_mode, kind, adjacency, most):
    # Issue 17, item 5: the first call on a new batch, where the topology is computed (it ran
    # Kahn's algorithm with a nonzero and a unique per level and asked is_dag before gamma).
    edge_index, batch, n = new_batch(kind)
    torch.manual_seed(0)
    conv = ChimeraConv(16, heads=2, state_dim=4, adjacency=adjacency)
    x = torch.randn(n, 16)
    with CountSyncs() as counter:
        conv(x, edge_index, batch=batch).square().mean().backward()
    assert sum(counter.syncs.values()) <= most, dict(counter.syncs)
    topology = GraphTopology.get(edge_index, n, batch)
    assert choose_method(topology, None, 4, 16, gamma=0.9 if adjacency == "general" else None) == "squaring"
    # gamma first: with gamma known the levels are never computed.
    assert ("levels" in vars(topology)) == (adjacency == "dag")


def test_the_sync_counter_sees_kahns_reads():
    # On CPU the DAG test runs Kahn's algorithm level by level, reading every frontier: proof that
    # the counter sees what the test above must not find.
    edge_index, batch, n = new_batch("dags")
    with CountSyncs() as counter:
        assert GraphTopology(edge_index, n, batch).is_dag
    assert counter.syncs["aten.nonzero.default"] >= 1 and counter.syncs["aten._unique2.default"] >= 5, counter.syncs


def test_the_counter_sees_host_reads(count_host_reads):
    # The same instrumented run outside accelerator mode reads values (the CPU input checks):
    # proof that the test above can fail.
    edge_index, batch, n = graphs_for("dense")
    q, k, v, w = inputs(n, edge_index.size(1))
    resolvent_attention(q, k, v, edge_index, w, batch=batch)
    assert sum(count_host_reads.values()) > 0


def test_iterative_with_tol_zero_runs_a_fixed_number_of_iterations():
    edge_index, batch, n = graphs_for("iterative")
    q, k, v, w = inputs(n, edge_index.size(1))
    exact = resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch)
    fixed = resolvent_attention(q, k, v, edge_index, w, method="iterative", batch=batch, tol=0, max_iter=200)
    torch.testing.assert_close(fixed, exact)
    with pytest.raises(ValueError, match="tol: expected a non-negative float"):
        resolvent_attention(q, k, v, edge_index, w, method="iterative", tol=-1.0)
