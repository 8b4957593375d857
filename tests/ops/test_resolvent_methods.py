"""Every resolvent_attention method against a float64 torch.linalg.inv oracle and each other."""
import pytest
import torch
from graphs import batch_graphs, inputs, random_dag, random_graph, row_normalize

from torch_geometric_chimera.ops import GraphTopology, choose_method, resolvent_attention
from torch_geometric_chimera.ops.common import EdgeListOperator, to_state
from torch_geometric_chimera.ops.neumann import checkpointed_neumann, neumann_solve
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention
from torch_geometric_chimera.utils import topological_levels

# squaring on cyclic graphs: the tests row-normalize |A| to 0.8, so its truncation is below the roundoff
EXACT_GENERAL = ["dense", "squaring", "band", "iterative"]
# neumann with the default K = longest path is exact
EXACT_DAG = ["dense", "squaring", "band", "dag", "iterative", "neumann"]


def band_is_cpu_only(method, device, call):
    """``method="band"`` runs on CPU: on other devices it must raise its documented error."""
    if method == "band" and device.type != "cpu":
        with pytest.raises(ValueError, match="method: 'band' runs on CPU"):
            call()
        return True
    return False


def grads(out, tensors):
    torch.manual_seed(7)  # the same cotangent for every output of one shape
    cotangent = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    return torch.autograd.grad((out * cotangent).sum(), tensors, retain_graph=True, allow_unused=True,
                               materialize_grads=True)


