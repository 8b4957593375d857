"""Adjacency parameterizations, and the Mamba-2 SSD equivalence of the 'mamba2' one."""
import pytest
import torch
from graphs import random_dag, random_graph

from torch_geometric_chimera.nn import (ChimeraConv, dag_adjacency, general_adjacency, mamba2_adjacency,
                                       undirected_line_adjacency)
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention
from torch_geometric_chimera.utils import line_graph_dags


def dense(edge_index, weight, n):
    adj = torch.zeros(weight.size(1), n, n, dtype=weight.dtype)
    for e in range(edge_index.size(1)):
        adj[:, edge_index[1, e], edge_index[0, e]] += weight[e]
    return adj


def test_general_adjacency_formula_and_row_normalization():
    n, heads = 12, 3
    edge_index = random_graph(n, 40, self_loops=True)
    delta = torch.rand(n, heads, dtype=torch.float64) * 2
    delta_edge = torch.rand(edge_index.size(1), heads, dtype=torch.float64)
    psi = torch.randn(n, heads, dtype=torch.float64)
    weight, key_scale = general_adjacency(delta, edge_index, psi, gamma=0.7, delta_edge=delta_edge)
    src, dst = edge_index
    raw = torch.exp(-(delta[dst] + delta[src] + delta_edge) / 3)
    for i in range(n):
        into = dst == i
        expected = 0.7 * raw[into] / (raw[into].sum(0) + torch.exp(-psi[i]))
        torch.testing.assert_close(weight[into], expected)
    row_sums = dense(edge_index, weight, n).sum(-1)
    assert bool((row_sums < 0.7).all())
    assert torch.equal(key_scale, delta)


def test_dag_adjacency_matches_proposition_4_3():
    n, heads = 10, 2
    edge_index = random_dag(n, 25)
    delta = torch.rand(n, heads, dtype=torch.float64)
    weight, key_scale = dag_adjacency(delta, edge_index)
    src, dst = edge_index
    for i in range(n):
        into = (dst == i).nonzero().view(-1)
        if into.numel() == 0:
            torch.testing.assert_close(key_scale[i], delta[i])  # sources keep Mamba-2's b = Δ
            continue
        delta_ij = (delta[i] + delta[src[into]]) / 2
        torch.testing.assert_close(weight[into], torch.exp(-delta_ij) / into.numel() ** 0.5)
        torch.testing.assert_close(key_scale[i], delta_ij.sum(0) / into.numel() ** 0.5)
        # B̄_i = (Σ_j -ln A_ij) / sqrt|p(i)| · B_i, in DESIGN.md's words.
        torch.testing.assert_close(key_scale[i], (-torch.log(torch.exp(-delta_ij))).sum(0) / into.numel() ** 0.5)


def test_undirected_line_adjacency_meets_the_cycle_constraint_and_is_invertible():
    n = 50
    forward, backward = line_graph_dags(n)
    edge_index = torch.cat([forward, backward], 1)
    delta = torch.zeros(n, 1, dtype=torch.float64)  # the extreme case: products exactly 1/4
    weight, _ = undirected_line_adjacency(delta, edge_index)
    adj = dense(edge_index, weight, n)[0]
    assert float((adj * adj.t()).max()) <= 0.25 + 1e-15
    assert torch.linalg.matrix_rank(torch.eye(n, dtype=torch.float64) - adj) == n
    assert float(torch.linalg.eigvals(adj).abs().max()) < 1


def ssd_quadratic(x, B, C, delta):
    """Mamba-2 SSD, quadratic form: y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{k=s+1..t} a_k) Δ_s x_s, a_k = -Δ_k."""
    T = x.size(0)
    cumulative = torch.cumsum(-delta, 0)  # [T, H]
    decay = torch.exp(cumulative.unsqueeze(1) - cumulative.unsqueeze(0))  # [t, s, H]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool)).unsqueeze(-1)
    decay = torch.where(causal, decay, torch.zeros_like(decay))
    scores = (C @ B.t()).unsqueeze(-1)  # [t, s, 1]
    return torch.einsum("tsh,shp->thp", decay * scores, delta.unsqueeze(-1) * x)


def ssd_recurrence(x, B, C, delta):
    """Mamba-2 as a recurrence: h_t = exp(-Δ_t) h_{t-1} + Δ_t B_t x_tᵀ, y_t = C_tᵀ h_t."""
    T, H, P = x.shape
    h = torch.zeros(H, B.size(1), P, dtype=x.dtype)
    out = []
    for t in range(T):
        h = torch.exp(-delta[t]).view(H, 1, 1) * h + delta[t].view(H, 1, 1) * B[t].view(1, -1, 1) * x[t].unsqueeze(1)
        out.append(torch.einsum("s,hsp->hp", C[t], h))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["dense", "band", "dag", "line", "neumann", "iterative"])
