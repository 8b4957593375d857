"""Canonical DAG decompositions (paper Figs. 2 and 3) and their mixer, against the dense oracle."""
import pytest
import torch

from torch_geometric_chimera.nn.adjacency import dag_adjacency
from torch_geometric_chimera.nn.decomposition import (batched_grid_dags, batched_line_dags,
                                                      decomposed_resolvent_attention, decomposition_dags,
                                                      sharing_groups)
from torch_geometric_chimera.ops.reference import inverse_resolvent_attention
from torch_geometric_chimera.utils import grid_graph_dags, is_dag, line_graph_dags


def edge_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


def test_batched_grid_dags_are_each_images_grid_dags_after_its_offset():
    sizes = [(2, 3), (1, 4), (3, 3), (1, 1)]
    dags = batched_grid_dags(torch.tensor(sizes))
    offset = 0
    expected = [set(), set(), set(), set()]
    for h, w in sizes:
        for d, dag in enumerate(grid_graph_dags(h, w)):
            expected[d] |= edge_set(dag + offset)
        offset += h * w
    assert [edge_set(dag) for dag in dags] == expected
    assert all(is_dag(dag, offset) for dag in dags)


def test_batched_line_dags_follow_the_sequence_lengths():
    seq_len = torch.tensor([3, 1, 4])
    batch = torch.repeat_interleave(torch.arange(3), seq_len)
    forward, backward = batched_line_dags(seq_len)
    ref_forward, ref_backward = line_graph_dags(8, batch)
    assert edge_set(forward) == edge_set(ref_forward) and edge_set(backward) == edge_set(ref_backward)
    # without seq_len, the batch vector gives the same sequences
    assert [edge_set(d) for d in decomposition_dags("line", 8, batch=batch)] == [edge_set(forward),
                                                                                 edge_set(backward)]
    assert [edge_set(d) for d in decomposition_dags("fwd", 8, seq_len=seq_len)] == [edge_set(forward)]


def test_decomposition_dags_checks_its_geometry():
    with pytest.raises(ValueError, match="grid_size: decomposition='grid' needs"):
        decomposition_dags("grid", 4)
    with pytest.raises(ValueError, match="grid_size: the graphs it describes have 6 nodes in all, but x has 5"):
        decomposition_dags("grid", 5, grid_size=torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="seq_len: the graphs it describes have 3 nodes in all, but x has 4"):
        decomposition_dags("line", 4, seq_len=torch.tensor([3]))
    with pytest.raises(ValueError, match="decomposition: expected one of"):
        decomposition_dags("ring", 4)
    with pytest.raises(ValueError, match="sharing: expected one of"):
        sharing_groups("grid", "columns")


def test_sharing_modes_group_the_grid_dags_as_documented():
    # DAG order: (down, right), (down, left), (up, right), (up, left)
    assert sharing_groups("grid", "none") == (0, 1, 2, 3)
    assert sharing_groups("grid", "complete") == (0, 0, 0, 0)
    assert sharing_groups("grid", "row") == (0, 0, 1, 1)            # same vertical direction
    assert sharing_groups("grid", "diagonal") == (0, 1, 1, 0)       # a DAG with its reverse
    # "diagonal" pairs each DAG with its exact reverse
    dags = grid_graph_dags(3, 4)
    for d, e in [(0, 3), (1, 2)]:
        assert edge_set(dags[d]) == edge_set(dags[e].flip(0))


