"""Properties every method and every default must have: relabelling the nodes permutes the output
(permutation equivariance), and a graph gives the same output alone as inside any batch."""
import pytest
import torch
from graphs import inputs, random_dag, random_graph, row_normalize

from torch_geometric_chimera.ops import GraphTopology, resolvent_attention
from torch_geometric_chimera.utils import diameter_bound


def undirected(edge_index):
    return torch.cat([edge_index, edge_index.flip(0)], 1)


def star(n):
    return undirected(torch.stack([torch.zeros(n - 1, dtype=torch.long), torch.arange(1, n)]))


def ring_with_chords(n, chords):
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    return undirected(torch.cat([ring, torch.randint(0, n, (2, chords))], 1))


def family(kind, n):
    if kind == "star":
        return star(n)
    if kind == "undirected":
        return undirected(random_graph(n, n + 2))
    if kind == "ring":
        return ring_with_chords(n, 2)
    if kind == "directed":
        return random_graph(n, 2 * n)
    if kind == "dag":
        return random_dag(n, 2 * n)
    return torch.stack([torch.arange(n - 1), torch.arange(1, n)])  # a directed path


def random_batch(kinds, sizes):
    """The graphs' node sets interleaved at random (no graph is contiguous) and their edges shuffled."""
    graphs = [(n, family(kind, n)) for kind, n in zip(kinds, sizes)]
    total = sum(n for n, _ in graphs)
    place = torch.randperm(total)  # node j of the concatenation sits at place[j]
    edges, batch, offset = [], torch.empty(total, dtype=torch.long), 0
    for g, (n, ei) in enumerate(graphs):
        edges.append(place[ei + offset])
        batch[place[offset:offset + n]] = g
        offset += n
    edge_index = torch.cat(edges, 1)
    edge_index = edge_index[:, torch.randperm(edge_index.size(1))]
    return graphs, place, edge_index, batch, total


def relabel(perm, edge_index, batch, *node_tensors):
    """New node p is old node perm[p]."""
    inverse = torch.argsort(perm)
    return (inverse[edge_index], batch[perm]) + tuple(t[perm] for t in node_tensors)


CASES = [  # method, graph kinds it applies to
    ("auto", ["star", "undirected", "ring", "directed", "dag", "path"]),
    ("dense", ["star", "undirected", "ring", "directed", "dag"]),
    ("band", ["star", "undirected", "ring", "directed", "dag"]),
    ("iterative", ["star", "undirected", "ring", "directed", "dag"]),
    ("neumann", ["star", "undirected", "ring", "directed", "dag", "path"]),  # default K: the diameter bounds
    ("dag", ["dag", "path"]),
    ("line", ["path"]),
]


@pytest.mark.parametrize("method, kinds", CASES, ids=[c[0] for c in CASES])
def test_relabelling_permutes_the_output_and_batching_changes_nothing(method, kinds):
    for trial in range(3):
        chosen = [kinds[int(i)] for i in torch.randint(0, len(kinds), (4,))]
        sizes = torch.randint(2, 14, (4,)).tolist()
        graphs, place, edge_index, batch, n = random_batch(chosen, sizes)
        q, k, v, w = inputs(n, edge_index.size(1), heads=2, state=3, head_dim=2)
        w = row_normalize(edge_index, w, n, gamma=0.7)
        out = resolvent_attention(q, k, v, edge_index, w, method=method, batch=batch)

        perm = torch.randperm(n)
        ei_p, batch_p, q_p, k_p, v_p = relabel(perm, edge_index, batch, q, k, v)
        out_p = resolvent_attention(q_p, k_p, v_p, ei_p, w, method=method, batch=batch_p)
        torch.testing.assert_close(out_p, out[perm], rtol=1e-9, atol=1e-11)

        for g in range(len(graphs)):  # each graph alone, in its own labels
            nodes = (batch == g).nonzero().view(-1)
            local = torch.full((n,), -1, dtype=torch.long)
            local[nodes] = torch.arange(nodes.numel())
            inside = batch[edge_index[0]] == g
            alone = resolvent_attention(q[nodes], k[nodes], v[nodes], local[edge_index[:, inside]], w[inside],
                                        method=method)
            torch.testing.assert_close(out[nodes], alone, rtol=1e-9, atol=1e-11)


def test_diameter_bound_of_a_star_ignores_labels_and_neighbours():
    # The case: 2 alone, 4 once the centre is relabelled, 4 beside a 1-edge DAG.
    centre_first = star(5)
    centre_last = torch.tensor([4, 0, 1, 2, 3])[centre_first]
    assert diameter_bound(centre_first, 5).tolist() == [2]
    assert diameter_bound(centre_last, 5).tolist() == [2]
    beside_dag = torch.cat([centre_last, torch.tensor([[5], [6]])], 1)
    assert diameter_bound(beside_dag, 7, torch.tensor([0] * 5 + [1] * 2)).tolist() == [2, 1]
    q, k, v, w = inputs(7, beside_dag.size(1), scale=0.4)
    batched = resolvent_attention(q, k, v, beside_dag, w, method="neumann", batch=torch.tensor([0] * 5 + [1] * 2))
    alone = resolvent_attention(q[:5], k[:5], v[:5], centre_last, w[:-1], method="neumann")
    torch.testing.assert_close(batched[:5], alone)


def exact_directed_diameter(edge_index, n):
    """Longest shortest path over reachable pairs, by Floyd-Warshall on hop counts (test oracle)."""
    dist = torch.full((n, n), float("inf"))
    dist[edge_index[0], edge_index[1]] = 1.0
    dist.fill_diagonal_(0.0)
    for m in range(n):
        dist = torch.minimum(dist, dist[:, m:m + 1] + dist[m:m + 1, :])
    return int(dist[torch.isfinite(dist)].max())


def test_diameter_bound_is_invariant_and_valid_on_random_undirected_graphs():
    for _ in range(10):
        n = int(torch.randint(3, 25, ()))
        edge_index = undirected(random_graph(n, int(torch.randint(n // 2, 2 * n, ()))))
        bound = diameter_bound(edge_index, n)
        perm = torch.randperm(n)
        assert diameter_bound(perm[edge_index], n).tolist() == bound.tolist()
        assert exact_directed_diameter(edge_index, n) <= int(bound) <= max(n - 1, 0)


def test_topology_diameter_bound_follows_the_graph_not_the_batch():
    edge_index = star(5)
    alone = GraphTopology(edge_index, 5).diameter_bound
    with_dag = GraphTopology(torch.cat([edge_index, torch.tensor([[5], [6]])], 1), 7,
                             torch.tensor([0] * 5 + [1] * 2)).diameter_bound
    assert alone.tolist() == [2] and with_dag.tolist() == [2, 1]
