"""method='line' keeps a NaN or an Inf inside its graph, as the other methods do (issue 19, item 3).

The line path lays all paths end to end; it used to chunk them across path boundaries like
Mamba-2's SSD, and a chunk spanning two paths mixed them (0 · NaN is NaN), so a NaN in one graph's
key, value or edge weight made the next graphs' outputs and gradients NaN. Now no chunk holds two
paths and the states are passed on inside each path only."""
import pytest
import torch
from graphs import inputs

from torch_geometric_chimera.ops import resolvent_attention
from torch_geometric_chimera.ops.line import line_layout, line_order
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention

# Graphs as unions of paths (path lengths per graph). With chunk_size 4, paths of 5, 7, 9, 13
# tokens straddle chunk boundaries, and so would the paths laid end to end; with the default 64,
# so do the paths of 70 and 130 tokens.
SMALL = [[5, 3], [7, 1, 2], [9], [4, 13], [6]]
LARGE = [[70, 3], [130, 20], [64, 65], [1, 90]]
DIRTY = 1  # the graph that gets the NaN or Inf: graphs before and after it must not see it


def path_batch(graph_paths, seed=0):
    """Graphs made of directed paths, nodes shuffled over the whole batch (``batch`` unsorted)."""
    gen = torch.Generator().manual_seed(seed)
    edges, batch, offset = [], [], 0
    for g, paths in enumerate(graph_paths):
        for n in paths:
            nodes = torch.arange(offset, offset + n)
            edges.append(torch.stack([nodes[:-1], nodes[1:]]))
            offset += n
        batch.append(torch.full((sum(paths),), g))
    perm = torch.randperm(offset, generator=gen)
    edge_index = torch.argsort(perm)[torch.cat(edges, 1)]
    return edge_index, torch.cat(batch)[perm]


def subgraph(g, edge_index, batch):
    """The nodes and edges of graph ``g`` and its edges renumbered for the graph alone."""
    nodes = (batch == g).nonzero().view(-1)
    edges = (batch[edge_index[1]] == g).nonzero().view(-1)
    local = torch.full((batch.numel(),), -1, dtype=torch.long)
    local[nodes] = torch.arange(nodes.numel())
    return nodes, edges, local[edge_index[:, edges]]