@pytest.mark.parametrize("decomposition, geometry, sharing", [
    ("grid", dict(grid_size=torch.tensor([[3, 4], [2, 2]])), "none"),
    ("grid", dict(grid_size=torch.tensor([[3, 4], [2, 2]])), "diagonal"),
    ("line", dict(seq_len=torch.tensor([5, 3])), "none"),
    ("fwd", dict(seq_len=torch.tensor([5, 3])), "complete"),
])
def test_decomposed_mixer_equals_the_sum_of_dense_resolvents_of_its_dags(decomposition, geometry, sharing):
    torch.manual_seed(0)
    sizes = geometry["grid_size"].prod(-1) if "grid_size" in geometry else geometry["seq_len"]
    num_nodes, heads, state, head_dim = int(sizes.sum()), 2, 3, 4
    batch = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    groups = sharing_groups(decomposition, sharing)
    sets = max(groups) + 1
    query = torch.randn(num_nodes, sets, heads, state, dtype=torch.float64, requires_grad=True)
    key = torch.randn(num_nodes, sets, heads, state, dtype=torch.float64, requires_grad=True)
    value = torch.randn(num_nodes, heads, head_dim, dtype=torch.float64, requires_grad=True)
    delta = torch.rand(num_nodes, heads, dtype=torch.float64).requires_grad_()
    dags = decomposition_dags(decomposition, num_nodes, batch=batch, **geometry)

    out = decomposed_resolvent_attention(query, key, value, delta, dags, groups, batch=batch)
    expected = 0
    for dag, g in zip(dags, groups):
        weight, key_scale = dag_adjacency(delta, dag)
        expected = expected + inverse_resolvent_attention(query[:, g], key[:, g] * key_scale.unsqueeze(-1), value,
                                                          dag, weight)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (query, key, value, delta), grad)
    want = torch.autograd.grad(expected, (query, key, value, delta), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def dense_resolvent(dag, weight, n):
    adj = torch.zeros(n, n, dtype=weight.dtype)
    adj.index_put_((dag[1], dag[0]), weight, accumulate=True)
    return torch.linalg.inv(torch.eye(n, dtype=weight.dtype) - adj)


def test_grid_decomposition_reaches_every_pair_of_pixels():
    # Figure 3: with positive weights the four DAGs' resolvents add up to L > 0 everywhere.
    h, w = 4, 5
    n = h * w
    delta = torch.rand(n, 1, dtype=torch.float64)
    resolvents = [dense_resolvent(dag, dag_adjacency(delta, dag)[0][:, 0], n)
                  for dag in batched_grid_dags(torch.tensor([[h, w]]))]
    assert bool((sum(resolvents) > 0).all())
    # no single DAG does: down-right never reaches a pixel above or to the left
    assert not any(bool((resolvent > 0).all()) for resolvent in resolvents)


# --- the layer ------------------------------------------------------------------------------------

from torch_geometric.loader import DataLoader  # noqa: E402

from torch_geometric_chimera import ChimeraConv  # noqa: E402
from torch_geometric_chimera.transforms import ImageToGrid, SequenceToLine  # noqa: E402


def image_batch(sizes=((4, 4), (2, 6)), channels=8):
    return next(iter(DataLoader([ImageToGrid()(torch.randn(channels, h, w)) for h, w in sizes],
                                batch_size=len(sizes))))


def test_fwd_decomposition_is_the_dag_layer_on_the_forward_line():
    seq_len = torch.tensor([6, 3])
    x = torch.randn(9, 8)
    batch = torch.repeat_interleave(torch.arange(2), seq_len)
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="fwd")
    plain = ChimeraConv(8, heads=2, state_dim=4, adjacency="dag")
    plain.load_state_dict(conv.state_dict())
    forward, _ = batched_line_dags(seq_len)
    torch.testing.assert_close(conv(x, torch.empty(2, 0, dtype=torch.long), batch=batch, seq_len=seq_len),
                               plain(x, forward, batch=batch))


def test_fwd_decomposition_is_causal():
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="fwd")
    x = torch.randn(7, 8)
    seq_len = torch.tensor([7])
    edge_index = SequenceToLine()(x).edge_index  # the undirected line: the layer must not use it
    out = conv(x, edge_index, seq_len=seq_len)
    x2 = x.clone()
    x2[5:] += 1.0
    out2 = conv(x2, edge_index, seq_len=seq_len)
    torch.testing.assert_close(out[:5], out2[:5])
    assert not torch.allclose(out[5:], out2[5:])


@pytest.mark.parametrize("sharing", ["row", "diagonal", "none"])
def test_sharing_modes_with_equal_parameter_sets_equal_complete_sharing(sharing):
    data = image_batch()
    state, width = 4, 8
    complete = ChimeraConv(width, heads=2, state_dim=state, decomposition="grid", sharing="complete")
    shared = ChimeraConv(width, heads=2, state_dim=state, decomposition="grid", sharing=sharing)
    inner, sets = complete.inner, shared.num_sets
    assert sets == {"row": 2, "diagonal": 2, "none": 4}[sharing]

    def spread(t, before):  # rows: [..., x (before), B (state), C (state), rest]; copy B and C into every set
        head, b, c, rest = t.split([before, state, state, t.size(0) - before - 2 * state])
        return torch.cat([head] + [b] * sets + [c] * sets + [rest])

    state_dict = complete.state_dict()
    state_dict["in_proj.weight"] = spread(state_dict["in_proj.weight"], 2 * inner)  # z, x, B, C, dt, psi
    for name in ("conv_self", "conv_neighbors", "conv_bias"):
        state_dict[name] = spread(state_dict[name], inner)  # x, B, C
    shared.load_state_dict(state_dict)
    args = (data.x, data.edge_index)
    kwargs = dict(batch=data.batch, grid_size=data.grid_size)
    torch.testing.assert_close(shared(*args, **kwargs), complete(*args, **kwargs))
    # and distinct sets give another layer
    with torch.no_grad():
        shared.in_proj.weight[2 * inner:2 * inner + state] += 0.5
    assert not torch.allclose(shared(*args, **kwargs), complete(*args, **kwargs))


