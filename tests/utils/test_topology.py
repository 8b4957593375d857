import pytest
import torch
from dispatch_count import CountSyncs
from graphs import batch_graphs, random_dag, random_graph

from torch_geometric_chimera.utils import (CycleError, diameter_bound, grid_graph_dags, is_dag, is_symmetric,
                                           line_graph_dags, topological_levels)


def exact_directed_diameter(edge_index, num_nodes):
    """Longest shortest path over reachable pairs, by boolean matrix powers (test oracle)."""
    adj = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    adj[edge_index[0], edge_index[1]] = True
    reach = torch.eye(num_nodes, dtype=torch.bool)
    frontier, diameter = reach.clone(), 0
    for k in range(1, num_nodes + 1):
        new = (frontier.double() @ adj.double()).bool() & ~reach
        if not new.any():
            break
        reach |= new
        frontier = new
        diameter = k
    return diameter


def test_levels_are_longest_paths():
    edge_index = torch.tensor([[0, 1, 0, 2, 3], [1, 2, 2, 3, 4]])
    assert topological_levels(edge_index, 6).tolist() == [0, 1, 2, 3, 4, 0]


def test_random_dag_levels_respect_every_edge():
    edge_index = random_dag(200, 800)
    level = topological_levels(edge_index, 200)
    assert bool((level[edge_index[1]] > level[edge_index[0]]).all())
    # Longest path: every non-source node has a parent exactly one level below.
    parent_level = torch.full((200,), -1).scatter_reduce(0, edge_index[1], level[edge_index[0]], "amax")
    has_parent = parent_level >= 0
    assert bool((parent_level[has_parent] == level[has_parent] - 1).all())


@pytest.mark.parametrize("edges", [[[0, 1, 2], [1, 2, 0]], [[0, 1], [1, 1]]], ids=["cycle", "self-loop"])
def test_cycles_are_detected(edges):
    edge_index = torch.tensor(edges)
    assert not is_dag(edge_index, 4)
    with pytest.raises(CycleError, match="edge_index: expected a directed acyclic graph"):
        topological_levels(edge_index, 4)
    level = topological_levels(edge_index, 4, raise_on_cycle=False)
    assert level[3] == 0 and level[1] == -1


@pytest.mark.parametrize("seed", range(4))
def test_levels_in_a_fixed_number_of_steps_are_kahns_levels_without_host_reads(seed):
    # Issue 17, item 5: with a depth bound (the largest graph size minus one), the same levels in
    # bound + 1 steps over masks, and not one value read on the host (a synchronization on a GPU).
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 40, (12,), generator=generator).tolist()
    graphs = [(n, random_dag(n, 3 * n) if g % 3 else random_graph(n, 2 * n, self_loops=g % 2 == 0))
              for g, n in enumerate(sizes)]  # DAGs, and graphs with cycles (some with self-loops)
    graphs.append((1, torch.zeros(2, 0, dtype=torch.long)))  # an isolated node
    graphs.append((6, torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])))  # a path as deep as its graph allows
    edge_index, _, n = batch_graphs(graphs)
    expected = topological_levels(edge_index, n, raise_on_cycle=False)
    assert int((expected < 0).sum()) > 0 and int(expected.max()) >= 5
    with CountSyncs() as counter:
        levels = topological_levels(edge_index, n, raise_on_cycle=False, depth_bound=max(sizes + [6]) - 1)
    assert dict(counter.syncs) == {}
    assert torch.equal(levels, expected)
    dag_edges, _, dag_n = batch_graphs([(m, random_dag(m, 3 * m)) for m in sizes])
    torch.testing.assert_close(topological_levels(dag_edges, dag_n, depth_bound=max(sizes) - 1),
                               topological_levels(dag_edges, dag_n), rtol=0, atol=0)
    with pytest.raises(CycleError):
        topological_levels(edge_index, n, depth_bound=max(sizes + [6]) - 1)
    with pytest.raises(ValueError, match="depth_bound: expected a non-negative int"):
        topological_levels(edge_index, n, depth_bound=-1)


def test_empty_graph():
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert topological_levels(empty, 0).numel() == 0
    assert is_dag(empty, 3) and is_symmetric(empty, 3)
    assert diameter_bound(empty, 3).tolist() == [0]


def test_diameter_bound_on_dags_is_exact():
    for _ in range(5):
        edge_index = random_dag(40, 80)
        assert int(diameter_bound(edge_index, 40)) >= exact_directed_diameter(edge_index, 40)
    path = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    assert int(diameter_bound(path, 5)) == 4


