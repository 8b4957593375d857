"""The band path: chimera::band_order / band_factor / band_solve / band_attention against the
pure-PyTorch references (a dense solve per graph, the dense path and the inverse oracle)."""
import pytest
import torch
from graphs import batch_graphs, inputs, random_graph, row_normalize

from torch_geometric_chimera.ops import GraphTopology, choose_method, resolvent_attention
from torch_geometric_chimera.ops.band import band_resolvent_attention, band_schedule
from torch_geometric_chimera.ops.common import read_state, to_state
from torch_geometric_chimera.ops.reference import band_solve_reference, inverse_resolvent_attention


def chain_molecule(backbone: int, generator=None):
    """A backbone path with a one- or two-atom side group on every node, both directions stored."""
    src, dst, n = [], [], backbone
    for i in range(backbone - 1):
        src.append(i), dst.append(i + 1)
    for i in range(backbone):
        src.append(i), dst.append(n)
        if int(torch.randint(0, 2, (1,), generator=generator)):
            src.append(n), dst.append(n + 1)
            n += 1
        n += 1
    edge_index = torch.tensor([src, dst])
    return n, torch.cat([edge_index, edge_index.flip(0)], 1)


def molecules(sizes=(10, 4, 17)):
    return batch_graphs([chain_molecule(b) for b in sizes])


def band_bandwidth_by_hand(edge_index, schedule, num_nodes):
    position = torch.empty(num_nodes, dtype=torch.long)
    for g in range(schedule.node_ptr.numel() - 1):
        begin, end = int(schedule.node_ptr[g]), int(schedule.node_ptr[g + 1])
        position[schedule.order[begin:end]] = torch.arange(end - begin)
    return (position[edge_index[0]] - position[edge_index[1]]).abs()


def test_band_order_is_a_per_graph_permutation_with_the_stated_bandwidth():
    edge_index, batch, n = molecules()
    schedule = band_schedule(edge_index, n, batch)
    assert sorted(schedule.order.tolist()) == list(range(n))
    for g in range(3):
        members = schedule.order[schedule.node_ptr[g]:schedule.node_ptr[g + 1]]
        assert (batch[members] == g).all()
    distance = band_bandwidth_by_hand(edge_index, schedule, n)
    graph_of_edge = batch[edge_index[0]]
    for g in range(3):
        assert int(distance[graph_of_edge == g].max()) == int(schedule.bandwidth[g])
    assert int(schedule.bandwidth.max()) <= 3  # chains with side groups: a narrow band


def test_reverse_cuthill_mckee_narrows_a_shuffled_path():
    n = 50
    perm = torch.randperm(n)
    path = torch.stack([perm[:-1], perm[1:]])
    edge_index = torch.cat([path, path.flip(0)], 1)
    assert int(band_schedule(edge_index, n).bandwidth) == 1


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_band_factor_and_solve_match_the_dense_reference(transpose, index_dtype):
    edge_index, batch, n = batch_graphs([(20, random_graph(20, 60)), (1, torch.zeros(2, 0, dtype=torch.long)),
                                         (9, random_graph(9, 30, self_loops=True))])
    topology = GraphTopology(edge_index, n, batch)
    s, csr = topology.band_schedule, topology.operator
    weight = row_normalize(edge_index, torch.rand(edge_index.size(1), 3, dtype=torch.float64), n, gamma=0.9)
    x = torch.randn(n, 3, 5, dtype=torch.float64)
    factors = torch.ops.chimera.band_factor(s.node_ptr, s.order, s.bandwidth, csr.rowptr.to(index_dtype),
                                            csr.col.to(index_dtype), weight[csr.perm], s.band_size)
    out = torch.ops.chimera.band_solve(s.node_ptr, s.order, s.bandwidth, factors, x, transpose)
    torch.testing.assert_close(out, band_solve_reference(s.node_ptr, s.order, edge_index, weight, x, transpose))