def test_mamba2_adjacency_on_a_directed_line_is_mamba2_ssd(method):
    T, H, S, P = 37, 3, 4, 5
    conv = ChimeraConv(H * P, heads=H, state_dim=S, expand=1, adjacency="mamba2", method=method).double()
    x = torch.randn(T, H, P, dtype=torch.float64)
    B, C = torch.randn(T, S, dtype=torch.float64), torch.randn(T, S, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(T, H, dtype=torch.float64))
    forward, _ = line_graph_dags(T)
    y = conv.mix(x, B, C, delta, forward)
    expected = ssd_quadratic(x, B, C, delta)
    torch.testing.assert_close(expected, ssd_recurrence(x, B, C, delta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, expected, rtol=1e-11, atol=1e-12)


def test_mamba2_equivalence_holds_per_sequence_in_a_batch():
    H, S, P = 2, 3, 2
    lengths = [5, 11, 1, 8]
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    T = batch.numel()
    conv = ChimeraConv(H * P, heads=H, state_dim=S, expand=1, adjacency="mamba2").double()
    x, B, C = torch.randn(T, H, P).double(), torch.randn(T, S).double(), torch.randn(T, S).double()
    delta = torch.rand(T, H, dtype=torch.float64)
    forward, _ = line_graph_dags(T, batch)
    y = conv.mix(x, B, C, delta, forward, batch=batch)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        torch.testing.assert_close(y[s], ssd_quadratic(x[s], B[s], C[s], delta[s]), rtol=1e-12, atol=1e-12)
        start += n


def test_mamba2_adjacency_weight_is_exp_minus_target_delta():
    delta = torch.rand(4, 2)
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 3]])
    weight, key_scale = mamba2_adjacency(delta, edge_index)
    torch.testing.assert_close(weight, torch.exp(-delta[1:]))
    assert torch.equal(key_scale, delta)


def test_layer_mixer_is_resolvent_attention_with_the_parameterization():
    n, H, S, P = 15, 2, 3, 4
    edge_index = random_graph(n, 45)
    conv = ChimeraConv(H * P, heads=H, state_dim=S, expand=1).double()
    x, B, C = torch.randn(n, H, P).double(), torch.randn(n, S).double(), torch.randn(n, S).double()
    delta, psi = torch.rand(n, H).double(), torch.randn(n, H).double()
    weight, key_scale = general_adjacency(delta, edge_index, psi, conv.gamma)
    Bh, Ch = B.unsqueeze(1).expand(-1, H, -1), C.unsqueeze(1).expand(-1, H, -1)
    expected = inverse_resolvent_attention(Ch, Bh * key_scale.unsqueeze(-1), x, edge_index, weight)
    torch.testing.assert_close(conv.mix(x, B, C, delta, edge_index, psi), expected)


@pytest.mark.parametrize("name", ["general", "dag", "undirected_line", "mamba2"])
def test_edge_mask_interpolates_between_kept_and_removed(name):
    """An explainer's edge mask: 1 keeps the edge, 0 is the graph without it, continuous between."""
    n = 9
    edge_index = torch.tensor([[0, 1, 2, 3, 0, 5, 6, 4], [1, 2, 3, 4, 4, 6, 7, 8]])  # a DAG, node 4 has 2 parents
    num_edges = edge_index.size(1)
    delta = torch.rand(n, 2, dtype=torch.float64)
    psi = torch.randn(n, 2, dtype=torch.float64)

    def adjacency(ei, mask=None):
        if name == "general":
            return general_adjacency(delta, ei, psi, 0.9, None, mask)
        if name == "dag":
            return dag_adjacency(delta, ei, None, mask)
        if name == "undirected_line":
            return undirected_line_adjacency(delta, ei, None, mask)
        return mamba2_adjacency(delta, ei, mask)

    plain = adjacency(edge_index)
    for got, expected in zip(adjacency(edge_index, torch.ones(num_edges, dtype=torch.float64)), plain):
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)
    for dropped in (3, 7):  # node 4 keeps one of its two parents; node 8 loses its only one
        mask = torch.ones(num_edges, dtype=torch.float64)
        mask[dropped] = 0
        keep = mask.bool()
        weight, key_scale = adjacency(edge_index, mask)
        removed_weight, removed_key_scale = adjacency(edge_index[:, keep])
        torch.testing.assert_close(weight[keep], removed_weight, rtol=1e-15, atol=0)
        assert bool((weight[~keep] == 0).all())
        torch.testing.assert_close(key_scale, removed_key_scale, rtol=1e-15, atol=0)
    # Node 8 has a single parent (edge 7): the mask -> 0 limit is the mask = 0 value.
    near, zero = torch.ones(num_edges, dtype=torch.float64), torch.ones(num_edges, dtype=torch.float64)
    near[7], zero[7] = 1e-9, 0.0
    for got, expected in zip(adjacency(edge_index, near), adjacency(edge_index, zero)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)