def test_diameter_bound_is_valid_and_reasonably_tight_on_undirected_graphs():
    for n in (10, 30, 60):
        edge_index = random_graph(n, 2 * n)
        edge_index = torch.cat([edge_index, edge_index.flip(0)], 1)
        bound, exact = int(diameter_bound(edge_index, n)), exact_directed_diameter(edge_index, n)
        assert exact <= bound <= 2 * exact


def test_diameter_bound_directed_cycle_falls_back_to_n_minus_one():
    ring = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    assert int(diameter_bound(ring, 5)) == 4 == exact_directed_diameter(ring, 5)


def test_diameter_bound_per_graph_in_a_batch():
    path = torch.tensor([[0, 1, 2], [1, 2, 3]])
    ring = torch.tensor([[0, 1, 2], [1, 2, 0]])
    undirected_path = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4], [1, 0, 2, 1, 3, 2, 4, 3]])
    edge_index, batch, n = batch_graphs([(4, path), (3, ring), (1, torch.zeros(2, 0, dtype=torch.long))])
    assert diameter_bound(edge_index, n, batch).tolist() == [3, 2, 0]
    edge_index, batch, n = batch_graphs([(5, undirected_path), (2, torch.tensor([[0, 1], [1, 0]]))])
    bound = diameter_bound(edge_index, n, batch).tolist()
    assert bound == [4, 1]  # min(2 * ecc(a node of largest degree), n - 1) per graph


def test_line_graph_dags():
    batch = torch.tensor([0, 0, 0, 1, 1])
    forward, backward = line_graph_dags(5, batch)
    assert forward.tolist() == [[0, 1, 3], [1, 2, 4]]
    assert backward.tolist() == [[1, 2, 4], [0, 1, 3]]
    assert is_dag(forward, 5) and is_dag(backward, 5)


def test_grid_graph_dags_cover_the_undirected_grid():
    h, w = 4, 5
    dags = grid_graph_dags(h, w)
    assert len(dags) == 4
    undirected = set()
    for r in range(h):
        for c in range(w):
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                if 0 <= r + dr < h and 0 <= c + dc < w:
                    undirected.add((r * w + c, (r + dr) * w + c + dc))
    covered = set()
    for dag in dags:
        assert is_dag(dag, h * w)
        assert dag.size(1) == h * (w - 1) + (h - 1) * w
        covered |= set(map(tuple, dag.t().tolist()))
    assert covered == undirected
    # Every DAG flows towards one corner: that corner is reachable from every node.
    levels = [topological_levels(d, h * w) for d in dags]
    assert [int(lv.max()) for lv in levels] == [h + w - 2] * 4


def test_path_roots_and_directed_paths():
    from torch_geometric_chimera.utils import is_directed_paths, path_roots
    forward, backward = line_graph_dags(9, torch.tensor([0] * 4 + [1] * 5))
    root, depth, acyclic = path_roots(forward, 9)
    assert acyclic and root.tolist() == [0] * 4 + [4] * 5 and depth.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    root, depth, acyclic = path_roots(backward, 9)
    assert acyclic and root.tolist() == [3] * 4 + [8] * 5 and depth.tolist() == [3, 2, 1, 0, 4, 3, 2, 1, 0]
    assert is_directed_paths(forward, 9) and is_directed_paths(torch.zeros(2, 0, dtype=torch.long), 3)
    ring = torch.tensor([[0, 1, 2], [1, 2, 0]])
    assert not path_roots(ring, 4)[2] and not is_directed_paths(ring, 4)
    assert not is_directed_paths(torch.tensor([[0, 0], [1, 2]]), 3)  # a node with two children
    assert not is_directed_paths(torch.tensor([[1, 2], [0, 0]]), 3)  # a node with two parents


def test_diameter_bound_per_component_and_its_pair_budget(monkeypatch):
    from torch_geometric_chimera.utils import topology
    star = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4]])
    star = torch.cat([star, star.flip(0)], 1)  # undirected: 2 from its centre, n - 1 = 4 otherwise
    path = torch.tensor([[5, 6, 7], [6, 7, 8]])  # a DAG component of the same graph: longest path 3
    edge_index = torch.cat([star, path], 1)
    assert diameter_bound(edge_index, 9).tolist() == [3]  # the largest over the graph's components
    assert diameter_bound(star, 5).tolist() == [2]
    monkeypatch.setattr(topology, "ECCENTRICITY_PAIR_BUDGET", 4)  # 1 root x 5 nodes is over it
    assert diameter_bound(star, 5).tolist() == [4]