def test_grid_layer_batches_images_like_one_by_one():
    data = image_batch()
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid")
    out = conv(data.x, data.edge_index, batch=data.batch, grid_size=data.grid_size)
    for g in range(2):
        mask = data.batch == g
        single = conv(data.x[mask], torch.empty(2, 0, dtype=torch.long), grid_size=data.grid_size[g:g + 1])
        torch.testing.assert_close(out[mask], single)
    out.square().sum().backward()
    assert all(p.grad is not None for p in conv.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(decomposition="ring"), "decomposition: expected one of"),
    (dict(decomposition="grid", adjacency="general"), "adjacency: decomposition='grid' normalizes every DAG"),
    (dict(decomposition="line", edge_dim=3), "edge_dim: the DAGs of a decomposition"),
    (dict(sharing="row"), "sharing: only applies with a decomposition"),
    (dict(decomposition="grid", sharing="rows"), "sharing: expected one of"),
])
def test_decomposition_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChimeraConv(8, **kwargs)


def test_grid_layer_needs_the_grid_size():
    data = image_batch()
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid")
    with pytest.raises(ValueError, match="grid_size: decomposition='grid' needs"):
        conv(data.x, data.edge_index, batch=data.batch)


def test_scripted_grid_layer_gives_the_eager_outputs():
    data = image_batch()
    conv = ChimeraConv(8, heads=2, state_dim=4, decomposition="grid")
    kwargs = dict(batch=data.batch, grid_size=data.grid_size)
    torch.testing.assert_close(torch.jit.script(conv)(data.x, data.edge_index, **kwargs),
                               conv(data.x, data.edge_index, **kwargs))


def test_one_sequence_without_seq_len_reuses_its_dags():
    first = decomposition_dags("line", 9)
    assert all(a is b for a, b in zip(first, decomposition_dags("line", 9)))
    assert [edge_set(d) for d in first] == [edge_set(d) for d in batched_line_dags(torch.tensor([9]))]


def test_dags_of_one_sequence_go_to_the_requested_device():
    # x's device, not the CPU: a layer on an accelerator builds its DAGs there
    for decomposition in ("line", "fwd"):
        dags = decomposition_dags(decomposition, 6, device=torch.device("meta"))
        assert len(dags) == (2 if decomposition == "line" else 1)
        assert all(dag.device.type == "meta" and dag.shape == (2, 5) for dag in dags)


@pytest.mark.parametrize("sharing", ["none", "complete", "row", "diagonal"])
def test_grid_kernel_path_equals_the_per_dag_path(sharing, monkeypatch):
    # method="auto" on CPU solves the four grid DAGs row by row in one chimera::grid_attention call
    # (their walks stacked), method="dense" inverts each DAG's I - A: the same layer, values and gradients.
    import torch_geometric_chimera.nn.decomposition as decomposition
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2])  # the walk
        return grid_attention(*args, **kwargs)

    grid_attention = decomposition.grid_attention
    monkeypatch.setattr(decomposition, "grid_attention", counted)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # stacked from one image per thread up
    data = image_batch(sizes=((3, 4), (1, 1), (0, 3), (1, 5), (4, 1), (6, 2)), channels=16)
    grid = ChimeraConv(16, heads=2, state_dim=4, decomposition="grid", sharing=sharing).double()
    dense = ChimeraConv(16, heads=2, state_dim=4, decomposition="grid", sharing=sharing, method="dense").double()
    dense.load_state_dict(grid.state_dict())
    results = []
    for conv in (grid, dense):
        x = data.x.double().requires_grad_()
        out = conv(x, data.edge_index, batch=data.batch, grid_size=data.grid_size)
        grads = torch.autograd.grad(out, [x] + list(conv.parameters()), torch.ones_like(out))
        results.append((out,) + grads)
        assert len(calls) == 1 and calls[0].shape == (4, data.num_nodes)  # the four walks; no call for dense
    names = ["out", "x"] + [name for name, _ in grid.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert results[0][0].abs().max() > 0.01