@pytest.mark.parametrize("method", EXACT_GENERAL)
def test_exact_methods_match_inverse_on_cyclic_graphs(method, device):
    n = 40
    edge_index = random_graph(n, 160, device=device, self_loops=True)
    q, k, v, w = inputs(n, edge_index.size(1), device=device, requires_grad=True)
    w_norm = row_normalize(edge_index, w, n)
    if band_is_cpu_only(method, device, lambda: resolvent_attention(q, k, v, edge_index, w_norm, method=method)):
        return
    expected = inverse_resolvent_attention(q, k, v, edge_index, w_norm)
    out = resolvent_attention(q, k, v, edge_index, w_norm, method=method)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    for g_out, g_exp in zip(grads(out, (q, k, v, w)), grads(expected, (q, k, v, w))):
        torch.testing.assert_close(g_out, g_exp, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", EXACT_DAG)
def test_all_methods_agree_on_dags(method, device):
    n = 50
    edge_index = random_dag(n, 200, device=device)
    q, k, v, w = inputs(n, edge_index.size(1), device=device, scale=0.5, requires_grad=True)
    if band_is_cpu_only(method, device, lambda: resolvent_attention(q, k, v, edge_index, w, method=method)):
        return
    expected = inverse_resolvent_attention(q, k, v, edge_index, w)
    out = resolvent_attention(q, k, v, edge_index, w, method=method)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    for g_out, g_exp in zip(grads(out, (q, k, v, w)), grads(expected, (q, k, v, w))):
        torch.testing.assert_close(g_out, g_exp, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("num_terms", [0, 1, 3, 7])
def test_neumann_matches_explicit_power_sum(num_terms, device):
    n = 30
    edge_index = random_graph(n, 120, device=device, self_loops=True)
    q, k, v, w = inputs(n, edge_index.size(1), device=device, requires_grad=True)
    expected = inverse_resolvent_attention(q, k, v, edge_index, w, num_terms=num_terms)
    out = resolvent_attention(q, k, v, edge_index, w, method="neumann", num_terms=num_terms)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    for g_out, g_exp in zip(grads(out, (q, k, v, w)), grads(expected, (q, k, v, w))):
        torch.testing.assert_close(g_out, g_exp, rtol=1e-8, atol=1e-9)


def test_neumann_converges_to_the_resolvent():
    n = 30
    edge_index = random_graph(n, 120)
    q, k, v, w = inputs(n, edge_index.size(1))
    w = row_normalize(edge_index, w, n, gamma=0.5)
    exact = inverse_resolvent_attention(q, k, v, edge_index, w)
    errors = [(resolvent_attention(q, k, v, edge_index, w, num_terms=K) - exact).abs().max().item()
              for K in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


def test_neumann_default_terms_are_per_graph_diameter_bounds():
    # Two paths of different length in one batch: the default K must follow each graph.
    short = torch.tensor([[0, 1], [1, 2]])
    long = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    edge_index, batch, n = batch_graphs([(3, short), (6, long)])
    q, k, v, w = inputs(n, edge_index.size(1), scale=0.9)
    topology = GraphTopology(edge_index, n, batch)
    assert topology.diameter_bound.tolist() == [2, 5]
    exact = inverse_resolvent_attention(q, k, v, edge_index, w)
    out = resolvent_attention(q, k, v, edge_index, w, method="neumann", batch=batch)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    # One term fewer everywhere is not exact any more on the long path.
    truncated = resolvent_attention(q, k, v, edge_index, w, method="neumann", num_terms=4, batch=batch)
    assert not torch.allclose(truncated[3:], exact[3:])
    torch.testing.assert_close(truncated[:3], exact[:3])


@pytest.mark.parametrize("method", ["dense", "squaring", "band", "dag", "neumann", "iterative"])
def test_batch_equals_graphs_alone(method):
    sizes = [5, 17, 9, 33, 1, 17]
    graphs = [(n, random_dag(n, 3 * n)) for n in sizes]
    edge_index, batch, total = batch_graphs(graphs)
    q, k, v, w = inputs(total, edge_index.size(1), scale=0.5)
    out = resolvent_attention(q, k, v, edge_index, w, method=method, batch=batch)
    offset, e_offset = 0, 0
    for n, ei in graphs:
        e = ei.size(1)
        alone = resolvent_attention(q[offset:offset + n], k[offset:offset + n], v[offset:offset + n], ei,
                                    w[e_offset:e_offset + e], method=method)
        torch.testing.assert_close(out[offset:offset + n], alone, rtol=1e-10, atol=1e-12)
        offset, e_offset = offset + n, e_offset + e


def test_dense_handles_unsorted_batch_and_many_buckets():
    sizes = [3, 40, 7, 130, 64, 65, 12]
    graphs = [(n, random_graph(n, 4 * n)) for n in sizes]
    edge_index, batch, total = batch_graphs(graphs)
    q, k, v, w = inputs(total, edge_index.size(1))
    w = row_normalize(edge_index, w, total)
    expected = inverse_resolvent_attention(q, k, v, edge_index, w)
    perm = torch.randperm(total)  # nodes of one graph are no longer contiguous
    inv = torch.argsort(perm)
    out = resolvent_attention(q[perm], k[perm], v[perm], inv[edge_index], w, method="dense", batch=batch[perm])
    torch.testing.assert_close(out, expected[perm], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["dense", "squaring", "band", "dag", "neumann", "iterative"])
def test_gradcheck(method):
    n = 9
    edge_index = random_dag(n, 16)
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=2, head_dim=2, scale=0.4, requires_grad=True)
    fn = lambda q, k, v, w: resolvent_attention(q, k, v, edge_index, w, method=method)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_gradcheck_iterative_and_dense_on_cycles():
    n = 8
    edge_index = random_graph(n, 20, self_loops=True)
    q, k, v, w = inputs(n, edge_index.size(1), heads=1, state=2, head_dim=2, requires_grad=True)
    base = row_normalize(edge_index, w.detach(), n, gamma=0.7)
    w = (0.5 * base).requires_grad_()
    for method in ("dense", "iterative"):
        fn = lambda q, k, v, w: resolvent_attention(q, k, v, edge_index, w, method=method)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_iterative_backward_memory_does_not_depend_on_iterations():
    # The implicit backward saves only (weight, H): no tensor per iteration.
    n = 20
    edge_index = random_graph(n, 60)
    q, k, v, w = inputs(n, edge_index.size(1), requires_grad=True)
    w_norm = row_normalize(edge_index, w, n, gamma=0.95)  # slow convergence: hundreds of iterations
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        resolvent_attention(q, k, v, edge_index, w_norm, method="iterative")
    iterative_bytes = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        neumann_solve(EdgeListOperator(edge_index), w_norm, to_state(k, v), torch.tensor([200]))  # unrolled
    assert iterative_bytes * 20 < sum(saved)


def test_iterative_reports_divergence():
    edge_index = torch.tensor([[0, 1], [1, 0]])
    q, k, v, _ = inputs(2, 2)
    w = torch.full((2, 2), 1.5, dtype=torch.float64)  # spectral radius 1.5
    with pytest.raises(RuntimeError, match="did not converge"):
        resolvent_attention(q, k, v, edge_index, w, method="iterative", max_iter=50)


def test_int32_edge_index_matches_int64():
    n = 25
    edge_index = random_dag(n, 60)
    q, k, v, w = inputs(n, edge_index.size(1))
    for method in ("dense", "dag", "neumann", "iterative"):
        a = resolvent_attention(q, k, v, edge_index, w, method=method)
        b = resolvent_attention(q, k, v, edge_index.int(), w, method=method)
        torch.testing.assert_close(a, b)


def test_shared_edge_weight_broadcasts_over_heads():
    n = 10
    edge_index = random_dag(n, 20)
    q, k, v, w = inputs(n, edge_index.size(1))
    shared = w[:, 0]
    torch.testing.assert_close(resolvent_attention(q, k, v, edge_index, shared),
                               resolvent_attention(q, k, v, edge_index, shared.unsqueeze(1).expand(-1, 2).clone()))


def test_auto_choice_is_documented_and_exact():
    small = random_graph(20, 60)
    dag = random_dag(1000, 3000)
    cyclic = random_graph(1000, 3000)
    assert choose_method(GraphTopology(small, 20)) == "dense"
    assert choose_method(GraphTopology(small, 20), num_terms=3) == "neumann"
    assert choose_method(GraphTopology(dag, 1000)) == "dag"
    assert choose_method(GraphTopology(cyclic, 1000)) == "iterative"
    assert choose_method(GraphTopology(cyclic[:, cyclic.max(0).values < 700], 700)) == "dense"
    q, k, v, w = inputs(1000, dag.size(1))
    torch.testing.assert_close(resolvent_attention(q, k, v, dag, w),
                               resolvent_attention(q, k, v, dag, w, method="dense"), rtol=1e-9, atol=1e-10)


def test_levels_used_by_dag_method_are_topological():
    edge_index = random_dag(60, 240)
    level = topological_levels(edge_index, 60)
    assert bool((level[edge_index[1]] > level[edge_index[0]]).all())


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 97])
def test_block_inverse_matches_lu_on_diagonally_dominant_matrices(n):
    from torch_geometric_chimera.ops.dense import block_inverse, resolvent_matrix
    adj = torch.randn(3, 2, n, n, dtype=torch.float64)
    adj = 0.95 * adj / adj.abs().sum(-1, keepdim=True)  # every row of |A| sums to 0.95
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(block_inverse(eye - adj, base=4), torch.linalg.inv(eye - adj))
    torch.testing.assert_close(resolvent_matrix(adj), torch.linalg.inv(eye - adj))
    # Not diagonally dominant: resolvent_matrix takes the pivoting LU and is still exact.
    strong = 3 * adj
    torch.testing.assert_close(resolvent_matrix(strong), torch.linalg.inv(eye - strong))