def test_band_method_equals_dense_and_the_inverse_oracle_with_gradients():
    # molecules, a random graph with cycles, duplicate edges, self-loops and an isolated node
    edge_index, batch, n = batch_graphs([chain_molecule(6), (15, random_graph(15, 50, self_loops=True)),
                                         (1, torch.zeros(2, 0, dtype=torch.long)),
                                         (4, torch.tensor([[0, 0, 1, 2], [1, 1, 2, 2]]))])
    q, k, v, w = inputs(n, edge_index.size(1), heads=2)
    w = row_normalize(edge_index, w, n, gamma=0.95).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    band = resolvent_attention(q, k, v, edge_index, w, method="band", batch=batch)
    dense = resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch)
    torch.testing.assert_close(band, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(band, inverse_resolvent_attention(q, k, v, edge_index, w), rtol=1e-10, atol=1e-12)
    cotangent = torch.randn_like(band)
    for a, b in zip(torch.autograd.grad((band * cotangent).sum(), (q, k, v, w)),
                    torch.autograd.grad((dense * cotangent).sum(), (q, k, v, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_attention_equals_solve_then_contract():
    edge_index, batch, n = molecules((7, 9))
    topology = GraphTopology(edge_index, n, batch)
    s, csr = topology.band_schedule, topology.operator
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=3, head_dim=4)
    w = row_normalize(edge_index, w, n)
    factors = torch.ops.chimera.band_factor(s.node_ptr, s.order, s.bandwidth, csr.rowptr, csr.col, w[csr.perm],
                                            s.band_size)
    y, state = torch.ops.chimera.band_attention(s.node_ptr, s.order, s.bandwidth, factors, q, k, v)
    expected_state = band_solve_reference(s.node_ptr, s.order, edge_index, w, to_state(k, v))
    torch.testing.assert_close(state, expected_state)
    torch.testing.assert_close(y, read_state(q, expected_state, 4))


def test_gradcheck_band_resolvent_attention():
    edge_index, batch, n = molecules((3, 4))
    topology = GraphTopology(edge_index, n, batch)
    s, csr = topology.band_schedule, topology.operator
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=2, head_dim=3)
    w = row_normalize(edge_index, w, n)[csr.perm]
    args = [t.clone().requires_grad_() for t in (w, q, k, v)]
    fn = lambda w, q, k, v: band_resolvent_attention(s, csr.rowptr, csr.col, w, q, k, v)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_opcheck_band_ops():
    edge_index, batch, n = molecules((4, 5))
    topology = GraphTopology(edge_index, n, batch)
    s, csr = topology.band_schedule, topology.operator
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=2, head_dim=3)
    w = row_normalize(edge_index, w, n)[csr.perm]
    sym = torch.cat([edge_index, edge_index.flip(0)], 1)
    sym = sym[:, torch.argsort(sym[1], stable=True)]
    sym_rowptr = torch.searchsorted(sym[1], torch.arange(n + 1))
    nodes = torch.argsort(batch, stable=True)
    torch.library.opcheck(torch.ops.chimera.band_order, (s.node_ptr, nodes, sym_rowptr, sym[0]))
    factor_args = (s.node_ptr, s.order, s.bandwidth, csr.rowptr, csr.col, w, s.band_size)
    torch.library.opcheck(torch.ops.chimera.band_factor, factor_args)
    factors = torch.ops.chimera.band_factor(*factor_args)
    x = torch.randn(n, 2, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.chimera.band_solve, (s.node_ptr, s.order, s.bandwidth, factors, x, True))
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.chimera.band_attention, (s.node_ptr, s.order, s.bandwidth, factors, *qkv))
    y, state = torch.ops.chimera.band_attention(s.node_ptr, s.order, s.bandwidth, factors, q, k, v)
    torch.library.opcheck(torch.ops.chimera.band_attention_backward,
                          (s.node_ptr, s.order, s.bandwidth, factors, q, k, v, state, torch.randn_like(y)))
    # the registered autograd of band_solve and band_attention (gradients in x and in q, k, v)
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.chimera.band_solve(s.node_ptr, s.order, s.bandwidth, factors, x, False), (x,))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.chimera.band_attention(s.node_ptr, s.order, s.bandwidth, factors, q, k, v)[0],
        qkv)
    # a gradient that reaches the returned state directly (grad_state) is handled too
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.chimera.band_attention(s.node_ptr, s.order, s.bandwidth, factors, q, k,
                                                         v)[1].sin().sum(), qkv)


def test_non_contiguous_inputs_and_low_precision():
    edge_index, batch, n = molecules((8, 6))
    q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=4, head_dim=4, dtype=torch.float32)
    w = row_normalize(edge_index, w, n)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_nc.is_contiguous()
    torch.testing.assert_close(resolvent_attention(q_nc, k, v, edge_index, w, method="band", batch=batch),
                               resolvent_attention(q, k, v, edge_index, w, method="dense", batch=batch))
    exact = inverse_resolvent_attention(*(t.double() for t in (q, k, v)), edge_index, w.double())
    for dtype in (torch.float16, torch.bfloat16):
        low = [t.to(dtype) for t in (q, k, v, w)]
        band = resolvent_attention(*low[:3], edge_index, low[3], method="band", batch=batch)
        # the reference at that precision: the power series (linalg.inv has no float16 / bfloat16)
        reference = inverse_resolvent_attention(*low[:3], edge_index, low[3], num_terms=120)
        assert band.dtype == dtype
        assert (band.double() - exact).abs().max() <= 2 * (reference.double() - exact).abs().max()


