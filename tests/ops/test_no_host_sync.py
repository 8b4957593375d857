"""Inside the layer's forward and backward nothing is read on the host once the topology is
known (on a GPU every such read would be a host-device synchronization). On CPU the library reads
values on purpose (input checks, the dense path's block-inverse test); ``host_reads_allowed`` is
what turns them off on accelerators, so the test turns it off here and counts what is left."""
import collections

import pytest
import torch
from graphs import batch_graphs, inputs, random_dag, random_graph

from torch_geometric_chimera import ChimeraConv
from torch_geometric_chimera.ops import common, resolvent_attention
from torch_geometric_chimera.utils import line_graph_dags


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
