"""Bad input: one pinned, argument-naming error per case listed in DEVELOPERS.md; and the defined
behaviour of empty graphs, isolated nodes, self-loops and duplicate edges."""
import pytest
import torch
import torch_geometric
from graphs import inputs, random_dag

from torch_geometric_chimera.ops import resolvent_attention
from torch_geometric_chimera.utils import CycleError


@pytest.fixture
def good():
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 3]])
    q, k, v, w = inputs(4, 3)
    return q, k, v, edge_index, w


def call(q, k, v, edge_index, w, **kw):
    return resolvent_attention(q, k, v, edge_index, w, **kw)


def test_cycle_passed_to_the_dag_method(good):
    q, k, v, _, w = good
    cycle = torch.tensor([[0, 1, 2], [1, 2, 0]])
    with pytest.raises(CycleError, match="edge_index: expected a directed acyclic graph, but 3 of 4 nodes"):
        call(q, k, v, cycle, w, method="dag")
    self_loop = torch.tensor([[0, 1, 2], [1, 2, 2]])
    with pytest.raises(CycleError, match="self-loops count as cycles"):
        call(q, k, v, self_loop, w, method="dag")


@pytest.mark.parametrize("bad", [[[0, 1, 4], [1, 2, 3]], [[0, -1, 2], [1, 2, 3]]], ids=["too-large", "negative"])
def test_indices_out_of_range(good, bad):
    q, k, v, _, w = good
    with pytest.raises(IndexError, match=r"edge_index: node indices must lie in \[0, 4\)"):
        call(q, k, v, torch.tensor(bad), w)


def test_edge_index_shape_and_dtype(good):
    q, k, v, edge_index, w = good
    with pytest.raises(ValueError, match=r"edge_index: expected an integer tensor of shape \[2, E\]"):
        call(q, k, v, edge_index.t(), w)
    with pytest.raises(ValueError, match=r"edge_index: expected an integer tensor of shape \[2, E\]"):
        call(q, k, v, edge_index.double(), w)
    with pytest.raises(ValueError, match=r"\(int32 or int64\), got shape \[2, 3\], dtype torch.bool"):
        call(q, k, v, edge_index.bool(), w)


def test_mismatched_shapes(good):
    q, k, v, edge_index, w = good
    with pytest.raises(ValueError, match=r"query: expected a floating tensor of shape \[N, H, S\]"):
        call(q[0], k, v, edge_index, w)
    with pytest.raises(ValueError, match=r"key: expected shape \[4, 2, 3\] \(like query\)"):
        call(q, k[:, :, :2], v, edge_index, w)
    with pytest.raises(ValueError, match=r"value: expected shape \[N, H, P\] = \[4, 2, P\]"):
        call(q, k, v[:3], edge_index, w)
    with pytest.raises(ValueError, match=r"edge_weight: expected shape \[E, H\] = \[3, 2\]"):
        call(q, k, v, edge_index, w[:2])
    with pytest.raises(ValueError, match=r"batch: expected an integer tensor of shape \[N\] = \[4\]"):
        call(q, k, v, edge_index, w, batch=torch.zeros(3, dtype=torch.long))


def test_mismatched_dtypes(good):
    q, k, v, edge_index, w = good
    with pytest.raises(TypeError, match="key: expected dtype torch.float64 \\(like query\\), got torch.float32"):
        call(q, k.float(), v, edge_index, w)
    with pytest.raises(TypeError, match="edge_weight: expected dtype torch.float64"):
        call(q, k, v, edge_index, w.float())


def test_mismatched_devices(good):
    q, k, v, edge_index, w = good
    with pytest.raises(ValueError, match="value: expected device cpu \\(like query\\), got meta"):
        call(q, k, v.to("meta"), edge_index, w)


def test_edges_across_graphs(good):
    q, k, v, edge_index, w = good
    with pytest.raises(ValueError, match="edge_index: an edge connects nodes of different graphs"):
        call(q, k, v, edge_index, w, batch=torch.tensor([0, 0, 1, 1]))


def test_bad_method_and_num_terms(good):
    q, k, v, edge_index, w = good
    with pytest.raises(ValueError, match="method: expected one of"):
        call(q, k, v, edge_index, w, method="cholesky")
    with pytest.raises(ValueError, match="num_terms: expected a non-negative int"):
        call(q, k, v, edge_index, w, method="neumann", num_terms=-1)
    with pytest.raises(ValueError, match="num_terms: only method='neumann'"):
        call(q, k, v, edge_index, w, method="dense", num_terms=3)


def test_nan_and_inf_are_caught_in_debug_mode_only(good):
    q, k, v, edge_index, w = good
    v = v.clone()
    v[1, 0, 0] = float("nan")
    out = call(q, k, v, edge_index, w)  # no sync-costing check outside debug mode
    assert bool(torch.isnan(out).any())
    with torch_geometric.debug():
        with pytest.raises(ValueError, match=r"value: contains NaN or Inf \(checked because torch_geometric.debug"):
            call(q, k, v, edge_index, w)


def test_errors_leave_inputs_untouched(good):
    q, k, v, _, w = good
    before = [t.clone() for t in (q, k, v, w)]
    with pytest.raises(CycleError):
        call(q, k, v, torch.tensor([[0, 1, 2], [1, 2, 0]]), w, method="dag")
    for t, b in zip((q, k, v, w), before):
        assert torch.equal(t, b)


# ------------------------------------------------------------------ defined behaviour
METHODS = ["dense", "dag", "neumann", "iterative"]


@pytest.mark.parametrize("method", METHODS)
def test_empty_graph_gives_empty_output(method):
    q, k, v, w = inputs(0, 0)
    out = call(q, k, v, torch.zeros(2, 0, dtype=torch.long), w, method=method)
    assert out.shape == (0, 2, 4)


@pytest.mark.parametrize("method", METHODS)
def test_no_edges_means_L_is_the_identity(method):
    q, k, v, w = inputs(5, 0)
    out = call(q, k, v, torch.zeros(2, 0, dtype=torch.long), w, method=method)
    torch.testing.assert_close(out, (q * k).sum(-1, keepdim=True) * v)


@pytest.mark.parametrize("method", METHODS)
def test_isolated_nodes_see_only_themselves(method):
    edge_index = random_dag(6, 12)
    q, k, v, w = inputs(9, edge_index.size(1))  # nodes 6, 7, 8 are isolated
    out = call(q, k, v, edge_index, w, method=method)
    torch.testing.assert_close(out[6:], (q[6:] * k[6:]).sum(-1, keepdim=True) * v[6:])


@pytest.mark.parametrize("method", ["dense", "band", "neumann", "iterative"])
def test_self_loop_scales_by_one_over_one_minus_w(method):
    q, k, v, _ = inputs(1, 1)
    w = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    out = call(q, k, v, torch.tensor([[0], [0]]), w, method=method, **({"num_terms": 60} if method == "neumann" else {}))
    expected = (q * k).sum(-1, keepdim=True) * v / (1 - w).unsqueeze(-1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("method", METHODS)
def test_duplicate_edges_add_up(method):
    edge_index = random_dag(8, 16)
    q, k, v, w = inputs(8, edge_index.size(1))
    doubled = torch.cat([edge_index, edge_index[:, :4]], 1)
    split = torch.cat([w, w[:4]])
    split[:4] = w[:4] * 0.25
    split[-4:] = w[:4] * 0.75
    torch.testing.assert_close(call(q, k, v, doubled, split, method=method), call(q, k, v, edge_index, w, method=method))