def test_not_diagonally_dominant_falls_back_to_pivoted_lu():
    edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    weight = torch.tensor([[1.5], [0.2], [0.1], [2.0]], dtype=torch.float64)  # rows of |A| sum above 1
    q, k, v, _ = inputs(3, 4, heads=1)
    torch.testing.assert_close(resolvent_attention(q, k, v, edge_index, weight, method="band"),
                               inverse_resolvent_attention(q, k, v, edge_index, weight))


def test_auto_takes_band_for_molecules_and_dense_for_bushy_graphs():
    edge_index, batch, n = batch_graphs([chain_molecule(60) for _ in range(4)])
    topology = GraphTopology(edge_index, n, batch)
    assert choose_method(topology, None, 16, 32) == "band"
    assert choose_method(topology) == "dense"  # without state sizes there is no cost to compare
    dense_cost, band_cost = topology.exact_costs(16, 32)
    assert band_cost < dense_cost
    complete = torch.combinations(torch.arange(40)).t()
    bushy = GraphTopology(torch.cat([complete, complete.flip(0)], 1), 40)
    assert choose_method(bushy, None, 16, 32) == "dense"


def test_band_kernels_check_their_inputs():
    edge_index, batch, n = molecules((5,))
    topology = GraphTopology(edge_index, n, batch)
    s, csr = topology.band_schedule, topology.operator
    w = torch.rand(edge_index.size(1), 1, dtype=torch.float64)[csr.perm] * 0.1
    with pytest.raises(RuntimeError, match="band_size must be"):
        torch.ops.chimera.band_factor(s.node_ptr, s.order, s.bandwidth, csr.rowptr, csr.col, w, s.band_size + 1)
    narrow = torch.zeros_like(s.bandwidth)
    with pytest.raises(RuntimeError, match="edge outside the band"):
        torch.ops.chimera.band_factor(s.node_ptr, s.order, narrow, csr.rowptr, csr.col, w, n)
    with pytest.raises(RuntimeError, match="factors must have"):
        torch.ops.chimera.band_solve(s.node_ptr, s.order, s.bandwidth, torch.zeros(3, 1, dtype=torch.float64),
                                     torch.zeros(n, 1, 2, dtype=torch.float64), False)


def test_band_where_its_kernels_do_not_run_is_refused(monkeypatch):
    from torch_geometric_chimera.ops import common
    monkeypatch.setattr(common, "host_reads_allowed", lambda t: False)  # as on a GPU
    edge_index, batch, n = molecules((3,))
    q, k, v, w = inputs(n, edge_index.size(1))
    with pytest.raises(ValueError, match="method: 'band' runs on CPU"):
        resolvent_attention(q, k, v, edge_index, w, method="band", batch=batch)


@pytest.mark.parametrize("undirected", [True, False])
def test_symbolic_factor_nonzeros_match_the_numeric_factors(undirected):
    cyclic = random_graph(14, 40)
    if undirected:
        cyclic = torch.cat([cyclic, cyclic.flip(0)], 1)
    edge_index, batch, n = batch_graphs([chain_molecule(9), (14, cyclic)])
    topology = GraphTopology(edge_index, n, batch)
    s, csr = topology.band_schedule, topology.operator
    weight = row_normalize(edge_index, torch.rand(edge_index.size(1), 1, dtype=torch.float64), n)
    factors = torch.ops.chimera.band_factor(s.node_ptr, s.order, s.bandwidth, csr.rowptr, csr.col, weight[csr.perm],
                                            s.band_size)
    width = 2 * s.bandwidth + 1
    offset = torch.cat([width.new_zeros(1), ((s.node_ptr[1:] - s.node_ptr[:-1]) * width).cumsum(0)])
    for g in range(2):
        numeric = int((factors[offset[g]:offset[g + 1], 0] != 0).sum()) - int(s.node_ptr[g + 1] - s.node_ptr[g])
        if undirected:  # random weights: no entry cancels to zero
            assert numeric == int(s.factor_nnz[g])
        else:  # the count is of the symmetrized pattern: an upper bound for a directed graph
            assert numeric <= int(s.factor_nnz[g])
    path = torch.stack([torch.arange(9), torch.arange(1, 10)])
    assert int(band_schedule(torch.cat([path, path.flip(0)], 1), 10).factor_nnz) == 2 * 9