@pytest.mark.parametrize("terms", [[0, 0, 0], [3, 1, 4], [25, 7, 16]])
def test_checkpointed_neumann_equals_the_unrolled_reference(terms, device):
    graphs = [(10, random_graph(10, 30, self_loops=True)), (7, random_graph(7, 20)), (5, random_graph(5, 9))]
    edge_index, batch, n = batch_graphs(graphs)
    edge_index, batch = edge_index.to(device), batch.to(device)
    _, _, x, w = inputs(n, edge_index.size(1), head_dim=6, device=device, requires_grad=True)
    num_terms = torch.tensor(terms, device=device)
    operator = GraphTopology(edge_index, n, batch).operator
    fast = checkpointed_neumann(operator, w, x, num_terms, batch)
    slow = neumann_solve(EdgeListOperator(edge_index), w, x, num_terms, batch)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(grads(fast, (w, x)), grads(slow, (w, x))):
        torch.testing.assert_close(a, b)


def test_checkpointed_neumann_memory_grows_like_the_square_root_of_terms():
    edge_index = random_graph(30, 90)
    q, k, v, w = inputs(30, edge_index.size(1), requires_grad=True)
    saved = {}
    for terms in (16, 256):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            resolvent_attention(q, k, v, edge_index, w, method="neumann", num_terms=terms)
        saved[terms] = sum(sizes)
    assert saved[256] < 3 * saved[16]  # 16x the terms, about 4x the checkpoints of one state


def test_gradcheck_checkpointed_neumann_with_per_graph_terms():
    edge_index, batch, n = batch_graphs([(5, random_graph(5, 12)), (4, random_graph(4, 8))])
    _, _, x, w = inputs(n, edge_index.size(1), heads=1, head_dim=2, requires_grad=True)
    operator = GraphTopology(edge_index, n, batch).operator
    fn = lambda w, x: checkpointed_neumann(operator, w, x, torch.tensor([6, 2]), batch)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, x))


def test_topology_is_shared_between_calls_with_the_same_unchanged_tensors():
    edge_index = random_dag(20, 40)
    batch = torch.zeros(20, dtype=torch.long)
    first = GraphTopology.get(edge_index, 20, batch)
    assert GraphTopology.get(edge_index, 20, batch) is first
    assert GraphTopology.get(edge_index.clone(), 20, batch) is not first  # another tensor
    assert GraphTopology.get(edge_index, 20, None) is not first  # another batch
    edge_index[0, 0] = edge_index[0, 0]  # an in-place write bumps the version counter
    changed = GraphTopology.get(edge_index, 20, batch)
    assert changed is not first and GraphTopology.get(edge_index, 20, batch) is changed