def poisoned_inputs(edge_index, batch, where, bad, seed=0):
    torch.manual_seed(seed)
    q, k, v, w = inputs(batch.numel(), edge_index.size(1), scale=0.9)
    w = 2 * w - 0.9  # weights of both signs
    dirty_nodes, dirty_edges, _ = subgraph(DIRTY, edge_index, batch)
    if where == "edge_weight":
        w[dirty_edges[dirty_edges.numel() // 2], 0] = bad
    else:
        (k if where == "key" else v)[dirty_nodes[dirty_nodes.numel() // 2], 1, 0] = bad
    return q, k, v, w


def run(method, chunk_size, q, k, v, edge_index, w, batch=None):
    extra = {} if method == "dag" else {"chunk_size": chunk_size}
    return resolvent_attention(q, k, v, edge_index, w, method=method, batch=batch, **extra)


CASES = [(method, paths, chunk) for method in ("line", "auto")
         for paths, chunk in ((SMALL, 4), (LARGE, 64), (LARGE, 4))]
CASES += [("dag", SMALL, None), ("dag", LARGE, None)]  # the reference: what every other method does


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["key", "value", "edge_weight"])
@pytest.mark.parametrize("method, graph_paths, chunk_size", CASES,
                         ids=[f"{m}-{'small' if p is SMALL else 'large'}" + (f"-chunk{c}" if c else "") for m, p, c in CASES])
def test_a_non_finite_input_stays_in_its_graph(method, graph_paths, chunk_size, where, bad):
    edge_index, batch = path_batch(graph_paths)
    q, k, v, w = poisoned_inputs(edge_index, batch, where, bad)
    q, k, v, w = (t.requires_grad_() for t in (q, k, v, w))
    out = run(method, chunk_size, q, k, v, edge_index, w, batch)
    dirty_nodes, _, _ = subgraph(DIRTY, edge_index, batch)
    assert not bool(torch.isfinite(out[dirty_nodes]).all())  # the NaN / Inf is not lost in its own graph

    # The loss reads the clean graphs only: their outputs and the gradients of their inputs are
    # those of each graph alone (the dirty graph's own gradients are NaN, with dag as with line).
    cot = torch.randn(out.shape, dtype=out.dtype)
    cot[dirty_nodes] = 0
    clean = batch != DIRTY
    grads = torch.autograd.grad((out[clean] * cot[clean]).sum(), (q, k, v, w))
    for g in range(len(graph_paths)):
        if g == DIRTY:
            continue
        nodes, edges, local_edges = subgraph(g, edge_index, batch)
        alone = [t.detach()[index].clone().requires_grad_() for t, index in
                 ((q, nodes), (k, nodes), (v, nodes), (w, edges))]
        expected = run(method, chunk_size, *alone[:3], local_edges, alone[3])
        assert bool(torch.isfinite(out[nodes]).all())
        torch.testing.assert_close(out[nodes], expected, rtol=1e-12, atol=1e-12)
        expected_grads = torch.autograd.grad((expected * cot[nodes]).sum(), alone)
        for got, want, index in zip(grads, expected_grads, (nodes, nodes, nodes, edges)):
            assert bool(torch.isfinite(got[index]).all())
            torch.testing.assert_close(got[index], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_finite_batches_of_paths_still_equal_the_inverse(chunk_size):
    edge_index, batch = path_batch(SMALL + LARGE, seed=1)
    q, k, v, w = poisoned_inputs(edge_index, batch, "key", 0.5, seed=1)  # a finite "poison": plain inputs
    w[3] = 0  # an exact zero inside a path
    inputs_ = [t.requires_grad_() for t in (q, k, v, w)]
    out = run("line", chunk_size, *inputs_[:3], edge_index, inputs_[3], batch)
    expected = inverse_resolvent_attention(*inputs_[:3], edge_index, inputs_[3])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-11)
    cot = torch.randn(out.shape, dtype=out.dtype)
    got = torch.autograd.grad((out * cot).sum(), inputs_)
    want = torch.autograd.grad((expected * cot).sum(), inputs_)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_no_chunk_holds_two_paths_and_padding_at_most_doubles_the_tokens(chunk_size):
    # 3,000 isolated nodes (paths of one token) beside long paths: padding every path to a full
    # chunk would multiply the tokens by up to chunk_size.
    graph_paths = [[1] * 3000, [300, 7], [5, 64, 65, 129]]
    edge_index, batch = path_batch(graph_paths)
    num_nodes = batch.numel()
    order, incoming = line_order(edge_index, num_nodes)
    layout = line_layout(order, incoming, edge_index.size(1), chunk_size)
    path_of = torch.empty(num_nodes, dtype=torch.long)  # the first node of every node's path
    path_of[order] = order[torch.cummax(torch.where(incoming < 0, torch.arange(num_nodes), 0), 0).values]
    tokens = 0
    for nodes in layout.nodes:
        assert nodes.size(1) <= chunk_size
        real = nodes < num_nodes
        first = path_of[nodes[:, 0]]  # a chunk starts with a real token
        assert bool(real[:, 0].all())
        assert bool((path_of[nodes.clamp(max=num_nodes - 1)] == first[:, None])[real].all())
        # real tokens first, padding after
        assert bool((real.long().diff(dim=1) <= 0).all())
        tokens += nodes.numel()
    assert tokens <= 2 * num_nodes
    assert sorted(torch.cat([n[n < num_nodes] for n in layout.nodes]).tolist()) == list(range(num_nodes))
