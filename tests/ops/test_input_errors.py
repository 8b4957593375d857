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


# ------------------------------------------------------------------ messages that name the cause
def test_singular_system_names_edge_weight():
    q, k, v, _ = inputs(2, 2, heads=1)
    cycle = torch.tensor([[0, 1], [1, 0]])
    w = torch.ones(2, 1, dtype=torch.float64)  # a 2-cycle of weight 1: A has the eigenvalue 1
    for method in ("dense", "band", "auto"):
        with pytest.raises(torch.linalg.LinAlgError, match=r"edge_weight: I - A is singular"):
            call(q, k, v, cycle, w, method=method)


@pytest.mark.parametrize("method", ["dense", "band"])
def test_inf_weight_is_named_as_such_not_as_singular(method):
    q, k, v, _ = inputs(2, 1, heads=1)
    w = torch.tensor([[float("inf")]], dtype=torch.float64)  # LU meets a zero pivot on the Inf row
    with pytest.raises(ValueError, match=r"edge_weight: contains NaN or Inf, so I - A has no inverse"):
        call(q, k, v, torch.tensor([[0], [1]]), w, method=method)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_with_iterative_is_not_reported_as_divergence(good, bad):
    q, k, v, edge_index, w = good
    w = w.clone()
    w[1, 0] = bad
    with pytest.raises(ValueError, match=r"edge_weight: contains NaN or Inf, so method='iterative'"):
        call(q, k, v, edge_index, w, method="iterative")


def test_non_finite_gradient_with_iterative_is_named(good):
    q, k, v, edge_index, w = good
    w = w.clone().requires_grad_()
    out = call(q, k, v, edge_index, w, method="iterative")
    with pytest.raises(ValueError, match=r"grad_output: contains NaN or Inf"):
        out.backward(torch.full_like(out, float("nan")))


def test_iterative_divergence_reports_the_estimated_spectral_radius():
    q, k, v, _ = inputs(2, 2, heads=1)
    w = torch.full((2, 1), 1.5, dtype=torch.float64)  # a 2-cycle: spectral radius 1.5
    with pytest.raises(RuntimeError, match=r"method='iterative': the forward solve did not converge.*"
                                           r"did not shrink \(a factor of about 1\.(4[5-9]|5[0-5]?)\d* per step"):
        call(q, k, v, torch.tensor([[0, 1], [1, 0]]), w, method="iterative", max_iter=40)


def test_iterative_tolerance_below_the_dtype_resolution_is_reported_as_such():
    q, k, v, _ = (t.float() for t in inputs(2, 2, heads=1))
    w = torch.full((2, 1), 0.5)  # spectral radius 0.5: converges fast, then stalls at float32's resolution
    with pytest.raises(RuntimeError, match=r"about 0\.(4[5-9]|5[0-5]?)\d* per step \(an estimate of the spectral radius of A\), then "
                                           r"stalled .* the resolution of torch.float32"):
        call(q, k, v, torch.tensor([[0, 1], [1, 0]]), w, method="iterative", tol=1e-12, max_iter=200)


def test_iterative_too_few_steps_says_so():
    q, k, v, _ = inputs(2, 2, heads=1)
    w = torch.full((2, 1), 0.9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"about 0\.(8[5-9]|9[0-5]?)\d* per step .* raise max_iter or tol"):
        call(q, k, v, torch.tensor([[0, 1], [1, 0]]), w, method="iterative", max_iter=30)


@pytest.mark.parametrize("max_iter", [0, -3, 2.5])
def test_max_iter_must_be_positive(good, max_iter):
    with pytest.raises(ValueError, match=r"max_iter: expected a positive int"):
        call(*good, method="iterative", max_iter=max_iter)


def test_num_terms_is_bounded():
    from torch_geometric_chimera.ops.resolvent import MAX_NUM_TERMS
    q, k, v, _ = inputs(3, 2)
    edge_index = torch.tensor([[0, 1], [1, 2]])
    w = 0.3 * torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"num_terms: at most MAX_NUM_TERMS = 10000"):
        call(q, k, v, edge_index, w, method="neumann", num_terms=10 ** 7)
    call(q, k, v, edge_index, w, method="neumann", num_terms=MAX_NUM_TERMS)  # the cap itself is allowed


def test_default_num_terms_above_the_cap_is_refused(monkeypatch):
    from torch_geometric_chimera.ops import resolvent
    monkeypatch.setattr(resolvent, "MAX_NUM_TERMS", 5)
    n = 12
    cycle = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])  # directed cycle: bound n - 1 = 11
    q, k, v, w = inputs(n, n)
    with pytest.raises(ValueError, match=r"num_terms: the default, each graph's diameter bound, reaches 11"):
        call(q, k, v, cycle, w, method="neumann")


@pytest.mark.parametrize("method", ["auto", "dense", "band", "dag", "line", "neumann", "iterative"])
def test_zero_heads_give_an_empty_output(method):
    q, k, v, w = inputs(4, 3, heads=0)
    out = call(q, k, v, torch.tensor([[0, 1, 2], [1, 2, 3]]), w, method=method)
    assert out.shape == (4, 0, 4)


@pytest.mark.parametrize("method", ["auto", "dense", "dag", "neumann", "iterative"])
def test_sparse_batch_ids_are_remapped_without_a_huge_allocation(method):
    q, k, v, w = inputs(5, 2)
    dense_ids = torch.tensor([0, 0, 1, 1, 2])
    edge_index = torch.tensor([[0, 2], [1, 3]])
    sparse_ids = torch.tensor([7, 7, 10 ** 12, 10 ** 12, 3])  # a bincount over these would need terabytes
    expected = call(q, k, v, edge_index, w, method=method, batch=dense_ids)
    torch.testing.assert_close(call(q, k, v, edge_index, w, method=method, batch=sparse_ids), expected)


def test_topology_of_another_size_is_rejected(good):
    from torch_geometric_chimera.ops import GraphTopology
    q, k, v, edge_index, w = good
    with pytest.raises(ValueError, match=r"topology: expected a GraphTopology of N = 4 nodes"):
        call(q, k, v, edge_index, w, topology=GraphTopology(edge_index, 5))