def test_inference_mode_tensors_are_not_cached_and_give_the_same_result():
    # Tensors made under torch.inference_mode have no version counter (PyTorch Lightning tests in it).
    edge_index = random_graph(12, 30)
    q, k, v, w = inputs(12, edge_index.size(1))
    expected = resolvent_attention(q, k, v, edge_index, w, method="dense")
    with torch.inference_mode():
        frozen = edge_index.clone()
        first = GraphTopology.get(frozen, 12)
        assert GraphTopology.get(frozen, 12) is not first
        out = resolvent_attention(q, k, v, frozen, w, method="dense")
    torch.testing.assert_close(out, expected)


WRITES_THAT_BYPASS_THE_VERSION_COUNTER = {
    "data": lambda t: t.data.__setitem__((1, 4), 0),
    "numpy": lambda t: t.numpy().__setitem__((1, 4), 0),
}


@pytest.mark.parametrize("write", list(WRITES_THAT_BYPASS_THE_VERSION_COUNTER))
def test_topology_cache_sees_writes_that_bypass_the_version_counter(write):
    q, k, v, w = inputs(6, 5)
    edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])  # a path; the write turns it into a cycle
    for method in ("auto", "dense", "neumann"):
        ei = edge_index.clone()
        resolvent_attention(q, k, v, ei, w, method=method)  # cached
        version = ei._version
        WRITES_THAT_BYPASS_THE_VERSION_COUNTER[write](ei)
        assert ei._version == version and ei[1, 4] == 0
        torch.testing.assert_close(resolvent_attention(q, k, v, ei, w, method=method),
                                   resolvent_attention(q, k, v, ei.clone(), w, method=method))


def test_explicit_topology_where_the_cache_cannot_see_such_writes(monkeypatch):
    # On accelerators (outside debug mode) the cache checks version counters only; the explicit
    # handle is the documented way to hold the topology of a graph that is written through .data.
    from torch_geometric_chimera.ops import common
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)
    q, k, v, w = inputs(6, 5)
    ei = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    before = resolvent_attention(q, k, v, ei, w, method="dense")
    ei.data[1, 4] = 0
    expected = resolvent_attention(q, k, v, ei.clone(), w, method="dense")
    stale = resolvent_attention(q, k, v, ei, w, method="dense")
    torch.testing.assert_close(stale, before)  # documented: this write is not seen here
    assert not torch.allclose(stale, expected)
    held = GraphTopology(ei, 6)
    torch.testing.assert_close(resolvent_attention(q, k, v, ei, w, method="dense", topology=held), expected)


def rings_with_chords(num_graphs, n, chords):
    graphs = []
    for _ in range(num_graphs):
        ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
        extra = torch.randint(0, n, (2, chords))
        extra = extra[:, extra[0] != extra[1]]
        edges = torch.cat([ring, extra], 1)
        graphs.append((n, torch.cat([edges, edges.flip(0)], 1)))
    return batch_graphs(graphs)


def test_auto_cost_model_follows_the_panel():
    # The choices bench_auto_panel.py measured as fastest (within 1.2x) on the 2-core CPU.
    edge_index, batch, n = rings_with_chords(64, 150, 15)
    rings = GraphTopology(edge_index, n, batch)
    assert choose_method(rings, None, 16, 32) == "band"  # ChimeraConv(64, heads=4): expand 2, S = 16; dense was 3x slower
    assert choose_method(rings, None, 16, 16) == "band"  # expand 1
    assert choose_method(rings, None, 64, 32) == "dense"  # a large state: the n^3 inverse is the cheaper part
    small = batch_graphs([(30, torch.cat([random_dag(30, 40), random_dag(30, 40).flip(0)], 1)) for _ in range(128)])
    assert choose_method(GraphTopology(small[0], small[2], small[1]), None, 16, 32) == "dense"
    side = 12
    index = torch.arange(side * side).view(side, side)
    grid = torch.cat([torch.stack([index[:, :-1].reshape(-1), index[:, 1:].reshape(-1)]),
                      torch.stack([index[:-1].reshape(-1), index[1:].reshape(-1)])], 1)  # down-right: a DAG
    grids = batch_graphs([(side * side, grid)] * 64)
    assert choose_method(GraphTopology(grids[0], grids[2], grids[1]), None, 16, 16) in ("band", "dag")


def test_auto_on_the_issue_case_matches_band_exactly():
    edge_index, batch, n = rings_with_chords(4, 150, 15)
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=16, head_dim=32)
    w = row_normalize(edge_index, w, n)
    torch.testing.assert_close(resolvent_attention(q, k, v, edge_index, w, batch=batch),
                               resolvent_attention(q, k, v, edge_index, w, batch=batch, method="dense"))
